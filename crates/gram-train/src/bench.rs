//! Training-step throughput of a configuration on random tokens: the same model, objective,
//! AdamW step and clipping as a run, without data loading, validation or checkpoints. What
//! `benches/train_speed.sh` compares with PyTorch eager.

use std::path::Path;
use std::time::Instant;

use burn::optim::GradientsParams;
use gram_core::{LabelIds, ModelConfig};
use gram_model::CausalLm;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::data::Example;
use crate::error::Result;
use crate::objective::{Ctx, Objective};
use crate::settings::Stage;

/// One benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Parameters of the model.
    pub params: usize,
    /// Rows per step.
    pub batch_size: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Timed steps.
    pub steps: usize,
    /// Median seconds per step.
    pub step_s_median: f64,
    /// Tokens per second at the median step.
    pub tokens_per_s: f64,
    /// Median seconds of the forward pass (loss included).
    pub forward_s_median: f64,
    /// Median seconds of the backward pass.
    pub backward_s_median: f64,
    /// Median seconds of the optimiser step.
    pub optimizer_s_median: f64,
}

/// Times `steps` optimiser steps (after `warmup` untimed ones) of `stage` on random tokens.
pub fn bench(
    config: &Path,
    stage: Stage,
    batch_size: usize,
    seq_len: usize,
    steps: usize,
    warmup: usize,
    backend: gram_model::Backend,
) -> Result<BenchResult> {
    let cfg = ModelConfig::from_hf_file(config)?;
    cfg.validate(config)?;
    let device = gram_model::device(backend)?.autodiff();
    device.seed(0);
    let mut model = CausalLm::init(&cfg, &device);
    let mut optim = crate::optim::adamw((0.9, 0.999), 1e-8, 0.0);
    let labels = LabelIds { a: 1, b: 2 };
    let ctx = Ctx {
        stage,
        pad: 0,
        labels,
        eps: 0.1,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let vocab = cfg.vocab_size as u32;
    let mut times = Vec::with_capacity(steps);
    let (mut fwd, mut bwd, mut opt) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..warmup + steps {
        let rows: Vec<Example> = (0..batch_size)
            .map(|_| Example {
                ids: (0..seq_len).map(|_| rng.random_range(3..vocab)).collect(),
                prompt_len: seq_len / 4,
                label_is_b: rng.random_bool(0.5),
                other: Vec::new(),
                pair_id: String::new(),
                swapped: false,
                source: String::new(),
            })
            .collect();
        let refs: Vec<&Example> = rows.iter().collect();
        let t0 = Instant::now();
        let (loss, _, _) = model.batch_loss(&refs, &ctx, &device);
        let _ = loss.clone().into_scalar::<f32>();
        let t1 = Instant::now();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let t2 = Instant::now();
        model = optim.step(1e-4, model, grads);
        // Wait for the step to finish: read one parameter value back.
        let _ = model
            .model
            .norm
            .gamma
            .val()
            .slice(0..1)
            .into_scalar::<f32>();
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            opt.push(t2.elapsed().as_secs_f64());
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let med = median(times);
    Ok(BenchResult {
        params: cfg.num_parameters(),
        batch_size,
        seq_len,
        steps,
        step_s_median: med,
        tokens_per_s: (batch_size * seq_len) as f64 / med,
        forward_s_median: median(fwd),
        backward_s_median: median(bwd),
        optimizer_s_median: median(opt),
    })
}
