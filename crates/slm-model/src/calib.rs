//! Calibration text: N windows of T tokens sampled, with a seed, from a JSONL corpus of `{"text": ...}` records.
//!
//! The SLM and LLM-Pruner references pick random documents of at least T tokens and take a random T-token window
//! of each. The default corpus here (LAMBADA passages, ~75 tokens each) has almost no document that long, so a
//! window is filled with consecutive documents of a seeded permutation, joined by "\n\n"; a document that is long
//! enough on its own gives a random window of itself, as in the reference. No document is used twice.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// The calibration windows a command used, as its output files record them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CalibrationRecord {
    pub file: String,
    pub samples: usize,
    pub seq_len: usize,
    pub seed: u64,
}

/// The `text` field of every line of a JSONL file. Errors name the file and line.
pub fn read_jsonl_texts(path: &Path) -> Result<Vec<String>> {
    let content = crate::files::read_regular_text(path, crate::files::MAX_CORPUS_BYTES)?;
    let mut out = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err =
            |m: String| ModelError::Calibration { path: path.to_path_buf(), message: format!("line {}: {m}", i + 1) };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let text = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| err("no string field `text`".into()))?;
        out.push(text.to_string());
    }
    Ok(out)
}

/// `n` windows of exactly `len` tokens, deterministic in (`texts`, `tokenizer`, `n`, `len`, `seed`). A tokenizer
/// that puts a BOS token first ([`Tokenizer::bos_to_prepend`], Gemma) gets it at the start of every window, as
/// the model saw in training and as lm-eval scores it; the window is still `len` tokens.
pub fn sample_windows(
    texts: &[String],
    tokenizer: &Tokenizer,
    n: usize,
    len: usize,
    seed: u64,
    source: &Path,
) -> Result<Vec<Vec<u32>>> {
    if n == 0 || len == 0 {
        return Err(ModelError::InvalidArgument("calibration needs n > 0 windows of len > 0 tokens".into()));
    }
    // Every window takes at least one document and no document is used twice: refuse before allocating.
    if n > texts.len() {
        return Err(ModelError::Calibration {
            path: source.to_path_buf(),
            message: format!("{n} windows asked for, but the corpus has only {} documents", texts.len()),
        });
    }
    let bos = tokenizer.bos_to_prepend();
    let (len, full_len) = match bos {
        Some(_) if len < 2 => {
            return Err(ModelError::InvalidArgument("windows of a model that starts with BOS need len >= 2".into()))
        }
        Some(_) => (len - 1, len),
        None => (len, len),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.shuffle(&mut rng);
    let sep = tokenizer.encode("\n\n")?;
    let mut docs = order.into_iter();
    let mut windows = Vec::with_capacity(n);
    while windows.len() < n {
        let mut buf: Vec<u32> = Vec::new();
        while buf.len() < len {
            let Some(d) = docs.next() else {
                return Err(ModelError::Calibration {
                    path: source.to_path_buf(),
                    message: format!(
                        "corpus too small: {} documents give fewer than {n} windows of {len} tokens",
                        texts.len()
                    ),
                });
            };
            let ids = tokenizer.encode(&texts[d])?;
            if ids.is_empty() {
                continue;
            }
            if buf.is_empty() && ids.len() >= len {
                let start = rng.random_range(0..=ids.len() - len);
                buf = ids[start..start + len].to_vec();
            } else {
                if !buf.is_empty() {
                    buf.extend_from_slice(&sep);
                }
                buf.extend_from_slice(&ids);
            }
        }
        buf.truncate(len);
        if let Some(b) = bos {
            buf.insert(0, b);
        }
        debug_assert_eq!(buf.len(), full_len);
        windows.push(buf);
    }
    Ok(windows)
}

/// Reads `path` and samples windows from it.
pub fn calibration_windows(
    path: &Path,
    tokenizer: &Tokenizer,
    n: usize,
    len: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    let texts = read_jsonl_texts(path)?;
    sample_windows(&texts, tokenizer, n, len, seed, path)
}
