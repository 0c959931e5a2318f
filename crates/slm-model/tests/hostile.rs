//! Issue 13: every model file is hostile. One crafted file per problem found, each asserting a clear error that
//! names the file and the field, and that the file is byte-identical afterwards.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::quantized::gguf_file::Value;
use candle_core::{Device, Tensor};
use common::*;
use slm_model::{Model, ModelError};

/// Loads `path` in a thread so that a hang (a FIFO) fails the test instead of blocking it.
fn load(path: &Path) -> Result<Model, ModelError> {
    let p = path.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(Model::load(&p, &Device::Cpu));
    });
    rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("loading {} hangs", path.display()))
}

/// Loads `path` expecting an error; checks that it names `file` and contains every one of `words`, and that
/// `file` was not changed.
fn expect_err(path: &Path, file: &Path, words: &[&str]) -> String {
    // Never read a FIFO here (it would block): only regular files are compared.
    let before = std::fs::metadata(file).ok().filter(|m| m.is_file()).and_then(|_| std::fs::read(file).ok());
    let e = match load(path) {
        Ok(_) => panic!("{} loaded, expected an error mentioning {words:?}", path.display()),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&file.display().to_string()), "error does not name {}: {e}", file.display());
    for w in words {
        assert!(e.contains(w), "error does not mention `{w}`: {e}");
    }
    if let Some(before) = before {
        assert_eq!(std::fs::read(file).ok(), Some(before), "{} changed", file.display());
    }
    e
}

fn write_gguf(dir: &Path, g: &Gguf) -> PathBuf {
    let p = dir.join("m.gguf");
    std::fs::write(&p, g.encode().bytes).unwrap();
    p
}

fn gguf_case(words: &[&str], edit: impl FnOnce(&mut Gguf)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut g = tiny_llama_gguf(1);
    edit(&mut g);
    let p = write_gguf(dir.path(), &g);
    expect_err(&p, &p, words)
}

#[test]
fn tiny_gguf_and_hf_files_load() {
    let dir = tempfile::tempdir().unwrap();
    for layers in [1, 2] {
        let p = write_gguf(dir.path(), &tiny_llama_gguf(layers));
        let m = load(&p).unwrap();
        assert_eq!((m.spec.num_layers(), m.spec.hidden_size, m.spec.vocab_size), (layers, HIDDEN, VOCAB));
        assert!(m.tokenizer.is_some());
    }
    let hf = dir.path().join("hf");
    write_tiny_hf(&hf, 2);
    assert_eq!(load(&hf).unwrap().spec.num_layers(), 2);
}

#[test]
fn gguf_alignment_zero_is_refused_not_a_division_by_zero() {
    gguf_case(&["general.alignment", "is 0", "power of two"], |g| *g.meta_mut("general.alignment") = Value::U32(0));
}

#[test]
fn gguf_alignment_seven_is_refused_not_read_shifted() {
    gguf_case(&["general.alignment", "is 7", "power of two"], |g| {
        *g.meta_mut("general.alignment") = Value::U32(7);
        g.pad = 7;
    });
}

#[test]
fn gguf_dims_whose_product_wraps_are_refused() {
    // 2^33 × 2^31 = 2^64: wraps to 0 in unchecked arithmetic.
    gguf_case(&["blk.0.attn_q.weight", "overflow"], |g| {
        g.tensor_mut("blk.0.attn_q.weight").ne = vec![1 << 33, 1 << 31]
    });
    // 2^62 f32 elements: the product fits, the byte size does not.
    gguf_case(&["blk.0.attn_q.weight", "overflow"], |g| g.tensor_mut("blk.0.attn_q.weight").ne = vec![1 << 62, 1]);
    // Large but representable: runs past the end of the file.
    gguf_case(&["blk.0.attn_q.weight", "past the end"], |g| {
        g.tensor_mut("blk.0.attn_q.weight").ne = vec![1 << 20, 1 << 20]
    });
    gguf_case(&["blk.0.attn_q.weight", "dimension 1 is 0"], |g| g.tensor_mut("blk.0.attn_q.weight").ne = vec![8, 0]);
    gguf_case(&["blk.0.attn_q.weight", "5 dimensions"], |g| {
        g.tensor_mut("blk.0.attn_q.weight").ne = vec![8, 8, 1, 1, 1]
    });
}

#[test]
fn gguf_block_count_beyond_the_tensors_is_refused_before_allocating() {
    gguf_case(&["llama.block_count", "1099511627776"], |g| *g.meta_mut("llama.block_count") = Value::U64(1 << 40));
    gguf_case(&["llama.block_count"], |g| *g.meta_mut("llama.block_count") = Value::U32(2));
}

#[test]
fn gguf_header_fields_are_checked_against_the_file() {
    gguf_case(&["version 1"], |g| g.version = 1);
    gguf_case(&["version 4"], |g| g.version = 4);
    gguf_case(&["metadata key `llama.vocab_size` appears twice"], |g| {
        g.meta.push(("llama.vocab_size".into(), Value::U32(16)))
    });
    gguf_case(&["tensor name `output_norm.weight` appears twice"], |g| {
        let t = &g.tensors[1];
        let dup = GTensor { name: t.name.clone(), ne: t.ne.clone(), ty: 0, data: t.data.clone(), offset: None };
        g.tensors.push(dup);
    });
    gguf_case(&["blk.0.attn_q.weight", "not a multiple of the alignment"], |g| {
        g.tensor_mut("blk.0.attn_q.weight").offset = Some(4)
    });
    gguf_case(&["blk.0.attn_q.weight", "past the end"], |g| g.tensor_mut("blk.0.attn_q.weight").offset = Some(1 << 40));
    gguf_case(&["overlap"], |g| g.tensor_mut("blk.0.attn_q.weight").offset = Some(0));
    // Q4_0 has blocks of 32: a row of 8 cannot be one.
    gguf_case(&["blk.0.attn_q.weight", "block size 32"], |g| g.tensor_mut("blk.0.attn_q.weight").ty = 2);
    gguf_case(&["blk.0.attn_q.weight", "unsupported quantisation type 99"], |g| {
        g.tensor_mut("blk.0.attn_q.weight").ty = 99
    });
    let nested = (0..6).fold(Value::U8(1), |v, _| Value::Array(vec![v]));
    gguf_case(&["general.nested", "nested deeper"], |g| g.meta.push(("general.nested".into(), nested)));
    // A bool byte that is neither 0 nor 1 (the encoder cannot write one: patch the bytes).
    let mut g = tiny_llama_gguf(1);
    g.meta.push(("general.flag".into(), Value::Bool(true)));
    let mut b = g.encode().bytes;
    let key = b"general.flag";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    assert_eq!(b[at], 1);
    b[at] = 2;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, &b).unwrap();
    expect_err(&p, &p, &["general.flag", "bool byte 2"]);
}

#[test]
fn gguf_lengths_beyond_the_file_are_refused_before_allocating() {
    // Overwrite the length fields of the encoded file directly (the encoder writes consistent ones).
    let g = tiny_llama_gguf(1);
    let enc = g.encode();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let cases: [(usize, &str); 4] = [
        (0, "header of"),            // tensor count
        (1, "header of"),            // metadata count
        (2, "metadata key 0"),       // first key's length
        (3, "general.architecture"), // first value's (a string's) length
    ];
    for (field, word) in cases {
        for x in [u64::MAX, 1 << 40, 1 << 31] {
            let mut b = enc.bytes.clone();
            let (pos, w) = enc.fields[field];
            assert_eq!(w, 8);
            b[pos..pos + 8].copy_from_slice(&x.to_le_bytes());
            std::fs::write(&p, &b).unwrap();
            expect_err(&p, &p, &[word]);
        }
    }
    // The token array's length.
    let mut b = enc.bytes.clone();
    let key = b"tokenizer.ggml.tokens";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 4;
    b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    expect_err(&p, &p, &["tokenizer.ggml.tokens", "array of 18446744073709551615"]);
    // Truncated in the header and in the data.
    for cut in [3, 20, enc.header_len - 5, enc.bytes.len() - 1] {
        std::fs::write(&p, &enc.bytes[..cut]).unwrap();
        assert!(load(&p).is_err(), "cut at {cut}");
    }
}

#[test]
fn gguf_bad_numbers_are_refused() {
    gguf_case(&["rope_theta 0"], |g| *g.meta_mut("llama.rope.freq_base") = Value::F32(0.0));
    gguf_case(&["rope_theta NaN"], |g| *g.meta_mut("llama.rope.freq_base") = Value::F32(f32::NAN));
    gguf_case(&["rms_norm_eps -0.001"], |g| *g.meta_mut("llama.attention.layer_norm_rms_epsilon") = Value::F32(-0.001));
    gguf_case(&["blk.0.ffn_up.weight", "NaN or infinite"], |g| {
        g.tensor_mut("blk.0.ffn_up.weight").data[8..12].copy_from_slice(&f32::NAN.to_le_bytes())
    });
    gguf_case(&["token_embd.weight", "NaN or infinite"], |g| {
        g.tensor_mut("token_embd.weight").data[0..4].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes())
    });
    gguf_case(&["hidden_size", "more than"], |g| *g.meta_mut("llama.embedding_length") = Value::U32(1 << 30));
}

// ---- HF directories ----

fn hf_case(words: &[&str], file: &str, edit: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("model");
    write_tiny_hf(&m, 1);
    edit(&m);
    expect_err(&m, &m.join(file), words)
}

fn edit_config(m: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = m.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn hf_absurd_layer_counts_are_refused_before_allocating() {
    for n in [100_000_000u64, 1_000_000_000_000] {
        hf_case(&["num_hidden_layers", &n.to_string(), "4096"], "config.json", |m| {
            edit_config(m, |v| v["num_hidden_layers"] = n.into())
        });
    }
    hf_case(&["hidden_size", "more than"], "config.json", |m| {
        edit_config(m, |v| v["hidden_size"] = (1u64 << 30).into())
    });
    hf_case(&["vocab_size", "more than"], "config.json", |m| edit_config(m, |v| v["vocab_size"] = u64::MAX.into()));
    hf_case(&["intermediate_size", "more than"], "config.json", |m| {
        edit_config(m, |v| v["intermediate_size"] = (1u64 << 40).into())
    });
    // Within the bounds, but more parameters than the weight file could hold: refused before reading tensors.
    hf_case(&["parameters", "weight files hold only"], "config.json", |m| {
        edit_config(m, |v| v["num_hidden_layers"] = 4000.into())
    });
}

#[test]
fn hf_bad_numbers_are_refused() {
    hf_case(&["rope_theta 0"], "config.json", |m| edit_config(m, |v| v["rope_theta"] = 0.0.into()));
    hf_case(&["rms_norm_eps -0.00001"], "config.json", |m| edit_config(m, |v| v["rms_norm_eps"] = (-1e-5).into()));
    hf_case(&["rms_norm_eps` must be a number"], "config.json", |m| edit_config(m, |v| v["rms_norm_eps"] = "x".into()));
    let p = |m: &Path| m.join("config.json");
    hf_case(&["`hidden_size` appears twice"], "config.json", |m| {
        let text = std::fs::read_to_string(p(m)).unwrap();
        std::fs::write(p(m), text.replacen('{', "{\"hidden_size\": 32,", 1)).unwrap();
    });
}

#[test]
fn safetensors_duplicate_header_keys_are_refused() {
    let (tensors, _) = tiny_hf(1);
    hf_case(&["model.norm.weight", "appears twice"], "model.safetensors", |m| {
        std::fs::write(m.join("model.safetensors"), safetensors_bytes(&tensors, Some("model.norm.weight"))).unwrap();
    });
}

#[test]
fn safetensors_non_finite_weights_are_refused() {
    let (tensors, _) = tiny_hf(1);
    for bad in [f32::NAN, f32::INFINITY] {
        let mut ts = tensors.clone();
        let k = ts.iter().position(|(n, _)| n == "model.layers.0.mlp.down_proj.weight").unwrap();
        let t = &ts[k].1;
        let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let mid = v.len() / 2;
        v[mid] = bad;
        ts[k].1 = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        hf_case(&["model.layers.0.mlp.down_proj.weight", "NaN or infinite"], "model.safetensors", |m| {
            std::fs::write(m.join("model.safetensors"), safetensors_bytes(&ts, None)).unwrap();
        });
    }
    // f16 storage: converted to f32 first, then checked.
    let dir = tempfile::tempdir().unwrap();
    let mut map = std::collections::HashMap::new();
    let v = vec![half::f16::from_f32(1.0), half::f16::INFINITY];
    map.insert("w".to_string(), Tensor::from_vec(v, 2, &Device::Cpu).unwrap());
    let p = dir.path().join("a.safetensors");
    candle_core::safetensors::save(&map, &p).unwrap();
    let e = slm_model::hf::read_safetensors(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("a.safetensors") && e.contains("`w`") && e.contains("NaN or infinite"), "{e}");
}

#[test]
fn safetensors_header_length_beyond_the_file_is_refused() {
    for x in [u64::MAX, 1 << 40, 1 << 31] {
        hf_case(&["header length"], "model.safetensors", |m| {
            let p = m.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            b[..8].copy_from_slice(&x.to_le_bytes());
            std::fs::write(&p, &b).unwrap();
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.safetensors");
    std::fs::write(&p, [1u8, 2, 3, 4, 5, 6, 7]).unwrap();
    let e = slm_model::hf::read_safetensors(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("t.safetensors") && e.contains("too short"), "{e}");
    // A truncated weights file in a model directory is caught by the size check, before parsing.
    hf_case(&["weight files hold only"], "config.json", |m| {
        let p = m.join("model.safetensors");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() / 3]).unwrap();
    });
}

/// Writes a sharded directory: the single file split in two shards listed by an index.
fn shard(m: &Path, names: [&str; 2]) {
    let (tensors, _) = tiny_hf(1);
    let _ = std::fs::remove_file(m.join("model.safetensors"));
    let (a, b) = tensors.split_at(tensors.len() / 2);
    std::fs::write(m.join("model-00001-of-00002.safetensors"), safetensors_bytes(a, None)).unwrap();
    std::fs::write(m.join("model-00002-of-00002.safetensors"), safetensors_bytes(b, None)).unwrap();
    let mut map = serde_json::Map::new();
    for (n, _) in a {
        map.insert(n.clone(), names[0].into());
    }
    for (n, _) in b {
        map.insert(n.clone(), names[1].into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(m.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn shard_names_outside_the_model_dir_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("a/b/model");
    write_tiny_hf(&m, 1);
    shard(&m, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
    assert_eq!(load(&m).unwrap().spec.num_layers(), 1, "a plain sharded directory loads");
    // A real shard placed outside, which an unchecked join would load.
    std::fs::copy(m.join("model-00002-of-00002.safetensors"), dir.path().join("a/x.safetensors")).unwrap();
    let index = m.join("model.safetensors.index.json");
    let outside = dir.path().join("a/x.safetensors").display().to_string();
    for bad in ["../../x.safetensors", outside.as_str(), "sub/x.safetensors", ""] {
        shard(&m, ["model-00001-of-00002.safetensors", bad]);
        expect_err(&m, &index, &["weight_map", "not a plain file name"]);
    }
}

fn mkfifo(p: &Path) {
    let ok = std::process::Command::new("mkfifo").arg(p).status().expect("mkfifo runs").success();
    assert!(ok, "mkfifo {}", p.display());
}

#[test]
fn fifos_in_place_of_model_files_are_refused_not_waited_on() {
    for name in ["model.safetensors", "config.json", "tokenizer.json"] {
        hf_case(&["a FIFO", "not a regular file"], name, |m| {
            let _ = std::fs::remove_file(m.join(name));
            mkfifo(&m.join(name));
        });
    }
    hf_case(&["a FIFO"], "model.safetensors.index.json", |m| {
        shard(m, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
        std::fs::remove_file(m.join("model.safetensors.index.json")).unwrap();
        mkfifo(&m.join("model.safetensors.index.json"));
    });
    hf_case(&["a directory"], "model.safetensors", |m| {
        std::fs::remove_file(m.join("model.safetensors")).unwrap();
        std::fs::create_dir(m.join("model.safetensors")).unwrap();
    });
    // A FIFO given as the model itself.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    mkfifo(&p);
    assert!(load(&p).is_err());
    let e = slm_model::gguf::read_content(&p).unwrap_err().to_string();
    assert!(e.contains("a FIFO") && e.contains("m.gguf"), "{e}");
    let e = slm_model::hf::read_safetensors(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("a FIFO"), "{e}");
}
