//! Training data: Alpaca-format instructions (loss on the response only, as Alpaca-LoRA / LLM-Pruner do) or plain
//! text cut into fixed-length windows.

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
}

/// Data format choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `text` records → text; `instruction`/`output` records → Alpaca.
    Auto,
    Alpaca,
    Text,
}

impl std::str::FromStr for Format {
    type Err = LoraError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Format::Auto),
            "alpaca" => Ok(Format::Alpaca),
            "text" => Ok(Format::Text),
            _ => Err(LoraError::InvalidArgument(format!("unknown data format `{s}` (expected auto, alpaca or text)"))),
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
    let what = if content.trim_start().starts_with('[') { "record" } else { "line" };
    let Some((_, first)) = values.first() else {
        return Err(LoraError::file(path, "the dataset is empty (no records)"));
    };
    let format = match format {
        Format::Auto if first.get("text").is_some() && first.get("instruction").is_none() => Format::Text,
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
    Ok(match format {
        Format::Text => Records::Text(values.iter().map(|(n, v)| field(*n, v, "text", true)).collect::<Result<_>>()?),
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
