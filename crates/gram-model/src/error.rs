//! Errors of gram-model.

/// Result alias of gram-model.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong building or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the checkpoint, tokenizer or config failed.
    #[error(transparent)]
    Core(#[from] gram_core::Error),
    /// The checkpoint's tensors do not fit the model its config describes.
    #[error("{path}: {msg}")]
    Weights {
        /// The checkpoint.
        path: String,
        /// What does not fit.
        msg: String,
    },
    /// The requested device cannot be used.
    #[error("device: {0}")]
    Device(String),
    /// A broken invariant.
    #[error("internal error (please report): {0}")]
    Internal(String),
}

impl Error {
    /// True when the user can fix it (a checkpoint that cannot be read or does not fit its
    /// config, a device that cannot be opened), false for a bug of ours.
    pub fn is_user_error(&self) -> bool {
        match self {
            Self::Core(e) => e.is_user_error(),
            Self::Weights { .. } | Self::Device(_) => true,
            Self::Internal(_) => false,
        }
    }
}
