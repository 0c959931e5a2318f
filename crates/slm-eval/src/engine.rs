//! The scoring engine: log-likelihoods of [`TokenRequest`]s under a [`Model`].
//!
//! Requests with the same context tokens are packed into one sequence ([`PackedSequence`]): the context once,
//! then each continuation's input tokens as a branch that attends to the context and to itself, at the positions
//! it would have alone. Same maths as scoring each request alone, with the shared context computed once. Packed
//! sequences are sorted longest first (as lm-eval sorts requests) and batched; logits are computed only at the
//! positions whose next token is scored.

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use slm_model::{Batch, Mode, Model, PackedSequence};

use crate::error::EvalError;
use crate::metrics::RequestResult;
use crate::request::{TextEncoder, TokenRequest};

impl TextEncoder for slm_model::Tokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, EvalError> {
        slm_model::Tokenizer::encode(self, text).map_err(|e| EvalError::Tokenizer(Box::new(e)))
    }
}

/// A model's tokenizer as lm-eval's HF model encodes every string: with the BOS token first for Gemma models
/// (lm-eval sets `add_bos_token` for them, and their tokenizer prepends `<bos>`), bare ids otherwise (SmolLM,
/// Llama, Qwen: lm-eval encodes without special tokens).
#[derive(Debug, Clone, Copy)]
pub struct LmEvalEncoder<'a> {
    pub tokenizer: &'a slm_model::Tokenizer,
    pub bos: Option<u32>,
}

impl<'a> LmEvalEncoder<'a> {
    pub fn for_model(model: &'a Model) -> Result<Self, EvalError> {
        let tokenizer = model.tokenizer().map_err(EvalError::Model)?;
        let bos = match model.spec.arch.family {
            slm_model::Family::Gemma3 => Some(model.spec.bos_token_id.ok_or_else(|| {
                EvalError::InvalidArgument(
                    "a Gemma model without `bos_token_id`: lm-eval starts every request with it".into(),
                )
            })?),
            _ => None,
        };
        Ok(LmEvalEncoder { tokenizer, bos })
    }
}

impl TextEncoder for LmEvalEncoder<'_> {
    fn encode(&self, text: &str) -> Result<Vec<u32>, EvalError> {
        let ids = TextEncoder::encode(self.tokenizer, text)?;
        Ok(match self.bos {
            Some(bos) => std::iter::once(bos).chain(ids).collect(),
            None => ids,
        })
    }

    fn bos(&self) -> Option<u32> {
        self.bos
    }
}

/// Upper bound on `batch × heads × T²` (the attention score elements of one layer) per forward pass, so that
/// long sequences (wikitext's rolling windows) are batched in fewer rows. One sequence always fits.
const ATTENTION_BUDGET: usize = 1 << 28;

/// Scores token requests with one model.
pub struct Engine<'a> {
    model: &'a Model,
    batch_size: usize,
    share_context: bool,
    stats: std::cell::Cell<EngineStats>,
}

/// Work done by an [`Engine`], for throughput reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Real (non-padding) tokens run through the layers.
    pub tokens: u64,
    /// Positions whose logits were computed.
    pub logit_rows: u64,
}

impl EngineStats {
    /// Matmul FLOPs of that work: `2 · layer parameters` per token plus `2 · hidden · vocab` per logit row
    /// (attention scores and padding not counted).
    pub fn useful_flops(&self, spec: &slm_model::ModelSpec) -> f64 {
        let layer_params: usize = spec.layers.iter().map(|l| spec.layer_parameters(l)).sum();
        2.0 * layer_params as f64 * self.tokens as f64
            + 2.0 * (spec.hidden_size * spec.vocab_size) as f64 * self.logit_rows as f64
    }
}

/// One packed sequence: its context and the requests whose continuations are its branches.
struct Group<'r> {
    context: &'r [u32],
    members: Vec<usize>,
    len: usize,
}

impl<'a> Engine<'a> {
    /// `batch_size`: packed sequences per forward pass (each holds one context and its continuations).
    pub fn new(model: &'a Model, batch_size: usize) -> Result<Self, EvalError> {
        if batch_size == 0 {
            return Err(EvalError::InvalidArgument("batch size must be at least 1".into()));
        }
        Ok(Engine { model, batch_size, share_context: true, stats: Default::default() })
    }

    /// With `false`, every request is its own sequence (the reference the shared-context path is tested against).
    pub fn share_context(mut self, share: bool) -> Self {
        self.share_context = share;
        self
    }

    /// Work done so far.
    pub fn stats(&self) -> EngineStats {
        self.stats.get()
    }

    /// Results in request order. `progress(n)` is called after each forward pass with the number of requests it
    /// finished.
    pub fn score(
        &self,
        requests: &[TokenRequest],
        progress: &mut dyn FnMut(u64),
    ) -> Result<Vec<RequestResult>, EvalError> {
        for (i, r) in requests.iter().enumerate() {
            let empty = match (r.context.is_empty(), r.continuation.is_empty()) {
                (true, _) => "context (the model needs a token to predict from)",
                (_, true) => "continuation (no tokens to score)",
                _ => continue,
            };
            return Err(EvalError::InvalidArgument(format!("request {i} of {}: empty {empty}", requests.len())));
        }
        let mut groups = self.group(requests);
        // Longest first; ties keep first-occurrence order, so the schedule is deterministic.
        groups.sort_by_key(|g| std::cmp::Reverse(g.len));
        let heads = self.model.spec.layers.iter().map(|l| l.num_attention_heads).max().unwrap_or(1);
        let mut results: Vec<Option<RequestResult>> = vec![None; requests.len()];
        let mut start = 0;
        while start < groups.len() {
            // Sorted longest first, so the first group of a batch sets its padded length.
            let t = groups[start].len;
            let fit = (ATTENTION_BUDGET / (heads * t * t)).max(1);
            let end = (start + self.batch_size.min(fit)).min(groups.len());
            self.score_batch(requests, &groups[start..end], &mut results)?;
            progress(groups[start..end].iter().map(|g| g.members.len() as u64).sum());
            start = end;
        }
        Ok(results.into_iter().map(|r| r.expect("every request is in one group")).collect())
    }

    /// Requests with equal context tokens, in first-occurrence order; a group grows while its packed length
    /// stays within the model's context length (or the request's own length, if that is longer).
    fn group<'r>(&self, requests: &'r [TokenRequest]) -> Vec<Group<'r>> {
        let cap = self.model.spec.max_position_embeddings;
        let mut groups: Vec<Group<'r>> = Vec::new();
        let mut open: std::collections::HashMap<&'r [u32], usize> = std::collections::HashMap::new();
        for (i, r) in requests.iter().enumerate() {
            let branch = r.continuation.len() - 1;
            if self.share_context {
                if let Some(&g) = open.get(r.context.as_slice()) {
                    if groups[g].len + branch <= cap {
                        groups[g].members.push(i);
                        groups[g].len += branch;
                        continue;
                    }
                }
                open.insert(&r.context, groups.len());
            }
            groups.push(Group { context: &r.context, members: vec![i], len: r.context.len() + branch });
        }
        groups
    }

    fn score_batch(
        &self,
        requests: &[TokenRequest],
        groups: &[Group],
        results: &mut [Option<RequestResult>],
    ) -> Result<(), EvalError> {
        let packs: Vec<PackedSequence> = groups
            .iter()
            .map(|g| PackedSequence {
                prefix: g.context.to_vec(),
                branches: g
                    .members
                    .iter()
                    .map(|&i| {
                        let c = &requests[i].continuation;
                        c[..c.len() - 1].to_vec()
                    })
                    .collect(),
            })
            .collect();
        // The logit at packed index of token `ctx - 1 + j` predicts continuation token j.
        let mut positions = Vec::with_capacity(packs.len());
        let mut targets = Vec::new();
        for (p, g) in packs.iter().zip(groups) {
            let mut pos = Vec::new();
            for (b, &i) in g.members.iter().enumerate() {
                let cont = &requests[i].continuation;
                for (j, &tok) in cont.iter().enumerate() {
                    pos.push(p.index_of(b, p.prefix.len() - 1 + j));
                    targets.push(tok);
                }
            }
            positions.push(pos);
        }
        let batch = Batch::packed(&self.model.spec, &packs, &self.model.device)?;
        let out = self.model.forward_batch(&batch, &positions, false, Mode::Inference)?;
        let logits = out.logits.expect("every request has a continuation token");
        let n = targets.len();
        let mut st = self.stats.get();
        st.tokens += packs.iter().map(|p| p.len() as u64).sum::<u64>();
        st.logit_rows += n as u64;
        self.stats.set(st);
        let scored = score_rows(&logits, &targets)?;
        let mut row = 0;
        for g in groups {
            for &i in &g.members {
                let k = requests[i].continuation.len();
                let loglikelihood = scored[row..row + k].iter().fold(0.0f64, |a, s| a + s.log_prob as f64);
                let is_greedy = scored[row..row + k].iter().all(|s| s.greedy);
                results[i] = Some(RequestResult { loglikelihood, is_greedy });
                row += k;
            }
        }
        Ok(())
    }
}

/// One scored logit row: the log-softmax at its target and whether the target is the row's argmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredRow {
    pub log_prob: f32,
    /// The target is the first maximum of the row (torch's `argmax`, as lm-eval's `is_greedy` uses).
    pub greedy: bool,
}

/// Scores each row of `logits: [n, V]` against `targets[r]`: `log_softmax(row)[target]` as
/// `(x_t − max) − ln Σ exp(x − max)` (the sum in f64) and whether the target is the first maximum. One parallel
/// pass per row over the logits in place: no `[n, V]` temporaries (candle's `log_softmax` makes three, 400 MB each
/// for 2,000 rows of a 49,152-token vocabulary, plus passes for `gather` and `argmax`).
pub fn score_rows(logits: &Tensor, targets: &[u32]) -> Result<Vec<ScoredRow>, EvalError> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        return Err(EvalError::InvalidArgument(format!("{} targets for {n} logit rows", targets.len())));
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
        return Err(EvalError::InvalidArgument(format!("target token {t} is outside the vocabulary ({v})")));
    }
    let score = |row: &[f32], t: usize| {
        let (mut max, mut first) = (f32::NEG_INFINITY, 0);
        for (j, &x) in row.iter().enumerate() {
            if x > max {
                (max, first) = (x, j);
            }
        }
        let sum: f64 = row.iter().map(|&x| (x - max).exp() as f64).sum();
        ScoredRow { log_prob: (row[t] - max) - sum.ln() as f32, greedy: first == t }
    };
    let run = |all: &[f32]| -> Vec<ScoredRow> {
        all.par_chunks(v).zip(targets.par_iter()).map(|(row, &t)| score(row, t as usize)).collect()
    };
    let logits = logits.to_dtype(DType::F32)?;
    if let (candle_core::Device::Cpu, true) = (logits.device(), logits.is_contiguous()) {
        let (storage, layout) = logits.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            let all = cpu.as_slice::<f32>()?;
            return Ok(run(&all[layout.start_offset()..layout.start_offset() + n * v]));
        }
    }
    Ok(run(&logits.flatten_all()?.to_vec1::<f32>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_rows_equals_log_softmax_gather_and_first_argmax() {
        // A hand-worked row: logits [0, ln 3, 0] → softmax [1/5, 3/5, 1/5].
        let l3 = 3f32.ln();
        let t = Tensor::new(&[[0.0f32, l3, 0.0], [2.0, 2.0, 1.0]], &candle_core::Device::Cpu).unwrap();
        let s = score_rows(&t, &[1, 1]).unwrap();
        assert!((s[0].log_prob - (0.6f32).ln()).abs() < 1e-6 && s[0].greedy);
        // A tie: the first maximum is the argmax, so target 1 is not greedy and target 0 is.
        assert!(!s[1].greedy);
        assert!(score_rows(&t, &[0, 0]).unwrap()[1].greedy);
        // Against candle's log_softmax + gather + argmax on pseudo-random rows (a strided view too).
        let (n, v) = (7, 1000);
        let vals: Vec<f32> = (0..n * v).map(|i| ((i as f32 * 0.7311).sin() * 9.0) + (i % 13) as f32 * 0.1).collect();
        let logits = Tensor::from_vec(vals, (n, v), &candle_core::Device::Cpu).unwrap();
        let targets: Vec<u32> = (0..n as u32).map(|r| (r * 131) % v as u32).collect();
        let lp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
        let idx = Tensor::new(targets.as_slice(), &candle_core::Device::Cpu).unwrap().reshape((n, 1)).unwrap();
        let want: Vec<f32> = lp.gather(&idx, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let arg: Vec<u32> = logits.argmax(candle_core::D::Minus1).unwrap().to_vec1().unwrap();
        let mut targets2 = targets.clone();
        targets2[3] = arg[3];
        let strided = logits.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!strided.is_contiguous());
        for (tg, view) in [(&targets, logits.clone()), (&targets2, strided)] {
            let got = score_rows(&view, tg).unwrap();
            for r in 0..n {
                if tg[r] == targets[r] {
                    assert!((got[r].log_prob - want[r]).abs() < 1e-5, "row {r}: {} vs {}", got[r].log_prob, want[r]);
                }
                assert_eq!(got[r].greedy, arg[r] == tg[r], "row {r}");
            }
            assert!(got[3].greedy == (tg[3] == arg[3]));
        }
        assert!(score_rows(&logits, &targets[..3]).is_err());
        assert!(score_rows(&logits, &[5000; 7]).is_err());
    }
}
