//! Our own reader of a GGUF header (magic, version, metadata, tensor directory), written for hostile files: every
//! count and length is checked against the bytes left in the file before anything is allocated, sizes use checked
//! arithmetic, `general.alignment` must be a nonzero power of two, and each tensor must lie aligned, inside the
//! file and apart from the others. It yields candle's [`Content`], so `Content::tensor` and the tokenizer keep
//! working on what it returns.
//!
//! Spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>. Only versions 2 and 3 (64-bit lengths) are
//! accepted; version 1 predates every model this toolkit targets.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

use crate::error::{ModelError, Result};

/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest `general.alignment` accepted (llama.cpp writes 32; anything above a page is a crafted file).
pub const MAX_ALIGNMENT: u64 = 1 << 16;
/// Most dimensions of one tensor (GGML_MAX_DIMS).
pub const MAX_TENSOR_DIMS: u32 = 4;
/// Deepest nesting of arrays in a metadata value (real files nest at most once).
pub const MAX_VALUE_DEPTH: usize = 4;

/// Fewest bytes a metadata entry takes: key length + value type + a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Fewest bytes a tensor info takes: name length + n_dims + one dim + type + offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// candle's type ids (ggml.h `ggml_type`); candle's own conversion is private.
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Bytes a value of GGUF type `ty` takes at least on disk (for bounding array lengths before allocating).
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 => 8,     // string: its length
        9 => 4 + 8, // array: element type + length
        _ => return None,
    })
}

/// A position-tracking reader over the file, which knows how many bytes are left.
struct Reader<'a> {
    inner: BufReader<File>,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, message: impl Into<String>) -> ModelError {
        ModelError::Gguf { path: self.path.to_path_buf(), message: message.into() }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Fails unless `n` more bytes are in the file; `what` names the field.
    fn need(&self, n: u64, what: &dyn Fn() -> String) -> Result<()> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "{} needs {n} bytes at offset {}, but only {} remain (truncated or corrupt file)",
                what(),
                self.pos,
                self.remaining()
            )));
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b).map_err(|e| self.err(format!("{}: {e}", what())))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(what)?;
        self.need(len, &|| format!("{} (a string of {len} bytes)", what()))?;
        // `need` bounded `len` by the file size, so this allocation is at most the file.
        let mut v = vec![0u8; len as usize];
        self.inner.read_exact(&mut v).map_err(|e| self.err(format!("{}: {e}", what())))?;
        self.pos += len;
        // Strings should not be NUL-terminated, but some writers do it (candle strips them too).
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize, key: &str) -> Result<Value> {
        let what = || format!("metadata `{key}`");
        Ok(match ty {
            0 => Value::U8(self.u8(&what)?),
            1 => Value::I8(self.u8(&what)? as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(self.u32(&what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.u8(&what)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(format!("metadata `{key}`: bool byte {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string(&what)?),
            9 => {
                if depth >= MAX_VALUE_DEPTH {
                    return Err(self.err(format!("metadata `{key}`: arrays nested deeper than {MAX_VALUE_DEPTH}")));
                }
                let elem = self.u32(&what)?;
                let min = min_value_bytes(elem)
                    .ok_or_else(|| self.err(format!("metadata `{key}`: unknown array element type {elem}")))?;
                let n = self.u64(&what)?;
                let bytes = n.saturating_mul(min);
                self.need(bytes, &|| format!("metadata `{key}` (an array of {n} elements)"))?;
                // Bounded: n ≤ remaining bytes / min, so the vector is at most ~32× the file.
                let mut out = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    out.push(self.value(elem, depth + 1, key)?);
                }
                Value::Array(out)
            }
            10 => Value::U64(self.u64(&what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            other => return Err(self.err(format!("metadata `{key}`: unknown value type {other}"))),
        })
    }
}

/// The alignment from `general.alignment`: an integer, nonzero, a power of two, at most [`MAX_ALIGNMENT`].
fn alignment(metadata: &HashMap<String, Value>, path: &Path) -> Result<u64> {
    let err =
        |m: String| ModelError::Gguf { path: path.to_path_buf(), message: format!("metadata `general.alignment` {m}") };
    let a = match metadata.get("general.alignment") {
        None => return Ok(DEFAULT_ALIGNMENT),
        Some(Value::U8(v)) => *v as u64,
        Some(Value::U16(v)) => *v as u64,
        Some(Value::U32(v)) => *v as u64,
        Some(Value::U64(v)) => *v,
        Some(Value::I8(v)) if *v >= 0 => *v as u64,
        Some(Value::I16(v)) if *v >= 0 => *v as u64,
        Some(Value::I32(v)) if *v >= 0 => *v as u64,
        Some(Value::I64(v)) if *v >= 0 => *v as u64,
        Some(other) => return Err(err(format!("must be a non-negative integer, found {other:?}"))),
    };
    if a == 0 || !a.is_power_of_two() {
        return Err(err(format!("is {a}: it must be a nonzero power of two")));
    }
    if a > MAX_ALIGNMENT {
        return Err(err(format!("is {a}: more than the {MAX_ALIGNMENT} accepted")));
    }
    Ok(a)
}

/// Reads and checks the header of the GGUF at `path`. Returns candle's [`Content`] and the open reader (for
/// `Content::tensor`). Reads only the header, through a buffer; the file itself is never modified.
pub fn read_gguf_header(path: &Path) -> Result<(Content, BufReader<File>)> {
    let (file, len) = crate::files::open_regular_file(path)?;
    let mut r = Reader { inner: BufReader::new(file), pos: 0, len, path };
    let magic = r.array::<4>(&|| "the magic".into())?;
    if &magic != b"GGUF" {
        return Err(r.err(format!("bad magic {magic:02x?} (expected `GGUF`)")));
    }
    let version = r.u32(&|| "the version".into())?;
    let magic = match version {
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => return Err(r.err(format!("unsupported version {v} (only 2 and 3)"))),
    };
    let tensor_count = r.u64(&|| "the tensor count".into())?;
    let kv_count = r.u64(&|| "the metadata count".into())?;
    let min = tensor_count
        .checked_mul(MIN_TENSOR_INFO_BYTES)
        .and_then(|t| kv_count.checked_mul(MIN_KV_BYTES).and_then(|k| k.checked_add(t)))
        .unwrap_or(u64::MAX);
    r.need(min, &|| format!("a header of {tensor_count} tensors and {kv_count} metadata entries"))?;

    let mut metadata = HashMap::with_capacity(kv_count as usize);
    for i in 0..kv_count {
        let key = r.string(&|| format!("metadata key {i}"))?;
        let ty = r.u32(&|| format!("the type of metadata `{key}`"))?;
        let value = r.value(ty, 0, &key)?;
        if metadata.contains_key(&key) {
            return Err(r.err(format!("metadata key `{key}` appears twice")));
        }
        metadata.insert(key, value);
    }

    // (name, ne0 .. ne3 as in the file, type, offset)
    let mut infos: Vec<(String, Vec<usize>, GgmlDType, u64)> = Vec::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let name = r.string(&|| format!("tensor name {i}"))?;
        let n_dims = r.u32(&|| format!("the rank of tensor `{name}`"))?;
        if n_dims == 0 || n_dims > MAX_TENSOR_DIMS {
            return Err(r.err(format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_TENSOR_DIMS} allowed)")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let x = r.u64(&|| format!("dimension {d} of tensor `{name}`"))?;
            let x = usize::try_from(x)
                .ok()
                .filter(|&x| x > 0)
                .ok_or_else(|| r.err(format!("tensor `{name}`: dimension {d} is {x}")))?;
            dims.push(x);
        }
        let ty = r.u32(&|| format!("the type of tensor `{name}`"))?;
        let dtype = ggml_dtype(ty).ok_or_else(|| {
            r.err(format!(
                "tensor `{name}`: unsupported quantisation type {ty}; supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, \
                 Q5_1, Q8_0, Q2_K..Q6_K"
            ))
        })?;
        let offset = r.u64(&|| format!("the offset of tensor `{name}`"))?;
        infos.push((name, dims, dtype, offset));
    }

    let align = alignment(&metadata, path)?;
    let data_offset = r
        .pos
        .checked_next_multiple_of(align)
        .filter(|&o| o <= len || infos.is_empty())
        .ok_or_else(|| r.err(format!("the tensor data would start past the end of the file ({len} bytes)")))?;

    let mut tensor_infos = HashMap::with_capacity(infos.len());
    let mut ranges: Vec<(u64, u64, usize)> = Vec::with_capacity(infos.len());
    for (k, (name, dims, dtype, offset)) in infos.iter().enumerate() {
        let terr = |m: String| r.err(format!("tensor `{name}`: {m}"));
        let elems = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| terr(format!("dimensions {dims:?} overflow")))?;
        let block = dtype.block_size();
        if dims[0] % block != 0 {
            return Err(terr(format!(
                "first dimension {} is not a multiple of the {dtype:?} block size {block}",
                dims[0]
            )));
        }
        let size = (elems / block)
            .checked_mul(dtype.type_size())
            .map(|s| s as u64)
            .ok_or_else(|| terr(format!("dimensions {dims:?} overflow")))?;
        if offset % align != 0 {
            return Err(terr(format!("offset {offset} is not a multiple of the alignment {align}")));
        }
        let start = data_offset.checked_add(*offset);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(s), Some(e)) if e <= len => ranges.push((s, e, k)),
            _ => {
                return Err(terr(format!(
                    "{size} bytes at data offset {offset} run past the end of the file ({len} bytes)"
                )))
            }
        }
        // candle's shapes run outermost first; GGUF lists ne0 (the row length) first.
        let shape: Vec<usize> = dims.iter().rev().copied().collect();
        let info = TensorInfo { ggml_dtype: *dtype, shape: shape.into(), offset: *offset };
        if tensor_infos.insert(name.clone(), info).is_some() {
            return Err(r.err(format!("tensor name `{name}` appears twice")));
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(r.err(format!("tensors `{}` and `{}` overlap in the file", infos[w[0].2].0, infos[w[1].2].0)));
        }
    }
    let content = Content { magic, metadata, tensor_infos, tensor_data_offset: data_offset };
    Ok((content, r.inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_sizes_cover_every_value_type() {
        for ty in 0..=12 {
            assert!(min_value_bytes(ty).is_some(), "{ty}");
        }
        assert!(min_value_bytes(13).is_none());
    }

    #[test]
    fn alignment_must_be_a_power_of_two() {
        let p = Path::new("m.gguf");
        let mut m = HashMap::new();
        assert_eq!(alignment(&m, p).unwrap(), 32);
        for (v, ok) in [(0u32, false), (7, false), (1, true), (64, true), (1 << 20, false)] {
            m.insert("general.alignment".to_string(), Value::U32(v));
            assert_eq!(alignment(&m, p).is_ok(), ok, "{v}");
        }
        m.insert("general.alignment".to_string(), Value::F32(32.0));
        assert!(alignment(&m, p).unwrap_err().to_string().contains("general.alignment"));
    }
}
