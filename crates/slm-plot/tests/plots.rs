//! Heat maps and scatter plots: PNG size and decoding, text in the title band, colour bar, outlines, labels,
//! atomic writes and bad inputs.

use std::collections::HashSet;
use std::path::Path;

use slm_plot::{
    heatmap_png, layer_labels, render_heatmap, render_scatter, scatter_png, viridis, write_png, Heatmap, Image,
    Scatter, ScatterPoint, HEATMAP_SIZE, SCATTER_SIZE,
};

fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

/// Decodes an 8-bit RGB(A) PNG into an [`Image`].
fn decode(path: &Path) -> Image {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected colour type {other:?}"),
    };
    let rgb = buf[..info.buffer_size()].chunks(channels).flat_map(|p| [p[0], p[1], p[2]]).collect();
    Image { width: info.width, height: info.height, rgb }
}

fn colours(img: &Image, xs: std::ops::Range<u32>, ys: std::ops::Range<u32>) -> HashSet<[u8; 3]> {
    ys.flat_map(|y| xs.clone().map(move |x| (x, y))).map(|(x, y)| img.pixel(x, y)).collect()
}

/// Pixels darker than mid grey in the region: text (black on white).
fn dark_pixels(img: &Image, xs: std::ops::Range<u32>, ys: std::ops::Range<u32>) -> usize {
    ys.flat_map(|y| xs.clone().map(move |x| (x, y)))
        .filter(|&(x, y)| img.pixel(x, y).iter().map(|&c| c as u32).sum::<u32>() < 3 * 100)
        .count()
}

fn is_red(c: [u8; 3]) -> bool {
    c[0] > 200 && c[1] < 80 && c[2] < 80
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn cka_like(n: usize) -> Vec<Vec<f64>> {
    (0..n).map(|i| (0..n).map(|j| 1.0 / (1.0 + (i as f64 - j as f64).abs())).collect()).collect()
}

fn heatmap<'a>(m: &'a [Vec<f64>], labels: &'a [String], groups: &'a [(usize, usize)]) -> Heatmap<'a> {
    Heatmap {
        title: "Layer similarity (linear CKA), dense model",
        matrix: m,
        range: (0.0, 1.0),
        labels,
        x_desc: "layer output",
        y_desc: "layer output",
        colorbar_label: "linear CKA",
        groups,
    }
}

#[test]
fn heatmap_png_decodes_with_the_expected_size_and_no_temp_file_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cka.png");
    let m = vec![vec![1.0, 0.5, 0.0], vec![0.5, 1.0, f64::NAN], vec![0.0, f64::NAN, 1.0]];
    let labels = layer_labels(3);
    heatmap_png(&path, &heatmap(&m, &labels, &[])).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(png_size(&bytes), HEATMAP_SIZE);
    let img = decode(&path);
    assert_eq!((img.width, img.height), HEATMAP_SIZE);
    // Not blank: white, black text, viridis cells, the grey of the NaN cells, the colour bar.
    let all = colours(&img, 0..img.width, 0..img.height);
    assert!(all.len() > 50, "only {} colours", all.len());
    assert!(all.contains(&viridis(1.0)) && all.contains(&viridis(0.0)) && all.contains(&slm_plot::MISSING));
    assert_eq!(names_in(dir.path()), vec!["cka.png".to_string()]);

    // Overwriting works and leaves nothing else behind.
    let mut spec = heatmap(&m, &labels, &[]);
    spec.range = (-1.0, 1.0);
    heatmap_png(&path, &spec).unwrap();
    assert_eq!(names_in(dir.path()), vec!["cka.png".to_string()]);
}

#[test]
fn heatmap_has_a_title_axis_labels_and_a_colour_bar() {
    let m = cka_like(31);
    let labels = layer_labels(31);
    let img = render_heatmap(&heatmap(&m, &labels, &[])).unwrap();
    let (w, h) = (img.width, img.height);
    // Title band: more than one colour, and dark text pixels.
    assert!(colours(&img, 0..w, 0..45).len() > 1);
    assert!(dark_pixels(&img, 0..w, 0..45) > 100, "no title text");
    // Left band (y tick labels "emb", 0, 1, ... and the rotated y description) and bottom band (x labels).
    assert!(dark_pixels(&img, 0..80, 60..h - 80) > 200, "no y-axis labels");
    assert!(dark_pixels(&img, 100..w - 150, h - 70..h) > 200, "no x-axis labels");
    // The colour bar (right of the matrix): many viridis shades, the top one yellow, with tick labels beside it.
    let right: Vec<[u8; 3]> = colours(&img, w - 200..w, 0..h).into_iter().collect();
    let bar = right.iter().filter(|c| (0..=20).any(|k| viridis(k as f64 / 20.0) == **c)).count();
    assert!(bar >= 10, "colour bar has {bar} viridis stops");
    assert!(dark_pixels(&img, w - 110..w, 60..h - 80) > 100, "no colour-bar tick labels");
}

#[test]
fn heatmap_groups_are_outlined_in_red() {
    let m = cka_like(8);
    let labels = layer_labels(8);
    let plain = render_heatmap(&heatmap(&m, &labels, &[])).unwrap();
    assert!(!plain.rgb.chunks(3).any(|p| is_red([p[0], p[1], p[2]])));
    let marked = render_heatmap(&heatmap(&m, &labels, &[(2, 4), (6, 6)])).unwrap();
    assert!(marked.rgb.chunks(3).filter(|p| is_red([p[0], p[1], p[2]])).count() > 100);
}

#[test]
fn heatmap_bad_inputs_are_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.png");
    let m = cka_like(3);
    let labels = layer_labels(3);
    let empty: Vec<Vec<f64>> = Vec::new();
    let ragged = vec![vec![1.0, 2.0], vec![3.0]];
    let not_square = vec![vec![1.0, 2.0]];
    let two = layer_labels(2);
    let no_labels: Vec<String> = Vec::new();
    let cases: Vec<Heatmap> = vec![
        heatmap(&empty, &no_labels, &[]),
        heatmap(&not_square, &labels[..1], &[]),
        heatmap(&ragged, &two, &[]),
        heatmap(&m, &two, &[]),
        heatmap(&m, &labels, &[(1, 3)]),
        heatmap(&m, &labels, &[(2, 1)]),
        Heatmap { range: (1.0, 1.0), ..heatmap(&m, &labels, &[]) },
        Heatmap { range: (0.0, f64::NAN), ..heatmap(&m, &labels, &[]) },
        Heatmap { range: (f64::NEG_INFINITY, 1.0), ..heatmap(&m, &labels, &[]) },
    ];
    for (k, spec) in cases.iter().enumerate() {
        let e = heatmap_png(&bad, spec).expect_err(&format!("case {k} should fail"));
        assert!(matches!(e, slm_plot::PlotError::InvalidInput(_)), "case {k}: {e}");
    }
    assert!(names_in(dir.path()).is_empty());
}

#[test]
fn a_failed_write_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    // The target is a non-empty directory: the rename fails after the temporary file was written.
    let target = dir.path().join("taken.png");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    let m = cka_like(2);
    let labels = layer_labels(2);
    let e = heatmap_png(&target, &heatmap(&m, &labels, &[])).unwrap_err();
    assert!(matches!(e, slm_plot::PlotError::Output { .. }), "{e}");
    assert_eq!(names_in(dir.path()), vec!["taken.png".to_string()]);
    // A malformed buffer is refused before anything is written.
    let img = Image { width: 4, height: 4, rgb: vec![0; 5] };
    assert!(write_png(&dir.path().join("x.png"), &img).is_err());
    assert_eq!(names_in(dir.path()), vec!["taken.png".to_string()]);
}

fn points() -> Vec<ScatterPoint> {
    let p = |x: f64, y: f64, label: &str, colour: [u8; 3]| ScatterPoint { x, y, label: label.into(), colour };
    vec![
        p(1235.8, 62.1, "dense", [31, 119, 180]),
        p(990.2, 55.3, "slm-dp-13", [255, 127, 14]),
        p(985.0, 54.9, "shortgpt-13", [44, 160, 44]),
        p(870.4, 49.8, "width-30", [214, 39, 40]),
    ]
}

fn scatter(points: &[ScatterPoint]) -> Scatter<'_> {
    Scatter {
        title: "Parameters vs avg-7 accuracy",
        x_desc: "parameters (millions)",
        y_desc: "avg-7 accuracy (%)",
        x_range: (808.6, 1235.8),
        y_range: (47.8, 64.1),
        points,
    }
}

#[test]
fn scatter_png_decodes_with_points_labels_and_a_title() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("params_vs_avg7.png");
    let pts = points();
    scatter_png(&path, &scatter(&pts)).unwrap();
    assert_eq!(png_size(&std::fs::read(&path).unwrap()), SCATTER_SIZE);
    let img = decode(&path);
    assert_eq!((img.width, img.height), SCATTER_SIZE);
    assert_eq!(names_in(dir.path()), vec!["params_vs_avg7.png".to_string()]);
    let (w, h) = (img.width, img.height);
    assert!(colours(&img, 0..w, 0..40).len() > 1, "title band is one colour");
    assert!(dark_pixels(&img, 0..w, 0..40) > 100, "no title text");
    assert!(dark_pixels(&img, 0..80, 50..h - 60) > 200, "no y-axis labels");
    assert!(dark_pixels(&img, 80..w, h - 60..h) > 200, "no x-axis labels");
    let all = colours(&img, 0..w, 0..h);
    for p in &pts {
        assert!(all.contains(&p.colour), "point {} not drawn", p.label);
    }
    // Labels: text inside the plotting area, beyond what the grid and axes alone give.
    let no_labels: Vec<ScatterPoint> = pts.iter().map(|p| ScatterPoint { label: String::new(), ..p.clone() }).collect();
    let bare = render_scatter(&scatter(&no_labels)).unwrap();
    let inner = |img: &Image| dark_pixels(img, 90..w - 30, 50..h - 70);
    assert!(inner(&img) > inner(&bare) + 200, "point labels missing");
}

#[test]
fn scatter_bad_inputs_are_errors() {
    let pts = points();
    assert!(render_scatter(&Scatter { x_range: (1.0, 1.0), ..scatter(&pts) }).is_err());
    assert!(render_scatter(&Scatter { y_range: (0.0, f64::INFINITY), ..scatter(&pts) }).is_err());
    assert!(render_scatter(&Scatter { x_range: (900.0, 1235.8), ..scatter(&pts) }).is_err(), "point outside");
    let mut nan = points();
    nan[0].y = f64::NAN;
    assert!(render_scatter(&scatter(&nan)).is_err());
    // No points is a valid, empty plot.
    assert!(render_scatter(&scatter(&[])).is_ok());
}

#[test]
fn viridis_endpoints() {
    assert_eq!(viridis(0.0), [68, 1, 84]);
    assert_eq!(viridis(1.0), [253, 231, 37]);
    assert_eq!(viridis(-3.0), viridis(0.0));
    assert_eq!(viridis(7.0), viridis(1.0));
    assert_eq!(viridis(f64::NAN), viridis(0.0));
}

#[test]
fn layer_labels_start_with_the_embeddings() {
    assert_eq!(layer_labels(4), vec!["emb", "0", "1", "2"]);
    assert!(layer_labels(0).is_empty());
}
