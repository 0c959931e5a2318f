//! The tokenizer: an HF `tokenizer.json`, or the one embedded in a GGUF rebuilt as a `tokenizers::Tokenizer`.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::AddedToken;

use crate::error::{ModelError, Result};

/// Text ↔ token ids. Encoding never adds special tokens (no BOS): lm-eval scores this model without one.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer(vocab={})", self.inner.get_vocab_size(true))
    }
}

fn tok_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Tokenizer { path: path.to_path_buf(), message: message.into() }
}

fn strings(c: &Content, key: &str, path: &Path) -> Result<Vec<String>> {
    match c.metadata.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(tok_err(path, format!("`{key}` holds a non-string entry"))),
            })
            .collect(),
        Some(_) => Err(tok_err(path, format!("`{key}` is not an array"))),
        None => Err(tok_err(path, format!("missing metadata `{key}`"))),
    }
}

impl Tokenizer {
    /// Reads a `tokenizer.json` (a regular file of bounded size, no key given twice in one object).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::files::read_regular_file(path, crate::files::MAX_TOKENIZER_BYTES)?;
        crate::files::find_duplicate_json_key(&bytes)
            .map_err(|k| tok_err(path, format!("key {k} appears twice in one object")))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| tok_err(path, e.to_string()))?;
        Ok(Tokenizer { inner })
    }

    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer { inner }
    }

    /// Rebuilds the byte-level BPE tokenizer of a GGUF from its vocabulary, merges and pre-tokenizer name.
    ///
    /// `smollm` is SmolLM's own pipeline (its `tokenizer.json`): digits split one by one, then GPT-2's byte-level
    /// regex without a prefix space. `gpt2` (or no name) is plain GPT-2. Other names are refused rather than
    /// silently tokenised the wrong way.
    pub fn from_gguf(c: &Content, path: &Path) -> Result<Self> {
        let model = match c.metadata.get("tokenizer.ggml.model") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(tok_err(path, "missing metadata `tokenizer.ggml.model`")),
        };
        if model != "gpt2" {
            return Err(tok_err(
                path,
                format!("tokenizer model `{model}` is not supported (only byte-level BPE `gpt2`)"),
            ));
        }
        let pre = match c.metadata.get("tokenizer.ggml.pre") {
            Some(Value::String(s)) => s.clone(),
            _ => "gpt2".to_string(),
        };
        let tokens = strings(c, "tokenizer.ggml.tokens", path)?;
        let merges: Vec<(String, String)> = strings(c, "tokenizer.ggml.merges", path)?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| tok_err(path, format!("malformed merge `{m}`")))
            })
            .collect::<Result<_>>()?;
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        if vocab.len() != tokens.len() {
            return Err(tok_err(path, "duplicate entries in `tokenizer.ggml.tokens`"));
        }
        let mut builder = BPE::builder().vocab_and_merges(vocab, merges);
        if let Some(id) = c.metadata.get("tokenizer.ggml.unknown_token_id").and_then(|v| v.to_u32().ok()) {
            if let Some(tok) = tokens.get(id as usize) {
                builder = builder.unk_token(tok.clone());
            }
        }
        let bpe = builder.build().map_err(|e| tok_err(path, e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        match pre.as_str() {
            "smollm" => {
                inner.with_pre_tokenizer(Some(Sequence::new(vec![Digits::new(true).into(), byte_level.into()])));
            }
            "gpt2" | "default" => {
                inner.with_pre_tokenizer(Some(byte_level));
            }
            other => {
                return Err(tok_err(
                    path,
                    format!(
                    "pre-tokenizer `{other}` is not supported (smollm, gpt2); export the model with its tokenizer.json"
                ),
                ))
            }
        }
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control tokens (type 3) such as <|endoftext|> and <|im_start|> are matched whole, as HF does.
        if let Some(Value::Array(types)) = c.metadata.get("tokenizer.ggml.token_type") {
            let specials: Vec<AddedToken> = types
                .iter()
                .enumerate()
                .filter(|(_, t)| matches!(t.to_i32(), Ok(3)) || matches!(t.to_u32(), Ok(3)))
                .filter_map(|(i, _)| tokens.get(i))
                .map(|t| AddedToken::from(t.clone(), true))
                .collect();
            inner.add_special_tokens(specials).map_err(|e| tok_err(path, e.to_string()))?;
        }
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| ModelError::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| ModelError::Tokenize(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(|e| tok_err(path, e.to_string()))
    }
}
