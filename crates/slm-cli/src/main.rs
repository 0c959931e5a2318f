//! `slm`: make decoder language models (Llama, Mistral, Qwen2, Qwen3, Gemma-3) smaller and measure what they lost.

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "slm",
    version,
    about = "Compress decoder language models (Llama, Mistral, Qwen2, Qwen3, Gemma-3) in depth and width, and measure the loss"
)]
struct Cli {
    #[command(flatten)]
    common: commands::CommonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print dimensions, per-layer shapes and parameter counts.
    Inspect(commands::inspect::Args),
    /// Write the model as an HF directory, or as a GGUF for llama.cpp (`--out FILE.gguf`; per-layer widths as `deci`).
    Export(commands::export::Args),
    /// The logits at every position of one sequence, as a float32 .npy (to compare against another runtime).
    Logits(commands::logits::Args),
    /// Zero-shot evaluation, with lm-evaluation-harness's prompts, scoring and results JSON.
    Eval(commands::eval::Args),
    /// Depth pruning: sliding layer merging or a baseline (ShortGPT, LaCo, SLEB, Shortened-LLaMA PPL).
    Depth(commands::depth::Args),
    /// Layer×layer linear CKA and cosine matrices of a model's layer outputs on calibration text (JSON + heat-map PNGs).
    Similarity(commands::similarity::Args),
    /// Width pruning (LLM-Pruner): remove attention units (a KV head with its query heads; a query head where a layer has one KV head) and MLP channels by Taylor importance.
    Width(commands::width::Args),
    /// Prefill and decode tokens/s and peak memory (batch 1, greedy, KV cache), optionally side by side.
    Bench(commands::bench::Args),
    /// Run a schedule of pipelines (depth, width, lora, eval steps) and write one report.
    Run(commands::run::Args),
    /// LoRA recovery training (optionally distilled from the dense model); PEFT adapter files, optional merge.
    Lora(commands::lora::Args),
    /// Sequence-level distillation data: the model's continuations of corpus prompts, as JSONL for `slm lora`.
    DistillData(commands::distill_data::Args),
    /// Write a Llama-shaped HF directory of any size with seeded random weights (bf16, sharded), for scale tests.
    Synth(commands::synth::Args),
}

/// glibc's malloc hands blocks above its dynamic mmap threshold back to the kernel when freed and trims the
/// heap when twice that threshold is free at its top, so the tensors of every training step (activations,
/// gradients, logit chunks: 1-30 MB each) come back as fresh pages that the kernel faults in and zeroes. Blocks up
/// to 64 MiB now stay in the heap, and up to 2 GiB of free heap top is kept for reuse (a 7B layer's weights and
/// other large buffers are still mapped and unmapped). Measured on a 3-step LoRA run (ShortGPT-13, micro-batch
/// 4 x 256): page faults 3.12 M -> 1.31 M, CPU time 41.5 s -> 35.4 s, the same peak RSS (4.78 GB); `slm eval
/// --tasks boolq --limit 30`: 1.16 M -> 0.18 M, 21.2 s -> 19.1 s, 782 -> 745 MB. A user's own (non-empty)
/// `GLIBC_TUNABLES` or `MALLOC_*` settings win.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = std::env::var_os("GLIBC_TUNABLES").is_some_and(|v| !v.is_empty())
            || std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with("MALLOC_"));
        if !user_set {
            // SAFETY: mallopt only changes allocator parameters; called at start-up before any other thread.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 2047 << 20);
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    // Like other Unix tools, end quietly when stdout is closed early (`slm inspect ... | head`) instead of
    // panicking on the failed write.
    #[cfg(unix)]
    // SAFETY: restoring the default SIGPIPE action at start-up, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    keep_freed_memory();
    // candle asks for its thread count on every parallel op, and without RAYON_NUM_THREADS it counts the
    // physical cores by reading /proc/cpuinfo each time (about 5% of a decode step in a profile). Count once,
    // with candle's own rule, and pin it for the process (set before any thread exists; rayon reads it too).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
    let cli = Cli::parse();
    commands::init_tracing(cli.common.verbose);
    let result = match cli.command {
        Command::Inspect(a) => commands::inspect::run(&cli.common, a),
        Command::Export(a) => commands::export::run(&cli.common, a),
        Command::Logits(a) => commands::logits::run(&cli.common, a),
        Command::Synth(a) => commands::synth::run(&cli.common, a),
        Command::Eval(a) => commands::eval::run(&cli.common, a),
        Command::Depth(a) => commands::depth::run(&cli.common, a),
        Command::Similarity(a) => commands::similarity::run(&cli.common, a),
        Command::Width(a) => commands::width::run(&cli.common, a),
        Command::Bench(a) => commands::bench::run(&cli.common, a),
        Command::Run(a) => commands::run::run(&cli.common, a),
        Command::Lora(a) => commands::lora::run(&cli.common, a),
        Command::DistillData(a) => commands::distill_data::run(&cli.common, a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
