//! `slm lora MODEL --out DIR [--data FILE] [--rank 8 --alpha 16 --epochs 2 --lr 1e-4 ...] [--distill] [--merge]`:
//! LoRA recovery training; writes PEFT adapter files (and, with `--merge`, the merged model as an HF directory).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use slm_lora::data::{load_examples, Format};
use slm_lora::file::{LoraRunFile, MergedPlanFile, Objective, ValLoss};
use slm_lora::train::{evaluate, split_validation};
use slm_lora::{Distill, Lora, LoraConfig, TrainConfig};
use slm_model::output::{OutputKind, OutputStamp};
use slm_model::{Model, StorageDType};

use super::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF directory or a .gguf file (e.g. a pruned model).
    pub model: PathBuf,
    /// Output directory: adapter_config.json, adapter_model.safetensors (PEFT), slm_lora.json (the run).
    #[arg(long)]
    pub out: PathBuf,
    /// Training data: Alpaca JSON/JSONL (instruction, input, output) or JSONL with a `text` field [default:
    /// lambada_openai.test.jsonl in the data directory].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The data directory for the default --data (default: $SLM_DATA_DIR, else share/slm/data beside the
    /// installed binary, else the source checkout's data/).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Data format: auto, alpaca (loss on the response only) or text (fixed windows of --cutoff tokens).
    #[arg(long, default_value = "auto")]
    pub format: Format,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (scaling α/r).
    #[arg(long, default_value_t = 16.0, value_parser = super::finite_f64)]
    pub alpha: f64,
    /// Dropout on the LoRA branch's input.
    #[arg(long, default_value_t = 0.05, value_parser = super::finite_f64)]
    pub dropout: f64,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4, value_parser = super::finite_f64)]
    pub lr: f64,
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// Tokens per sequence (Alpaca: truncation; text: window length).
    #[arg(long, default_value_t = 256)]
    pub cutoff: usize,
    /// Sequences per optimiser step (global batch).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Sequences per forward/backward pass; gradients are accumulated up to --batch-size.
    #[arg(long, default_value_t = 4)]
    pub micro_batch_size: usize,
    /// Linear warm-up steps, then linear decay to 0.
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 0.0, value_parser = super::finite_f64)]
    pub weight_decay: f64,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0, value_parser = super::finite_f64)]
    pub max_grad_norm: f64,
    /// Held-out validation sequences (default: 2000, at most a tenth of the data).
    #[arg(long)]
    pub val_size: Option<usize>,
    /// Validate every this many steps (and after the last); the best adapters by validation loss are kept.
    #[arg(long, default_value_t = 100)]
    pub eval_steps: usize,
    /// Stop after N optimiser steps (the schedule decays over the capped run).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Seed of initialisation, split, shuffling and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Train towards the teacher's token distributions (KL at --temperature) instead of the next token.
    #[arg(long)]
    pub distill: bool,
    /// Teacher for --distill (default: the `source_model` recorded in MODEL/slm_plan.json).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Distillation temperature.
    #[arg(long, default_value_t = 1.0, value_parser = super::finite_f64)]
    pub temperature: f64,
    /// Also write the merged model (W ← W₀ + (α/r)·B·A, in f32) as an HF directory OUT/merged.
    #[arg(long)]
    pub merge: bool,
    /// Storage dtype of the output: f32, f16 or bf16 [default: the input's: its stored dtype for an HF
    /// directory, f32 for a GGUF (dequantised)].
    #[arg(long)]
    pub dtype: Option<StorageDType>,
}

/// The teacher for `--distill`: `--teacher`, or the source recorded in the pruned model's slm_plan.json.
fn teacher_path(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(t) = &args.teacher {
        return Ok(t.clone());
    }
    let plan = super::plan_file::read_plan(&args.model)?;
    let source = plan.as_ref().and_then(|p| p.source_model()).map(PathBuf::from);
    source.with_context(|| {
        format!("--distill needs --teacher: {} has no slm_plan.json naming a source model", args.model.display())
    })
}

pub fn run(common: &CommonArgs, args: Args) -> anyhow::Result<()> {
    let lora_cfg = LoraConfig { rank: args.rank, alpha: args.alpha, dropout: args.dropout };
    lora_cfg.validate().context("LoRA settings")?;
    let cfg = TrainConfig {
        lr: args.lr,
        epochs: args.epochs,
        batch_size: args.batch_size,
        micro_batch_size: args.micro_batch_size,
        warmup_steps: args.warmup_steps,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        eval_steps: args.eval_steps,
        max_steps: args.max_steps,
        seed: args.seed,
        ..TrainConfig::default()
    };
    cfg.validate().context("training settings")?;
    let (format, dtype) = (args.format, args.dtype);
    if !(args.temperature > 0.0) {
        bail!("--temperature must be positive, got {}", args.temperature);
    }
    let data = match &args.data {
        Some(d) => d.clone(),
        None => slm_model::data::default_calibration_corpus(args.data_dir.as_deref())?,
    };
    let mut inputs: Vec<&Path> = vec![&args.model, &data];
    inputs.extend(args.teacher.as_deref());
    common.check_output("--out", &args.out, OutputKind::Lora, &inputs)?;
    let device = common.device()?;
    let model = common.load_model(&args.model, slm_model::Residency::Auto)?;
    if !data.is_file() {
        bail!("{}: training data file does not exist", data.display());
    }
    let teacher = if args.distill {
        let p = teacher_path(&args)?;
        Some(Model::load(&p, &device).with_context(|| format!("loading the teacher {}", p.display()))?)
    } else {
        None
    };
    let distill = teacher.as_ref().map(|t| Distill { teacher: t, temperature: args.temperature });

    let tok = model.tokenizer()?;
    let examples = load_examples(&data, format, tok, model.spec.eos_token_id, args.cutoff)
        .with_context(|| format!("reading training data {}", data.display()))?;
    let val_size = args.val_size.unwrap_or_else(|| 2000.min(examples.len() / 10));
    let (train, val) = split_validation(examples, val_size, args.seed).context("--val-size")?;
    let lora = Lora::new(&model.spec, lora_cfg.clone(), args.seed, &device)?;
    let total = cfg.total_steps(train.len());
    let train_tokens: usize = train.iter().map(|e| e.ids.len()).sum();
    tracing::info!(
        train = train.len(),
        val = val.len(),
        train_tokens,
        steps = total,
        trainable = lora.num_parameters(),
        objective = if distill.is_some() { "distill" } else { "lm" },
        "LoRA training"
    );
    let val_before = if val.is_empty() {
        None
    } else {
        let v = evaluate(&model, &lora, &val, distill.as_ref(), cfg.micro_batch_size * 2)?;
        tracing::info!(val_loss = v.0, val_lm_loss = v.1, "validation before training");
        Some(v)
    };

    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
            .expect("valid template"),
    );
    let mut on_step = |s: &slm_lora::StepInfo| {
        let val = s.val_loss.map(|v| format!("  val {v:.4}")).unwrap_or_default();
        bar.set_message(format!(
            "loss {:.4}{val}  lr {:.2e}  {:.0} tok/s",
            s.loss,
            s.lr,
            s.tokens as f64 / s.seconds.max(1e-9)
        ));
        bar.set_position(s.step as u64);
        if s.val_loss.is_some() {
            bar.suspend(|| tracing::info!(step = s.step, loss = s.loss, val_loss = s.val_loss, "step"));
        }
    };
    let report = slm_lora::train(&model, &lora, &train, &val, &cfg, distill.as_ref(), &mut on_step)?;
    bar.finish_and_clear();

    let base_name = args.model.display().to_string();
    slm_model::output::stamp_dir(&args.out, OutputKind::Lora)?;
    lora.save(&args.out, &base_name).with_context(|| format!("writing the adapter to {}", args.out.display()))?;
    let run = LoraRunFile {
        slm_output: OutputStamp::new(OutputKind::LoraRun),
        source_model: base_name,
        data: data.display().to_string(),
        format,
        cutoff: args.cutoff,
        lora: lora_cfg,
        train: cfg,
        objective: if args.distill { Objective::Distill } else { Objective::Lm },
        teacher: teacher.as_ref().and_then(|t| t.source.as_ref()).map(|p| p.display().to_string()),
        temperature: args.distill.then_some(args.temperature),
        trainable_parameters: lora.num_parameters(),
        val_before: val_before.map(|(loss, lm_loss)| ValLoss { loss, lm_loss }),
        report,
    };
    slm_model::write_file_atomically(&args.out.join(LoraRunFile::NAME), &run.to_bytes())?;
    if args.merge {
        let merged = lora.merge(&model)?;
        let dir = args.out.join("merged");
        let plan = merged_plan(&args.model, &run)?;
        merged.save_replacing(
            &dir,
            dtype.unwrap_or(model.storage_dtype()),
            &[("slm_plan.json", plan)],
            common.replace(),
        )?;
        println!("merged:      {}", dir.display());
    }
    println!("trainable:   {} parameters (r {}, alpha {})", lora.num_parameters(), args.rank, args.alpha);
    println!("data:        {} train / {} validation sequences", run.report.train_examples, run.report.val_examples);
    println!(
        "steps:       {} ({} tokens, {:.1} s, {:.0} tokens/s)",
        run.report.steps, run.report.tokens, run.report.seconds, run.report.tokens_per_s
    );
    if let (Some(b), Some(s)) = (run.report.best_val_loss, run.report.best_step) {
        let before = val_before.map(|v| format!("{:.4} before, ", v.0)).unwrap_or_default();
        println!("validation:  {before}best {b:.4} at step {s}");
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// slm_plan.json of the merged model: this run and the base model's plan (if any), read through its type.
fn merged_plan(model: &Path, run: &LoraRunFile) -> anyhow::Result<Vec<u8>> {
    let base = super::plan_file::read_plan(model)?;
    Ok(MergedPlanFile {
        slm_output: OutputStamp::new(OutputKind::MergedPlan),
        base_model: model.display().to_string(),
        source_model: base.as_ref().and_then(|p| p.source_model()).map(String::from),
        lora: run.clone(),
        base_plan: base.map(|p| p.to_value()),
    }
    .to_bytes())
}
