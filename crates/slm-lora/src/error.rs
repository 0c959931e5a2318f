//! The one error type of slm-lora.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A setting outside its valid range (rank 0, a batch size that does not divide, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A training or adapter file that cannot be used; names the file and the problem.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },

    #[error("model: {0}")]
    Model(#[from] slm_model::ModelError),

    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = LoraError> = std::result::Result<T, E>;

impl LoraError {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        LoraError::File { path: path.into(), message: message.into() }
    }
}
