//! Merge operators: how a window of consecutive layers becomes one layer.

use serde::{Deserialize, Serialize};
use slm_model::{LayerSpec, LayerWeights, PartKind};

use crate::error::{DepthError, Result};

/// How a window `lo..=hi` of layers is fused into one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MergeOp {
    /// The paper's formula (LaCo's RDSC): θ_lo + Σ_{k>lo} (θ_k − θ_lo) on the seven projections; the two RMSNorm
    /// weights of layer `lo`.
    Paper,
    /// What the reference code computes (its in-place update telescopes): the seven projections of layer `hi` with
    /// the RMSNorm weights of layer `lo`.
    Reference,
    /// The element-wise mean of the window, projections and norms alike.
    Average,
    /// Keep layer `lo` unchanged, drop the rest of the window.
    Delete,
    /// Keep layer `hi` unchanged (its own norms too), drop the rest: `reference` without the norm mismatch.
    Top,
}

impl MergeOp {
    pub const ALL: [MergeOp; 5] = [MergeOp::Paper, MergeOp::Reference, MergeOp::Average, MergeOp::Delete, MergeOp::Top];

    pub fn name(self) -> &'static str {
        match self {
            MergeOp::Paper => "paper",
            MergeOp::Reference => "reference",
            MergeOp::Average => "average",
            MergeOp::Delete => "delete",
            MergeOp::Top => "top",
        }
    }
}

impl std::str::FromStr for MergeOp {
    type Err = DepthError;
    fn from_str(s: &str) -> Result<Self> {
        MergeOp::ALL.into_iter().find(|op| op.name() == s).ok_or_else(|| {
            DepthError::InvalidArgument(format!(
                "unknown merge operator `{s}` (known: paper, reference, average, delete, top)"
            ))
        })
    }
}

impl std::fmt::Display for MergeOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Applies `f` to every part of a layer with the matching parts of the other layers of the window: projections
/// and biases always, norms (the two RMSNorms, Gemma-3's output norms, the q/k norms) only with `merge_norms`
/// (else `norms_from`'s are kept).
fn combine(
    layers: &[LayerWeights],
    norms_from: &LayerWeights,
    f: impl Fn(&[&candle_core::Tensor]) -> candle_core::Result<candle_core::Tensor>,
    merge_norms: bool,
) -> Result<LayerWeights> {
    let refs: Vec<&LayerWeights> = layers.iter().collect();
    Ok(LayerWeights::zip_map(&refs, |part, ts| {
        if part.kind() == PartKind::Norm && !merge_norms {
            Ok(norms_from.get(part).expect("layers of one model have the same parts").clone())
        } else {
            // Computed in f32 whatever the stored dtype, and stored back in the first layer's dtype.
            let stored = ts[0].dtype();
            let up = ts.iter().map(|t| t.to_dtype(candle_core::DType::F32)).collect::<candle_core::Result<Vec<_>>>()?;
            f(&up.iter().collect::<Vec<_>>())?.to_dtype(stored)
        }
    })?)
}

/// The shape of the layer that fusing the window `specs` (original indices `lo..`) with `op` gives, without its
/// weights; an error when `op` needs equal shapes and they differ.
pub fn merged_spec(specs: &[LayerSpec], lo: usize, op: MergeOp) -> Result<LayerSpec> {
    let n = specs.len();
    if n == 0 {
        return Err(DepthError::InvalidArgument("merge window is empty".into()));
    }
    let hi = lo + n - 1;
    match op {
        _ if n == 1 => return Ok(specs[0]),
        MergeOp::Delete => return Ok(specs[0]),
        MergeOp::Top => return Ok(specs[n - 1]),
        _ => {}
    }
    // Shapes must agree; the attention type may not (Gemma-3 mixes sliding and global layers).
    if let Some(k) = specs.iter().position(|s| !s.same_shape(&specs[0])) {
        return Err(DepthError::Incompatible {
            lo,
            hi,
            problem: format!(
                "layer {} has shape {:?}, layer {lo} has {:?}; `{op}` needs equal shapes (use delete or top)",
                lo + k,
                specs[k],
                specs[0]
            ),
        });
    }
    // A fused window that contains a global-attention layer stays global: the long-range reads that layer made
    // are kept (a sliding layer's reads are a subset of a global one's; its weights then run with the global
    // rotary base). Only a window of sliding layers stays sliding.
    Ok(LayerSpec { sliding: specs.iter().all(|s| s.sliding), ..specs[0] })
}

/// Fuses the window `layers` (original indices `lo..lo + layers.len()`) into one layer. A one-layer window is
/// returned unchanged by every operator.
pub fn merge_window(
    layers: &[LayerWeights],
    specs: &[LayerSpec],
    lo: usize,
    op: MergeOp,
) -> Result<(LayerSpec, LayerWeights)> {
    let n = layers.len();
    if specs.len() != n {
        return Err(DepthError::InvalidArgument("merge window: one shape per layer".into()));
    }
    let spec = merged_spec(specs, lo, op)?;
    match op {
        _ if n == 1 => return Ok((spec, layers[0].clone())),
        MergeOp::Delete => return Ok((spec, layers[0].clone())),
        MergeOp::Top => return Ok((spec, layers[n - 1].clone())),
        _ => {}
    }
    let merged = match op {
        MergeOp::Paper => combine(
            layers,
            &layers[0],
            |ts| {
                let mut acc = ts[0].clone();
                for t in &ts[1..] {
                    acc = (acc + (*t - ts[0])?)?;
                }
                Ok(acc)
            },
            false,
        )?,
        MergeOp::Reference => combine(layers, &layers[0], |ts| Ok(ts[ts.len() - 1].clone()), false)?,
        MergeOp::Average => combine(
            layers,
            &layers[0],
            |ts| {
                let mut acc = ts[0].clone();
                for t in &ts[1..] {
                    acc = (acc + *t)?;
                }
                acc / ts.len() as f64
            },
            true,
        )?,
        MergeOp::Delete | MergeOp::Top => unreachable!("handled above"),
    };
    Ok((spec, merged))
}
