//! The error type of gram-core: user errors (bad files, bad configs) carry the path and
//! what was expected; `Internal` is kept for broken invariants.

use std::path::PathBuf;

/// Result alias of gram-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading checkpoints, tokenizers and templates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read at all.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file was read but its content is not what its format says.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where in the file.
        msg: String,
    },
    /// A model configuration asks for something this project does not implement.
    #[error("{path}: unsupported {what}: {msg}")]
    Unsupported {
        /// The file holding the configuration.
        path: PathBuf,
        /// Which field or feature.
        what: String,
        /// Detail, with the supported values.
        msg: String,
    },
    /// A tensor has a shape other than the model's configuration implies.
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// The tokenizer failed or does not fit what GRAM needs.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A text does not fit the token budget even with its texts cut to nothing.
    #[error("{0}")]
    TooLong(String),
    /// A broken invariant: a bug in GRAM-rs, not in the input.
    #[error("internal error (please report): {0}")]
    Internal(String),
}

impl Error {
    /// An [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Unsupported`] for `path`.
    pub fn unsupported(
        path: impl Into<PathBuf>,
        what: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Self::Unsupported {
            path: path.into(),
            what: what.into(),
            msg: msg.into(),
        }
    }

    /// True when the error is the input's fault, not ours.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, Self::Internal(_))
    }
}

/// A checkpoint file's bytes: memory-mapped from disk (pages are read as tensors are touched,
/// and the file is never copied whole into memory), or owned when parsed from memory.
pub enum FileBytes {
    /// Bytes in memory.
    Owned(Vec<u8>),
    /// A read-only map of the file.
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            Self::Mapped(m) => m,
        }
    }
}

impl From<Vec<u8>> for FileBytes {
    fn from(v: Vec<u8>) -> Self {
        Self::Owned(v)
    }
}

/// Maps a file read-only, naming it in the error (an empty file gives empty bytes).
pub fn map_file(path: &std::path::Path) -> Result<FileBytes> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Ok(FileBytes::Owned(Vec::new()));
    }
    #[allow(unsafe_code)]
    // SAFETY: the map is read-only and lives as long as the parsed file. Like every reader that
    // maps model files (safetensors' and llama.cpp's own), it assumes no one truncates or
    // rewrites the checkpoint while it is open; gram-train writes checkpoints to a temporary
    // name and renames them, which leaves a mapped file untouched.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(FileBytes::Mapped(map))
}

/// Reads a whole file, naming it in the error.
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}
