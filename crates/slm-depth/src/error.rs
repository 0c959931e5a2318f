//! The one error type of slm-depth.

/// Everything that can go wrong while planning or applying depth pruning.
#[derive(Debug, thiserror::Error)]
pub enum DepthError {
    /// A user-supplied setting outside its valid range (threshold, ratio, layer count, window).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Layers that cannot be merged (different widths after width pruning).
    #[error("cannot merge layers {lo}..={hi}: {problem}")]
    Incompatible { lo: usize, hi: usize, problem: String },

    /// A score or cost came out NaN or infinite (the search stops rather than rank on it).
    #[error("{what} is {value}, not a finite number: the model's activations overflow or are not finite on the calibration windows")]
    NonFinite { what: String, value: f64 },

    #[error("model: {0}")]
    Model(#[from] slm_model::ModelError),

    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),

    /// Writing an output (plots, JSON) failed.
    #[error("{path}: {message}")]
    Output { path: std::path::PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, DepthError>;
