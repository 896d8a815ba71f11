//! A randomly initialised model of a given configuration, saved as an HF folder with a
//! tokenizer: the starting point of from-scratch experiments and of the tests' tiny models.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use gram_core::{GramTokenizer, ModelConfig};
use gram_model::{CausalLm, hf_tensors};

use crate::checkpoint::{SaveModel, write_model};
use crate::error::{Error, Result};

/// Writes a model of `config` (an HF config.json) with N(0, 0.02) weights from `seed` and the
/// tokenizer of `tokenizer` (a folder or .gguf) into `out`.
pub fn init_model(config: &Path, tokenizer: &Path, out: &Path, seed: u64) -> Result<PathBuf> {
    let cfg = ModelConfig::from_hf_file(config)?;
    cfg.validate(config)?;
    let tok = GramTokenizer::from_path(tokenizer)?;
    if tok.vocab_size() > cfg.vocab_size {
        return Err(Error::Input(format!(
            "{}: vocab_size {} is smaller than the tokenizer's {} ({})",
            config.display(),
            cfg.vocab_size,
            tok.vocab_size(),
            tokenizer.display()
        )));
    }
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::Input(format!(
            "{}: exists and is not empty",
            out.display()
        )));
    }
    let device = Device::flex();
    device.seed(seed);
    let model = CausalLm::init(&cfg, &device);
    gram_core::publish_dir(out, |tmp| {
        write_model(
            tmp,
            SaveModel {
                config_json: cfg.to_hf_json(),
                tensors: hf_tensors(&model)?,
                tokenizer: &tok,
                card: None,
                adapter: None,
                dtype: gram_core::weights::StoreDtype::F32,
            },
        )
    })?;
    Ok(out.to_path_buf())
}
