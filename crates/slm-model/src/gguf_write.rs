//! Writing a model as a GGUF that llama.cpp runs (`slm export --out FILE.gguf`).
//!
//! A model whose layers all have one shape is written as its family's own llama.cpp architecture (`llama` for
//! Llama and Mistral, `qwen2`, `qwen3`, `gemma3`); a Llama-family model with per-layer widths as `deci`, whose
//! builder sizes each layer by the per-layer arrays `deci.attention.head_count`, `deci.attention.head_count_kv`
//! and `deci.feed_forward_length` (llama.cpp `src/models/deci.cpp`; the `llama` builder takes one width for all
//! layers). What the loader undoes is done here: Q/K rows permuted to llama.cpp's interleaved-rotary order for
//! the `llama`/`deci` architectures, Gemma's norms stored as `1 + w`, Llama-3.1's rotary scaling as the
//! `rope_freqs.weight` divisors. The tokenizer goes into the metadata: copied from the GGUF the model was loaded
//! from, or rebuilt from its `tokenizer.json` ([`crate::Tokenizer::gguf_metadata`]).
//!
//! The file is streamed: the header first (every tensor's type and offset is known from the shapes), then one
//! layer at a time, into a temporary sibling that is renamed into place only when complete, so a killed run
//! leaves the old file or none.
//!
//! Spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md> (version 3, alignment 32).

use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use crate::error::{ModelError, Result};
use crate::output::{self, OutputKind, OutputStamp, Replace};
use crate::spec::{Family, ModelSpec, RopeScaling};
use crate::weights::{Part, PartKind};
use crate::Model;

/// Alignment of the tensor data (llama.cpp's default; written as `general.alignment`).
pub const ALIGNMENT: u64 = 32;
/// Metadata key of the [`OutputStamp`] (JSON) of a GGUF that slm wrote.
pub const STAMP_META_KEY: &str = "slm.output";
/// Metadata key of the `slm_plan.json` of the model exported, when it has one (what was pruned, as JSON).
pub const PLAN_META_KEY: &str = "slm.plan";

/// What the weight matrices are stored as (`--outtype`). Vectors (norms, biases, rotary divisors) stay f32, as
/// llama.cpp's converter keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4K,
}

impl OutType {
    pub const ALL: [OutType; 6] =
        [OutType::F32, OutType::F16, OutType::Bf16, OutType::Q8_0, OutType::Q4_0, OutType::Q4K];

    /// The flag's spelling.
    pub fn name(self) -> &'static str {
        match self {
            OutType::F32 => "f32",
            OutType::F16 => "f16",
            OutType::Bf16 => "bf16",
            OutType::Q8_0 => "q8_0",
            OutType::Q4_0 => "q4_0",
            OutType::Q4K => "q4_k",
        }
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            OutType::F32 => GgmlDType::F32,
            OutType::F16 => GgmlDType::F16,
            OutType::Bf16 => GgmlDType::BF16,
            OutType::Q8_0 => GgmlDType::Q8_0,
            OutType::Q4_0 => GgmlDType::Q4_0,
            OutType::Q4K => GgmlDType::Q4K,
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q4_0 2, MOSTLY_Q8_0 7,
    /// MOSTLY_Q4_K_M 15, MOSTLY_BF16 32).
    pub fn file_type(self) -> u32 {
        match self {
            OutType::F32 => 0,
            OutType::F16 => 1,
            OutType::Q4_0 => 2,
            OutType::Q8_0 => 7,
            OutType::Q4K => 15,
            OutType::Bf16 => 32,
        }
    }

    /// The type a matrix with rows of `row_len` values is stored as: the asked type when rows are whole blocks of
    /// it, else the next type down the chain q4_k → q4_0 → f16 (q8_0 → f16) whose blocks fit, as llama.cpp's
    /// quantiser falls back for rows that are not whole blocks.
    pub fn for_row(self, row_len: usize) -> GgmlDType {
        let chain: &[GgmlDType] = match self {
            OutType::Q4K => &[GgmlDType::Q4K, GgmlDType::Q4_0, GgmlDType::F16],
            OutType::Q4_0 => &[GgmlDType::Q4_0, GgmlDType::F16],
            OutType::Q8_0 => &[GgmlDType::Q8_0, GgmlDType::F16],
            _ => &[],
        };
        chain.iter().copied().find(|t| row_len.is_multiple_of(t.block_size())).unwrap_or(self.ggml())
    }
}

impl std::str::FromStr for OutType {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.to_ascii_lowercase();
        OutType::ALL.iter().copied().find(|t| t.name() == s || (s == "q4_k_m" && *t == OutType::Q4K)).ok_or_else(|| {
            let names: Vec<_> = OutType::ALL.iter().map(|t| t.name()).collect();
            ModelError::InvalidArgument(format!("unknown --outtype `{s}` (expected {})", names.join(", ")))
        })
    }
}

/// ggml's type id of a tensor type (ggml.h `ggml_type`).
pub fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// The llama.cpp architecture a model is written as, and whether its layers need the per-layer arrays of `deci`.
/// A model with per-layer widths of a family llama.cpp cannot build per layer is refused, naming the family.
pub fn gguf_architecture(spec: &ModelSpec) -> Result<&'static str> {
    let family = spec.arch.family;
    if !spec.is_uniform() {
        return match family {
            Family::Llama | Family::Mistral => Ok("deci"),
            other => Err(ModelError::InvalidArgument(format!(
                "this {} model has layers of different widths, which llama.cpp builds per layer only for Llama \
                 models (the `deci` architecture); its `{}` builder takes one width for every layer, so it cannot \
                 run this model",
                other.model_type(),
                plain_name(other)
            ))),
        };
    }
    Ok(plain_name(family))
}

fn plain_name(family: Family) -> &'static str {
    match family {
        Family::Llama | Family::Mistral => "llama",
        Family::Qwen2 => "qwen2",
        Family::Qwen3 => "qwen3",
        Family::Gemma3 => "gemma3",
    }
}

/// Whether llama.cpp stores the architecture's Q/K rows permuted for interleaved rotary (its converter's
/// `LlamaModel.permute`, also applied by `DeciModel`); the Qwen and Gemma builders use rotate-half as HF does.
fn permutes_qk(arch_name: &str) -> bool {
    matches!(arch_name, "llama" | "deci")
}

/// llama.cpp's `permute(w, n_head)`: HF rows (head, half, pair) → GGUF rows (head, pair, half). Inverse of
/// [`crate::gguf::unpermute_qk`].
pub fn permute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, 2, hd / 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// The GGUF name of a layer part (after `blk.N.`), as llama.cpp's tensor map names it.
pub fn gguf_part_name(part: Part) -> &'static str {
    match part {
        Part::AttnNorm => "attn_norm.weight",
        Part::Q => "attn_q.weight",
        Part::K => "attn_k.weight",
        Part::V => "attn_v.weight",
        Part::O => "attn_output.weight",
        Part::MlpNorm => "ffn_norm.weight",
        Part::Gate => "ffn_gate.weight",
        Part::Up => "ffn_up.weight",
        Part::Down => "ffn_down.weight",
        Part::QBias => "attn_q.bias",
        Part::KBias => "attn_k.bias",
        Part::VBias => "attn_v.bias",
        Part::QNorm => "attn_q_norm.weight",
        Part::KNorm => "attn_k_norm.weight",
        Part::AttnOutNorm => "post_attention_norm.weight",
        Part::MlpOutNorm => "post_ffw_norm.weight",
    }
}

/// Where a tensor of the file comes from.
#[derive(Debug, Clone)]
enum Source {
    Embed,
    Norm,
    Head,
    RopeFreqs(Vec<f32>),
    Layer(usize, Part),
}

/// One entry of the tensor table: its GGUF name, its shape in candle's order (outermost first), its type.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
    source: Source,
}

impl TensorEntry {
    /// Bytes of the tensor's data.
    pub fn bytes(&self) -> u64 {
        let elems: usize = self.dims.iter().product();
        (elems / self.dtype.block_size() * self.dtype.type_size()) as u64
    }
}

/// What [`export_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub architecture: &'static str,
    pub tensors: usize,
    pub file_bytes: u64,
    /// Matrices stored in another type than asked (rows not whole blocks of it), with the type used.
    pub fallbacks: Vec<(String, GgmlDType)>,
}

fn u32v(x: usize) -> Value {
    Value::U32(x as u32)
}

/// A per-layer count: one number when all layers agree (what every runtime reads), else an array with one
/// entry per layer (INT32, as llama.cpp's converter writes lists).
fn per_layer_value(values: &[usize], as_array: bool) -> Value {
    if !as_array && values.windows(2).all(|w| w[0] == w[1]) {
        return u32v(values.first().copied().unwrap_or(0));
    }
    Value::Array(values.iter().map(|&v| Value::I32(v as i32)).collect())
}

/// The architecture metadata of `spec` written as `arch` (keys `{arch}.*` as llama.cpp reads them), refusing what
/// llama.cpp's builder for that architecture would compute differently.
fn arch_metadata(spec: &ModelSpec, arch: &str) -> Result<Vec<(String, Value)>> {
    let refuse = |m: String| ModelError::InvalidArgument(format!("cannot write a `{arch}` GGUF: {m}"));
    let k = |s: &str| format!("{arch}.{s}");
    let layers = &spec.layers;
    let first = layers.first().ok_or_else(|| refuse("the model has no layers".into()))?;
    let head_dim = first.head_dim;
    if layers.iter().any(|l| l.head_dim != head_dim) {
        return Err(refuse("layers differ in head_dim, which GGUF holds once for the model".into()));
    }
    if head_dim % 2 != 0 {
        return Err(refuse(format!("head_dim {head_dim} is odd")));
    }
    let deci = arch == "deci";
    let heads: Vec<usize> = layers.iter().map(|l| l.num_attention_heads).collect();
    let kv: Vec<usize> = layers.iter().map(|l| l.num_key_value_heads).collect();
    let ffn: Vec<usize> = layers.iter().map(|l| l.intermediate_size).collect();
    let mut m = vec![
        (k("context_length"), u32v(spec.max_position_embeddings)),
        (k("embedding_length"), u32v(spec.hidden_size)),
        (k("block_count"), u32v(layers.len())),
        (k("feed_forward_length"), per_layer_value(&ffn, deci)),
        (k("attention.head_count"), per_layer_value(&heads, deci)),
        (k("attention.head_count_kv"), per_layer_value(&kv, deci)),
        (k("attention.key_length"), u32v(head_dim)),
        (k("attention.value_length"), u32v(head_dim)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(spec.rms_norm_eps as f32)),
        (k("rope.dimension_count"), u32v(head_dim)),
        (k("rope.freq_base"), Value::F32(spec.arch.rope.theta as f32)),
        (k("vocab_size"), u32v(spec.vocab_size)),
    ];
    match spec.arch.rope.scaling {
        RopeScaling::Default | RopeScaling::Llama3 { .. } => {}
        RopeScaling::Linear { factor } => {
            m.push((k("rope.scaling.type"), Value::String("linear".into())));
            m.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
        }
    }
    let sliding = layers.iter().filter(|l| l.sliding).count();
    match spec.arch.family {
        Family::Gemma3 => {
            // llama.cpp's Gemma-3: every sixth layer global, the others sliding with a local base of 10000, and
            // scores scaled by head_dim^-1/2; anything else would run as a different model.
            let pattern = layers.iter().enumerate().all(|(i, l)| l.sliding == ((i + 1) % 6 != 0));
            if !pattern {
                return Err(refuse(
                    "its sliding/global layers are not llama.cpp's fixed pattern (every sixth global)".into(),
                ));
            }
            if spec.arch.local_rope.is_some_and(|r| r.theta != 10_000.0 || r.scaling != RopeScaling::Default) {
                return Err(refuse("its local rotary base is not the 10000 llama.cpp assumes".into()));
            }
            if spec.arch.query_pre_attn_scalar.is_some_and(|s| s != head_dim as f64) {
                return Err(refuse("query_pre_attn_scalar differs from head_dim, which llama.cpp assumes".into()));
            }
            if let Some(w) = spec.arch.sliding_window {
                m.push((k("attention.sliding_window"), u32v(w)));
            }
        }
        _ if sliding > 0 => {
            let w = spec.arch.sliding_window.unwrap_or(0);
            if sliding != layers.len() {
                return Err(refuse(format!(
                    "{sliding} of {} layers use a sliding window of {w}, which llama.cpp's `{arch}` builder has \
                     no per-layer switch for",
                    layers.len()
                )));
            }
            tracing::warn!(
                "every layer attends through a sliding window of {w} tokens; llama.cpp's `{arch}` builder attends to \
                 the whole context, which gives the same results for sequences of at most {w} tokens"
            );
            m.push((k("attention.sliding_window"), u32v(w)));
        }
        _ => {}
    }
    Ok(m)
}

/// The divisors llama.cpp reads from `rope_freqs.weight` (plain frequency / scaled frequency) for Llama-3.1's
/// scaling; `None` for the others.
fn rope_freqs(spec: &ModelSpec) -> Option<Vec<f32>> {
    let rope = spec.arch.rope;
    if !matches!(rope.scaling, RopeScaling::Llama3 { .. }) {
        return None;
    }
    let d = spec.layers.first()?.head_dim;
    let plain = crate::spec::Rope { theta: rope.theta, scaling: RopeScaling::Default }.inv_freq(d);
    Some(plain.iter().zip(rope.inv_freq(d)).map(|(p, s)| p / s).collect())
}

/// The tensor table of a model of `spec` with matrices in `outtype` (its LM head only when untied).
fn tensor_table(spec: &ModelSpec, has_head: bool, outtype: OutType) -> Vec<TensorEntry> {
    let (v, h) = (spec.vocab_size, spec.hidden_size);
    let matrix = |dims: Vec<usize>| outtype.for_row(dims[dims.len() - 1]);
    let mut out = vec![TensorEntry {
        name: "token_embd.weight".into(),
        dims: vec![v, h],
        dtype: matrix(vec![v, h]),
        source: Source::Embed,
    }];
    if let Some(f) = rope_freqs(spec) {
        out.push(TensorEntry {
            name: "rope_freqs.weight".into(),
            dims: vec![f.len()],
            dtype: GgmlDType::F32,
            source: Source::RopeFreqs(f),
        });
    }
    for (i, l) in spec.layers.iter().enumerate() {
        for &p in Part::ALL.iter().filter(|p| p.present(&spec.arch)) {
            let dims = p.shape(l, h);
            let dtype = if p.kind() == PartKind::Projection { matrix(dims.clone()) } else { GgmlDType::F32 };
            out.push(TensorEntry {
                name: format!("blk.{i}.{}", gguf_part_name(p)),
                dims,
                dtype,
                source: Source::Layer(i, p),
            });
        }
    }
    out.push(TensorEntry {
        name: "output_norm.weight".into(),
        dims: vec![h],
        dtype: GgmlDType::F32,
        source: Source::Norm,
    });
    if has_head {
        out.push(TensorEntry {
            name: "output.weight".into(),
            dims: vec![v, h],
            dtype: matrix(vec![v, h]),
            source: Source::Head,
        });
    }
    out
}

/// The whole metadata of the file: general keys, the architecture's, the tokenizer's, slm's stamp and plan.
fn metadata(
    model: &Model,
    arch: &'static str,
    outtype: OutType,
    table: &[TensorEntry],
    plan: Option<&[u8]>,
) -> Result<Vec<(String, Value)>> {
    let spec = &model.spec;
    let name = model
        .source
        .as_ref()
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "slm model".into());
    let mut m = vec![
        ("general.architecture".to_string(), Value::String(arch.into())),
        ("general.name".to_string(), Value::String(name)),
        ("general.file_type".to_string(), Value::U32(outtype.file_type())),
        ("general.alignment".to_string(), Value::U32(ALIGNMENT as u32)),
    ];
    if table.iter().any(|t| t.dtype.block_size() > 1) {
        m.push(("general.quantization_version".to_string(), Value::U32(2)));
    }
    m.extend(arch_metadata(spec, arch)?);
    match model.tokenizer.as_ref() {
        Some(tok) => {
            let source_gguf = model.source.as_deref().filter(|p| p.is_file());
            m.extend(tok.gguf_metadata(spec, source_gguf)?);
        }
        None => tracing::warn!(
            "the model has no tokenizer: the GGUF gets no vocabulary, so slm loads it (weights only) but llama.cpp \
             cannot"
        ),
    }
    for (key, id) in
        [("tokenizer.ggml.bos_token_id", spec.bos_token_id), ("tokenizer.ggml.eos_token_id", spec.eos_token_id)]
    {
        if let Some(id) = id.filter(|_| !m.iter().any(|(k, _)| k == key)) {
            m.push((key.to_string(), Value::U32(id)));
        }
    }
    m.push((STAMP_META_KEY.to_string(), Value::String(OutputStamp::new(OutputKind::Gguf).json().to_string())));
    if let Some(plan) = plan {
        m.push((PLAN_META_KEY.to_string(), Value::String(String::from_utf8_lossy(plan).into_owned())));
    } else if let Some(dir) = model.source.as_deref().filter(|p| p.is_dir()) {
        let plan = dir.join("slm_plan.json");
        if plan.is_file() {
            let text = crate::files::read_regular_text(&plan, crate::files::MAX_CONFIG_BYTES)?;
            m.push((PLAN_META_KEY.to_string(), Value::String(text)));
        }
    }
    Ok(m)
}

/// GGUF value type id.
fn value_type(v: &Value) -> u32 {
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

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.push(*x as u8),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(*x as u8),
        Value::String(s) => put_string(buf, s),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => {
            let ty = a.first().map(value_type).unwrap_or(4);
            if a.iter().any(|e| value_type(e) != ty) {
                return Err(ModelError::InvalidArgument("a GGUF array mixes value types".into()));
            }
            buf.extend_from_slice(&ty.to_le_bytes());
            buf.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for e in a {
                put_value(buf, e)?;
            }
        }
    }
    Ok(())
}

/// The header bytes (magic to the end of the tensor table, padded to [`ALIGNMENT`]) and each tensor's offset in
/// the data section.
fn header(metadata: &[(String, Value)], table: &[TensorEntry]) -> Result<(Vec<u8>, Vec<u64>)> {
    let mut buf = Vec::new();
    buf.extend_from_slice(b"GGUF");
    buf.extend_from_slice(&3u32.to_le_bytes());
    buf.extend_from_slice(&(table.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, v) in metadata {
        put_string(&mut buf, key);
        buf.extend_from_slice(&value_type(v).to_le_bytes());
        put_value(&mut buf, v)?;
    }
    let mut offsets = Vec::with_capacity(table.len());
    let mut at = 0u64;
    for t in table {
        put_string(&mut buf, &t.name);
        buf.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        // GGUF lists ne0 (the row length) first.
        for &d in t.dims.iter().rev() {
            buf.extend_from_slice(&(d as u64).to_le_bytes());
        }
        buf.extend_from_slice(&ggml_type_id(t.dtype).to_le_bytes());
        buf.extend_from_slice(&at.to_le_bytes());
        offsets.push(at);
        at = (at + t.bytes()).next_multiple_of(ALIGNMENT);
    }
    buf.resize((buf.len() as u64).next_multiple_of(ALIGNMENT) as usize, 0);
    Ok((buf, offsets))
}

/// A tensor's bytes in `dtype` (f32 little-endian for F32; ggml blocks for the others, by candle's quantiser).
fn tensor_bytes(t: &Tensor, dtype: GgmlDType) -> Result<Vec<u8>> {
    let t = t.to_device(&candle_core::Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
    if dtype == GgmlDType::F32 {
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        return Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect());
    }
    let q = QTensor::quantize(&t, dtype)?;
    Ok(q.data()?.into_owned())
}

/// Writes `model` to the GGUF file `out` with weight matrices in `outtype`: checked like every slm output
/// ([`output::check_output`]), written to a temporary sibling and renamed into place. `progress(done, total)` is
/// called after each tensor. `plan` is the `slm_plan.json` to record under [`PLAN_META_KEY`] (for a model pruned
/// in this process; a model loaded from an slm output directory brings its own).
pub fn export_gguf(
    model: &Model,
    out: &Path,
    outtype: OutType,
    replace: Replace,
    plan: Option<&[u8]>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExportReport> {
    let _span = tracing::info_span!("export_gguf", out = %out.display()).entered();
    let inputs: Vec<&Path> = model.source.as_deref().into_iter().collect();
    output::check_output(out, OutputKind::Gguf, &inputs, replace)?;
    let spec = &model.spec;
    let arch = gguf_architecture(spec)?;
    let table = tensor_table(spec, model.weights.lm_head.is_some(), outtype);
    let fallbacks: Vec<(String, GgmlDType)> = table
        .iter()
        .filter(|t| t.dims.len() == 2 && t.dtype != outtype.ggml())
        .map(|t| (t.name.clone(), t.dtype))
        .collect();
    let matrices = table.iter().filter(|t| t.dims.len() == 2).count();
    if matrices > 0 && fallbacks.len() == matrices {
        return Err(ModelError::InvalidArgument(format!(
            "--outtype {}: no matrix of this model has rows that are whole {}-value blocks (hidden size {}), so \
             not one tensor could be stored as {}; choose another type (q8_0 and q4_0 need rows of a multiple of 32)",
            outtype.name(),
            outtype.ggml().block_size(),
            spec.hidden_size,
            outtype.name()
        )));
    }
    let meta = metadata(model, arch, outtype, &table, plan)?;
    let (head, offsets) = header(&meta, &table)?;

    let parent = output::parent_dir(out);
    std::fs::create_dir_all(&parent).map_err(|e| ModelError::io(&parent, e))?;
    output::remove_stale_temporaries(out);
    let tmp = output::temporary_sibling(out, "tmp");
    let result = (|| -> Result<u64> {
        let file = std::fs::File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let io = |e: std::io::Error| ModelError::io(&tmp, e);
        w.write_all(&head).map_err(io)?;
        let mut written = 0u64;
        let mut current: Option<(usize, crate::LayerWeights)> = None;
        for (k, (t, &off)) in table.iter().zip(&offsets).enumerate() {
            if written < off {
                w.write_all(&vec![0u8; (off - written) as usize]).map_err(io)?;
                written = off;
            }
            let tensor = match &t.source {
                Source::Embed => model.weights.embed_tokens.clone(),
                Source::Norm => norm_stored(&model.weights.norm, spec)?,
                Source::Head => model.weights.lm_head().clone(),
                Source::RopeFreqs(f) => Tensor::new(f.as_slice(), &candle_core::Device::Cpu)?,
                Source::Layer(i, part) => {
                    if current.as_ref().map(|(j, _)| *j) != Some(*i) {
                        current = Some((*i, model.weights.layer(*i)?.into_owned()));
                    }
                    let layer = &current.as_ref().expect("loaded above").1;
                    let x = layer.get(*part).ok_or_else(|| ModelError::MissingTensor {
                        path: out.to_path_buf(),
                        name: format!("model.layers.{i}.{}", part.hf_suffix(&spec.arch)),
                    })?;
                    let l = &spec.layers[*i];
                    match part {
                        Part::Q if permutes_qk(arch) => permute_qk(x, l.num_attention_heads)?,
                        Part::K if permutes_qk(arch) => permute_qk(x, l.num_key_value_heads)?,
                        p if p.kind() == PartKind::Norm => norm_stored(x, spec)?,
                        _ => x.clone(),
                    }
                }
            };
            if tensor.dims() != t.dims.as_slice() {
                return Err(ModelError::ShapeMismatch {
                    path: out.to_path_buf(),
                    name: t.name.clone(),
                    expected: t.dims.clone(),
                    actual: tensor.dims().to_vec(),
                });
            }
            let bytes = tensor_bytes(&tensor, t.dtype)?;
            debug_assert_eq!(bytes.len() as u64, t.bytes());
            w.write_all(&bytes).map_err(io)?;
            written += bytes.len() as u64;
            progress(k + 1, table.len());
        }
        let file = w.into_inner().map_err(|e| ModelError::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(head.len() as u64 + written)
    })();
    let file_bytes =
        match result.and_then(|n| std::fs::rename(&tmp, out).map(|()| n).map_err(|e| ModelError::io(out, e))) {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
    Ok(ExportReport { architecture: arch, tensors: table.len(), file_bytes, fallbacks })
}

/// A norm weight as llama.cpp stores it: Gemma's `1 + w`, the others as they are.
fn norm_stored(w: &Tensor, spec: &ModelSpec) -> Result<Tensor> {
    Ok(if spec.arch.norm_plus_one { (w.to_dtype(DType::F32)? + 1.0)? } else { w.clone() })
}

/// The stamp of a GGUF file that slm wrote (its [`STAMP_META_KEY`]), read from the header alone.
pub fn read_gguf_stamp(path: &Path) -> Option<OutputStamp> {
    let (content, _) = crate::gguf_header::read_gguf_header(path).ok()?;
    match content.metadata.get(STAMP_META_KEY)? {
        Value::String(s) => serde_json::from_str(s).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn permute_is_the_inverse_of_unpermute() {
        let w = Tensor::arange(0f32, 48.0, &Device::Cpu).unwrap().reshape((12, 4)).unwrap();
        let p = permute_qk(&w, 3).unwrap();
        // Head 0 (rows 0..4, half 2): HF rows 0,1 | 2,3 interleave to 0,2,1,3.
        assert_eq!(p.get(1).unwrap().to_vec1::<f32>().unwrap(), w.get(2).unwrap().to_vec1::<f32>().unwrap());
        let back = crate::gguf::unpermute_qk(&p, 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn rows_that_are_not_whole_blocks_fall_back() {
        assert_eq!(OutType::Q4K.for_row(512), GgmlDType::Q4K);
        assert_eq!(OutType::Q4K.for_row(576), GgmlDType::Q4_0);
        assert_eq!(OutType::Q4K.for_row(100), GgmlDType::F16);
        assert_eq!(OutType::Q8_0.for_row(1536), GgmlDType::Q8_0);
        assert_eq!(OutType::Q8_0.for_row(1000), GgmlDType::F16);
        assert_eq!(OutType::F16.for_row(7), GgmlDType::F16);
        assert!("q5_k".parse::<OutType>().unwrap_err().to_string().contains("q8_0"));
    }

    #[test]
    fn per_layer_counts_are_arrays_only_when_needed() {
        assert!(matches!(per_layer_value(&[4, 4], false), Value::U32(4)));
        match per_layer_value(&[4, 2], false) {
            Value::Array(a) => assert_eq!(a.len(), 2),
            other => panic!("{other:?}"),
        }
        assert!(matches!(per_layer_value(&[4, 4], true), Value::Array(_)));
    }
}
