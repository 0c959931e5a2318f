//! What a recovery run trains: LoRA adapters on the seven projections ([`Lora`]), or chosen tensors of the model
//! itself ([`FullTune`]: every tensor of chosen layers, their norms included, and optionally the final norm with
//! the LM head, as Lu et al., "Reassessing layer pruning", fine-tune the last layers and the head). Both give a
//! plain model when merged; [`crate::train`] trains either through [`Trainable`].

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use slm_model::forward::linear;
use slm_model::{LayerAdapter, Model};

use crate::adapter::Lora;
use crate::error::{LoraError, Result};
use crate::ops::frozen_linear;

/// A training-time forward hook whose random state (dropout) can be saved and restored, so that a layer
/// recomputed by per-layer checkpointing, or a resumed run, draws the same masks.
pub trait TrainHook: LayerAdapter {
    fn dropout_state(&self) -> Option<ChaCha8Rng>;
    fn set_dropout_state(&self, state: Option<ChaCha8Rng>);
}

/// What trains.
pub trait Trainable {
    /// The model the training forward pass runs: the base for LoRA, the base with the trained tensors in place
    /// for full tuning.
    fn student<'a>(&'a self, base: &'a Model) -> &'a Model;
    /// Every trainable tensor, in a fixed order (the optimiser's and the checkpoint's).
    fn vars(&self) -> Vec<&Var>;
    /// Copies of the trainable tensors under stable names, in [`Trainable::vars`] order.
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>>;
    /// Sets every trainable tensor from `named` (shapes must match); `source` names the file in errors.
    fn set_from(&self, named: &HashMap<String, Tensor>, source: &Path) -> Result<()>;
    /// The trained model as a plain model (LoRA merged in; tuned tensors copied).
    fn merge(&self, base: &Model) -> Result<Model>;
    /// The training hook (dropout from `seed`, frozen weights without weight gradients).
    fn train_hook(&self, seed: u64) -> Box<dyn TrainHook + '_>;
    /// Whether the LM head trains (its matmul then computes the weight gradient).
    fn head_trained(&self) -> bool {
        false
    }
    /// Whether the embedding matrix trains (a tied LM head), so its gradient through the lookup is needed.
    fn embedding_trained(&self) -> bool {
        false
    }
    fn num_parameters(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }
    /// A one-word name for logs and records: `lora` or `layers`.
    fn kind(&self) -> &'static str;
}

impl TrainHook for crate::adapter::LoraHook<'_> {
    fn dropout_state(&self) -> Option<ChaCha8Rng> {
        crate::adapter::LoraHook::dropout_state(self)
    }
    fn set_dropout_state(&self, state: Option<ChaCha8Rng>) {
        crate::adapter::LoraHook::set_dropout_state(self, state)
    }
}

impl Trainable for Lora {
    fn student<'a>(&'a self, base: &'a Model) -> &'a Model {
        base
    }
    fn vars(&self) -> Vec<&Var> {
        Lora::vars(self)
    }
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Lora::named_tensors(self)
    }
    fn set_from(&self, named: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        Lora::set_from(self, named, source)
    }
    fn merge(&self, base: &Model) -> Result<Model> {
        Lora::merge(self, base)
    }
    fn train_hook(&self, seed: u64) -> Box<dyn TrainHook + '_> {
        Box::new(Lora::train_hook(self, seed))
    }
    fn kind(&self) -> &'static str {
        "lora"
    }
}

/// Full fine-tuning of chosen layers (every tensor of each: projections, biases, norms) and, with `head`, the
/// final norm and the LM head (for a tied head, the shared embedding matrix, trained through both uses). The
/// trained tensors are f32 copies; the base model is not changed.
pub struct FullTune {
    /// The trained layers, ascending.
    pub layers: Vec<usize>,
    pub head: bool,
    tied: bool,
    vars: Vec<(String, Var)>,
    student: Model,
}

impl FullTune {
    /// Copies `layers` (indices into `base`) and, with `head`, the final norm and LM head of `base` into
    /// trainable tensors.
    pub fn new(base: &Model, layers: &[usize], head: bool) -> Result<Self> {
        let n = base.spec.num_layers();
        let mut layers = layers.to_vec();
        layers.sort_unstable();
        layers.dedup();
        if let Some(&bad) = layers.iter().find(|&&i| i >= n) {
            return Err(LoraError::InvalidArgument(format!("--layers: layer {bad} of a {n}-layer model")));
        }
        if layers.is_empty() && !head {
            return Err(LoraError::InvalidArgument("nothing to train: no layers chosen and no --train-head".into()));
        }
        let mut student = base.clone();
        let arch = base.spec.arch;
        let mut vars = Vec::new();
        let var = |t: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?)?) };
        for &i in &layers {
            let lw = student.weights.layer_mut(i)?;
            let parts: Vec<_> = lw.parts().into_iter().map(|(p, t)| (p, t.clone())).collect();
            for (part, t) in parts {
                let v = var(&t)?;
                lw.set(part, v.as_tensor().clone());
                vars.push((format!("model.layers.{i}.{}", part.hf_suffix(&arch)), v));
            }
        }
        let tied = student.weights.lm_head.is_none();
        if head {
            let v = var(&student.weights.norm)?;
            student.weights.norm = v.as_tensor().clone();
            vars.push(("model.norm.weight".into(), v));
            if tied {
                let v = var(&student.weights.embed_tokens)?;
                student.weights.embed_tokens = v.as_tensor().clone();
                vars.push(("model.embed_tokens.weight".into(), v));
            } else {
                let v = var(student.weights.lm_head())?;
                student.weights.lm_head = Some(v.as_tensor().clone());
                vars.push(("lm_head.weight".into(), v));
            }
        }
        Ok(FullTune { layers, head, tied, vars, student })
    }

    /// Names of the trained tensors (HF names), in order.
    pub fn names(&self) -> Vec<&str> {
        self.vars.iter().map(|(n, _)| n.as_str()).collect()
    }
}

struct FullTuneHook {
    trained: Vec<bool>,
}

impl LayerAdapter for FullTuneHook {
    fn project(&self, layer: usize, _name: &'static str, x: &Tensor, w: &Tensor) -> slm_model::Result<Tensor> {
        if self.trained.get(layer).copied().unwrap_or(false) {
            linear(x, w)
        } else {
            Ok(frozen_linear(x, w)?)
        }
    }
}

impl TrainHook for FullTuneHook {
    fn dropout_state(&self) -> Option<ChaCha8Rng> {
        None
    }
    fn set_dropout_state(&self, _state: Option<ChaCha8Rng>) {}
}

impl Trainable for FullTune {
    fn student<'a>(&'a self, _base: &'a Model) -> &'a Model {
        &self.student
    }
    fn vars(&self) -> Vec<&Var> {
        self.vars.iter().map(|(_, v)| v).collect()
    }
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.vars.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?))).collect()
    }
    fn set_from(&self, named: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        for (key, var) in &self.vars {
            let t = named.get(key).ok_or_else(|| LoraError::file(source, format!("missing tensor `{key}`")))?;
            if t.dims() != var.dims() {
                return Err(LoraError::file(
                    source,
                    format!("tensor `{key}` has shape {:?}, the model needs {:?}", t.dims(), var.dims()),
                ));
            }
            var.set(&t.to_device(var.device())?.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }
    fn merge(&self, base: &Model) -> Result<Model> {
        let mut merged = base.clone();
        let arch = base.spec.arch;
        let by_name: HashMap<&str, &Var> = self.vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let copy = |name: &str| -> Result<Tensor> { Ok(by_name[name].as_tensor().copy()?) };
        for &i in &self.layers {
            let lw = merged.weights.layer_mut(i)?;
            let parts: Vec<_> = lw.parts().into_iter().map(|(p, _)| p).collect();
            for part in parts {
                lw.set(part, copy(&format!("model.layers.{i}.{}", part.hf_suffix(&arch)))?);
            }
        }
        if self.head {
            merged.weights.norm = copy("model.norm.weight")?;
            if self.tied {
                merged.weights.embed_tokens = copy("model.embed_tokens.weight")?;
            } else {
                merged.weights.lm_head = Some(copy("lm_head.weight")?);
            }
        }
        Ok(merged)
    }
    fn train_hook(&self, _seed: u64) -> Box<dyn TrainHook + '_> {
        let mut trained = vec![false; self.student.spec.num_layers()];
        self.layers.iter().for_each(|&i| trained[i] = true);
        Box::new(FullTuneHook { trained })
    }
    fn head_trained(&self) -> bool {
        self.head
    }
    fn embedding_trained(&self) -> bool {
        self.head && self.tied
    }
    fn kind(&self) -> &'static str {
        "layers"
    }
}

/// The layers next to each cut of a depth plan, as indices of the pruned model: `kept[j]` is the dense window
/// `(start, end)` pruned layer `j` stands for (a depth plan's `kept_layers`). A merged window's layer, and the kept
/// layers on both sides of removed layers (or of a merged window), are next to a cut.
pub fn layers_next_to_cuts(kept: &[(usize, usize)]) -> Vec<usize> {
    let mut out = Vec::new();
    for (j, &(start, end)) in kept.iter().enumerate() {
        let merged = end > start;
        let gap_after = kept.get(j + 1).is_some_and(|n| n.0 > end + 1);
        let gap_before = j > 0 && start > kept[j - 1].1 + 1;
        if merged {
            out.extend(j.checked_sub(1));
            out.push(j);
            if j + 1 < kept.len() {
                out.push(j + 1);
            }
        }
        if gap_after || gap_before {
            out.push(j);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Parses a layer list for `n` layers: `last:K` (the last K), or indices and ranges `0,3-5`.
pub fn parse_layers(spec: &str, n: usize) -> Result<Vec<usize>> {
    let bad = |m: String| LoraError::InvalidArgument(format!("--layers `{spec}`: {m}"));
    if let Some(k) = spec.strip_prefix("last:") {
        let k: usize = k.parse().map_err(|_| bad("`last:K` needs a number K".into()))?;
        if k == 0 || k > n {
            return Err(bad(format!("K must be 1 to {n}")));
        }
        return Ok((n - k..n).collect());
    }
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim) {
        let num =
            |s: &str| s.trim().parse::<usize>().map_err(|_| bad(format!("`{item}` is not a layer index or range")));
        let (a, b) = match item.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(item)?, num(item)?),
        };
        if a > b || b >= n {
            return Err(bad(format!("`{item}` is not within the model's layers 0-{}", n - 1)));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_lists() {
        assert_eq!(parse_layers("last:3", 13).unwrap(), vec![10, 11, 12]);
        assert_eq!(parse_layers("0,3-5,4", 13).unwrap(), vec![0, 3, 4, 5]);
        for bad in ["last:0", "last:14", "13", "5-3", "x", ""] {
            let e = parse_layers(bad, 13).unwrap_err().to_string();
            assert!(e.contains("--layers"), "{bad}: {e}");
        }
    }

    #[test]
    fn layers_next_to_cuts_of_a_plan() {
        // Dense 0..9: layers 3-4 removed (between pruned 2 and 3), 6-8 merged into pruned 4.
        let kept = [(0, 0), (1, 1), (2, 2), (5, 5), (6, 8), (9, 9)];
        assert_eq!(layers_next_to_cuts(&kept), vec![2, 3, 4, 5]);
        // Nothing cut: nothing next to a cut.
        assert_eq!(layers_next_to_cuts(&[(0, 0), (1, 1)]), Vec::<usize>::new());
    }
}
