//! Scoring candidate models on calibration windows against the dense model, incrementally.
//!
//! A candidate is the dense model with some windows merged and some layers removed. Every layer below the lowest
//! changed one computes exactly what the dense model computes, so the dense hidden states are cached once and a
//! candidate runs only from its lowest changed layer upward. `layer_forwards` counts the layers actually run;
//! `full_layer_forwards` counts what recomputing every candidate from the embeddings would have cost.

use std::collections::HashMap;

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use slm_model::forward::{decoder_layer, LayerCtx};
use slm_model::{Batch, LayerSpec, LayerWeights, Mode, Model};

use crate::error::{DepthError, Result};
use crate::merge::{merge_window, MergeOp};

/// Positions whose logits are computed at a time (KL, NLL): `LM_CHUNK × V` log-probabilities per chunk (24 MiB
/// of f32 each at V = 49,152; the KL holds about five such tensors at once).
pub const LM_CHUNK: usize = 128;

/// Positions scored at a time when the logits are streamed by vocabulary chunk (a narrower stored head):
/// dense and candidate rows stacked, `2 × STREAM_ROWS × HEAD_CHUNK` f32 logits held (128 MiB).
const STREAM_ROWS: usize = 2048;

/// A running log-sum-exp of one row of logits, chunk by chunk, in f64.
#[derive(Debug, Clone, Copy)]
struct Lse {
    max: f64,
    sum: f64,
}

impl Default for Lse {
    fn default() -> Self {
        Lse { max: f64::NEG_INFINITY, sum: 0.0 }
    }
}

impl Lse {
    /// Adds a chunk; returns the factor the earlier sum was rescaled by (for sums kept alongside).
    fn push(&mut self, x: &[f32]) -> f64 {
        let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let mut scale = 1.0;
        if m > self.max {
            scale = (self.max - m).exp();
            self.sum *= scale;
            self.max = m;
        }
        self.sum += x.iter().map(|&v| (v as f64 - self.max).exp()).sum::<f64>();
        scale
    }

    fn value(&self) -> f64 {
        self.max + self.sum.ln()
    }
}

/// One position's KL(p ‖ q) from its logits a (dense) and b (candidate), chunk by chunk:
/// `Σ p (a − b) − lse(a) + lse(b)` with `Σ p (a − b) = t / Σ exp(a − max)`.
#[derive(Debug, Clone, Copy, Default)]
struct KlRow {
    a: Lse,
    b: Lse,
    t: f64,
}

impl KlRow {
    fn push(&mut self, a: &[f32], b: &[f32]) {
        self.t *= self.a.push(a);
        self.b.push(b);
        let m = self.a.max;
        self.t += a.iter().zip(b).map(|(&x, &y)| (x as f64 - m).exp() * (x as f64 - y as f64)).sum::<f64>();
    }

    fn kl(&self) -> f64 {
        self.t / self.a.sum - self.a.value() + self.b.value()
    }
}

/// How similar a candidate's output is to the dense model's, in (−1, 1]; higher is more similar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    /// The reference: per window, the cosine between the flattened `[T, d]` final-norm outputs; mean over windows.
    Cosine,
    /// Mean over tokens of the cosine between final-norm output vectors.
    TokenCosine,
    /// `exp(−mean over tokens of KL(p_dense ‖ p_candidate))` of the next-token distributions.
    Kl,
    /// Local, on the dense model only: for each window, the mean over tokens of the cosine between the residual
    /// stream entering its lowest layer and leaving its highest (how little the window changes the stream, the
    /// multi-layer form of ShortGPT's block influence); the candidate's score is its worst window's.
    BlockCosine,
}

impl Criterion {
    pub const ALL: [Criterion; 4] = [Criterion::Cosine, Criterion::TokenCosine, Criterion::Kl, Criterion::BlockCosine];

    pub fn name(self) -> &'static str {
        match self {
            Criterion::Cosine => "cosine",
            Criterion::TokenCosine => "token-cosine",
            Criterion::Kl => "kl",
            Criterion::BlockCosine => "block-cosine",
        }
    }
}

impl std::str::FromStr for Criterion {
    type Err = DepthError;
    fn from_str(s: &str) -> Result<Self> {
        Criterion::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            DepthError::InvalidArgument(format!(
                "unknown criterion `{s}` (known: cosine, token-cosine, kl, block-cosine)"
            ))
        })
    }
}

/// A candidate: windows `[lo, hi]` merged with the calibration's operator, and layers removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Candidate {
    pub merges: Vec<[usize; 2]>,
    pub removed: Vec<usize>,
}

impl Candidate {
    pub fn merges(mut merges: Vec<[usize; 2]>) -> Self {
        merges.sort();
        Candidate { merges, removed: Vec::new() }
    }

    pub fn removed(mut removed: Vec<usize>) -> Self {
        removed.sort();
        Candidate { merges: Vec::new(), removed }
    }

    fn lowest_changed(&self, num_layers: usize) -> usize {
        self.merges.iter().map(|w| w[0]).chain(self.removed.iter().copied()).min().unwrap_or(num_layers)
    }

    /// Layers of the candidate.
    pub fn num_layers(&self, dense_layers: usize) -> usize {
        dense_layers - self.merges.iter().map(|[lo, hi]| hi - lo).sum::<usize>() - self.removed.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Quantity {
    Similarity(Criterion),
    Nll,
    WindowCost,
}

/// The dense model's calibration activations, and memoised candidate scores.
pub struct Calibration<'m> {
    model: &'m Model,
    batch: Batch,
    pub windows: Vec<Vec<u32>>,
    /// `L + 1` dense hidden states `[B, T, d]`: the embeddings, then each layer's output.
    pub dense_hidden: Vec<Tensor>,
    /// The dense model's final-norm output `[B, T, d]`.
    pub dense_final: Tensor,
    operator: MergeOp,
    merged: HashMap<(usize, usize), (LayerSpec, LayerWeights)>,
    merged_order: std::collections::VecDeque<(usize, usize)>,
    merged_bytes: usize,
    /// The cache's limit: a quarter of the model's layer bytes.
    merged_budget: usize,
    memo: HashMap<(Candidate, Quantity), f64>,
    /// Run every candidate from the embeddings (the reference loop's cost), for comparison and tests.
    pub incremental: bool,
    pub layer_forwards: u64,
    pub full_layer_forwards: u64,
    pub evaluations: u64,
}

impl<'m> Calibration<'m> {
    /// Runs the dense model once on `windows` (equal lengths) and caches its hidden states.
    pub fn new(model: &'m Model, windows: Vec<Vec<u32>>, operator: MergeOp) -> Result<Self> {
        if windows.is_empty() || windows.iter().any(|w| w.len() < 2 || w.len() != windows[0].len()) {
            return Err(DepthError::InvalidArgument(
                "calibration needs at least one window, all of the same length ≥ 2".into(),
            ));
        }
        let batch = Batch::new(&model.spec, &windows, &model.device)?;
        let none: Vec<Vec<usize>> = vec![Vec::new(); windows.len()];
        let out = model.forward_batch(&batch, &none, true, Mode::Inference)?;
        let dense_final = out.final_hidden.expect("hidden states were requested");
        let l = model.spec.num_layers() as u64;
        Ok(Calibration {
            model,
            batch,
            windows,
            dense_hidden: out.hidden,
            dense_final,
            operator,
            merged: HashMap::new(),
            merged_order: std::collections::VecDeque::new(),
            merged_bytes: 0,
            merged_budget: merged_budget(model),
            memo: HashMap::new(),
            incremental: true,
            layer_forwards: l,
            full_layer_forwards: l,
            evaluations: 0,
        })
    }

    pub fn model(&self) -> &Model {
        self.model
    }

    /// The calibration windows as a prepared batch.
    pub fn batch(&self) -> &Batch {
        &self.batch
    }

    pub fn operator(&self) -> MergeOp {
        self.operator
    }

    pub fn num_layers(&self) -> usize {
        self.model.spec.num_layers()
    }

    /// The fused layer of window `[lo, hi]`, from a cache of at most a quarter of the model's layer bytes
    /// (oldest out first): slm-dp fuses O(L × window) windows, which held at once would be several times the
    /// model. The cache changes speed only, never a result.
    fn merged_layer(&mut self, lo: usize, hi: usize) -> Result<(LayerSpec, LayerWeights)> {
        if let Some(hit) = self.merged.get(&(lo, hi)) {
            return Ok(hit.clone());
        }
        let m = &self.model;
        // Delete and top keep one layer of the window: only that one is read.
        let layer = match self.operator {
            MergeOp::Delete | MergeOp::Top => {
                let keep = if self.operator == MergeOp::Top { hi } else { lo };
                let spec = crate::merge::merged_spec(&m.spec.layers[lo..=hi], lo, self.operator)?;
                (spec, m.weights.layer(keep)?.into_owned())
            }
            _ => merge_window(&m.weights.load_layers(lo..hi + 1)?, &m.spec.layers[lo..=hi], lo, self.operator)?,
        };
        let bytes = layer_bytes(&layer.1);
        let budget = self.merged_budget;
        while self.merged_bytes + bytes > budget {
            let Some(old) = self.merged_order.pop_front() else { break };
            if let Some(gone) = self.merged.remove(&old) {
                self.merged_bytes -= layer_bytes(&gone.1);
            }
        }
        if bytes <= budget {
            self.merged.insert((lo, hi), layer.clone());
            self.merged_order.push_back((lo, hi));
            self.merged_bytes += bytes;
        }
        Ok(layer)
    }

    /// The candidate's final-norm output `[B, T, d]`.
    pub fn candidate_final(&mut self, c: &Candidate) -> Result<Tensor> {
        let l = self.num_layers();
        for &[lo, hi] in &c.merges {
            if lo >= hi || hi >= l {
                return Err(DepthError::InvalidArgument(format!(
                    "merge window [{lo}, {hi}] is not valid for {l} layers"
                )));
            }
        }
        let start = if self.incremental { c.lowest_changed(l) } else { 0 };
        let mut x = self.dense_hidden[start].clone();
        let ctx = LayerCtx::new(&self.model.spec, Mode::Inference);
        let mut i = start;
        while i < l {
            if let Some(&[lo, hi]) = c.merges.iter().find(|w| w[0] == i) {
                let (spec, w) = self.merged_layer(lo, hi)?;
                x = decoder_layer(&x, &w, &spec, &self.batch, &ctx.at(lo))?;
                self.layer_forwards += 1;
                i = hi + 1;
            } else {
                if !c.removed.contains(&i) {
                    let m = self.model;
                    x = decoder_layer(&x, &*m.weights.layer(i)?, &m.spec.layers[i], &self.batch, &ctx.at(i))?;
                    self.layer_forwards += 1;
                }
                i += 1;
            }
        }
        self.full_layer_forwards += c.num_layers(l) as u64;
        self.evaluations += 1;
        Ok(self.model.final_norm(&x, Mode::Inference)?)
    }

    /// The final-norm rows `[B·(T−1), d]` of the positions that predict a next token.
    fn predicting_rows(fin: &Tensor) -> Result<Tensor> {
        let (b, t, d) = fin.dims3()?;
        Ok(fin.narrow(1, 0, t - 1)?.reshape((b * (t - 1), d))?)
    }

    /// Log-probabilities `[n, V]` of `n` final-norm rows.
    fn log_probs(&self, rows: &Tensor) -> Result<Tensor> {
        let logits = self.model.head(rows)?;
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
    }

    /// Whether the LM head is held narrower than f32 (bf16 embeddings of a mapped model): the KL and NLL then
    /// stream the logits by vocabulary chunks, so the head is upcast once per candidate, not once per
    /// [`LM_CHUNK`] positions and side (eight times at 8 × 64 calibration tokens).
    fn narrow_head(&self) -> bool {
        self.model.weights.lm_head().dtype() != DType::F32
    }

    /// Mean over predicting positions of KL(p_dense ‖ p_candidate), the LM head applied [`LM_CHUNK`] rows at a
    /// time to both (no `[positions, V]` tensor is held: 1 GB for slm-dp's 40 × 128 calibration tokens).
    fn mean_kl(&self, fin: &Tensor) -> Result<f64> {
        let (dense, cand) = (Self::predicting_rows(&self.dense_final)?, Self::predicting_rows(fin)?);
        let n = dense.dim(0)?;
        if self.narrow_head() {
            return self.mean_kl_streamed(&dense, &cand);
        }
        let mut sum = 0f64;
        for start in (0..n).step_by(LM_CHUNK) {
            let len = LM_CHUNK.min(n - start);
            let p = self.log_probs(&dense.narrow(0, start, len)?)?;
            let q = self.log_probs(&cand.narrow(0, start, len)?)?;
            let kl = (p.exp()? * (p - &q)?)?.sum(D::Minus1)?.to_dtype(DType::F64)?.sum_all()?;
            sum += kl.to_scalar::<f64>()?;
        }
        Ok(sum / n as f64)
    }

    /// [`Calibration::mean_kl`] with the logits streamed by vocabulary chunk ([`Model::head_by_vocab_chunk`])
    /// for [`STREAM_ROWS`] positions at a time, dense and candidate rows stacked: an online log-sum-exp of each
    /// side and the running `Σ exp(a − max) (a − b)`, in f64.
    fn mean_kl_streamed(&self, dense: &Tensor, cand: &Tensor) -> Result<f64> {
        let n = dense.dim(0)?;
        let mut sum = 0f64;
        for start in (0..n).step_by(STREAM_ROWS) {
            let len = STREAM_ROWS.min(n - start);
            let rows = Tensor::cat(&[dense.narrow(0, start, len)?, cand.narrow(0, start, len)?], 0)?;
            let mut acc = vec![KlRow::default(); len];
            self.model.head_by_vocab_chunk(&rows, |_, logits| -> Result<()> {
                let c = logits.dim(1)?;
                let v: Vec<f32> = logits.flatten_all()?.to_vec1()?;
                for (r, row) in acc.iter_mut().enumerate() {
                    row.push(&v[r * c..(r + 1) * c], &v[(len + r) * c..(len + r + 1) * c]);
                }
                Ok(())
            })?;
            sum += acc.iter().map(KlRow::kl).sum::<f64>();
        }
        Ok(sum / n as f64)
    }

    /// The total next-token NLL of `rows` against `targets` with the logits streamed by vocabulary chunk (as
    /// [`Calibration::mean_kl_streamed`]): an online log-sum-exp per row minus the target's logit, in f64.
    fn nll_streamed(&self, rows: &Tensor, targets: &[u32]) -> Result<f64> {
        let mut total = 0f64;
        for start in (0..targets.len()).step_by(STREAM_ROWS) {
            let len = STREAM_ROWS.min(targets.len() - start);
            let tgt = &targets[start..start + len];
            let (mut lse, mut picked) = (vec![Lse::default(); len], vec![0f64; len]);
            self.model.head_by_vocab_chunk(&rows.narrow(0, start, len)?, |s, logits| -> Result<()> {
                let c = logits.dim(1)?;
                let v: Vec<f32> = logits.flatten_all()?.to_vec1()?;
                for (r, acc) in lse.iter_mut().enumerate() {
                    let row = &v[r * c..(r + 1) * c];
                    acc.push(row);
                    if (s..s + c).contains(&(tgt[r] as usize)) {
                        picked[r] = row[tgt[r] as usize - s] as f64;
                    }
                }
                Ok(())
            })?;
            total += lse.iter().zip(&picked).map(|(l, &p)| l.value() - p).sum::<f64>();
        }
        Ok(total)
    }

    /// The candidate's similarity to the dense model (memoised).
    pub fn similarity(&mut self, criterion: Criterion, c: &Candidate) -> Result<f64> {
        let key = (c.clone(), Quantity::Similarity(criterion));
        if let Some(&v) = self.memo.get(&key) {
            return Ok(v);
        }
        if criterion == Criterion::BlockCosine {
            let mut worst = 1.0f64;
            for &[lo, hi] in &c.merges {
                worst = worst.min(self.block_cosine(lo, hi)?);
            }
            for &i in &c.removed {
                worst = worst.min(self.block_cosine(i, i)?);
            }
            let worst = finite(worst, || format!("block cosine of {c:?}"))?;
            self.memo.insert(key, worst);
            return Ok(worst);
        }
        let fin = self.candidate_final(c)?;
        let v = match criterion {
            Criterion::BlockCosine => unreachable!("handled above"),
            Criterion::Cosine => {
                let (b, t, d) = fin.dims3()?;
                let a = self.dense_final.reshape((b, t * d))?.to_dtype(DType::F64)?;
                let f = fin.reshape((b, t * d))?.to_dtype(DType::F64)?;
                mean_row_cosine(&a, &f)?
            }
            Criterion::TokenCosine => mean_token_cosine(&self.dense_final, &fin)?,
            Criterion::Kl => (-self.mean_kl(&fin)?).exp(),
        };
        let v = finite(v, || format!("the {} similarity of candidate {c:?}", criterion.name()))?;
        self.memo.insert(key, v);
        Ok(v)
    }

    /// The local cost of fusing the window `[lo, hi]` with the calibration's operator: 1 − mean over tokens of
    /// cos(the fused layer's output on the dense stream entering `lo`, the dense stream leaving `hi`). It is the
    /// window form of ShortGPT's block influence: for `delete` on `[i − 1, i]` it is exactly the block influence of
    /// layer `i`. `delete` needs no forward pass (its kept layer `lo` reproduces the dense stream after `lo`);
    /// other operators run the fused layer once. Memoised per window.
    pub fn window_cost(&mut self, lo: usize, hi: usize) -> Result<f64> {
        let l = self.num_layers();
        if lo >= hi || hi >= l {
            return Err(DepthError::InvalidArgument(format!("merge window [{lo}, {hi}] is not valid for {l} layers")));
        }
        let key = (Candidate::merges(vec![[lo, hi]]), Quantity::WindowCost);
        if let Some(&v) = self.memo.get(&key) {
            return Ok(v);
        }
        let out = if self.operator == MergeOp::Delete {
            self.dense_hidden[lo + 1].clone()
        } else {
            let (spec, w) = self.merged_layer(lo, hi)?;
            self.layer_forwards += 1;
            self.full_layer_forwards += 1;
            let ctx = LayerCtx::new(&self.model.spec, Mode::Inference).at(lo);
            decoder_layer(&self.dense_hidden[lo], &w, &spec, &self.batch, &ctx)?
        };
        self.evaluations += 1;
        // Clamped: rounding can put the cosine of identical streams a hair above 1.
        let v = finite(1.0 - mean_token_cosine(&out, &self.dense_hidden[hi + 1])?, || {
            format!("the cost of window [{lo}, {hi}]")
        })?
        .max(0.0);
        self.memo.insert(key, v);
        Ok(v)
    }

    /// Mean over tokens of cos(dense stream entering layer `lo`, dense stream leaving layer `hi`).
    pub fn block_cosine(&self, lo: usize, hi: usize) -> Result<f64> {
        mean_token_cosine(&self.dense_hidden[lo], &self.dense_hidden[hi + 1])
    }

    /// Total negative log-likelihood of the calibration windows' next tokens under the candidate (memoised).
    pub fn nll(&mut self, c: &Candidate) -> Result<f64> {
        let key = (c.clone(), Quantity::Nll);
        if let Some(&v) = self.memo.get(&key) {
            return Ok(v);
        }
        let rows = Self::predicting_rows(&self.candidate_final(c)?)?;
        let targets: Vec<u32> = self.windows.iter().flat_map(|w| w[1..].iter().copied()).collect();
        let n = targets.len();
        let total = if self.narrow_head() {
            self.nll_streamed(&rows, &targets)?
        } else {
            let mut total = 0f64;
            for start in (0..n).step_by(LM_CHUNK) {
                let len = LM_CHUNK.min(n - start);
                let logp = self.log_probs(&rows.narrow(0, start, len)?)?;
                let idx = Tensor::new(&targets[start..start + len], logp.device())?.reshape((len, 1))?;
                let lp: Vec<f32> = logp.gather(&idx, 1)?.flatten_all()?.to_vec1()?;
                total -= lp.iter().map(|&x| x as f64).sum::<f64>();
            }
            total
        };
        let v = finite(total, || format!("the calibration NLL of candidate {c:?}"))?;
        self.memo.insert(key, v);
        Ok(v)
    }

    /// Perplexity of the calibration windows under the candidate.
    pub fn perplexity(&mut self, c: &Candidate) -> Result<f64> {
        let n: usize = self.windows.iter().map(|w| w.len() - 1).sum();
        Ok((self.nll(c)? / n as f64).exp())
    }
}

/// The fused-layer cache's limit: a quarter of the model's layer bytes when every layer is resident; two
/// layers' worth when the layers are read when used (the model may be larger than the memory).
fn merged_budget(model: &Model) -> usize {
    let bytes = model.weights.layer_bytes(&model.spec);
    if model.weights.all_resident() {
        bytes.iter().sum::<usize>() / 4
    } else {
        2 * bytes.iter().copied().max().unwrap_or(0)
    }
}

/// Bytes of a layer's tensors as stored.
fn layer_bytes(w: &LayerWeights) -> usize {
    w.parts().iter().map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes()).sum()
}

/// `v`, or an error naming what it is when it is NaN or infinite.
fn finite(v: f64, what: impl FnOnce() -> String) -> Result<f64> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(DepthError::NonFinite { what: what(), value: v })
    }
}

/// Mean over tokens of the cosine between matching token vectors of `a` and `b` (`[B, T, d]`), in f64.
fn mean_token_cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (n, t, d) = a.dims3()?;
    let a = a.reshape((n * t, d))?.to_dtype(DType::F64)?;
    let b = b.reshape((n * t, d))?.to_dtype(DType::F64)?;
    mean_row_cosine(&a, &b)
}

/// Mean over rows of the cosine between matching rows of `a` and `b` (`[N, D]`, f64).
fn mean_row_cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let na = a.sqr()?.sum(D::Minus1)?.sqrt()?;
    let nb = b.sqr()?.sum(D::Minus1)?.sqrt()?;
    let cos = (dot / (na * nb)?)?;
    Ok(cos.mean_all()?.to_scalar::<f64>()?)
}
