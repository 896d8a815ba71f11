//! Errors of gram-train.

use std::path::{Path, PathBuf};

/// Result alias of gram-train.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can stop a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model core failed (checkpoint, tokenizer, device).
    #[error(transparent)]
    Model(#[from] gram_model::Error),
    /// gram-core failed (schemas, tokenizer, files).
    #[error(transparent)]
    Core(#[from] gram_core::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The dataset does not fit the run (schema, tokenizer, lengths).
    #[error("{}: {msg}", path.display())]
    Data {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Bad settings or flags.
    #[error("{0}")]
    Input(String),
    /// A broken invariant.
    #[error("internal error (please report): {0}")]
    Internal(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A dataset error on `path`.
    pub fn data(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Self::Data {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    /// Whether the user can fix it (exit status 1) rather than a bug (2).
    pub fn is_user_error(&self) -> bool {
        match self {
            Self::Model(e) => e.is_user_error(),
            Self::Core(e) => e.is_user_error(),
            Self::Internal(_) => false,
            Self::Io { .. } | Self::Data { .. } | Self::Input(_) => true,
        }
    }
}
