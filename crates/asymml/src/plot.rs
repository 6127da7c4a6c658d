//! PNG plots for training reports and benchmarks.
//!
//! Everything is drawn with the `plotters` bitmap backend and a bundled font
//! (DejaVu Sans, see `assets/DejaVuSans-LICENSE`), so no system font libraries
//! are needed. All functions validate their input and return [`PlotError`]
//! instead of panicking.

use std::error::Error as StdError;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use std::ops::Range;

use plotters::coord::ranged1d::{
    AsRangedCoord, KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter,
};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

/// Font family name the bundled font is registered under.
pub(crate) const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Size of the PNG written by [`training_curves`].
pub(crate) const TRAINING_CURVES_SIZE: (u32, u32) = (1200, 500);
/// Size of the PNG written by [`line_plot`].
pub(crate) const LINE_PLOT_SIZE: (u32, u32) = (1000, 600);
/// Height of the PNG written by [`stacked_bars`]; its width is [`stacked_bars_width`].
pub(crate) const STACKED_BARS_HEIGHT: u32 = 650;

/// Colour cycle (matplotlib's "tab10").
pub(crate) const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

const GRID_LIGHT: RGBColor = RGBColor(238, 238, 238);
const GRID_BOLD: RGBColor = RGBColor(215, 215, 215);

/// Errors from the plotting functions.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PlotError {
    /// The data cannot be plotted (empty, mismatched lengths, nothing finite, ...).
    #[error("invalid plot input: {0}")]
    InvalidInput(String),
    /// The bundled font could not be registered with plotters.
    #[error("the bundled plot font could not be loaded")]
    Font,
    /// Drawing or writing the PNG failed.
    #[error("drawing {}: {message}", path.display())]
    Drawing { path: PathBuf, message: String },
}

/// One epoch of a training run. Accuracies are fractions in `[0, 1]`; they are
/// plotted in percent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct EpochPoint {
    pub(crate) epoch: usize,
    pub(crate) train_loss: f64,
    pub(crate) train_acc: f64,
    pub(crate) test_loss: f64,
    pub(crate) test_acc: f64,
}

pub(crate) type DrawResult = Result<(), Box<dyn StdError>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Registers the bundled font (once) under [`FONT`].
pub(crate) fn ensure_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok());
    if ok {
        Ok(())
    } else {
        Err(PlotError::Font)
    }
}

/// Runs a drawing closure, turning both drawing errors and (defensively) any
/// panic inside plotters into [`PlotError::Drawing`].
pub(crate) fn render(path: &Path, draw: impl FnOnce() -> DrawResult) -> Result<(), PlotError> {
    ensure_font()?;
    let drawing = |message: String| PlotError::Drawing {
        path: path.to_path_buf(),
        message,
    };
    match catch_unwind(AssertUnwindSafe(draw)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(drawing(e.to_string())),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(drawing(format!("plotting backend panicked: {msg}")))
        }
    }
}

/// Marker shape drawn at every data point.
#[derive(Clone, Copy)]
enum Marker {
    Circle,
    Triangle,
    Square,
    Cross,
}

const MARKERS: [Marker; 4] = [
    Marker::Circle,
    Marker::Triangle,
    Marker::Square,
    Marker::Cross,
];

struct Series<'a> {
    label: &'a str,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    marker: Marker,
}

#[derive(Clone, Copy)]
struct Axes<'a> {
    caption: Option<&'a str>,
    x_label: &'a str,
    y_label: &'a str,
    log_y: bool,
    /// Label only integer x values (epochs).
    integer_x: bool,
    /// Hard limits the padded y range is clamped to.
    y_limits: (Option<f64>, Option<f64>),
}

/// Largest axis bound handed to plotters (its tick computations misbehave
/// near `f64::MAX`); data beyond it is clipped by the plot area.
const AXIS_LIMIT: f64 = 1e300;

/// Finite and within `±AXIS_LIMIT`; other values are skipped or rejected.
fn plottable(v: f64) -> bool {
    v.is_finite() && v.abs() <= AXIS_LIMIT
}

/// `[lo, hi]` expanded by `frac` of its span on both sides; a degenerate
/// range is widened so plotters gets a non-empty axis. The result stays
/// within `±AXIS_LIMIT`.
fn padded(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    padded_by(lo, hi, frac, frac)
}

/// [`padded`] with a different fraction below (`frac_lo`) and above (`frac_hi`).
pub(crate) fn padded_by(lo: f64, hi: f64, frac_lo: f64, frac_hi: f64) -> (f64, f64) {
    let lo = lo.clamp(-AXIS_LIMIT, AXIS_LIMIT);
    let hi = hi.clamp(-AXIS_LIMIT, AXIS_LIMIT);
    let span = hi - lo;
    let (a, b) = if span > 0.0 {
        (lo - span * frac_lo, hi + span * frac_hi)
    } else {
        let d = if lo.abs() > 1e-12 {
            lo.abs() * 0.1
        } else {
            1.0
        };
        (lo - d, hi + d)
    };
    (a.max(-AXIS_LIMIT), b.min(AXIS_LIMIT))
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// Compact tick label: plain decimals for moderate magnitudes, otherwise
/// scientific notation.
fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".to_string()
    } else if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.1e}");
        s.replace(".0e", "e")
    } else {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" {
            "0".to_string()
        } else {
            s.to_string()
        }
    }
}

fn fmt_integer_tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-6 {
        format!("{}", v.round() as i64)
    } else {
        String::new()
    }
}

/// Picks the legend corner that covers the fewest data points (lines are
/// sampled between points too). Coordinates are normalised to `[0, 1]`.
fn legend_corner(
    series: &[&[(f64, f64)]],
    norm: impl Fn((f64, f64)) -> (f64, f64),
    n_entries: usize,
    width_frac: f64,
) -> SeriesLabelPosition {
    let h = (0.07 * n_entries as f64 + 0.06).min(0.95);
    let w = width_frac.clamp(0.15, 0.95);
    let candidates = [
        (
            SeriesLabelPosition::UpperRight,
            (1.0 - w, 1.0),
            (1.0 - h, 1.0),
        ),
        (SeriesLabelPosition::LowerRight, (1.0 - w, 1.0), (0.0, h)),
        (SeriesLabelPosition::UpperLeft, (0.0, w), (1.0 - h, 1.0)),
        (SeriesLabelPosition::LowerLeft, (0.0, w), (0.0, h)),
        (
            SeriesLabelPosition::UpperMiddle,
            (0.5 - w / 2.0, 0.5 + w / 2.0),
            (1.0 - h, 1.0),
        ),
        (
            SeriesLabelPosition::LowerMiddle,
            (0.5 - w / 2.0, 0.5 + w / 2.0),
            (0.0, h),
        ),
    ];
    let mut samples = Vec::new();
    for s in series {
        let pts: Vec<(f64, f64)> = s.iter().map(|&p| norm(p)).collect();
        samples.extend_from_slice(&pts);
        for pair in pts.windows(2) {
            let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
            for k in 1..16 {
                let t = k as f64 / 16.0;
                samples.push((x0 + (x1 - x0) * t, y0 + (y1 - y0) * t));
            }
        }
    }
    let mut best = (usize::MAX, SeriesLabelPosition::UpperRight);
    for (pos, (xa, xb), (ya, yb)) in candidates {
        let count = samples
            .iter()
            .filter(|&&(x, y)| x >= xa && x <= xb && y >= ya && y <= yb)
            .count();
        if count < best.0 {
            best = (count, pos);
        }
    }
    best.1
}

/// Draws one line chart with markers into `area`.
fn draw_lines_panel(area: &Area<'_>, axes: Axes<'_>, series: &[Series<'_>]) -> DrawResult {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    // Callers guarantee at least one finite point (positive when log_y).
    let (x_lo, x_hi) = min_max(xs).ok_or("no data")?;
    let (y_lo, y_hi) = min_max(ys).ok_or("no data")?;

    let x_range = if axes.integer_x {
        let pad = ((x_hi - x_lo) * 0.03).max(0.5);
        (x_lo - pad, x_hi + pad)
    } else {
        padded(x_lo, x_hi, 0.03)
    };
    let legend_w = series
        .iter()
        .map(|s| s.label.chars().count())
        .max()
        .unwrap_or(0) as f64
        * 8.5
        + 60.0;
    let area_w = f64::from(area.dim_in_pixel().0.max(1));
    let legend_w_frac = legend_w / (area_w - 90.0).max(1.0);
    let raw: Vec<&[(f64, f64)]> = series.iter().map(|s| s.points.as_slice()).collect();

    if axes.log_y {
        let (l_lo, l_hi) = padded(y_lo.log10(), y_hi.log10(), 0.05);
        // plotters' log ticks need hi/lo to be finite: keep the axis within
        // 1e-300..1e300 and at most 300 decades (the top decades win).
        let l_hi = l_hi.clamp(-299.0, 300.0);
        let l_lo = l_lo.max(-300.0).max(l_hi - 300.0);
        let y_range = (10f64.powf(l_lo), 10f64.powf(l_hi));
        let norm = |(x, y): (f64, f64)| {
            (
                (x - x_range.0) / (x_range.1 - x_range.0),
                (y.log10() - l_lo) / (l_hi - l_lo),
            )
        };
        let corner = legend_corner(&raw, norm, series.len(), legend_w_frac);
        let y_coord = (y_range.0..y_range.1).log_scale();
        fill_chart(area, axes, series, x_range, y_coord, corner)
    } else {
        let (mut lo, mut hi) = padded(y_lo, y_hi, 0.06);
        if let Some(l) = axes.y_limits.0 {
            lo = lo.max(l.min(y_lo));
        }
        if let Some(h) = axes.y_limits.1 {
            hi = hi.min(h.max(y_hi));
        }
        if hi <= lo {
            (lo, hi) = padded(lo, lo, 0.0);
        }
        let norm = |(x, y): (f64, f64)| {
            (
                (x - x_range.0) / (x_range.1 - x_range.0),
                (y - lo) / (hi - lo),
            )
        };
        let corner = legend_corner(&raw, norm, series.len(), legend_w_frac);
        fill_chart(area, axes, series, x_range, lo..hi, corner)
    }
}

/// Draws a line + marker series; the marker is positioned in data
/// coordinates, its shape in pixels.
macro_rules! draw_marked {
    ($chart:expr, $pts:expr, $label:expr, $color:expr, |$c:ident| $shape:expr) => {{
        let $c: RGBColor = $color;
        $chart
            .draw_series(LineSeries::new($pts.iter().copied(), $c.stroke_width(2)))?
            .label($label)
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(-8, 0), (16, 0)], $c.stroke_width(2))
                    + $shape
            });
        $chart.draw_series($pts.iter().map(|&p| EmptyElement::at(p) + $shape))?;
    }};
}

fn fill_chart<Y>(
    area: &Area<'_>,
    axes: Axes<'_>,
    series: &[Series<'_>],
    x_range: (f64, f64),
    y_coord: Y,
    legend_pos: SeriesLabelPosition,
) -> DrawResult
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let mut builder = ChartBuilder::on(area);
    builder
        .margin(12)
        .margin_right(24)
        .x_label_area_size(48)
        .y_label_area_size(78);
    if let Some(caption) = axes.caption {
        builder.caption(caption, (FONT, 20));
    }
    let mut chart = builder.build_cartesian_2d(x_range.0..x_range.1, y_coord)?;

    let int_fmt = |v: &f64| fmt_integer_tick(*v);
    let num_fmt = |v: &f64| fmt_tick(*v);
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(axes.x_label)
        .y_desc(axes.y_label)
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .light_line_style(GRID_LIGHT)
        .bold_line_style(GRID_BOLD)
        .y_label_formatter(&num_fmt)
        .x_labels(12)
        .y_labels(10);
    if axes.integer_x {
        mesh.x_label_formatter(&int_fmt);
    } else {
        mesh.x_label_formatter(&num_fmt);
    }
    mesh.draw()?;

    for s in series {
        draw_series(&mut chart, s)?;
    }

    chart
        .configure_series_labels()
        .position(legend_pos)
        .margin(10)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(GRID_BOLD)
        .draw()?;
    Ok(())
}

/// One line + marker series of a line chart.
fn draw_series<'a, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    s: &Series<'_>,
) -> DrawResult {
    let pts = &s.points;
    match s.marker {
        Marker::Circle => {
            draw_marked!(chart, pts, s.label, s.color, |c| Circle::new(
                (0, 0),
                4,
                c.filled()
            ))
        }
        Marker::Triangle => {
            draw_marked!(chart, pts, s.label, s.color, |c| TriangleMarker::new(
                (0, 0),
                5,
                c.filled()
            ))
        }
        Marker::Square => {
            draw_marked!(chart, pts, s.label, s.color, |c| Rectangle::new(
                [(-4, -4), (4, 4)],
                c.filled()
            ))
        }
        Marker::Cross => {
            draw_marked!(chart, pts, s.label, s.color, |c| Cross::new(
                (0, 0),
                4,
                c.stroke_width(2)
            ))
        }
    }
    Ok(())
}

/// The "train" and "test" series of a training-curves panel: `f` gives both values of an epoch;
/// non-plottable values are left out.
fn train_test_series(
    points: &[EpochPoint],
    f: impl Fn(&EpochPoint) -> (f64, f64),
) -> [Series<'static>; 2] {
    let collect = |test: bool| -> Vec<(f64, f64)> {
        points
            .iter()
            .map(|p| {
                let (train, test_v) = f(p);
                (p.epoch as f64, if test { test_v } else { train })
            })
            .filter(|p| plottable(p.1))
            .collect()
    };
    [
        Series {
            label: "train",
            points: collect(false),
            color: PALETTE[0],
            marker: Marker::Circle,
        },
        Series {
            label: "test",
            points: collect(true),
            color: PALETTE[1],
            marker: Marker::Triangle,
        },
    ]
}

/// Training and test loss (left panel) and accuracy in percent (right panel)
/// against epoch, as a 1200×500 PNG ([`TRAINING_CURVES_SIZE`]).
///
/// Non-finite values (and magnitudes above 1e300) are skipped; at least one finite loss and one finite
/// accuracy are required.
pub(crate) fn training_curves(
    path: &Path,
    points: &[EpochPoint],
    title: &str,
) -> Result<(), PlotError> {
    if points.is_empty() {
        return Err(PlotError::InvalidInput(
            "training_curves: no epoch points".into(),
        ));
    }
    let loss = train_test_series(points, |p| (p.train_loss, p.test_loss));
    let acc = train_test_series(points, |p| (p.train_acc * 100.0, p.test_acc * 100.0));
    for (what, s) in [("loss", &loss), ("accuracy", &acc)] {
        if s.iter().all(|s| s.points.is_empty()) {
            return Err(PlotError::InvalidInput(format!(
                "training_curves: no finite {what} values"
            )));
        }
    }
    let loss_min = loss
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(f64::INFINITY, f64::min);

    render(path, || {
        let root = BitMapBackend::new(path, TRAINING_CURVES_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let body = root.titled(title, (FONT, 24))?;
        let half = body.dim_in_pixel().0 / 2;
        let (left, right) = body.split_horizontally(half);
        let loss_axes = Axes {
            caption: Some("Loss"),
            x_label: "epoch",
            y_label: "loss",
            log_y: false,
            integer_x: true,
            y_limits: (if loss_min >= 0.0 { Some(0.0) } else { None }, None),
        };
        draw_lines_panel(&left, loss_axes, &loss)?;
        let acc_axes = Axes {
            caption: Some("Accuracy"),
            y_label: "accuracy (%)",
            y_limits: (Some(0.0), Some(100.0)),
            ..loss_axes
        };
        draw_lines_panel(&right, acc_axes, &acc)?;
        root.present()?;
        Ok(())
    })
}

/// Category x axis for bar charts: category `i` is centred on `x = i`, the
/// axis spans `[-0.5, n - 0.5]` and every category gets a labelled tick.
struct CategoryAxis<'a> {
    categories: &'a [String],
}

impl Ranged for CategoryAxis<'_> {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let Range { start, end } = self.range();
        let t = (value - start) / (end - start);
        limit.0 + (t * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        (0..self.categories.len()).map(|i| i as f64).collect()
    }

    fn range(&self) -> Range<f64> {
        -0.5..self.categories.len() as f64 - 0.5
    }
}

impl ValueFormatter<f64> for CategoryAxis<'_> {
    fn format_ext(&self, value: &f64) -> String {
        let r = value.round();
        if (value - r).abs() < 1e-6 && r >= 0.0 && (r as usize) < self.categories.len() {
            self.categories[r as usize].clone()
        } else {
            String::new()
        }
    }
}

/// Width in pixels of the PNG written by [`stacked_bars`] for `n_categories`
/// bars: at least 1200, growing with the number of bars, at most 4000.
pub(crate) fn stacked_bars_width(n_categories: usize) -> u32 {
    let w = 330usize.saturating_add(n_categories.saturating_mul(34));
    w.clamp(1200, 4000) as u32
}

/// A stacked bar chart: one bar per category, each series stacked on top of
/// the previous ones (negative values stack downwards from zero), with a
/// legend to the right of the plot. `series[i].1` must have one value per
/// category. The PNG is [`stacked_bars_width`]` × `[`STACKED_BARS_HEIGHT`].
pub(crate) fn stacked_bars(
    path: &Path,
    title: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
    y_label: &str,
) -> Result<(), PlotError> {
    check_bars(categories, series)?;
    let stack = Stack::of(categories.len(), series)?;
    let layout = BarsLayout::new(categories, series);
    render(path, || {
        let root =
            BitMapBackend::new(path, (layout.width, STACKED_BARS_HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let body = root.titled(title, (FONT, 24))?;
        let plot_w = body.dim_in_pixel().0.saturating_sub(layout.legend_w + 20);
        let (plot_area, legend_area) = body.split_horizontally(plot_w);
        draw_bars(&root, &plot_area, categories, &stack, &layout, y_label)?;
        draw_bars_legend(&legend_area, series)?;
        root.present()?;
        Ok(())
    })
}

/// Checks a bar chart's input: categories, series, one plottable value per category in each.
fn check_bars(categories: &[String], series: &[(String, Vec<f64>)]) -> Result<(), PlotError> {
    let n = categories.len();
    if n == 0 {
        return Err(PlotError::InvalidInput(
            "stacked_bars: no categories".into(),
        ));
    }
    if series.is_empty() {
        return Err(PlotError::InvalidInput("stacked_bars: no series".into()));
    }
    for (name, values) in series {
        if values.len() != n {
            return Err(PlotError::InvalidInput(format!(
                "stacked_bars: series {name:?} has {} values for {n} categories",
                values.len()
            )));
        }
        if let Some(v) = values.iter().find(|v| !plottable(**v)) {
            return Err(PlotError::InvalidInput(format!(
                "stacked_bars: series {name:?} has a non-finite or huge value {v}"
            )));
        }
    }
    Ok(())
}

/// The stacked bars: every non-zero segment as (category, y0, y1, series index), and the y axis range.
struct Stack {
    segments: Vec<(usize, f64, f64, usize)>,
    lo: f64,
    hi: f64,
}

impl Stack {
    fn of(n: usize, series: &[(String, Vec<f64>)]) -> Result<Self, PlotError> {
        let mut segments = Vec::new();
        let (mut y_min, mut y_max) = (0.0f64, 0.0f64);
        for i in 0..n {
            let (mut pos, mut neg) = (0.0f64, 0.0f64);
            for (k, (_, values)) in series.iter().enumerate() {
                let v = values[i];
                let base = if v >= 0.0 { &mut pos } else { &mut neg };
                let (y0, y1) = (*base, *base + v);
                *base = y1;
                if v != 0.0 {
                    segments.push((i, y0.min(y1), y0.max(y1), k));
                }
            }
            y_max = y_max.max(pos);
            y_min = y_min.min(neg);
        }
        if !plottable(y_max) || !plottable(y_min) {
            return Err(PlotError::InvalidInput(format!(
                "stacked_bars: stacked totals exceed ±{AXIS_LIMIT:e}"
            )));
        }
        let (lo, hi) = if y_max > y_min {
            let span = y_max - y_min;
            (
                if y_min < 0.0 {
                    y_min - 0.05 * span
                } else {
                    0.0
                },
                if y_max > 0.0 {
                    y_max + 0.05 * span
                } else {
                    0.0
                },
            )
        } else {
            (0.0, 1.0)
        };
        Ok(Stack { segments, lo, hi })
    }
}

/// Pixel sizes of a bar chart: the image width, the category labels (rotated when they would not fit side
/// by side) and the legend column.
struct BarsLayout {
    width: u32,
    rotate: bool,
    x_label_area: u32,
    legend_w: u32,
}

impl BarsLayout {
    fn new(categories: &[String], series: &[(String, Vec<f64>)]) -> Self {
        let n = categories.len();
        let label_len = categories
            .iter()
            .map(|c| c.chars().count())
            .max()
            .unwrap_or(0);
        let width = stacked_bars_width(n);
        let slot_px = f64::from(width - 330) / n as f64;
        let rotate = label_len as f64 * 7.5 > slot_px * 0.95;
        let x_label_area = if rotate {
            (label_len.min(40) as u32) * 8 + 30
        } else {
            48
        };
        let legend_w = series
            .iter()
            .map(|(s, _)| s.chars().count())
            .max()
            .unwrap_or(0)
            .min(40) as u32
            * 9
            + 60;
        BarsLayout {
            width,
            rotate,
            x_label_area,
            legend_w,
        }
    }
}

/// The bars, their axes and (rotated ones drawn on `root`) their category labels.
fn draw_bars(
    root: &Area<'_>,
    plot_area: &Area<'_>,
    categories: &[String],
    stack: &Stack,
    layout: &BarsLayout,
    y_label: &str,
) -> DrawResult {
    let (n, lo) = (categories.len(), stack.lo);
    let x_coord = CategoryAxis { categories };
    let mut chart = ChartBuilder::on(plot_area)
        .margin(12)
        .x_label_area_size(layout.x_label_area)
        .y_label_area_size(78)
        .build_cartesian_2d(x_coord, lo..stack.hi)?;

    let num_fmt = |v: &f64| fmt_tick(*v);
    let no_label = |_: &f64| String::new();
    let mut mesh = chart.configure_mesh();
    if layout.rotate {
        // plotters centres rotated tick labels on the tick, so they would
        // overlap the plot; these are drawn by hand below instead.
        mesh.x_label_formatter(&no_label);
    }
    mesh.disable_x_mesh()
        .label_style((FONT, 13))
        .x_labels(n)
        .y_label_formatter(&num_fmt)
        .y_labels(10)
        .y_desc(y_label)
        .axis_desc_style((FONT, 16))
        .light_line_style(GRID_LIGHT)
        .bold_line_style(GRID_BOLD)
        .draw()?;

    if layout.rotate {
        // Read bottom-to-top, ending just below the tick.
        let style = TextStyle::from((FONT, 13).into_font())
            .transform(FontTransform::Rotate270)
            .pos(Pos::new(HPos::Right, VPos::Center));
        for (i, cat) in categories.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64, lo));
            root.draw(&Text::new(cat.as_str(), (x, y + 8), style.clone()))?;
        }
    }

    let half_w = 0.36;
    chart.draw_series(stack.segments.iter().map(|&(i, y0, y1, k)| {
        let x = i as f64;
        Rectangle::new(
            [(x - half_w, y0), (x + half_w, y1)],
            PALETTE[k % PALETTE.len()].filled(),
        )
    }))?;
    if lo < 0.0 {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(-0.5, 0.0), (n as f64 - 0.5, 0.0)],
            BLACK.stroke_width(1),
        )))?;
    }
    Ok(())
}

/// The bar chart's legend in its own column, top-down in stacking order reversed so it reads like the bars
/// (last series on top).
fn draw_bars_legend(legend_area: &Area<'_>, series: &[(String, Vec<f64>)]) -> DrawResult {
    let font = (FONT, 14).into_font().color(&BLACK);
    let top = 20i32;
    for (row, (k, (name, _))) in series.iter().enumerate().rev().enumerate() {
        let y = top + row as i32 * 24;
        legend_area.draw(&Rectangle::new(
            [(4, y), (20, y + 16)],
            PALETTE[k % PALETTE.len()].filled(),
        ))?;
        legend_area.draw(&Text::new(name.clone(), (28, y + 1), font.clone()))?;
    }
    Ok(())
}

/// Lines with markers for several series of `(x, y)` points, drawn in the
/// given order, as a [`LINE_PLOT_SIZE`] PNG. With `log_y` the y axis is
/// logarithmic and points with `y <= 0` are skipped; non-finite points (and
/// coordinates above 1e300 in magnitude) are always skipped. At least one plottable point is required.
pub(crate) fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_y: bool,
) -> Result<(), PlotError> {
    let prepared: Vec<Series<'_>> = series
        .iter()
        .enumerate()
        .map(|(i, (label, pts))| Series {
            label: label.as_str(),
            points: pts
                .iter()
                .copied()
                .filter(|&(x, y)| plottable(x) && plottable(y) && (!log_y || y > 0.0))
                .collect(),
            color: PALETTE[i % PALETTE.len()],
            marker: MARKERS[(i / PALETTE.len() + i) % MARKERS.len()],
        })
        .collect();
    if prepared.iter().all(|s| s.points.is_empty()) {
        return Err(PlotError::InvalidInput(format!(
            "line_plot: no plottable points{}",
            if log_y {
                " (log scale needs y > 0)"
            } else {
                ""
            }
        )));
    }
    render(path, || {
        let root = BitMapBackend::new(path, LINE_PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let body = root.titled(title, (FONT, 24))?;
        let axes = Axes {
            caption: None,
            x_label,
            y_label,
            log_y,
            integer_x: false,
            y_limits: (None, None),
        };
        draw_lines_panel(&body, axes, &prepared)?;
        root.present()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh temp dir for each test's PNGs. Set `ASYMML_KEEP_PLOTS=DIR` to
    /// also copy every checked PNG into DIR for looking at them.
    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn check_png(path: &Path, size: (u32, u32)) {
        let img = image::open(path)
            .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()))
            .to_rgb8();
        assert_eq!(img.dimensions(), size, "{}", path.display());
        let first = *img.get_pixel(0, 0);
        let distinct = img.pixels().filter(|p| **p != first).count();
        assert!(distinct > 1000, "{} is (almost) one colour", path.display());
        // Something besides white/grey: the coloured data.
        let coloured = img
            .pixels()
            .filter(|p| {
                let [r, g, b] = p.0;
                r.max(g).max(b) - r.min(g).min(b) > 60
            })
            .count();
        assert!(coloured > 50, "{} has no coloured data", path.display());
        if let Some(keep) = std::env::var_os("ASYMML_KEEP_PLOTS") {
            let keep = Path::new(&keep);
            std::fs::create_dir_all(keep).unwrap();
            std::fs::copy(path, keep.join(path.file_name().unwrap())).unwrap();
        }
    }

    fn epochs(n: usize) -> Vec<EpochPoint> {
        (1..=n)
            .map(|e| {
                let t = e as f64;
                EpochPoint {
                    epoch: e,
                    train_loss: 2.3 * (-0.15 * t).exp() + 0.05,
                    train_acc: 1.0 - 0.9 * (-0.2 * t).exp(),
                    test_loss: 2.3 * (-0.12 * t).exp() + 0.3,
                    test_acc: 0.95 - 0.85 * (-0.18 * t).exp(),
                }
            })
            .collect()
    }

    #[test]
    fn training_curves_many_and_one_point() {
        let dir = tmp();
        let many = dir.path().join("curves.png");
        training_curves(&many, &epochs(30), "VGG16 / CIFAR-10").unwrap();
        check_png(&many, TRAINING_CURVES_SIZE);

        let one = dir.path().join("one.png");
        training_curves(&one, &epochs(1), "single epoch").unwrap();
        check_png(&one, TRAINING_CURVES_SIZE);
    }

    #[test]
    fn training_curves_rejects_empty_and_all_nan() {
        let dir = tmp();
        let p = dir.path().join("x.png");
        assert!(matches!(
            training_curves(&p, &[], "t"),
            Err(PlotError::InvalidInput(_))
        ));
        let nan = EpochPoint {
            epoch: 0,
            train_loss: f64::NAN,
            train_acc: 0.5,
            test_loss: f64::INFINITY,
            test_acc: 0.4,
        };
        assert!(matches!(
            training_curves(&p, &[nan], "t"),
            Err(PlotError::InvalidInput(_))
        ));
        assert!(!p.exists());
    }

    #[test]
    fn stacked_bars_writes_png() {
        let dir = tmp();
        let path = dir.path().join("bars.png");
        let cats: Vec<String> = (0..8).map(|i| format!("conv{i}")).collect();
        let series = vec![
            (
                "linear (untrusted)".to_string(),
                (0..8).map(|i| 10.0 + i as f64).collect(),
            ),
            ("non-linear (trusted)".to_string(), vec![3.0; 8]),
            (
                "transfer".to_string(),
                (0..8).map(|i| 1.0 + 0.5 * i as f64).collect(),
            ),
        ];
        stacked_bars(&path, "Per-layer time", &cats, &series, "time (ms)").unwrap();
        check_png(&path, (stacked_bars_width(8), STACKED_BARS_HEIGHT));
    }

    #[test]
    fn stacked_bars_many_long_categories_and_negative_values() {
        let dir = tmp();
        let path = dir.path().join("bars_many.png");
        let cats: Vec<String> = (0..40).map(|i| format!("features.{i}.conv2d")).collect();
        let series = vec![
            ("a".to_string(), (0..40).map(|i| (i % 7) as f64).collect()),
            (
                "b".to_string(),
                (0..40).map(|i| -((i % 3) as f64)).collect(),
            ),
        ];
        stacked_bars(&path, "many", &cats, &series, "ms").unwrap();
        check_png(&path, (stacked_bars_width(40), STACKED_BARS_HEIGHT));
    }

    #[test]
    fn stacked_bars_rejects_bad_input() {
        let dir = tmp();
        let p = dir.path().join("x.png");
        let cats = vec!["a".to_string(), "b".to_string()];
        let short = vec![("s".to_string(), vec![1.0])];
        assert!(matches!(
            stacked_bars(&p, "t", &cats, &short, "y"),
            Err(PlotError::InvalidInput(_))
        ));
        let nan = vec![("s".to_string(), vec![1.0, f64::NAN])];
        assert!(matches!(
            stacked_bars(&p, "t", &cats, &nan, "y"),
            Err(PlotError::InvalidInput(_))
        ));
        assert!(matches!(
            stacked_bars(&p, "t", &[], &[], "y"),
            Err(PlotError::InvalidInput(_))
        ));
    }

    #[test]
    fn line_plot_linear_and_log() {
        let dir = tmp();
        let spectrum: Vec<(f64, f64)> = (1..=64)
            .map(|i| (i as f64, 100.0 * (i as f64).powf(-1.5)))
            .collect();
        let flat: Vec<(f64, f64)> = (1..=64).map(|i| (i as f64, 0.5)).collect();
        let series = vec![
            ("conv1 singular values".to_string(), spectrum),
            ("noise floor".to_string(), flat),
            ("single".to_string(), vec![(32.0, 3.0)]),
        ];
        let log = dir.path().join("log.png");
        line_plot(&log, "Spectrum", "index", "singular value", &series, true).unwrap();
        check_png(&log, LINE_PLOT_SIZE);

        let lin = dir.path().join("lin.png");
        line_plot(&lin, "Spectrum", "index", "singular value", &series, false).unwrap();
        check_png(&lin, LINE_PLOT_SIZE);
    }

    #[test]
    fn line_plot_rejects_unplottable() {
        let dir = tmp();
        let p = dir.path().join("x.png");
        let series = vec![("neg".to_string(), vec![(1.0, -1.0), (2.0, 0.0)])];
        assert!(matches!(
            line_plot(&p, "t", "x", "y", &series, true),
            Err(PlotError::InvalidInput(_))
        ));
        assert!(matches!(
            line_plot(&p, "t", "x", "y", &[], false),
            Err(PlotError::InvalidInput(_))
        ));
        // A single point is fine on a linear axis.
        let one = vec![("one".to_string(), vec![(0.0, 0.0)])];
        line_plot(&p, "t", "x", "y", &one, false).unwrap();
        check_png(&p, LINE_PLOT_SIZE);
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let dir = tmp();
        let p = dir.path().join("extreme.png");
        let cases = [
            vec![(0.0, 1e300), (1.0, -1e300)],
            vec![(-1e300, 1e-300), (1e300, 2e-300)],
            vec![(1.0, f64::MAX), (2.0, f64::MIN_POSITIVE)],
            vec![(f64::MAX, f64::MAX), (f64::MAX, -f64::MAX)],
            vec![(1.0, 1e-310), (2.0, 5e-324)],
            vec![(5.0, 7.0), (5.0, 7.0)],
        ];
        for pts in cases {
            for log_y in [false, true] {
                // Drawn, or rejected as input; never a (caught) backend panic.
                let r = line_plot(&p, "t", "x", "y", &[("s".into(), pts.clone())], log_y);
                assert!(
                    !matches!(r, Err(PlotError::Drawing { .. })),
                    "{pts:?} log_y={log_y}: {r:?}"
                );
            }
        }
        let cats = vec!["a".to_string(), "b".to_string()];
        stacked_bars(&p, "t", &cats, &[("s".into(), vec![1e300, 0.0])], "y").unwrap();
        stacked_bars(&p, "t", &cats, &[("s".into(), vec![0.0, 0.0])], "y").unwrap();
        let huge = [
            ("s".into(), vec![1e300, 1.0]),
            ("t".into(), vec![1e300, 1.0]),
        ];
        assert!(matches!(
            stacked_bars(&p, "t", &cats, &huge, "y"),
            Err(PlotError::InvalidInput(_))
        ));
    }

    #[test]
    fn drawing_into_missing_directory_is_an_error() {
        let dir = tmp();
        let p = dir.path().join("no/such/dir/x.png");
        let err = training_curves(&p, &epochs(3), "t").unwrap_err();
        assert!(matches!(err, PlotError::Drawing { .. }), "{err}");
    }

    #[test]
    fn tick_formatting() {
        assert_eq!(fmt_tick(0.0), "0");
        assert_eq!(fmt_tick(2.5), "2.5");
        assert_eq!(fmt_tick(100.0), "100");
        assert_eq!(fmt_tick(1e-5), "1e-5");
        assert_eq!(fmt_tick(250000.0), "2.5e5");
        assert_eq!(fmt_integer_tick(3.0), "3");
        assert_eq!(fmt_integer_tick(2.5), "");
    }
}
