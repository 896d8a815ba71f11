//! The model core against the reference: HF transformers' logits on the hf-tiny fixtures and
//! on SmolLM2 (GGUF), the tokenizer against transformers' ids, malformed checkpoints, and the
//! wgpu backend where a Vulkan device exists.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use burn::prelude::*;
use gram_core::{Checkpoint, LabelIds, PromptStyle, Templates, gguf::GgufFile};

use crate::common::{fixture_tensor, fixtures, scratch, smollm2_gguf};

const TINY: [&str; 4] = ["llama", "llama-tied-rope-llama3", "qwen2", "qwen3"];

/// The f32 values of tensor data.
fn floats(data: TensorData) -> Result<Vec<f32>> {
    data.try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Max |ours - HF| over real (mask = 1) positions of one hf-tiny fixture.
fn tiny_max_diff(name: &str, device: &Device) -> Result<f64> {
    let dir = fixtures().join("hf-tiny").join(name);
    let ckpt = Checkpoint::open(&dir)?;
    let model = gram_model::load(&ckpt, device)?;
    let bytes = std::fs::read(dir.join("expected.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let (shape, ids) = fixture_tensor(&st, "input_ids")?;
    let (_, mask) = fixture_tensor(&st, "attention_mask")?;
    let (lshape, want) = fixture_tensor(&st, "logits")?;
    let (b, t, v) = (shape[0], shape[1], lshape[2]);
    let to_int = |x: &[f64]| {
        Tensor::<2, Int>::from_data(
            TensorData::new(x.iter().map(|&v| v as i64).collect::<Vec<_>>(), [b, t]),
            device,
        )
    };
    let got = floats(model.forward(to_int(&ids), to_int(&mask)).into_data())?;
    ensure!(
        got.len() == want.len(),
        "{name}: {} logits, fixture has {}",
        got.len(),
        want.len()
    );
    let mut max = 0f64;
    for bi in 0..b {
        for ti in 0..t {
            if mask[bi * t + ti] == 0.0 {
                continue;
            }
            for vi in 0..v {
                let k = (bi * t + ti) * v + vi;
                max = max.max((f64::from(got[k]) - want[k]).abs());
            }
        }
    }
    Ok(max)
}

#[test]
fn hf_tiny_logits_match_transformers_on_cpu() -> Result<()> {
    let device = Device::flex();
    for name in TINY {
        let d = tiny_max_diff(name, &device)?;
        println!("{name}: max |logit diff| = {d:.3e}");
        ensure!(
            d <= 1e-4,
            "{name}: logits differ from transformers by {d:.3e} (> 1e-4)"
        );
    }
    Ok(())
}

#[test]
fn hf_tiny_logits_match_on_wgpu_where_a_device_exists() -> Result<()> {
    let device = match gram_model::device(gram_model::Backend::Wgpu) {
        Ok(d) => d,
        Err(e) => {
            println!("SKIPPED: no wgpu device on this machine ({e})");
            return Ok(());
        }
    };
    for name in TINY {
        let d = tiny_max_diff(name, &device)?;
        println!("wgpu {name}: max |logit diff| = {d:.3e}");
        ensure!(
            d <= 1e-3,
            "wgpu {name}: logits differ from transformers by {d:.3e} (> 1e-3)"
        );
    }
    Ok(())
}

fn cases() -> Result<serde_json::Value> {
    let p = fixtures().join("smollm2/cases.json");
    Ok(serde_json::from_slice(
        &std::fs::read(&p).with_context(|| p.display().to_string())?,
    )?)
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn smollm2_tokenizers_give_transformers_ids() -> Result<()> {
    let cases = cases()?;
    let gguf = Checkpoint::open(&smollm2_gguf()?)?;
    let from_gguf = gguf.tokenizer()?;
    let from_dir = gram_core::GramTokenizer::from_dir(&fixtures().join("smollm2"))?;
    for tok in [&from_gguf, &from_dir] {
        for (i, c) in cases["cases"]
            .as_array()
            .context("cases")?
            .iter()
            .enumerate()
        {
            let text = c["text"].as_str().context("text")?;
            let got = tok.encode(text, false)?;
            ensure!(
                got == ids_of(&c["ids"]),
                "{}: case {i} ids differ:\n got {got:?}\nwant {:?}",
                tok.source.display(),
                c["ids"]
            );
        }
        // The judge prompt, rendered by our templates through the model's chat template.
        let j = &cases["judge"];
        let t = Templates::new(tok, PromptStyle::Chat)?;
        let rendered = t.stage2(
            j["question"].as_str().context("q")?,
            j["a"].as_str().context("a")?,
            j["b"].as_str().context("b")?,
        )?;
        ensure!(
            rendered == j["rendered"].as_str().context("rendered")?,
            "judge prompt differs:\n{rendered}"
        );
        let labels = LabelIds::resolve(tok)?;
        ensure!(
            vec![labels.a] == ids_of(&cases["label_token_ids"]["A"])
                && vec![labels.b] == ids_of(&cases["label_token_ids"]["B"])
        );
    }
    Ok(())
}

#[test]
fn smollm2_gguf_logits_match_transformers() -> Result<()> {
    let cases = cases()?;
    let ckpt = Checkpoint::open(&smollm2_gguf()?)?;
    ensure!(
        ckpt.config.num_hidden_layers == 30
            && ckpt.config.hidden_size == 576
            && ckpt.config.tie_word_embeddings
    );
    let device = Device::flex();
    let model = gram_model::load(&ckpt, &device)?;
    let bytes = std::fs::read(fixtures().join("smollm2/expected.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    for (i, c) in cases["cases"]
        .as_array()
        .context("cases")?
        .iter()
        .enumerate()
    {
        let ids = ids_of(&c["ids"]);
        let n = ids.len();
        let x = Tensor::<2, Int>::from_data(
            TensorData::new(
                ids.iter().map(|&v| i64::from(v)).collect::<Vec<_>>(),
                [1, n],
            ),
            &device,
        );
        let m = Tensor::<2, Int>::ones([1, n], &device);
        let v = ckpt.config.vocab_size;
        let got: Vec<f32> = model
            .forward(x, m)
            .slice([0..1, n - 1..n, 0..v])
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let (_, want) = fixture_tensor(&st, &format!("last_logits_{i}"))?;
        let max = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (f64::from(g) - w).abs())
            .fold(0.0, f64::max);
        let argmax = got
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(k, _)| k)
            .unwrap_or(0);
        println!("smollm2 case {i}: {n} tokens, max |diff| {max:.3e}, argmax {argmax}");
        ensure!(
            max <= 1e-3,
            "case {i}: last logits differ by {max:.3e} (> 1e-3)"
        );
        ensure!(
            argmax as u64 == c["argmax"].as_u64().unwrap_or(u64::MAX),
            "case {i}: argmax {argmax} != {}",
            c["argmax"]
        );
    }
    Ok(())
}

#[test]
fn judge_head_equals_full_logits_rows() -> Result<()> {
    // last_logits (only the two label rows of the head) must equal the full head's columns.
    let device = Device::flex();
    let ckpt = Checkpoint::open(&fixtures().join("hf-tiny/qwen2"))?;
    let model = gram_model::load(&ckpt, &device)?;
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new(vec![0i64, 0, 5, 6, 7, 8, 9, 10], [2, 4]),
        &device,
    );
    let mask = Tensor::<2, Int>::from_data(
        TensorData::new(vec![0i64, 0, 1, 1, 1, 1, 1, 1], [2, 4]),
        &device,
    );
    let head: Vec<f32> = model
        .last_logits(ids.clone(), mask.clone(), &[3, 7])
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let full: Vec<f32> = model
        .forward(ids, mask)
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let v = ckpt.config.vocab_size;
    for b in 0..2 {
        for (j, tok) in [3usize, 7].iter().enumerate() {
            let f = full[(b * 4 + 3) * v + tok];
            ensure!(
                (head[b * 2 + j] - f).abs() < 1e-5,
                "row {b} token {tok}: {} vs {f}",
                head[b * 2 + j]
            );
        }
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

#[test]
fn malformed_checkpoints_are_clear_errors() -> Result<()> {
    let device = Device::flex();
    let err = |r: Result<gram_model::CausalLm, anyhow::Error>| {
        r.err().map(|e| format!("{e:#}")).unwrap_or_default()
    };

    // Truncated GGUF: the tensor data ends early.
    let gguf = smollm2_gguf()?;
    let dir = scratch("malformed")?;
    let bytes = std::fs::read(&gguf)?;
    let cut = dir.join("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2])?;
    let e = Checkpoint::open(&cut)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(
        e.contains("truncated") && e.contains("truncated.gguf"),
        "truncated GGUF: {e}"
    );
    // Truncated inside the metadata.
    std::fs::write(&cut, &bytes[..1000])?;
    let e = GgufFile::open(&cut)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(e.contains("truncated"), "truncated header: {e}");
    // Bad header.
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"PK\x03\x04 this is a zip")?;
    let e = Checkpoint::open(&bad)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(e.contains("not a GGUF"), "bad header: {e}");

    // Wrong shapes: a config that disagrees with the tensors.
    let tiny = fixtures().join("hf-tiny/llama");
    let wrong = dir.join("wrong-shape");
    copy_dir(&tiny, &wrong)?;
    let cfg = std::fs::read_to_string(wrong.join("config.json"))?
        .replace("\"intermediate_size\": 172", "\"intermediate_size\": 170");
    std::fs::write(wrong.join("config.json"), cfg)?;
    let e = err(Checkpoint::open(&wrong)
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok(gram_model::load(&c, &device)?)));
    ensure!(
        e.contains("shape") && e.contains("wrong-shape") && e.contains("mlp.") && e.contains("170"),
        "wrong shape: {e}"
    );

    // Unknown dtype: an int64 tensor where a weight should be.
    let idt = dir.join("int-dtype");
    copy_dir(&tiny, &idt)?;
    let data = vec![0u8; 8 * 4];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![4], &data)?;
    let out = safetensors::tensor::serialize(vec![("model.norm.weight".to_string(), view)], None)?;
    std::fs::write(idt.join("model.safetensors"), out)?;
    let e = err(Checkpoint::open(&idt)
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok(gram_model::load(&c, &device)?)));
    ensure!(
        e.contains("I64") && e.contains("model.norm.weight"),
        "unknown dtype: {e}"
    );

    // Truncated safetensors.
    let trunc = dir.join("trunc-st");
    copy_dir(&tiny, &trunc)?;
    let st = std::fs::read(trunc.join("model.safetensors"))?;
    std::fs::write(trunc.join("model.safetensors"), &st[..st.len() - 100])?;
    let e = err(Checkpoint::open(&trunc)
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok(gram_model::load(&c, &device)?)));
    ensure!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "truncated safetensors: {e}"
    );
    Ok(())
}

#[test]
fn sharded_safetensors_load_like_one_file() -> Result<()> {
    // Split the llama fixture into two shards with an index, as save_pretrained does for big models.
    let tiny = fixtures().join("hf-tiny/llama");
    let dir = scratch("sharded")?;
    std::fs::copy(tiny.join("config.json"), dir.join("config.json"))?;
    let w = gram_core::Weights::from_hf_dir(&tiny)?;
    let (mut a, mut b) = (
        std::collections::BTreeMap::new(),
        std::collections::BTreeMap::new(),
    );
    let mut map = serde_json::Map::new();
    for (i, (k, v)) in w.tensors.into_iter().enumerate() {
        let (f, m) = if i % 2 == 0 {
            ("model-00001-of-00002.safetensors", &mut a)
        } else {
            ("model-00002-of-00002.safetensors", &mut b)
        };
        map.insert(k.clone(), f.into());
        m.insert(k, v);
    }
    gram_core::weights::write_safetensors(&dir.join("model-00001-of-00002.safetensors"), &a, None)?;
    gram_core::weights::write_safetensors(&dir.join("model-00002-of-00002.safetensors"), &b, None)?;
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": map}))?,
    )?;
    let device = Device::flex();
    let one = gram_model::load(&Checkpoint::open(&tiny)?, &device)?;
    let two = gram_model::load(&Checkpoint::open(&dir)?, &device)?;
    let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![3i64, 4, 5, 6], [1, 4]), &device);
    let m = Tensor::<2, Int>::ones([1, 4], &device);
    let x: Vec<f32> = one
        .forward(ids.clone(), m.clone())
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let y: Vec<f32> = two
        .forward(ids, m)
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    ensure!(x == y, "sharded load differs");
    Ok(())
}

#[test]
fn inspect_cli_describes_a_gguf_and_predicts() -> Result<()> {
    let gguf = smollm2_gguf()?;
    let out = std::process::Command::new(crate::common::bin("gram-model")?)
        .args(["inspect"])
        .arg(&gguf)
        .args(["--text", "The capital of France is", "--top", "3"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "gram-model inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "Llama",
        "layers          30",
        "parameters",
        "Q4_1",
        "chat template   yes",
        "A = 49, B = 50",
        "7042",
    ] {
        ensure!(
            stdout.contains(want),
            "inspect output lacks {want:?}:\n{stdout}"
        );
    }
    let bad = std::process::Command::new(crate::common::bin("gram-model")?)
        .args(["inspect", "/nonexistent/model"])
        .output()?;
    ensure!(
        bad.status.code() == Some(1),
        "missing checkpoint should exit 1"
    );
    ensure!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/model"));
    // A reader that goes away (`| head`) ends it quietly, without a panic: its stdout is closed
    // before the checkpoint is even read, so every line it prints meets a broken pipe.
    let mut child = std::process::Command::new(crate::common::bin("gram-model")?)
        .args(["inspect"])
        .arg(&gguf)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    drop(child.stdout.take());
    let closed = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&closed.stderr);
    ensure!(
        !stderr.contains("panicked") && closed.status.code() != Some(101),
        "inspect into a closed pipe: {:?}, stderr: {stderr}",
        closed.status
    );
    Ok(())
}

#[test]
fn f16_and_bf16_checkpoints_widen_exactly() -> Result<()> {
    // The llama fixture rounded to f16 / bf16 and saved in that dtype must load to exactly the
    // model whose f32 weights are those rounded values.
    let tiny = fixtures().join("hf-tiny/llama");
    let w = gram_core::Weights::from_hf_dir(&tiny)?;
    let device = Device::flex();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![3i64, 4, 5, 6, 7], [1, 5]), &device);
    let m = Tensor::<2, Int>::ones([1, 5], &device);
    for (name, dtype) in [
        ("f16", safetensors::Dtype::F16),
        ("bf16", safetensors::Dtype::BF16),
    ] {
        let round = |x: f32| {
            if name == "f16" {
                half::f16::from_f32(x).to_f32()
            } else {
                half::bf16::from_f32(x).to_f32()
            }
        };
        let dir_half = scratch(&format!("{name}-half"))?;
        let dir_f32 = scratch(&format!("{name}-f32"))?;
        std::fs::copy(tiny.join("config.json"), dir_half.join("config.json"))?;
        std::fs::copy(tiny.join("config.json"), dir_f32.join("config.json"))?;
        let mut bytes = Vec::new();
        let mut rounded = std::collections::BTreeMap::new();
        for (k, t) in &w.tensors {
            let b: Vec<u8> = t
                .data
                .iter()
                .flat_map(|&x| {
                    if name == "f16" {
                        half::f16::from_f32(x).to_le_bytes()
                    } else {
                        half::bf16::from_f32(x).to_le_bytes()
                    }
                })
                .collect();
            bytes.push((k.clone(), b, t.shape.clone()));
            rounded.insert(
                k.clone(),
                gram_core::F32Tensor {
                    shape: t.shape.clone(),
                    data: t.data.iter().map(|&x| round(x)).collect(),
                },
            );
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(k, b, s)| {
                Ok((
                    k.clone(),
                    safetensors::tensor::TensorView::new(dtype, s.clone(), b)?,
                ))
            })
            .collect::<Result<_>>()?;
        std::fs::write(
            dir_half.join("model.safetensors"),
            safetensors::tensor::serialize(views, None)?,
        )?;
        gram_core::weights::write_safetensors(&dir_f32.join("model.safetensors"), &rounded, None)?;
        let ck = Checkpoint::open(&dir_half)?;
        ensure!(
            ck.weights()?.stored_dtype == name,
            "stored dtype {}",
            ck.weights()?.stored_dtype
        );
        let a: Vec<f32> = gram_model::load(&ck, &device)?
            .forward(ids.clone(), m.clone())
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let b: Vec<f32> = gram_model::load(&Checkpoint::open(&dir_f32)?, &device)?
            .forward(ids.clone(), m.clone())
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        ensure!(
            a == b,
            "{name}: logits differ from the f32 model of the rounded weights"
        );
    }
    Ok(())
}

/// An hf-tiny model with its fixture batch: ids and mask (left-padded), `[b, t]` each.
struct TinyBatch {
    model: gram_model::CausalLm,
    ids: Vec<f64>,
    mask: Vec<f64>,
    b: usize,
    t: usize,
}

fn tiny_with_batch(name: &str, device: &Device) -> Result<TinyBatch> {
    let dir = fixtures().join("hf-tiny").join(name);
    let model = gram_model::load(&Checkpoint::open(&dir)?, device)?;
    let bytes = std::fs::read(dir.join("expected.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let (shape, ids) = fixture_tensor(&st, "input_ids")?;
    let (_, mask) = fixture_tensor(&st, "attention_mask")?;
    Ok(TinyBatch {
        model,
        ids,
        mask,
        b: shape[0],
        t: shape[1],
    })
}

/// Largest difference relative to `1 + |reference|`.
fn rel_diff(a: &[f32], reference: &[f32]) -> f64 {
    a.iter()
        .zip(reference)
        .map(|(x, y)| f64::from((x - y).abs()) / (1.0 + f64::from(y.abs())))
        .fold(0.0, f64::max)
}

/// The largest [`rel_diff`] over matched lists of tensors (per-parameter gradients).
fn max_rel_diff(a: &[Vec<f32>], reference: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(reference)
        .map(|(x, y)| rel_diff(x, y))
        .fold(0.0, f64::max)
}

/// The ops' fused CPU kernels (attention with RoPE inside, RMSNorm, SwiGLU, linear; gram_model::ops)
/// give the same hidden states and the same parameter gradients as burn's composed primitives
/// (`ops::composed`), on
/// every hf-tiny architecture (grouped heads, Qwen3's per-head norms, LLaMA 3 RoPE) with the
/// fixtures' left padding. Padding positions are left out: the two paths fill them differently
/// and nothing reads them.
#[test]
fn fused_cpu_kernels_equal_composed_ops_forward_and_backward() -> Result<()> {
    use gram_model::ops;
    let device = Device::flex().autodiff();
    for name in TINY {
        let TinyBatch {
            model,
            ids,
            mask,
            b,
            t,
        } = tiny_with_batch(name, &device)?;
        ensure!(mask.contains(&0.0), "{name}: fixture has no padding");
        let int = |x: &[f64]| {
            Tensor::<2, Int>::from_data(
                TensorData::new(x.iter().map(|&v| v as i64).collect::<Vec<_>>(), [b, t]),
                &device,
            )
        };
        let run = |composed: bool| -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
            let forward = || model.forward_hidden(int(&ids), int(&mask));
            let h = if composed {
                ops::composed(forward)
            } else {
                forward()
            };
            let [_, _, d] = h.dims();
            // A fixed, position-dependent weighting so every gradient path is exercised.
            let w: Vec<f32> = (0..b * t * d).map(|i| (i as f32 * 0.37).sin()).collect();
            let w = Tensor::<3>::from_data(TensorData::new(w, [b, t, d]), &device);
            let real = int(&mask).float().reshape([b, t, 1]);
            let loss = (h.clone() * w * real.clone()).sum();
            let grads = loss.backward();
            let l0 = &model.model.layers[0];
            let params = [
                model.model.embed_tokens.weight.val(),
                l0.self_attn.q_proj.base.weight.val(),
                l0.self_attn.k_proj.base.weight.val(),
                l0.self_attn.v_proj.base.weight.val(),
                l0.self_attn.o_proj.base.weight.val(),
                l0.mlp.gate_proj.base.weight.val(),
                l0.mlp.up_proj.base.weight.val(),
            ];
            let norms = [l0.input_layernorm.gamma.val(), model.model.norm.gamma.val()];
            let mut gs = Vec::new();
            for p in params {
                gs.push(floats(
                    p.grad(&grads)
                        .context("parameter without gradient")?
                        .into_data(),
                )?);
            }
            for p in norms {
                gs.push(floats(
                    p.grad(&grads).context("norm without gradient")?.into_data(),
                )?);
            }
            let hidden = floats((h * real).into_data())?;
            Ok((hidden, gs))
        };
        let (h_fused, g_fused) = run(false)?;
        let (h_ref, g_ref) = run(true)?;
        let dh = rel_diff(&h_fused, &h_ref);
        let dg = max_rel_diff(&g_fused, &g_ref);
        println!("{name}: fused vs composed: hidden {dh:.2e}, gradients {dg:.2e} (relative)");
        ensure!(
            dh > 0.0 || dg > 0.0,
            "{name}: the composed run equals the fused one bit for bit: ops::composed did not switch"
        );
        ensure!(dh < 1e-5, "{name}: hidden states differ by {dh:.2e}");
        ensure!(dg < 1e-4, "{name}: gradients differ by {dg:.2e}");
        ensure!(
            g_fused.iter().flatten().any(|&x| x != 0.0),
            "{name}: all gradients are zero"
        );
    }
    Ok(())
}

/// `Decoder::forward_last` (what the judge and the reward head read: the last layer's output
/// projection, MLP and the final norm run on the last row only) gives the full forward's last
/// row and the same gradients for every parameter, through the fused and the composed ops, on
/// every hf-tiny architecture.
#[test]
fn last_position_forward_equals_the_full_forward_and_its_gradients() -> Result<()> {
    use gram_model::ops;
    let device = Device::flex().autodiff();
    for name in TINY {
        let TinyBatch {
            model,
            ids,
            mask,
            b,
            t,
        } = tiny_with_batch(name, &device)?;
        let int = |x: &[f64]| {
            Tensor::<2, Int>::from_data(
                TensorData::new(x.iter().map(|&v| v as i64).collect::<Vec<_>>(), [b, t]),
                &device,
            )
        };
        // Matrices and vectors (norm weights) of every layer.
        let params = || {
            let mut m = vec![model.model.embed_tokens.weight.val()];
            let mut v = vec![model.model.norm.gamma.val()];
            for l in &model.model.layers {
                let a = &l.self_attn;
                for lin in [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &l.mlp.gate_proj,
                    &l.mlp.up_proj,
                    &l.mlp.down_proj,
                ] {
                    m.push(lin.base.weight.val());
                }
                v.push(l.input_layernorm.gamma.val());
                v.push(l.post_attention_layernorm.gamma.val());
            }
            (m, v)
        };
        for kernels in ["fused", "composed"] {
            let run = |last_only: bool| -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
                let (i, m) = (int(&ids), int(&mask));
                let forward = || {
                    if last_only {
                        model.last_hidden(i, m)
                    } else {
                        let h = model.forward_hidden(i, m);
                        let [_, _, d] = h.dims();
                        h.slice([0..b, t - 1..t, 0..d]).reshape([b, d])
                    }
                };
                let h = if kernels == "composed" {
                    ops::composed(forward)
                } else {
                    forward()
                };
                let [_, d] = h.dims();
                let w: Vec<f32> = (0..b * d).map(|i| (i as f32 * 0.37).sin()).collect();
                let loss =
                    (h.clone() * Tensor::<2>::from_data(TensorData::new(w, [b, d]), &device)).sum();
                let grads = loss.backward();
                let mut gs = Vec::new();
                let (m, v) = params();
                for p in m {
                    let g = p.grad(&grads).context("matrix without gradient")?;
                    gs.push(floats(g.into_data())?);
                }
                for p in v {
                    let g = p.grad(&grads).context("norm weight without gradient")?;
                    gs.push(floats(g.into_data())?);
                }
                Ok((floats(h.into_data())?, gs))
            };
            let (h_last, g_last) = run(true)?;
            let (h_full, g_full) = run(false)?;
            let diff = |a: &[f32], b: &[f32]| {
                ensure!(
                    a.len() == b.len(),
                    "{name}: {} values vs {}",
                    a.len(),
                    b.len()
                );
                Ok(rel_diff(a, b))
            };
            let dh = diff(&h_last, &h_full)?;
            let mut dg = 0.0f64;
            for (a, b) in g_last.iter().zip(&g_full) {
                dg = dg.max(diff(a, b)?);
            }
            println!("{name} {kernels}: last-only vs full: hidden {dh:.2e}, gradients {dg:.2e}");
            ensure!(
                dh < 1e-5,
                "{name} {kernels}: last hidden state differs by {dh:.2e}"
            );
            ensure!(dg < 1e-4, "{name} {kernels}: gradients differ by {dg:.2e}");
            ensure!(
                g_last.iter().all(|g| g.iter().any(|&x| x != 0.0)),
                "{name} {kernels}: a parameter got an all-zero gradient"
            );
        }
    }
    Ok(())
}

/// The judge's label logits (`CausalLm::last_logits`; a tied head reads its two rows from the
/// same embedding lookup as the input) equal the last hidden state times the two columns of the
/// full head matrix, with the same gradients for the embedding, the head and a layer weight.
#[test]
fn label_logits_and_their_gradients_equal_the_full_head_columns() -> Result<()> {
    let device = Device::flex().autodiff();
    let labels = [3u32, 7];
    let mut tied_seen = false;
    for name in TINY {
        let dir = fixtures().join("hf-tiny").join(name);
        let model = gram_model::load(&Checkpoint::open(&dir)?, &device)?;
        tied_seen |= model.lm_head.is_none();
        let int = |x: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(x, [2, 4]), &device);
        let ids = || int(vec![0, 0, 5, 6, 7, 8, 9, 10]);
        let mask = || int(vec![0, 0, 1, 1, 1, 1, 1, 1]);
        let run = |reference: bool| -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
            let logits = if reference {
                let last = model.last_hidden(ids(), mask());
                let head = match &model.lm_head {
                    Some(l) => l.weight.val(),
                    None => model.model.embed_tokens.weight.val().transpose(),
                };
                let idx = Tensor::<1, Int>::from_data(TensorData::new(vec![3i64, 7], [2]), &device);
                last.matmul(head.select(1, idx))
            } else {
                model.last_logits(ids(), mask(), &labels)
            };
            let w = Tensor::<2>::from_data(
                TensorData::new(vec![0.3f32, -1.1, 0.7, 0.2], [2, 2]),
                &device,
            );
            let grads = (logits.clone() * w).sum().backward();
            let mut params = vec![
                model.model.embed_tokens.weight.val(),
                model.model.layers[0].self_attn.q_proj.base.weight.val(),
            ];
            if let Some(l) = &model.lm_head {
                params.push(l.weight.val());
            }
            let mut gs = Vec::new();
            for p in params {
                gs.push(floats(p.grad(&grads).context("no gradient")?.into_data())?);
            }
            Ok((floats(logits.into_data())?, gs))
        };
        let (l_new, g_new) = run(false)?;
        let (l_ref, g_ref) = run(true)?;
        let dl = rel_diff(&l_new, &l_ref);
        let dg = max_rel_diff(&g_new, &g_ref);
        println!(
            "{name} (tied: {}): logits {dl:.2e}, gradients {dg:.2e}",
            model.lm_head.is_none()
        );
        ensure!(dl < 1e-6, "{name}: label logits differ by {dl:.2e}");
        ensure!(dg < 1e-5, "{name}: gradients differ by {dg:.2e}");
        ensure!(
            g_new[0].iter().any(|&x| x != 0.0),
            "{name}: the embedding got no gradient"
        );
    }
    ensure!(tied_seen, "no hf-tiny model with a tied head");
    Ok(())
}

/// Runs `bin args` and returns its exit code and stderr.
fn exit_of(bin: &str, args: &[&std::ffi::OsStr]) -> Result<(Option<i32>, String)> {
    let o = std::process::Command::new(crate::common::bin(bin)?)
        .args(args)
        .output()?;
    Ok((
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    ))
}

/// Every tool that opens a checkpoint refuses `model` with exit 1 and a message holding `want`
/// (never 101, a panic).
fn refused_by_every_tool(model: &Path, want: &str, out: &Path) -> Result<()> {
    let m = model.as_os_str();
    let o = out.as_os_str();
    let pipeline = crate::common::repo_root().join("pipelines/llmbar.toml");
    let runs: [(&str, Vec<&std::ffi::OsStr>); 3] = [
        ("gram-model", vec!["inspect".as_ref(), m]),
        (
            "gram-export",
            vec!["onnx".as_ref(), "--model".as_ref(), m, "--out".as_ref(), o],
        ),
        (
            "gram-data",
            vec![
                "build".as_ref(),
                pipeline.as_os_str(),
                "--model".as_ref(),
                m,
                "--out".as_ref(),
                o,
            ],
        ),
    ];
    for (bin, args) in runs {
        let (code, e) = exit_of(bin, &args)?;
        ensure!(
            code == Some(1) && e.contains(want) && e.lines().count() == 1,
            "{bin} on {}: exit {code:?}, {e}",
            model.display()
        );
    }
    Ok(())
}

#[test]
fn hostile_checkpoint_headers_are_format_errors_not_panics() -> Result<()> {
    let dir = scratch("hostile")?;
    let out = dir.join("out");
    // config.json sizes whose products overflow.
    let tiny = fixtures().join("hf-tiny/llama");
    for (field, value) in [("vocab_size", 1u64 << 62), ("hidden_size", 1u64 << 40)] {
        let d = dir.join(field);
        copy_dir(&tiny, &d)?;
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("config.json"))?)?;
        cfg[field] = value.into();
        std::fs::write(d.join("config.json"), serde_json::to_vec(&cfg)?)?;
        refused_by_every_tool(&d, field, &out)?;
    }
    // GGUF tensor infos: a flipped dimension byte, data past the end, two tensors sharing bytes.
    let gguf = smollm2_gguf()?;
    let bytes = std::fs::read(&gguf)?;
    let parsed = GgufFile::open(&gguf)?;
    let info_at = |name: &str| -> Result<usize> {
        let mut key = (name.len() as u64).to_le_bytes().to_vec();
        key.extend(name.as_bytes());
        let at = bytes
            .windows(key.len())
            .position(|w| w == key.as_slice())
            .context("tensor info")?;
        Ok(at + key.len()) // n_dims (u32), dims (u64 each), type (u32), offset (u64)
    };
    let (t0, t1) = (&parsed.tensors[0], &parsed.tensors[1]);
    let dims0 = info_at(&t0.name)? + 4;
    let offset_of = |t: &gram_core::gguf::TensorInfo| -> Result<usize> {
        Ok(info_at(&t.name)? + 4 + 8 * t.dims.len() + 4)
    };
    let file_len = (bytes.len() as u64).to_le_bytes();
    let t0_offset = t0.offset.to_le_bytes();
    let cases: [(&str, usize, &[u8], &str); 3] = [
        ("flipped-dim", dims0 + 7, &[0x80], "dimensions"),
        ("past-end", offset_of(t0)?, &file_len, "past the end"),
        ("overlap", offset_of(t1)?, &t0_offset, "overlap"),
    ];
    for (name, at, patch, want) in cases {
        let mut b = bytes.clone();
        b[at..at + patch.len()].copy_from_slice(patch);
        let f = dir.join(format!("{name}.gguf"));
        std::fs::write(&f, &b)?;
        refused_by_every_tool(&f, want, &out)?;
    }
    drop(bytes);
    Ok(())
}
