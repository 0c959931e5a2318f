//! The tokenizer: an HF `tokenizer.json`, or the one embedded in a GGUF rebuilt as a `tokenizers::Tokenizer`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{ModelError, Result};

/// Text ↔ token ids. Encoding never adds special tokens (no BOS): lm-eval scores the default model without one.
/// A model that wants a BOS says so through [`Tokenizer::bos_to_prepend`]; callers prepend it.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
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
        Ok(Tokenizer { inner, bos: None })
    }

    /// Wraps a built tokenizer; no BOS to prepend (see [`Tokenizer::with_bos_to_prepend`]).
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer { inner, bos: None }
    }

    /// The same tokenizer, with `bos` as the token that callers prepend (for a loader that reads the wish from
    /// elsewhere, such as an HF `tokenizer_config.json`).
    pub fn with_bos_to_prepend(mut self, bos: Option<u32>) -> Self {
        self.bos = bos;
        self
    }

    /// The token a caller should put before the encoded text, when the model was trained with one: the GGUF's
    /// `tokenizer.ggml.bos_token_id` when `tokenizer.ggml.add_bos_token` is true (or, absent that key, for a
    /// sentencepiece vocabulary, as llama.cpp and transformers do). `None` for SmolLM's GGUF, which adds no BOS.
    /// [`Tokenizer::encode`] never adds it.
    pub fn bos_to_prepend(&self) -> Option<u32> {
        self.bos
    }

    /// Rebuilds the tokenizer embedded in a GGUF as a `tokenizers::Tokenizer`, by `tokenizer.ggml.model`:
    ///
    /// - `gpt2`: byte-level BPE from the vocabulary, the merges and the pre-tokenizer name (`byte_level_bpe`);
    /// - `llama` with Gemma's vocabulary: sentencepiece BPE with byte fallback (`gemma_bpe`).
    ///
    /// Other models are refused rather than silently tokenised the wrong way. Whether the model wants a BOS is
    /// read too ([`Tokenizer::bos_to_prepend`]).
    pub fn from_gguf(c: &Content, path: &Path) -> Result<Self> {
        let model = match c.metadata.get("tokenizer.ggml.model") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(tok_err(path, "missing metadata `tokenizer.ggml.model`")),
        };
        let inner = match model.as_str() {
            "gpt2" => byte_level_bpe(c, path)?,
            "llama" => gemma_bpe(c, path)?,
            other => {
                return Err(tok_err(
                    path,
                    format!(
                        "`tokenizer.ggml.model` is `{other}`, which is not supported (byte-level BPE `gpt2`, \
                         Gemma's sentencepiece `llama`)"
                    ),
                ))
            }
        };
        let bos = bos_from_gguf(c, model == "llama", inner.get_vocab_size(true), path)?;
        Ok(Tokenizer { inner, bos })
    }
}

/// Llama-3's pre-tokenizer regex (its `tokenizer.json`; llama.cpp's `llama-bpe`): contractions, a letter run
/// with at most one non-letter before it, digits in groups of up to three, punctuation runs, newlines, spaces.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's (Qwen2/2.5/3; llama.cpp's `qwen2`): Llama-3's with every digit on its own.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer names of a byte-level GGUF vocabulary (`tokenizer.ggml.pre`) that slm rebuilds.
const BYTE_LEVEL_PRES: &str = "smollm, gpt2, llama-bpe (llama3, llama-v3, smaug-bpe), qwen2 (deepseek-r1-qwen)";

/// Whether a byte-level pre-tokenizer name stands for Llama-3's pipeline: its regex, then byte-level mapping
/// without a regex; whole words found in the vocabulary are not merged again (`ignore_merges`, as Llama-3's
/// `tokenizer.json` and llama.cpp do). Qwen2's adds the NFC normalisation of its `tokenizer.json`.
enum BytePre {
    Smollm,
    Gpt2,
    Llama3,
    Qwen2,
}

impl BytePre {
    fn of(name: &str) -> Option<Self> {
        Some(match name {
            "smollm" => BytePre::Smollm,
            "gpt2" | "default" => BytePre::Gpt2,
            "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => BytePre::Llama3,
            "qwen2" | "deepseek-r1-qwen" => BytePre::Qwen2,
            _ => return None,
        })
    }

    /// The pre-tokenizer, as the model's `tokenizer.json` builds it.
    fn pre_tokenizer(&self) -> std::result::Result<PreTokenizerWrapper, String> {
        let split = |re: &str| {
            Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| e.to_string())
        };
        Ok(match self {
            BytePre::Smollm => {
                Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()
            }
            BytePre::Gpt2 => ByteLevel::new(false, true, true).into(),
            BytePre::Llama3 => {
                Sequence::new(vec![split(LLAMA3_SPLIT)?.into(), ByteLevel::new(false, true, false).into()]).into()
            }
            BytePre::Qwen2 => {
                Sequence::new(vec![split(QWEN2_SPLIT)?.into(), ByteLevel::new(false, true, false).into()]).into()
            }
        })
    }
}

/// The byte-level BPE tokenizer of a `gpt2` GGUF, from its vocabulary, merges and pre-tokenizer name.
///
/// `smollm` is SmolLM's own pipeline (its `tokenizer.json`): digits split one by one, then GPT-2's byte-level
/// regex without a prefix space. `gpt2` (or no name) is plain GPT-2; `llama-bpe` and `qwen2` are Llama-3's and
/// Qwen2's ([`BytePre`]). Other names are refused rather than silently tokenised the wrong way.
fn byte_level_bpe(c: &Content, path: &Path) -> Result<tokenizers::Tokenizer> {
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
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    if vocab.len() != tokens.len() {
        return Err(tok_err(path, "duplicate entries in `tokenizer.ggml.tokens`"));
    }
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges);
    if let Some(id) = c.metadata.get("tokenizer.ggml.unknown_token_id").and_then(|v| v.to_u32().ok()) {
        if let Some(tok) = tokens.get(id as usize) {
            builder = builder.unk_token(tok.clone());
        }
    }
    let kind = BytePre::of(&pre).ok_or_else(|| {
        tok_err(
            path,
            format!(
                "`tokenizer.ggml.pre` `{pre}` is not supported ({BYTE_LEVEL_PRES}); export the model with its \
                 tokenizer.json"
            ),
        )
    })?;
    if matches!(kind, BytePre::Llama3) {
        builder = builder.ignore_merges(true);
    }
    let bpe = builder.build().map_err(|e| tok_err(path, e.to_string()))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(kind.pre_tokenizer().map_err(|e| tok_err(path, e))?));
    if matches!(kind, BytePre::Qwen2) {
        inner.with_normalizer(Some(NFC)).map_err(|e| tok_err(path, e.to_string()))?;
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
    Ok(inner)
}

/// Python's `str.isspace` (what transformers tests a token with): Unicode white space, and the four information
/// separators U+001C..U+001F that Rust's `char::is_whitespace` leaves out.
fn is_python_space(ch: char) -> bool {
    ch.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&ch)
}

/// A token of spaces only (at least one ' ', nothing but white space): how Gemma's GGUF writes a run of spaces
/// that its sentencepiece vocabulary holds as `▁▁…`.
fn is_space_run(token: &str) -> bool {
    token.contains(' ') && token.chars().all(is_python_space)
}

/// The merges implied by a merge-ordered vocabulary without a merge list (Gemma's GGUF has none): every token
/// that splits into two tokens of the vocabulary is one merge per split point; merges rank by the position of
/// the token they make (earlier first), and a token's own splits by the length of their left piece, longest first.
/// This is transformers' `generate_merges` with the vocabulary position as the score.
fn merges_from_vocab_order(tokens: &[String], vocab: &HashMap<&str, u32>) -> Vec<(String, String)> {
    let mut merges = Vec::new();
    for token in tokens {
        // Split points by character, from the right: the left piece shrinks.
        let bounds: Vec<usize> = token.char_indices().map(|(i, _)| i).skip(1).collect();
        for &at in bounds.iter().rev() {
            let (left, right) = token.split_at(at);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                merges.push((left.to_string(), right.to_string()));
            }
        }
    }
    merges
}

/// The token types (`tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
/// 6 byte), one per token, or none when the key is absent.
fn token_types(c: &Content, n: usize, path: &Path) -> Result<Option<Vec<i64>>> {
    const KEY: &str = "tokenizer.ggml.token_type";
    match c.metadata.get(KEY) {
        None => Ok(None),
        Some(Value::Array(a)) => {
            if a.len() != n {
                return Err(tok_err(path, format!("`{KEY}` has {} entries for {n} tokens", a.len())));
            }
            a.iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x as i64),
                    Value::U32(x) => Ok(*x as i64),
                    Value::I8(x) => Ok(*x as i64),
                    Value::U8(x) => Ok(*x as i64),
                    Value::I16(x) => Ok(*x as i64),
                    Value::U16(x) => Ok(*x as i64),
                    Value::I64(x) => Ok(*x),
                    _ => Err(tok_err(path, format!("`{KEY}` holds a non-integer entry"))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some)
        }
        Some(_) => Err(tok_err(path, format!("`{KEY}` is not an array"))),
    }
}

fn meta_u32(c: &Content, key: &str, path: &Path) -> Result<Option<u32>> {
    match c.metadata.get(key) {
        None => Ok(None),
        Some(v) => v.to_u32().map(Some).map_err(|_| tok_err(path, format!("`{key}` is not a u32"))),
    }
}

fn meta_bool(c: &Content, key: &str, path: &Path) -> Result<Option<bool>> {
    match c.metadata.get(key) {
        None => Ok(None),
        Some(v) => v.to_bool().map(Some).map_err(|_| tok_err(path, format!("`{key}` is not a bool"))),
    }
}

/// The sentencepiece tokenizer of a Gemma GGUF (`tokenizer.ggml.model` = `llama`), rebuilt the way transformers'
/// GGUF loader rebuilds it (GemmaTokenizer): a BPE over the vocabulary with byte fallback (`<0xNN>` tokens) and
/// `<unk>` fused, its merges derived from the vocabulary order ([`merges_from_vocab_order`]; the file's scores are
/// ranks with the -1000 of every special and whitespace token punched through them, not usable as a merge order),
/// spaces normalised to `▁`, no prefix space, and runs of spaces (written as spaces in the file) respelled as runs
/// of `▁`. Control tokens (type 3) are matched whole as special tokens, user-defined ones (type 4: newline and
/// tab runs, HTML tags) whole as plain added tokens, as llama.cpp does.
///
/// A `llama` vocabulary that is not Gemma's (Llama-2, Mistral v0.1-v0.3 sentencepiece) is refused: it needs a
/// prefix space and score-ordered merges, which are not implemented.
fn gemma_bpe(c: &Content, path: &Path) -> Result<tokenizers::Tokenizer> {
    let tokens = strings(c, "tokenizer.ggml.tokens", path)?;
    let arch = match c.metadata.get("general.architecture") {
        Some(Value::String(s)) => s.as_str(),
        _ => "",
    };
    if !(arch.starts_with("gemma") || tokens.iter().any(|t| is_space_run(t))) {
        return Err(tok_err(
            path,
            format!(
                "`tokenizer.ggml.model` is `llama` (sentencepiece) for architecture `{arch}`: only Gemma's \
                 sentencepiece vocabulary is supported; export the model with its tokenizer.json"
            ),
        ));
    }
    if meta_bool(c, "tokenizer.ggml.add_space_prefix", path)? == Some(true) {
        return Err(tok_err(path, "`tokenizer.ggml.add_space_prefix` is true, which Gemma's tokenizer never is"));
    }
    let types = token_types(c, tokens.len(), path)?;
    let spelled: Vec<String> =
        tokens.iter().map(|t| if is_space_run(t) { "▁".repeat(t.chars().count()) } else { t.clone() }).collect();
    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(spelled.len());
    for (i, t) in spelled.iter().enumerate() {
        if vocab.insert(t.as_str(), i as u32).is_some() {
            return Err(tok_err(path, format!("token `{t}` appears twice in `tokenizer.ggml.tokens`")));
        }
    }
    let merges = merges_from_vocab_order(&spelled, &vocab);
    let unk = match meta_u32(c, "tokenizer.ggml.unknown_token_id", path)? {
        Some(id) => Some(spelled.get(id as usize).cloned().ok_or_else(|| {
            tok_err(path, format!("`tokenizer.ggml.unknown_token_id` {id} is past the {} tokens", spelled.len()))
        })?),
        None => vocab.contains_key("<unk>").then(|| "<unk>".to_string()),
    };
    let bpe_vocab: tokenizers::models::bpe::Vocab =
        spelled.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut builder = BPE::builder().vocab_and_merges(bpe_vocab, merges).fuse_unk(true).byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(|e| tok_err(path, e.to_string()))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let replace = |from: &str, to: &str| Replace::new(from, to).map_err(|e| tok_err(path, e.to_string()));
    inner.with_normalizer(Some(replace(" ", "▁")?)).map_err(|e| tok_err(path, e.to_string()))?;
    // GemmaTokenizer's own pre-tokenizer. After the normaliser no ' ' is left, so it splits nothing; it is kept
    // so that the pipeline is the reference's.
    let split =
        Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false).map_err(|e| tok_err(path, e.to_string()))?;
    inner.with_pre_tokenizer(Some(split));
    inner.with_decoder(Some(DecoderSequence::new(vec![
        replace("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));
    if let Some(types) = types {
        // Spelled as the file spells them: a respelled space run is no added token (it is not in the vocabulary
        // under its file spelling).
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == 3)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        inner.add_special_tokens(control).map_err(|e| tok_err(path, e.to_string()))?;
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(t, &ty)| ty == 4 && vocab.contains_key(t.as_str()))
            .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
            .collect();
        inner.add_tokens(user).map_err(|e| tok_err(path, e.to_string()))?;
    }
    Ok(inner)
}

/// The BOS a GGUF asks callers to prepend: `tokenizer.ggml.bos_token_id` when `tokenizer.ggml.add_bos_token` is
/// true; without that key, when the vocabulary is sentencepiece (llama.cpp's and transformers' default for one).
fn bos_from_gguf(c: &Content, sentencepiece: bool, vocab_size: usize, path: &Path) -> Result<Option<u32>> {
    let stated = meta_bool(c, "tokenizer.ggml.add_bos_token", path)?;
    if !stated.unwrap_or(sentencepiece) {
        return Ok(None);
    }
    match meta_u32(c, "tokenizer.ggml.bos_token_id", path)? {
        Some(id) if (id as usize) < vocab_size => Ok(Some(id)),
        Some(id) => Err(tok_err(path, format!("`tokenizer.ggml.bos_token_id` {id} is past the {vocab_size} tokens"))),
        None if stated == Some(true) => {
            Err(tok_err(path, "`tokenizer.ggml.add_bos_token` is true but `tokenizer.ggml.bos_token_id` is missing"))
        }
        None => Ok(None),
    }
}

impl Tokenizer {
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

/// The GGUF pre-tokenizer names written for each rebuilt pipeline (the first name [`BytePre::of`] accepts).
const PRE_NAMES: [(&str, BytePre); 4] =
    [("smollm", BytePre::Smollm), ("gpt2", BytePre::Gpt2), ("llama-bpe", BytePre::Llama3), ("qwen2", BytePre::Qwen2)];

/// GGUF token types (llama.cpp `llama_token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_UNUSED: i32 = 5;
const TYPE_BYTE: i32 = 6;

impl Tokenizer {
    /// The `tokenizer.ggml.*` metadata of this tokenizer for a GGUF of `spec` (its vocabulary padded to
    /// `spec.vocab_size` with unused `[PAD{id}]` tokens, as llama.cpp's converter pads): copied from
    /// `source_gguf` when the model was loaded from one (chat template and all), else rebuilt from the pipeline:
    ///
    /// - byte-level BPE → `gpt2` with its merges and the pre-tokenizer name whose pipeline ([`BytePre`]) is
    ///   exactly this one's (its pre-tokenizer and normaliser compared as JSON), so that slm and llama.cpp
    ///   tokenise alike; a pipeline of none of them is refused, naming the ones known;
    /// - Gemma's sentencepiece BPE (byte fallback, `▁` for spaces) → `llama` with the vocabulary in merge order as
    ///   scores (earlier is merged first, what [`gemma_bpe`] reads back), runs of `▁` spelled as spaces and
    ///   user-defined as Gemma's GGUF spells them.
    ///
    /// Added special tokens are control tokens (type 3), other added tokens user-defined (4).
    pub fn gguf_metadata(&self, spec: &crate::ModelSpec, source_gguf: Option<&Path>) -> Result<Vec<(String, Value)>> {
        if let Some(p) = source_gguf {
            let (c, _) = crate::gguf_header::read_gguf_header(p)?;
            let mut keys: Vec<(String, Value)> =
                c.metadata.into_iter().filter(|(k, _)| k.starts_with("tokenizer.")).collect();
            if !keys.is_empty() {
                keys.sort_by(|a, b| a.0.cmp(&b.0));
                return Ok(keys);
            }
        }
        let here = Path::new("<tokenizer.json>");
        let err = |m: String| tok_err(here, m);
        let json: serde_json::Value = serde_json::from_str(
            &self.inner.to_string(false).map_err(|e| err(format!("cannot serialise the tokenizer: {e}")))?,
        )
        .map_err(|e| err(e.to_string()))?;
        let model = &json["model"];
        if model["type"] != "BPE" {
            return Err(err(format!(
                "a {} tokenizer model cannot be written as a GGUF vocabulary (only BPE)",
                model["type"]
            )));
        }
        let n = spec.vocab_size;
        let mut tokens: Vec<Option<String>> = vec![None; n];
        let mut types = vec![TYPE_NORMAL; n];
        let mut place = |id: u64, t: &str| -> Result<()> {
            let slot = tokens
                .get_mut(id as usize)
                .ok_or_else(|| err(format!("token `{t}` has id {id}, past the model's {n} embeddings")))?;
            *slot = Some(t.to_string());
            Ok(())
        };
        for (t, id) in model["vocab"].as_object().ok_or_else(|| err("the BPE model has no vocab".into()))? {
            place(id.as_u64().ok_or_else(|| err(format!("token `{t}` has no integer id")))?, t)?;
        }
        for a in json["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(t)) = (a["id"].as_u64(), a["content"].as_str()) else { continue };
            place(id, t)?;
            types[id as usize] = if a["special"].as_bool() == Some(true) { TYPE_CONTROL } else { TYPE_USER_DEFINED };
        }
        let merges: Vec<Value> = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| match (m.as_str(), m.as_array()) {
                (Some(s), _) => Ok(Value::String(s.to_string())),
                (_, Some(pair)) if pair.len() == 2 => {
                    Ok(Value::String(format!("{} {}", pair[0].as_str().unwrap_or(""), pair[1].as_str().unwrap_or(""))))
                }
                _ => Err(err(format!("malformed merge {m}"))),
            })
            .collect::<Result<_>>()?;
        let unk = model["unk_token"].as_str().and_then(|t| self.inner.token_to_id(t));
        let mut m: Vec<(String, Value)> = Vec::new();
        let gemma = model["byte_fallback"].as_bool() == Some(true);
        if gemma {
            let replace = Replace::new(" ", "▁").map_err(|e| err(e.to_string()))?;
            if json["normalizer"] != serde_json::to_value(&replace).map_err(|e| err(e.to_string()))? {
                return Err(err("a byte-fallback BPE whose normaliser is not Gemma's (spaces as `▁`): only Gemma's \
                     sentencepiece vocabulary can be written as a GGUF `llama` vocabulary"
                    .into()));
            }
            let mut scores = Vec::with_capacity(n);
            for (id, (t, ty)) in tokens.iter_mut().zip(types.iter_mut()).enumerate() {
                let Some(tok) = t.as_mut() else {
                    scores.push(Value::F32(-1000.0));
                    continue;
                };
                if tok.chars().count() >= 2 && tok.chars().all(|c| c == '▁') {
                    *tok = " ".repeat(tok.chars().count());
                    *ty = TYPE_USER_DEFINED;
                } else if Some(id as u32) == unk && *ty == TYPE_NORMAL {
                    *ty = TYPE_UNKNOWN;
                } else if *ty == TYPE_NORMAL && tok.len() == 6 && tok.starts_with("<0x") && tok.ends_with('>') {
                    *ty = TYPE_BYTE;
                }
                scores.push(Value::F32(if *ty == TYPE_NORMAL { -(id as f32) } else { -1000.0 }));
            }
            m.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
            m.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
            m.push(("tokenizer.ggml.scores".into(), Value::Array(scores)));
            m.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)));
        } else {
            let pre = json["pre_tokenizer"].clone();
            let norm = json["normalizer"].clone();
            let mut found = None;
            for (name, kind) in PRE_NAMES {
                let want = serde_json::to_value(kind.pre_tokenizer().map_err(err)?).map_err(|e| err(e.to_string()))?;
                let want_norm = if matches!(kind, BytePre::Qwen2) {
                    serde_json::to_value(NFC).map_err(|e| err(e.to_string()))?
                } else {
                    serde_json::Value::Null
                };
                if pre == want && norm == want_norm {
                    found = Some(name);
                    break;
                }
            }
            let pre_name = found.ok_or_else(|| {
                err(format!(
                    "its pre-tokenizer is none of the byte-level pipelines that slm and llama.cpp name alike \
                     ({BYTE_LEVEL_PRES}); llama.cpp would tokenise it differently. Pre-tokenizer: {pre}"
                ))
            })?;
            m.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
            m.push(("tokenizer.ggml.pre".into(), Value::String(pre_name.into())));
            m.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
        }
        // An id that no token of the tokenizer holds is padding: `[PAD{id}]`, unused.
        let (tokens, types): (Vec<Value>, Vec<Value>) = tokens
            .into_iter()
            .zip(types)
            .enumerate()
            .map(|(id, (t, ty))| match t {
                Some(t) => (Value::String(t), Value::I32(ty)),
                None => (Value::String(format!("[PAD{id}]")), Value::I32(TYPE_UNUSED)),
            })
            .unzip();
        m.push(("tokenizer.ggml.tokens".into(), Value::Array(tokens)));
        m.push(("tokenizer.ggml.token_type".into(), Value::Array(types)));
        if let Some(u) = unk {
            m.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(u)));
        }
        m.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(self.bos.is_some())));
        m.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let p = BytePre::of(pre).unwrap().pre_tokenizer().unwrap();
        let mut s = PreTokenizedString::from(text);
        p.pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Char).into_iter().map(|(t, _, _)| t.to_string()).collect()
    }

    /// Llama-3's and Qwen2's splits, worked out by hand from their regexes: contractions case-insensitively,
    /// one leading non-letter joins a word, digits by three (Llama-3) or one by one (Qwen2), a newline run alone,
    /// and of a run of spaces before a word all but the last (which joins the word). Pieces are in byte-level
    /// form (space = `Ġ`, newline = `Ċ`).
    #[test]
    fn llama3_and_qwen2_pre_tokenizers_split_as_their_regexes() {
        let text = "I'M here 12345\n\n  ok!?";
        assert_eq!(pieces("llama-bpe", text), ["I", "'M", "Ġhere", "Ġ", "123", "45", "ĊĊ", "Ġ", "Ġok", "!?"]);
        assert_eq!(pieces("qwen2", text), ["I", "'M", "Ġhere", "Ġ", "1", "2", "3", "4", "5", "ĊĊ", "Ġ", "Ġok", "!?"]);
        // A non-letter (here a quote) joins the word after it; SmolLM's and GPT-2's regex keep it apart.
        assert_eq!(pieces("llama-bpe", "\"quoted"), ["\"quoted"]);
        assert_eq!(pieces("gpt2", "\"quoted"), ["\"", "quoted"]);
        assert_eq!(pieces("smollm", "a 12"), ["a", "Ġ", "1", "2"]);
        assert!(BytePre::of("tekken").is_none());
    }
}
