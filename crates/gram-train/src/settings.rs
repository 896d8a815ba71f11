//! Run settings: defaults, then a TOML file, then command-line flags. The resolved settings are
//! saved in the run folder (`settings.toml`) and are what `--resume` continues with.

use std::path::{Path, PathBuf};

use gram_core::Target;
use gram_model::Backend;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How `final/` stores its weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SaveDtype {
    /// As the starting checkpoint: bf16 when all its tensors were bf16, else f32.
    #[default]
    Auto,
    /// float32.
    F32,
    /// bfloat16 (half the bytes).
    Bf16,
}

/// Which objective a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Stage 1: next-token loss on the response pair, prompt masked (unlabeled pairs).
    Pretrain,
    /// Stage 2: label-smoothed cross-entropy over the A/B logits at the label position.
    Finetune,
    /// Baseline: scalar head on the last token, Bradley-Terry loss.
    Bt,
}

impl Stage {
    /// The dataset folder a stage reads under the data root.
    pub fn dataset_dir(self) -> &'static str {
        match self {
            Stage::Pretrain => "stage1",
            Stage::Finetune | Stage::Bt => "stage2",
        }
    }

    /// Name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Pretrain => "pretrain",
            Stage::Finetune => "finetune",
            Stage::Bt => "bt",
        }
    }
}

/// Everything that determines a run. Field names are the TOML keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Objective.
    pub stage: Stage,
    /// Starting checkpoint: HF folder, .gguf, or an earlier run's `final`.
    pub model: PathBuf,
    /// A `gram-data build` output folder (holding stage1/ and stage2/).
    pub data: PathBuf,
    /// Where the run is written.
    pub out: PathBuf,
    /// Device.
    pub backend: Backend,
    /// Peak learning rate.
    pub lr: f64,
    /// Share of the optimiser steps spent warming up linearly from 0.
    pub warmup: f64,
    /// Passes over the training split (ignored when `max_steps` is set).
    pub epochs: usize,
    /// Stop after this many optimiser steps.
    pub max_steps: Option<usize>,
    /// Rows per micro-batch (pairs for `bt`).
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (0: no clipping).
    pub clip: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW betas.
    pub betas: (f64, f64),
    /// AdamW epsilon.
    pub adam_eps: f64,
    /// Stage-2 label smoothing.
    pub label_smoothing: f64,
    /// Seed of the initialisation of new heads and of the data order.
    pub seed: u64,
    /// Batches are sorted by length within windows of this many batches (1: no bucketing).
    pub bucket_window: usize,
    /// Batches are padded to a multiple of this many tokens; none: 64 on wgpu (fewer shapes,
    /// so fewer kernels compiled and tuned per run), 1 on the CPU (no padding beyond the
    /// longest row).
    pub pad_multiple: Option<usize>,
    /// Validate every this many optimiser steps (0: only at the end).
    pub eval_every: usize,
    /// At most this many validation rows (pairs for `bt`); 0: all.
    pub max_valid: usize,
    /// Train on this many pairs of the train split (0: all): those whose ids hash lowest, so
    /// every stage and run on the same dataset sees the same pairs.
    pub max_train_pairs: usize,
    /// Save a checkpoint every this many optimiser steps (0: only at the end).
    pub save_every: usize,
    /// Checkpoints kept (older ones are deleted once a newer one is complete).
    pub keep: usize,
    /// Log a training line every this many optimiser steps.
    pub log_every: usize,
    /// Longest sequence for `bt` inputs (prompt + response), in tokens; longer texts are cut.
    pub bt_max_tokens: usize,
    /// LoRA rank (0: no adapter, every parameter trains).
    pub lora_rank: usize,
    /// LoRA scaling numerator (the update is `alpha / rank · B·A`); none: twice the rank.
    pub lora_alpha: Option<f64>,
    /// Projections that get adapters: q, k, v, o, gate, up, down.
    pub lora_targets: Vec<String>,
    /// Dropout on the adapters' input.
    pub lora_dropout: f64,
    /// Continue training this adapter (a PEFT folder: ours or Python peft's) over `model`.
    pub adapter: Option<PathBuf>,
    /// Train only the top this many decoder layers (and the final norm; with LoRA, adapters
    /// only in them); the layers below run forward without recording for autodiff.
    pub train_layers: Option<usize>,
    /// Activation checkpointing: keep each decoder layer's input, recompute the rest in the
    /// backward pass (less memory, one more forward of the layers).
    pub recompute: bool,
    /// How `final/` stores its weights (checkpoints are always f32, to resume exactly).
    pub save_dtype: SaveDtype,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            stage: Stage::Finetune,
            model: PathBuf::new(),
            data: PathBuf::new(),
            out: PathBuf::new(),
            backend: Backend::Cpu,
            lr: 2e-5,
            warmup: 0.1,
            epochs: 1,
            max_steps: None,
            batch_size: 8,
            grad_accum: 1,
            clip: 1.0,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            adam_eps: 1e-8,
            label_smoothing: 0.1,
            seed: 0,
            bucket_window: 32,
            pad_multiple: None,
            eval_every: 0,
            max_valid: 2000,
            max_train_pairs: 0,
            save_every: 0,
            keep: 2,
            log_every: 10,
            bt_max_tokens: 2048,
            lora_rank: 0,
            lora_alpha: None,
            lora_targets: Target::ALL.iter().map(|t| t.short().to_string()).collect(),
            lora_dropout: 0.0,
            adapter: None,
            train_layers: None,
            recompute: false,
            save_dtype: SaveDtype::Auto,
        }
    }
}

impl Settings {
    /// What batches are padded to a multiple of: `pad_multiple`, else the backend's default.
    pub fn pad_multiple(&self) -> usize {
        self.pad_multiple.unwrap_or(match self.backend {
            Backend::Wgpu => 64,
            Backend::Cpu => 1,
        })
    }

    /// Reads a TOML settings file (unknown keys are an error naming the file).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text)
            .map_err(|e| Error::Input(format!("{}: {}", path.display(), e.message())))
    }

    /// The TOML form saved with a run.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::Internal(e.to_string()))
    }

    /// Checks values a run cannot start with.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Input(m));
        if self.model.as_os_str().is_empty() {
            return bad("no starting model: pass --model (an HF folder, a .gguf, or an earlier run's final/)".into());
        }
        if self.data.as_os_str().is_empty() {
            return bad("no dataset: pass --data (a `gram-data build` output folder)".into());
        }
        if self.out.as_os_str().is_empty() {
            return bad("no run folder: pass --out".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr must be > 0, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.warmup) {
            return bad(format!(
                "warmup is a share of the steps in [0, 1), got {}",
                self.warmup
            ));
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.bucket_window == 0 {
            return bad("batch_size, grad_accum and bucket_window must be >= 1".into());
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.epochs == 0) {
            return bad("nothing to train: epochs and max_steps must be >= 1".into());
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(format!(
                "label_smoothing must be in [0, 1), got {}",
                self.label_smoothing
            ));
        }
        if self.clip < 0.0 || self.weight_decay < 0.0 {
            return bad("clip and weight_decay must be >= 0".into());
        }
        if self.keep == 0 {
            return bad("keep must be >= 1".into());
        }
        self.lora_targets()?;
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            ));
        }
        if self.lora_alpha.is_some_and(|a| !(a > 0.0 && a.is_finite())) {
            return bad("lora_alpha must be > 0".into());
        }
        if self.train_layers == Some(0) {
            return bad("train_layers must be >= 1".into());
        }
        if self.pad_multiple.is_some_and(|m| m == 0 || m > 4096) {
            return bad("pad_multiple must be in 1..=4096".into());
        }
        Ok(())
    }

    /// The LoRA targets, parsed.
    pub fn lora_targets(&self) -> Result<Vec<Target>> {
        if self.lora_targets.is_empty() {
            return Err(Error::Input("lora_targets is empty".into()));
        }
        let mut out = Vec::new();
        for name in &self.lora_targets {
            let t = Target::parse(name.trim()).map_err(Error::Input)?;
            if !out.contains(&t) {
                out.push(t);
            }
        }
        Ok(out)
    }
}

/// Learning rate at optimiser step `step` (0-based) of `total`: linear warm-up from 0 over
/// `warmup_steps`, then cosine decay to 0 (the schedule of transformers'
/// `get_cosine_schedule_with_warmup`). A pure function of the step, so a resumed run follows the
/// same curve without any scheduler state.
pub fn lr_at(step: usize, total: usize, warmup_steps: usize, peak: f64) -> f64 {
    if step < warmup_steps {
        return peak * step as f64 / warmup_steps.max(1) as f64;
    }
    let decay = total.saturating_sub(warmup_steps).max(1);
    let progress = (step - warmup_steps) as f64 / decay as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let (total, warm, peak) = (100, 10, 1e-3);
        assert_eq!(lr_at(0, total, warm, peak), 0.0);
        assert!((lr_at(5, total, warm, peak) - 5e-4).abs() < 1e-12);
        assert!((lr_at(10, total, warm, peak) - peak).abs() < 1e-12);
        assert!((lr_at(55, total, warm, peak) - peak / 2.0).abs() < 1e-12);
        assert!(lr_at(99, total, warm, peak) < 1e-5);
        let mut prev = f64::MAX;
        for s in 10..100 {
            let lr = lr_at(s, total, warm, peak);
            assert!(lr <= prev, "not monotone after warm-up at {s}");
            prev = lr;
        }
    }

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let s = Settings {
            lr: 3e-4,
            max_steps: Some(7),
            stage: Stage::Bt,
            ..Settings::default()
        };
        let text = s.to_toml().expect("toml");
        let back: Settings = toml::from_str(&text).expect("parse");
        assert_eq!(back, s);
        let e = toml::from_str::<Settings>("lr = 1e-3\nlearning_rate = 2")
            .expect_err("a key given twice is refused")
            .to_string();
        assert!(e.contains("learning_rate"), "{e}");
    }
}
