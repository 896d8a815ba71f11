//! LoRA adapters against Python peft on every hf-tiny fixture, both ways: peft loads our
//! adapter and gives our logits; an adapter peft made loads into gram-model with peft's logits;
//! and the merged model (an adapter folder opened as a checkpoint) equals base + adapter.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use burn::prelude::*;
use gram_core::adapter::{LoraPair, Task};
use gram_core::weights::StoreDtype;
use gram_core::{Adapter, Checkpoint, F32Tensor, LoraConfig, Target};

use crate::common::{fixture_tensor, fixtures, scratch, torch_python};

const TINY: [&str; 4] = ["llama", "llama-tied-rope-llama3", "qwen2", "qwen3"];

const PEFT_CHECK: &str = r#"
import json, sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model
work, names = sys.argv[1], sys.argv[2:]
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
out = {}
for name in names:
    d = load_file(f"{work}/{name}/ours.safetensors")
    base_dir = open(f"{work}/{name}/base.txt").read().strip()
    ids, mask = d["ids"], d["mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    torch.manual_seed(0)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        ours = PeftModel.from_pretrained(base, f"{work}/{name}/ours").eval()
        got = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out[name] = (got - d["logits"]).abs()[real].max().item()
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        theirs = get_peft_model(base, cfg).eval()
        logits = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        theirs.save_pretrained(f"{work}/{name}/peft")
        save_file({"logits": logits.contiguous()}, f"{work}/{name}/peft-logits.safetensors")
print(json.dumps(out))
"#;

/// Deterministic values in `±scale`, different for each `salt`.
fn noise(n: usize, salt: usize, scale: f32) -> Vec<f32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (salt as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A rank-4 adapter on all seven projections of every layer with non-zero factors.
fn random_adapter(ck: &Checkpoint, base: &Path) -> Adapter {
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        rslora: false,
        layers: None,
    };
    let shapes = gram_model::load::expected_shapes(&ck.config);
    let mut pairs = std::collections::BTreeMap::new();
    for (i, (layer, target)) in lora
        .modules(ck.config.num_hidden_layers)
        .into_iter()
        .enumerate()
    {
        let module = target.module_name(layer);
        let w = &shapes[&format!("{module}.weight")];
        let t = |shape: Vec<usize>, salt| F32Tensor {
            data: noise(shape.iter().product(), salt, 0.1),
            shape,
        };
        pairs.insert(
            module,
            LoraPair {
                a: t(vec![4, w[1]], 2 * i),
                b: t(vec![w[0], 4], 2 * i + 1),
            },
        );
    }
    Adapter {
        lora,
        task: Task::CausalLm,
        base_model: Some(base.display().to_string()),
        pairs,
        saved: std::collections::BTreeMap::new(),
    }
}

/// A fixture's left-padded batch: `(ids, mask, [batch, seq])`.
fn batch(dir: &Path) -> Result<(Vec<i64>, Vec<i64>, [usize; 2])> {
    let bytes = std::fs::read(dir.join("expected.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let (shape, ids) = fixture_tensor(&st, "input_ids")?;
    let (_, mask) = fixture_tensor(&st, "attention_mask")?;
    let int = |v: Vec<f64>| v.into_iter().map(|x| x as i64).collect::<Vec<_>>();
    Ok((int(ids), int(mask), [shape[0], shape[1]]))
}

/// Logits of a model on a batch, flattened.
fn logits(
    model: &gram_model::CausalLm,
    ids: &[i64],
    mask: &[i64],
    dims: [usize; 2],
) -> Result<Vec<f32>> {
    let device = Device::flex();
    let t = |v: &[i64]| Tensor::<2, Int>::from_data(TensorData::new(v.to_vec(), dims), &device);
    model
        .forward(t(ids), t(mask))
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Max |a - b| over positions whose mask is 1.
fn max_diff(a: &[f32], b: &[f32], mask: &[i64]) -> f64 {
    let vocab = a.len() / mask.len();
    let mut m = 0f64;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if mask[i / vocab] == 1 {
            m = m.max(f64::from((x - y).abs()));
        }
    }
    m
}

/// The base model of a fixture with an adapter attached.
fn with_adapter(ck: &Checkpoint, a: &Adapter) -> Result<gram_model::CausalLm> {
    let device = Device::flex();
    let mut model = gram_model::load(ck, &device)?;
    gram_model::lora::attach(
        &mut model.model,
        &a.lora,
        gram_model::lora::Init::From(a),
        None,
        "test",
        &device,
    )?;
    Ok(model)
}

#[test]
fn peft_and_gram_agree_on_adapters_both_ways_and_merging_keeps_the_logits() -> Result<()> {
    let work = scratch("lora-peft")?;
    let mut inputs = Vec::new();
    for name in TINY {
        let dir = fixtures().join("hf-tiny").join(name);
        let ck = Checkpoint::open(&dir)?;
        let (ids, mask, dims) = batch(&dir)?;
        let adapter = random_adapter(&ck, &dir);
        let ours = logits(&with_adapter(&ck, &adapter)?, &ids, &mask, dims)?;
        let folder = work.join(name).join("ours");
        std::fs::create_dir_all(&folder)?;
        adapter.write(&folder, StoreDtype::F32)?;
        // The adapter folder as a checkpoint: the base found through base_model_name_or_path,
        // the adapter merged into its weights.
        let merged_ck = Checkpoint::open(&folder)?;
        let merged = gram_model::load(&merged_ck, &Device::flex())?;
        let d = max_diff(&logits(&merged, &ids, &mask, dims)?, &ours, &mask);
        println!("{name}: merged vs base + adapter {d:e}");
        ensure!(
            d <= 1e-5,
            "{name}: the merged model differs from base + adapter by {d:e}"
        );
        let base_logits = logits(&gram_model::load(&ck, &Device::flex())?, &ids, &mask, dims)?;
        ensure!(
            max_diff(&base_logits, &ours, &mask) > 1e-3,
            "{name}: the adapter changes nothing; the comparison would test nothing"
        );
        inputs.push((name, ck, ids, mask, dims, ours));
    }
    let Some(py) = torch_python("peft") else {
        println!(
            "SKIPPED (peft half): no Python with torch + transformers + peft (run benches/train_speed.sh once, or set GRAM_TORCH_PYTHON)"
        );
        return Ok(());
    };
    for (name, _, ids, mask, dims, ours) in &inputs {
        let le = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let lf: Vec<u8> = ours.iter().flat_map(|x| x.to_le_bytes()).collect();
        let (ib, mb) = (le(ids), le(mask));
        let vocab = ours.len() / ids.len();
        use safetensors::tensor::TensorView;
        let views = vec![
            (
                "ids",
                TensorView::new(safetensors::Dtype::I64, dims.to_vec(), &ib)?,
            ),
            (
                "mask",
                TensorView::new(safetensors::Dtype::I64, dims.to_vec(), &mb)?,
            ),
            (
                "logits",
                TensorView::new(safetensors::Dtype::F32, vec![dims[0], dims[1], vocab], &lf)?,
            ),
        ];
        safetensors::tensor::serialize_to_file(
            views,
            None,
            &work.join(name).join("ours.safetensors"),
        )?;
        std::fs::write(
            work.join(name).join("base.txt"),
            fixtures().join("hf-tiny").join(name).display().to_string(),
        )?;
    }
    let out = Command::new(&py)
        .arg("-c")
        .arg(PEFT_CHECK)
        .arg(&work)
        .args(TINY)
        .output()?;
    ensure!(
        out.status.success(),
        "peft check failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON from the peft check")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    println!("peft on our adapters, max |logit diff|: {v}");
    for (name, ck, ids, mask, dims, _) in &inputs {
        let d = v[*name].as_f64().unwrap_or(f64::MAX);
        ensure!(
            d <= 1e-4,
            "{name}: peft's logits with our adapter differ from ours by {d:e}"
        );
        // peft's own adapter in gram-model.
        let theirs = Adapter::read(&work.join(name).join("peft"))?;
        let got = logits(&with_adapter(ck, &theirs)?, ids, mask, *dims)?;
        let bytes = std::fs::read(work.join(name).join("peft-logits.safetensors"))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let (_, want) = fixture_tensor(&st, "logits")?;
        let want: Vec<f32> = want.into_iter().map(|x| x as f32).collect();
        let d = max_diff(&got, &want, mask);
        println!("{name}: ours on peft's adapter {d:e}");
        ensure!(
            d <= 1e-4,
            "{name}: our logits with peft's adapter differ from peft's by {d:e}"
        );
    }
    Ok(())
}

#[test]
fn gram_export_compiles_an_adapter_folder_over_its_base() -> Result<()> {
    let root = scratch("lora-export")?;
    let base = fixtures().join("hf-tiny").join("qwen3");
    let ck = Checkpoint::open(&base)?;
    let adapter = random_adapter(&ck, &base);
    let dir = root.join("adapter");
    std::fs::create_dir_all(&dir)?;
    adapter.write(&dir, StoreDtype::F32)?;
    // The base found through base_model_name_or_path; onnxruntime's logits against ours with
    // the adapter unmerged.
    let out = root.join("onnx");
    crate::export::export(&dir, &out, "lm", &["--verify"])?;
    let (ids, mask, dims) = batch(&base)?;
    let (_, got) =
        crate::export::ort_run(&out, "logits", dims[0], dims[1], ids.clone(), mask.clone())?;
    let want = logits(&with_adapter(&ck, &adapter)?, &ids, &mask, dims)?;
    let d = max_diff(&got, &want, &mask);
    println!("onnx of an adapter folder vs base + adapter in burn: {d:e}");
    ensure!(d <= 1e-4, "exported adapter logits differ by {d:e}");
    // A base that is not here: a one-line error naming the way out; --base gives it.
    let moved = root.join("adapter-moved");
    std::fs::create_dir_all(&moved)?;
    Adapter {
        base_model: Some("org/not-downloaded".into()),
        ..adapter
    }
    .write(&moved, StoreDtype::F32)?;
    let o = Command::new(crate::common::bin("gram-export")?)
        .args(["onnx", "--head", "lm", "--overwrite", "--model"])
        .arg(&moved)
        .arg("--out")
        .arg(root.join("onnx-moved"))
        .output()?;
    let e = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.code() == Some(1) && e.contains("org/not-downloaded") && e.contains("--base"),
        "{e}"
    );
    crate::export::export(
        &moved,
        &root.join("onnx-moved"),
        "lm",
        &["--base", &base.to_string_lossy()],
    )?;
    Ok(())
}

#[test]
fn gram_export_adapter_packages_bf16_that_loads_over_its_base() -> Result<()> {
    let root = scratch("lora-package")?;
    let base = fixtures().join("hf-tiny").join("llama");
    let ck = Checkpoint::open(&base)?;
    let adapter = random_adapter(&ck, &base);
    let dir = root.join("adapter");
    std::fs::create_dir_all(&dir)?;
    adapter.write(&dir, StoreDtype::F32)?;
    std::fs::write(dir.join("optimizer.bpk"), b"training state")?;
    let pkg = root.join("pkg");
    let run = |args: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new(crate::common::bin("gram-export")?)
            .arg("adapter")
            .args(args)
            .output()?)
    };
    let (d, p) = (dir.to_string_lossy(), pkg.to_string_lossy());
    let o = run(&["--model", &d, "--out", &p, "--base-name", "org/tiny-llama"])?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Only the two PEFT files, the base renamed, every tensor rounded to bf16 and half the bytes.
    let mut files: Vec<String> = std::fs::read_dir(&pkg)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    files.sort();
    ensure!(
        files == ["adapter_config.json", "adapter_model.safetensors"],
        "{files:?}"
    );
    let got = Adapter::read(&pkg)?;
    ensure!(
        got.base_model.as_deref() == Some("org/tiny-llama"),
        "{:?}",
        got.base_model
    );
    ensure!(got.lora == adapter.lora, "config changed: {:?}", got.lora);
    let bytes = std::fs::read(pkg.join("adapter_model.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    ensure!(
        st.tensors()
            .iter()
            .all(|(_, v)| v.dtype() == safetensors::Dtype::BF16)
    );
    let (want, have) = (adapter.tensors(), got.tensors());
    ensure!(want.keys().eq(have.keys()), "keys differ");
    for (k, w) in &want {
        let rounded: Vec<f32> = w
            .data
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        ensure!(
            have[k].data == rounded && have[k].shape == w.shape,
            "{k}: not w rounded to bf16"
        );
    }
    let f32_bytes = std::fs::metadata(dir.join("adapter_model.safetensors"))?.len();
    ensure!(
        bytes.len() as u64 * 2 < f32_bytes + 4096,
        "{} vs {f32_bytes} bytes",
        bytes.len()
    );
    // It loads over its base (--base, as the name is not a local path) and compiles.
    crate::export::export(
        &pkg,
        &root.join("onnx"),
        "lm",
        &["--base", &base.to_string_lossy(), "--verify"],
    )?;
    // A folder that is not an adapter, and an existing output: exit 1, one line naming it.
    let o = run(&[
        "--model",
        &base.to_string_lossy(),
        "--out",
        &root.join("x").to_string_lossy(),
    ])?;
    let e = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.code() == Some(1) && e.contains("not an adapter folder"),
        "{e}"
    );
    let o = run(&["--model", &d, "--out", &p])?;
    let e = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.code() == Some(1) && e.contains("--overwrite"),
        "{e}"
    );
    Ok(())
}
