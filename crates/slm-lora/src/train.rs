//! Training the adapters: AdamW (PyTorch's), a linear warm-up then linear decay (HF's
//! `get_linear_schedule_with_warmup`), gradient accumulation over micro-batches, global-norm clipping, a held-out
//! validation loss every K steps with the best adapters kept, and seeded shuffling and dropout.
//!
//! Only A and B are `Var`s; the base weights are plain tensors, and the base projections and LM head go through
//! [`crate::ops::frozen_linear`], so the backward pass computes activation gradients only.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use slm_model::{Batch, LayerAdapter, Mode, Model};

use crate::adapter::Lora;
use crate::data::Example;
use crate::error::{LoraError, Result};
use crate::ops::{frozen_linear, token_cross_entropy, token_kl};

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

/// Distillation target: the teacher's token distributions at a temperature.
pub struct Distill<'a> {
    pub teacher: &'a Model,
    pub temperature: f64,
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

/// Per-token losses `[N]` of a micro-batch (the objective: cross-entropy, or KL to the teacher), plus the rows'
/// count. `train`: differentiable kernels, dropout, frozen-weight matmuls.
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
    let x = model.embed(&batch)?;
    let x = model.run_layers_adapted(x, 0..model.spec.num_layers(), &batch, mode, hook)?;
    losses_from_top(model, &x, &batch, examples, distill, train)
}

/// Per-token losses `[N]` from the last layer's output `x: [B, T, hidden]` of `batch` (the examples' ids): the
/// final norm, the LM head at the scored rows and the objective. `train`: differentiable kernels and the
/// frozen-head matmul; otherwise [`Model::head`] (a head in a narrower stored dtype upcast a chunk at a time).
fn losses_from_top(
    model: &Model,
    x: &Tensor,
    batch: &Batch,
    examples: &[&Example],
    distill: Option<&Distill>,
    train: bool,
) -> Result<Tensor> {
    let mode = if train { Mode::Differentiable } else { Mode::Inference };
    let fin = model.final_norm(x, mode)?;
    let t = batch.seq_len;
    let (rows, targets, positions) = scored_rows(examples, t);
    let h = model.spec.hidden_size;
    let idx = Tensor::from_vec(rows.clone(), rows.len(), &model.device)?;
    let picked = fin.reshape((examples.len() * t, h))?.index_select(&idx, 0)?;
    let logits = if train { frozen_linear(&picked, model.weights.lm_head())? } else { model.head(&picked)? };
    Ok(match distill {
        Some(d) => {
            let seqs: Vec<Vec<u32>> = examples.iter().map(|e| e.ids.clone()).collect();
            let out = d.teacher.forward(&seqs, &positions, false, Mode::Inference)?;
            let tl = out.logits.ok_or_else(|| LoraError::InvalidArgument("teacher returned no logits".into()))?;
            token_kl(&logits, &tl, d.temperature)?
        }
        None => token_cross_entropy(&logits, &targets)?,
    })
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

/// One micro-batch's summed loss divided by `denominator`, and its gradient for every tensor of `vars`, with
/// per-layer activation checkpointing: the forward pass keeps only each layer's input (and the dropout
/// generator's state before it); the loss's gradient with respect to the last hidden state comes from the top
/// alone; then, from the top, each layer is recomputed from its stored input (same dropout masks) and
/// `Σ out ⊙ ∂L/∂out` is pushed back through it alone, giving its adapters' gradients and its input's. At most
/// one layer's graph (and weights, when the base is read when used) is alive at a time; the whole-graph
/// backward holds every layer's. The same gradients up to float summation order (tests).
pub fn checkpointed_gradients(
    model: &Model,
    lora: &Lora,
    hook: &crate::adapter::LoraHook,
    examples: &[&Example],
    distill: Option<&Distill>,
    denominator: f64,
) -> Result<(f64, Vec<Tensor>)> {
    let seqs: Vec<Vec<u32>> = examples.iter().map(|e| e.ids.clone()).collect();
    let batch = Batch::new(&model.spec, &seqs, &model.device)?;
    let mode = Mode::Differentiable;
    let n_layers = model.spec.num_layers();
    let mut x = model.embed(&batch)?;
    let mut inputs = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let state = hook.dropout_state();
        let next = model.run_layers_adapted(x.clone(), i..i + 1, &batch, mode, hook)?.detach();
        inputs.push((x, state));
        x = next;
    }
    let after_forward = hook.dropout_state();
    let top = Var::from_tensor(&x)?;
    let losses = losses_from_top(model, top.as_tensor(), &batch, examples, distill, true)?;
    let loss = (losses.sum_all()? / denominator)?;
    let loss_value = loss.to_scalar::<f32>()? as f64;
    let no_grad = |what: &str| LoraError::InvalidArgument(format!("{what} received no gradient (a detaching op?)"));
    let mut grad_out = loss.backward()?.remove(top.as_tensor()).ok_or_else(|| no_grad("the last hidden state"))?;
    let vars = lora.vars();
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    for i in (0..n_layers).rev() {
        let (input, state) = &inputs[i];
        hook.set_dropout_state(state.clone());
        let xv = Var::from_tensor(input)?;
        let out = model.run_layers_adapted(xv.as_tensor().clone(), i..i + 1, &batch, mode, hook)?;
        let store = (out * &grad_out)?.sum_all()?.backward()?;
        for (k, v) in vars.iter().enumerate() {
            if let Some(g) = store.get(v.as_tensor()) {
                grads[k] = Some(g.clone());
            }
        }
        if i > 0 {
            grad_out = store.get(xv.as_tensor()).ok_or_else(|| no_grad("a layer input"))?.clone();
        }
    }
    hook.set_dropout_state(after_forward);
    let grads = grads.into_iter().map(|g| g.ok_or_else(|| no_grad("a LoRA tensor"))).collect::<Result<Vec<_>>>()?;
    Ok((loss_value, grads))
}

/// The whole-graph micro-batch step: the summed loss over `denominator` and the gradient of every tensor of
/// `vars` from one backward pass through every layer.
fn whole_graph_gradients(
    model: &Model,
    lora: &Lora,
    hook: &crate::adapter::LoraHook,
    examples: &[&Example],
    distill: Option<&Distill>,
    denominator: f64,
) -> Result<(f64, Vec<Tensor>)> {
    let losses = micro_batch_losses(model, hook, examples, distill, true)?;
    let loss = (losses.sum_all()? / denominator)?;
    let grads = loss.backward()?;
    let gs = lora
        .vars()
        .iter()
        .map(|v| {
            grads.get(v.as_tensor()).cloned().ok_or_else(|| {
                LoraError::InvalidArgument("a LoRA tensor received no gradient (a detaching op on its path?)".into())
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((loss.to_scalar::<f32>()? as f64, gs))
}

/// [`checkpointed_gradients`] or [`whole_graph_gradients`] of one micro-batch, for tests: `checkpointed` picks.
pub fn micro_batch_gradients(
    model: &Model,
    lora: &Lora,
    examples: &[Example],
    checkpointed: bool,
    seed: u64,
) -> Result<(f64, Vec<Tensor>)> {
    let hook = lora.train_hook(seed);
    let refs: Vec<&Example> = examples.iter().collect();
    let n: usize = examples.iter().map(|e| e.num_targets()).sum();
    if checkpointed {
        checkpointed_gradients(model, lora, &hook, &refs, None, n.max(1) as f64)
    } else {
        whole_graph_gradients(model, lora, &hook, &refs, None, n.max(1) as f64)
    }
}

/// Mean validation loss per scored token: (objective, LM cross-entropy).
pub fn evaluate(
    model: &Model,
    lora: &Lora,
    val: &[Example],
    distill: Option<&Distill>,
    chunk: usize,
) -> Result<(f64, f64)> {
    let merged = lora.merge(model)?;
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

struct AdamW {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i32,
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

/// Trains `lora` on `train` (validation on `val`, best adapters restored at the end when `val` is not empty).
/// `on_step` sees every optimiser step.
pub fn train(
    model: &Model,
    lora: &Lora,
    train: &[Example],
    val: &[Example],
    cfg: &TrainConfig,
    distill: Option<&Distill>,
    on_step: &mut dyn FnMut(&StepInfo),
) -> Result<TrainReport> {
    cfg.validate()?;
    if train.is_empty() {
        return Err(LoraError::InvalidArgument("no training examples".into()));
    }
    if let Some(d) = distill {
        if d.teacher.spec.vocab_size != model.spec.vocab_size {
            return Err(LoraError::InvalidArgument(format!(
                "teacher vocabulary ({}) differs from the model's ({})",
                d.teacher.spec.vocab_size, model.spec.vocab_size
            )));
        }
        if !(d.temperature > 0.0) {
            return Err(LoraError::InvalidArgument(format!("temperature must be positive, got {}", d.temperature)));
        }
    }
    let vars = lora.vars();
    let mut opt = AdamW::new(&vars)?;
    let total = cfg.total_steps(train.len());
    let hook = lora.train_hook(cfg.seed.wrapping_add(1));
    // A base read when used is trained with per-layer checkpointing (one layer's weights and graph at a time);
    // a resident one through the whole graph (faster when it fits).
    let checkpoint = !model.weights.all_resident();
    tracing::info!(checkpoint, "LoRA backward: per-layer checkpointing when the base is read when used");
    let mut history = Vec::new();
    let (mut best, mut best_step, mut best_loss): (Option<HashMap<String, Tensor>>, Option<usize>, Option<f64>) =
        (None, None, None);
    let (mut tokens, mut seconds, mut step) = (0usize, 0f64, 0usize);
    'epochs: for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(0x9E37_79B9).wrapping_add(epoch as u64)));
        for global in order.chunks(cfg.batch_size) {
            if step >= total {
                break 'epochs;
            }
            let start = Instant::now();
            let n_targets: usize = global.iter().map(|&i| train[i].num_targets()).sum();
            let mut acc: Option<Vec<Tensor>> = None;
            let mut loss_sum = 0f64;
            for micro in global.chunks(cfg.micro_batch_size) {
                let refs: Vec<&Example> = micro.iter().map(|&i| &train[i]).collect();
                tokens += refs.iter().map(|e| e.ids.len()).sum::<usize>();
                let denominator = n_targets.max(1) as f64;
                let (loss, gs) = if checkpoint {
                    checkpointed_gradients(model, lora, &hook, &refs, distill, denominator)?
                } else {
                    whole_graph_gradients(model, lora, &hook, &refs, distill, denominator)?
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
                    step + 1
                )));
            }
            if cfg.max_grad_norm > 0.0 && norm > cfg.max_grad_norm {
                let f = cfg.max_grad_norm / (norm + 1e-6);
                gs = gs.iter().map(|g| g * f).collect::<candle_core::Result<_>>()?;
            }
            let lr = cfg.lr_at(step, total);
            opt.step(&vars, &gs, lr, cfg)?;
            seconds += start.elapsed().as_secs_f64();
            step += 1;
            let mut info = StepInfo {
                step,
                total_steps: total,
                epoch,
                loss: loss_sum,
                lr,
                grad_norm: norm,
                tokens,
                seconds,
                val_loss: None,
                val_lm_loss: None,
            };
            if !val.is_empty() && (step % cfg.eval_steps == 0 || step == total) {
                let (v, ce) = evaluate(model, lora, val, distill, cfg.micro_batch_size * 2)?;
                info.val_loss = Some(v);
                info.val_lm_loss = Some(ce);
                tracing::info!(step, val_loss = v, val_lm_loss = ce, "validation");
                if best_loss.is_none_or(|b| v < b) {
                    best_loss = Some(v);
                    best_step = Some(step);
                    best = Some(lora.named_tensors()?.into_iter().collect());
                }
            }
            on_step(&info);
            history.push(info);
        }
    }
    if let (Some(b), Some(s)) = (&best, best_step) {
        if s != step {
            tracing::info!(best_step = s, "restoring the best adapters by validation loss");
        }
        lora.set_from(b, Path::new("<best checkpoint>"))?;
    }
    Ok(TrainReport {
        steps: step,
        train_examples: train.len(),
        val_examples: val.len(),
        history,
        best_step,
        best_val_loss: best_loss,
        tokens,
        seconds,
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
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
    let hook = if train { lora.train_hook(seed) } else { lora.eval_hook() };
    let refs: Vec<&Example> = examples.iter().collect();
    micro_batch_losses(model, &hook, &refs, None, train)
}
