//! A [`DepthPlan`] says which original layers merge or go; [`apply`] turns it into a model with fewer layers.

use serde::{Deserialize, Serialize};
use slm_model::{LayerSlot, LayerSpec, LayerWeights, Model, Weights};

use crate::error::{DepthError, Result};
use crate::merge::{merge_window, merged_spec, MergeOp};

/// Which original layers become one layer, and which are dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepthPlan {
    /// Layers of the model the plan is for.
    pub num_layers: usize,
    /// Windows `[lo, hi]` of original layer indices (`lo < hi`), each fused into one layer at `lo`'s place.
    pub merges: Vec<[usize; 2]>,
    /// Original layers removed outright (the residual stream passes through unchanged).
    pub removed: Vec<usize>,
    pub operator: MergeOp,
}

impl DepthPlan {
    /// Checks that windows and removed layers are in range, windows have at least two layers, and nothing
    /// overlaps. Sorts both lists.
    pub fn new(
        num_layers: usize,
        mut merges: Vec<[usize; 2]>,
        mut removed: Vec<usize>,
        operator: MergeOp,
    ) -> Result<Self> {
        merges.sort();
        removed.sort();
        let mut used = vec![false; num_layers];
        let mut claim = |i: usize, what: String| -> Result<()> {
            if i >= num_layers {
                return Err(DepthError::InvalidArgument(format!(
                    "{what}: layer {i} does not exist ({num_layers} layers)"
                )));
            }
            if std::mem::replace(&mut used[i], true) {
                return Err(DepthError::InvalidArgument(format!("{what}: layer {i} is already in another group")));
            }
            Ok(())
        };
        for &[lo, hi] in &merges {
            if lo >= hi {
                return Err(DepthError::InvalidArgument(format!("merge window [{lo}, {hi}] needs lo < hi")));
            }
            for i in lo..=hi {
                claim(i, format!("merge window [{lo}, {hi}]"))?;
            }
        }
        for &i in &removed {
            claim(i, "removed layers".into())?;
        }
        if num_layers - Self::count_removed(&merges, &removed) < 1 {
            return Err(DepthError::InvalidArgument("the plan removes every layer".into()));
        }
        Ok(DepthPlan { num_layers, merges, removed, operator })
    }

    fn count_removed(merges: &[[usize; 2]], removed: &[usize]) -> usize {
        merges.iter().map(|[lo, hi]| hi - lo).sum::<usize>() + removed.len()
    }

    /// Layers the plan takes away.
    pub fn layers_removed(&self) -> usize {
        Self::count_removed(&self.merges, &self.removed)
    }

    /// For each layer of the pruned model, the window `(lo, hi)` of original layers it comes from (`lo == hi`
    /// for a layer kept as is).
    pub fn output_layers(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.num_layers {
            if let Some(&[lo, hi]) = self.merges.iter().find(|w| w[0] == i) {
                out.push((lo, hi));
                i = hi + 1;
            } else {
                if self.removed.binary_search(&i).is_err() {
                    out.push((i, i));
                }
                i += 1;
            }
        }
        out
    }
}

fn check_plan(model: &Model, plan: &DepthPlan) -> Result<()> {
    if plan.num_layers != model.spec.num_layers() {
        return Err(DepthError::InvalidArgument(format!(
            "the plan is for {} layers, the model has {}",
            plan.num_layers,
            model.spec.num_layers()
        )));
    }
    Ok(())
}

/// The layers of `model` after `plan` (shapes and weights), without building a whole model.
pub fn planned_layers(model: &Model, plan: &DepthPlan) -> Result<Vec<(LayerSpec, LayerWeights)>> {
    check_plan(model, plan)?;
    plan.output_layers()
        .into_iter()
        .map(|(lo, hi)| {
            let window = model.weights.load_layers(lo..hi + 1)?;
            merge_window(&window, &model.spec.layers[lo..=hi], lo, plan.operator)
        })
        .collect()
}

/// The pruned model: a plain Llama with fewer (possibly merged) layers. The input model is not changed. Layers
/// of a model read when used stay so: a kept layer is the same slot, a fused window is fused when it is used or
/// written.
pub fn apply(model: &Model, plan: &DepthPlan) -> Result<Model> {
    check_plan(model, plan)?;
    let mut specs = Vec::new();
    let mut layers = Vec::new();
    for (lo, hi) in plan.output_layers() {
        let window_specs = model.spec.layers[lo..=hi].to_vec();
        specs.push(merged_spec(&window_specs, lo, plan.operator)?);
        // A one-layer window, and delete or top, keep one layer as it is: the same slot.
        let kept = match plan.operator {
            _ if lo == hi => Some(lo),
            MergeOp::Delete => Some(lo),
            MergeOp::Top => Some(hi),
            _ => None,
        };
        if let Some(k) = kept {
            layers.push(model.weights.layers[k].clone());
            continue;
        }
        let slots = model.weights.layers[lo..=hi].to_vec();
        let dtype = slots[0].dtype();
        let op = plan.operator;
        layers.push(LayerSlot::combine_lazily(slots, dtype, move |ws| {
            merge_window(&ws, &window_specs, lo, op)
                .map(|(_, w)| w)
                .map_err(|e| slm_model::ModelError::InvalidArgument(format!("merging layers {lo}..={hi}: {e}")))
        })?);
    }
    let mut spec = model.spec.clone();
    spec.layers = specs;
    let weights = Weights { layers, ..model.weights.clone() };
    let mut out = Model::from_parts(spec, weights, model.tokenizer.clone(), &model.device)?;
    out.source = None;
    Ok(out)
}
