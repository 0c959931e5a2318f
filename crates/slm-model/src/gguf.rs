//! Loading a GGUF (llama.cpp's format) of the `llama`, `qwen2`, `qwen3` or `gemma3` architecture: every tensor
//! is dequantised to f32 and put back in the HF layout (Q/K row order, Gemma's norm convention).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};
use crate::spec::{Arch, Family, LayerSpec, ModelSpec, Rope, RopeScaling};
use crate::weights::{LayerSlot, LayerWeights, Part, Weights};

fn gguf_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Gguf { path: path.to_path_buf(), message: message.into() }
}

/// Reads the GGUF header (metadata and tensor directory) with our own bounds-checked reader
/// ([`crate::gguf_header`]): fails clearly on a bad magic or version, a truncated file, an impossible count or size,
/// a bad alignment, or a tensor type that this build cannot dequantise.
pub fn read_content(path: &Path) -> Result<(Content, BufReader<File>)> {
    crate::gguf_header::read_gguf_header(path)
}

/// Fewest tensors a llama layer has in a GGUF (two norms, q/k/v/o, gate/up/down).
const TENSORS_PER_LAYER: usize = 9;

fn meta<'a>(c: &'a Content, key: &str) -> Option<&'a Value> {
    c.metadata.get(key)
}

fn meta_usize(c: &Content, key: &str, path: &Path) -> Result<usize> {
    let v = meta(c, key).ok_or_else(|| gguf_err(path, format!("missing metadata `{key}`")))?;
    value_usize(v).ok_or_else(|| gguf_err(path, format!("metadata `{key}` is not an integer")))
}

fn value_usize(v: &Value) -> Option<usize> {
    match v {
        Value::U8(x) => Some(*x as usize),
        Value::U16(x) => Some(*x as usize),
        Value::U32(x) => Some(*x as usize),
        Value::U64(x) => Some(*x as usize),
        Value::I8(x) if *x >= 0 => Some(*x as usize),
        Value::I16(x) if *x >= 0 => Some(*x as usize),
        Value::I32(x) if *x >= 0 => Some(*x as usize),
        Value::I64(x) if *x >= 0 => Some(*x as usize),
        _ => None,
    }
}

fn value_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        other => value_usize(other).map(|x| x as f64),
    }
}

/// A per-layer metadata value: llama.cpp writes either one number or an array with one entry per layer.
fn per_layer(c: &Content, key: &str, n: usize, path: &Path) -> Result<Option<Vec<usize>>> {
    match meta(c, key) {
        None => Ok(None),
        Some(Value::Array(a)) => {
            if a.len() != n {
                return Err(gguf_err(path, format!("metadata `{key}` has {} entries for {n} layers", a.len())));
            }
            a.iter()
                .map(|v| {
                    value_usize(v).ok_or_else(|| gguf_err(path, format!("metadata `{key}` is not an integer array")))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some)
        }
        Some(v) => value_usize(v)
            .map(|x| Some(vec![x; n]))
            .ok_or_else(|| gguf_err(path, format!("metadata `{key}` is not an integer"))),
    }
}

/// The GGUF architectures slm reads, with the family each stands for (Mistral GGUFs are `llama`; `deci` is
/// llama.cpp's Llama with per-layer widths, what `slm export` writes for a width-pruned Llama).
const ARCHS: [(&str, Family); 5] = [
    ("llama", Family::Llama),
    ("deci", Family::Llama),
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("gemma3", Family::Gemma3),
];

/// The GGUF architecture name of a model (its metadata key prefix).
pub fn gguf_arch(c: &Content, path: &Path) -> Result<(String, Family)> {
    let arch = match meta(c, "general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(gguf_err(path, "missing metadata `general.architecture`")),
    };
    let known = ARCHS.iter().map(|(a, _)| format!("`{a}`")).collect::<Vec<_>>().join(", ");
    match ARCHS.iter().find(|(a, _)| *a == arch) {
        Some((_, f)) => Ok((arch, *f)),
        None => Err(gguf_err(path, format!("`general.architecture` `{arch}` is not supported ({known})"))),
    }
}

/// The tensor in which llama.cpp stores Llama-3.1's rotary scaling, one divisor per frequency.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// The model's dimensions and architecture from GGUF metadata (keys `{arch}.*`, as llama.cpp writes them), and
/// from the `rope_freqs.weight` tensor where there is one (read from `reader`; see [`Rope::from_gguf_factors`]).
pub fn spec_from_gguf(c: &Content, reader: &mut BufReader<File>, path: &Path) -> Result<ModelSpec> {
    let (name, family) = gguf_arch(c, path)?;
    let key = |k: &str| format!("{name}.{k}");
    for k in ["expert_count", "vision.block_count"] {
        if meta(c, &key(k)).and_then(value_usize).is_some_and(|n| n > 0) {
            return Err(gguf_err(path, format!("metadata `{}`: experts / vision towers are not supported", key(k))));
        }
    }
    let hidden = meta_usize(c, &key("embedding_length"), path)?;
    let n_layers = meta_usize(c, &key("block_count"), path)?;
    // Bound the layer count by the file before anything is sized by it.
    if n_layers > c.tensor_infos.len() / TENSORS_PER_LAYER {
        return Err(gguf_err(
            path,
            format!(
                "metadata `{}` is {n_layers}, but the file has only {} tensors ({TENSORS_PER_LAYER} per layer)",
                key("block_count"),
                c.tensor_infos.len()
            ),
        ));
    }
    let heads = per_layer(c, &key("attention.head_count"), n_layers, path)?
        .ok_or_else(|| gguf_err(path, format!("missing metadata `{}`", key("attention.head_count"))))?;
    let kv_heads = per_layer(c, &key("attention.head_count_kv"), n_layers, path)?.unwrap_or_else(|| heads.clone());
    let ffn = per_layer(c, &key("feed_forward_length"), n_layers, path)?
        .ok_or_else(|| gguf_err(path, format!("missing metadata `{}`", key("feed_forward_length"))))?;
    let key_length = match meta(c, &key("attention.key_length")) {
        Some(v) => Some(
            value_usize(v)
                .ok_or_else(|| gguf_err(path, format!("`{}` is not an integer", key("attention.key_length"))))?,
        ),
        None => None,
    };
    let vocab_size = match meta(c, &key("vocab_size")) {
        Some(v) => {
            value_usize(v).ok_or_else(|| gguf_err(path, format!("`{}` is not an integer", key("vocab_size"))))?
        }
        None => match meta(c, "tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => return Err(gguf_err(path, format!("missing `{}` and `tokenizer.ggml.tokens`", key("vocab_size")))),
        },
    };
    let f = |k: &str, default: f64| meta(c, &key(k)).and_then(value_f64).unwrap_or(default);
    let mut arch = family.arch();
    let scaling = match meta(c, &key("rope.scaling.type")) {
        None => RopeScaling::Default,
        Some(Value::String(t)) if t == "none" => RopeScaling::Default,
        Some(Value::String(t)) if t == "linear" => RopeScaling::Linear { factor: f("rope.scaling.factor", 1.0) },
        Some(v) => {
            return Err(gguf_err(
                path,
                format!("metadata `{}` {v:?} is not supported (none, linear)", key("rope.scaling.type")),
            ))
        }
    };
    arch.rope = Rope { theta: f("rope.freq_base", 10_000.0), scaling };
    let window = meta(c, &key("attention.sliding_window")).and_then(value_usize);
    let mut sliding = vec![false; n_layers];
    if family == Family::Gemma3 {
        // llama.cpp's Gemma-3: every sixth layer global, the others sliding with a rotary base of 10000; scores
        // scaled by head_dim^-1/2 (query_pre_attn_scalar = head_dim for the published sizes but 27B).
        arch.sliding_window = window.or(Some(512));
        arch.local_rope = Some(Rope { theta: 10_000.0, scaling: RopeScaling::Default });
        sliding = (0..n_layers).map(|i| (i + 1) % 6 != 0).collect();
    } else if let Some(w) = window {
        arch.sliding_window = Some(w);
        sliding = vec![true; n_layers];
    }
    let mut layers = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        if heads[i] == 0 {
            return Err(gguf_err(path, format!("layer {i} has no attention heads")));
        }
        layers.push(LayerSpec {
            num_attention_heads: heads[i],
            num_key_value_heads: kv_heads[i],
            head_dim: key_length.unwrap_or(hidden / heads[i]),
            intermediate_size: ffn[i],
            sliding: sliding[i],
        });
    }
    if family == Family::Gemma3 {
        arch.query_pre_attn_scalar = Some(layers[0].head_dim as f64);
    }
    if let Some(info) = c.tensor_infos.get(ROPE_FREQS) {
        let head_dim = layers[0].head_dim;
        let refuse = |why: String| gguf_err(path, format!("tensor `{ROPE_FREQS}` {why}"));
        if arch.rope.scaling != RopeScaling::Default {
            return Err(refuse(format!("comes with `{}` as well: two rotary scalings", key("rope.scaling.type"))));
        }
        if layers.iter().any(|l| l.head_dim != head_dim) {
            return Err(refuse("needs one head_dim for all layers".into()));
        }
        // Checked against head_dim before it is read (its byte size was checked against the file already).
        if info.shape.dims() != [head_dim / 2] {
            return Err(refuse(format!(
                "has shape {:?}, but head_dim {head_dim} needs [{}]",
                info.shape.dims(),
                head_dim / 2
            )));
        }
        let q = c.tensor(reader, ROPE_FREQS, &Device::Cpu).map_err(|e| refuse(e.to_string()))?;
        let factors: Vec<f32> = dequantize_qtensor(&q, ROPE_FREQS, path)?.to_vec1()?;
        arch.rope = Rope::from_gguf_factors(arch.rope.theta, head_dim, &factors).map_err(refuse)?;
    }
    let spec = ModelSpec {
        vocab_size,
        hidden_size: hidden,
        rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-5),
        max_position_embeddings: meta(c, &key("context_length")).and_then(value_usize).unwrap_or(2048),
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        bos_token_id: meta(c, "tokenizer.ggml.bos_token_id").and_then(value_usize).map(|x| x as u32),
        eos_token_id: meta(c, "tokenizer.ggml.eos_token_id").and_then(value_usize).map(|x| x as u32),
        arch,
        layers,
    };
    spec.validate(path)?;
    Ok(spec)
}

/// The layer part of a GGUF tensor name (after `blk.N.`).
fn gguf_part(name: &str) -> Option<Part> {
    Some(match name {
        "attn_norm.weight" => Part::AttnNorm,
        "attn_q.weight" => Part::Q,
        "attn_k.weight" => Part::K,
        "attn_v.weight" => Part::V,
        "attn_output.weight" => Part::O,
        "ffn_norm.weight" => Part::MlpNorm,
        "ffn_gate.weight" => Part::Gate,
        "ffn_up.weight" => Part::Up,
        "ffn_down.weight" => Part::Down,
        "attn_q.bias" => Part::QBias,
        "attn_k.bias" => Part::KBias,
        "attn_v.bias" => Part::VBias,
        "attn_q_norm.weight" => Part::QNorm,
        "attn_k_norm.weight" => Part::KNorm,
        "post_attention_norm.weight" => Part::AttnOutNorm,
        "post_ffw_norm.weight" => Part::MlpOutNorm,
        _ => return None,
    })
}

/// HF name (and layer part, for layer tensors) of a GGUF tensor name.
fn hf_name(gguf: &str, arch: &Arch) -> Option<(String, Option<(usize, Part)>)> {
    Some(match gguf {
        "token_embd.weight" => ("model.embed_tokens.weight".into(), None),
        "output_norm.weight" => ("model.norm.weight".into(), None),
        "output.weight" => ("lm_head.weight".into(), None),
        _ => {
            let rest = gguf.strip_prefix("blk.")?;
            let (idx, part) = rest.split_once('.')?;
            let idx: usize = idx.parse().ok()?;
            let part = gguf_part(part)?;
            (format!("model.layers.{idx}.{}", part.hf_suffix(arch)), Some((idx, part)))
        }
    })
}

/// Undoes llama.cpp's `permute(w, n_head)`: GGUF rows are ordered (head, pair, half) for interleaved rotary,
/// HF rows (head, half, pair) for rotate-half.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// HF tensor name → the shape `spec` implies (the LM head included even when tied: a GGUF may carry it).
fn expected_shapes(spec: &ModelSpec) -> HashMap<String, Vec<usize>> {
    let (v, h) = (spec.vocab_size, spec.hidden_size);
    let mut out = HashMap::new();
    out.insert("model.embed_tokens.weight".to_string(), vec![v, h]);
    out.insert("model.norm.weight".to_string(), vec![h]);
    out.insert("lm_head.weight".to_string(), vec![v, h]);
    for (i, l) in spec.layers.iter().enumerate() {
        for (part, shape) in LayerWeights::expected_shapes(l, h, &spec.arch) {
            out.insert(format!("model.layers.{i}.{}", part.hf_suffix(&spec.arch)), shape);
        }
    }
    out
}

/// A GGUF tensor as f32 on the CPU, by candle's dequantiser for its type (F32, F16, BF16, Q4_0, Q4_1, Q5_0,
/// Q5_1, Q8_0, Q2_K..Q6_K: the types [`read_content`] accepts), checked finite. `name` and `path` go into errors.
pub fn dequantize_qtensor(q: &QTensor, name: &str, path: &Path) -> Result<Tensor> {
    let t = q
        .dequantize(&Device::Cpu)
        .map_err(|e| gguf_err(path, format!("tensor `{name}` ({:?}): cannot dequantise: {e}", q.dtype())))?;
    crate::files::check_finite(&t, name, path)?;
    Ok(t)
}

/// Dequantises raw GGUF tensor data the way [`load_gguf`] does: read through candle's [`TensorInfo::read`] (what
/// [`Content::tensor`] calls, here over the bytes alone), then [`dequantize_qtensor`]. `dims` are in candle's
/// order, the last one fastest, in whole blocks of `dtype`; the length must be exact. For tests that check a
/// block layout byte by byte.
pub fn dequantize_raw(dtype: GgmlDType, raw: &[u8], dims: &[usize], name: &str, path: &Path) -> Result<Tensor> {
    let elems = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let block = dtype.block_size();
    let want = match elems {
        Some(n) if dims.last().is_some_and(|&d| d % block == 0) => (n / block).checked_mul(dtype.type_size()),
        _ => None,
    }
    .ok_or_else(|| gguf_err(path, format!("tensor `{name}`: shape {dims:?} is not whole {dtype:?} blocks")))?;
    if raw.len() != want {
        return Err(gguf_err(
            path,
            format!("tensor `{name}`: {} bytes for shape {dims:?} of {dtype:?}, which needs {want}", raw.len()),
        ));
    }
    let info = TensorInfo { ggml_dtype: dtype, shape: dims.to_vec().into(), offset: 0 };
    let q = info
        .read(&mut std::io::Cursor::new(raw), 0, &Device::Cpu)
        .map_err(|e| gguf_err(path, format!("tensor `{name}`: {e}")))?;
    dequantize_qtensor(&q, name, path)
}

/// Loads the spec and f32 weights of a GGUF (see [`spec_from_gguf`] for the architectures). llama.cpp's
/// converter permutes the Q/K rows of `llama` models for its interleaved rotary (undone here) and stores Gemma's
/// norm weights as `1 + w` (the 1 is taken off again, as transformers' GGUF loader does).
pub fn load_gguf(path: &Path, device: &Device) -> Result<(ModelSpec, Weights, Arc<Content>)> {
    let (spec, weights, content) = load_gguf_mapped(path, device)?;
    Ok((spec, weights.into_resident()?, content))
}

/// [`load_gguf`] with each layer read and dequantised when it is used: only the embeddings, the final norm and
/// the LM head are read now. Every tensor's name and shape is checked now, against the metadata.
pub fn load_gguf_mapped(path: &Path, device: &Device) -> Result<(ModelSpec, Weights, Arc<Content>)> {
    let (content, mut reader) = read_content(path)?;
    let spec = spec_from_gguf(&content, &mut reader, path)?;
    let expected = expected_shapes(&spec);
    let mut resident = HashMap::new();
    let mut layer_names: Vec<HashMap<Part, String>> = vec![HashMap::new(); spec.layers.len()];
    let mut names: Vec<&String> = content.tensor_infos.keys().filter(|n| *n != ROPE_FREQS).collect();
    names.sort();
    let no_layer = |name: &str| {
        gguf_err(
            path,
            format!(
                "tensor `{name}` belongs to no layer ({} layers): metadata and tensors disagree",
                spec.layers.len()
            ),
        )
    };
    for name in names {
        let (hf, layer_part) = hf_name(name, &spec.arch).ok_or_else(|| {
            gguf_err(path, format!("unexpected tensor `{name}` for a {} model", spec.arch.family.model_type()))
        })?;
        // Check the shape against the metadata before reading (and allocating) the tensor.
        let dims = content.tensor_infos[name].shape.dims();
        match expected.get(&hf) {
            Some(want) if want.as_slice() == dims => {}
            Some(want) => {
                return Err(gguf_err(
                    path,
                    format!("tensor `{name}` has shape {dims:?}, but the metadata implies {want:?}"),
                ))
            }
            None => return Err(no_layer(name)),
        }
        if let Some((layer, part)) = layer_part {
            layer_names.get_mut(layer).ok_or_else(|| no_layer(name))?.insert(part, name.clone());
            continue;
        }
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| gguf_err(path, format!("tensor `{name}`: {e}")))?;
        let mut t = dequantize_qtensor(&q, name, path)?;
        if spec.arch.norm_plus_one && hf.ends_with("norm.weight") {
            t = (t - 1.0)?;
        }
        resident.insert(hf, t.to_device(device)?);
    }
    let content = Arc::new(content);
    let file = Arc::new(crate::mapped::GgufFile { path: path.to_path_buf(), content: content.clone() });
    let mut layers = Vec::with_capacity(spec.layers.len());
    for (i, (l, mut names)) in spec.layers.iter().zip(layer_names).enumerate() {
        let mut parts = Vec::new();
        for &p in Part::ALL.iter().filter(|p| p.present(&spec.arch)) {
            let name = names.remove(&p).ok_or_else(|| ModelError::MissingTensor {
                path: path.to_path_buf(),
                name: format!("model.layers.{i}.{}", p.hf_suffix(&spec.arch)),
            })?;
            parts.push((p, name));
        }
        let unpermute = (spec.arch.family == Family::Llama).then_some((l.num_attention_heads, l.num_key_value_heads));
        let layer = crate::mapped::GgufLayer {
            file: file.clone(),
            parts,
            unpermute,
            norm_plus_one: spec.arch.norm_plus_one,
            arch: spec.arch,
            device: device.clone(),
        };
        layers.push(LayerSlot::Lazy(Arc::new(layer)));
    }
    // The non-layer tensors go through the same checks as an in-memory model's (missing, tied head).
    let mut weights = Weights::from_named(&ModelSpec { layers: Vec::new(), ..spec.clone() }, resident, path)?;
    weights.layers = layers;
    Ok((spec, weights, content))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2).reshape(out, in)
        let (n_head, hd, inp) = (3usize, 4usize, 2usize);
        let hf: Vec<f32> = (0..(n_head * hd * inp)).map(|x| x as f32).collect();
        let hf = Tensor::from_vec(hf, (n_head * hd, inp), &Device::Cpu).unwrap();
        let permuted = hf
            .reshape((n_head, 2, hd / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((n_head * hd, inp))
            .unwrap();
        // Hand-checked: head 0 rows in GGUF order are HF rows 0, 2, 1, 3.
        let rows: Vec<Vec<f32>> = permuted.to_vec2().unwrap();
        assert_eq!(rows[1], vec![4.0, 5.0]);
        assert_eq!(rows[2], vec![2.0, 3.0]);
        let back = unpermute_qk(&permuted, n_head).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn gguf_names_map_to_hf() {
        let llama = Family::Llama.arch();
        let gemma = Family::Gemma3.arch();
        let name = |g: &str, a: &Arch| hf_name(g, a).map(|(n, _)| n);
        assert_eq!(name("blk.12.attn_output.weight", &llama).unwrap(), "model.layers.12.self_attn.o_proj.weight");
        assert_eq!(name("token_embd.weight", &llama).unwrap(), "model.embed_tokens.weight");
        assert!(name("blk.1.attn_qkv.weight", &llama).is_none());
        // Gemma-3's sandwich norms: GGUF `ffn_norm` is the pre-MLP norm, `post_attention_norm` the norm of the
        // attention output (HF's `post_attention_layernorm` in that family).
        assert_eq!(name("blk.0.ffn_norm.weight", &llama).unwrap(), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(name("blk.0.ffn_norm.weight", &gemma).unwrap(), "model.layers.0.pre_feedforward_layernorm.weight");
        assert_eq!(
            name("blk.0.post_attention_norm.weight", &gemma).unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(name("blk.3.attn_k_norm.weight", &gemma).unwrap(), "model.layers.3.self_attn.k_norm.weight");
    }
}
