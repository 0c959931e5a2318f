//! Sequence-level distillation data (Kim & Rush, 2016): the dense model's own continuations of prompts drawn
//! from a corpus, written once to a JSONL file and reused by later runs. The first line holds the settings
//! (`{"slm_distill_data": {...}}`); each further line is a record `{"prompt", "completion", "prompt_ids",
//! "completion_ids"}` that [`crate::data`] reads as a `completion` example (loss on the completion). The file is
//! a function of the model, the corpus and the settings: the same seed gives the same bytes.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use slm_model::{Model, Tokenizer};

use crate::data::DISTILL_HEADER_KEY;
use crate::error::{LoraError, Result};

/// How the data is made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillDataSettings {
    /// The teacher (the model that continues the prompts).
    pub model: String,
    /// The corpus the prompts come from.
    pub corpus: String,
    /// Records to write.
    pub count: usize,
    /// Tokens of each prompt: the first this many tokens of a corpus document that has at least that many.
    pub prompt_tokens: usize,
    /// Tokens generated per prompt (a completion ends early at the end-of-sequence token).
    pub new_tokens: usize,
    /// 0: greedy; above 0: sampling from softmax(logits / temperature).
    pub temperature: f64,
    /// Seed of the prompt choice and of each record's sampling generator.
    pub seed: u64,
}

impl DistillDataSettings {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(LoraError::InvalidArgument(m.into()));
        if self.count == 0 {
            return bad("--count must be at least 1");
        }
        if self.prompt_tokens == 0 || self.new_tokens == 0 {
            return bad("--prompt-tokens and --new-tokens must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("--temperature must be 0 (greedy) or positive");
        }
        Ok(())
    }
}

/// `count` prompts of `prompt_tokens` tokens: the openings of corpus documents long enough, taken in a seeded
/// shuffle of the documents (each document at most once).
pub fn prompts_from_corpus(texts: &[String], tok: &Tokenizer, s: &DistillDataSettings) -> Result<Vec<Vec<u32>>> {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut ChaCha8Rng::seed_from_u64(s.seed));
    let mut out = Vec::with_capacity(s.count);
    for i in order {
        let ids = tok.encode(&texts[i])?;
        if ids.len() >= s.prompt_tokens {
            out.push(ids[..s.prompt_tokens].to_vec());
            if out.len() == s.count {
                return Ok(out);
            }
        }
    }
    Err(LoraError::InvalidArgument(format!(
        "the corpus has {} documents of at least {} tokens; {} prompts were asked for",
        out.len(),
        s.prompt_tokens,
        s.count
    )))
}

/// Record `i`'s token choice: greedy, or a sample at the temperature from its own generator.
fn choose(logits: &[f32], temperature: f64, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || logits.iter().enumerate().fold(0, |b, (i, &v)| if v > logits[b] { i } else { b }) as u32;
    if temperature == 0.0 {
        return argmax();
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let w: Vec<f64> = logits.iter().map(|&v| ((v as f64 - max) / temperature).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, &x) in w.iter().enumerate() {
        if u < x {
            return i as u32;
        }
        u -= x;
    }
    argmax()
}

/// The KV cache that [`auto_batch`] allows a generation pass: 2 GiB.
pub const AUTO_BATCH_KV_BYTES: usize = 2 << 30;

/// The most prompts generated together by default: on the 135M default model, 128 prompts a pass wrote the
/// same bytes as 32 or 64 in less time (README).
pub const AUTO_BATCH_MAX: usize = 128;

/// Prompts per generation pass when none is asked for: as many as keep the f32 KV cache of `tokens` positions a
/// row (keys and values of every layer) within [`AUTO_BATCH_KV_BYTES`], between 1 and [`AUTO_BATCH_MAX`]. The
/// records do not depend on it: each has its own generator and its rows do not mix with the others'.
pub fn auto_batch(spec: &slm_model::ModelSpec, tokens: usize) -> usize {
    let row: usize = spec.layers.iter().map(|l| 2 * l.num_key_value_heads * l.head_dim * tokens * 4).sum();
    (AUTO_BATCH_KV_BYTES / row.max(1)).clamp(1, AUTO_BATCH_MAX)
}

/// The continuations of `prompts` by `model`, `batch` prompts per generation pass; each record stops after the
/// end-of-sequence token when the model has one. `progress(done)` is called after each batch.
pub fn continuations(
    model: &Model,
    prompts: &[Vec<u32>],
    s: &DistillDataSettings,
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::with_capacity(prompts.len());
    for (b, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let first = b * batch.max(1);
        let mut rngs: Vec<ChaCha8Rng> = (0..chunk.len())
            .map(|r| {
                let mut g = ChaCha8Rng::seed_from_u64(s.seed);
                g.set_stream((first + r) as u64 + 1);
                g
            })
            .collect();
        let gen = model.generate_batch(chunk, s.new_tokens, &mut |r, l| choose(l, s.temperature, &mut rngs[r]))?;
        for mut g in gen {
            if let Some(e) = model.spec.eos_token_id {
                if let Some(p) = g.iter().position(|&t| t == e) {
                    g.truncate(p + 1);
                }
            }
            out.push(g);
        }
        progress(out.len());
    }
    Ok(out)
}

#[derive(Serialize)]
struct Record<'a> {
    prompt: String,
    completion: String,
    prompt_ids: &'a [u32],
    completion_ids: &'a [u32],
}

/// The file's bytes: the settings line, then one record per prompt.
pub fn file_bytes(
    s: &DistillDataSettings,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    completions: &[Vec<u32>],
) -> Result<Vec<u8>> {
    let mut out = serde_json::to_vec(&serde_json::json!({ DISTILL_HEADER_KEY: s })).expect("json");
    out.push(b'\n');
    for (p, c) in prompts.iter().zip(completions) {
        let r = Record { prompt: tok.decode(p)?, completion: tok.decode(c)?, prompt_ids: p, completion_ids: c };
        out.extend(serde_json::to_vec(&r).expect("json"));
        out.push(b'\n');
    }
    Ok(out)
}

/// The settings a distillation data file was made with (its first line), or None when `path` is not one.
pub fn read_settings(path: &Path) -> Result<Option<DistillDataSettings>> {
    use std::io::{BufRead, Read};
    let f = std::fs::File::open(path).map_err(|e| LoraError::Io { path: path.to_path_buf(), error: e })?;
    let mut line = String::new();
    std::io::BufReader::new(f.take(1 << 20))
        .read_line(&mut line)
        .map_err(|e| LoraError::Io { path: path.to_path_buf(), error: e })?;
    let v: serde_json::Value = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(_) => return Ok(None),
    };
    match v.get(DISTILL_HEADER_KEY) {
        Some(h) => serde_json::from_value(h.clone())
            .map(Some)
            .map_err(|e| LoraError::file(path, format!("line 1: not valid distillation data settings: {e}"))),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_automatic_batch_keeps_the_kv_cache_within_its_budget() {
        let spec = |shape: slm_model::synth::SynthShape| shape.spec(32000, None, None).unwrap();
        // Llama-2-7B over 256 positions: 32 layers × 2 × 32 heads × 128 × 256 × 4 bytes = 256 MiB a row.
        assert_eq!(auto_batch(&spec(slm_model::synth::SynthShape::LLAMA2_7B), 256), 8);
        // 13B: 40 × 2 × 40 × 128 × 256 × 4 = 400 MiB a row, 5 rows in 2 GiB.
        assert_eq!(auto_batch(&spec(slm_model::synth::SynthShape::LLAMA2_13B), 256), 5);
        // A model the size of the default one (30 layers, 3 KV heads of 64): 11.25 MiB a row, capped at 128.
        let small = slm_model::synth::SynthShape { hidden: 576, layers: 30, heads: 9, kv_heads: 3, intermediate: 1536 };
        assert_eq!(auto_batch(&spec(small), 256), AUTO_BATCH_MAX);
        // Longer than the budget allows for even one row: still one.
        assert_eq!(auto_batch(&spec(slm_model::synth::SynthShape::LLAMA2_13B), 1 << 20), 1);
    }

    #[test]
    fn sampling_follows_the_temperature() {
        let logits = [0.0f32, 2.0, 1.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(choose(&logits, 0.0, &mut rng), 1);
        // At temperature 1 the shares approach softmax: 0.090, 0.665, 0.245.
        let mut n = [0usize; 3];
        for _ in 0..20_000 {
            n[choose(&logits, 1.0, &mut rng) as usize] += 1;
        }
        let share: Vec<f64> = n.iter().map(|&k| k as f64 / 20_000.0).collect();
        for (s, want) in share.iter().zip([0.0900, 0.6652, 0.2447]) {
            assert!((s - want).abs() < 0.015, "{share:?}");
        }
    }
}
