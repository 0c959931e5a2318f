//! One task, end to end: documents → requests → [`Engine`] → metrics and `--log-samples` records.

use std::path::Path;

use serde_json::{json, Value};
use slm_model::Model;

use crate::engine::Engine;
use crate::error::EvalError;
use crate::metrics::{aggregate, score_docs};
use crate::perplexity::{
    aggregate_wikitext, doc_loglikelihood, load_wikitext_docs, rolling_requests, wikitext2_windows, window_perplexity,
};
use crate::request::{build_token_requests, TokenRequest};
use crate::results::{sample_record, TaskReport};
use crate::task::{Task, TaskKind};
use crate::WIKITEXT2_WINDOW;

/// How to evaluate.
#[derive(Debug, Clone)]
pub struct Settings<'p> {
    pub data_dir: &'p Path,
    /// First N documents (lm-eval's `--limit`); for `wikitext2-128`, first N windows.
    pub limit: Option<usize>,
    /// Requests are left-truncated to this many tokens (lm-eval: the model's `max_position_embeddings`).
    pub max_length: usize,
    pub batch_size: usize,
    /// Pack the continuations of one context into one sequence (the default; `false` only for comparisons).
    pub share_context: bool,
}

/// Progress over the requests of one task.
pub trait Progress {
    fn start(&mut self, task: &str, requests: u64);
    fn advance(&mut self, requests: u64);
    fn finish(&mut self) {}
}

/// No progress display.
pub struct Silent;

impl Progress for Silent {
    fn start(&mut self, _: &str, _: u64) {}
    fn advance(&mut self, _: u64) {}
}

/// What one task produced.
#[derive(Debug, Clone)]
pub struct TaskRun {
    pub report: TaskReport,
    /// `--log-samples` records, one per document (window, for `wikitext2-128`).
    pub samples: Vec<Value>,
    /// Requests scored.
    pub requests: usize,
    /// Tokens and logit rows the engine computed.
    pub stats: crate::engine::EngineStats,
}

/// The tokenizer of the model, or a clear error.
fn tokenizer(model: &Model) -> Result<crate::LmEvalEncoder<'_>, EvalError> {
    crate::LmEvalEncoder::for_model(model)
}

fn score(
    model: &Model,
    s: &Settings,
    name: &str,
    requests: &[TokenRequest],
    progress: &mut dyn Progress,
) -> Result<(Vec<crate::RequestResult>, crate::engine::EngineStats), EvalError> {
    progress.start(name, requests.len() as u64);
    let engine = Engine::new(model, s.batch_size)?.share_context(s.share_context);
    let out = engine.score(requests, &mut |n| progress.advance(n))?;
    progress.finish();
    Ok((out, engine.stats()))
}

fn lls(results: &[crate::RequestResult]) -> Vec<f64> {
    results.iter().map(|r| r.loglikelihood).collect()
}

/// Evaluates `task` on `model`.
pub fn evaluate(model: &Model, task: Task, s: &Settings, progress: &mut dyn Progress) -> Result<TaskRun, EvalError> {
    let tok = tokenizer(model)?;
    let n_original = task.count_docs(s.data_dir)?;
    match task.kind() {
        TaskKind::MultipleChoice => {
            let docs = task.load_docs(s.data_dir, s.limit)?;
            let doc_requests = build_token_requests(&tok, &docs, s.max_length)?;
            let flat: Vec<TokenRequest> = doc_requests.iter().flat_map(|d| d.requests.iter().cloned()).collect();
            let (results, stats) = score(model, s, task.name(), &flat, progress)?;
            let mut results = results.into_iter();
            let per_doc: Vec<Vec<_>> =
                doc_requests.iter().map(|d| results.by_ref().take(d.requests.len()).collect()).collect();
            let doc_results = score_docs(&task, &docs, &per_doc)?;
            let samples = docs.iter().zip(&doc_results).map(|(d, r)| sample_record(d, r)).collect();
            Ok(TaskRun {
                report: TaskReport {
                    task,
                    n_original,
                    n_effective: docs.len(),
                    metrics: aggregate(&task, &doc_results),
                },
                samples,
                requests: flat.len(),
                stats,
            })
        }
        TaskKind::RollingPerplexity => {
            let docs = load_wikitext_docs(s.data_dir, s.limit)?;
            // lm-eval's prefix_token_id: BOS if the tokenizer has one, else EOS.
            let prefix = model.spec.bos_token_id.or(model.spec.eos_token_id).ok_or_else(|| {
                EvalError::InvalidArgument("wikitext needs a BOS or EOS token to start each page".into())
            })?;
            let mut requests = Vec::new();
            let mut counts = Vec::new();
            for d in &docs {
                let r = rolling_requests(&tok, &d.text, prefix, s.max_length)?;
                if r.is_empty() {
                    let problem = format!("page {} tokenises to no tokens: nothing to score", d.doc_id);
                    return Err(EvalError::nothing(task.name(), &task.data_path(s.data_dir), problem));
                }
                counts.push(r.len());
                requests.extend(r);
            }
            let (results, stats) = score(model, s, task.name(), &requests, progress)?;
            let mut it = lls(&results).into_iter();
            let doc_lls: Vec<f64> =
                counts.iter().map(|&c| doc_loglikelihood(&it.by_ref().take(c).collect::<Vec<_>>())).collect();
            let samples = docs
                .iter()
                .zip(&doc_lls)
                .map(|(d, ll)| json!({ "doc_id": d.doc_id, "loglikelihood": ll, "words": d.words, "bytes": d.bytes }))
                .collect();
            Ok(TaskRun {
                report: TaskReport {
                    task,
                    n_original,
                    n_effective: docs.len(),
                    metrics: aggregate_wikitext(&docs, &doc_lls)?,
                },
                samples,
                requests: requests.len(),
                stats,
            })
        }
        TaskKind::WindowPerplexity => {
            let windows = wikitext2_windows(&tok, s.data_dir, WIKITEXT2_WINDOW, s.limit)?;
            let (results, stats) = score(model, s, task.name(), &windows, progress)?;
            let lls = lls(&results);
            let samples = lls.iter().enumerate().map(|(i, ll)| json!({ "window": i, "loglikelihood": ll })).collect();
            Ok(TaskRun {
                report: TaskReport {
                    task,
                    n_original,
                    n_effective: windows.len(),
                    metrics: vec![window_perplexity(&windows, &lls)?],
                },
                samples,
                requests: windows.len(),
                stats,
            })
        }
    }
}
