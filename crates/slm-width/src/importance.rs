//! Importance of the coupled units from the language-model loss on calibration windows.
//!
//! One gradient pass gives g = ∂L/∂W for every projection of the pruned layers (L: mean next-token cross-entropy
//! over all windows, as `model(x, labels=x).loss`). The second-order variant also needs the diagonal of the
//! empirical Fisher, acc = (1/N)·Σₙ (∂Lₙ/∂W)², from one backward pass per window. Element saliences (§A.3):
//!
//! | importance | element salience S | per row / column of a member matrix |
//! |---|---|---|
//! | `element1` | W⊙g | Σ\|S\| |
//! | `element2` | W⊙g − ½·W⊙acc⊙W | Σ\|S\| |
//! | `vector` | W⊙g | \|ΣS\| |
//! | `l2` (baseline) | W² | ΣS |
//! | `random` (baseline) | seeded uniform score per unit | |
//!
//! A unit's score aggregates its members channel by channel (sum by default, or mean, max) and sums over the
//! unit's channels. For an attention unit the members of channel t of KV head g are k row g·hd+t, v row g·hd+t,
//! and the q rows / o columns at offset t of each of its query heads (summed over those heads). The reference code
//! credits query head h to KV head `h mod kv_heads` when it aligns the vectors; here each KV head gets the query
//! heads that actually read it (`h div rep`), a deliberate fix.
//!
//! Only the projections of the pruned layers get a weight gradient (a tap on each output, the weight kept in its
//! stored dtype: [`Taps`]), so none is built for embeddings, norms or layers outside the range.

use std::str::FromStr;

use candle_core::{Tensor, Var};
use rand::{Rng, SeedableRng};
use slm_model::forward::Mode;
use slm_model::{Batch, LayerSpec, LayerWeights, Model};

use crate::groups::AttentionUnit;
use crate::{Result, WidthError};

/// How a unit's importance is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Importance {
    /// First-order Taylor, element-wise: Σ|W·∇W| (LLM-Pruner's `param_first`, its released default).
    Element1,
    /// First + second order with the Fisher diagonal: Σ|W·∇W − ½·W·F·W| (`param_mix`).
    Element2,
    /// First-order, vector-wise: |Σ W·∇W| (`vectorize`).
    Vector,
    /// Baseline: squared L2 norm of the weights (no gradient).
    L2,
    /// Baseline: a seeded random score per unit.
    Random,
}

impl Importance {
    pub const NAMES: [&'static str; 5] = ["element1", "element2", "vector", "l2", "random"];

    pub fn as_str(self) -> &'static str {
        match self {
            Importance::Element1 => "element1",
            Importance::Element2 => "element2",
            Importance::Vector => "vector",
            Importance::L2 => "l2",
            Importance::Random => "random",
        }
    }

    pub fn needs_gradient(self) -> bool {
        matches!(self, Importance::Element1 | Importance::Element2 | Importance::Vector)
    }

    pub fn needs_fisher(self) -> bool {
        self == Importance::Element2
    }
}

impl FromStr for Importance {
    type Err = WidthError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "element1" | "param_first" => Importance::Element1,
            "element2" | "param_mix" => Importance::Element2,
            "vector" | "vectorize" => Importance::Vector,
            "l2" | "magnitude" => Importance::L2,
            "random" => Importance::Random,
            other => {
                return Err(WidthError::InvalidArgument(format!(
                    "unknown importance `{other}` (expected one of {})",
                    Importance::NAMES.join(", ")
                )))
            }
        })
    }
}

/// How the members of a unit are combined, channel by channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    Sum,
    Mean,
    Max,
}

impl Aggregation {
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Sum => "sum",
            Aggregation::Mean => "mean",
            Aggregation::Max => "max",
        }
    }

    fn combine(self, v: &[f64]) -> f64 {
        match self {
            Aggregation::Sum => v.iter().sum(),
            Aggregation::Mean => v.iter().sum::<f64>() / v.len() as f64,
            Aggregation::Max => v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

impl FromStr for Aggregation {
    type Err = WidthError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "sum" => Aggregation::Sum,
            "mean" => Aggregation::Mean,
            "max" => Aggregation::Max,
            other => {
                return Err(WidthError::InvalidArgument(format!(
                    "unknown aggregation `{other}` (expected sum, mean or max)"
                )))
            }
        })
    }
}

/// Gradients of the seven projections (in [`slm_model::PROJECTIONS`] order) of each layer in `layers`.
#[derive(Debug)]
pub struct Gradients {
    pub layers: Vec<usize>,
    /// `grad[k][p]`: ∂L/∂W for projection p of layer `layers[k]` (mean loss over every predicted token).
    pub grad: Vec<Vec<Tensor>>,
    /// `fisher[k][p]`: (1/N)·Σₙ (∂Lₙ/∂W)² over the N windows, when asked for.
    pub fisher: Option<Vec<Vec<Tensor>>>,
    /// The calibration loss of the unpruned model.
    pub loss: f64,
    /// Backward passes run (1, plus one per window for the Fisher diagonal).
    pub backward_passes: usize,
}

fn projections_mut(w: &mut LayerWeights) -> [&mut Tensor; 7] {
    [&mut w.q_proj, &mut w.k_proj, &mut w.v_proj, &mut w.o_proj, &mut w.gate_proj, &mut w.up_proj, &mut w.down_proj]
}

/// The seven projections of a layer, in [`slm_model::PROJECTIONS`] order.
pub fn projections(w: &LayerWeights) -> [&Tensor; 7] {
    [&w.q_proj, &w.k_proj, &w.v_proj, &w.o_proj, &w.gate_proj, &w.up_proj, &w.down_proj]
}

/// A copy of `model` whose projections in `layers` are variables, with the variables.
fn with_variables(model: &Model, layers: &[usize]) -> Result<(Model, Vec<Vec<Var>>)> {
    let mut m = model.clone();
    let mut vars = Vec::with_capacity(layers.len());
    for &i in layers {
        let mut vs = Vec::with_capacity(7);
        for t in projections_mut(m.weights.layer_mut(i)?) {
            let v = Var::from_tensor(&t.to_dtype(candle_core::DType::F32)?)?;
            *t = v.as_tensor().clone();
            vs.push(v);
        }
        vars.push(vs);
    }
    Ok((m, vars))
}

/// Mean next-token cross-entropy over every position of every window (differentiable kernels).
pub fn lm_loss(model: &Model, windows: &[Vec<u32>]) -> Result<Tensor> {
    if windows.iter().any(|w| w.len() < 2) {
        return Err(WidthError::InvalidArgument("calibration windows need at least 2 tokens".into()));
    }
    let batch = Batch::new(&model.spec, windows, &model.device)?;
    let positions: Vec<Vec<usize>> = windows.iter().map(|w| (0..w.len() - 1).collect()).collect();
    let out = model.forward_batch(&batch, &positions, false, Mode::Differentiable)?;
    let logits = out.logits.ok_or_else(|| WidthError::InvalidArgument("no logits".into()))?;
    let targets: Vec<u32> = windows.iter().flat_map(|w| w[1..].iter().copied()).collect();
    let targets = Tensor::from_vec(targets.clone(), targets.len(), &model.device)?;
    Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
}

/// Positions scored in each LM-head chunk of [`gradients`]: `CHUNK × vocab` logits (and their gradient) at a
/// time instead of every position's (a 49,152-way log-softmax at 1,270 positions is 250 MB per copy).
pub const LOSS_CHUNK: usize = 128;

/// One group of calibration windows in the layer-by-layer pass: its batch, the stored input of every layer from
/// the lowest pruned one, and the gradient of its mean loss with respect to the current layer's output.
struct Group {
    batch: Batch,
    inputs: Vec<Tensor>,
    grad_out: Tensor,
    /// Its positions' share of all positions: the weight of its mean loss in the total mean.
    share: f64,
    loss: f64,
}

impl Group {
    /// Runs the forward pass (no graph kept), storing layer inputs from `lowest`, and the LM-head loss of the
    /// group's mean next-token cross-entropy in chunks of [`LOSS_CHUNK`] positions with its gradient.
    fn new(model: &Model, windows: &[Vec<u32>], lowest: usize, total_positions: usize) -> Result<Self> {
        let n_layers = model.spec.num_layers();
        let batch = Batch::new(&model.spec, windows, &model.device)?;
        let mode = Mode::Differentiable;
        let mut x = model.embed(&batch)?;
        if lowest > 0 {
            x = model.run_layers(x, 0..lowest, &batch, mode)?;
        }
        let mut inputs = Vec::with_capacity(n_layers - lowest);
        for i in lowest..n_layers {
            let next = model.run_layers(x.clone(), i..i + 1, &batch, mode)?;
            inputs.push(x);
            x = next;
        }
        let (b, t, h) = x.dims3()?;
        // The rows (sequence s, position p < len - 1) that predict a token, and those tokens.
        let rows: Vec<u32> = (0..b).flat_map(|s| (0..batch.lengths[s] - 1).map(move |p| (s * t + p) as u32)).collect();
        let targets: Vec<u32> = windows.iter().flat_map(|w| w[1..].iter().copied()).collect();
        let n = rows.len();
        let flat = x.reshape((b * t, h))?;
        let mut grad_out = Tensor::zeros((b * t, h), flat.dtype(), flat.device())?;
        let mut loss = 0.0f64;
        for start in (0..n).step_by(LOSS_CHUNK) {
            let end = (start + LOSS_CHUNK).min(n);
            let idx = Tensor::new(&rows[start..end], flat.device())?;
            let xv = Var::from_tensor(&flat.index_select(&idx, 0)?)?;
            let y = model.final_norm(xv.as_tensor(), mode)?;
            // The head's part by hand (vocabulary chunk by chunk, no copy of the head in the graph), then the
            // final norm's by autodiff: this chunk's share of the group's mean cross-entropy.
            let share = (end - start) as f64 / n as f64;
            let (part, gy) = model.head_ce_gradient(&y.detach(), &targets[start..end], share)?;
            loss += part;
            let store = (y * gy)?.sum_all()?.backward()?;
            let g = store.get(xv.as_tensor()).ok_or_else(|| no_gradient("the last hidden state"))?;
            grad_out = grad_out.index_add(&idx, g, 0)?;
        }
        let grad_out = grad_out.reshape((b, t, h))?;
        Ok(Group { batch, inputs, grad_out, share: n as f64 / total_positions as f64, loss })
    }
}

/// A projection hook for the layer-by-layer backward pass: every projection is [`frozen_linear`] (the weight
/// stays in its stored dtype, upcast only while used, and gets no gradient), and with `record` each output is
/// `y + z` with `z` a zero variable, so the backward pass hands back `∂L/∂y` and the weight gradient is formed
/// from it and the projection's input as `(∂L/∂y)ᵀ · x` one projection at a time ([`LayerGrads`]): no f32 copy
/// of the layer's weights and no gradient of all seven projections at once is ever held.
struct Taps {
    record: bool,
    got: std::cell::RefCell<Vec<(usize, Tensor, Var)>>,
}

impl slm_model::LayerAdapter for Taps {
    fn project(&self, _layer: usize, name: &'static str, x: &Tensor, w: &Tensor) -> slm_model::Result<Tensor> {
        let y = slm_model::fused::frozen_linear(x, w)?;
        if !self.record {
            return Ok(y);
        }
        let p = slm_model::PROJECTIONS.iter().position(|&n| n == name).expect("a projection name");
        let z = Var::zeros(y.shape(), y.dtype(), y.device())?;
        let out = (y + z.as_tensor())?;
        self.got.borrow_mut().push((p, x.detach(), z));
        Ok(out)
    }
}

/// What the backward step of one pruned layer leaves: for each window group, its share of the mean loss and,
/// per projection, the input rows `x: [R, in]` and output gradients `∂L/∂y: [R, out]`, from which
/// [`LayerGrads::projection`] forms one projection's weight gradient (and Fisher diagonal) when asked.
pub struct LayerGrads {
    groups: Vec<(f64, Vec<(Tensor, Tensor)>)>,
    fisher: bool,
}

impl LayerGrads {
    /// `∂L/∂W` of projection `p` ([`slm_model::PROJECTIONS`] order) and, for a per-window pass, its Fisher
    /// diagonal `(1/N)·Σₙ (∂Lₙ/∂W)²`.
    pub fn projection(&self, p: usize) -> Result<(Tensor, Option<Tensor>)> {
        let (mut grad, mut fisher): (Option<Tensor>, Option<Tensor>) = (None, None);
        let add = |acc: Option<Tensor>, t: Tensor| -> Result<Option<Tensor>> {
            Ok(Some(match acc {
                None => t,
                Some(a) => (a + t)?,
            }))
        };
        for (share, taps) in &self.groups {
            let (x, gy) = &taps[p];
            let g = gy.t()?.matmul(x)?;
            if self.fisher {
                fisher = add(fisher, g.sqr()?)?;
            }
            grad = add(grad, (g * *share)?)?;
        }
        let n = self.groups.len() as f64;
        let fisher = if self.fisher { Some((fisher.ok_or_else(|| no_gradient("a projection"))? / n)?) } else { None };
        Ok((grad.ok_or_else(|| no_gradient("a projection"))?, fisher))
    }

    /// All seven projections' gradients (and Fisher diagonals).
    fn all(&self) -> Result<(Vec<Tensor>, Option<Vec<Tensor>>)> {
        let got = (0..7).map(|p| self.projection(p)).collect::<Result<Vec<_>>>()?;
        let (g, f): (Vec<_>, Vec<_>) = got.into_iter().unzip();
        Ok((g, if self.fisher { Some(f.into_iter().flatten().collect()) } else { None }))
    }
}

/// The backward pass layer by layer with recomputation. A forward pass stores the input of each layer from the
/// lowest of `layers` up (no graph kept); the gradient of the mean loss with respect to the last hidden state
/// comes from the final norm and the LM head in chunks of [`LOSS_CHUNK`] positions; then, from the top, each
/// layer is recomputed with its input as a variable (and, for a layer of `layers`, a tap on each projection:
/// [`Taps`]), and `Σ out ⊙ ∂L/∂out` is pushed back through it alone.
///
/// With `per_window`, every window is its own group (its own chain), which gives each window's gradient: the
/// Fisher diagonal `(1/N)·Σₙ (∂Lₙ/∂W)²` and, weighted by positions, the gradient of the total mean. Otherwise
/// all windows go as one batch.
///
/// `on_layer(i, grads)` gets each layer of `layers` as soon as its backward step is done, from the top; nothing
/// of it is kept afterwards. Peak memory: the stored inputs, one layer's weights in their stored dtype and its
/// graph, one projection's gradient, and one chunk of logits. Returns the mean loss.
fn layerwise_pass(
    model: &Model,
    windows: &[Vec<u32>],
    layers: &[usize],
    per_window: bool,
    on_layer: &mut dyn FnMut(usize, LayerGrads) -> Result<()>,
) -> Result<f64> {
    if windows.is_empty() {
        return Err(WidthError::InvalidArgument("the gradient pass needs at least one calibration window".into()));
    }
    if windows.iter().any(|w| w.len() < 2) {
        return Err(WidthError::InvalidArgument("calibration windows need at least 2 tokens".into()));
    }
    let n_layers = model.spec.num_layers();
    if let Some(&bad) = layers.iter().find(|&&i| i >= n_layers) {
        return Err(WidthError::InvalidArgument(format!("layer {bad} is out of range (the model has {n_layers})")));
    }
    let lowest = layers.iter().copied().min().unwrap_or(n_layers);
    let total: usize = windows.iter().map(|w| w.len() - 1).sum();
    let mut groups = if per_window {
        windows.iter().map(|w| Group::new(model, std::slice::from_ref(w), lowest, total)).collect::<Result<Vec<_>>>()?
    } else {
        vec![Group::new(model, windows, lowest, total)?]
    };
    let loss: f64 = groups.iter().map(|g| g.share * g.loss).sum();
    let mode = Mode::Differentiable;
    for i in (lowest..n_layers).rev() {
        let pruned = layers.contains(&i);
        let mut grads = LayerGrads { groups: Vec::with_capacity(groups.len()), fisher: per_window };
        // Read once per layer (a layer read when used would otherwise be read once per window group).
        let w = model.weights.layer(i)?;
        for g in groups.iter_mut() {
            let input = &g.inputs[i - lowest];
            let need_input = i > lowest;
            let xv = if need_input { Some(Var::from_tensor(input)?) } else { None };
            let x_in = xv.as_ref().map(|v| v.as_tensor().clone()).unwrap_or_else(|| input.clone());
            let taps = Taps { record: pruned, got: Default::default() };
            let ctx = model.layer_ctx(i, mode, &taps);
            let out = slm_model::forward::decoder_layer(&x_in, &w, &model.spec.layers[i], &g.batch, &ctx)?;
            let store = (out * &g.grad_out)?.sum_all()?.backward()?;
            if pruned {
                let mut per: Vec<Option<(Tensor, Tensor)>> = vec![None; 7];
                for (p, x, z) in taps.got.into_inner() {
                    let gy = store.get(z.as_tensor()).ok_or_else(|| no_gradient("a projection"))?;
                    // As `[rows, in]` and `[rows, out]`.
                    let rows = |t: &Tensor| t.reshape(((), t.dim(candle_core::D::Minus1)?));
                    per[p] = Some((rows(&x)?, rows(gy)?));
                }
                let per =
                    per.into_iter().map(|t| t.ok_or_else(|| no_gradient("a projection"))).collect::<Result<_>>()?;
                grads.groups.push((g.share, per));
            }
            if let Some(v) = &xv {
                g.grad_out = store.get(v.as_tensor()).ok_or_else(|| no_gradient("a layer input"))?.clone();
            }
        }
        drop(w);
        if pruned {
            on_layer(i, grads)?;
        }
    }
    Ok(loss)
}

fn no_gradient(what: &str) -> WidthError {
    WidthError::InvalidArgument(format!("{what} received no gradient (detached kernel in the forward pass?)"))
}

fn finite_loss(loss: f64) -> Result<f64> {
    if loss.is_finite() {
        Ok(loss)
    } else {
        Err(WidthError::InvalidArgument(format!(
            "the calibration loss is {loss}: the model's activations are not finite on the calibration windows, so \
             no importance can be computed"
        )))
    }
}

/// [`layerwise_pass`] with `per_layer(i, grads)` turning each layer of `layers` into a `T` as it is reached:
/// the results in `layers` order, the mean loss (checked finite) and the backward chains run.
fn collect_layers<T>(
    model: &Model,
    windows: &[Vec<u32>],
    layers: &[usize],
    per_window: bool,
    per_layer: &mut dyn FnMut(usize, LayerGrads) -> Result<T>,
) -> Result<(Vec<T>, f64, usize)> {
    let mut got: Vec<Option<T>> = layers.iter().map(|_| None).collect();
    let loss = layerwise_pass(model, windows, layers, per_window, &mut |i, g| {
        let k = layers.iter().position(|&x| x == i).expect("only pruned layers are reported");
        got[k] = Some(per_layer(i, g)?);
        Ok(())
    })?;
    let got = got.into_iter().map(|x| x.ok_or_else(|| no_gradient("a pruned layer"))).collect::<Result<_>>()?;
    Ok((got, finite_loss(loss)?, if per_window { windows.len() } else { 1 }))
}

/// The gradients of the calibration loss for the projections of `layers` (and the Fisher diagonal), by the
/// layer-by-layer pass ([`layerwise_pass`]: one chain over the batch, or one per window with `fisher`), all held
/// in memory: for tests and small models; [`gradient_scores`] folds them into unit scores layer by layer instead.
/// `on_pass` is called after each layer's backward step. The same numbers as [`gradients_whole_graph`] up to float
/// summation order.
pub fn gradients(
    model: &Model,
    windows: &[Vec<u32>],
    layers: &[usize],
    fisher: bool,
    on_pass: &mut dyn FnMut(),
) -> Result<Gradients> {
    let (got, loss, backward_passes) = collect_layers(model, windows, layers, fisher, &mut |_, g| {
        let all = g.all()?;
        on_pass();
        Ok(all)
    })?;
    let (grad, fish): (Vec<_>, Vec<_>) = got.into_iter().unzip();
    let fisher = fisher.then(|| fish.into_iter().flatten().collect());
    Ok(Gradients { layers: layers.to_vec(), grad, fisher, loss, backward_passes })
}

/// What [`gradient_scores`] returns: every pruned layer's unit scores, in `layers` order, and the loss.
#[derive(Debug, Clone)]
pub struct ScoredGradients {
    pub layers: Vec<usize>,
    pub scores: Vec<UnitScores>,
    pub loss: f64,
    /// Backward chains run: 1, or one per window for the Fisher diagonal (each also gives its share of the
    /// gradient).
    pub backward_passes: usize,
}

/// Unit scores of every layer in `settings.layers` from the gradient of the calibration loss, each layer's
/// gradients folded into its scores ([`score_layer`]) as soon as the layer-by-layer pass produces them and then
/// dropped: memory holds one layer's gradients, not the model's. `on_layer` is called after each layer.
pub fn gradient_scores(
    model: &Model,
    windows: &[Vec<u32>],
    importance: Importance,
    aggregation: Aggregation,
    layers: &[usize],
    on_layer: &mut dyn FnMut(),
) -> Result<ScoredGradients> {
    if !importance.needs_gradient() {
        return Err(WidthError::InvalidArgument(format!("importance {} needs no gradient pass", importance.as_str())));
    }
    let (scores, loss, backward_passes) =
        collect_layers(model, windows, layers, importance.needs_fisher(), &mut |i, g| {
            let (l, w) = (&model.spec.layers[i], model.weights.layer(i)?);
            // One projection's gradient at a time, folded into its member scores and dropped.
            let scores = score_layer_with(importance, aggregation, i, l, &w, 0, &mut |p| {
                let (grad, fisher) = g.projection(p)?;
                Ok((Some(grad), fisher))
            })?;
            on_layer();
            Ok(scores)
        })?;
    Ok(ScoredGradients { layers: layers.to_vec(), scores, loss, backward_passes })
}

/// The gradient pass through the whole graph at once (every position's logits, one backward pass): the
/// reference that [`gradients`] is tested against; memory grows with positions × vocabulary.
pub fn gradients_whole_graph(
    model: &Model,
    windows: &[Vec<u32>],
    layers: &[usize],
    fisher: bool,
    on_pass: &mut dyn FnMut(),
) -> Result<Gradients> {
    if windows.is_empty() {
        return Err(WidthError::InvalidArgument("the gradient pass needs at least one calibration window".into()));
    }
    let (m, vars) = with_variables(model, layers)?;
    let grad_of = |store: &candle_core::backprop::GradStore, v: &Var| -> Result<Tensor> {
        // A projection the loss does not reach (impossible in a Llama, but never silently zero) is an error.
        store.get(v.as_tensor()).cloned().ok_or_else(|| no_gradient("a projection"))
    };
    let mut passes = 0;
    let fisher = if fisher {
        let mut acc: Vec<Vec<Tensor>> = Vec::with_capacity(layers.len());
        for (n, w) in windows.iter().enumerate() {
            let store = lm_loss(&m, std::slice::from_ref(w))?.backward()?;
            passes += 1;
            for (k, vs) in vars.iter().enumerate() {
                for (p, v) in vs.iter().enumerate() {
                    let g2 = grad_of(&store, v)?.sqr()?;
                    if n == 0 {
                        if p == 0 {
                            acc.push(Vec::with_capacity(7));
                        }
                        acc[k].push(g2);
                    } else {
                        acc[k][p] = (&acc[k][p] + g2)?;
                    }
                }
            }
            on_pass();
        }
        let n = windows.len() as f64;
        Some(
            acc.into_iter()
                .map(|ts| ts.into_iter().map(|t| t / n).collect::<candle_core::Result<Vec<_>>>())
                .collect::<candle_core::Result<Vec<_>>>()?,
        )
    } else {
        None
    };
    let loss = lm_loss(&m, windows)?;
    let loss_value = finite_loss(loss.to_scalar::<f32>()? as f64)?;
    let store = loss.backward()?;
    passes += 1;
    on_pass();
    let grad = vars
        .iter()
        .map(|vs| vs.iter().map(|v| grad_of(&store, v)).collect::<Result<Vec<_>>>())
        .collect::<Result<Vec<_>>>()?;
    Ok(Gradients { layers: layers.to_vec(), grad, fisher, loss: loss_value, backward_passes: passes })
}

/// Scores of every unit of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitScores {
    /// One score per KV head (with its query heads).
    pub attention: Vec<f64>,
    /// One score per MLP channel.
    pub mlp: Vec<f64>,
}

/// Per-row (`axis = 1`) or per-column (`axis = 0`) salience of one member matrix.
fn member_scores(
    importance: Importance,
    w: &Tensor,
    g: Option<&Tensor>,
    fisher: Option<&Tensor>,
    axis: usize,
) -> Result<Vec<f64>> {
    let w = &w.to_dtype(candle_core::DType::F32)?; // a stored bf16/f16 weight, upcast
    let need = |t: Option<&Tensor>, what: &str| {
        t.cloned()
            .ok_or_else(|| WidthError::InvalidArgument(format!("importance {} needs {what}", importance.as_str())))
    };
    let s = match importance {
        Importance::Element1 => (w * need(g, "gradients")?)?.abs()?.sum(axis)?,
        Importance::Element2 => {
            let first = (w * need(g, "gradients")?)?;
            let second = ((w * need(fisher, "the Fisher diagonal")?)? * w)?;
            (first - (second * 0.5)?)?.abs()?.sum(axis)?
        }
        Importance::Vector => (w * need(g, "gradients")?)?.sum(axis)?.abs()?,
        Importance::L2 => w.sqr()?.sum(axis)?,
        Importance::Random => unreachable!("random scores are drawn per unit"),
    };
    Ok(s.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?)
}

/// Scores every unit of layer `layer` (spec `l`, weights `w`). `grad` / `fisher` are the layer's seven
/// projection gradients from [`gradients`] when the importance needs them.
#[allow(clippy::too_many_arguments)] // each argument is one of the paper's inputs; a struct would only rename them
pub fn score_layer(
    importance: Importance,
    aggregation: Aggregation,
    layer: usize,
    l: &LayerSpec,
    w: &LayerWeights,
    grad: Option<&[Tensor]>,
    fisher: Option<&[Tensor]>,
    seed: u64,
) -> Result<UnitScores> {
    if importance == Importance::Random {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (layer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let attention = (0..AttentionUnit::count(l)).map(|_| rng.random::<f64>()).collect();
        let mlp = (0..l.intermediate_size).map(|_| rng.random::<f64>()).collect();
        return Ok(UnitScores { attention, mlp });
    }
    score_layer_with(importance, aggregation, layer, l, w, seed, &mut |p| {
        Ok((grad.map(|g| g[p].clone()), fisher.map(|f| f[p].clone())))
    })
}

/// [`score_layer`] with projection `p`'s gradient and Fisher diagonal from `inputs(p)`, asked for one projection
/// at a time (so that only one is held).
#[allow(clippy::too_many_arguments)] // as score_layer
pub fn score_layer_with(
    importance: Importance,
    aggregation: Aggregation,
    layer: usize,
    l: &LayerSpec,
    w: &LayerWeights,
    seed: u64,
    inputs: &mut dyn FnMut(usize) -> Result<(Option<Tensor>, Option<Tensor>)>,
) -> Result<UnitScores> {
    if importance == Importance::Random {
        return score_layer(importance, aggregation, layer, l, w, None, None, seed);
    }
    let ws = projections(w);
    let mut member = |p: usize, axis: usize| {
        let (g, f) = if importance.needs_gradient() { inputs(p)? } else { (None, None) };
        member_scores(importance, ws[p], g.as_ref(), f.as_ref(), axis)
    };
    // Out-channel members are scored by row, in-channel members (o, down) by column.
    let (q, k, v, o) = (member(0, 1)?, member(1, 1)?, member(2, 1)?, member(3, 0)?);
    let (gate, up, down) = (member(4, 1)?, member(5, 1)?, member(6, 0)?);
    let hd = l.head_dim;
    let attention = AttentionUnit::all(l)
        .iter()
        .map(|u| {
            (0..hd)
                .map(|t| {
                    let qs: f64 = u.query_heads.iter().map(|&h| q[h * hd + t]).sum();
                    let os: f64 = u.query_heads.iter().map(|&h| o[h * hd + t]).sum();
                    match u.kv_channels.get(t) {
                        Some(&c) => aggregation.combine(&[k[c], v[c], qs, os]),
                        None => aggregation.combine(&[qs, os]), // a query-head unit: the KV head stays
                    }
                })
                .sum()
        })
        .collect();
    let mlp = (0..l.intermediate_size).map(|i| aggregation.combine(&[gate[i], up[i], down[i]])).collect();
    Ok(UnitScores { attention, mlp })
}
