//! Block-wise pruning: one ratio applied to every layer of a range, which units go ([`WidthPlan`]), and
//! [`apply`], which slices the tensors.
//!
//! In each pruned layer `n − ⌊n·(1 − ratio)⌋` of its n KV-head units and of its n MLP channels are removed, the
//! lowest-scoring first (LLM-Pruner's local mode). The ratio counts units, not parameters; [`parameters_after`]
//! and [`ratio_for_target`] translate between the two.

use std::ops::Range;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use slm_model::{LayerSpec, Model};

use crate::groups::{check_ratio, units_to_remove, AttentionUnit};
use crate::importance::{score_layer, Aggregation, Gradients, Importance, ScoredGradients, UnitScores};
use crate::{Result, WidthError};

/// LLM-Pruner keeps the first 4 and the last 2 of LLaMA-7B's 32 layers dense (`--block_*_layer_start 4
/// --block_*_layer_end 30`). Scaled to `num_layers`: the first round(4·L/32) and the last round(2·L/32) layers
/// stay dense (30 layers: 4..28; 17 layers: 2..16). A model too shallow for that prunes every layer.
pub fn default_layer_range(num_layers: usize) -> Range<usize> {
    let head = (4.0 * num_layers as f64 / 32.0).round() as usize;
    let tail = (2.0 * num_layers as f64 / 32.0).round() as usize;
    if head + tail >= num_layers {
        0..num_layers
    } else {
        head..num_layers - tail
    }
}

/// Parses `A..B` (end exclusive) or `A..=B`, and checks it against the model's depth.
pub fn parse_layer_range(s: &str, num_layers: usize) -> Result<Range<usize>> {
    let bad = || WidthError::InvalidArgument(format!("layer range `{s}`: expected A..B (end exclusive) or A..=B"));
    let (a, b, inclusive) = if let Some((a, b)) = s.split_once("..=") {
        (a, b, true)
    } else if let Some((a, b)) = s.split_once("..") {
        (a, b, false)
    } else {
        return Err(bad());
    };
    let a: usize = a.trim().parse().map_err(|_| bad())?;
    let b: usize = b.trim().parse().map_err(|_| bad())?;
    let range = a..if inclusive { b + 1 } else { b };
    check_layer_range(&range, num_layers)?;
    Ok(range)
}

pub fn check_layer_range(range: &Range<usize>, num_layers: usize) -> Result<()> {
    if range.start >= range.end || range.end > num_layers {
        return Err(WidthError::InvalidArgument(format!(
            "layer range {}..{} is empty or outside the model's {num_layers} layers (0..{num_layers})",
            range.start, range.end
        )));
    }
    Ok(())
}

/// Pruning ratios: the share of attention units (KV-head groups) and of MLP channels removed in every pruned
/// layer. LLM-Pruner uses one ratio for both; [`ratio_for_target`] trims the MLP ratio to hit a parameter budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ratios {
    pub attention: f64,
    pub mlp: f64,
    /// `--round-to N`: each pruned layer keeps a multiple of N MLP channels (the multiple nearest to what `mlp`
    /// keeps, at least N, at most all), so that the pruned matrices keep shapes that real kernels (quantised
    /// blocks of 32 or 256, SIMD tiles) run at full speed. Attention is already in whole units (a KV head with its
    /// query heads: multiples of `group size · head_dim` rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_multiple: Option<usize>,
}

impl Ratios {
    pub fn uniform(r: f64) -> Self {
        Ratios { attention: r, mlp: r, mlp_multiple: None }
    }

    /// The same ratios with the MLP width of each pruned layer rounded to a multiple of `n` (see
    /// [`Ratios::mlp_multiple`]).
    pub fn rounded_to(self, n: Option<usize>) -> Self {
        Ratios { mlp_multiple: n, ..self }
    }

    /// How many of a layer's `n` MLP channels these ratios remove: [`units_to_remove`], then the width kept
    /// rounded to the nearest multiple of [`Ratios::mlp_multiple`] (ties up; at least one multiple, at most `n`).
    pub fn mlp_channels_to_remove(&self, n: usize) -> Result<usize> {
        let removed = units_to_remove(n, self.mlp, "MLP channels")?;
        let Some(m) = self.mlp_multiple else { return Ok(removed) };
        if m == 0 {
            return Err(WidthError::InvalidArgument("--round-to must be at least 1".into()));
        }
        if m > n {
            return Err(WidthError::InvalidArgument(format!(
                "--round-to {m} is more than the {n} MLP channels of a layer"
            )));
        }
        let kept = n - removed;
        let rounded = (((kept + m / 2) / m) * m).clamp(m, n - n % m);
        Ok(n - rounded)
    }
}

/// The shape of layer `l` after removing `ratio` of its units.
fn pruned_shape(l: &LayerSpec, ratio: Ratios) -> Result<LayerSpec> {
    let n = AttentionUnit::count(l);
    let units = units_to_remove(n, ratio.attention, AttentionUnit::what(l))?;
    let ch = ratio.mlp_channels_to_remove(l.intermediate_size)?;
    Ok(LayerSpec { intermediate_size: l.intermediate_size - ch, ..AttentionUnit::kept_shape(l, n - units) })
}

/// Parameters of the model after pruning `ratio` of the units of every layer in `range`.
pub fn parameters_after(spec: &slm_model::ModelSpec, ratio: Ratios, range: &Range<usize>) -> Result<usize> {
    check_layer_range(range, spec.num_layers())?;
    let mut s = spec.clone();
    for i in range.clone() {
        s.layers[i] = pruned_shape(&spec.layers[i], ratio)?;
    }
    Ok(s.num_parameters())
}

/// Ratios that remove the share `target` of all parameters (embeddings included), within one MLP channel per
/// pruned layer when that is reachable. Attention units are coarse (a KV head with its query heads), so one ratio
/// for both (LLM-Pruner) can miss a budget by a whole head per layer. Among the attention ratios (one per distinct
/// head count) and MLP ratios on a 1e-4 grid, this picks the pair that meets the target within one channel group
/// with the two ratios closest together (LLM-Pruner's single ratio when it fits), else the closest pair.
pub fn ratio_for_target(spec: &slm_model::ModelSpec, range: &Range<usize>, target: f64) -> Result<Ratios> {
    ratio_for_target_rounded(spec, range, target, None)
}

/// [`ratio_for_target`] with each pruned layer's MLP width a multiple of `mlp_multiple` ([`Ratios::mlp_multiple`]).
pub fn ratio_for_target_rounded(
    spec: &slm_model::ModelSpec,
    range: &Range<usize>,
    target: f64,
    mlp_multiple: Option<usize>,
) -> Result<Ratios> {
    check_layer_range(range, spec.num_layers())?;
    for i in range.clone() {
        // A multiple that no layer can keep fails here, before the search.
        Ratios::uniform(0.0).rounded_to(mlp_multiple).mlp_channels_to_remove(spec.layers[i].intermediate_size)?;
    }
    if !(target > 0.0 && target < 1.0) {
        return Err(WidthError::InvalidArgument(format!("target ratio must be in (0, 1), got {target}")));
    }
    check_layer_range(range, spec.num_layers())?;
    let dense = spec.num_parameters() as f64;
    let wanted = target * dense;
    // One MLP channel in every pruned layer (a row of gate and up, a column of down).
    let group = (3 * spec.hidden_size * range.len()) as f64;
    let grid = |k: usize| k as f64 / 10_000.0;
    // Each distinct head count per layer, with the interval of grid ratios that gives it.
    let mut attention_levels: Vec<(Vec<usize>, f64, f64)> = Vec::new();
    for k in 0..10_000 {
        let r = grid(k);
        let Ok(kv): Result<Vec<usize>> = range
            .clone()
            .map(|i| units_to_remove(AttentionUnit::count(&spec.layers[i]), r, "attention units"))
            .collect()
        else {
            break;
        };
        match attention_levels.last_mut() {
            Some((last, _, hi)) if *last == kv => *hi = r,
            _ => attention_levels.push((kv, r, r)),
        }
    }
    // (misses the target by more than one group, |r_attention − r_mlp|, |error|); the attention ratio is the
    // point of its level's interval closest to the MLP ratio, so it equals it when one ratio fits both.
    let mut best: Option<((bool, f64, f64), Ratios)> = None;
    let mut max_removed: f64 = 0.0;
    for &(_, lo, hi) in &attention_levels {
        for k in 0..10_000 {
            let m = grid(k);
            let r = Ratios { attention: m.clamp(lo, hi), mlp: m, mlp_multiple };
            let Ok(after) = parameters_after(spec, r, range) else { break };
            let removed = dense - after as f64;
            max_removed = max_removed.max(removed);
            let err = (removed - wanted).abs();
            let key = (err > group, (r.attention - r.mlp).abs(), err);
            if best.as_ref().is_none_or(|(b, _)| key.partial_cmp(b) == Some(std::cmp::Ordering::Less)) {
                best = Some((key, r));
            }
        }
    }
    let ((far, _, _), r) = best.expect("ratio 0 is always valid");
    if far && wanted > max_removed {
        return Err(WidthError::InvalidArgument(format!(
            "pruning layers {}..{} can remove at most {:.1}% of the parameters, not {:.1}% (widen --layers)",
            range.start,
            range.end,
            100.0 * max_removed / dense,
            100.0 * target
        )));
    }
    Ok(r)
}

/// What width pruning removes from one layer, with the scores that decided it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerPrune {
    pub layer: usize,
    /// Attention units removed, ascending: KV heads (each with its query heads), or query heads in a layer with
    /// a single KV head (see [`AttentionUnit`]).
    #[serde(alias = "kv_heads_removed")]
    pub units_removed: Vec<usize>,
    /// The query heads that go with them, ascending.
    pub query_heads_removed: Vec<usize>,
    /// MLP channels removed, ascending.
    pub channels_removed: Vec<usize>,
    /// The score of every attention unit.
    #[serde(alias = "kv_head_scores")]
    pub unit_scores: Vec<f64>,
    pub channel_scores: Vec<f64>,
}

/// Which units go, per layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WidthPlan {
    pub num_layers: usize,
    pub importance: String,
    pub aggregation: String,
    /// Share of the units removed in every pruned layer.
    pub ratios: Ratios,
    /// Pruned layers, `[start, end)`.
    pub layer_range: [usize; 2],
    pub layers: Vec<LayerPrune>,
}

/// Settings of [`plan_width`].
#[derive(Debug, Clone)]
pub struct WidthSettings {
    pub ratio: Ratios,
    pub importance: Importance,
    pub aggregation: Aggregation,
    pub layers: Range<usize>,
    /// Seed of the random baseline.
    pub seed: u64,
}

/// The `n` lowest-scoring indices (ties: lower index first), ascending.
fn lowest(scores: &[f64], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut out = idx[..n].to_vec();
    out.sort_unstable();
    out
}

/// Scores the units of every layer in `settings.layers` and picks the ones to remove. `grads` must come from
/// [`crate::gradients`] over the same layers when the importance needs gradients.
pub fn plan_width(model: &Model, settings: &WidthSettings, grads: Option<&Gradients>) -> Result<WidthPlan> {
    check_settings(model, settings)?;
    if settings.importance.needs_gradient() && grads.is_none() {
        return Err(WidthError::InvalidArgument(format!(
            "importance {} needs a gradient pass",
            settings.importance.as_str()
        )));
    }
    let mut scores = Vec::new();
    for i in settings.layers.clone() {
        let (g, f) = match grads {
            Some(gr) if settings.importance.needs_gradient() => {
                let k = gr.layers.iter().position(|&x| x == i).ok_or_else(|| not_covered(i))?;
                (Some(gr.grad[k].as_slice()), gr.fisher.as_ref().map(|f| f[k].as_slice()))
            }
            _ => (None, None),
        };
        let w = model.weights.layer(i)?;
        let l = &model.spec.layers[i];
        scores.push(score_layer(settings.importance, settings.aggregation, i, l, &w, g, f, settings.seed)?);
    }
    select(model, settings, scores)
}

/// [`plan_width`] from unit scores that the layer-by-layer gradient pass already folded
/// ([`crate::importance::gradient_scores`], run with the same importance, aggregation and layers).
pub fn plan_width_scored(model: &Model, settings: &WidthSettings, scored: &ScoredGradients) -> Result<WidthPlan> {
    check_settings(model, settings)?;
    let scores = settings
        .layers
        .clone()
        .map(|i| {
            let k = scored.layers.iter().position(|&x| x == i).ok_or_else(|| not_covered(i))?;
            Ok(scored.scores[k].clone())
        })
        .collect::<Result<Vec<_>>>()?;
    select(model, settings, scores)
}

fn not_covered(i: usize) -> WidthError {
    WidthError::InvalidArgument(format!("the gradient pass did not cover layer {i}"))
}

fn check_settings(model: &Model, settings: &WidthSettings) -> Result<()> {
    check_ratio(settings.ratio.attention)?;
    check_ratio(settings.ratio.mlp)?;
    check_layer_range(&settings.layers, model.spec.num_layers())
}

/// The units to remove of every layer in `settings.layers`, given their scores (in that order): the lowest
/// scores, as many as the ratios say.
fn select(model: &Model, settings: &WidthSettings, scores: Vec<UnitScores>) -> Result<WidthPlan> {
    let mut layers = Vec::new();
    for (i, scores) in settings.layers.clone().zip(scores) {
        let l = &model.spec.layers[i];
        let kv = lowest(
            &scores.attention,
            units_to_remove(AttentionUnit::count(l), settings.ratio.attention, AttentionUnit::what(l))?,
        );
        let ch = lowest(&scores.mlp, settings.ratio.mlp_channels_to_remove(l.intermediate_size)?);
        let query_heads_removed = kv.iter().flat_map(|&g| AttentionUnit::new(l, g).query_heads).collect();
        layers.push(LayerPrune {
            layer: i,
            units_removed: kv,
            query_heads_removed,
            channels_removed: ch,
            unit_scores: scores.attention,
            channel_scores: scores.mlp,
        });
    }
    Ok(WidthPlan {
        num_layers: model.spec.num_layers(),
        importance: settings.importance.as_str().to_string(),
        aggregation: settings.aggregation.as_str().to_string(),
        ratios: settings.ratio,
        layer_range: [settings.layers.start, settings.layers.end],
        layers,
    })
}

fn keep_except(n: usize, removed: &[usize]) -> Vec<u32> {
    (0..n).filter(|i| !removed.contains(i)).map(|i| i as u32).collect()
}

/// The model with the plan's units removed: layers of different widths. The input model is not modified.
pub fn apply(model: &Model, plan: &WidthPlan) -> Result<Model> {
    if plan.num_layers != model.spec.num_layers() {
        return Err(WidthError::InvalidArgument(format!(
            "the plan is for a model of {} layers, this model has {}",
            plan.num_layers,
            model.spec.num_layers()
        )));
    }
    let mut spec = model.spec.clone();
    let mut weights = model.weights.clone();
    for p in &plan.layers {
        let l = *spec.layers.get(p.layer).ok_or_else(|| {
            WidthError::InvalidArgument(format!("plan names layer {} of a {}-layer model", p.layer, plan.num_layers))
        })?;
        let bad = |what: &str, n: usize, removed: &[usize]| -> Result<()> {
            if removed.iter().any(|&i| i >= n) || removed.windows(2).any(|w| w[0] >= w[1]) {
                return Err(WidthError::InvalidArgument(format!(
                    "layer {}: {what} to remove must be distinct, ascending and below {n}",
                    p.layer
                )));
            }
            if removed.len() >= n {
                return Err(WidthError::InvalidArgument(format!("layer {}: the plan removes all {n} {what}", p.layer)));
            }
            Ok(())
        };
        let n_units = AttentionUnit::count(&l);
        bad(AttentionUnit::what(&l), n_units, &p.units_removed)?;
        bad("MLP channels", l.intermediate_size, &p.channels_removed)?;
        let kept: Vec<usize> = (0..n_units).filter(|g| !p.units_removed.contains(g)).collect();
        let units: Vec<AttentionUnit> = kept.iter().map(|&g| AttentionUnit::new(&l, g)).collect();
        let q_idx: Vec<u32> = units.iter().flat_map(|u| u.q_channels.iter().map(|&c| c as u32)).collect();
        let kv_idx: Vec<u32> = if AttentionUnit::per_query_head(&l) {
            (0..l.head_dim as u32).collect() // the one KV head stays
        } else {
            units.iter().flat_map(|u| u.kv_channels.iter().map(|&c| c as u32)).collect()
        };
        let ch_idx = keep_except(l.intermediate_size, &p.channels_removed);
        let device = model.device.clone();
        // At once for a resident layer; when used or written for a layer read when used.
        let slot = weights.layers[p.layer].clone();
        let dtype = slot.dtype();
        weights.layers[p.layer] = slot.map_lazily(dtype, move |mut w| {
            let idx = |v: &[u32]| Tensor::from_vec(v.to_vec(), v.len(), &device);
            let (q_idx, kv_idx, ch_idx) = (idx(&q_idx)?, idx(&kv_idx)?, idx(&ch_idx)?);
            w.q_proj = w.q_proj.index_select(&q_idx, 0)?;
            w.k_proj = w.k_proj.index_select(&kv_idx, 0)?;
            w.v_proj = w.v_proj.index_select(&kv_idx, 0)?;
            w.o_proj = w.o_proj.index_select(&q_idx, 1)?;
            // Bias entries go with their rows; q/k norms act per head dimension and stay as they are.
            w.q_bias = w.q_bias.as_ref().map(|b| b.index_select(&q_idx, 0)).transpose()?;
            w.k_bias = w.k_bias.as_ref().map(|b| b.index_select(&kv_idx, 0)).transpose()?;
            w.v_bias = w.v_bias.as_ref().map(|b| b.index_select(&kv_idx, 0)).transpose()?;
            w.gate_proj = w.gate_proj.index_select(&ch_idx, 0)?;
            w.up_proj = w.up_proj.index_select(&ch_idx, 0)?;
            w.down_proj = w.down_proj.index_select(&ch_idx, 1)?;
            Ok(w)
        })?;
        spec.layers[p.layer] = LayerSpec {
            intermediate_size: l.intermediate_size - p.channels_removed.len(),
            ..AttentionUnit::kept_shape(&l, kept.len())
        };
    }
    Ok(Model::from_parts(spec, weights, model.tokenizer.clone(), &model.device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed: 20% of 1536 channels keeps ⌊1228.8⌋ = 1228; rounded to 256 that is 1280 (5 × 256, the
    /// nearest), to 32 it is 1216 (38 × 32; 1228 is 38.375 multiples).
    #[test]
    fn round_to_keeps_the_nearest_multiple() {
        let r = Ratios::uniform(0.2);
        assert_eq!(r.mlp_channels_to_remove(1536).unwrap(), 308);
        assert_eq!(r.rounded_to(Some(256)).mlp_channels_to_remove(1536).unwrap(), 256);
        assert_eq!(r.rounded_to(Some(32)).mlp_channels_to_remove(1536).unwrap(), 320);
        // At least one multiple stays; never more than the layer has.
        assert_eq!(Ratios::uniform(0.99).rounded_to(Some(256)).mlp_channels_to_remove(1536).unwrap(), 1280);
        assert_eq!(Ratios::uniform(0.0).rounded_to(Some(256)).mlp_channels_to_remove(1000).unwrap(), 1000 - 768);
        assert!(r.rounded_to(Some(0)).mlp_channels_to_remove(1536).is_err());
        assert!(r.rounded_to(Some(2048)).mlp_channels_to_remove(1536).unwrap_err().to_string().contains("2048"));
    }

    /// A searched budget with --round-to gives widths that are multiples in every pruned layer.
    #[test]
    fn target_search_respects_round_to() {
        let spec = slm_model::testing::smollm_spec();
        let range = 4..28;
        let r = ratio_for_target_rounded(&spec, &range, 0.2, Some(128)).unwrap();
        assert_eq!(r.mlp_multiple, Some(128));
        let kept =
            spec.layers[4].intermediate_size - r.mlp_channels_to_remove(spec.layers[4].intermediate_size).unwrap();
        assert_eq!(kept % 128, 0, "kept {kept}");
        let after = parameters_after(&spec, r, &range).unwrap() as f64;
        let removed = 1.0 - after / spec.num_parameters() as f64;
        // One 128-channel step in 24 layers is 24 · 3 · 576 · 128 parameters, 3.9% of the model.
        assert!((removed - 0.2).abs() < 0.04, "removed {removed}");
        assert!(ratio_for_target_rounded(&spec, &range, 0.2, Some(4096)).is_err());
    }
}
