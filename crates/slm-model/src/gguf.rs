//! Loading a llama-architecture GGUF (llama.cpp's format): every tensor is dequantised to f32 and the Q/K rows
//! that llama.cpp permutes for its interleaved rotary are put back in the HF (rotate-half) order.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};
use crate::spec::{LayerSpec, ModelSpec};
use crate::weights::{LayerWeights, Weights};

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

/// The model's dimensions from GGUF metadata.
pub fn spec_from_gguf(c: &Content, path: &Path) -> Result<ModelSpec> {
    let arch = match meta(c, "general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(gguf_err(path, "missing metadata `general.architecture`")),
    };
    if arch != "llama" {
        return Err(gguf_err(path, format!("unsupported architecture `{arch}` (only `llama`)")));
    }
    if c.tensor_infos.contains_key("rope_freqs.weight") || meta(c, "llama.rope.scaling.type").is_some() {
        return Err(gguf_err(path, "rotary scaling (rope_freqs / llama.rope.scaling) is not supported"));
    }
    let hidden = meta_usize(c, "llama.embedding_length", path)?;
    let n_layers = meta_usize(c, "llama.block_count", path)?;
    // Bound the layer count by the file before anything is sized by it.
    if n_layers > c.tensor_infos.len() / TENSORS_PER_LAYER {
        return Err(gguf_err(
            path,
            format!(
                "metadata `llama.block_count` is {n_layers}, but the file has only {} tensors ({TENSORS_PER_LAYER} per layer)",
                c.tensor_infos.len()
            ),
        ));
    }
    let heads = per_layer(c, "llama.attention.head_count", n_layers, path)?
        .ok_or_else(|| gguf_err(path, "missing metadata `llama.attention.head_count`"))?;
    let kv_heads = per_layer(c, "llama.attention.head_count_kv", n_layers, path)?.unwrap_or_else(|| heads.clone());
    let ffn = per_layer(c, "llama.feed_forward_length", n_layers, path)?
        .ok_or_else(|| gguf_err(path, "missing metadata `llama.feed_forward_length`"))?;
    let key_length = match meta(c, "llama.attention.key_length") {
        Some(v) => {
            Some(value_usize(v).ok_or_else(|| gguf_err(path, "`llama.attention.key_length` is not an integer"))?)
        }
        None => None,
    };
    let vocab_size = match meta(c, "llama.vocab_size") {
        Some(v) => value_usize(v).ok_or_else(|| gguf_err(path, "`llama.vocab_size` is not an integer"))?,
        None => match meta(c, "tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => return Err(gguf_err(path, "missing `llama.vocab_size` and `tokenizer.ggml.tokens`")),
        },
    };
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
        });
    }
    let f = |key: &str, default: f64| meta(c, key).and_then(value_f64).unwrap_or(default);
    let spec = ModelSpec {
        vocab_size,
        hidden_size: hidden,
        rms_norm_eps: f("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta: f("llama.rope.freq_base", 10_000.0),
        max_position_embeddings: meta(c, "llama.context_length").and_then(value_usize).unwrap_or(2048),
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        bos_token_id: meta(c, "tokenizer.ggml.bos_token_id").and_then(value_usize).map(|x| x as u32),
        eos_token_id: meta(c, "tokenizer.ggml.eos_token_id").and_then(value_usize).map(|x| x as u32),
        layers,
    };
    spec.validate(path)?;
    Ok(spec)
}

/// HF name for a GGUF tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    Some(match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.")?;
            let (idx, part) = rest.split_once('.')?;
            let idx: usize = idx.parse().ok()?;
            let suffix = match part {
                "attn_norm.weight" => "input_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                _ => return None,
            };
            format!("model.layers.{idx}.{suffix}")
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
    let suffixes = LayerWeights::named_suffixes();
    for (i, l) in spec.layers.iter().enumerate() {
        for (suffix, shape) in suffixes.iter().zip(LayerWeights::expected_shapes(l, h)) {
            out.insert(format!("model.layers.{i}.{suffix}"), shape);
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

/// Loads the spec and f32 weights of a llama GGUF.
pub fn load_gguf(path: &Path, device: &Device) -> Result<(ModelSpec, Weights, Content)> {
    let (content, mut reader) = read_content(path)?;
    let spec = spec_from_gguf(&content, path)?;
    let expected = expected_shapes(&spec);
    let mut tensors = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let hf =
            hf_name(name).ok_or_else(|| gguf_err(path, format!("unexpected tensor `{name}` for a llama model")))?;
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
            None => {
                return Err(gguf_err(
                    path,
                    format!(
                        "tensor `{name}` belongs to no layer ({} layers): metadata and tensors disagree",
                        spec.layers.len()
                    ),
                ))
            }
        }
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| gguf_err(path, format!("tensor `{name}`: {e}")))?;
        let mut t = dequantize_qtensor(&q, name, path)?;
        if let Some(layer) = hf.strip_prefix("model.layers.").and_then(|r| r.split('.').next()?.parse::<usize>().ok()) {
            let l = spec.layers.get(layer).ok_or_else(|| {
                gguf_err(
                    path,
                    format!(
                        "tensor `{name}` belongs to no layer ({} layers): metadata and tensors disagree",
                        spec.layers.len()
                    ),
                )
            })?;
            if hf.ends_with("q_proj.weight") && t.rank() == 2 && t.dim(0)? % (2 * l.num_attention_heads) == 0 {
                t = unpermute_qk(&t, l.num_attention_heads)?;
            } else if hf.ends_with("k_proj.weight") && t.rank() == 2 && t.dim(0)? % (2 * l.num_key_value_heads) == 0 {
                t = unpermute_qk(&t, l.num_key_value_heads)?;
            }
        }
        tensors.insert(hf, t.to_device(device)?);
    }
    let weights = Weights::from_named(&spec, tensors, path)?;
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
        assert_eq!(hf_name("blk.12.attn_output.weight").unwrap(), "model.layers.12.self_attn.o_proj.weight");
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert!(hf_name("blk.1.attn_qkv.weight").is_none());
    }
}
