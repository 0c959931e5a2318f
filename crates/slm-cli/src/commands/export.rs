//! `slm export MODEL --out DIR [--dtype f32|f16|bf16]`: an HF directory;
//! `slm export MODEL --out FILE.gguf [--outtype f32|f16|bf16|q8_0|q4_0|q4_k]`: a GGUF that llama.cpp runs
//! (per-layer widths as its `deci` architecture, see `slm_model::gguf_write`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use slm_model::gguf_write::OutType;
use slm_model::output::OutputKind;
use slm_model::StorageDType;

use super::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF directory or a .gguf file.
    pub model: PathBuf,
    /// Output: an HF directory, or a file named `*.gguf` (written atomically either way).
    #[arg(long)]
    pub out: PathBuf,
    /// Storage dtype of an HF output: f32, f16 or bf16 [default: the input's: its stored dtype for an HF
    /// directory, f32 for a GGUF (dequantised)].
    #[arg(long)]
    pub dtype: Option<StorageDType>,
    /// Type of the weight matrices of a GGUF output: f32, f16, bf16, q8_0, q4_0 or q4_k (norms and biases stay
    /// f32; a matrix whose rows are not whole blocks of the type falls back along q4_k → q4_0 → f16, q8_0 → f16)
    /// [default: f16].
    #[arg(long)]
    pub outtype: Option<OutType>,
    /// Largest shard of an HF output (bytes of tensor data; suffixes KB, MB, GB, KiB, MiB, GiB): above it the
    /// weights go into `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`.
    #[arg(long, default_value = "5GB", value_parser = super::byte_size)]
    pub shard_size: u64,
}

/// Whether an output path names a GGUF file.
pub fn is_gguf_path(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

pub fn run(common: &CommonArgs, args: Args) -> anyhow::Result<()> {
    if is_gguf_path(&args.out) {
        if args.dtype.is_some() {
            bail!("--dtype sets an HF directory's dtype; for a .gguf output give --outtype");
        }
        return export_gguf(common, &args.model, &args.out, args.outtype.unwrap_or(OutType::F16));
    }
    if let Some(t) = args.outtype {
        bail!(
            "--outtype {} is for a .gguf output; --out {} is an HF directory (use --dtype)",
            t.name(),
            args.out.display()
        );
    }
    common.check_output("--out", &args.out, OutputKind::Model, &[&args.model])?;
    let model = common.load_model(&args.model, slm_model::Residency::Mapped)?;
    let dtype = args.dtype.unwrap_or(model.storage_dtype());
    model.save_sharded(&args.out, dtype, args.shard_size, &[], common.replace())?;
    println!(
        "exported {} ({} layers, {} parameters, {}) to {}",
        args.model.display(),
        model.spec.num_layers(),
        model.spec.num_parameters(),
        dtype.torch_name(),
        args.out.display()
    );
    Ok(())
}

/// Writes `model_path` as the GGUF `out` (checked before the model is read).
pub fn export_gguf(common: &CommonArgs, model_path: &Path, out: &Path, outtype: OutType) -> anyhow::Result<()> {
    common.check_output("--out", out, OutputKind::Gguf, &[model_path])?;
    let model = common.load_model(model_path, slm_model::Residency::Mapped)?;
    // The writer refuses an architecture llama.cpp cannot run before it creates any file.
    write_gguf(common, &model, out, outtype, None)?;
    println!(
        "exported {} ({} layers, {} parameters) to {}",
        model_path.display(),
        model.spec.num_layers(),
        model.spec.num_parameters(),
        out.display(),
    );
    Ok(())
}

/// The output kind of a model output path: a GGUF file for `*.gguf`, else an HF directory.
pub fn model_output_kind(out: &Path) -> OutputKind {
    if is_gguf_path(out) {
        OutputKind::Gguf
    } else {
        OutputKind::Model
    }
}

/// Saves a model that a command made: an HF directory with `slm_plan.json`, or, for `--out FILE.gguf`, a GGUF
/// with the plan in its metadata (matrices in `dtype`: f32, f16 or bf16).
pub fn save_model_output(
    common: &CommonArgs,
    model: &slm_model::Model,
    out: &Path,
    dtype: StorageDType,
    plan: Vec<u8>,
) -> anyhow::Result<()> {
    if is_gguf_path(out) {
        let t = match dtype {
            StorageDType::F32 => OutType::F32,
            StorageDType::F16 => OutType::F16,
            StorageDType::BF16 => OutType::Bf16,
        };
        return write_gguf(common, model, out, t, Some(&plan));
    }
    model.save_replacing(out, dtype, &[("slm_plan.json", plan)], common.replace())?;
    Ok(())
}

fn write_gguf(
    common: &CommonArgs,
    model: &slm_model::Model,
    out: &Path,
    outtype: OutType,
    plan: Option<&[u8]>,
) -> anyhow::Result<()> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} tensors  [{elapsed_precise} < {eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report = slm_model::gguf_write::export_gguf(model, out, outtype, common.replace(), plan, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("writing {}", out.display()))?;
    bar.finish_and_clear();
    println!(
        "GGUF {} ({}, {} tensors, {:.1} MiB, llama.cpp architecture `{}`)",
        out.display(),
        outtype.name(),
        report.tensors,
        report.file_bytes as f64 / (1u64 << 20) as f64,
        report.architecture
    );
    if !report.fallbacks.is_empty() {
        let mut by_type: std::collections::BTreeMap<String, usize> = Default::default();
        for (_, t) in &report.fallbacks {
            *by_type.entry(format!("{t:?}")).or_default() += 1;
        }
        let list: Vec<String> = by_type.iter().map(|(t, n)| format!("{n} as {t}")).collect();
        println!(
            "  {} matrices have rows that are not whole {} blocks and were stored {} (slm width --round-to avoids this)",
            report.fallbacks.len(),
            outtype.name(),
            list.join(", ")
        );
    }
    Ok(())
}
