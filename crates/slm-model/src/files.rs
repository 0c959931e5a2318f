//! Reading model files as hostile input: only regular files are opened (a FIFO in place of a weights file would
//! block forever, a device could be endless), sizes are bounded before anything is allocated, JSON objects with
//! a key given twice are refused (serde_json keeps the last silently), shard names from an index must stay inside
//! the model directory, and weights must be finite.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// Largest `config.json` / `tokenizer_config.json` read (real ones are a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Largest `model.safetensors.index.json` read (a 400B-parameter model's index is ~1 MiB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;
/// Largest `tokenizer.json` read (a 256k-token vocabulary is ~35 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 512 << 20;
/// Largest calibration corpus read.
pub const MAX_CORPUS_BYTES: u64 = 4 << 30;

fn kind_of(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_char_device() || ft.is_block_device() {
            return "a device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Opens `path` only if it is a regular file (symlinks are followed: the HF cache links shards to blobs), and
/// returns it with its length. The type is checked before `open` (opening a FIFO blocks) and again on the open
/// handle, so a file swapped in between is caught too.
pub fn open_regular_file(path: &Path) -> Result<(File, u64)> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if !meta.is_file() {
        return Err(ModelError::NotRegularFile { path: path.to_path_buf(), kind: kind_of(&meta.file_type()) });
    }
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let meta = file.metadata().map_err(|e| ModelError::io(path, e))?;
    if !meta.is_file() {
        return Err(ModelError::NotRegularFile { path: path.to_path_buf(), kind: kind_of(&meta.file_type()) });
    }
    Ok((file, meta.len()))
}

/// The whole of a regular file of at most `max_len` bytes. Every model file (config, index, tokenizer,
/// safetensors) is read through this.
pub fn read_regular_file(path: &Path, max_len: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular_file(path)?;
    if len > max_len {
        return Err(ModelError::TooLarge { path: path.to_path_buf(), len, max: max_len });
    }
    let cap = usize::try_from(len).map_err(|_| ModelError::TooLarge {
        path: path.to_path_buf(),
        len,
        max: usize::MAX as u64,
    })?;
    let mut bytes = Vec::with_capacity(cap);
    // `take` so a file that grows while being read cannot push us past the bound.
    file.take(max_len.min(len.saturating_add(1))).read_to_end(&mut bytes).map_err(|e| ModelError::io(path, e))?;
    if bytes.len() as u64 != len {
        return Err(ModelError::io(
            path,
            std::io::Error::other(format!("file changed size while being read ({len} → {} bytes)", bytes.len())),
        ));
    }
    Ok(bytes)
}

/// [`read_regular_file`] as UTF-8 text.
pub fn read_regular_text(path: &Path, max_len: u64) -> Result<String> {
    let bytes = read_regular_file(path, max_len)?;
    String::from_utf8(bytes).map_err(|e| {
        ModelError::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8: {e}")))
    })
}

/// Checks that no JSON object in `json` (at any depth) has the same key twice; `Err` carries the key. Invalid
/// JSON is left for the real parser to report.
pub fn find_duplicate_json_key(json: &[u8]) -> std::result::Result<(), String> {
    let mut de = serde_json::Deserializer::from_slice(json);
    match serde::Deserialize::deserialize(&mut de) {
        Ok(UniqueKeys) => Ok(()),
        Err(e) => match e.to_string().strip_prefix(DUPLICATE) {
            Some(rest) => Err(rest.split(" at line").next().unwrap_or(rest).to_string()),
            None => Ok(()),
        },
    }
}

const DUPLICATE: &str = "duplicate key ";

/// Deserialises any JSON value, failing on an object that repeats a key.
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_unit<E>(self) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<UniqueKeys, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<UniqueKeys>()?;
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!("{DUPLICATE}`{key}`")));
            }
        }
        Ok(UniqueKeys)
    }
}

/// Parses JSON text from a model file, refusing a repeated key. `err` builds the error for the file.
pub fn parse_json_unique(bytes: &[u8], err: impl Fn(String) -> ModelError) -> Result<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| err(format!("not valid JSON: {e}")))?;
    find_duplicate_json_key(bytes).map_err(|k| err(format!("key {k} appears twice in one object")))?;
    Ok(v)
}

/// A shard named by `model.safetensors.index.json`, resolved inside `dir`: the name must be a plain file name
/// (no separator, not `.`/`..`, not absolute, not empty), so an index cannot load weights from elsewhere.
pub fn shard_path(dir: &Path, name: &str) -> std::result::Result<PathBuf, String> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\\')
        || name.contains('\0')
        || Path::new(name).is_absolute()
        || Path::new(name).components().count() != 1;
    if bad {
        return Err(format!("shard name `{name}` is not a plain file name inside the model directory"));
    }
    Ok(dir.join(name))
}

/// Refuses a tensor holding NaN or ±Inf (they load silently otherwise and give plausible-looking wrong answers).
/// Any dtype and device: the values are scanned as f32 on the CPU (a reduction such as `max` would skip NaN).
pub fn check_finite(t: &Tensor, name: &str, path: &Path) -> Result<()> {
    let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let finite = match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<f32>()?;
            all_finite(&all[layout.start_offset()..layout.start_offset() + t.elem_count()])
        }
        _ => false, // to_device(Cpu) gives CPU storage; anything else is not trusted
    };
    if finite {
        Ok(())
    } else {
        Err(ModelError::NonFinite { path: path.to_path_buf(), name: name.to_string() })
    }
}

/// True when no value of the little-endian `dtype` (f32, f16 or bf16) values in `bytes` is NaN or ±Inf: the
/// bit patterns are scanned as they are stored, without converting them (a 7B layer in tens of milliseconds).
pub fn raw_all_finite(bytes: &[u8], dtype: DType) -> bool {
    fn scan<const N: usize>(bytes: &[u8], exp: u32) -> bool {
        let word = |c: &[u8]| -> u32 {
            let mut b = [0u8; 4];
            b[..N].copy_from_slice(&c[..N]);
            u32::from_le_bytes(b)
        };
        let blocks = bytes.chunks_exact(64 * N);
        let tail = blocks.remainder();
        for block in blocks {
            let mut bad = false;
            for c in block.chunks_exact(N) {
                bad |= word(c) & exp == exp;
            }
            if bad {
                return false;
            }
        }
        tail.chunks_exact(N).all(|c| word(c) & exp != exp)
    }
    match dtype {
        DType::F32 => scan::<4>(bytes, 0x7f80_0000),
        DType::BF16 => scan::<2>(bytes, 0x7f80),
        DType::F16 => scan::<2>(bytes, 0x7c00),
        _ => true,
    }
}

/// True when no value is NaN or ±Inf: the same scan as [`raw_all_finite`], over the values' bytes.
fn all_finite(xs: &[f32]) -> bool {
    if cfg!(target_endian = "little") {
        raw_all_finite(bytemuck::cast_slice(xs), DType::F32)
    } else {
        xs.iter().all(|x| x.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_bit_patterns_are_scanned_for_nan_and_inf() {
        let le16 = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let le32 = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        // 200 values: full blocks of 64 and a tail, the bad value in either.
        let mut ok16 = vec![0x3f80u16; 200]; // bf16 1.0
        ok16[5] = 0xff7f; // bf16 -3.39e38, the largest finite magnitude
        assert!(raw_all_finite(&le16(&ok16), DType::BF16));
        for (bad, at) in [(0x7fc0u16, 3), (0x7f80, 150), (0xff80, 199)] {
            let mut v = ok16.clone();
            v[at] = bad;
            assert!(!raw_all_finite(&le16(&v), DType::BF16), "{bad:#x} at {at}");
        }
        let mut h = vec![0x3c00u16; 200]; // f16 1.0
        h[70] = 0x7bff; // f16 65504, finite
        assert!(raw_all_finite(&le16(&h), DType::F16));
        h[199] = 0x7c00;
        assert!(!raw_all_finite(&le16(&h), DType::F16));
        let mut f = vec![1.0f32; 130];
        f[1] = f32::MAX;
        assert!(raw_all_finite(&le32(&f), DType::F32));
        f[129] = f32::NEG_INFINITY;
        assert!(!raw_all_finite(&le32(&f), DType::F32));
        f[129] = 0.0;
        f[64] = f32::NAN;
        assert!(!raw_all_finite(&le32(&f), DType::F32));
    }

    #[test]
    fn loaded_tensors_are_checked_for_nan_and_inf() {
        let p = Path::new("m.safetensors");
        let mut v = vec![0.5f32; 150];
        v[0] = 3.0e38; // finite in bf16 too (f32::MAX rounds to bf16 +Inf)
        let ok = Tensor::from_vec(v.clone(), (3, 50), &Device::Cpu).unwrap();
        assert!(check_finite(&ok, "w", p).is_ok());
        assert!(check_finite(&ok.to_dtype(DType::BF16).unwrap(), "w", p).is_ok());
        for at in [3, 64, 149] {
            let mut b = v.clone();
            b[at] = if at == 64 { f32::INFINITY } else { f32::NAN };
            let t = Tensor::from_vec(b, (3, 50), &Device::Cpu).unwrap();
            let e = check_finite(&t, "w", p).unwrap_err().to_string();
            assert!(e.contains("m.safetensors") && e.contains('w'), "{e}");
            // A view starting after the bad value is finite; one that holds it is not.
            let row = at / 50;
            assert!(check_finite(&t.narrow(0, row + 1, 2 - row).unwrap(), "w", p).is_ok(), "{at}");
            assert!(check_finite(&t.narrow(0, row, 1).unwrap(), "w", p).is_err(), "{at}");
            assert!(check_finite(&t.to_dtype(DType::BF16).unwrap(), "w", p).is_err(), "{at}");
        }
    }

    #[test]
    fn duplicate_json_keys_are_found_at_any_depth() {
        assert_eq!(find_duplicate_json_key(br#"{"a": 1, "b": {"c": [1, {"d": 2}]}}"#), Ok(()));
        assert_eq!(find_duplicate_json_key(br#"{"a": 1, "a": 2}"#), Err("`a`".into()));
        assert_eq!(find_duplicate_json_key(br#"{"x": [{"k": 1, "k": 1}]}"#), Err("`k`".into()));
        assert_eq!(find_duplicate_json_key(b"not json"), Ok(()), "syntax errors are the parser's to report");
    }

    #[test]
    fn shard_names_must_be_plain() {
        let d = Path::new("/m");
        assert_eq!(
            shard_path(d, "model-00001-of-00002.safetensors").unwrap(),
            d.join("model-00001-of-00002.safetensors")
        );
        for bad in ["", ".", "..", "../x.safetensors", "../../x.safetensors", "/etc/x.safetensors", "a/b", "a\\b"] {
            assert!(shard_path(d, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn finite_check_finds_nan_and_inf_anywhere() {
        let p = Path::new("w.safetensors");
        for n in [1usize, 63, 64, 65, 1000] {
            let mut v = vec![0.5f32; n];
            let t = Tensor::from_vec(v.clone(), n, &Device::Cpu).unwrap();
            assert!(check_finite(&t, "w", p).is_ok());
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                v[n - 1] = bad;
                let t = Tensor::from_vec(v.clone(), n, &Device::Cpu).unwrap();
                let e = check_finite(&t, "w", p).unwrap_err().to_string();
                assert!(e.contains("w.safetensors") && e.contains("`w`"), "{e}");
                v[n - 1] = 0.5;
            }
        }
        // Large finite values are fine (a sum would overflow to inf; the check does not sum).
        let t = Tensor::from_vec(vec![3e38f32; 100], 100, &Device::Cpu).unwrap();
        assert!(check_finite(&t, "w", p).is_ok());
    }
}
