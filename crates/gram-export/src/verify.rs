//! `--verify`: the exported graph under onnxruntime against gram-model's burn model on the CPU,
//! on a left-padded batch of judge prompts of different lengths.

use std::path::Path;

use burn::prelude::*;
use gram_core::export::{ExportManifest, HeadKind};
use gram_core::{Checkpoint, GramTokenizer, Templates};
use gram_score::runtime::{Batch, PairBatch, open_session};

use crate::{Error, Result};

/// What the check measured.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// Sequences in the batch.
    pub rows: usize,
    /// Their lengths.
    pub lengths: Vec<usize>,
    /// Largest |onnxruntime - burn| over the compared logits.
    pub max_abs_diff: f32,
    /// Largest |burn| logit, for scale.
    pub max_abs_logit: f32,
}

/// Sample judge prompts of different lengths (the batch then has padding), each pair in both
/// orders (a pair graph reads them as pairs).
/// Ids past the model's vocabulary (a larger tokenizer given with --tokenizer, as for the tiny
/// test models) are folded into it: the check needs valid ids, not meaningful text.
fn samples(tok: &GramTokenizer, manifest: &ExportManifest, vocab: usize) -> Result<Vec<Vec<u32>>> {
    let t = Templates::new(tok, manifest.prompt_style)?;
    let cases = [
        ("What is 2 + 2?", "4", "5"),
        (
            "Name a colour.",
            "Blue is a colour of the sky on a clear day.",
            "Seven.",
        ),
        (
            "Write one sentence about rivers.",
            "Rivers carry water from the hills to the sea, shaping valleys as they go.",
            "I don't know.",
        ),
    ];
    let mut out = Vec::new();
    for (x, a, b) in cases {
        for (first, second) in [(a, b), (b, a)] {
            let mut ids = t.encode(&t.stage2(x, first, second)?, true)?;
            if ids.len() > manifest.max_tokens && manifest.prefix_tokens.is_none() {
                ids.drain(..ids.len() - manifest.max_tokens);
            }
            out.push(ids.into_iter().map(|i| i % vocab as u32).collect());
        }
    }
    Ok(out)
}

/// Runs both and compares.
pub fn verify(
    ckpt: &Checkpoint,
    tok: &GramTokenizer,
    dir: &Path,
    manifest: &ExportManifest,
    tolerance: f32,
) -> Result<VerifyReport> {
    let seqs = samples(tok, manifest, ckpt.config.vocab_size)?;
    let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    // burn reads whole sequences; a graph holding the judge prefix reads what follows it.
    let full = Batch::left_padded(&rows, manifest.pad_id);
    let (b, t) = (full.rows, full.width);
    let (ids, mask) = (full.ids, full.mask);
    let rest = match &manifest.prefix_tokens {
        None => rows.clone(),
        Some(p) => rows
            .iter()
            .map(|r| {
                r.strip_prefix(p.as_slice()).ok_or_else(|| {
                    Error::Verify("a sample does not start with the judge prefix".into())
                })
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let mut session = open_session(&dir.join(&manifest.model_file), gram_core::cli::threads())?;
    let (shape, ort) = if manifest.reads_pairs() {
        let pairs: Vec<(&[u32], &[u32])> = rest.chunks(2).map(|p| (p[0], p[1])).collect();
        PairBatch::new(&pairs, manifest.pad_id).run(&mut session, &manifest.output)?
    } else {
        Batch::left_padded(&rest, manifest.pad_id).run(&mut session, &manifest.output)?
    };

    let device = gram_model::device(gram_model::Backend::Cpu)?;
    let ids_t = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
    let mask_t = Tensor::<2, Int>::from_data(TensorData::new(mask.clone(), [b, t]), &device);
    let (burn, positions): (Vec<f32>, Vec<bool>) = match manifest.head {
        HeadKind::Reward => {
            let origin = ckpt.path.display().to_string();
            let model = gram_model::RewardModel::from_weights(
                &ckpt.config,
                ckpt.weights()?,
                None,
                &origin,
                &device,
            )?;
            (to_vec(model.forward(ids_t, mask_t))?, vec![true; b])
        }
        HeadKind::Judge => {
            let model = gram_model::load(ckpt, &device)?;
            let l = model.last_logits(ids_t, mask_t, &[manifest.label_ids.a, manifest.label_ids.b]);
            (to_vec(l)?, vec![true; b * 2])
        }
        HeadKind::Lm => {
            let model = gram_model::load(ckpt, &device)?;
            let l = model.forward(ids_t, mask_t);
            let v = l.dims()[2];
            // Padding positions are not compared (nothing reads them).
            (
                to_vec(l)?,
                mask.iter()
                    .flat_map(|&m| std::iter::repeat_n(m == 1, v))
                    .collect(),
            )
        }
    };
    if burn.len() != ort.len() {
        return Err(Error::Verify(format!(
            "onnxruntime gave shape {shape:?} ({} values), burn {} values",
            ort.len(),
            burn.len()
        )));
    }
    let mut max_abs_diff = 0f32;
    let mut max_abs_logit = 0f32;
    for ((x, y), keep) in burn.iter().zip(&ort).zip(&positions) {
        if *keep {
            if !y.is_finite() {
                return Err(Error::Verify(format!("onnxruntime produced {y}")));
            }
            max_abs_diff = max_abs_diff.max((x - y).abs());
            max_abs_logit = max_abs_logit.max(x.abs());
        }
    }
    let report = VerifyReport {
        rows: b,
        lengths: seqs.iter().map(Vec::len).collect(),
        max_abs_diff,
        max_abs_logit,
    };
    if max_abs_diff > tolerance {
        return Err(Error::Verify(format!(
            "onnxruntime's logits differ from burn's by up to {max_abs_diff:.3e} (> {tolerance:.0e}; largest logit {max_abs_logit:.2})"
        )));
    }
    Ok(report)
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data()
        .try_to_vec::<f32>()
        .map_err(|e| Error::Verify(format!("reading burn's output: {e:?}")))
}
