//! Merge operators: how a window of consecutive layers becomes one layer.

use serde::{Deserialize, Serialize};
use slm_model::{LayerSpec, LayerWeights};

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

/// Applies `f` to the nine tensors of a layer, projection by projection, with the matching tensors of the other
/// layers of the window.
fn combine(
    layers: &[LayerWeights],
    norms_from: &LayerWeights,
    f: impl Fn(&[&candle_core::Tensor]) -> candle_core::Result<candle_core::Tensor>,
    merge_norms: bool,
) -> Result<LayerWeights> {
    let pick = |get: fn(&LayerWeights) -> &candle_core::Tensor| -> candle_core::Result<candle_core::Tensor> {
        let ts: Vec<&candle_core::Tensor> = layers.iter().map(get).collect();
        f(&ts)
    };
    let norm = |get: fn(&LayerWeights) -> &candle_core::Tensor| -> candle_core::Result<candle_core::Tensor> {
        if merge_norms {
            pick(get)
        } else {
            Ok(get(norms_from).clone())
        }
    };
    Ok(LayerWeights {
        input_layernorm: norm(|l| &l.input_layernorm)?,
        q_proj: pick(|l| &l.q_proj)?,
        k_proj: pick(|l| &l.k_proj)?,
        v_proj: pick(|l| &l.v_proj)?,
        o_proj: pick(|l| &l.o_proj)?,
        post_attention_layernorm: norm(|l| &l.post_attention_layernorm)?,
        gate_proj: pick(|l| &l.gate_proj)?,
        up_proj: pick(|l| &l.up_proj)?,
        down_proj: pick(|l| &l.down_proj)?,
    })
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
    if n == 0 || specs.len() != n {
        return Err(DepthError::InvalidArgument("merge window is empty".into()));
    }
    let hi = lo + n - 1;
    if n == 1 {
        return Ok((specs[0], layers[0].clone()));
    }
    match op {
        MergeOp::Delete => return Ok((specs[0], layers[0].clone())),
        MergeOp::Top => return Ok((specs[n - 1], layers[n - 1].clone())),
        _ => {}
    }
    if let Some(k) = specs.iter().position(|s| *s != specs[0]) {
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
    Ok((specs[0], merged))
}
