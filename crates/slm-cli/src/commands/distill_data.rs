//! `slm distill-data MODEL --out FILE.jsonl [--data CORPUS] [--count 800 --prompt-tokens 32 --new-tokens 224
//! --temperature 0 --seed 42]`: sequence-level distillation data, the model's continuations of corpus prompts,
//! for `slm lora --data FILE.jsonl` (loss on the completions). Written once, atomically; a rerun with the same
//! settings reuses the file.

use std::path::PathBuf;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use slm_lora::data::{read_records, Format, Records};
use slm_lora::distill_data::{
    auto_batch, continuations, file_bytes, prompts_from_corpus, read_settings, DistillDataSettings,
};
use slm_model::output::{OutputKind, Replace};

use super::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The teacher: an HF directory or a .gguf file (the dense model).
    pub model: PathBuf,
    /// Output JSONL file: a settings line, then one {prompt, completion, prompt_ids, completion_ids} per record.
    #[arg(long)]
    pub out: PathBuf,
    /// Corpus of the prompts: JSONL with a `text` field [default: the calibration corpus in the data directory].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The data directory for the default --data.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Records to write (prompts: the openings of this many corpus documents, in a seeded order).
    #[arg(long, default_value_t = 800)]
    pub count: usize,
    /// Tokens of each prompt.
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    /// Tokens generated per prompt (fewer when the model ends the sequence).
    #[arg(long, default_value_t = 224)]
    pub new_tokens: usize,
    /// 0: greedy continuations; above 0: sampled from softmax(logits / T), each record from its own seeded
    /// generator.
    #[arg(long, default_value_t = 0.0, value_parser = super::finite_f64)]
    pub temperature: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Prompts generated together (one batched pass per token) [default: as many as keep the KV cache within
    /// 2 GiB, at most 128]. The records do not depend on it.
    #[arg(long)]
    pub batch_size: Option<usize>,
}

pub fn run(common: &CommonArgs, args: Args) -> anyhow::Result<()> {
    let corpus = match &args.data {
        Some(d) => d.clone(),
        None => slm_model::data::default_calibration_corpus(args.data_dir.as_deref())?,
    };
    let settings = DistillDataSettings {
        model: args.model.display().to_string(),
        corpus: corpus.display().to_string(),
        count: args.count,
        prompt_tokens: args.prompt_tokens,
        new_tokens: args.new_tokens,
        temperature: args.temperature,
        seed: args.seed,
    };
    settings.validate()?;
    if args.batch_size == Some(0) {
        bail!("--batch-size must be at least 1");
    }
    // The input checks of an output file (not an input, not inside one, not a link); replacing is decided here.
    slm_model::output::check_output(&args.out, OutputKind::EvalResults, &[&args.model, &corpus], Replace::Force)
        .context("--out")?;
    if args.out.exists() {
        match read_settings(&args.out)? {
            Some(s) if s == settings => {
                println!("reusing {} (made with the same settings)", args.out.display());
                return Ok(());
            }
            Some(s) if !common.force => bail!(
                "--out {}: distillation data made with other settings ({}); pass --force to replace it",
                args.out.display(),
                serde_json::to_string(&s).unwrap_or_default()
            ),
            None if !common.force => bail!(
                "--out {}: exists and is not slm distillation data; refusing to replace it (pass --force)",
                args.out.display()
            ),
            _ => {}
        }
    }
    let model = common.load_model(&args.model, slm_model::Residency::Auto)?;
    if args.prompt_tokens + args.new_tokens > model.spec.max_position_embeddings {
        bail!(
            "--prompt-tokens {} + --new-tokens {} exceed the model's max_position_embeddings {}",
            args.prompt_tokens,
            args.new_tokens,
            model.spec.max_position_embeddings
        );
    }
    let texts = match read_records(&corpus, Format::Text)? {
        Records::Text(t) => t,
        _ => bail!("{}: not a text corpus", corpus.display()),
    };
    let tok = model.tokenizer()?;
    let prompts =
        prompts_from_corpus(&texts, tok, &settings).with_context(|| format!("--data {}", corpus.display()))?;
    let bar = ProgressBar::new(prompts.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} records  {per_sec}  [{elapsed_precise} < {eta_precise}]")
            .expect("valid template"),
    );
    let batch = args.batch_size.unwrap_or_else(|| auto_batch(&model.spec, args.prompt_tokens + args.new_tokens));
    tracing::info!(batch, "prompts generated together");
    let start = std::time::Instant::now();
    let completions = continuations(&model, &prompts, &settings, batch, &mut |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let new: usize = completions.iter().map(Vec::len).sum();
    slm_model::write_file_atomically(&args.out, &file_bytes(&settings, tok, &prompts, &completions)?)?;
    tracing::info!(records = prompts.len(), new_tokens = new, seconds, "distillation data written");
    println!(
        "wrote {} ({} records, {} generated tokens, {:.1} s, {:.0} tokens/s)",
        args.out.display(),
        prompts.len(),
        new,
        seconds,
        new as f64 / seconds.max(1e-9)
    );
    Ok(())
}
