//! The dependency tree stays lean: every dependency a crate declares is named in its sources,
//! and the tree builds one version of safetensors.

use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::common::repo_root;

/// Names under `[dependencies]` of a Cargo.toml.
fn declared(manifest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == "[dependencies]" || line.ends_with(".dependencies]");
            continue;
        }
        if inside
            && let Some((name, _)) = line.split_once(['.', '=', ' '])
            && !name.is_empty()
            && !name.starts_with('#')
        {
            out.push(name.trim().to_string());
        }
    }
    out
}

fn sources(dir: &std::path::Path, out: &mut String) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            sources(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push_str(&std::fs::read_to_string(&p)?);
        }
    }
    Ok(())
}

/// Declared for their features only: burn reaches these backends through its own re-exports,
/// and these declarations choose what they are built with.
const FEATURES_ONLY: [&str; 2] = ["gram-model: burn-flex", "gram-model: burn-wgpu"];

#[test]
fn every_declared_dependency_is_used() -> Result<()> {
    let crates = repo_root().join("crates");
    let mut unused = Vec::new();
    for e in std::fs::read_dir(&crates)? {
        let dir = e?.path();
        if !dir.is_dir() {
            continue;
        }
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml"))?;
        let mut src = String::new();
        sources(&dir.join("src"), &mut src)?;
        for dep in declared(&manifest) {
            let ident = dep.replace('-', "_");
            let entry = format!(
                "{}: {dep}",
                dir.file_name().unwrap_or_default().to_string_lossy()
            );
            if !src.contains(&format!("{ident}::"))
                && !src.contains(&format!("{ident}!"))
                && !FEATURES_ONLY.contains(&entry.as_str())
            {
                unused.push(entry);
            }
        }
    }
    ensure!(
        unused.is_empty(),
        "declared but never named in the sources: {unused:?}"
    );
    Ok(())
}

#[test]
fn the_build_has_one_safetensors() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(repo_root())
        .args([
            "tree",
            "--workspace",
            "--offline",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .context("running cargo tree")?;
    ensure!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut versions: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("safetensors v"))
        .map(|v| v.split_whitespace().next().unwrap_or(v))
        .collect();
    versions.sort_unstable();
    versions.dedup();
    ensure!(
        versions.len() == 1,
        "safetensors versions built: {versions:?}"
    );
    Ok(())
}
