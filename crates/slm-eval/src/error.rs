//! The one error type of slm-eval.

use std::path::PathBuf;

/// Everything that can go wrong while building, scoring or reporting an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A task name that is not one of [`crate::Task::NAMES`].
    #[error("unknown task `{name}` (known tasks: {known})")]
    UnknownTask { name: String, known: String },

    /// The JSONL file a task reads does not exist.
    #[error("data file for task `{task}` not found: {path} (set the data directory with --data-dir)")]
    MissingDataFile { task: String, path: PathBuf },

    /// The data file exists but could not be read.
    #[error("cannot read {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },

    /// One JSONL line is not valid UTF-8, not valid JSON, or not a JSON object. `line` is 1-based.
    #[error("{path}: line {line}: malformed record: {problem}")]
    MalformedRecord { path: PathBuf, line: usize, problem: String },

    /// One field of a JSONL record is missing, of the wrong type, or holds a value out of range (a gold label
    /// that is not one of the choices, an empty choice list). `line` is 1-based; `field` is the dotted path
    /// (`choices.text`), with an index for a list item (`choices.text[2]`).
    #[error("{path}: line {line}: field `{field}`: {problem}")]
    BadField { path: PathBuf, line: usize, field: String, problem: String },

    /// A data file leaves nothing to evaluate: no records, a limit of 0, no text, or too little text for one
    /// perplexity window.
    #[error("{path}: task `{task}`: {problem}")]
    NothingToEvaluate { task: String, path: PathBuf, problem: String },

    /// A log-likelihood is NaN or infinite; it is never averaged into a metric.
    #[error("task `{task}`, {item}: the log-likelihood is {value}, not a finite number; refusing to average it")]
    NonFiniteScore { task: String, item: String, value: f64 },

    /// A multiple-choice operation was asked of a perplexity task, or the other way round.
    #[error("task `{task}` is a {kind} task; {what} is not available for it")]
    WrongTaskKind { task: String, kind: &'static str, what: &'static str },

    /// The tokenizer behind a [`crate::TextEncoder`] failed.
    #[error("tokenizer failed: {0}")]
    Tokenizer(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// A request cannot be scored (empty context or continuation, continuation longer than the
    /// model's maximum length), as lm-eval would refuse it with an assertion.
    #[error("doc {doc_id}, request {request}: {problem}")]
    BadRequest { doc_id: usize, request: usize, problem: String },

    /// The scoring engine returned a different number of results than a document has requests.
    #[error("task `{task}`, doc {doc_id}: {got} results for {expected} requests (expected one result per request)")]
    ResultCount { task: String, doc_id: usize, expected: usize, got: usize },

    /// A document handed to the scorer cannot be scored (no choices, a gold index outside them).
    #[error("task `{task}`, doc {doc_id}: {problem}")]
    BadDoc { task: String, doc_id: usize, problem: String },

    /// The model failed during a forward pass.
    #[error("model: {0}")]
    Model(#[from] slm_model::ModelError),

    /// A candle tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),

    /// An argument outside its valid range (window lengths and the like).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl EvalError {
    pub(crate) fn nothing(task: &str, path: &std::path::Path, problem: impl Into<String>) -> Self {
        EvalError::NothingToEvaluate { task: task.to_string(), path: path.to_path_buf(), problem: problem.into() }
    }

    /// `Err(NonFiniteScore)` unless `value` is finite; `item` names the document (`doc 3, request 1`).
    pub(crate) fn check_finite(task: &str, item: impl FnOnce() -> String, value: f64) -> Result<f64, Self> {
        if value.is_finite() {
            Ok(value)
        } else {
            Err(EvalError::NonFiniteScore { task: task.to_string(), item: item(), value })
        }
    }

    pub(crate) fn malformed(path: &std::path::Path, line: usize, problem: impl Into<String>) -> Self {
        EvalError::MalformedRecord { path: path.to_path_buf(), line, problem: problem.into() }
    }
}
