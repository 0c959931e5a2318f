//! Writers of tiny model files for the hostile-input tests: a llama GGUF (our own encoder, so a test can write
//! what candle's writer never would) and a safetensors file with a hand-built header.

#![allow(dead_code)]

use candle_core::quantized::gguf_file::Value;
use candle_core::Tensor;

/// One tensor of a GGUF: dims in file order (ne0 first), ggml type id, raw data.
pub struct GTensor {
    pub name: String,
    pub ne: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
    /// Written instead of the computed offset.
    pub offset: Option<u64>,
}

pub struct Gguf {
    pub version: u32,
    pub meta: Vec<(String, Value)>,
    pub tensors: Vec<GTensor>,
    /// Padding used when laying out the data (independent of any `general.alignment` in `meta`).
    pub pad: u64,
}

/// Encoded bytes, the end of the header, and the (position, width) of every count/length/dim/offset field.
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub header_len: usize,
    pub fields: Vec<(usize, usize)>,
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_u64(out: &mut Vec<u8>, x: u64, fields: &mut Vec<(usize, usize)>) {
    fields.push((out.len(), 8));
    out.extend_from_slice(&x.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str, fields: &mut Vec<(usize, usize)>) {
    put_u64(out, s.len() as u64, fields);
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value, fields: &mut Vec<(usize, usize)>) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s, fields),
        Value::Array(a) => {
            let ty = a.first().map(type_id).unwrap_or(4);
            fields.push((out.len(), 4));
            out.extend_from_slice(&ty.to_le_bytes());
            put_u64(out, a.len() as u64, fields);
            for x in a {
                put_value(out, x, fields);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

impl Gguf {
    pub fn encode(&self) -> Encoded {
        let (mut out, mut fields) = (Vec::new(), Vec::new());
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        put_u64(&mut out, self.tensors.len() as u64, &mut fields);
        put_u64(&mut out, self.meta.len() as u64, &mut fields);
        for (k, v) in &self.meta {
            put_str(&mut out, k, &mut fields);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v, &mut fields);
        }
        let pad = self.pad.max(1);
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut out, &t.name, &mut fields);
            fields.push((out.len(), 4));
            out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for &d in &t.ne {
                put_u64(&mut out, d, &mut fields);
            }
            out.extend_from_slice(&t.ty.to_le_bytes());
            put_u64(&mut out, t.offset.unwrap_or(offset), &mut fields);
            offset = (offset + t.data.len() as u64).div_ceil(pad) * pad;
        }
        let header_len = out.len();
        out.resize((out.len() as u64).div_ceil(pad) as usize * pad as usize, 0);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            out.resize((out.len() as u64).div_ceil(pad) as usize * pad as usize, 0);
        }
        Encoded { bytes: out, header_len, fields }
    }

    pub fn meta_mut(&mut self, key: &str) -> &mut Value {
        &mut self.meta.iter_mut().find(|(k, _)| k == key).expect("no such key").1
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut GTensor {
        self.tensors.iter_mut().find(|t| t.name == name).expect("no such tensor")
    }
}

pub const VOCAB: usize = 16;
pub const HIDDEN: usize = 8;

fn f32_tensor(name: String, ne: &[usize], seed: usize, ones: bool) -> GTensor {
    let n: usize = ne.iter().product();
    let data = (0..n)
        .flat_map(|i| {
            let x = if ones { 1.0f32 } else { ((i * 37 + seed * 11) % 17) as f32 / 17.0 - 0.5 };
            x.to_le_bytes()
        })
        .collect();
    GTensor { name, ne: ne.iter().map(|&d| d as u64).collect(), ty: 0, data, offset: None }
}

/// A valid tiny llama GGUF (vocab 16, hidden 8, 2 heads over 1 KV head of dim 4, MLP 16, tied head) with a
/// byte-level BPE tokenizer.
pub fn tiny_llama_gguf(layers: usize) -> Gguf {
    let s = |x: &str| Value::String(x.into());
    let mut tokens: Vec<Value> = (b'a'..b'a' + 14).map(|c| s(&(c as char).to_string())).collect();
    tokens.push(s("ab"));
    tokens.push(s("<|endoftext|>"));
    let types: Vec<Value> = (0..VOCAB).map(|i| Value::I32(if i == VOCAB - 1 { 3 } else { 1 })).collect();
    let meta = vec![
        ("general.architecture".into(), s("llama")),
        ("general.alignment".into(), Value::U32(32)),
        ("llama.block_count".into(), Value::U32(layers as u32)),
        ("llama.embedding_length".into(), Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length".into(), Value::U32(16)),
        ("llama.attention.head_count".into(), Value::U32(2)),
        ("llama.attention.head_count_kv".into(), Value::U32(1)),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
        ("llama.context_length".into(), Value::U32(64)),
        ("llama.vocab_size".into(), Value::U32(VOCAB as u32)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![s("a b")])),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(15)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(15)),
    ];
    let mut tensors = vec![
        f32_tensor("token_embd.weight".into(), &[HIDDEN, VOCAB], 1, false),
        f32_tensor("output_norm.weight".into(), &[HIDDEN], 2, true),
    ];
    for i in 0..layers {
        let t = |part: &str, ne: &[usize], k: usize, ones: bool| f32_tensor(format!("blk.{i}.{part}"), ne, k, ones);
        tensors.extend([
            t("attn_norm.weight", &[8], 0, true),
            t("attn_q.weight", &[8, 8], 3, false),
            t("attn_k.weight", &[8, 4], 4, false),
            t("attn_v.weight", &[8, 4], 5, false),
            t("attn_output.weight", &[8, 8], 6, false),
            t("ffn_norm.weight", &[8], 0, true),
            t("ffn_gate.weight", &[8, 16], 7, false),
            t("ffn_up.weight", &[8, 16], 8, false),
            t("ffn_down.weight", &[16, 8], 9, false),
        ]);
    }
    Gguf { version: 3, meta, tensors, pad: 32 }
}

/// A safetensors file of f32 tensors with a hand-built header; `dup` repeats that tensor's header entry (same
/// data offsets), which the safetensors crate alone would accept.
pub fn safetensors_bytes(tensors: &[(String, Tensor)], dup: Option<&str>) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, t) in tensors {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let start = data.len();
        data.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        let entry =
            format!(r#""{name}":{{"dtype":"F32","shape":{:?},"data_offsets":[{start},{}]}}"#, t.dims(), data.len());
        if dup == Some(name.as_str()) {
            entries.push(entry.clone());
        }
        entries.push(entry);
    }
    let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    out
}

/// The named tensors of a tiny HF model in saving order, and its `config.json`.
pub fn tiny_hf(layers: usize) -> (Vec<(String, Tensor)>, serde_json::Value) {
    let m = slm_model::testing::tiny_model(layers, 5);
    (m.weights.named_tensors(&m.spec.arch).unwrap(), m.spec.to_hf_config("float32"))
}

/// Writes a tiny HF directory (config.json + model.safetensors) into `dir`.
pub fn write_tiny_hf(dir: &std::path::Path, layers: usize) {
    let (tensors, config) = tiny_hf(layers);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(&tensors, None)).unwrap();
}
