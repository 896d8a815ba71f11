//! Opening a checkpoint the way users have one: an HF folder (config.json + safetensors +
//! tokenizer files) or a GGUF file. Gives the configuration, the f32 weights by HF name and the
//! tokenizer.

use std::path::{Path, PathBuf};

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
    /// Opens a folder (HF) or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self> {
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
            })
        } else if path.exists() {
            let g = GgufFile::open(path)?;
            let config = g.model_config()?;
            Ok(Self {
                path: path.to_path_buf(),
                format: Format::Gguf,
                config,
                gguf: Some(g),
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
        match &self.gguf {
            Some(g) => g.weights(&self.config),
            None => Weights::from_hf_dir(&self.path),
        }
    }

    /// The tokenizer: the folder's tokenizer files, or the one in the GGUF.
    pub fn tokenizer(&self) -> Result<GramTokenizer> {
        match &self.gguf {
            Some(g) => GramTokenizer::from_gguf(g),
            None => GramTokenizer::from_dir(&self.path),
        }
    }

    /// The parsed GGUF, for GGUF checkpoints.
    pub fn gguf(&self) -> Option<&GgufFile> {
        self.gguf.as_ref()
    }
}
