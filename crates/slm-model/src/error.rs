//! One error type for the model core. Every variant that comes from a file names it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The I/O error is part of the message (not a chained source), so it is printed once.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: is {kind}, not a regular file; refusing to read it")]
    NotRegularFile { path: PathBuf, kind: &'static str },
    #[error("{path}: is {len} bytes, more than the {max} bytes accepted for this kind of file")]
    TooLarge { path: PathBuf, len: u64, max: u64 },
    #[error("{path}: tensor `{name}` holds NaN or infinite values")]
    NonFinite { path: PathBuf, name: String },
    #[error("{path}: not a model: expected an HF directory (config.json + model.safetensors) or a .gguf file")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: invalid safetensors: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: tensor `{name}` has shape {actual:?}, but the config implies {expected:?}")]
    ShapeMismatch { path: PathBuf, name: String, expected: Vec<usize>, actual: Vec<usize> },
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: unsupported dtype {dtype} for tensor `{name}` (supported: F32, F16, BF16)")]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String },
    #[error("{path}: invalid GGUF: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("{path}: calibration corpus: {message}")]
    Calibration { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Output { path: PathBuf, message: String },
    #[error("data directory: {message}")]
    DataDir { message: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), error: source }
    }
}
