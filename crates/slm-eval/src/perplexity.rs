//! Perplexity: lm-eval's `wikitext` (document-level pages, rolling windows) and the
//! LLM-Pruner/SLM `wikitext2-128` protocol (one token stream, non-overlapping 128-token windows).
//!
//! Both produce [`TokenRequest`]s for the same scoring engine as the multiple-choice tasks, and
//! aggregate the per-request log-likelihood sums it returns.

use std::path::Path;

use crate::error::EvalError;
use crate::metrics::MetricValue;
use crate::request::{TextEncoder, TokenRequest};
use crate::task::{describe, for_each_record, no_records_problem, FieldError, Metric, Task};
use crate::text::{py_split_whitespace_count, py_strip, wikitext_detokenize};

/// One WikiText page as lm-eval's `wikitext` task sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WikitextDoc {
    pub doc_id: usize,
    /// The page as the document-level dataset stores it.
    pub page: String,
    /// `wikitext_detokenizer(page)`: the text that is tokenised and scored.
    pub text: String,
    /// `len(re.split(r"\s+", page))` on the original page.
    pub words: usize,
    /// UTF-8 byte length of the original page.
    pub bytes: usize,
}

/// The `text` field of every row of `wikitext-2-raw-v1.test.jsonl`, in order. A file without rows, or whose
/// rows are all blank, is an error: there is nothing to score.
pub fn load_wikitext_rows(data_dir: &Path) -> Result<Vec<String>, EvalError> {
    let task = Task::from_name("wikitext")?;
    let path = task.data_path(data_dir);
    let mut rows = Vec::new();
    for_each_record(&path, "wikitext", |line, record| {
        let v = record.get("text").ok_or_else(|| FieldError::new("text", "missing from the record").at(&path, line))?;
        let text = v.as_str().ok_or_else(|| {
            FieldError::new("text", format!("expected a string, got {}", describe(v))).at(&path, line)
        })?;
        rows.push(text.to_string());
        Ok(true)
    })?;
    if rows.is_empty() {
        return Err(EvalError::nothing("wikitext", &path, no_records_problem(None, "text")));
    }
    if rows.iter().all(|r| py_strip(r).is_empty()) {
        let problem = format!("all {} rows have a blank `text` field: there is no text to score", rows.len());
        return Err(EvalError::nothing("wikitext", &path, problem));
    }
    Ok(rows)
}

/// Rebuilds `EleutherAI/wikitext_document_level` pages from the line-level rows.
///
/// The rows are the lines of `wiki.test.raw` with their "\n", blank lines (" " in the raw file)
/// given as "". The raw file is split on "\n"; a line that, after "= = =" → "===", "= =" → "=="
/// and strip, starts with "= " and ends with " =" (a top-level heading) closes the current page
/// (emitted unless whitespace-only) and opens a new one. The rest is emitted at the end as is.
pub fn wikitext_pages(rows: &[String]) -> Vec<String> {
    let raw: String = rows.iter().map(|r| if r.is_empty() { " \n" } else { r.as_str() }).collect();
    let mut pages = Vec::new();
    let mut doc: Vec<&str> = Vec::new();
    for line in raw.split('\n') {
        let r = line.replace("= = =", "===").replace("= =", "==");
        let r = py_strip(&r);
        if r.starts_with("= ") && r.ends_with(" =") {
            let page = doc.join("\n");
            if !py_strip(&page).is_empty() {
                pages.push(page);
            }
            doc.clear();
        }
        doc.push(line);
    }
    pages.push(doc.join("\n"));
    pages
}

/// The first `limit` (all when `None`) pages of lm-eval's `wikitext` task, detokenised and counted.
pub fn load_wikitext_docs(data_dir: &Path, limit: Option<usize>) -> Result<Vec<WikitextDoc>, EvalError> {
    if limit == Some(0) {
        let path = Task::from_name("wikitext")?.data_path(data_dir);
        return Err(EvalError::nothing("wikitext", &path, no_records_problem(limit, "pages")));
    }
    let pages = wikitext_pages(&load_wikitext_rows(data_dir)?);
    Ok(pages
        .into_iter()
        .take(limit.unwrap_or(usize::MAX))
        .enumerate()
        .map(|(doc_id, page)| WikitextDoc {
            doc_id,
            text: wikitext_detokenize(&page),
            words: py_split_whitespace_count(&page),
            bytes: page.len(),
            page,
        })
        .collect())
}

/// One rolling window: `(input tokens, predicted tokens)`.
pub type Window = (Vec<u32>, Vec<u32>);

/// lm-eval's `get_rolling_token_windows`: `(input, predicted)` pairs covering every token once.
/// The first window reads `[prefix_token] + tokens[..m-1]` and predicts `tokens[..m]`,
/// `m = min(max_seq_len, n)`; each later one predicts up to `max_seq_len - context_len + 1` new
/// tokens from the `max_seq_len` tokens before them.
pub fn rolling_token_windows(
    tokens: &[u32],
    prefix_token: u32,
    max_seq_len: usize,
    context_len: usize,
) -> Result<Vec<Window>, EvalError> {
    if !(1 <= context_len && context_len <= max_seq_len) {
        return Err(EvalError::InvalidArgument(format!(
            "rolling windows need 1 <= context_len ({context_len}) <= max_seq_len ({max_seq_len})"
        )));
    }
    let n = tokens.len();
    let mut windows = Vec::new();
    if n == 0 {
        return Ok(windows);
    }
    let pred_len = max_seq_len - context_len + 1;
    let first = max_seq_len.min(n);
    let mut input = vec![prefix_token];
    input.extend_from_slice(&tokens[..first - 1]);
    windows.push((input, tokens[..first].to_vec()));
    let mut predicted = first;
    while predicted < n {
        let k = (n - predicted).min(pred_len);
        let end = predicted + k;
        // end >= max_seq_len + 1 here, so the start is never negative.
        windows.push((tokens[end - max_seq_len - 1..end - 1].to_vec(), tokens[end - k..end].to_vec()));
        predicted += k;
    }
    Ok(windows)
}

/// lm-eval's `make_disjoint_window`: drops the input tokens that the prediction covers, so that
/// `context ++ predicted[..len-1]` is the original input.
pub fn make_disjoint_window((input, pred): Window) -> TokenRequest {
    let keep = input.len() + 1 - pred.len();
    TokenRequest { context: input[..keep].to_vec(), continuation: pred }
}

/// The requests of one `wikitext` document, as lm-eval's `loglikelihood_rolling`
/// (`context_len = 1`): `tokens = enc(doc.text)` with no BOS, `prefix_token` = the tokenizer's
/// BOS id if it has one, else its EOS id (lm-eval's `prefix_token_id`), `max_length` = the model's.
pub fn rolling_requests(
    encoder: &impl TextEncoder,
    text: &str,
    prefix_token: u32,
    max_length: usize,
) -> Result<Vec<TokenRequest>, EvalError> {
    let tokens = encoder.encode(text)?;
    Ok(rolling_token_windows(&tokens, prefix_token, max_length, 1)?.into_iter().map(make_disjoint_window).collect())
}

/// A document's log-likelihood: the naive left-to-right sum of its window log-likelihoods.
pub fn doc_loglikelihood(window_lls: &[f64]) -> f64 {
    window_lls.iter().fold(0.0, |a, x| a + x)
}

/// lm-eval's `wikitext` metrics from the per-document log-likelihoods (`doc_lls[i]` for
/// `docs[i]`): `word_perplexity = exp(-Σll/Σwords)`, `byte_perplexity = exp(-Σll/Σbytes)`,
/// `bits_per_byte = (-Σll/Σbytes)/ln 2`; no stderr. No documents, a NaN or infinite log-likelihood, or no bytes
/// at all is an error, never a perplexity.
pub fn aggregate_wikitext(docs: &[WikitextDoc], doc_lls: &[f64]) -> Result<Vec<MetricValue>, EvalError> {
    if docs.is_empty() {
        return Err(EvalError::InvalidArgument(
            "wikitext: no documents to aggregate (a perplexity needs at least one page)".into(),
        ));
    }
    if docs.len() != doc_lls.len() {
        return Err(EvalError::InvalidArgument(format!(
            "wikitext: {} log-likelihoods for {} documents (expected one per document)",
            doc_lls.len(),
            docs.len()
        )));
    }
    for (d, &ll) in docs.iter().zip(doc_lls) {
        EvalError::check_finite("wikitext", || format!("doc {}", d.doc_id), ll)?;
    }
    let ll = doc_loglikelihood(doc_lls);
    let words = docs.iter().fold(0.0, |a, d| a + d.words as f64);
    let bytes = docs.iter().fold(0.0, |a, d| a + d.bytes as f64);
    if bytes == 0.0 {
        return Err(EvalError::InvalidArgument(format!(
            "wikitext: the {} documents hold no bytes of text (a perplexity needs some text)",
            docs.len()
        )));
    }
    let value = |metric, value| MetricValue { metric, value, stderr: None };
    Ok(vec![
        value(Metric::WordPerplexity, (-(ll / words)).exp()),
        value(Metric::BytePerplexity, (-(ll / bytes)).exp()),
        value(Metric::BitsPerByte, -(ll / bytes) / std::f64::consts::LN_2),
    ])
}

/// The `wikitext2-128` text: every row of the test split joined with "\n\n" (what LLM-Pruner's
/// `get_wikitext2` tokenises).
pub fn wikitext2_text(data_dir: &Path) -> Result<String, EvalError> {
    Ok(load_wikitext_rows(data_dir)?.join("\n\n"))
}

/// LLM-Pruner/SLM windows: `tokens` cut into `len / seq_len` non-overlapping windows (the
/// remainder dropped). Each window's first token is only read; the other `seq_len - 1` are
/// scored: `context = [w0]`, `continuation = w[1..]`.
pub fn fixed_windows(tokens: &[u32], seq_len: usize) -> Result<Vec<TokenRequest>, EvalError> {
    if seq_len < 2 {
        return Err(EvalError::InvalidArgument(format!("perplexity windows need at least 2 tokens, got {seq_len}")));
    }
    Ok(tokens
        .chunks_exact(seq_len)
        .map(|w| TokenRequest { context: vec![w[0]], continuation: w[1..].to_vec() })
        .collect())
}

/// Windows of `seq_len` tokens that each start with `bos`: context `[bos]`, continuation the next `seq_len - 1`
/// text tokens (every text token scored once).
pub fn bos_windows(text: &[u32], bos: u32, seq_len: usize) -> Result<Vec<TokenRequest>, EvalError> {
    if seq_len < 2 {
        return Err(EvalError::InvalidArgument(format!("perplexity windows need at least 2 tokens, got {seq_len}")));
    }
    Ok(text.chunks_exact(seq_len - 1).map(|w| TokenRequest { context: vec![bos], continuation: w.to_vec() }).collect())
}

/// The `wikitext2-128` requests: [`wikitext2_text`] encoded once, cut by [`fixed_windows`], the first `limit`
/// kept. For a model that starts every input with BOS ([`TextEncoder::bos`], Gemma) each window is that BOS and
/// the next `seq_len - 1` text tokens, all of them scored (without it such a model sees most windows start
/// mid-text with no BOS, and its perplexity says more about that than about the text); the other models' windows
/// are unchanged. A limit of 0, or text too short for one window, is an error naming the data file.
pub fn wikitext2_windows(
    encoder: &impl TextEncoder,
    data_dir: &Path,
    seq_len: usize,
    limit: Option<usize>,
) -> Result<Vec<TokenRequest>, EvalError> {
    const TASK: &str = "wikitext2-128";
    let path = Task::from_name(TASK)?.data_path(data_dir);
    if limit == Some(0) {
        return Err(EvalError::nothing(TASK, &path, no_records_problem(limit, "windows")));
    }
    let tokens = encoder.encode(&wikitext2_text(data_dir)?)?;
    let mut windows = match encoder.bos() {
        Some(bos) => bos_windows(tokens.strip_prefix(&[bos]).unwrap_or(&tokens), bos, seq_len)?,
        None => fixed_windows(&tokens, seq_len)?,
    };
    if windows.is_empty() {
        let problem =
            format!("the text tokenises to {} tokens, fewer than one {seq_len}-token window needs", tokens.len());
        return Err(EvalError::nothing(TASK, &path, problem));
    }
    if let Some(n) = limit {
        windows.truncate(n);
    }
    Ok(windows)
}

/// `exp` of the mean token negative log-likelihood over all scored tokens of the windows
/// (`lls[i]` is the summed log-likelihood of `windows[i]`). No windows, or a NaN or infinite log-likelihood,
/// is an error.
pub fn window_perplexity(windows: &[TokenRequest], lls: &[f64]) -> Result<MetricValue, EvalError> {
    if windows.is_empty() {
        return Err(EvalError::InvalidArgument(
            "wikitext2-128: no windows to score (a perplexity needs at least one window)".into(),
        ));
    }
    if windows.len() != lls.len() {
        return Err(EvalError::InvalidArgument(format!(
            "wikitext2-128: {} log-likelihoods for {} windows (expected one per window)",
            lls.len(),
            windows.len()
        )));
    }
    for (i, &ll) in lls.iter().enumerate() {
        EvalError::check_finite("wikitext2-128", || format!("window {i}"), ll)?;
    }
    let tokens = windows.iter().fold(0.0, |a, w| a + w.continuation.len() as f64);
    let ll = doc_loglikelihood(lls);
    Ok(MetricValue { metric: Metric::Perplexity, value: (-ll / tokens).exp(), stderr: None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::tests::repo_data_dir;

    fn w(a: &[u32], b: &[u32]) -> Window {
        (a.to_vec(), b.to_vec())
    }

    /// Expected values from lm-eval's `get_rolling_token_windows` / `make_disjoint_window` run on
    /// `list(range(1, 11))` with prefix token 0.
    #[test]
    fn rolling_windows_hand_worked() {
        let t: Vec<u32> = (1..=10).collect();
        assert_eq!(
            rolling_token_windows(&t, 0, 4, 1).unwrap(),
            vec![w(&[0, 1, 2, 3], &[1, 2, 3, 4]), w(&[4, 5, 6, 7], &[5, 6, 7, 8]), w(&[6, 7, 8, 9], &[9, 10])]
        );
        let disjoint: Vec<TokenRequest> =
            rolling_token_windows(&t, 0, 4, 1).unwrap().into_iter().map(make_disjoint_window).collect();
        let pairs: Vec<_> = disjoint.iter().map(|r| (r.context.clone(), r.continuation.clone())).collect();
        assert_eq!(pairs, vec![w(&[0], &[1, 2, 3, 4]), w(&[4], &[5, 6, 7, 8]), w(&[6, 7, 8], &[9, 10])]);
        // The model input of each disjoint window is the original window input.
        assert_eq!(disjoint[2].input(), vec![6, 7, 8, 9]);
        let pairs: Vec<_> = rolling_token_windows(&t, 0, 4, 2)
            .unwrap()
            .into_iter()
            .map(make_disjoint_window)
            .map(|r| (r.context, r.continuation))
            .collect();
        assert_eq!(pairs, vec![w(&[0], &[1, 2, 3, 4]), w(&[3, 4], &[5, 6, 7]), w(&[6, 7], &[8, 9, 10])]);
        // context_len == max_seq_len: one new token per window.
        let ws = rolling_token_windows(&t, 0, 4, 4).unwrap();
        assert_eq!(ws.len(), 7);
        assert_eq!(ws[1], w(&[1, 2, 3, 4], &[5]));
        assert_eq!(ws[6], w(&[6, 7, 8, 9], &[10]));
        // Short and exact fits: one window.
        assert_eq!(rolling_token_windows(&t, 0, 11, 1).unwrap(), vec![w(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], &t)]);
        assert_eq!(rolling_token_windows(&t, 0, 10, 1).unwrap(), vec![w(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], &t)]);
        assert_eq!(rolling_token_windows(&[1, 2, 3], 0, 4, 1).unwrap(), vec![w(&[0, 1, 2], &[1, 2, 3])]);
        // max_seq_len 1: every token predicted from its predecessor.
        let ws = rolling_token_windows(&t, 0, 1, 1).unwrap();
        assert_eq!((ws.len(), ws[0].clone(), ws[9].clone()), (10, w(&[0], &[1]), w(&[9], &[10])));
        assert!(rolling_token_windows(&[], 0, 4, 1).unwrap().is_empty());
        assert!(rolling_token_windows(&t, 0, 4, 0).is_err());
        assert!(rolling_token_windows(&t, 0, 4, 5).is_err());
    }

    #[test]
    fn rolling_windows_cover_every_token_once() {
        let t: Vec<u32> = (1..=1000).collect();
        for (l, c) in [(7, 1), (128, 1), (100, 30), (999, 1), (1000, 1), (1001, 1)] {
            let ws = rolling_token_windows(&t, 0, l, c).unwrap();
            let predicted: Vec<u32> = ws.iter().flat_map(|(_, p)| p.clone()).collect();
            assert_eq!(predicted, t, "L={l} c={c}");
            for (input, pred) in &ws {
                assert_eq!(input.len(), l.min(t.len()));
                assert!(pred.len() <= input.len());
            }
        }
    }

    #[test]
    fn fixed_windows_and_perplexity() {
        let t: Vec<u32> = (0..10).collect();
        let ws = fixed_windows(&t, 4).unwrap();
        assert_eq!(ws.len(), 2);
        assert_eq!((ws[0].context.clone(), ws[0].continuation.clone()), (vec![0], vec![1, 2, 3]));
        assert_eq!(ws[1].input(), vec![4, 5, 6]);
        // Total ll -6 over 6 scored tokens → exp(1).
        let p = window_perplexity(&ws, &[-2.0, -4.0]).unwrap();
        assert!((p.value - std::f64::consts::E).abs() < 1e-12);
        assert!(fixed_windows(&t, 1).is_err());
        assert_eq!(
            window_perplexity(&ws, &[-1.0]).unwrap_err().to_string(),
            "invalid argument: wikitext2-128: 1 log-likelihoods for 2 windows (expected one per window)"
        );
        assert_eq!(
            window_perplexity(&[], &[]).unwrap_err().to_string(),
            "invalid argument: wikitext2-128: no windows to score (a perplexity needs at least one window)"
        );
        // With a BOS: each window is [bos] + 3 text tokens, all scored.
        let bw = bos_windows(&t, 99, 4).unwrap();
        assert_eq!(bw.len(), 3);
        assert_eq!((bw[1].context.clone(), bw[1].continuation.clone()), (vec![99], vec![3, 4, 5]));
        // Too few tokens for one window: no windows (the data-file error is `wikitext2_windows`'s).
        assert!(fixed_windows(&t[..3], 4).unwrap().is_empty());
        for bad in [f64::NAN, f64::NEG_INFINITY] {
            let e = window_perplexity(&ws, &[-1.0, bad]).unwrap_err().to_string();
            assert_eq!(
                e,
                format!(
                    "task `wikitext2-128`, window 1: the log-likelihood is {bad}, not a finite number; \
                     refusing to average it"
                )
            );
        }
    }

    #[test]
    fn wikitext_aggregation() {
        let doc = |words, bytes| WikitextDoc { doc_id: 0, page: String::new(), text: String::new(), words, bytes };
        let docs = [doc(3, 10), doc(1, 10)];
        let m = aggregate_wikitext(&docs, &[-5.0, -3.0]).unwrap();
        assert_eq!(m[0].metric, Metric::WordPerplexity);
        assert!((m[0].value - 2f64.exp()).abs() < 1e-12); // 8 / 4 words
        assert!((m[1].value - 0.4f64.exp()).abs() < 1e-12); // 8 / 20 bytes
        assert!((m[2].value - 0.4 / std::f64::consts::LN_2).abs() < 1e-12);
        assert!(m.iter().all(|v| v.stderr.is_none()));
        assert_eq!(
            aggregate_wikitext(&docs, &[-1.0]).unwrap_err().to_string(),
            "invalid argument: wikitext: 1 log-likelihoods for 2 documents (expected one per document)"
        );
        assert_eq!(
            aggregate_wikitext(&[], &[]).unwrap_err().to_string(),
            "invalid argument: wikitext: no documents to aggregate (a perplexity needs at least one page)"
        );
        let e = aggregate_wikitext(&docs, &[-1.0, f64::NAN]).unwrap_err().to_string();
        assert!(e.starts_with("task `wikitext`, doc 0: the log-likelihood is NaN"), "{e}");
        // An empty page scores 0 and has 0 bytes: an error, never a perplexity of 1.0.
        let e = aggregate_wikitext(&[doc(1, 0)], &[0.0]).unwrap_err().to_string();
        assert!(e.contains("hold no bytes of text"), "{e}");
    }

    #[test]
    fn page_reconstruction() {
        let rows: Vec<String> = ["", " = A = \n", "", " a b \n", " = = Sub = = \n", "", " = B = \n", " c\n"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // Raw lines: " ", " = A = ", " ", " a b ", " = = Sub = = ", " ", " = B = ", " c", "".
        // The first heading closes a whitespace-only page (dropped); the subheading does not split.
        assert_eq!(
            wikitext_pages(&rows),
            vec![" = A = \n \n a b \n = = Sub = = \n ".to_string(), " = B = \n c\n".to_string()]
        );
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    /// Sums from the spec (62 pages, Σbytes = 1,290,527, Σwords = 241,335); detokenised text
    /// checked against lm-eval's Python `wikitext_detokenizer` run on the same pages
    /// (total 1,238,432 chars, zlib.crc32 of the concatenation 632367840).
    #[test]
    fn wikitext_test_split_matches_lm_eval() {
        let docs = load_wikitext_docs(&repo_data_dir(), None).unwrap();
        assert_eq!(docs.len(), 62);
        assert_eq!(docs.iter().map(|d| d.bytes).sum::<usize>(), 1_290_527);
        assert_eq!(docs.iter().map(|d| d.words).sum::<usize>(), 241_335);
        assert!(docs[0].text.starts_with(" = Robert Boulter =\n\nRobert Boulter is an English film, television"));
        assert!(docs[61].page.ends_with(" \n \n"));
        assert_eq!(docs.iter().map(|d| d.text.chars().count()).sum::<usize>(), 1_238_432);
        let all: String = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(crc32(all.as_bytes()), 632_367_840);
        assert_eq!(load_wikitext_docs(&repo_data_dir(), Some(3)).unwrap().len(), 3);
        let text = wikitext2_text(&repo_data_dir()).unwrap();
        assert_eq!(text.chars().count(), 1_294_336);
        assert_eq!(crc32(text.as_bytes()), 2_771_779_519);
    }
}
