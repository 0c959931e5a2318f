//! slm-eval: zero-shot evaluation that gives the numbers lm-evaluation-harness 0.4.13 gives
//! (spec: `lm-eval.md` of the project's specs).
//!
//! A task is data ([`TaskSpec`] in [`TASKS`]) interpreted by one scorer. The pipeline:
//!
//! 1. [`Task::from_name`] → [`Task::load_docs`]`(data_dir, limit)` → [`Doc`]s: string requests
//!    (context, continuation), the choice strings and the gold index, exactly as lm-eval builds
//!    them (HellaSwag preprocessing, WinoGrande partial scoring, PIQA solutions verbatim, ...).
//! 2. [`build_token_requests`]`(encoder, docs, max_length)` → per-document [`TokenRequest`]s, as
//!    lm-eval's HFLM builds them: trailing whitespace moved from context to continuation,
//!    continuation tokens = `enc(context + continuation)[len(enc(context))..]`, left truncation to
//!    the last `max_length + 1` tokens, no BOS. The [`TextEncoder`] must add no special tokens.
//! 3. **The scoring engine** ([`Engine`]) turns every [`TokenRequest`] into a
//!    [`RequestResult`]:
//!    - run the model on [`TokenRequest::input`] = `context ++ continuation[..n-1]`
//!      (`n = continuation.len()`), causal attention, positions from 0;
//!    - `loglikelihood` = Σ_{j<n} `log_softmax(logits[context.len() - 1 + j])[continuation[j]]`,
//!      log-softmax over the full vocabulary, summed in f32 or f64 (lm-eval sums the f32 values
//!      of an f32 model; agreement with the golden values is ~1e-3);
//!    - `is_greedy` = every `argmax(logits[context.len() - 1 + j]) == continuation[j]`
//!      (logged only; no metric uses it).
//!
//!    Requests are independent, so the engine may batch and reorder them freely and may compute
//!    a shared prefix once: the requests of one [`DocRequests`] usually share `context` (all but
//!    WinoGrande). Results go back in request order, one `Vec<RequestResult>` per document.
//! 4. [`score_docs`] → [`DocResult`]s (acc, acc_norm) → [`aggregate`] → [`MetricValue`]s
//!    (mean, lm-eval's sample stderr of the mean) → [`TaskReport`] → [`results_json`];
//!    [`sample_record`] for `--log-samples`; [`reports_avg7`] for the paper's average.
//!
//! Perplexity ([`perplexity`]) uses the same engine contract:
//! - `wikitext`: [`load_wikitext_docs`] → per page [`rolling_requests`]`(encoder, &doc.text,
//!   prefix_token, max_length)` (prefix = the tokenizer's BOS id, else EOS: lm-eval's
//!   `prefix_token_id`) → engine → [`doc_loglikelihood`] per page → [`aggregate_wikitext`].
//! - `wikitext2-128`: [`wikitext2_windows`] ([`wikitext2_text`] → encode once →
//!   [`fixed_windows`]`(tokens, 128)`) → engine → [`window_perplexity`].
//!
//! Bad data is refused, never scored: a record's error names the file, the line and the field
//! (a gold label outside the choices included); a file with nothing to evaluate (no records, a
//! limit of 0, text shorter than one window) names the file; a NaN or infinite log-likelihood
//! names the task and the document.

pub mod engine;
pub mod error;
pub mod metrics;
pub mod perplexity;
pub mod request;
pub mod results;
pub mod run;
pub mod task;
pub mod text;

pub use engine::{Engine, EngineStats, LmEvalEncoder};
pub use error::EvalError;
pub use metrics::{
    aggregate, argmax, avg7, mean, mean_stderr, score_doc, score_docs, DocResult, MetricValue, RequestResult,
};
pub use perplexity::{
    aggregate_wikitext, doc_loglikelihood, fixed_windows, load_wikitext_docs, load_wikitext_rows, make_disjoint_window,
    rolling_requests, rolling_token_windows, wikitext2_text, wikitext2_windows, wikitext_pages, window_perplexity,
    WikitextDoc, Window,
};
pub use request::{
    build_token_requests, encode_pair, move_trailing_whitespace, DocRequests, TextEncoder, TokenRequest,
};
pub use results::{
    reports_avg7, results_file_name, results_json, sample_record, sanitize_model_name, to_pretty_string,
    to_python_line, ResultsSummary, RunInfo, TaskReport,
};
pub use run::{evaluate, Progress, Settings, Silent, TaskRun};
pub use task::{Doc, Metric, Request, Task, TaskKind, TaskSpec, AVG7, TASKS};

/// Window length of the LLM-Pruner/SLM perplexity protocol.
pub const WIKITEXT2_WINDOW: usize = 128;
