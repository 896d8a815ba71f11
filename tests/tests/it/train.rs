//! gram-train end to end: a tiny randomly initialised LLaMA (SmolLM2's tokenizer) on a
//! synthetic preference task built by `gram-data build`; stage 1, stage 2 and the BT baseline
//! learn it; a killed run resumes bit-identically; wgpu matches the CPU; bad inputs are
//! refused before training.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail, ensure};

use crate::common::{bin, fixtures, repo_root, scratch, torch_python};

const FILLER: &[&str] = &[
    "apple", "river", "stone", "cloud", "green", "quick", "silver", "music", "garden", "paper",
    "light", "ocean", "tiger", "winter", "yellow", "bread", "orange", "window", "summer", "forest",
];

/// Synthetic pairs whose rule is learnable: the response with the word "good" beats the one with
/// "bad"; everything else is random filler. Deterministic (a fixed LCG).
fn synthetic_jsonl(path: &Path, n: usize) -> Result<()> {
    let mut s: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = |m: usize| -> usize {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((s >> 33) as usize) % m
    };
    let mut out = String::new();
    for i in 0..n {
        let mut resp = |key: &str| -> String {
            let mut w: Vec<&str> = (0..5).map(|_| FILLER[next(FILLER.len())]).collect();
            let at = next(w.len() + 1);
            w.insert(at, key);
            w.join(" ")
        };
        let (chosen, rejected) = (resp("good"), resp("bad"));
        let prompt = format!(
            "Item {i}: say something about the {}.",
            FILLER[next(FILLER.len())]
        );
        out.push_str(
            &serde_json::json!({"prompt": prompt, "chosen": chosen, "rejected": rejected})
                .to_string(),
        );
        out.push('\n');
    }
    std::fs::write(path, out)?;
    Ok(())
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{stdout}\n{stderr}", out.status);
    }
    Ok(format!("{stdout}{stderr}"))
}

fn fails(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(!out.status.success(), "{cmd:?} should have failed");
    ensure!(
        out.status.code() == Some(1),
        "{cmd:?}: exit {:?}, want 1 (user error)",
        out.status.code()
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(!err.contains("panicked"), "{cmd:?} panicked:\n{err}");
    Ok(err)
}

/// A tiny LLaMA config: 2 layers, width 64, GQA 4/2, tied head, SmolLM2's vocabulary.
fn tiny_config(path: &Path, max_pos: usize) -> Result<()> {
    let c = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
        "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": max_pos, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(path, serde_json::to_string_pretty(&c)?)?;
    Ok(())
}

/// The shared setup, made once per test run: (tiny model, dataset) folders.
struct Task {
    root: PathBuf,
    model: PathBuf,
    data: PathBuf,
}

fn task() -> Result<&'static Task> {
    static TASK: OnceLock<Result<Task, String>> = OnceLock::new();
    TASK.get_or_init(|| make_task().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn make_task() -> Result<Task> {
    let root = scratch("train-task")?;
    let cfg = root.join("tiny.json");
    tiny_config(&cfg, 512)?;
    let model = root.join("tiny");
    run(Command::new(bin("gram-train")?)
        .args(["init", "--model-config"])
        .arg(&cfg)
        .arg("--tokenizer")
        .arg(fixtures().join("smollm2"))
        .arg("--out")
        .arg(&model))?;
    let jsonl = root.join("pairs.jsonl");
    synthetic_jsonl(&jsonl, 1600)?;
    let data = root.join("data");
    build_data(
        &jsonl,
        &model,
        &data,
        &["--max-tokens", "400", "--valid", "0.1", "--test", "0.05"],
    )?;
    Ok(Task { root, model, data })
}

/// `gram-data build` of a {prompt, chosen, rejected} JSONL file with a model's tokenizer.
fn build_data(jsonl: &Path, model: &Path, out: &Path, extra: &[&str]) -> Result<()> {
    run(Command::new(bin("gram-data")?)
        .current_dir(repo_root())
        .args([
            "build",
            "pipelines/chosen-rejected.toml",
            "--quiet",
            "--overwrite",
            "--input",
        ])
        .arg(jsonl)
        .arg("--model")
        .arg(model)
        .args(extra)
        .arg("--out")
        .arg(out))?;
    Ok(())
}

fn summary(run_dir: &Path) -> Result<serde_json::Value> {
    let p = run_dir.join("summary.json");
    Ok(serde_json::from_str(
        &std::fs::read_to_string(&p).with_context(|| p.display().to_string())?,
    )?)
}

fn train_cmd(stage: &str, model: &Path, data: &Path, out: &Path) -> Result<Command> {
    let mut c = Command::new(bin("gram-train")?);
    c.arg(stage)
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out);
    c.args(["--quiet", "--overwrite"]);
    Ok(c)
}

#[test]
fn stage1_then_stage2_learn_the_task_and_bt_learns_it_too() -> Result<()> {
    let t = task()?;
    // Stage 1: the pair-generation loss falls.
    let s1 = t.root.join("s1");
    run(train_cmd("pretrain", &t.model, &t.data, &s1)?.args([
        "--max-steps",
        "20",
        "--lr",
        "3e-3",
        "--batch-size",
        "8",
        "--log-every",
        "5",
        "--warmup",
        "0.1",
    ]))?;
    let sum1 = summary(&s1)?;
    let (first, last) = (
        sum1["first_train_loss"].as_f64().unwrap_or(0.0),
        sum1["train_loss"].as_f64().unwrap_or(f64::MAX),
    );
    println!(
        "stage 1: train loss {first:.3} -> {last:.3}, valid loss {:.3}",
        sum1["valid"]["loss"].as_f64().unwrap_or(f64::NAN)
    );
    ensure!(
        last < 0.8 * first,
        "stage-1 loss did not fall: {first} -> {last}"
    );
    for f in [
        "final/config.json",
        "final/model.safetensors",
        "final/tokenizer.json",
        "metrics.jsonl",
        "curves.png",
        "settings.toml",
    ] {
        ensure!(s1.join(f).exists(), "stage 1 wrote no {f}");
    }

    // Stage 2 from stage 1's output: held-out pairwise accuracy (both orders) >= 95%.
    let s2 = t.root.join("s2");
    run(
        train_cmd("finetune", &s1.join("final"), &t.data, &s2)?.args([
            "--max-steps",
            "100",
            "--lr",
            "3e-3",
            "--batch-size",
            "16",
            "--eval-every",
            "50",
            "--max-valid",
            "0",
        ]),
    )?;
    let sum2 = summary(&s2)?;
    let acc = sum2["valid"]["acc"].as_f64().unwrap_or(0.0);
    println!(
        "stage 2: valid pairwise accuracy {:.1}% on {} pairs",
        100.0 * acc,
        sum2["valid"]["n"]
    );
    ensure!(
        sum2["valid"]["n"].as_u64().unwrap_or(0) >= 100,
        "too few validation pairs: {}",
        sum2["valid"]["n"]
    );
    ensure!(acc >= 0.95, "stage-2 held-out accuracy {acc} < 0.95");
    // Beyond the order-averaged score: single rows are ranked too, and the loss is below chance.
    let (vloss, row_acc) = (
        sum2["valid"]["loss"].as_f64().unwrap_or(1.0),
        sum2["valid"]["row_acc"].as_f64().unwrap_or(0.0),
    );
    println!(
        "stage 2: valid loss {vloss:.3} (chance {:.3}), single-order accuracy {:.1}%",
        2f64.ln(),
        100.0 * row_acc
    );
    ensure!(
        vloss < 0.67 && row_acc >= 0.8,
        "stage 2 did not learn beyond position bias: loss {vloss}, row acc {row_acc}"
    );

    // The Bradley-Terry baseline on the same data, from the same random model.
    let bt = t.root.join("bt");
    run(train_cmd("bt", &t.model, &t.data, &bt)?.args([
        "--max-steps",
        "100",
        "--lr",
        "3e-3",
        "--batch-size",
        "16",
        "--max-valid",
        "0",
    ]))?;
    let sum3 = summary(&bt)?;
    let acc_bt = sum3["valid"]["acc"].as_f64().unwrap_or(0.0);
    println!(
        "bt: valid pairwise accuracy {:.1}% on {} pairs",
        100.0 * acc_bt,
        sum3["valid"]["n"]
    );
    ensure!(
        acc_bt >= 0.9,
        "BT baseline held-out accuracy {acc_bt} < 0.9"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bt.join("final/config.json"))?)?;
    ensure!(
        cfg["architectures"][0] == "LlamaForSequenceClassification",
        "bt config: {cfg}"
    );
    Ok(())
}

fn tensors_of(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut v: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

#[test]
fn a_killed_run_resumes_to_bit_identical_weights() -> Result<()> {
    let t = task()?;
    let args = [
        "--max-steps",
        "24",
        "--save-every",
        "6",
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--seed",
        "3",
        "--log-every",
        "2",
    ];
    let (whole, cut) = (t.root.join("resume-whole"), t.root.join("resume-cut"));
    whole_and_resumed(t, "finetune", &args, &whole, &cut)?;
    let (_, differ) = compare_tensors(
        &whole.join("final/model.safetensors"),
        &cut.join("final/model.safetensors"),
    )?;
    ensure!(
        differ.is_empty(),
        "tensors {differ:?} differ between the uninterrupted and the resumed run"
    );
    // The metrics of the resumed run hold each step once.
    let steps: Vec<u64> = std::fs::read_to_string(cut.join("metrics.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["split"] == "train")
        .filter_map(|v| v["step"].as_u64())
        .collect();
    let mut dedup = steps.clone();
    dedup.dedup();
    ensure!(
        steps == dedup && steps.last() == Some(&24),
        "metrics steps after resume: {steps:?}"
    );
    Ok(())
}

fn train_losses(run_dir: &Path) -> Result<Vec<f64>> {
    Ok(std::fs::read_to_string(run_dir.join("metrics.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["split"] == "train")
        .filter_map(|v| v["loss"].as_f64())
        .collect())
}

#[test]
fn wgpu_stage2_steps_match_the_cpu_where_a_device_exists() -> Result<()> {
    if let Err(e) = gram_model::device(gram_model::Backend::Wgpu) {
        println!("SKIPPED: no wgpu device on this machine ({e})");
        return Ok(());
    }
    let t = task()?;
    // Full fine-tuning, then LoRA on the top layer with recomputed activations. No warm-up: the
    // second step's loss is then that of the model the first step's backward pass updated.
    let settings: [&[&str]; 2] = [
        &[],
        &["--lora-rank", "4", "--train-layers", "1", "--recompute"],
    ];
    let mut seconds = Vec::new();
    for (k, extra) in settings.into_iter().enumerate() {
        let mut losses = Vec::new();
        for backend in ["cpu", "wgpu"] {
            let out = t.root.join(format!("backend-{backend}-{k}"));
            // Lavapipe compiles every kernel on first use and runs them slowly: two small steps,
            // and no autotuning sweeps (they only pay off on real GPUs).
            run(train_cmd("finetune", &t.model, &t.data, &out)?
                .env("CUBECL_AUTOTUNE_LEVEL", "minimal")
                .args([
                    "--max-steps",
                    "2",
                    "--lr",
                    "1e-3",
                    "--warmup",
                    "0",
                    "--batch-size",
                    "2",
                    "--log-every",
                    "1",
                    "--max-valid",
                    "2",
                    "--backend",
                    backend,
                ])
                .args(extra))?;
            losses.push(train_losses(&out)?);
        }
        println!(
            "{extra:?}\ncpu losses  {:?}\nwgpu losses {:?}",
            losses[0], losses[1]
        );
        ensure!(
            losses[0].len() == 2 && losses[1].len() == 2,
            "expected 2 logged steps each"
        );
        for (a, b) in losses[0].iter().zip(&losses[1]) {
            ensure!((a - b).abs() <= 1e-3, "{extra:?}: wgpu loss {b} vs cpu {a}");
        }
        seconds.push(losses[0][1]);
    }
    ensure!(
        seconds[0] != seconds[1],
        "full fine-tuning and LoRA gave the same second-step loss: no update reached it"
    );

    Ok(())
}

#[test]
fn bad_runs_are_refused_before_training() -> Result<()> {
    let t = task()?;
    let out = t.root.join("refused");
    // A dataset tokenised by another tokenizer (the model's, plus one added token).
    let other = t.root.join("other-tok");
    std::fs::create_dir_all(&other)?;
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(t.model.join(f), other.join(f))?;
    }
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.model.join("tokenizer.json"))?)?;
    let added = tok["added_tokens"]
        .as_array_mut()
        .context("tokenizer.json has no added_tokens")?;
    added.push(serde_json::json!({"id": 49152, "content": "<|extra|>", "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": true}));
    std::fs::write(other.join("tokenizer.json"), tok.to_string())?;
    let e = fails(&mut train_cmd("finetune", &other, &t.data, &out)?)?;
    ensure!(
        e.contains("another tokenizer") && e.contains("train-00000.parquet"),
        "{e}"
    );

    // A model whose context is shorter than the data.
    let short_cfg = t.root.join("short.json");
    tiny_config(&short_cfg, 64)?;
    let short = t.root.join("short");
    if !short.exists() {
        run(Command::new(bin("gram-train")?)
            .args(["init", "--model-config"])
            .arg(&short_cfg)
            .arg("--tokenizer")
            .arg(&t.model)
            .arg("--out")
            .arg(&short))?;
    }
    let e = fails(&mut train_cmd("finetune", &short, &t.data, &out)?)?;
    ensure!(e.contains("context (64)"), "{e}");

    // A stage-1 shard where stage 2 is expected.
    let mixed = t.root.join("mixed");
    std::fs::create_dir_all(mixed.join("stage2"))?;
    std::fs::copy(
        t.data.join("stage1/train-00000.parquet"),
        mixed.join("stage2/train-00000.parquet"),
    )?;
    let e = fails(&mut train_cmd("finetune", &t.model, &mixed, &out)?)?;
    ensure!(e.contains("column `label`") && e.contains("stage2"), "{e}");

    // No dataset folder; unknown settings key; an existing run without --resume/--overwrite.
    let e = fails(&mut train_cmd(
        "finetune",
        &t.model,
        &t.root.join("nope"),
        &out,
    )?)?;
    ensure!(e.contains("nope"), "{e}");
    let toml = t.root.join("bad.toml");
    std::fs::write(&toml, "learning_rate = 1e-3\n")?;
    let e = fails(
        Command::new(bin("gram-train")?)
            .arg("finetune")
            .arg("--config")
            .arg(&toml),
    )?;
    ensure!(e.contains("learning_rate") && e.contains("bad.toml"), "{e}");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("x"), "")?;
    let e = fails(
        Command::new(bin("gram-train")?)
            .arg("finetune")
            .arg("--model")
            .arg(&t.model)
            .arg("--data")
            .arg(&t.data)
            .arg("--out")
            .arg(&out),
    )?;
    ensure!(e.contains("--resume") && e.contains("--overwrite"), "{e}");
    Ok(())
}

const HF_CHECK: &str = r#"
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
lm_dir, bt_dir, ours = sys.argv[1:4]
d = load_file(ours)
ids, mask = d["ids"], d["mask"]
pos = (mask.cumsum(-1) - 1).clamp(min=0)
real = mask.bool()
with torch.no_grad():
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    logits = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    bt = AutoModelForSequenceClassification.from_pretrained(bt_dir, dtype=torch.float32).eval()
    rewards = bt(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, 0]
print(json.dumps({
    "lm_class": type(lm).__name__, "bt_class": type(bt).__name__,
    "lm_max_diff": (logits - d["logits"]).abs()[real].max().item(),
    "bt_max_diff": (rewards - d["rewards"]).abs().max().item(),
}))
"#;

#[test]
fn our_checkpoints_load_in_hf_transformers_with_the_same_outputs() -> Result<()> {
    use burn::prelude::*;
    let Some(py) = torch_python("") else {
        println!(
            "SKIPPED: no Python with torch + transformers (set GRAM_TORCH_PYTHON, or run benches/train_speed.sh once)"
        );
        return Ok(());
    };
    let t = task()?;
    let short = [
        "--max-steps",
        "3",
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--max-valid",
        "2",
    ];
    let lm = t.root.join("hf-lm");
    run(train_cmd("finetune", &t.model, &t.data, &lm)?.args(short))?;
    let bt = t.root.join("hf-bt");
    run(train_cmd("bt", &t.model, &t.data, &bt)?.args(short))?;

    // Our outputs on a left-padded batch (ids >= 3 so that none is the padding id).
    let seqs: [&[i64]; 3] = [
        &[1, 500, 600, 700, 800, 900],
        &[1, 42, 43],
        &[5, 6, 7, 8, 9, 10, 11, 12],
    ];
    let (b, tlen) = (seqs.len(), seqs.iter().map(|s| s.len()).max().unwrap_or(0));
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for s in seqs {
        ids.extend(std::iter::repeat_n(3i64, tlen - s.len()).chain(s.iter().copied()));
        mask.extend(
            std::iter::repeat_n(0i64, tlen - s.len()).chain(std::iter::repeat_n(1i64, s.len())),
        );
    }
    let device = Device::flex();
    let ids_t = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [b, tlen]), &device);
    let mask_t = Tensor::<2, Int>::from_data(TensorData::new(mask.clone(), [b, tlen]), &device);
    let ck = gram_core::Checkpoint::open(&lm.join("final"))?;
    let logits = gram_model::load(&ck, &device)?.forward(ids_t.clone(), mask_t.clone());
    let vocab = logits.dims()[2];
    let logits: Vec<f32> = logits
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let ckb = gram_core::Checkpoint::open(&bt.join("final"))?;
    let rm =
        gram_model::RewardModel::from_weights(&ckb.config, ckb.weights()?, None, "bt", &device)?;
    let rewards: Vec<f32> = rm
        .forward(ids_t, mask_t)
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;

    let le = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let lf = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (ib, mb, lb, rb) = (le(&ids), le(&mask), lf(&logits), lf(&rewards));
    use safetensors::tensor::TensorView;
    let views = vec![
        (
            "ids",
            TensorView::new(safetensors::Dtype::I64, vec![b, tlen], &ib)?,
        ),
        (
            "mask",
            TensorView::new(safetensors::Dtype::I64, vec![b, tlen], &mb)?,
        ),
        (
            "logits",
            TensorView::new(safetensors::Dtype::F32, vec![b, tlen, vocab], &lb)?,
        ),
        (
            "rewards",
            TensorView::new(safetensors::Dtype::F32, vec![b], &rb)?,
        ),
    ];
    let ours = t.root.join("ours.safetensors");
    safetensors::tensor::serialize_to_file(views, None, &ours)?;

    let out = run(Command::new(&py)
        .arg("-c")
        .arg(HF_CHECK)
        .arg(lm.join("final"))
        .arg(bt.join("final"))
        .arg(&ours))?;
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON from the transformers check")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    println!("transformers: {v}");
    ensure!(
        v["lm_class"] == "LlamaForCausalLM" && v["bt_class"] == "LlamaForSequenceClassification",
        "{v}"
    );
    let (dl, db) = (
        v["lm_max_diff"].as_f64().unwrap_or(f64::MAX),
        v["bt_max_diff"].as_f64().unwrap_or(f64::MAX),
    );
    ensure!(dl <= 1e-4, "LM logits differ from transformers' by {dl:e}");
    ensure!(db <= 1e-4, "BT rewards differ from transformers' by {db:e}");
    Ok(())
}

/// The first logged step's loss and gradient norm (before clipping).
fn first_step(run_dir: &Path) -> Result<(f64, f64)> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl"))?;
    let v: serde_json::Value = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["split"] == "train")
        .context("no train metrics")?;
    Ok((
        v["loss"].as_f64().context("loss")?,
        v["grad_norm"].as_f64().context("grad_norm")?,
    ))
}

/// Gradient accumulation averages: on a training split of exactly 8 rows (4 pairs, both
/// orders), one step of batch 8 and one step of 2 accumulated batches of 4 see the same rows and
/// must log the same loss and the same gradient norm (a sum instead of a mean would double it).
#[test]
fn accumulated_half_batches_give_the_full_batch_gradient() -> Result<()> {
    let t = task()?;
    let root = t.root.join("accum");
    std::fs::create_dir_all(&root)?;
    let jsonl = root.join("four.jsonl");
    synthetic_jsonl(&jsonl, 4)?;
    let data = root.join("data");
    build_data(&jsonl, &t.model, &data, &["--valid", "0", "--test", "0"])?;
    let mut seen = Vec::new();
    for (batch, accum) in [("8", "1"), ("4", "2")] {
        let out = root.join(format!("b{batch}x{accum}"));
        run(train_cmd("finetune", &t.model, &data, &out)?.args([
            "--max-steps",
            "1",
            "--batch-size",
            batch,
            "--grad-accum",
            accum,
            "--log-every",
            "1",
            "--lr",
            "1e-3",
        ]))?;
        seen.push(first_step(&out)?);
    }
    let ((l1, g1), (l2, g2)) = (seen[0], seen[1]);
    println!("batch 8: loss {l1} grad norm {g1}; 2 x batch 4: loss {l2} grad norm {g2}");
    ensure!(g1 > 0.0, "zero gradient");
    ensure!(
        (l1 - l2).abs() <= 1e-5 * l1.abs(),
        "losses differ: {l1} vs {l2}"
    );
    ensure!(
        (g1 - g2).abs() <= 1e-4 * g1,
        "gradient norms differ: {g1} vs {g2}"
    );
    Ok(())
}

/// Runs `args` to the end in `whole`, and in `cut` until its first checkpoint is complete,
/// kills it (SIGKILL) and resumes it to the end.
fn whole_and_resumed(t: &Task, stage: &str, args: &[&str], whole: &Path, cut: &Path) -> Result<()> {
    run(train_cmd(stage, &t.model, &t.data, whole)?.args(args))?;
    let mut child = train_cmd(stage, &t.model, &t.data, cut)?
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let started = std::time::Instant::now();
    while !cut.join("latest").exists() {
        if let Some(status) = child.try_wait()? {
            bail!("the run ended ({status}) before it could be killed");
        }
        ensure!(
            started.elapsed().as_secs() < 300,
            "no checkpoint within 300 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill()?;
    child.wait()?;
    ensure!(
        !cut.join("final").exists(),
        "killed too late: the run had finished"
    );
    let latest = std::fs::read_to_string(cut.join("latest"))?;
    println!("killed after {}", latest.trim());
    run(Command::new(bin("gram-train")?)
        .args([stage, "--quiet", "--resume", "--out"])
        .arg(cut))?;
    Ok(())
}

/// Tensors of two safetensors files that are (`same`) or are not bit-identical, by name.
fn compare_tensors(a: &Path, b: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let (ta, tb) = (tensors_of(a)?, tensors_of(b)?);
    ensure!(
        ta.iter().map(|x| &x.0).eq(tb.iter().map(|x| &x.0)),
        "{} and {} hold different tensors",
        a.display(),
        b.display()
    );
    let (same, differ): (Vec<_>, Vec<_>) = ta.iter().zip(&tb).partition(|(x, y)| x.1 == y.1);
    Ok((
        same.into_iter().map(|(x, _)| x.0.clone()).collect(),
        differ.into_iter().map(|(x, _)| x.0.clone()).collect(),
    ))
}

#[test]
fn lora_runs_train_only_the_adapter_save_it_as_peft_does_and_resume_bit_identically() -> Result<()>
{
    let t = task()?;
    let args = [
        "--max-steps",
        "9",
        "--save-every",
        "3",
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--seed",
        "3",
        "--log-every",
        "3",
        "--lora-rank",
        "4",
        "--lora-targets",
        "q,v",
        "--lora-dropout",
        "0.1",
        "--max-valid",
        "4",
    ];
    let (whole, cut) = (t.root.join("lora-whole"), t.root.join("lora-cut"));
    whole_and_resumed(t, "finetune", &args, &whole, &cut)?;
    let fin = whole.join("final");
    let (_, differ) = compare_tensors(
        &fin.join("adapter_model.safetensors"),
        &cut.join("final/adapter_model.safetensors"),
    )?;
    ensure!(
        differ.is_empty(),
        "the resumed adapter differs in {differ:?}"
    );

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fin.join("adapter_config.json"))?)?;
    ensure!(
        cfg["peft_type"] == "LORA"
            && cfg["r"] == 4
            && cfg["target_modules"] == serde_json::json!(["q_proj", "v_proj"])
            && cfg["base_model_name_or_path"]
                == std::fs::canonicalize(&t.model)?.display().to_string(),
        "{cfg}"
    );
    // Only the adapted weights moved: in merged/, everything else is the base's, bit for bit.
    let (same, differ) = compare_tensors(
        &t.model.join("model.safetensors"),
        &fin.join("merged/model.safetensors"),
    )?;
    let adapted = |n: &String| n.contains("q_proj") || n.contains("v_proj");
    ensure!(
        differ.iter().all(adapted) && differ.len() == 4 && !same.iter().any(adapted),
        "changed by training: {differ:?}"
    );

    // Continuing the adapter (what stage 2 after a LoRA stage 1 does), and a reward model with
    // an adapter, whose head is saved whole beside it.
    let next = t.root.join("lora-next");
    let adapter = fin.to_string_lossy().to_string();
    run(train_cmd("finetune", &t.model, &t.data, &next)?.args([
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--max-valid",
        "2",
        "--adapter",
        &adapter,
    ]))?;
    let (_, differ) = compare_tensors(
        &fin.join("adapter_model.safetensors"),
        &next.join("final/adapter_model.safetensors"),
    )?;
    ensure!(
        differ.len() == 8,
        "the continued adapter changed in {differ:?}"
    );
    let bt = t.root.join("lora-bt");
    run(train_cmd("bt", &t.model, &t.data, &bt)?.args([
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--max-valid",
        "2",
        "--lora-rank",
        "2",
        "--lr",
        "1e-3",
    ]))?;
    let a = gram_core::Adapter::read(&bt.join("final"))?;
    ensure!(
        a.task == gram_core::adapter::Task::SeqCls
            && a.saved.contains_key("score.weight")
            && a.pairs.len() == 14,
        "bt adapter: {:?} with {:?}",
        a.task,
        a.saved.keys().collect::<Vec<_>>()
    );
    let merged_cfg = std::fs::read_to_string(bt.join("final/merged/config.json"))?;
    ensure!(
        merged_cfg.contains("ForSequenceClassification"),
        "{merged_cfg}"
    );
    Ok(())
}

#[test]
fn top_layer_runs_leave_the_layers_below_bit_identical() -> Result<()> {
    let t = task()?;
    let out = t.root.join("top-1");
    run(train_cmd("finetune", &t.model, &t.data, &out)?.args([
        "--max-steps",
        "3",
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--max-valid",
        "2",
        "--train-layers",
        "1",
    ]))?;
    let (same, differ) = compare_tensors(
        &t.model.join("model.safetensors"),
        &out.join("final/model.safetensors"),
    )?;
    let trained = |n: &String| n.starts_with("model.layers.1.") || n == "model.norm.weight";
    ensure!(
        differ.iter().all(trained)
            && !same.iter().any(trained)
            && same.contains(&"model.embed_tokens.weight".to_string()),
        "changed: {differ:?}"
    );
    Ok(())
}

#[test]
fn bad_adapter_settings_are_refused_before_training() -> Result<()> {
    let t = task()?;
    let out = t.root.join("lora-refused");
    let e = fails(train_cmd("finetune", &t.model, &t.data, &out)?.args([
        "--lora-rank",
        "4",
        "--lora-targets",
        "q,lm_head",
    ]))?;
    ensure!(e.contains("unknown LoRA target `lm_head`"), "{e}");
    let e = fails(train_cmd("finetune", &t.model, &t.data, &out)?.args(["--train-layers", "3"]))?;
    ensure!(
        e.contains("--train-layers 3") && e.contains("2 decoder layers"),
        "{e}"
    );
    // An adapter of a wider base, and one with a key for a layer the model lacks.
    let shapes = gram_model::load::expected_shapes(&gram_core::Checkpoint::open(&t.model)?.config);
    let write = |name: &str, layer: usize, width: usize| -> Result<std::path::PathBuf> {
        let dir = t.root.join(name);
        std::fs::create_dir_all(&dir)?;
        let q = &shapes["model.layers.0.self_attn.q_proj.weight"];
        let zeros = |shape: Vec<usize>| gram_core::F32Tensor {
            data: vec![0.0; shape.iter().product()],
            shape,
        };
        let mut pairs = std::collections::BTreeMap::new();
        pairs.insert(
            format!("model.layers.{layer}.self_attn.q_proj"),
            gram_core::adapter::LoraPair {
                a: zeros(vec![2, width]),
                b: zeros(vec![q[0], 2]),
            },
        );
        gram_core::Adapter {
            lora: gram_core::LoraConfig {
                rank: 2,
                alpha: 4.0,
                dropout: 0.0,
                targets: vec![gram_core::Target::Q],
                rslora: false,
                layers: None,
            },
            task: gram_core::adapter::Task::CausalLm,
            base_model: None,
            pairs,
            saved: std::collections::BTreeMap::new(),
        }
        .write(&dir, gram_core::weights::StoreDtype::F32)?;
        Ok(dir)
    };
    let wide = write("adapter-wide", 0, 2 * shapes["model.norm.weight"][0])?;
    let e = fails(
        train_cmd("finetune", &t.model, &t.data, &out)?
            .arg("--adapter")
            .arg(&wide),
    )?;
    ensure!(
        e.contains("lora_A") && e.contains("expected [2, 64]"),
        "{e}"
    );
    let deep = write("adapter-deep", 7, shapes["model.norm.weight"][0])?;
    let e = fails(
        train_cmd("finetune", &t.model, &t.data, &out)?
            .arg("--adapter")
            .arg(&deep),
    )?;
    ensure!(
        e.contains("model.layers.7.self_attn.q_proj") && e.contains("matches no layer"),
        "{e}"
    );
    ensure!(!out.join("metrics.jsonl").exists(), "a refused run started");
    Ok(())
}
