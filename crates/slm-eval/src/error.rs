//! The one error type of slm-eval.

use std::path::PathBuf;

/// Everything that can go wrong while building, scoring or reporting an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A task name that is not one of [`crate::Task::NAMES`].
    #[error("unknown task `{name}` (known tasks: {known})")]
    UnknownTask { name: String, known: String },

    /// The JSONL file a task reads does not exist.
    #[error(
        "data file for task `{task}` not found: {path} (set the data directory with --data-dir)"
    )]
    MissingDataFile { task: String, path: PathBuf },

    /// The data file exists but could not be read.
    #[error("cannot read {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },

    /// One JSONL record is not valid JSON, lacks a field, or has a field of the wrong kind.
    /// `line` is 1-based.
    #[error("{path}:{line}: malformed record: {problem}")]
    MalformedRecord {
        path: PathBuf,
        line: usize,
        problem: String,
    },

    /// A multiple-choice operation was asked of a perplexity task, or the other way round.
    #[error("task `{task}` is a {kind} task; {what} is not available for it")]
    WrongTaskKind {
        task: String,
        kind: &'static str,
        what: &'static str,
    },

    /// The tokenizer behind a [`crate::TextEncoder`] failed.
    #[error("tokenizer failed: {0}")]
    Tokenizer(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// A request cannot be scored (empty context or continuation, continuation longer than the
    /// model's maximum length), as lm-eval would refuse it with an assertion.
    #[error("doc {doc_id}, request {request}: {problem}")]
    BadRequest {
        doc_id: usize,
        request: usize,
        problem: String,
    },

    /// The scoring engine returned a different number of results than there were requests.
    #[error("doc {doc_id}: expected {expected} results, got {got}")]
    ResultCount {
        doc_id: usize,
        expected: usize,
        got: usize,
    },

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
    pub(crate) fn malformed(
        path: &std::path::Path,
        line: usize,
        problem: impl Into<String>,
    ) -> Self {
        EvalError::MalformedRecord {
            path: path.to_path_buf(),
            line,
            problem: problem.into(),
        }
    }
}
