//! Paths and readers shared by the end-to-end tests.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `../shared` beside the checkout (or `$GRAM_SHARED`), with its fixtures and data; a test that
/// needs it fails with this one message when it is not there (not with a missing file deep in
/// the test).
pub fn shared() -> PathBuf {
    let p = std::env::var_os("GRAM_SHARED")
        .map_or_else(|| repo_root().join("../shared"), PathBuf::from);
    assert!(
        p.join("fixtures").is_dir() && p.join("data").is_dir(),
        "the end-to-end tests read fixtures/ and data/ from {}: not found there. Clone the \
         repository beside the shared folder (as CI lays it out) or set GRAM_SHARED to it",
        p.display()
    );
    p
}

/// The fixtures folder.
pub fn fixtures() -> PathBuf {
    shared().join("fixtures")
}

/// The SmolLM2 GGUF fetched by `scripts/setup.sh`.
pub fn smollm2_gguf() -> Result<PathBuf> {
    let p = match std::env::var_os("GRAM_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("GRAM_CACHE").map_or_else(
                || {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/gram-rs")
                },
                PathBuf::from,
            );
            cache.join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    if !p.exists() {
        bail!(
            "{} is missing: run scripts/setup.sh first (the README's test command does)",
            p.display()
        );
    }
    Ok(p)
}

/// A tensor of an expected.safetensors fixture, as (shape, f32 values) (int64 widened).
pub fn fixture_tensor(
    st: &safetensors::SafeTensors<'_>,
    name: &str,
) -> Result<(Vec<usize>, Vec<f64>)> {
    let v = st
        .tensor(name)
        .with_context(|| format!("fixture tensor {name}"))?;
    let data = v.data();
    let vals: Vec<f64> = match v.dtype() {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        safetensors::Dtype::I64 => data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64)
            .collect(),
        other => bail!("fixture tensor {name}: unexpected dtype {other:?}"),
    };
    Ok((v.shape().to_vec(), vals))
}

/// A scratch folder under the system temp dir (`gram-tests-<pid>/<name>`), fresh for each call.
/// The folder stays after the run (to look at when a test fails); the first call of a run
/// removes the folders of earlier runs whose process is gone (a run leaves up to ~0.8 GB).
pub fn scratch(name: &str) -> Result<PathBuf> {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(sweep_old_scratch);
    let base = std::env::temp_dir()
        .join(format!("gram-tests-{}", std::process::id()))
        .join(name);
    if base.exists() {
        std::fs::remove_dir_all(&base)?;
    }
    std::fs::create_dir_all(&base)?;
    Ok(base)
}

/// Removes `gram-tests-<pid>` folders of processes that no longer run. Only where `/proc` tells
/// which processes run (Linux); elsewhere nothing is removed.
fn sweep_old_scratch() {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("gram-tests-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != own && !proc.join(pid.to_string()).exists() {
            // Best effort: a folder another user owns, or one being removed, is left alone.
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Runs `cmd` and fails, with `what` and its stderr, unless it exits 0; its output.
pub fn run_ok(cmd: &mut std::process::Command, what: &str) -> Result<std::process::Output> {
    let o = cmd.output()?;
    ensure!(
        o.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(o)
}

/// `cmd` (a job refused for the user's input or environment) exits 1 with one line that `says`
/// why.
pub fn refused_in_one_line(cmd: &mut std::process::Command, says: &str) -> Result<()> {
    let o = cmd.output()?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(o.status.code() == Some(1), "exit {:?}: {err}", o.status);
    ensure!(
        err.trim().lines().count() == 1 && err.contains(says),
        "not a one-line refusal: {err}"
    );
    Ok(())
}

/// The path of one of the workspace's binaries, built first (once per test run) with the same
/// cargo, profile and target dir as this test binary, so it is never stale.
pub fn bin(name: &str) -> Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            // target/<profile>/deps/it-<hash> -> target/<profile>
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let profile_dir = exe
                .parent()
                .and_then(|p| p.parent())
                .ok_or("no target dir")?
                .to_path_buf();
            let target_dir = profile_dir.parent().ok_or("no target dir")?.to_path_buf();
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = std::process::Command::new(cargo);
            build
                .args(["build", "--quiet", "--bins", "--manifest-path"])
                .arg(repo_root().join("Cargo.toml"))
                .arg("--target-dir")
                .arg(&target_dir);
            // What cargo sets for this test binary is not for the build: a build script that
            // watches one (ring's watches CARGO_MANIFEST_DIR) would rerun, and everything above
            // it (object_store, DataFusion, Ballista, our crates) would be compiled again here
            // and once more by the next `cargo build`.
            for (k, _) in std::env::vars_os() {
                let k = k.to_string_lossy();
                let set_by_cargo = [
                    "CARGO_PKG_",
                    "CARGO_BIN_",
                    "CARGO_MANIFEST_",
                    "CARGO_CRATE_",
                ]
                .iter()
                .any(|p| k.starts_with(p))
                    || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&&*k);
                if set_by_cargo {
                    build.env_remove(&*k);
                }
            }
            let status = build.status().map_err(|e| format!("running cargo: {e}"))?;
            if !status.success() {
                return Err("cargo build --bins failed".to_string());
            }
            Ok(profile_dir)
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let p = dir.join(name);
    if !p.exists() {
        bail!("binary {} not found after building", p.display());
    }
    Ok(p)
}

/// The sweep removes a scratch folder of a process that is gone and keeps one of a running
/// process (pid 1) and its own.
#[test]
fn scratch_sweep_removes_only_folders_of_ended_runs() -> Result<()> {
    if !Path::new("/proc/self").exists() {
        println!("skipped: no /proc, so the sweep does nothing here");
        return Ok(());
    }
    let tmp = std::env::temp_dir();
    let own = scratch("sweep-check")?;
    let gone = tmp.join(format!("gram-tests-{}", u32::MAX - 1));
    let live = tmp.join("gram-tests-1");
    let live_existed = live.exists();
    std::fs::create_dir_all(gone.join("x"))?;
    std::fs::create_dir_all(&live)?;
    sweep_old_scratch();
    let (gone_left, live_left, own_left) = (gone.exists(), live.exists(), own.exists());
    if !live_existed {
        std::fs::remove_dir_all(&live)?;
    }
    ensure!(!gone_left, "the folder of an ended run was kept");
    ensure!(live_left, "the folder of a running process was removed");
    ensure!(own_left, "this run's own folder was removed");
    Ok(())
}

/// A Python with torch and transformers (and `extra_modules`, comma-separated, if any):
/// `$GRAM_TORCH_PYTHON`, the venv `benches/train_speed.sh` makes, or `python3`.
pub fn torch_python(extra_modules: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("GRAM_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/gram-rs"),
        PathBuf::from,
    );
    let candidates = std::env::var_os("GRAM_TORCH_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            cache.join("torch-venv/bin/python"),
            PathBuf::from("python3"),
        ]);
    candidates.into_iter().find(|p| {
        std::process::Command::new(p)
            .arg("-c")
            .arg(format!(
                "import torch, transformers, safetensors{}",
                if extra_modules.is_empty() {
                    String::new()
                } else {
                    format!(", {extra_modules}")
                }
            ))
            .output()
            .is_ok_and(|o| o.status.success())
    })
}
