//! The three objectives on padded batches: stage-1 next-token loss on the pair target, stage-2
//! label-smoothed loss on the A/B logits, and the Bradley-Terry loss of a scalar head; and their
//! validation (stage 2 with METHOD.md's both-order pair score).

use std::collections::BTreeMap;

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use gram_core::LabelIds;
use gram_core::template::{pair_score, prob_a};
use gram_model::loss::{bt_loss, gram_loss_of_margin, label_margin};
use gram_model::{CausalLm, RewardModel};
use serde::Serialize;

use crate::data::Example;
use crate::settings::Stage;

/// What the objectives need besides the model and the rows.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Objective.
    pub stage: Stage,
    /// Padding id.
    pub pad: u32,
    /// Batches are padded to a multiple of this many tokens.
    pub pad_multiple: usize,
    /// Label tokens.
    pub labels: LabelIds,
    /// Stage-2 label smoothing.
    pub eps: f64,
}

/// Scalars of one training micro-batch, read after its loss.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchStats {
    /// Rows (pairs for bt).
    pub rows: usize,
    /// Real (non-padding) tokens processed.
    pub tokens: usize,
    /// Loss-bearing units: target tokens (stage 1) or rows.
    pub units: usize,
}

/// Validation result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Eval {
    /// Mean loss (per target token for stage 1, per row otherwise).
    pub loss: f64,
    /// Pairwise accuracy: both-order score for stage 2, reward order for bt. None for stage 1.
    pub acc: Option<f64>,
    /// Stage 2: accuracy of single rows (one order each).
    pub row_acc: Option<f64>,
    /// Pairs (or rows for stage 1) evaluated.
    pub n: usize,
    /// Accuracy per source.
    pub by_source: BTreeMap<String, f64>,
}

/// Left-pads token sequences into `ids` and `mask` tensors (mask 1 on real tokens), to the
/// longest rounded up to a multiple of `multiple`.
///
/// # Shapes
/// output: two `[rows, width]` tensors
pub fn pad_left(
    seqs: &[&[u32]],
    pad: u32,
    multiple: usize,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let longest = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
    let t = longest.next_multiple_of(multiple.max(1));
    let b = seqs.len();
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    for s in seqs {
        let p = t - s.len();
        ids.extend(std::iter::repeat_n(i64::from(pad), p).chain(s.iter().map(|&x| i64::from(x))));
        mask.extend(std::iter::repeat_n(0i64, p).chain(std::iter::repeat_n(1i64, s.len())));
    }
    (
        Tensor::from_data(TensorData::new(ids, [b, t]), device),
        Tensor::from_data(TensorData::new(mask, [b, t]), device),
    )
}

fn ints(v: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// A model one of the objectives trains.
pub trait Objective: Module + burn::store::ModuleSnapshot + Clone + Sized {
    /// Mean loss of a micro-batch (differentiable when the model is on an autodiff device) and
    /// a tensor of correctly ranked rows (`[1]`, 0 for stage 1).
    fn batch_loss(
        &self,
        rows: &[&Example],
        ctx: &Ctx,
        device: &Device,
    ) -> (Tensor<1>, Tensor<1>, BatchStats);

    /// Validation over `rows` in batches of `batch_size` (the model should be `valid()`).
    fn evaluate(&self, rows: &[Example], ctx: &Ctx, batch_size: usize, device: &Device) -> Eval;
}

/// Stage-1 loss pieces: per-target-token log-probabilities.
fn stage1_logprobs(
    model: &CausalLm,
    rows: &[&Example],
    ctx: &Ctx,
    device: &Device,
) -> (Tensor<1>, BatchStats) {
    let seqs: Vec<&[u32]> = rows.iter().map(|r| r.ids.as_slice()).collect();
    let (ids, mask) = pad_left(&seqs, ctx.pad, ctx.pad_multiple, device);
    let h = model.forward_hidden(ids, mask);
    let [b, t, d] = h.dims();
    // Row i's token j (padded position p + j) is predicted at position p + j - 1; only the
    // target tokens (j >= prompt_len) carry loss, and only their positions go through the head.
    let (mut pos, mut tgt) = (Vec::new(), Vec::new());
    let mut tokens = 0;
    for (i, r) in rows.iter().enumerate() {
        let p = t - r.ids.len();
        tokens += r.ids.len();
        for j in r.prompt_len.max(1)..r.ids.len() {
            pos.push((i * t + p + j - 1) as i64);
            tgt.push(i64::from(r.ids[j]));
        }
    }
    let n = pos.len();
    let hs = h.reshape([b * t, d]).select(0, ints(pos, device));
    let lp = log_softmax(model.head(hs), 1);
    let picked = lp.gather(1, ints(tgt, device).reshape([n, 1])).reshape([n]);
    (
        picked,
        BatchStats {
            rows: rows.len(),
            tokens,
            units: n,
        },
    )
}

/// Stage-2 label logits `[rows, 2]` (l_A, l_B) and targets.
fn stage2_logits(
    model: &CausalLm,
    rows: &[&Example],
    ctx: &Ctx,
    device: &Device,
) -> (Tensor<2>, Tensor<1, Int>, usize) {
    let seqs: Vec<&[u32]> = rows.iter().map(|r| r.ids.as_slice()).collect();
    let tokens = seqs.iter().map(|s| s.len()).sum();
    let (ids, mask) = pad_left(&seqs, ctx.pad, ctx.pad_multiple, device);
    let logits = model.last_logits(ids, mask, &[ctx.labels.a, ctx.labels.b]);
    let target = ints(
        rows.iter().map(|r| i64::from(r.label_is_b)).collect(),
        device,
    );
    (logits, target, tokens)
}

fn values(t: Tensor<2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default()
}

impl Objective for CausalLm {
    fn batch_loss(
        &self,
        rows: &[&Example],
        ctx: &Ctx,
        device: &Device,
    ) -> (Tensor<1>, Tensor<1>, BatchStats) {
        match ctx.stage {
            Stage::Pretrain => {
                let (picked, stats) = stage1_logprobs(self, rows, ctx, device);
                (picked.mean().neg(), Tensor::zeros([1], device), stats)
            }
            _ => {
                let (logits, target, tokens) = stage2_logits(self, rows, ctx, device);
                let z = label_margin(logits, target);
                let correct = z.clone().greater_elem(0.0).float().sum();
                let loss = gram_loss_of_margin(z, ctx.eps).mean();
                (
                    loss,
                    correct,
                    BatchStats {
                        rows: rows.len(),
                        tokens,
                        units: rows.len(),
                    },
                )
            }
        }
    }

    fn evaluate(&self, rows: &[Example], ctx: &Ctx, batch_size: usize, device: &Device) -> Eval {
        if ctx.stage == Stage::Pretrain {
            let (mut sum, mut n) = (0.0f64, 0usize);
            for chunk in rows.chunks(batch_size) {
                let refs: Vec<&Example> = chunk.iter().collect();
                let (picked, stats) = stage1_logprobs(self, &refs, ctx, device);
                sum -= f64::from(picked.sum().into_scalar::<f32>());
                n += stats.units;
            }
            return Eval {
                loss: sum / n.max(1) as f64,
                acc: None,
                row_acc: None,
                n: rows.len(),
                by_source: BTreeMap::new(),
            };
        }
        // Stage 2: (l_A, l_B) of every row, then both orders of each pair combined.
        let mut logits = Vec::with_capacity(rows.len());
        let mut loss_sum = 0.0f64;
        for chunk in rows.chunks(batch_size) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let (l, target, _) = stage2_logits(self, &refs, ctx, device);
            let z = label_margin(l.clone(), target);
            loss_sum += f64::from(gram_loss_of_margin(z, ctx.eps).sum().into_scalar::<f32>());
            let v = values(l);
            logits.extend(v.chunks_exact(2).map(|c| (c[0], c[1])));
        }
        stage2_eval(rows, &logits, loss_sum)
    }
}

/// Both-order pairwise accuracy (METHOD.md): a pair is right when the score of its chosen
/// response, averaged over the two orders, is above 1/2. Pairs seen in one order only use it.
pub fn stage2_eval(rows: &[Example], logits: &[(f32, f32)], loss_sum: f64) -> Eval {
    // pair -> (source, unswapped row, swapped row)
    let mut pairs: BTreeMap<&str, (&str, Option<usize>, Option<usize>)> = BTreeMap::new();
    let mut row_correct = 0usize;
    for (i, r) in rows.iter().enumerate() {
        let e = pairs
            .entry(r.pair_id.as_str())
            .or_insert((r.source.as_str(), None, None));
        if r.swapped {
            e.2 = Some(i)
        } else {
            e.1 = Some(i)
        }
        let (la, lb) = logits[i];
        if (la > lb) != r.label_is_b {
            row_correct += 1;
        }
    }
    let mut by_source: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut correct = 0usize;
    for (src, un, sw) in pairs.values() {
        // score of the raw pair's first response, and whether it is the chosen one
        let (score_first, first_chosen) = match (un, sw) {
            (Some(u), Some(s)) => (pair_score(logits[*u], logits[*s]), !rows[*u].label_is_b),
            (Some(u), None) => (prob_a(logits[*u].0, logits[*u].1), !rows[*u].label_is_b),
            (None, Some(s)) => (
                1.0 - prob_a(logits[*s].0, logits[*s].1),
                rows[*s].label_is_b,
            ),
            (None, None) => continue,
        };
        let ok = (score_first > 0.5) == first_chosen;
        correct += usize::from(ok);
        let e = by_source.entry((*src).to_string()).or_insert((0, 0));
        e.0 += usize::from(ok);
        e.1 += 1;
    }
    let n = pairs.len();
    Eval {
        loss: loss_sum / rows.len().max(1) as f64,
        acc: Some(correct as f64 / n.max(1) as f64),
        row_acc: Some(row_correct as f64 / rows.len().max(1) as f64),
        n,
        by_source: by_source
            .into_iter()
            .map(|(k, (c, t))| (k, c as f64 / t.max(1) as f64))
            .collect(),
    }
}

/// Rewards of the chosen and rejected sequences of each pair.
fn bt_rewards(
    model: &RewardModel,
    rows: &[&Example],
    ctx: &Ctx,
    device: &Device,
) -> (Tensor<1>, Tensor<1>, usize) {
    let b = rows.len();
    let seqs: Vec<&[u32]> = rows
        .iter()
        .map(|r| r.ids.as_slice())
        .chain(rows.iter().map(|r| r.other.as_slice()))
        .collect();
    let tokens = seqs.iter().map(|s| s.len()).sum();
    let (ids, mask) = pad_left(&seqs, ctx.pad, ctx.pad_multiple, device);
    let r = model.forward(ids, mask);
    (r.clone().slice(0..b), r.slice(b..2 * b), tokens)
}

impl Objective for RewardModel {
    fn batch_loss(
        &self,
        rows: &[&Example],
        ctx: &Ctx,
        device: &Device,
    ) -> (Tensor<1>, Tensor<1>, BatchStats) {
        let (c, r, tokens) = bt_rewards(self, rows, ctx, device);
        let correct = (c.clone() - r.clone()).greater_elem(0.0).float().sum();
        (
            bt_loss(c, r),
            correct,
            BatchStats {
                rows: rows.len(),
                tokens,
                units: rows.len(),
            },
        )
    }

    fn evaluate(&self, rows: &[Example], ctx: &Ctx, batch_size: usize, device: &Device) -> Eval {
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        let mut by_source: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for chunk in rows.chunks(batch_size) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let (c, r, _) = bt_rewards(self, &refs, ctx, device);
            let m = c - r;
            loss_sum += f64::from(
                gram_model::loss::neg_log_sigmoid(m.clone())
                    .sum()
                    .into_scalar::<f32>(),
            );
            let margins = m
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default();
            for (row, z) in chunk.iter().zip(margins) {
                let ok = z > 0.0;
                correct += usize::from(ok);
                let e = by_source.entry(row.source.clone()).or_insert((0, 0));
                e.0 += usize::from(ok);
                e.1 += 1;
            }
        }
        Eval {
            loss: loss_sum / rows.len().max(1) as f64,
            acc: Some(correct as f64 / rows.len().max(1) as f64),
            row_acc: None,
            n: rows.len(),
            by_source: by_source
                .into_iter()
                .map(|(k, (c, t))| (k, c as f64 / t.max(1) as f64))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pair: &str, swapped: bool, label_is_b: bool) -> Example {
        Example {
            ids: vec![1],
            prompt_len: 0,
            label_is_b,
            other: vec![],
            pair_id: pair.into(),
            swapped,
            source: "s".into(),
        }
    }

    #[test]
    fn padding_to_a_multiple_widens_batches_and_leaves_the_losses() {
        let device = gram_model::device(gram_model::Backend::Cpu).expect("the CPU device");
        let (ids, mask) = pad_left(&[&[5, 6, 7][..], &[8][..]], 0, 4, &device);
        assert_eq!(ids.dims(), [2, 4]);
        let m: Vec<i64> = mask
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .expect("ints");
        assert_eq!(m, vec![0, 1, 1, 1, 0, 0, 0, 1]);
        let cfg = gram_core::ModelConfig::from_hf_json(
            &serde_json::json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
                "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 50, "max_position_embeddings": 256,
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true
            }),
            std::path::Path::new("tiny"),
        )
        .expect("a valid config");
        device.seed(3);
        let model = CausalLm::init(&cfg, &device);
        let rows: Vec<Example> = [7usize, 19, 33]
            .iter()
            .enumerate()
            .map(|(i, &n)| Example {
                ids: (0..n).map(|j| 3 + ((i * 7 + j * 5) % 40) as u32).collect(),
                prompt_len: n / 2,
                ..row("p", i % 2 == 1, i == 1)
            })
            .collect();
        let refs: Vec<&Example> = rows.iter().collect();
        for stage in [Stage::Finetune, Stage::Pretrain] {
            let loss = |pad_multiple| {
                let ctx = Ctx {
                    stage,
                    pad: 0,
                    pad_multiple,
                    labels: LabelIds { a: 1, b: 2 },
                    eps: 0.1,
                };
                let (l, _, _) = model.batch_loss(&refs, &ctx, &device);
                l.into_scalar::<f32>()
            };
            let (plain, padded) = (loss(1), loss(64));
            assert!(
                (plain - padded).abs() <= 1e-5 * plain.abs().max(1.0),
                "{stage:?}: {plain} unpadded, {padded} padded to 64"
            );
        }
    }

    #[test]
    fn both_order_score_decides_the_pair() {
        // Pair p: raw first response chosen. Order 1 (A = first): model says A strongly.
        // Order 2 (A = second, label B): model says A weakly (position bias): averaged, still right.
        let rows = vec![row("p", false, false), row("p", true, true)];
        let e = stage2_eval(&rows, &[(3.0, 0.0), (0.5, 0.0)], 0.0);
        assert_eq!(e.acc, Some(1.0));
        assert_eq!(e.row_acc, Some(0.5));
        // Strong bias the other way flips the pair.
        let e = stage2_eval(&rows, &[(0.2, 0.0), (4.0, 0.0)], 0.0);
        assert_eq!(e.acc, Some(0.0));
        // A lone swapped row: A = raw second, label B means the first is chosen.
        let e = stage2_eval(&[row("q", true, true)], &[(0.0, 2.0)], 0.0);
        assert_eq!(e.acc, Some(1.0));
    }
}
