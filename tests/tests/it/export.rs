//! gram-export onnx: onnxruntime's logits equal the transformers fixtures (lm head) and burn's
//! (judge head, `--verify`) for every hf-tiny model and SmolLM2; the graph passes onnx.checker
//! where Python's onnx is installed; bad exports are refused with one-line errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use gram_score::runtime::{Batch, open_session};

use crate::common::{bin, fixture_tensor, fixtures, scratch, smollm2_gguf};

pub const TINY: &[&str] = &["llama", "llama-tied-rope-llama3", "qwen2", "qwen3"];

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

/// `gram-export onnx` of `model` into `out`; hf-tiny folders carry no tokenizer, so SmolLM2's is
/// given (its label ids 49/50 are inside their 448-token vocabulary).
pub fn export(model: &Path, out: &Path, head: &str, extra: &[&str]) -> Result<String> {
    let mut cmd = Command::new(bin("gram-export")?);
    cmd.args(["onnx", "--head", head, "--overwrite", "--model"])
        .arg(model)
        .arg("--out")
        .arg(out);
    if !model.join("tokenizer.json").exists() && model.is_dir() {
        cmd.arg("--tokenizer").arg(fixtures().join("smollm2"));
    }
    cmd.args(extra);
    run(&mut cmd)
}

/// Runs an exported graph on (ids, mask) `[rows, width]`.
pub fn ort_run(
    dir: &Path,
    output: &str,
    rows: usize,
    width: usize,
    ids: Vec<i64>,
    mask: Vec<i64>,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let mut s = open_session(&dir.join("model.onnx"), 0)?;
    Ok(Batch {
        rows,
        width,
        ids,
        mask,
    }
    .run(&mut s, output)?)
}

#[test]
fn onnx_lm_logits_match_transformers_for_every_tiny_model() -> Result<()> {
    let root = scratch("export-tiny")?;
    for name in TINY {
        let src = fixtures().join("hf-tiny").join(name);
        let out = root.join(name);
        // One model with its weights in model.onnx.data (the layout used past 1 GiB).
        let external = *name == "qwen2";
        export(
            &src,
            &out,
            "lm",
            if external {
                &["--verify", "--external-data-over", "0"]
            } else {
                &["--verify"]
            },
        )?;
        ensure!(
            out.join("model.onnx.data").exists() == external,
            "{name}: model.onnx.data presence"
        );
        if external {
            let (g, d) = (
                std::fs::metadata(out.join("model.onnx"))?.len(),
                std::fs::metadata(out.join("model.onnx.data"))?.len(),
            );
            ensure!(
                g < 64 * 1024 && d > 100_000,
                "{name}: graph {g} bytes, data {d} bytes: weights not external"
            );
        }
        let bytes = std::fs::read(src.join("expected.safetensors"))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let (shape, ids) = fixture_tensor(&st, "input_ids")?;
        let (_, mask) = fixture_tensor(&st, "attention_mask")?;
        let (lshape, want) = fixture_tensor(&st, "logits")?;
        let (b, t, v) = (shape[0], shape[1], lshape[2]);
        let (oshape, got) = ort_run(
            &out,
            "logits",
            b,
            t,
            ids.iter().map(|&x| x as i64).collect(),
            mask.iter().map(|&x| x as i64).collect(),
        )?;
        ensure!(oshape == [b, t, v], "{name}: output shape {oshape:?}");
        let mut max = 0f64;
        for (p, &m) in mask.iter().enumerate() {
            if m == 1.0 {
                for k in 0..v {
                    max = max.max((f64::from(got[p * v + k]) - want[p * v + k]).abs());
                }
            }
        }
        println!("{name}: onnxruntime lm logits vs transformers max |diff| {max:.2e}");
        ensure!(
            max <= 1e-4,
            "{name}: lm logits differ from transformers' by {max:.3e} (> 1e-4)"
        );
    }
    Ok(())
}

#[test]
fn onnx_judge_logits_match_burn_for_every_tiny_model() -> Result<()> {
    let root = scratch("export-tiny-judge")?;
    for name in TINY {
        let out = root.join(name);
        let text = export(
            &fixtures().join("hf-tiny").join(name),
            &out,
            "judge",
            &["--verify"],
        )?;
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("gram-export.json"))?)?;
        let diff = m["verified_max_abs_diff"]
            .as_f64()
            .context("no verified_max_abs_diff")?;
        println!("{name}: judge head onnxruntime vs burn max |diff| {diff:.2e}");
        ensure!(diff <= 1e-4, "{name}: {diff}");
        ensure!(text.contains("verified"), "{name}: {text}");
        ensure!(
            m["head"] == "judge" && m["label_ids"]["a"] == 49 && m["label_ids"]["b"] == 50,
            "{name}: manifest {m}"
        );
        onnx_checker(&out.join("model.onnx"))?;
    }
    Ok(())
}

#[test]
fn smollm2_onnx_matches_transformers_and_burn() -> Result<()> {
    let gguf = smollm2_gguf()?;
    let root = scratch("export-smollm2")?;
    let lm = root.join("lm");
    export(&gguf, &lm, "lm", &[])?;
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("smollm2/cases.json"))?)?;
    let bytes = std::fs::read(fixtures().join("smollm2/expected.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut session = open_session(&lm.join("model.onnx"), 0)?;
    for (i, c) in cases["cases"]
        .as_array()
        .context("cases")?
        .iter()
        .enumerate()
    {
        let ids: Vec<i64> = c["ids"]
            .as_array()
            .context("ids")?
            .iter()
            .filter_map(serde_json::Value::as_i64)
            .collect();
        let n = ids.len();
        let (shape, got) = Batch {
            rows: 1,
            width: n,
            ids,
            mask: vec![1; n],
        }
        .run(&mut session, "logits")?;
        let v = shape[2];
        let last = &got[(n - 1) * v..n * v];
        let (_, want) = fixture_tensor(&st, &format!("last_logits_{i}"))?;
        let max = last
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (f64::from(g) - w).abs())
            .fold(0.0, f64::max);
        println!("smollm2 case {i}: onnxruntime last logits vs transformers max |diff| {max:.2e}");
        ensure!(max <= 1e-3, "case {i}: {max:.3e} > 1e-3");
    }
    drop(session);
    std::fs::remove_dir_all(&lm)?;
    let judge = root.join("judge");
    let text = export(&gguf, &judge, "judge", &["--verify"])?;
    println!("{}", text.trim());
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(judge.join("gram-export.json"))?)?;
    let diff = m["verified_max_abs_diff"]
        .as_f64()
        .context("no verified_max_abs_diff")?;
    ensure!(diff <= 1e-4, "smollm2 judge vs burn {diff:.3e}");
    onnx_checker(&judge.join("model.onnx"))?;
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

/// A Python with the `onnx` package: $GRAM_TORCH_PYTHON or the cache's torch venv.
pub fn python_with(module: &str) -> Option<PathBuf> {
    // scripts/setup.sh installs onnx into $GRAM_CACHE/onnx-venv; the benchmarks' torch venv
    // has transformers.
    let cache = std::env::var_os("GRAM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/gram-rs")));
    let candidates = [
        std::env::var_os("GRAM_TORCH_PYTHON").map(PathBuf::from),
        cache.as_ref().map(|c| c.join("torch-venv/bin/python")),
        cache.as_ref().map(|c| c.join("onnx-venv/bin/python")),
    ];
    candidates.into_iter().flatten().find(|p| {
        p.exists()
            && Command::new(p)
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
    })
}

fn onnx_checker(model: &Path) -> Result<()> {
    let Some(py) = python_with("onnx") else {
        println!(
            "SKIPPED onnx.checker for {}: no Python with the onnx package (scripts/setup.sh installs one into ~/.cache/gram-rs/onnx-venv)",
            model.display()
        );
        return Ok(());
    };
    let out = Command::new(py)
        .args(["-c", "import onnx, sys; onnx.checker.check_model(sys.argv[1], full_check=True); print('onnx.checker ok')"])
        .arg(model)
        .output()?;
    ensure!(
        out.status.success(),
        "onnx.checker rejected {}: {}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    println!("onnx.checker ok: {}", model.display());
    Ok(())
}

#[test]
fn bad_exports_are_refused_in_one_line() -> Result<()> {
    let root = scratch("export-bad")?;
    let tiny = fixtures().join("hf-tiny/llama");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--model".into(), root.join("nope").display().to_string()],
            "no such file",
        ),
        // hf-tiny has no tokenizer of its own.
        (
            vec!["--model".into(), tiny.display().to_string()],
            "tokenizer",
        ),
        (
            vec![
                "--model".into(),
                tiny.display().to_string(),
                "--tokenizer".into(),
                fixtures().join("smollm2").display().to_string(),
                "--max-tokens".into(),
                "100000".into(),
            ],
            "context",
        ),
        // Weights burn refuses (a NaN) found by --verify: the checkpoint is the user's to fix.
        (
            vec![
                "--model".into(),
                nan_checkpoint(&tiny, &root.join("nan"))?
                    .display()
                    .to_string(),
                "--tokenizer".into(),
                fixtures().join("smollm2").display().to_string(),
                "--verify".into(),
            ],
            "non-finite",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(bin("gram-export")?)
            .arg("onnx")
            .args(&args)
            .arg("--out")
            .arg(root.join("o"))
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(1),
            "{args:?}: exit {:?}, stderr {err}",
            out.status.code()
        );
        ensure!(
            err.lines().count() == 1 && err.contains(want),
            "{args:?}: stderr {err:?} should name `{want}`"
        );
        ensure!(
            !root.join("o").exists(),
            "{args:?}: a failed export left its folder"
        );
    }
    Ok(())
}

/// A copy of the hf-tiny checkpoint `src` in `dst` whose first f32 weight starts with a NaN.
fn nan_checkpoint(src: &Path, dst: &Path) -> Result<PathBuf> {
    use safetensors::tensor::{Dtype, TensorView};
    std::fs::create_dir_all(dst)?;
    std::fs::copy(src.join("config.json"), dst.join("config.json"))?;
    let bytes = std::fs::read(src.join("model.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let first = tensors
        .iter_mut()
        .find(|t| t.1 == Dtype::F32 && t.3.len() >= 4)
        .context("no f32 tensor in the fixture")?;
    first.3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors"))?;
    Ok(dst.to_path_buf())
}
