//! Run folders and checkpoints. A checkpoint is an HF model folder (config.json,
//! model.safetensors, tokenizer files: transformers loads it as is), or in a LoRA run the
//! adapter in PEFT's layout with the merged model in `merged/`, plus what resuming needs:
//! `optimizer.bpk` (burn's AdamW state) and `trainer_state.json` (step, data position, parameter
//! ids). Each is written into a temporary folder and renamed into place, then `latest` is
//! rewritten atomically, so a killed run always leaves a complete latest checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use gram_core::weights::StoreDtype;
use gram_core::{Adapter, F32Tensor, GramTokenizer, LabelIds};
use gram_model::ParamIds;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::settings::Stage;

/// Where a run stands; saved with each checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Objective.
    pub stage: Stage,
    /// Optimiser steps done.
    pub step: usize,
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Micro-batches of the current epoch already used.
    pub batch_in_epoch: usize,
    /// Steps the run will take.
    pub total_steps: usize,
    /// Real tokens trained on so far.
    pub tokens: u64,
    /// Seconds of training so far.
    pub elapsed_s: f64,
    /// Burn parameter id of each HF tensor (the optimiser state is keyed by them).
    pub param_ids: ParamIds,
}

/// What `final/` and every checkpoint say about how the model was made (`gram.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    /// Written by.
    pub trainer: String,
    /// Objective of the last stage.
    pub stage: Stage,
    /// Starting checkpoint.
    pub base_model: PathBuf,
    /// Dataset folder.
    pub data: PathBuf,
    /// Label tokens (GRAM models).
    pub label_ids: LabelIds,
    /// Steps trained.
    pub step: usize,
}

/// The model side of a save.
pub struct SaveModel<'a> {
    /// HF config.json contents.
    pub config_json: serde_json::Value,
    /// Tensors by HF name with their parameter ids (with an adapter: the merged model's).
    pub tensors: BTreeMap<String, (F32Tensor, u64)>,
    /// A LoRA run's adapter with its parameter ids by PEFT key: the folder then holds the
    /// adapter, and the merged model goes into `merged/`.
    pub adapter: Option<(Adapter, ParamIds)>,
    /// Tokenizer saved beside it.
    pub tokenizer: &'a GramTokenizer,
    /// gram.json (none for an untrained model).
    pub card: Option<ModelCard>,
    /// How the model's tensors are stored (a LoRA adapter stays f32; its merged model follows).
    pub dtype: StoreDtype,
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Internal(e.to_string()))?;
    gram_core::atomic_write(path, text.as_bytes())?;
    Ok(())
}

/// Writes an HF model folder into `dir` (created), or for a LoRA run the adapter (PEFT's layout)
/// with the merged model in `dir/merged`; returns the parameter ids the optimiser state is keyed
/// by.
pub fn write_model(dir: &Path, mut m: SaveModel<'_>) -> Result<ParamIds> {
    let Some((adapter, ids)) = m.adapter.take() else {
        return write_hf(dir, m);
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    adapter.write(dir, StoreDtype::F32)?;
    m.tokenizer.save_dir(dir)?;
    if let Some(card) = &m.card {
        write_json(&dir.join("gram.json"), card)?;
    }
    write_hf(&dir.join("merged"), m)?;
    Ok(ids)
}

/// Writes an HF model folder into `dir` (created); returns the parameter ids.
fn write_hf(dir: &Path, m: SaveModel<'_>) -> Result<ParamIds> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut config = m.config_json;
    if let Some(c) = config.as_object_mut() {
        let name = match m.dtype {
            StoreDtype::F32 => "float32",
            StoreDtype::Bf16 => "bfloat16",
        };
        c.insert("torch_dtype".into(), name.into());
    }
    write_json(&dir.join("config.json"), &config)?;
    let mut ids = ParamIds::new();
    let mut weights = BTreeMap::new();
    for (name, (t, id)) in m.tensors {
        ids.insert(name.clone(), id);
        weights.insert(name, t);
    }
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    gram_core::weights::write_safetensors_as(
        &dir.join("model.safetensors"),
        &weights,
        Some(meta),
        m.dtype,
    )?;
    m.tokenizer.save_dir(dir)?;
    if let Some(card) = &m.card {
        write_json(&dir.join("gram.json"), card)?;
    }
    Ok(ids)
}

/// Saves checkpoint `step-NNNNNN` under `run/checkpoints`, points `run/latest` at it, and
/// deletes all but the newest `keep`.
pub fn save_checkpoint(
    run: &Path,
    model: SaveModel<'_>,
    optim: &ModuleOptimizer,
    mut state: TrainState,
    keep: usize,
) -> Result<PathBuf> {
    let parent = run.join("checkpoints");
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = format!("step-{:07}", state.step);
    let dest = parent.join(&name);
    gram_core::publish_dir(&dest, |tmp| -> Result<()> {
        state.param_ids = write_model(tmp, model)?;
        let opt_path = tmp.join("optimizer.bpk");
        optim
            .save(&opt_path)
            .map_err(|e| Error::Internal(format!("saving {}: {e}", opt_path.display())))?;
        write_json(&tmp.join("trainer_state.json"), &state)
    })?;
    gram_core::atomic_write(
        &run.join("latest"),
        format!("checkpoints/{name}\n").as_bytes(),
    )?;
    prune(&parent, keep)?;
    Ok(dest)
}

/// Deletes all but the newest `keep` complete checkpoints and any temporary leftovers.
fn prune(parent: &Path, keep: usize) -> Result<()> {
    let mut done: Vec<PathBuf> = Vec::new();
    for e in std::fs::read_dir(parent)
        .map_err(|e| Error::io(parent, e))?
        .flatten()
    {
        let p = e.path();
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("step-") {
            done.push(p);
        } else if n.starts_with(".step-") && !n.ends_with(&format!("-{}", std::process::id())) {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
    done.sort();
    let n = done.len();
    for p in done.into_iter().take(n.saturating_sub(keep)) {
        std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// Writes the finished model as `run/final` (an HF folder, no optimiser state).
pub fn save_final(run: &Path, model: SaveModel<'_>) -> Result<PathBuf> {
    let dest = run.join("final");
    gram_core::publish_dir(&dest, |tmp| write_model(tmp, model).map(drop))?;
    Ok(dest)
}

/// The checkpoint `run/latest` names, with its state.
pub fn latest(run: &Path) -> Result<(PathBuf, TrainState)> {
    let ptr = run.join("latest");
    let rel = std::fs::read_to_string(&ptr).map_err(|e| {
        Error::Input(format!(
            "{}: cannot resume: no checkpoint was completed in this run ({e})",
            ptr.display()
        ))
    })?;
    let dir = run.join(rel.trim());
    let sp = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| Error::data(&sp, format!("not a trainer state: {e}")))?;
    Ok((dir, state))
}
