//! The scoring engine: log-likelihoods of [`TokenRequest`]s under a [`Model`].
//!
//! Requests with the same context tokens are packed into one sequence ([`PackedSequence`]): the context once,
//! then each continuation's input tokens as a branch that attends to the context and to itself, at the positions
//! it would have alone. Same maths as scoring each request alone, with the shared context computed once. Packed
//! sequences are sorted longest first (as lm-eval sorts requests) and batched; logits are computed only at the
//! positions whose next token is scored.

use candle_core::{DType, Tensor, D};
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
        let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let n = targets.len();
        let mut st = self.stats.get();
        st.tokens += packs.iter().map(|p| p.len() as u64).sum::<u64>();
        st.logit_rows += n as u64;
        self.stats.set(st);
        let idx = Tensor::from_vec(targets.clone(), (n, 1), logp.device())?;
        let token_lp: Vec<f32> = logp.gather(&idx, 1)?.flatten_all()?.to_vec1()?;
        let greedy: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let mut row = 0;
        for g in groups {
            for &i in &g.members {
                let k = requests[i].continuation.len();
                let lp = &token_lp[row..row + k];
                let loglikelihood = lp.iter().fold(0.0f64, |a, &x| a + x as f64);
                let is_greedy = (row..row + k).all(|r| greedy[r] == targets[r]);
                results[i] = Some(RequestResult { loglikelihood, is_greedy });
                row += k;
            }
        }
        Ok(())
    }
}
