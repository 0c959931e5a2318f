//! Streamed, sharded safetensors writing: tensors are produced, converted and written one at a time (never the
//! whole model twice in memory), split across `model-0000N-of-0000M.safetensors` with a
//! `model.safetensors.index.json` above a shard size, as transformers' `save_pretrained` lays them out.

use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// Default largest shard, in bytes of tensor data (transformers' `save_pretrained` writes 5 GB shards with the
/// `max_shard_size="5GB"` that the Hugging Face Hub recommends).
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// A tensor to write: its name and shape; its values come from the producer given to [`write_sharded`].
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
}

fn st_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Safetensors { path: path.to_path_buf(), message: message.into() }
}

fn st_dtype(dtype: DType) -> Result<(&'static str, usize)> {
    Ok(match dtype {
        DType::F32 => ("F32", 4),
        DType::F16 => ("F16", 2),
        DType::BF16 => ("BF16", 2),
        other => return Err(ModelError::InvalidArgument(format!("cannot write {other:?} tensors"))),
    })
}

/// The files [`write_sharded`] writes for tensors of `total` bytes in `n` shards.
pub fn shard_file_name(k: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
    }
}

/// Splits `entries` (in order) into shards of at most `max_bytes` of data each, a tensor larger than that alone
/// in its shard (transformers' rule). Returns the index range of each shard.
fn plan_shards(sizes: &[u64], max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, &s) in sizes.iter().enumerate() {
        if i > start && bytes + s > max_bytes {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += s;
    }
    if start < sizes.len() || out.is_empty() {
        out.push(start..sizes.len());
    }
    out
}

/// Writes `entries` into `dir` (which must exist) in `dtype`: one `model.safetensors` when the data fits in
/// `max_shard_bytes`, else numbered shards and `model.safetensors.index.json` (`metadata.total_size`,
/// `weight_map`). `produce(entry)` gives each tensor, in the order of `entries`, any dtype, on any device; it is
/// converted, checked against its entry's shape and written before the next is asked for. Tensor names are
/// written sorted within each shard's header (the safetensors format's order), data in the order given.
/// Returns the files written.
pub fn write_sharded(
    dir: &Path,
    entries: &[TensorEntry],
    dtype: DType,
    max_shard_bytes: u64,
    produce: &mut dyn FnMut(&TensorEntry) -> Result<Tensor>,
) -> Result<Vec<String>> {
    let (dtype_name, elem) = st_dtype(dtype)?;
    let sizes: Vec<u64> = entries
        .iter()
        .map(|e| e.shape.iter().try_fold(elem as u64, |a, &d| a.checked_mul(d as u64)))
        .collect::<Option<_>>()
        .ok_or_else(|| ModelError::InvalidArgument("a tensor's byte size overflows".into()))?;
    let shards = plan_shards(&sizes, max_shard_bytes.max(1));
    let n = shards.len();
    let mut files = Vec::with_capacity(n + 1);
    let mut weight_map = serde_json::Map::new();
    for (k, range) in shards.iter().enumerate() {
        let name = shard_file_name(k, n);
        let path = dir.join(&name);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
        let mut offset = 0u64;
        for i in range.clone() {
            let e = &entries[i];
            header.insert(
                e.name.clone(),
                serde_json::json!({ "dtype": dtype_name, "shape": e.shape, "data_offsets": [offset, offset + sizes[i]] }),
            );
            offset += sizes[i];
            weight_map.insert(e.name.clone(), serde_json::Value::String(name.clone()));
        }
        let mut json = serde_json::to_vec(&serde_json::Value::Object(header))
            .map_err(|e| st_err(&path, format!("cannot serialise the header: {e}")))?;
        // The data starts 8-aligned, as the safetensors writer pads its header with spaces.
        while (json.len() + 8) % 8 != 0 {
            json.push(b' ');
        }
        let file = std::fs::File::create(&path).map_err(|e| ModelError::io(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 22, file);
        let io = |e: std::io::Error| ModelError::io(&path, e);
        w.write_all(&(json.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&json).map_err(io)?;
        for i in range.clone() {
            let e = &entries[i];
            let t = produce(e)?;
            if t.dims() != e.shape.as_slice() {
                return Err(st_err(
                    &path,
                    format!("tensor `{}` has shape {:?}, planned {:?}", e.name, t.dims(), e.shape),
                ));
            }
            let t = t.to_device(&Device::Cpu)?.to_dtype(dtype)?.flatten_all()?;
            write_tensor_bytes(&mut w, &t).map_err(io)?;
        }
        let file = w.into_inner().map_err(|e| ModelError::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| ModelError::io(&path, e))?;
        files.push(name);
    }
    if n > 1 {
        let total: u64 = sizes.iter().sum();
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let path = dir.join("model.safetensors.index.json");
        let bytes = serde_json::to_vec_pretty(&index).map_err(|e| st_err(&path, e.to_string()))?;
        std::fs::write(&path, bytes).map_err(|e| ModelError::io(&path, e))?;
        files.push("model.safetensors.index.json".into());
    }
    Ok(files)
}

/// The little-endian bytes of a flat CPU tensor, written in pieces of at most 16 MiB.
fn write_tensor_bytes(w: &mut impl Write, t: &Tensor) -> std::io::Result<()> {
    let bad = |e: candle_core::Error| std::io::Error::other(e.to_string());
    const PIECE: usize = 1 << 22;
    let n = t.elem_count();
    let mut start = 0;
    while start < n {
        let len = PIECE.min(n - start);
        let part = t.narrow(0, start, len).map_err(bad)?;
        let mut buf: Vec<u8> = Vec::with_capacity(len * t.dtype().size_in_bytes());
        match t.dtype() {
            DType::F32 => {
                part.to_vec1::<f32>().map_err(bad)?.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()))
            }
            DType::F16 => {
                part.to_vec1::<half::f16>().map_err(bad)?.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()))
            }
            DType::BF16 => {
                part.to_vec1::<half::bf16>().map_err(bad)?.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()))
            }
            other => return Err(std::io::Error::other(format!("cannot write {other:?}"))),
        }
        w.write_all(&buf)?;
        start += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_fill_in_order_and_a_large_tensor_goes_alone() {
        assert_eq!(plan_shards(&[4, 4, 4], 100), vec![0..3]);
        assert_eq!(plan_shards(&[4, 4, 4], 8), vec![0..2, 2..3]);
        assert_eq!(plan_shards(&[20, 4, 4], 8), vec![0..1, 1..3]);
        assert_eq!(plan_shards(&[4, 20, 4], 8), vec![0..1, 1..2, 2..3]);
        assert_eq!(plan_shards(&[], 8), vec![0..0]);
        assert_eq!(shard_file_name(0, 1), "model.safetensors");
        assert_eq!(shard_file_name(1, 3), "model-00002-of-00003.safetensors");
    }
}
