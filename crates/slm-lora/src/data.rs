//! Training data: Alpaca-format instructions (loss on the response only, as Alpaca-LoRA / LLM-Pruner do), plain
//! text cut into fixed-length windows, or prompt/completion records (sequence-level distillation data from
//! [`crate::distill_data`]: loss on the completion only).

use std::path::Path;

use slm_model::Tokenizer;

use crate::error::{LoraError, Result};

/// The Alpaca-LoRA prompt with an input.
pub const PROMPT_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
/// The Alpaca-LoRA prompt without an input.
pub const PROMPT_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// One training sequence. `target[p]` says whether token `p` is predicted (scored) from the tokens before it;
/// `target[0]` is always false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub target: Vec<bool>,
}

impl Example {
    /// Number of scored tokens.
    pub fn num_targets(&self) -> usize {
        self.target.iter().skip(1).filter(|t| **t).count()
    }
}

/// An Alpaca record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    pub instruction: String,
    pub input: String,
    pub output: String,
}

impl Instruction {
    pub fn prompt(&self) -> String {
        if self.input.is_empty() {
            PROMPT_NO_INPUT.replace("{instruction}", &self.instruction)
        } else {
            PROMPT_WITH_INPUT.replace("{instruction}", &self.instruction).replace("{input}", &self.input)
        }
    }
}

/// What a data file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Records {
    Alpaca(Vec<Instruction>),
    Text(Vec<String>),
    Completion(Vec<Completion>),
}

/// A prompt and its completion, as token ids when the file has them (distillation data), else as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub prompt: String,
    pub completion: String,
    pub ids: Option<(Vec<u32>, Vec<u32>)>,
}

/// Data format choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `text` records → text; `instruction`/`output` records → Alpaca.
    Auto,
    Alpaca,
    Text,
    /// `prompt`/`completion` records (optionally with `prompt_ids`/`completion_ids`): loss on the completion.
    Completion,
}

/// The key of the settings line that may open a distillation data file (skipped when reading records).
pub const DISTILL_HEADER_KEY: &str = "slm_distill_data";

impl std::str::FromStr for Format {
    type Err = LoraError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Format::Auto),
            "alpaca" => Ok(Format::Alpaca),
            "text" => Ok(Format::Text),
            "completion" => Ok(Format::Completion),
            _ => Err(LoraError::InvalidArgument(format!(
                "unknown data format `{s}` (expected auto, alpaca, text or completion)"
            ))),
        }
    }
}

/// Reads a JSON array or JSONL file of Alpaca records (`instruction`, optional `input`, `output`) or text records
/// (`text`). Errors name the file and the record.
pub fn read_records(path: &Path, format: Format) -> Result<Records> {
    let content = std::fs::read_to_string(path).map_err(|e| LoraError::Io { path: path.to_path_buf(), error: e })?;
    let values: Vec<(usize, serde_json::Value)> = if content.trim_start().starts_with('[') {
        let v: Vec<serde_json::Value> = serde_json::from_str(&content)
            .map_err(|e| LoraError::file(path, format!("not a valid JSON array: {e}")))?;
        v.into_iter().enumerate().map(|(i, v)| (i + 1, v)).collect()
    } else {
        let mut out = Vec::new();
        for (i, line) in content.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v = serde_json::from_str(line)
                .map_err(|e| LoraError::file(path, format!("line {}: not valid JSON: {e}", i + 1)))?;
            out.push((i + 1, v));
        }
        out
    };
    // A distillation data file's settings line is not a record.
    let values: Vec<(usize, serde_json::Value)> =
        values.into_iter().filter(|(_, v)| v.get(DISTILL_HEADER_KEY).is_none()).collect();
    let what = if content.trim_start().starts_with('[') { "record" } else { "line" };
    let Some((_, first)) = values.first() else {
        return Err(LoraError::file(path, "the dataset is empty (no records)"));
    };
    let format = match format {
        Format::Auto if first.get("text").is_some() && first.get("instruction").is_none() => Format::Text,
        Format::Auto if first.get("completion").is_some() => Format::Completion,
        Format::Auto => Format::Alpaca,
        f => f,
    };
    let field = |n: usize, v: &serde_json::Value, k: &str, required: bool| -> Result<String> {
        match v.get(k) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            None | Some(serde_json::Value::Null) if !required => Ok(String::new()),
            None => Err(LoraError::file(path, format!("{what} {n}: missing string field `{k}`"))),
            Some(_) => Err(LoraError::file(path, format!("{what} {n}: field `{k}` is not a string"))),
        }
    };
    let ids = |n: usize, v: &serde_json::Value, k: &str| -> Result<Option<Vec<u32>>> {
        match v.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Array(a)) => {
                a.iter()
                    .map(|x| {
                        x.as_u64().filter(|&t| t <= u32::MAX as u64).map(|t| t as u32).ok_or_else(|| {
                            LoraError::file(path, format!("{what} {n}: `{k}` holds {x}, not a token id"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Some)
            }
            Some(_) => Err(LoraError::file(path, format!("{what} {n}: `{k}` is not an array of token ids"))),
        }
    };
    Ok(match format {
        Format::Text => Records::Text(values.iter().map(|(n, v)| field(*n, v, "text", true)).collect::<Result<_>>()?),
        Format::Completion => Records::Completion(
            values
                .iter()
                .map(|(n, v)| {
                    let pair = match (ids(*n, v, "prompt_ids")?, ids(*n, v, "completion_ids")?) {
                        (Some(p), Some(c)) => Some((p, c)),
                        (None, None) => None,
                        _ => {
                            return Err(LoraError::file(
                                path,
                                format!("{what} {n}: `prompt_ids` and `completion_ids` go together"),
                            ))
                        }
                    };
                    Ok(Completion {
                        prompt: field(*n, v, "prompt", true)?,
                        completion: field(*n, v, "completion", true)?,
                        ids: pair,
                    })
                })
                .collect::<Result<_>>()?,
        ),
        _ => Records::Alpaca(
            values
                .iter()
                .map(|(n, v)| {
                    Ok(Instruction {
                        instruction: field(*n, v, "instruction", true)?,
                        input: field(*n, v, "input", false)?,
                        output: field(*n, v, "output", true)?,
                    })
                })
                .collect::<Result<_>>()?,
        ),
    })
}

/// Alpaca-LoRA's tokenisation: `prompt + output` truncated to `cutoff`, EOS appended when there is room, and the
/// first `len(tokenize(prompt))` tokens not scored (`train_on_inputs=False`).
pub fn alpaca_example(r: &Instruction, tok: &Tokenizer, eos: Option<u32>, cutoff: usize) -> Result<Example> {
    let prompt = r.prompt();
    let n_prompt = tok.encode(&prompt)?.len();
    let mut ids = tok.encode(&format!("{prompt}{}", r.output))?;
    ids.truncate(cutoff);
    if let Some(e) = eos {
        if ids.last() != Some(&e) && ids.len() < cutoff {
            ids.push(e);
        }
    }
    let target = (0..ids.len()).map(|p| p > 0 && p >= n_prompt).collect();
    Ok(Example { ids, target })
}

/// A prompt/completion record as one sequence `prompt + completion` truncated to `cutoff`, the completion scored.
/// Token ids in the record are used as they are (checked against the vocabulary), so that a distillation file
/// trains on exactly the teacher's tokens; text alone is tokenised (prompt, then prompt + completion).
pub fn completion_example(c: &Completion, tok: &Tokenizer, cutoff: usize) -> Result<Example> {
    let (n_prompt, mut ids) = match &c.ids {
        Some((p, q)) => {
            let v = tok.vocab_size();
            if let Some(bad) = p.iter().chain(q).find(|&&t| t as usize >= v) {
                return Err(LoraError::InvalidArgument(format!(
                    "token id {bad} is outside the tokenizer's vocabulary of {v} (data from another tokenizer?)"
                )));
            }
            (p.len(), [p.as_slice(), q.as_slice()].concat())
        }
        None => (tok.encode(&c.prompt)?.len(), tok.encode(&format!("{}{}", c.prompt, c.completion))?),
    };
    ids.truncate(cutoff);
    let target = (0..ids.len()).map(|p| p > 0 && p >= n_prompt).collect();
    Ok(Example { ids, target })
}

/// Documents joined by "\n\n" into one token stream, cut into non-overlapping windows of `len` tokens (the last,
/// partial window dropped); every token but the first of a window is scored.
pub fn text_windows(texts: &[String], tok: &Tokenizer, len: usize) -> Result<Vec<Example>> {
    let sep = tok.encode("\n\n")?;
    let mut stream = Vec::new();
    for t in texts {
        let ids = tok.encode(t)?;
        if ids.is_empty() {
            continue;
        }
        if !stream.is_empty() {
            stream.extend_from_slice(&sep);
        }
        stream.extend_from_slice(&ids);
    }
    Ok(stream
        .chunks_exact(len)
        .map(|c| Example { ids: c.to_vec(), target: (0..len).map(|p| p > 0).collect() })
        .collect())
}

/// Examples from a data file: Alpaca records or text windows, all of at least two tokens.
pub fn load_examples(
    path: &Path,
    format: Format,
    tok: &Tokenizer,
    eos: Option<u32>,
    cutoff: usize,
) -> Result<Vec<Example>> {
    if cutoff < 2 {
        return Err(LoraError::InvalidArgument(format!("cutoff must be at least 2 tokens, got {cutoff}")));
    }
    let examples = match read_records(path, format)? {
        Records::Alpaca(rs) => rs
            .iter()
            .map(|r| alpaca_example(r, tok, eos, cutoff))
            .filter(|e| !matches!(e, Ok(e) if e.num_targets() == 0))
            .collect::<Result<Vec<_>>>()?,
        Records::Text(ts) => text_windows(&ts, tok, cutoff)?,
        Records::Completion(cs) => cs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                completion_example(c, tok, cutoff).map_err(|e| match e {
                    LoraError::InvalidArgument(m) => LoraError::file(path, format!("record {}: {m}", i + 1)),
                    e => e,
                })
            })
            .filter(|e| !matches!(e, Ok(e) if e.num_targets() == 0))
            .collect::<Result<Vec<_>>>()?,
    };
    if examples.is_empty() {
        return Err(LoraError::file(
            path,
            format!(
                "no training example: every record is empty, or the text is shorter than one window of {cutoff} tokens"
            ),
        ));
    }
    Ok(examples)
}
