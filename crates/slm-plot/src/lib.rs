//! The PNG plots of slm, in one place: heat maps of layer×layer matrices with a colour bar ([`heatmap_png`]) and
//! scatter plots with a label beside every point ([`scatter_png`]).
//!
//! Text is drawn with DejaVu Sans, which the crate ships (`fonts/DejaVuSans.ttf`, licence beside it) and
//! compiles in with `include_bytes!`: nothing is read from the system at run time, and the build stays pure Rust
//! (plotters' `ab_glyph` feature, no font-kit or fontconfig).
//!
//! Every picture is rendered into memory first ([`render_heatmap`], [`render_scatter`], handy for tests) and
//! then written atomically ([`write_png`]): a temporary file in the target's directory, renamed into place; a
//! failure removes the temporary file.

mod typeset;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ab_glyph::FontRef;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

use crate::typeset::Typeset;

/// The font every text of a plot uses, compiled in.
static FONT_TTF: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");
/// The family name [`FONT_TTF`] is registered under.
const FAMILY: &str = "sans-serif";

/// Pixel size `(width, height)` of every heat map.
pub const HEATMAP_SIZE: (u32, u32) = (800, 700);
/// Pixel size `(width, height)` of every scatter plot.
pub const SCATTER_SIZE: (u32, u32) = (800, 560);

/// Colour of a non-finite heat-map cell.
pub const MISSING: [u8; 3] = [128, 128, 128];
/// Colour of the outlines of [`Heatmap::groups`].
const OUTLINE: RGBColor = RGBColor(230, 30, 30);

const TITLE_PX: f64 = 22.0;
const DESC_PX: f64 = 17.0;
const TICK_PX: f64 = 15.0;
const POINT_LABEL_PX: f64 = 15.0;
const TICK_MARK_PX: i32 = 5;
/// Tick steps tried, smallest first, when not every matrix index can be labelled.
const TICK_STEPS: [usize; 10] = [1, 2, 4, 5, 10, 20, 25, 50, 100, 200];

/// Everything that can go wrong while drawing or writing a plot.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Inputs that cannot be drawn (empty or non-square matrix, empty or non-finite range, bad group).
    #[error("invalid plot input: {0}")]
    InvalidInput(String),

    /// Rendering or writing the PNG failed.
    #[error("{path}: {message}")]
    Output { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, PlotError>;

/// An RGB picture in memory: `width·height·3` bytes, row-major, top row first.
#[derive(Debug, Clone)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl Image {
    /// The colour of pixel `(x, y)`.
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let o = (y as usize * self.width as usize + x as usize) * 3;
        [self.rgb[o], self.rgb[o + 1], self.rgb[o + 2]]
    }
}

/// A square matrix drawn as a heat map (row 0 at the top, column 0 at the left), with a colour bar.
#[derive(Debug, Clone, Copy)]
pub struct Heatmap<'a> {
    pub title: &'a str,
    /// Square, at least 1×1. Non-finite cells are drawn grey ([`MISSING`]).
    pub matrix: &'a [Vec<f64>],
    /// `(lo, hi)`: values mapped linearly onto viridis (dark = `lo`, yellow = `hi`), values outside clamped.
    pub range: (f64, f64),
    /// One label per row/column (both axes), e.g. [`layer_labels`]. Where they do not all fit, index 0 and
    /// every `k`-th index counted from 1 are labelled (with layer labels: "emb", k, 2k, ...).
    pub labels: &'a [String],
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    /// What the colour bar measures (e.g. "linear CKA").
    pub colorbar_label: &'a str,
    /// Diagonal blocks `[a, b]` (matrix indices, inclusive) outlined in red, e.g. the windows a plan merges.
    pub groups: &'a [(usize, usize)],
}

/// One point of a [`Scatter`], drawn as a disc of `colour` with `label` beside it.
#[derive(Debug, Clone)]
pub struct ScatterPoint {
    pub x: f64,
    pub y: f64,
    pub label: String,
    pub colour: [u8; 3],
}

/// A scatter plot with a label beside every point (no legend needed).
#[derive(Debug, Clone, Copy)]
pub struct Scatter<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    /// Axis ranges `(lo, hi)`, finite with `hi > lo`; points outside are errors.
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
    pub points: &'a [ScatterPoint],
}

/// Axis labels of a matrix over `n` hidden states: index 0 is the embeddings ("emb"), index `i + 1` is the
/// output of layer `i` ("0", "1", ...).
pub fn layer_labels(n: usize) -> Vec<String> {
    (0..n).map(|i| if i == 0 { "emb".to_string() } else { (i - 1).to_string() }).collect()
}

/// Viridis sampled at 0, 1/8, ..., 1 (matplotlib's table); linear interpolation between the stops.
const VIRIDIS: [[f64; 3]; 9] = [
    [68.0, 1.0, 84.0],
    [71.0, 44.0, 122.0],
    [59.0, 81.0, 139.0],
    [44.0, 113.0, 142.0],
    [33.0, 144.0, 141.0],
    [39.0, 173.0, 129.0],
    [92.0, 200.0, 99.0],
    [170.0, 220.0, 50.0],
    [253.0, 231.0, 37.0],
];

/// The viridis colour of `t` in `[0, 1]` (clamped; non-finite: 0).
pub fn viridis(t: f64) -> [u8; 3] {
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let x = t * (VIRIDIS.len() - 1) as f64;
    let k = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - k as f64;
    let (a, b) = (VIRIDIS[k], VIRIDIS[k + 1]);
    [0, 1, 2].map(|c| (a[c] + f * (b[c] - a[c])).round() as u8)
}

/// The shipped font, parsed and registered with plotters once (text styles name its family; [`Typeset`] draws
/// the text); an error if it could not be parsed.
fn shipped_font() -> Result<FontRef<'static>> {
    static FONT: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    let font = FONT.get_or_init(|| {
        let registered = register_font(FAMILY, FontStyle::Normal, FONT_TTF).is_ok();
        FontRef::try_from_slice(FONT_TTF).ok().filter(|_| registered)
    });
    font.clone().ok_or_else(|| PlotError::InvalidInput("the shipped font cannot be parsed".into()))
}

/// The drawing area every plot draws on: an RGB buffer, text by [`Typeset`].
type Area<'a> = DrawingArea<Typeset<BitMapBackend<'a>>, Shift>;

fn font(px: f64) -> TextStyle<'static> {
    (FAMILY, px).into_font().color(&BLACK)
}

fn rgb(c: [u8; 3]) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

fn check_range(what: &str, (lo, hi): (f64, f64)) -> Result<()> {
    if lo.is_finite() && hi.is_finite() && hi > lo {
        Ok(())
    } else {
        Err(PlotError::InvalidInput(format!("{what} [{lo}, {hi}] is empty or not finite")))
    }
}

/// Decimals that tell apart ticks about `(hi - lo) / 5` apart.
fn decimals(lo: f64, hi: f64) -> usize {
    let step = (hi - lo) / 5.0;
    (-step.log10().floor()).clamp(0.0, 6.0) as usize
}

/// A drawing error as a message (plotters' errors borrow the backend's type).
fn draw_err<E: std::fmt::Display>(e: E) -> PlotError {
    PlotError::InvalidInput(format!("cannot draw: {e}"))
}

/// Renders `spec` into memory, [`HEATMAP_SIZE`] pixels.
pub fn render_heatmap(spec: &Heatmap) -> Result<Image> {
    let m = spec.matrix;
    let n = m.len();
    if n == 0 {
        return Err(PlotError::InvalidInput("cannot draw an empty matrix".into()));
    }
    if let Some((i, r)) = m.iter().enumerate().find(|(_, r)| r.len() != n) {
        return Err(PlotError::InvalidInput(format!("row {i} has {} entries in a {n}×{n} matrix", r.len())));
    }
    if spec.labels.len() != n {
        return Err(PlotError::InvalidInput(format!("{} axis labels for a {n}×{n} matrix", spec.labels.len())));
    }
    check_range("heat map range", spec.range)?;
    if let Some(&(a, b)) = spec.groups.iter().find(|&&(a, b)| a > b || b >= n) {
        return Err(PlotError::InvalidInput(format!("group [{a}, {b}] is outside the {n}×{n} heat map")));
    }
    let font_ref = shipped_font()?;
    let (w, h) = HEATMAP_SIZE;
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = Typeset::new(BitMapBackend::with_buffer(&mut buf, (w, h)), font_ref).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        draw_heatmap(&root, spec).map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(Image { width: w, height: h, rgb: buf })
}

/// A linear axis over `range` whose ticks are exactly `ticks` (labelled by the mesh's formatter).
struct Ticks {
    range: std::ops::Range<f64>,
    ticks: Vec<f64>,
}

impl Ranged for Ticks {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let t = (value - self.range.start) / (self.range.end - self.range.start);
        limit.0 + (t * (limit.1 - limit.0) as f64).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        self.ticks.clone()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.range.clone()
    }
}

type DrawResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The largest font size up to `px` at which `text` is at most `max_w` pixels wide (at least 10).
fn fitting_font(area: &Area, text: &str, px: f64, max_w: u32) -> DrawResult<f64> {
    let mut size = px;
    while size > 10.0 && area.estimate_text_size(text, &font(size))?.0 > max_w {
        size -= 1.0;
    }
    Ok(size)
}

/// Draws the title centred in the top band of `root`.
fn draw_title(root: &Area, title: &str) -> DrawResult<()> {
    let (w, _) = root.dim_in_pixel();
    let size = fitting_font(root, title, TITLE_PX, w.saturating_sub(24))?;
    let style = font(size).pos(Pos::new(HPos::Center, VPos::Top));
    root.draw(&Text::new(title.to_string(), ((w / 2) as i32, 14), style))?;
    Ok(())
}

fn draw_heatmap(root: &Area, spec: &Heatmap) -> DrawResult<()> {
    let m = spec.matrix;
    let n = m.len();
    let (lo, hi) = spec.range;
    let (w, h) = root.dim_in_pixel();
    draw_title(root, spec.title)?;

    // Layout in pixels: title band, then [y desc + tick labels | matrix | gap | bar | bar ticks + desc].
    let (top, bottom, left, gap, bar_w, right) = (52u32, 62u32, 70u32, 28u32, 22u32, 80u32);
    let avail_h = h - top - bottom - 8;
    let avail_w = w - left - gap - bar_w - right - 16;
    let cell = (avail_h.min(avail_w) / n as u32).max(1);
    let side = cell * n as u32;
    let x0 = w.saturating_sub(left + side + gap + bar_w + right) / 2 + left;
    let y0 = top + (avail_h - side.min(avail_h)) / 2;

    // Tick labels: every index if they fit, else index 0 and every k-th counted from 1.
    let tick_style = font(TICK_PX);
    let mut label_w = 0;
    for l in spec.labels {
        label_w = label_w.max(root.estimate_text_size(l, &tick_style)?.0);
    }
    let label_h = root.estimate_text_size("0", &tick_style)?.1;
    let ticks = |min_gap: u32| -> Vec<usize> {
        let need = min_gap.div_ceil(cell) as usize;
        let k = TICK_STEPS.iter().copied().find(|&k| k >= need).unwrap_or(need);
        (0..n).filter(|&i| i == 0 || (k == 1 || i > k) && (i - 1) % k == 0).collect()
    };
    let x_ticks: Vec<f64> = ticks(label_w + 6).iter().map(|&i| i as f64 + 0.5).collect();
    let y_ticks: Vec<f64> = ticks(label_h + 3).iter().map(|&i| (n - 1 - i) as f64 + 0.5).collect();
    let label_of = |v: f64| -> String {
        let i = (v - 0.5).round();
        if i >= 0.0 && (i as usize) < n {
            spec.labels[i as usize].clone()
        } else {
            String::new()
        }
    };

    let area = root.clone().shrink((x0 - left, y0), (left + side, side + bottom));
    let nf = n as f64;
    let mut chart = ChartBuilder::on(&area)
        .x_label_area_size(bottom)
        .y_label_area_size(left)
        .build_cartesian_2d(Ticks { range: 0.0..nf, ticks: x_ticks }, Ticks { range: 0.0..nf, ticks: y_ticks })?;
    let x_fmt = |v: &f64| label_of(*v);
    // Row i spans y in [n - i - 1, n - i] (row 0 at the top).
    let y_fmt = |v: &f64| label_of(nf - *v);
    chart
        .configure_mesh()
        .disable_mesh()
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .set_all_tick_mark_size(TICK_MARK_PX)
        .label_style(tick_style.clone())
        .axis_desc_style(font(DESC_PX))
        .x_desc(spec.x_desc)
        .y_desc(spec.y_desc)
        .draw()?;
    let cells = m.iter().enumerate().flat_map(|(i, row)| {
        row.iter().enumerate().map(move |(j, &v)| {
            let c = if v.is_finite() { viridis((v - lo) / (hi - lo)) } else { MISSING };
            let y = nf - i as f64;
            Rectangle::new([(j as f64, y - 1.0), (j as f64 + 1.0, y)], rgb(c).filled())
        })
    });
    chart.draw_series(cells)?;
    let outline = OUTLINE.stroke_width(if cell >= 8 { 3 } else { 2 });
    chart.draw_series(
        spec.groups
            .iter()
            .map(|&(a, b)| Rectangle::new([(a as f64, nf - b as f64 - 1.0), (b as f64 + 1.0, nf - a as f64)], outline)),
    )?;

    // Colour bar: same height as the matrix, `hi` at the top, tick values on its right.
    let bar_area = root.clone().shrink((x0 + side + gap, y0), (bar_w + right, side));
    let mut bar = ChartBuilder::on(&bar_area)
        .set_label_area_size(LabelAreaPosition::Right, right)
        .build_cartesian_2d(0.0..1.0, lo..hi)?;
    let digits = decimals(lo, hi);
    let bar_fmt = |v: &f64| format!("{v:.digits$}");
    bar.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(6)
        .y_label_formatter(&bar_fmt)
        .set_all_tick_mark_size(TICK_MARK_PX)
        .label_style(tick_style)
        .axis_desc_style(font(DESC_PX))
        .y_desc(spec.colorbar_label)
        .draw()?;
    let steps = side.max(2) as usize;
    bar.draw_series((0..steps).map(|k| {
        let (a, b) = (k as f64 / steps as f64, (k + 1) as f64 / steps as f64);
        let c = viridis((a + b) / 2.0);
        Rectangle::new([(0.0, lo + a * (hi - lo)), (1.0, lo + b * (hi - lo))], rgb(c).filled())
    }))?;
    bar.draw_series(std::iter::once(Rectangle::new([(0.0, lo), (1.0, hi)], BLACK.stroke_width(1))))?;
    Ok(())
}

/// Renders `spec` into memory, [`SCATTER_SIZE`] pixels.
pub fn render_scatter(spec: &Scatter) -> Result<Image> {
    check_range("x range", spec.x_range)?;
    check_range("y range", spec.y_range)?;
    let inside = |v: f64, (lo, hi): (f64, f64)| v.is_finite() && v >= lo && v <= hi;
    if let Some(p) = spec.points.iter().find(|p| !inside(p.x, spec.x_range) || !inside(p.y, spec.y_range)) {
        return Err(PlotError::InvalidInput(format!(
            "point {:?} at ({}, {}) is outside the plot ({:?} × {:?})",
            p.label, p.x, p.y, spec.x_range, spec.y_range
        )));
    }
    let font_ref = shipped_font()?;
    let (w, h) = SCATTER_SIZE;
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = Typeset::new(BitMapBackend::with_buffer(&mut buf, (w, h)), font_ref).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        draw_scatter(&root, spec).map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(Image { width: w, height: h, rgb: buf })
}

/// Pixel box `(x0, y0, x1, y1)`.
type PxBox = (i32, i32, i32, i32);

fn overlap(a: PxBox, b: PxBox) -> i64 {
    let w = (a.2.min(b.2) - a.0.max(b.0)).max(0) as i64;
    let h = (a.3.min(b.3) - a.1.max(b.1)).max(0) as i64;
    w * h
}

fn draw_scatter(root: &Area, spec: &Scatter) -> DrawResult<()> {
    draw_title(root, spec.title)?;
    let (w, h) = root.dim_in_pixel();
    let area = root.clone().shrink((0, 48), (w, h - 48));
    let ((x_lo, x_hi), (y_lo, y_hi)) = (spec.x_range, spec.y_range);
    let mut chart = ChartBuilder::on(&area)
        .margin_right(28)
        .margin_left(8)
        .margin_bottom(8)
        .x_label_area_size(58)
        .y_label_area_size(66)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
    let (dx, dy) = (decimals(x_lo, x_hi), decimals(y_lo, y_hi));
    let x_fmt = |v: &f64| format!("{v:.dx$}");
    let y_fmt = |v: &f64| format!("{v:.dy$}");
    chart
        .configure_mesh()
        .x_labels(8)
        .y_labels(8)
        .max_light_lines(0)
        .bold_line_style(RGBColor(225, 225, 225))
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .set_all_tick_mark_size(TICK_MARK_PX)
        .label_style(font(TICK_PX))
        .axis_desc_style(font(DESC_PX))
        .x_desc(spec.x_desc)
        .y_desc(spec.y_desc)
        .draw()?;
    let radius = 6;
    chart.draw_series(spec.points.iter().map(|p| Circle::new((p.x, p.y), radius, rgb(p.colour).filled())))?;
    chart.draw_series(spec.points.iter().map(|p| Circle::new((p.x, p.y), radius, BLACK.stroke_width(1))))?;

    // Labels beside their points: the first candidate position that stays inside the plotting area and clear of
    // every point and every label placed so far (else the one overlapping least).
    let (px_range, py_range) = chart.plotting_area().get_pixel_range();
    let bounds: PxBox = (px_range.start, py_range.start, px_range.end, py_range.end);
    let centres: Vec<(i32, i32)> = spec.points.iter().map(|p| chart.backend_coord(&(p.x, p.y))).collect();
    let mut taken: Vec<PxBox> =
        centres.iter().map(|&(x, y)| (x - radius, y - radius, x + radius, y + radius)).collect();
    let style = font(POINT_LABEL_PX);
    for (p, &(cx, cy)) in spec.points.iter().zip(&centres) {
        let (tw, th) = root.estimate_text_size(&p.label, &style)?;
        let (tw, th) = (tw as i32, th as i32);
        let d = radius + 5;
        let mut candidates = Vec::new();
        for shift in [0, -1, 1, -2, 2, -3, 3] {
            let sy = shift * (th + 2);
            candidates.push((cx + d, cy - th / 2 + sy));
            candidates.push((cx - d - tw, cy - th / 2 + sy));
            candidates.push((cx - tw / 2, cy - d - th + sy.min(0)));
            candidates.push((cx - tw / 2, cy + d + sy.max(0)));
        }
        let cost = |&(x, y): &(i32, i32)| -> i64 {
            let b = (x - 1, y - 1, x + tw + 1, y + th + 1);
            let outside = (b.2 - b.0) as i64 * (b.3 - b.1) as i64 - overlap(b, bounds);
            10 * outside + taken.iter().map(|&t| overlap(b, t)).sum::<i64>()
        };
        let best =
            candidates.iter().copied().find(|c| cost(c) == 0).or_else(|| candidates.iter().copied().min_by_key(cost));
        let (x, y) = best.unwrap_or((cx + d, cy - th / 2));
        root.draw(&Text::new(p.label.clone(), (x, y), style.clone()))?;
        taken.push((x - 1, y - 1, x + tw + 1, y + th + 1));
    }
    Ok(())
}

/// [`render_heatmap`], written to `path` atomically.
pub fn heatmap_png(path: &Path, spec: &Heatmap) -> Result<()> {
    write_png(path, &render_heatmap(spec)?)
}

/// [`render_scatter`], written to `path` atomically.
pub fn scatter_png(path: &Path, spec: &Scatter) -> Result<()> {
    write_png(path, &render_scatter(spec)?)
}

/// Writes `image` as a PNG, atomically: encoded into a temporary file beside `path` (creating the directory if
/// needed), then renamed; on failure the temporary file is removed.
pub fn write_png(path: &Path, image: &Image) -> Result<()> {
    let out_err = |message: String| PlotError::Output { path: path.to_path_buf(), message };
    let (w, h) = (image.width, image.height);
    if w == 0 || h == 0 || image.rgb.len() != (w as usize) * (h as usize) * 3 {
        return Err(out_err(format!("{} bytes for a {w}×{h} RGB image", image.rgb.len())));
    }
    let tmp = temp_path(path);
    let result = encode_png(&tmp, (w, h), &image.rgb).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| format!("cannot move {} into place: {e}", tmp.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(out_err)
}

/// A temporary name beside `path`, still ending in `.png` (the encoder picks the format from the extension),
/// unique within the process.
fn temp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let k = NEXT.fetch_add(1, Ordering::Relaxed);
    parent.join(format!(".{name}.tmp-{}-{k}.png", std::process::id()))
}

fn encode_png(path: &Path, (w, h): (u32, u32), rgb: &[u8]) -> std::result::Result<(), String> {
    use plotters::backend::DrawingBackend;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let mut backend = BitMapBackend::new(path, (w, h));
    backend.blit_bitmap((0, 0), (w, h), rgb).map_err(|e| format!("cannot draw: {e}"))?;
    backend.present().map_err(|e| format!("cannot write PNG: {e}"))
}
