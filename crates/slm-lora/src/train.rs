//! Training the adapters: AdamW (PyTorch's), a linear warm-up then linear decay (HF's
//! `get_linear_schedule_with_warmup`), gradient accumulation over micro-batches, global-norm clipping, a held-out
//! validation loss every K steps with the best adapters kept, and seeded shuffling and dropout.
//!
//! Only A and B are `Var`s; the base weights are plain tensors, and the base projections and LM head go through
//! [`crate::ops::frozen_linear`], so the backward pass computes activation gradients only.

use std::path::Path;
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use slm_model::{Batch, LayerAdapter, Mode, Model};

use crate::adapter::Lora;
pub use crate::checkpoint::Checkpoints;
use crate::data::Example;
use crate::error::{LoraError, Result};
use crate::ops::{head_objective, token_cross_entropy, token_kl, KlTerm};
use crate::trainable::{TrainHook, Trainable};

/// Optimisation settings. Defaults: the LLM-Pruner recipe (lr 1e-4, 2 epochs, batch 64 = 4 × 16, 100 warm-up
/// steps, no weight decay, evaluation every 100 steps) with HF Trainer's clipping at 1.0.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub lr: f64,
    pub epochs: usize,
    /// Sequences per optimiser step (global batch).
    pub batch_size: usize,
    /// Sequences per forward/backward pass; `batch_size / micro_batch_size` passes are accumulated.
    pub micro_batch_size: usize,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// Validation every this many steps (and after the last step).
    pub eval_steps: usize,
    /// Stop after this many optimiser steps (the schedule decays over the capped run).
    pub max_steps: Option<usize>,
    /// Seed of the shuffling and of the dropout masks.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-4,
            epochs: 2,
            batch_size: 64,
            micro_batch_size: 4,
            warmup_steps: 100,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            eval_steps: 100,
            max_steps: None,
            seed: 42,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LoraError::InvalidArgument(m));
        if self.micro_batch_size == 0 || self.batch_size == 0 || !self.batch_size.is_multiple_of(self.micro_batch_size)
        {
            return bad(format!(
                "batch size {} must be a positive multiple of the micro-batch size {}",
                self.batch_size, self.micro_batch_size
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate must be positive, got {}", self.lr));
        }
        if self.epochs == 0 {
            return bad("epochs must be at least 1".into());
        }
        if self.max_steps == Some(0) {
            return bad("--max-steps must be at least 1".into());
        }
        if self.eval_steps == 0 {
            return bad("eval steps must be at least 1".into());
        }
        if self.weight_decay < 0.0 || self.max_grad_norm < 0.0 {
            return bad("weight decay and max grad norm must not be negative".into());
        }
        Ok(())
    }

    /// Optimiser steps for `n` training sequences.
    pub fn total_steps(&self, n: usize) -> usize {
        let per_epoch = n.div_ceil(self.batch_size);
        let total = per_epoch * self.epochs;
        self.max_steps.map_or(total, |m| m.min(total))
    }

    /// HF's linear schedule with warm-up: the learning rate of optimiser step `step` (0-based).
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let f = if step < self.warmup_steps {
            step as f64 / self.warmup_steps.max(1) as f64
        } else {
            (total.saturating_sub(step)) as f64 / (total.saturating_sub(self.warmup_steps)).max(1) as f64
        };
        self.lr * f.max(0.0)
    }
}

/// The weights of the objective's terms: next-token cross-entropy, KL to the teacher's token distributions
/// (logit distillation), and hidden-state matching (layer-wise distillation).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ObjectiveWeights {
    pub lm: f64,
    pub kl: f64,
    pub hidden: f64,
}

/// Distillation from a teacher (the dense model): its token distributions at a temperature and its hidden states.
/// The objective per scored token is `lm·CE + kl·t²·KL(teacher_t ‖ student_t) + hidden·H`, where `H` is the mean
/// over matched layers `j` of `‖h_j − g_{map(j)}‖² / ‖g_{map(j)}‖²`: student layer j's output against the output of
/// the teacher layer it stands for, relative to that output's squared norm (each token weighs the same, whatever
/// the norm of its residual stream: the first token's is far larger).
pub struct Distill<'a> {
    pub teacher: &'a Model,
    pub temperature: f64,
    pub weights: ObjectiveWeights,
    /// For each student layer, the teacher layer whose output its output is matched to (None: not matched).
    pub hidden_map: Vec<Option<usize>>,
}

impl<'a> Distill<'a> {
    /// Logit distillation alone (KL at `temperature`), no hidden-state term.
    pub fn kl(teacher: &'a Model, temperature: f64) -> Self {
        Distill {
            teacher,
            temperature,
            weights: ObjectiveWeights { lm: 0.0, kl: 1.0, hidden: 0.0 },
            hidden_map: vec![],
        }
    }

    fn matched(&self) -> usize {
        if self.weights.hidden > 0.0 {
            self.hidden_map.iter().flatten().count()
        } else {
            0
        }
    }

    /// The teacher layer student layer `j` is matched to, when hidden-state matching is on.
    fn target_of(&self, j: usize) -> Option<usize> {
        if self.weights.hidden > 0.0 {
            self.hidden_map.get(j).copied().flatten()
        } else {
            None
        }
    }

    /// Checks the teacher against the student `model`: the same vocabulary, a map of the student's layers onto
    /// the teacher's, weights that are not all zero, a positive temperature.
    pub fn check(&self, model: &Model) -> Result<()> {
        let bad = |m: String| Err(LoraError::InvalidArgument(m));
        if self.teacher.spec.vocab_size != model.spec.vocab_size {
            return bad(format!(
                "teacher vocabulary ({}) differs from the model's ({})",
                self.teacher.spec.vocab_size, model.spec.vocab_size
            ));
        }
        if self.teacher.spec.hidden_size != model.spec.hidden_size && self.weights.hidden > 0.0 {
            return bad(format!(
                "hidden-state matching needs the teacher's hidden size ({}) to be the model's ({})",
                self.teacher.spec.hidden_size, model.spec.hidden_size
            ));
        }
        if !(self.temperature > 0.0) {
            return bad(format!("temperature must be positive, got {}", self.temperature));
        }
        let w = self.weights;
        if [w.lm, w.kl, w.hidden].iter().any(|x| !(x.is_finite() && *x >= 0.0)) || w.lm + w.kl + w.hidden <= 0.0 {
            return bad(format!("objective weights must be non-negative and not all zero, got {w:?}"));
        }
        if w.hidden > 0.0 {
            if self.hidden_map.len() != model.spec.num_layers() {
                return bad(format!(
                    "the hidden-state map covers {} layers, the model has {}",
                    self.hidden_map.len(),
                    model.spec.num_layers()
                ));
            }
            let n = self.teacher.spec.num_layers();
            if let Some(t) = self.hidden_map.iter().flatten().find(|&&t| t >= n) {
                return bad(format!("the hidden-state map names teacher layer {t}; the teacher has {n}"));
            }
            if self.matched() == 0 {
                return bad("hidden-state matching is on but no layer is matched".into());
            }
        }
        Ok(())
    }
}

/// The student-to-teacher layer map of a depth plan: pruned layer `j` stands for the dense window
/// `kept[j] = (start, end)` (a depth plan's `kept_layers`), so its output is matched to dense layer `end`'s output
/// (a merged window's last layer, or the kept layer itself).
pub fn hidden_map_from_kept(kept: &[(usize, usize)]) -> Vec<Option<usize>> {
    kept.iter().map(|&(_, end)| Some(end)).collect()
}

/// What the teacher gives for one micro-batch: logits at the scored positions (for KL), hidden states (each
/// layer's output `[B, T, hidden]`, for matching).
struct TeacherOut {
    logits: Option<Tensor>,
    hidden: Vec<Tensor>,
}

fn teacher_out(d: &Distill, seqs: &[Vec<u32>], positions: &[Vec<usize>]) -> Result<TeacherOut> {
    let want_hidden = d.matched() > 0;
    let out = d.teacher.forward(seqs, positions, want_hidden, Mode::Inference)?;
    let logits = if d.weights.kl > 0.0 {
        Some(out.logits.ok_or_else(|| LoraError::InvalidArgument("teacher returned no logits".into()))?)
    } else {
        None
    };
    Ok(TeacherOut { logits, hidden: out.hidden })
}

/// Per-token hidden-state terms `[N]` of one matched layer: `‖h − g‖² / ‖g‖²` at the scored rows, over the number
/// of matched layers, times the hidden weight.
fn hidden_term(student: &Tensor, teacher: &Tensor, rows: &Tensor, d: &Distill) -> Result<Tensor> {
    let (b, t, h) = student.dims3()?;
    let s = student.reshape((b * t, h))?.index_select(rows, 0)?;
    let g = teacher.to_dtype(s.dtype())?.reshape((b * t, h))?.index_select(rows, 0)?.detach();
    let num = (&s - &g)?.sqr()?.sum(1)?;
    let den = g.sqr()?.sum(1)?.clamp(1e-12, f64::INFINITY)?;
    Ok(((num / den)? * (d.weights.hidden / d.matched() as f64))?)
}

/// Shuffles `examples` with `seed` and holds out the first `val_size` for validation (HF `train_test_split`).
pub fn split_validation(
    mut examples: Vec<Example>,
    val_size: usize,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    if val_size >= examples.len() {
        return Err(LoraError::InvalidArgument(format!(
            "validation split of {val_size} leaves no training data ({} examples)",
            examples.len()
        )));
    }
    examples.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let train = examples.split_off(val_size);
    Ok((train, examples))
}

/// Progress after one optimiser step.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepInfo {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    /// Mean training loss per scored token over the global batch.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens (without padding) run through the model so far.
    pub tokens: usize,
    /// Training seconds so far (validation excluded).
    pub seconds: f64,
    pub val_loss: Option<f64>,
    /// Validation LM loss (cross-entropy), also reported when distilling.
    pub val_lm_loss: Option<f64>,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainReport {
    pub steps: usize,
    pub train_examples: usize,
    pub val_examples: usize,
    pub history: Vec<StepInfo>,
    pub best_step: Option<usize>,
    pub best_val_loss: Option<f64>,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// Per-token losses `[N]` of a micro-batch (the objective: cross-entropy, or the distillation mix), plus the
/// rows' count. `train`: differentiable kernels, dropout, frozen-weight matmuls (the head trains when the model's
/// head is a variable).
fn micro_batch_losses(
    model: &Model,
    hook: &dyn LayerAdapter,
    examples: &[&Example],
    distill: Option<&Distill>,
    train: bool,
) -> Result<Tensor> {
    let seqs: Vec<Vec<u32>> = examples.iter().map(|e| e.ids.clone()).collect();
    let batch = Batch::new(&model.spec, &seqs, &model.device)?;
    let mode = if train { Mode::Differentiable } else { Mode::Inference };
    let (rows, _, positions) = scored_rows(examples, batch.seq_len);
    let teacher = distill.map(|d| teacher_out(d, &seqs, &positions)).transpose()?;
    let idx = Tensor::from_vec(rows, positions.iter().map(Vec::len).sum::<usize>(), &model.device)?;
    let mut x = model.embed(&batch)?;
    let mut hidden: Option<Tensor> = None;
    for i in 0..model.spec.num_layers() {
        x = model.run_layers_adapted(x, i..i + 1, &batch, mode, hook)?;
        if let (Some(d), Some(t)) = (distill, teacher.as_ref()) {
            if let Some(j) = d.target_of(i) {
                let term = hidden_term(&x, &t.hidden[j + 1], &idx, d)?;
                hidden = Some(match hidden {
                    Some(h) => (h + term)?,
                    None => term,
                });
            }
        }
    }
    let top = losses_from_top(model, &x, &batch, examples, distill, teacher.as_ref(), train)?;
    Ok(match hidden {
        Some(h) => (top + h)?,
        None => top,
    })
}

/// Per-token losses `[N]` from the last layer's output `x: [B, T, hidden]` of `batch` (the examples' ids): the
/// final norm, the LM head at the scored rows and the objective's token terms (cross-entropy, or the
/// distillation's CE and KL; hidden-state terms are added by the callers). `train`: differentiable kernels and
/// [`head_objective`] (the head trains when it is a variable); otherwise [`Model::head`] (a head in a narrower stored dtype upcast a
/// chunk at a time).
fn losses_from_top(
    model: &Model,
    x: &Tensor,
    batch: &Batch,
    examples: &[&Example],
    distill: Option<&Distill>,
    teacher: Option<&TeacherOut>,
    train: bool,
) -> Result<Tensor> {
    let mode = if train { Mode::Differentiable } else { Mode::Inference };
    let fin = model.final_norm(x, mode)?;
    let t = batch.seq_len;
    let (rows, targets, _) = scored_rows(examples, t);
    let h = model.spec.hidden_size;
    let n = rows.len();
    let idx = Tensor::from_vec(rows, n, &model.device)?;
    let (lm_w, kl_w) = distill.map_or((1.0, 0.0), |d| (d.weights.lm, d.weights.kl));
    if lm_w == 0.0 && kl_w == 0.0 {
        return Ok(Tensor::zeros(n, candle_core::DType::F32, &model.device)?);
    }
    let picked = fin.reshape((examples.len() * t, h))?.index_select(&idx, 0)?;
    let kl = if kl_w > 0.0 {
        let (d, tl) = (distill.expect("kl weight set"), teacher.and_then(|t| t.logits.as_ref()));
        let tl = tl.ok_or_else(|| LoraError::InvalidArgument("no teacher logits for the KL term".into()))?;
        Some(KlTerm { teacher: tl, temperature: d.temperature, weight: kl_w })
    } else {
        None
    };
    if train {
        // Chunked over the head: no [N, vocab] logits kept (a trained head keeps their gradient only).
        return Ok(head_objective(&picked, model.weights.lm_head(), &targets, lm_w, kl)?);
    }
    let logits = model.head(&picked)?;
    let mut out = (token_cross_entropy(&logits, &targets)? * lm_w)?;
    if let Some(k) = kl {
        out = (out + (token_kl(&logits, k.teacher, k.temperature)? * k.weight)?)?;
    }
    Ok(out)
}

/// The rows of a batch's final-norm output that are scored, their targets and, per sequence, their positions.
fn scored_rows(examples: &[&Example], t: usize) -> (Vec<u32>, Vec<u32>, Vec<Vec<usize>>) {
    let (mut rows, mut targets, mut positions) = (Vec::new(), Vec::new(), vec![Vec::new(); examples.len()]);
    for (s, e) in examples.iter().enumerate() {
        for p in 0..e.ids.len() - 1 {
            if e.target[p + 1] {
                rows.push((s * t + p) as u32);
                targets.push(e.ids[p + 1]);
                positions[s].push(p);
            }
        }
    }
    (rows, targets, positions)
}

/// Adds the gradients of `vars` found in `store` into `grads` (a tensor used in several places, such as a tied
/// head, gets the sum).
fn gather_grads(store: &candle_core::backprop::GradStore, vars: &[&Var], grads: &mut [Option<Tensor>]) -> Result<()> {
    for (k, v) in vars.iter().enumerate() {
        if let Some(g) = store.get(v.as_tensor()) {
            grads[k] = Some(match grads[k].take() {
                Some(a) => (a + g)?,
                None => g.clone(),
            });
        }
    }
    Ok(())
}

fn no_grad(what: &str) -> LoraError {
    LoraError::InvalidArgument(format!("{what} received no gradient (a detaching op on its path?)"))
}

/// One micro-batch's summed loss divided by `denominator`, and its gradient for every trainable tensor, with
/// per-layer activation checkpointing: the forward pass keeps only each layer's input (and the dropout
/// generator's state before it); the loss's gradient with respect to the last hidden state (and the head's and
/// final norm's, when they train) comes from the top alone; then, from the top, each layer is recomputed from
/// its stored input (same dropout masks) and `Σ out ⊙ ∂L/∂out` is pushed back through it alone, giving its
/// trainable tensors' gradients and its input's; a trained embedding last gets `Σ emb ⊙ ∂L/∂emb`. At most one
/// layer's graph (and weights, when the base is read when used) is alive at a time; the whole-graph backward
/// holds every layer's. The same gradients up to float summation order (tests).
pub fn checkpointed_gradients(
    model: &Model,
    trainable: &dyn Trainable,
    hook: &dyn TrainHook,
    examples: &[&Example],
    distill: Option<&Distill>,
    denominator: f64,
) -> Result<(f64, Vec<Tensor>)> {
    let seqs: Vec<Vec<u32>> = examples.iter().map(|e| e.ids.clone()).collect();
    let batch = Batch::new(&model.spec, &seqs, &model.device)?;
    let mode = Mode::Differentiable;
    let n_layers = model.spec.num_layers();
    let (rows, _, positions) = scored_rows(examples, batch.seq_len);
    let teacher = distill.map(|d| teacher_out(d, &seqs, &positions)).transpose()?;
    let idx = Tensor::from_vec(rows.clone(), rows.len(), &model.device)?;
    let embed = model.embed(&batch)?;
    let mut x = embed.detach();
    let mut inputs = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let state = hook.dropout_state();
        let next = model.run_layers_adapted(x.clone(), i..i + 1, &batch, mode, hook)?.detach();
        inputs.push((x, state));
        x = next;
    }
    let after_forward = hook.dropout_state();
    let top = Var::from_tensor(&x)?;
    let losses = losses_from_top(model, top.as_tensor(), &batch, examples, distill, teacher.as_ref(), true)?;
    let loss = (losses.sum_all()? / denominator)?;
    let mut loss_value = loss.to_scalar::<f32>()? as f64;
    let vars = trainable.vars();
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let store = loss.backward()?;
    gather_grads(&store, &vars, &mut grads)?;
    // No gradient reaches the top when the objective has no token term (hidden-state matching alone).
    let mut grad_out = match store.get(top.as_tensor()) {
        Some(g) => g.clone(),
        None => x.zeros_like()?,
    };
    drop(store);
    for i in (0..n_layers).rev() {
        // The hidden-state term of layer i's output joins the gradient coming from above.
        if let (Some(d), Some(t)) = (distill, teacher.as_ref()) {
            if let Some(j) = d.target_of(i) {
                let out_i = if i + 1 < n_layers { &inputs[i + 1].0 } else { &x };
                let v = Var::from_tensor(out_i)?;
                let term = (hidden_term(v.as_tensor(), &t.hidden[j + 1], &idx, d)?.sum_all()? / denominator)?;
                loss_value += term.to_scalar::<f32>()? as f64;
                let g = term.backward()?.remove(v.as_tensor()).ok_or_else(|| no_grad("a matched layer's output"))?;
                grad_out = (grad_out + g)?;
            }
        }
        let (input, state) = &inputs[i];
        hook.set_dropout_state(state.clone());
        let xv = Var::from_tensor(input)?;
        let out = model.run_layers_adapted(xv.as_tensor().clone(), i..i + 1, &batch, mode, hook)?;
        let store = (out * &grad_out)?.sum_all()?.backward()?;
        gather_grads(&store, &vars, &mut grads)?;
        if i > 0 || trainable.embedding_trained() {
            grad_out = store.get(xv.as_tensor()).ok_or_else(|| no_grad("a layer input"))?.clone();
        }
    }
    if trainable.embedding_trained() {
        let store = (embed * &grad_out)?.sum_all()?.backward()?;
        gather_grads(&store, &vars, &mut grads)?;
    }
    hook.set_dropout_state(after_forward);
    let grads =
        grads.into_iter().map(|g| g.ok_or_else(|| no_grad("a trainable tensor"))).collect::<Result<Vec<_>>>()?;
    Ok((loss_value, grads))
}

/// The whole-graph micro-batch step: the summed loss over `denominator` and the gradient of every trainable
/// tensor from one backward pass through every layer.
fn whole_graph_gradients(
    model: &Model,
    trainable: &dyn Trainable,
    hook: &dyn TrainHook,
    examples: &[&Example],
    distill: Option<&Distill>,
    denominator: f64,
) -> Result<(f64, Vec<Tensor>)> {
    let losses = micro_batch_losses(model, hook, examples, distill, true)?;
    let loss = (losses.sum_all()? / denominator)?;
    let store = loss.backward()?;
    let vars = trainable.vars();
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    gather_grads(&store, &vars, &mut grads)?;
    let grads =
        grads.into_iter().map(|g| g.ok_or_else(|| no_grad("a trainable tensor"))).collect::<Result<Vec<_>>>()?;
    Ok((loss.to_scalar::<f32>()? as f64, grads))
}

/// [`checkpointed_gradients`] or [`whole_graph_gradients`] of one micro-batch on `base` (the mean loss per
/// scored token and its gradients), for tests: `checkpointed` picks.
pub fn micro_batch_gradients(
    base: &Model,
    trainable: &dyn Trainable,
    examples: &[Example],
    distill: Option<&Distill>,
    checkpointed: bool,
    seed: u64,
) -> Result<(f64, Vec<Tensor>)> {
    let hook = trainable.train_hook(seed);
    let refs: Vec<&Example> = examples.iter().collect();
    let n: usize = examples.iter().map(|e| e.num_targets()).sum();
    let model = trainable.student(base);
    if checkpointed {
        checkpointed_gradients(model, trainable, hook.as_ref(), &refs, distill, n.max(1) as f64)
    } else {
        whole_graph_gradients(model, trainable, hook.as_ref(), &refs, distill, n.max(1) as f64)
    }
}

/// Mean validation loss per scored token of the trained model (`trainable` merged into `base`): (objective, LM
/// cross-entropy).
pub fn evaluate(
    base: &Model,
    trainable: &dyn Trainable,
    val: &[Example],
    distill: Option<&Distill>,
    chunk: usize,
) -> Result<(f64, f64)> {
    let merged = trainable.merge(base)?;
    let hook = slm_model::NoAdapter;
    let (mut obj, mut ce, mut n) = (0f64, 0f64, 0usize);
    for c in val.chunks(chunk.max(1)) {
        let refs: Vec<&Example> = c.iter().collect();
        let l = micro_batch_losses(&merged, &hook, &refs, None, false)?;
        ce += l.sum_all()?.to_scalar::<f32>()? as f64;
        n += l.elem_count();
        if distill.is_some() {
            obj += micro_batch_losses(&merged, &hook, &refs, distill, false)?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let n = n.max(1) as f64;
    let ce = ce / n;
    Ok((if distill.is_some() { obj / n } else { ce }, ce))
}

/// PyTorch's AdamW state: first and second moments per trainable tensor and the step count.
pub(crate) struct AdamW {
    pub(crate) m: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    pub(crate) t: i32,
}

impl AdamW {
    fn new(vars: &[&Var]) -> Result<Self> {
        let z = |v: &&Var| v.as_tensor().zeros_like();
        Ok(AdamW {
            m: vars.iter().map(z).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(z).collect::<candle_core::Result<_>>()?,
            t: 0,
        })
    }

    /// PyTorch's AdamW: decoupled decay `p ← p(1 − lr·wd)`, then the bias-corrected Adam step.
    fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64, c: &TrainConfig) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - c.beta1.powi(self.t);
        let bc2 = 1.0 - c.beta2.powi(self.t);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            self.m[i] = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&self.v[i] / bc2)?.sqrt()? + c.eps)?;
            let update = ((&self.m[i] / bc1)? / denom)?;
            let p = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            var.set(&(p - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// Trains `trainable` on `train` for the model `base` (validation on `val`, the best tensors by validation loss
/// restored at the end when `val` is not empty). With `checkpoints`, the whole training state is written every
/// `every` steps, and a run given `resume` continues from the last one bit for bit. `on_step` sees every
/// optimiser step.
#[allow(clippy::too_many_arguments)]
pub fn train(
    base: &Model,
    trainable: &dyn Trainable,
    train: &[Example],
    val: &[Example],
    cfg: &TrainConfig,
    distill: Option<&Distill>,
    checkpoints: Option<&Checkpoints>,
    on_step: &mut dyn FnMut(&StepInfo),
) -> Result<TrainReport> {
    cfg.validate()?;
    if train.is_empty() {
        return Err(LoraError::InvalidArgument("no training examples".into()));
    }
    if let Some(d) = distill {
        d.check(base)?;
    }
    let model = trainable.student(base);
    let vars = trainable.vars();
    let mut opt = AdamW::new(&vars)?;
    let total = cfg.total_steps(train.len());
    let hook = trainable.train_hook(cfg.seed.wrapping_add(1));
    // A base read when used is trained with per-layer checkpointing (one layer's weights and graph at a time);
    // a resident one through the whole graph (faster when it fits).
    let checkpoint = !model.weights.all_resident();
    tracing::info!(checkpoint, "backward: per-layer checkpointing when the base is read when used");
    let mut st = crate::checkpoint::State::fresh();
    if let Some(c) = checkpoints {
        let fingerprint = c.fingerprint(trainable, train, cfg)?;
        if c.resume {
            if let Some(s) = c.load(&fingerprint, trainable, &mut opt, hook.as_ref())? {
                tracing::info!(step = s.step, dir = %c.dir.display(), "resuming from the checkpoint");
                st = s;
            }
        }
    }
    let resumed_at = st.step;
    let mut batch_index = 0usize;
    'epochs: for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(0x9E37_79B9).wrapping_add(epoch as u64)));
        for global in order.chunks(cfg.batch_size) {
            if st.step >= total {
                break 'epochs;
            }
            batch_index += 1;
            if batch_index <= resumed_at {
                continue;
            }
            let start = Instant::now();
            let n_targets: usize = global.iter().map(|&i| train[i].num_targets()).sum();
            let mut acc: Option<Vec<Tensor>> = None;
            let mut loss_sum = 0f64;
            for micro in global.chunks(cfg.micro_batch_size) {
                let refs: Vec<&Example> = micro.iter().map(|&i| &train[i]).collect();
                st.tokens += refs.iter().map(|e| e.ids.len()).sum::<usize>();
                let denominator = n_targets.max(1) as f64;
                let (loss, gs) = if checkpoint {
                    checkpointed_gradients(model, trainable, hook.as_ref(), &refs, distill, denominator)?
                } else {
                    whole_graph_gradients(model, trainable, hook.as_ref(), &refs, distill, denominator)?
                };
                loss_sum += loss;
                acc = Some(match acc {
                    None => gs,
                    Some(a) => a.iter().zip(&gs).map(|(a, g)| a + g).collect::<candle_core::Result<_>>()?,
                });
            }
            let mut gs = acc.expect("a global batch holds at least one micro-batch");
            let norm =
                gs.iter().map(|g| Ok(g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64)).sum::<Result<f64>>()?.sqrt();
            if !(loss_sum.is_finite() && norm.is_finite()) {
                return Err(LoraError::InvalidArgument(format!(
                    "training diverged at step {} (epoch {epoch}): loss {loss_sum}, gradient norm {norm}; lower --lr or check \
                     the model and data",
                    st.step + 1
                )));
            }
            if cfg.max_grad_norm > 0.0 && norm > cfg.max_grad_norm {
                let f = cfg.max_grad_norm / (norm + 1e-6);
                gs = gs.iter().map(|g| g * f).collect::<candle_core::Result<_>>()?;
            }
            let lr = cfg.lr_at(st.step, total);
            opt.step(&vars, &gs, lr, cfg)?;
            st.seconds += start.elapsed().as_secs_f64();
            st.step += 1;
            let step = st.step;
            let mut info = StepInfo {
                step,
                total_steps: total,
                epoch,
                loss: loss_sum,
                lr,
                grad_norm: norm,
                tokens: st.tokens,
                seconds: st.seconds,
                val_loss: None,
                val_lm_loss: None,
            };
            if !val.is_empty() && (step.is_multiple_of(cfg.eval_steps) || step == total) {
                let (v, ce) = evaluate(base, trainable, val, distill, cfg.micro_batch_size * 2)?;
                info.val_loss = Some(v);
                info.val_lm_loss = Some(ce);
                tracing::info!(step, val_loss = v, val_lm_loss = ce, "validation");
                if st.best_loss.is_none_or(|b| v < b) {
                    st.best_loss = Some(v);
                    st.best_step = Some(step);
                    st.best = Some(trainable.named_tensors()?.into_iter().collect());
                }
            }
            on_step(&info);
            st.history.push(info);
            if let Some(c) = checkpoints {
                if step.is_multiple_of(c.every) && step < total {
                    let fingerprint = c.fingerprint(trainable, train, cfg)?;
                    c.save(&fingerprint, trainable, &opt, hook.as_ref(), &st)?;
                }
            }
        }
    }
    if let (Some(b), Some(s)) = (&st.best, st.best_step) {
        if s != st.step {
            tracing::info!(best_step = s, "restoring the best tensors by validation loss");
        }
        trainable.set_from(b, Path::new("<best checkpoint>"))?;
    }
    Ok(TrainReport {
        steps: st.step,
        train_examples: train.len(),
        val_examples: val.len(),
        history: st.history,
        best_step: st.best_step,
        best_val_loss: st.best_loss,
        tokens: st.tokens,
        seconds: st.seconds,
        tokens_per_s: st.tokens as f64 / st.seconds.max(1e-9),
    })
}

/// Mean loss per scored token of `examples` under the adapters (objective as in training, no dropout), for
/// tests and reports.
pub fn mean_loss(model: &Model, lora: &Lora, examples: &[Example], distill: Option<&Distill>) -> Result<f64> {
    let hook = lora.eval_hook();
    let refs: Vec<&Example> = examples.iter().collect();
    let l = micro_batch_losses(model, &hook, &refs, distill, false)?;
    Ok(l.sum_all()?.to_scalar::<f32>()? as f64 / l.elem_count().max(1) as f64)
}

/// Per-token losses `[N]` (scored positions only, in order) and their gradient-carrying graph, for tests.
pub fn token_losses(model: &Model, lora: &Lora, examples: &[Example], train: bool, seed: u64) -> Result<Tensor> {
    let refs: Vec<&Example> = examples.iter().collect();
    if train {
        micro_batch_losses(model, &lora.train_hook(seed), &refs, None, true)
    } else {
        micro_batch_losses(model, &lora.eval_hook(), &refs, None, false)
    }
}
