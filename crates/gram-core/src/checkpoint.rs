//! Opening a checkpoint the way users have one: an HF folder (config.json + safetensors +
//! tokenizer files), a GGUF file, or a LoRA adapter folder in PEFT's layout (its base found
//! through `base_model_name_or_path` or given; the weights are the base's with the adapter
//! merged in). Gives the configuration, the f32 weights by HF name and the tokenizer.

use std::path::{Path, PathBuf};

use crate::adapter::{self, Adapter};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::GramTokenizer;
use crate::weights::Weights;

/// What kind of file a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An HF model folder.
    HfDir,
    /// A GGUF file.
    Gguf,
    /// A LoRA adapter folder over a base checkpoint.
    Adapter,
}

/// A checkpoint on disk, its config already read.
#[derive(Debug)]
pub struct Checkpoint {
    /// Where it is.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// The model configuration.
    pub config: ModelConfig,
    gguf: Option<GgufFile>,
    adapter: Option<(Box<Checkpoint>, Adapter)>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens a folder (HF or adapter) or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_base(path, None)
    }

    /// [`Checkpoint::open`], with the base model of an adapter folder given (instead of the
    /// one its `base_model_name_or_path` names).
    pub fn open_with_base(path: &Path, base: Option<&Path>) -> Result<Self> {
        if Adapter::is_adapter_dir(path) {
            let a = Adapter::read(path)?;
            let base_path = adapter::resolve_base(path, &a, base)?;
            let base = Self::open(&base_path)?;
            if base.format == Format::Adapter {
                return Err(Error::format(
                    &base_path,
                    "the base of an adapter is itself an adapter; merge it first (its merged/ folder)",
                ));
            }
            a.lora
                .check(&base.config, &path.join(adapter::CONFIG_FILE))?;
            return Ok(Self {
                path: path.to_path_buf(),
                format: Format::Adapter,
                config: base.config.clone(),
                gguf: None,
                adapter: Some((Box::new(base), a)),
            });
        }
        if path.is_dir() {
            let cfg_path = path.join("config.json");
            if !cfg_path.exists() {
                return Err(Error::format(path, "not a model folder: no config.json"));
            }
            let config = ModelConfig::from_hf_file(&cfg_path)?;
            Ok(Self {
                path: path.to_path_buf(),
                format: Format::HfDir,
                config,
                gguf: None,
                adapter: None,
            })
        } else if path.exists() {
            let g = GgufFile::open(path)?;
            let config = g.model_config()?;
            Ok(Self {
                path: path.to_path_buf(),
                format: Format::Gguf,
                config,
                gguf: Some(g),
                adapter: None,
            })
        } else {
            Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ))
        }
    }

    /// All weights, f32, by HF name.
    pub fn weights(&self) -> Result<Weights> {
        if let Some((base, a)) = &self.adapter {
            let mut w = base.weights()?;
            a.merge_into(&mut w.tensors, &self.path)?;
            w.stored_dtype = format!("{} + LoRA r={}", w.stored_dtype, a.lora.rank);
            return Ok(w);
        }
        match &self.gguf {
            Some(g) => g.weights(&self.config),
            None => Weights::from_hf_dir(&self.path),
        }
    }

    /// The tokenizer: the folder's tokenizer files, or the one in the GGUF.
    pub fn tokenizer(&self) -> Result<GramTokenizer> {
        if let Some((base, _)) = &self.adapter {
            return if self.path.join("tokenizer.json").exists() {
                GramTokenizer::from_dir(&self.path)
            } else {
                base.tokenizer()
            };
        }
        match &self.gguf {
            Some(g) => GramTokenizer::from_gguf(g),
            None => GramTokenizer::from_dir(&self.path),
        }
    }

    /// The parsed GGUF, for GGUF checkpoints.
    pub fn gguf(&self) -> Option<&GgufFile> {
        self.gguf.as_ref()
    }

    /// For an adapter folder: its base checkpoint and the adapter.
    pub fn adapter(&self) -> Option<(&Checkpoint, &Adapter)> {
        self.adapter.as_ref().map(|(b, a)| (b.as_ref(), a))
    }
}
