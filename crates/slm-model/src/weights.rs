//! Plain tensors per layer, in the HF Llama layout (`[out_features, in_features]` for projections).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::spec::{Arch, LayerSpec, ModelSpec};

/// The seven projections of a decoder layer, in HF order. Methods that touch "every projection" (merging,
/// LoRA) iterate over this.
pub const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// One tensor of a decoder layer, by its role. The HF names depend on the architecture (Gemma-3's sandwich norms
/// rename the pre-MLP norm), see [`Part::hf_suffix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The norm before attention (`input_layernorm`).
    AttnNorm,
    Q,
    K,
    V,
    O,
    /// The norm before the MLP (Llama's `post_attention_layernorm`, Gemma-3's `pre_feedforward_layernorm`).
    MlpNorm,
    Gate,
    Up,
    Down,
    QBias,
    KBias,
    VBias,
    /// Per-head RMSNorm of q (`self_attn.q_norm`), `[head_dim]`.
    QNorm,
    KNorm,
    /// The norm of the attention output before the residual add (Gemma-3's `post_attention_layernorm`).
    AttnOutNorm,
    /// The norm of the MLP output before the residual add (`post_feedforward_layernorm`).
    MlpOutNorm,
}

/// What a [`Part`] is, for methods that treat weights by kind (a merge averages projections and biases alike,
/// keeps or averages norms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    Projection,
    Bias,
    Norm,
}

impl Part {
    pub const ALL: [Part; 16] = [
        Part::AttnNorm,
        Part::Q,
        Part::K,
        Part::V,
        Part::O,
        Part::MlpNorm,
        Part::Gate,
        Part::Up,
        Part::Down,
        Part::QBias,
        Part::KBias,
        Part::VBias,
        Part::QNorm,
        Part::KNorm,
        Part::AttnOutNorm,
        Part::MlpOutNorm,
    ];

    pub fn kind(self) -> PartKind {
        match self {
            Part::Q | Part::K | Part::V | Part::O | Part::Gate | Part::Up | Part::Down => PartKind::Projection,
            Part::QBias | Part::KBias | Part::VBias => PartKind::Bias,
            _ => PartKind::Norm,
        }
    }

    /// Whether a layer of this architecture has the part.
    pub fn present(self, arch: &Arch) -> bool {
        match self {
            Part::QBias | Part::KBias | Part::VBias => arch.qkv_bias,
            Part::QNorm | Part::KNorm => arch.qk_norm,
            Part::AttnOutNorm | Part::MlpOutNorm => arch.sandwich_norms,
            _ => true,
        }
    }

    /// The HF name after `model.layers.{i}.`.
    pub fn hf_suffix(self, arch: &Arch) -> &'static str {
        match self {
            Part::AttnNorm => "input_layernorm.weight",
            Part::Q => "self_attn.q_proj.weight",
            Part::K => "self_attn.k_proj.weight",
            Part::V => "self_attn.v_proj.weight",
            Part::O => "self_attn.o_proj.weight",
            Part::MlpNorm if arch.sandwich_norms => "pre_feedforward_layernorm.weight",
            Part::MlpNorm => "post_attention_layernorm.weight",
            Part::Gate => "mlp.gate_proj.weight",
            Part::Up => "mlp.up_proj.weight",
            Part::Down => "mlp.down_proj.weight",
            Part::QBias => "self_attn.q_proj.bias",
            Part::KBias => "self_attn.k_proj.bias",
            Part::VBias => "self_attn.v_proj.bias",
            Part::QNorm => "self_attn.q_norm.weight",
            Part::KNorm => "self_attn.k_norm.weight",
            Part::AttnOutNorm => "post_attention_layernorm.weight",
            Part::MlpOutNorm => "post_feedforward_layernorm.weight",
        }
    }

    /// The shape of the part in a layer of shape `l`.
    pub fn shape(self, l: &LayerSpec, hidden: usize) -> Vec<usize> {
        let q = l.num_attention_heads * l.head_dim;
        let kv = l.num_key_value_heads * l.head_dim;
        let i = l.intermediate_size;
        match self {
            Part::AttnNorm | Part::MlpNorm | Part::AttnOutNorm | Part::MlpOutNorm => vec![hidden],
            Part::Q => vec![q, hidden],
            Part::K | Part::V => vec![kv, hidden],
            Part::O => vec![hidden, q],
            Part::Gate | Part::Up => vec![i, hidden],
            Part::Down => vec![hidden, i],
            Part::QBias => vec![q],
            Part::KBias | Part::VBias => vec![kv],
            Part::QNorm | Part::KNorm => vec![l.head_dim],
        }
    }
}

/// The tensors of one decoder layer. The nine of Llama are always there; the others are `Some` exactly when the
/// architecture has them ([`Part::present`]).
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub input_layernorm: Tensor,
    pub q_proj: Tensor,
    pub k_proj: Tensor,
    pub v_proj: Tensor,
    pub o_proj: Tensor,
    /// The norm before the MLP (Llama's name; Gemma-3 calls it `pre_feedforward_layernorm`).
    pub post_attention_layernorm: Tensor,
    pub gate_proj: Tensor,
    pub up_proj: Tensor,
    pub down_proj: Tensor,
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// Gemma-3's norm of the attention output (its `post_attention_layernorm`).
    pub attn_out_norm: Option<Tensor>,
    /// Gemma-3's norm of the MLP output (`post_feedforward_layernorm`).
    pub mlp_out_norm: Option<Tensor>,
}

impl LayerWeights {
    /// A Llama layer (no optional parts) from its nine tensors in [`Part::ALL`] order.
    pub fn llama(t: [Tensor; 9]) -> Self {
        let [input_layernorm, q_proj, k_proj, v_proj, o_proj, post_attention_layernorm, gate_proj, up_proj, down_proj] =
            t;
        LayerWeights {
            input_layernorm,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            post_attention_layernorm,
            gate_proj,
            up_proj,
            down_proj,
            q_bias: None,
            k_bias: None,
            v_bias: None,
            q_norm: None,
            k_norm: None,
            attn_out_norm: None,
            mlp_out_norm: None,
        }
    }

    /// A layer of architecture `arch` whose every part ([`Part::present`], in [`Part::ALL`] order) is `f(part)`.
    pub fn build<E>(
        arch: &Arch,
        mut f: impl FnMut(Part) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Self, E> {
        let mut layer = LayerWeights::llama([
            f(Part::AttnNorm)?,
            f(Part::Q)?,
            f(Part::K)?,
            f(Part::V)?,
            f(Part::O)?,
            f(Part::MlpNorm)?,
            f(Part::Gate)?,
            f(Part::Up)?,
            f(Part::Down)?,
        ]);
        for &p in Part::ALL[9..].iter().filter(|p| p.present(arch)) {
            layer.set(p, f(p)?);
        }
        Ok(layer)
    }

    /// The tensor of `part`, if the layer has it.
    pub fn get(&self, part: Part) -> Option<&Tensor> {
        match part {
            Part::AttnNorm => Some(&self.input_layernorm),
            Part::Q => Some(&self.q_proj),
            Part::K => Some(&self.k_proj),
            Part::V => Some(&self.v_proj),
            Part::O => Some(&self.o_proj),
            Part::MlpNorm => Some(&self.post_attention_layernorm),
            Part::Gate => Some(&self.gate_proj),
            Part::Up => Some(&self.up_proj),
            Part::Down => Some(&self.down_proj),
            Part::QBias => self.q_bias.as_ref(),
            Part::KBias => self.k_bias.as_ref(),
            Part::VBias => self.v_bias.as_ref(),
            Part::QNorm => self.q_norm.as_ref(),
            Part::KNorm => self.k_norm.as_ref(),
            Part::AttnOutNorm => self.attn_out_norm.as_ref(),
            Part::MlpOutNorm => self.mlp_out_norm.as_ref(),
        }
    }

    fn slot(&mut self, part: Part) -> SlotMut<'_> {
        match part {
            Part::AttnNorm => SlotMut::Required(&mut self.input_layernorm),
            Part::Q => SlotMut::Required(&mut self.q_proj),
            Part::K => SlotMut::Required(&mut self.k_proj),
            Part::V => SlotMut::Required(&mut self.v_proj),
            Part::O => SlotMut::Required(&mut self.o_proj),
            Part::MlpNorm => SlotMut::Required(&mut self.post_attention_layernorm),
            Part::Gate => SlotMut::Required(&mut self.gate_proj),
            Part::Up => SlotMut::Required(&mut self.up_proj),
            Part::Down => SlotMut::Required(&mut self.down_proj),
            Part::QBias => SlotMut::Optional(&mut self.q_bias),
            Part::KBias => SlotMut::Optional(&mut self.k_bias),
            Part::VBias => SlotMut::Optional(&mut self.v_bias),
            Part::QNorm => SlotMut::Optional(&mut self.q_norm),
            Part::KNorm => SlotMut::Optional(&mut self.k_norm),
            Part::AttnOutNorm => SlotMut::Optional(&mut self.attn_out_norm),
            Part::MlpOutNorm => SlotMut::Optional(&mut self.mlp_out_norm),
        }
    }

    /// Replaces the tensor of `part` (setting an optional part makes it present).
    pub fn set(&mut self, part: Part, t: Tensor) {
        match self.slot(part) {
            SlotMut::Required(r) => *r = t,
            SlotMut::Optional(o) => *o = Some(t),
        }
    }

    /// Every part the layer has, with its tensor, in [`Part::ALL`] order.
    pub fn parts(&self) -> Vec<(Part, &Tensor)> {
        Part::ALL.iter().filter_map(|&p| self.get(p).map(|t| (p, t))).collect()
    }

    /// (HF name suffix, tensor) pairs, e.g. `("self_attn.q_proj.weight", q)`.
    pub fn named(&self, arch: &Arch) -> Vec<(&'static str, &Tensor)> {
        self.parts().into_iter().map(|(p, t)| (p.hf_suffix(arch), t)).collect()
    }

    /// Projection by its short name (one of [`PROJECTIONS`]).
    pub fn projection(&self, name: &str) -> Option<&Tensor> {
        Some(match name {
            "q_proj" => &self.q_proj,
            "k_proj" => &self.k_proj,
            "v_proj" => &self.v_proj,
            "o_proj" => &self.o_proj,
            "gate_proj" => &self.gate_proj,
            "up_proj" => &self.up_proj,
            "down_proj" => &self.down_proj,
            _ => return None,
        })
    }

    /// The parts a layer of this architecture has, with their shapes for layer shape `l`.
    pub fn expected_shapes(l: &LayerSpec, hidden: usize, arch: &Arch) -> Vec<(Part, Vec<usize>)> {
        Part::ALL.iter().filter(|p| p.present(arch)).map(|&p| (p, p.shape(l, hidden))).collect()
    }

    /// Checks that the layer has exactly the parts of `arch`, each of its shape for layer `index` of shape `l`
    /// (errors name the tensor by its HF name and `path` as the source).
    pub fn check_shapes(&self, index: usize, l: &LayerSpec, hidden: usize, arch: &Arch, path: &Path) -> Result<()> {
        for p in Part::ALL {
            let name = format!("model.layers.{index}.{}", p.hf_suffix(arch));
            match (p.present(arch), self.get(p)) {
                (true, None) => return Err(ModelError::MissingTensor { path: path.to_path_buf(), name }),
                (false, Some(_)) => {
                    return Err(ModelError::Config {
                        path: path.to_path_buf(),
                        message: format!("tensor `{name}` ({p:?}) is not part of a {} layer", arch.family.model_type()),
                    })
                }
                (true, Some(t)) if t.dims() != p.shape(l, hidden).as_slice() => {
                    return Err(ModelError::ShapeMismatch {
                        path: path.to_path_buf(),
                        name,
                        expected: p.shape(l, hidden),
                        actual: t.dims().to_vec(),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A layer whose every part is `f(part, [that part of each layer])`. The layers must have the same parts
    /// (they come from one model); the first layer's set of parts is the result's.
    pub fn zip_map(
        layers: &[&LayerWeights],
        mut f: impl FnMut(Part, &[&Tensor]) -> candle_core::Result<Tensor>,
    ) -> Result<LayerWeights> {
        let first = layers.first().ok_or_else(|| ModelError::InvalidArgument("zip_map of no layers".into()))?;
        let mut out = (*first).clone();
        for (part, _) in first.parts() {
            let ts: Vec<&Tensor> = layers
                .iter()
                .map(|l| {
                    l.get(part).ok_or_else(|| {
                        ModelError::InvalidArgument(format!("layers of one window differ: one has no {part:?}"))
                    })
                })
                .collect::<Result<_>>()?;
            out.set(part, f(part, &ts)?);
        }
        Ok(out)
    }

    fn map(&self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<Self> {
        LayerWeights::zip_map(&[self], |_, ts| f(ts[0]))
    }
}

enum SlotMut<'a> {
    Required(&'a mut Tensor),
    Optional(&'a mut Option<Tensor>),
}

/// Where a layer's tensors come from when it is used: a mapped weight file (read and, for a GGUF, dequantised per
/// use), or a transformation of another layer (a width-pruned or merged layer computed only when it is used or
/// written). Loading the same source twice gives the same tensors, bit for bit.
pub trait LayerSource: Send + Sync + std::fmt::Debug {
    /// The layer's tensors, in memory.
    fn load(&self) -> Result<LayerWeights>;
    /// The dtype its projections are in once loaded.
    fn dtype(&self) -> DType;
}

/// One decoder layer of a [`Weights`]: in memory, or read when used ([`LayerSource`]), so that a model larger
/// than the memory can be worked on one layer at a time.
#[derive(Debug, Clone)]
pub enum LayerSlot {
    Resident(LayerWeights),
    Lazy(Arc<dyn LayerSource>),
}

impl LayerSlot {
    /// The layer's tensors: borrowed when resident, loaded from the source otherwise.
    pub fn get(&self) -> Result<Cow<'_, LayerWeights>> {
        match self {
            LayerSlot::Resident(w) => Ok(Cow::Borrowed(w)),
            LayerSlot::Lazy(src) => Ok(Cow::Owned(src.load()?)),
        }
    }

    pub fn is_resident(&self) -> bool {
        matches!(self, LayerSlot::Resident(_))
    }

    /// The dtype of the layer's projections, without loading it.
    pub fn dtype(&self) -> DType {
        match self {
            LayerSlot::Resident(w) => w.q_proj.dtype(),
            LayerSlot::Lazy(src) => src.dtype(),
        }
    }

    /// This layer with `f` applied: at once when resident, when used otherwise (`f` must be deterministic;
    /// `dtype` is the projections' dtype after it).
    pub fn map_lazily(
        self,
        dtype: DType,
        f: impl Fn(LayerWeights) -> Result<LayerWeights> + Send + Sync + 'static,
    ) -> Result<LayerSlot> {
        LayerSlot::combine_lazily(vec![self], dtype, move |mut v| f(v.remove(0)))
    }

    /// One layer made of several (a merged window): at once when they are all resident, when used otherwise.
    pub fn combine_lazily(
        slots: Vec<LayerSlot>,
        dtype: DType,
        f: impl Fn(Vec<LayerWeights>) -> Result<LayerWeights> + Send + Sync + 'static,
    ) -> Result<LayerSlot> {
        let derived = Derived { inputs: slots, dtype, f: Box::new(f) };
        Ok(if derived.inputs.iter().all(LayerSlot::is_resident) {
            LayerSlot::Resident(derived.load()?)
        } else {
            LayerSlot::Lazy(Arc::new(derived))
        })
    }
}

type DeriveFn = Box<dyn Fn(Vec<LayerWeights>) -> Result<LayerWeights> + Send + Sync>;

/// A layer computed from other layers when it is used.
struct Derived {
    inputs: Vec<LayerSlot>,
    dtype: DType,
    f: DeriveFn,
}

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Derived").field("inputs", &self.inputs).field("dtype", &self.dtype).finish()
    }
}

impl LayerSource for Derived {
    fn load(&self) -> Result<LayerWeights> {
        let ws = self.inputs.iter().map(|s| s.get().map(Cow::into_owned)).collect::<Result<Vec<_>>>()?;
        (self.f)(ws)
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}

#[derive(Debug, Clone)]
pub struct Weights {
    pub embed_tokens: Tensor,
    pub layers: Vec<LayerSlot>,
    pub norm: Tensor,
    /// `None` when the LM head is tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
}

impl Weights {
    /// The LM head matrix `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Layer `i`'s tensors (loaded from its source when it is not resident).
    pub fn layer(&self, i: usize) -> Result<Cow<'_, LayerWeights>> {
        self.layers
            .get(i)
            .ok_or_else(|| ModelError::InvalidArgument(format!("layer {i} of a {}-layer model", self.layers.len())))?
            .get()
    }

    /// Layers `range`, each loaded (a resident layer's tensors are shared, not copied).
    pub fn load_layers(&self, range: std::ops::Range<usize>) -> Result<Vec<LayerWeights>> {
        range.map(|i| Ok(self.layer(i)?.into_owned())).collect()
    }

    /// Layer `i`'s tensors for changing them; a layer read when used is loaded and becomes resident.
    pub fn layer_mut(&mut self, i: usize) -> Result<&mut LayerWeights> {
        let n = self.layers.len();
        let slot = self
            .layers
            .get_mut(i)
            .ok_or_else(|| ModelError::InvalidArgument(format!("layer {i} of a {n}-layer model")))?;
        if let LayerSlot::Lazy(src) = slot {
            *slot = LayerSlot::Resident(src.load()?);
        }
        match slot {
            LayerSlot::Resident(w) => Ok(w),
            LayerSlot::Lazy(_) => unreachable!("made resident above"),
        }
    }

    /// Whether every layer is in memory (no layer is read when used).
    pub fn all_resident(&self) -> bool {
        self.layers.iter().all(LayerSlot::is_resident)
    }

    /// The same weights with every layer in memory.
    pub fn into_resident(self) -> Result<Self> {
        let layers = self
            .layers
            .into_iter()
            .map(|s| match s {
                LayerSlot::Resident(w) => Ok(LayerSlot::Resident(w)),
                LayerSlot::Lazy(src) => Ok(LayerSlot::Resident(src.load()?)),
            })
            .collect::<Result<_>>()?;
        Ok(Weights { layers, ..self })
    }

    /// Every tensor under its HF name (every layer loaded: for small models and tests; saving streams instead).
    pub fn named_tensors(&self, arch: &Arch) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.clone())];
        for i in 0..self.layers.len() {
            let layer = self.layer(i)?;
            for (suffix, t) in layer.named(arch) {
                out.push((format!("model.layers.{i}.{suffix}"), t.clone()));
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        Ok(out)
    }

    /// Builds weights from HF-named f32 tensors, checking every shape against `spec`. `path` names the source
    /// in errors.
    pub fn from_named(spec: &ModelSpec, mut tensors: HashMap<String, Tensor>, path: &Path) -> Result<Self> {
        let mut take = |name: &str, expected: &[usize]| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| ModelError::MissingTensor { path: path.to_path_buf(), name: name.to_string() })?;
            if t.dims() != expected {
                return Err(ModelError::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    expected: expected.to_vec(),
                    actual: t.dims().to_vec(),
                });
            }
            Ok(t)
        };
        let (v, h) = (spec.vocab_size, spec.hidden_size);
        let embed_tokens = take("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(spec.layers.len());
        for (i, l) in spec.layers.iter().enumerate() {
            layers.push(LayerSlot::Resident(LayerWeights::build(&spec.arch, |p| {
                take(&format!("model.layers.{i}.{}", p.hf_suffix(&spec.arch)), &p.shape(l, h))
            })?));
        }
        let norm = take("model.norm.weight", &[h])?;
        let lm_head = if spec.tie_word_embeddings {
            // Some tied checkpoints still carry a copy of the head; it is the embedding by definition.
            tensors.remove("lm_head.weight");
            None
        } else {
            Some(take("lm_head.weight", &[v, h])?)
        };
        if let Some(extra) = tensors.keys().find(|k| k.starts_with("model.layers.")) {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{extra}` belongs to no layer of the config ({} layers): config and weights disagree",
                    spec.layers.len()
                ),
            });
        }
        Ok(Weights { embed_tokens, layers, norm, lm_head })
    }

    /// Bytes of each layer of `spec` as held: its parameters at its slot's dtype (stored, or f32 for a dequantised
    /// GGUF layer).
    pub fn layer_bytes(&self, spec: &ModelSpec) -> Vec<usize> {
        spec.layers
            .iter()
            .zip(&self.layers)
            .map(|(l, s)| l.num_parameters(spec.hidden_size, &spec.arch) * s.dtype().size_in_bytes())
            .collect()
    }

    /// The same weights on another device / in another dtype.
    pub fn to(&self, device: &Device, dtype: DType) -> Result<Self> {
        let f = |t: &Tensor| t.to_device(device)?.to_dtype(dtype);
        Ok(Weights {
            embed_tokens: f(&self.embed_tokens)?,
            layers: self
                .layers
                .iter()
                .map(|slot| {
                    let device = device.clone();
                    slot.clone().map_lazily(dtype, move |w| w.map(|t| t.to_device(&device)?.to_dtype(dtype)))
                })
                .collect::<Result<_>>()?,
            norm: f(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(f).transpose()?,
        })
    }
}
