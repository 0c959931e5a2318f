//! Sample pictures to look at: `cargo run -p slm-plot --example samples -- DIR` writes DIR/heatmap.png (a
//! 31×31 CKA-like matrix: embeddings + 30 layers, two windows outlined), DIR/heatmap_small.png (4×4),
//! DIR/heatmap_wide.png (81×81) and DIR/scatter.png (4 labelled points, two of them close together).

use std::path::PathBuf;

use slm_plot::{heatmap_png, layer_labels, scatter_png, Heatmap, Scatter, ScatterPoint};

fn matrix(n: usize) -> Vec<Vec<f64>> {
    (0..n).map(|i| (0..n).map(|j| (-(i as f64 - j as f64).abs() / (n as f64 / 5.0)).exp()).collect()).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "/tmp/plots".into()));
    std::fs::create_dir_all(&dir)?;
    for (name, n, groups) in [
        ("heatmap.png", 31, vec![(20, 24), (26, 27), (29, 29)]),
        ("heatmap_small.png", 4, vec![(1, 2)]),
        ("heatmap_wide.png", 81, vec![(60, 70)]),
    ] {
        let m = matrix(n);
        let labels = layer_labels(n);
        heatmap_png(
            &dir.join(name),
            &Heatmap {
                title: "Layer similarity (linear CKA), merged windows outlined (pipeline slm-dp-13)",
                matrix: &m,
                range: (0.0, 1.0),
                labels: &labels,
                x_desc: "layer output (emb = embeddings)",
                y_desc: "layer output",
                colorbar_label: "linear CKA",
                groups: &groups,
            },
        )?;
    }
    let point = |x: f64, y: f64, label: &str, colour: [u8; 3]| ScatterPoint { x, y, label: label.into(), colour };
    let points = vec![
        point(1235.8, 62.1, "dense", [31, 119, 180]),
        point(990.2, 55.3, "slm-dp-13", [255, 127, 14]),
        point(985.0, 54.9, "shortgpt-13", [44, 160, 44]),
        point(870.4, 49.8, "slm-width-30+lora", [214, 39, 40]),
    ];
    scatter_png(
        &dir.join("scatter.png"),
        &Scatter {
            title: "Parameters vs avg-7 accuracy",
            x_desc: "parameters (millions)",
            y_desc: "avg-7 accuracy (%)",
            x_range: (808.6, 1235.8),
            y_range: (47.8, 64.1),
            points: &points,
        },
    )?;
    println!("wrote {}", dir.display());
    Ok(())
}
