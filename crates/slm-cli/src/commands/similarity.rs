//! `slm similarity MODEL --out DIR [--calib FILE] [--samples N] [--seq-len T] [--seed S]`: layer×layer linear
//! CKA, cosine and angular-distance matrices of a model's layer outputs on calibration text (SLM's "patch"
//! analysis), written as `DIR/similarity.json`, `DIR/cka.png` and `DIR/cosine.png`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use slm_depth::similarity::{angular_distance, cka_matrix, cosine_matrix, layer_outputs};
use slm_model::output::OutputKind;

use super::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF directory or a .gguf file.
    pub model: PathBuf,
    /// Output directory (similarity.json, cka.png, cosine.png).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub calib: super::CalibArgs,
    /// Leave out the first N positions of every window (the attention-sink token carries one activation thousands
    /// of times larger than the rest, which otherwise decides CKA on its own).
    #[arg(long, default_value_t = 0)]
    pub skip_first: usize,
    /// CKA at or above which a run of consecutive layers counts as one "patch" in the printed summary.
    #[arg(long, default_value_t = 0.9, value_parser = super::finite_f64)]
    pub patch_threshold: f64,
    #[command(flatten)]
    pub compute: super::ComputeArgs,
}

/// Heat-map colour ranges: both metrics on [0, 1] so that colours mean the same across models (cosines below 0
/// are drawn as 0).
const CKA_RANGE: (f64, f64) = (0.0, 1.0);
const COSINE_RANGE: (f64, f64) = (0.0, 1.0);

pub fn run(common: &CommonArgs, args: Args) -> anyhow::Result<()> {
    let calib = args.calib.or(super::REFERENCE_WINDOWS)?;
    if calib.samples < 2 {
        bail!("--samples: CKA needs at least 2 windows, got {}", calib.samples);
    }
    if calib.seq_len == 0 {
        bail!("--seq-len must be positive");
    }
    common.check_output("--out", &args.out, OutputKind::Similarity, &[&args.model, &calib.file])?;
    let model = args.compute.compute_dtype.apply(&common.load_model(&args.model, slm_model::Residency::Mapped)?)?;
    let windows = calib.windows(&model)?;

    let start = Instant::now();
    if args.skip_first >= calib.seq_len {
        bail!("--skip-first {} leaves no position of a {}-token window", args.skip_first, calib.seq_len);
    }
    let hidden = layer_outputs(&model, &windows).context("computing layer outputs")?;
    let hidden: Vec<candle_core::Tensor> = hidden
        .iter()
        .map(|h| h.narrow(1, args.skip_first, calib.seq_len - args.skip_first))
        .collect::<candle_core::Result<_>>()?;
    tracing::info!(
        representations = hidden.len(),
        windows = windows.len(),
        seconds = start.elapsed().as_secs_f64(),
        "layer outputs"
    );
    let cka = cka_matrix(&hidden).context("computing the CKA matrix")?;
    let cosine = cosine_matrix(&hidden).context("computing the cosine matrix")?;
    drop(hidden);
    let angular: Vec<Vec<f64>> = cosine.iter().map(|r| r.iter().map(|&c| angular_distance(c)).collect()).collect();
    let labels: Vec<String> = std::iter::once("embeddings".to_string())
        .chain((0..model.spec.num_layers()).map(|i| format!("layer {i}")))
        .collect();

    let json = serde_json::json!({
        "model": args.model.display().to_string(),
        "calibration": calib.record(),
        "skip_first": args.skip_first,
        "representation": "per-example flattening of each [seq_len, hidden] layer output; index 0 is the \
                           embeddings, index i+1 the output of layer i",
        "layers": labels,
        "cka": cka,
        "cosine": cosine,
        "angular_distance": angular,
        "heatmap_range": { "cka": [CKA_RANGE.0, CKA_RANGE.1], "cosine": [COSINE_RANGE.0, COSINE_RANGE.1] },
    });
    slm_model::output::stamp_dir(&args.out, OutputKind::Similarity)?;
    let json_path = args.out.join("similarity.json");
    let bytes = serde_json::to_vec_pretty(&json).context("serialising similarity.json")?;
    slm_model::write_file_atomically(&json_path, &bytes)?;
    let model_name = args.model.file_name().unwrap_or(args.model.as_os_str()).to_string_lossy();
    let axis_labels = slm_plot::layer_labels(labels.len());
    for (file, m, range, short, metric) in [
        ("cka.png", &cka, CKA_RANGE, "linear CKA", "linear CKA"),
        ("cosine.png", &cosine, COSINE_RANGE, "cosine", "cosine similarity"),
    ] {
        let title = format!("Layer similarity ({short}), {model_name}");
        slm_plot::heatmap_png(&args.out.join(file), &heatmap(&title, m, range, &axis_labels, metric, &[]))?;
    }

    println!(
        "{}: {} representations (embeddings + {} layers), {} windows × {} tokens from {} (seed {})",
        args.model.display(),
        labels.len(),
        model.spec.num_layers(),
        calib.samples,
        calib.seq_len,
        calib.file.display(),
        calib.seed
    );
    println!("{:<12} {:>10} {:>10} {:>10}", "", "CKA next", "cos next", "ang next");
    for i in 0..labels.len() - 1 {
        println!("{:<12} {:>10.4} {:>10.4} {:>10.4}", labels[i], cka[i][i + 1], cosine[i][i + 1], angular[i][i + 1]);
    }
    let patches = patches(&cka, args.patch_threshold);
    if patches.is_empty() {
        println!("no run of consecutive representations has pairwise CKA >= {}", args.patch_threshold);
    } else {
        let list: Vec<String> = patches.iter().map(|&(a, b)| format!("{}..={}", labels[a], labels[b])).collect();
        println!("patches (pairwise CKA >= {}): {}", args.patch_threshold, list.join(", "));
    }
    println!(
        "wrote {}, {}, {}",
        json_path.display(),
        args.out.join("cka.png").display(),
        args.out.join("cosine.png").display()
    );
    Ok(())
}

/// The heat map of a layer×layer matrix (index 0: the embeddings, index i + 1: layer i's output).
pub(crate) fn heatmap<'a>(
    title: &'a str,
    m: &'a [Vec<f64>],
    range: (f64, f64),
    labels: &'a [String],
    metric: &'a str,
    groups: &'a [(usize, usize)],
) -> slm_plot::Heatmap<'a> {
    slm_plot::Heatmap {
        title,
        matrix: m,
        range,
        labels,
        x_desc: "layer output (emb = embeddings)",
        y_desc: "layer output",
        colorbar_label: metric,
        groups,
    }
}

/// Maximal runs `[a, b]` (b > a) of consecutive representations whose pairwise CKA is all `>= threshold`,
/// found greedily from the bottom.
fn patches(cka: &[Vec<f64>], threshold: f64) -> Vec<(usize, usize)> {
    let n = cka.len();
    let mut out = Vec::new();
    let mut a = 0;
    while a < n {
        let mut b = a;
        while b + 1 < n && (a..=b).all(|k| cka[k][b + 1] >= threshold) {
            b += 1;
        }
        if b > a {
            out.push((a, b));
        }
        a = b + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::patches;

    #[test]
    fn patches_are_maximal_greedy_runs() {
        let m = vec![
            vec![1.0, 0.5, 0.4, 0.3],
            vec![0.5, 1.0, 0.95, 0.91],
            vec![0.4, 0.95, 1.0, 0.97],
            vec![0.3, 0.91, 0.97, 1.0],
        ];
        assert_eq!(patches(&m, 0.9), vec![(1, 3)]);
        assert_eq!(patches(&m, 0.96), vec![(2, 3)]);
        assert!(patches(&m, 0.99).is_empty());
    }
}
