//! Training-step throughput of a configuration on random tokens: the same model, objective,
//! AdamW step and clipping as a run, without data loading, validation or checkpoints. What
//! `benches/train_speed.sh` compares with PyTorch eager.

use std::time::Instant;

use gram_core::{LabelIds, ModelConfig};
use gram_model::CausalLm;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::data::Example;
use crate::error::Result;
use crate::objective::{Ctx, Objective};
use crate::settings::{Settings, Stage};
use crate::tuning::Tuning;

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
    /// What trained (full, LoRA, top layers).
    pub trained: String,
    /// Whether activations were recomputed.
    pub recompute: bool,
    /// Peak resident memory of the process (Linux; 0 elsewhere), MiB.
    pub peak_rss_mib: f64,
}

/// The process's peak resident set size (`VmHWM`), MiB; 0 where `/proc` does not tell.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// What one benchmark runs.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// An HF config.json (random weights of its shape).
    pub config: std::path::PathBuf,
    /// Objective whose step is timed.
    pub stage: Stage,
    /// Rows per step.
    pub batch_size: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Device.
    pub backend: gram_model::Backend,
    /// LoRA rank on all seven projections (0: full fine-tuning).
    pub lora_rank: usize,
    /// Train only the top this many layers.
    pub train_layers: Option<usize>,
    /// Activation checkpointing.
    pub recompute: bool,
}

/// Times `steps` optimiser steps (after `warmup` untimed ones) of `stage` on random tokens,
/// training what a run with the same LoRA / top-layer / recompute settings trains.
pub fn bench(spec: &BenchSpec) -> Result<BenchResult> {
    let BenchSpec {
        stage,
        batch_size,
        seq_len,
        steps,
        warmup,
        ..
    } = *spec;
    let config = spec.config.as_path();
    let cfg = ModelConfig::from_hf_file(config)?;
    cfg.validate(config)?;
    let device = gram_model::device(spec.backend)?.autodiff();
    device.seed(0);
    let settings = Settings {
        stage,
        lora_rank: spec.lora_rank,
        train_layers: spec.train_layers,
        ..Settings::default()
    };
    let tuning = Tuning::resolve(&settings, &cfg, None)?;
    let mut model = CausalLm::init(&cfg, &device);
    if let Some(l) = &tuning.lora {
        gram_model::lora::attach(
            &mut model.model,
            l,
            gram_model::lora::Init::Fresh(0),
            None,
            "bench",
            &device,
        )?;
    }
    let mut model = tuning.trainable.apply(model, cfg.num_hidden_layers)?;
    let mut optim = crate::optim::adamw((0.9, 0.999), 1e-8, 0.0);
    let labels = LabelIds { a: 1, b: 2 };
    let ctx = Ctx {
        stage,
        pad: 0,
        pad_multiple: 1,
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
        let ((loss, _, _), tape) = gram_model::recompute::record(spec.recompute, || {
            model.batch_loss(&refs, &ctx, &device)
        });
        let _ = loss.clone().into_scalar::<f32>();
        let t1 = Instant::now();
        let grads = tape.backward(loss, &model);
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
        trained: tuning.describe(cfg.num_hidden_layers),
        recompute: spec.recompute,
        peak_rss_mib: peak_rss_mib(),
    })
}
