//! Errors of gram-score. `Input` and `Core` are the user's to fix (a file, a column, a request);
//! `Runtime` is onnxruntime or the library; all are reported in one line.

use std::path::PathBuf;

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Model, tokenizer or manifest problems.
    #[error(transparent)]
    Core(#[from] gram_core::Error),
    /// Bad input: a missing column, a wrong type, a mismatched partial job.
    #[error("{0}")]
    Input(String),
    /// A file could not be read or written.
    #[error("{path}: {msg}")]
    File {
        /// The file.
        path: PathBuf,
        /// What happened.
        msg: String,
    },
    /// onnxruntime failed (library missing, graph rejected, run failed).
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    /// A [`Error::File`] error.
    pub fn file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.into(),
            msg: msg.to_string(),
        }
    }

    /// Whether the user can fix it (exit status 1) rather than a fault of ours (2).
    pub fn is_user_error(&self) -> bool {
        match self {
            Self::Core(e) => e.is_user_error(),
            Self::Input(_) | Self::File { .. } | Self::Runtime(_) => true,
        }
    }
}
