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

/// Reads a whole file, naming it in the error.
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}
