//! The figures, each an SVG string drawn with plotters' SVG backend (text is SVG `<text>`, so
//! no font files are needed and the page stays small and sharp).

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::{Error, Result};

const W: u32 = 520;
const H: u32 = 360;

fn err(e: impl std::fmt::Display) -> Error {
    Error::Plot(e.to_string())
}

/// A colour for series `i`.
fn color(i: usize) -> RGBColor {
    const P: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    P[i % P.len()]
}

fn canvas(draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<()>) -> Result<String> {
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        draw(&root)?;
        root.present().map_err(err)?;
    }
    Ok(s)
}

/// One named polyline.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points.
    pub points: Vec<(f64, f64)>,
}

/// Line chart of several series. `log_y` draws the y axis logarithmically (values <= 0 are
/// dropped). `diagonal` adds the y = x reference line (ROC, reliability).
pub fn lines(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    log_y: bool,
    unit_square: bool,
) -> Result<String> {
    let pts = || series.iter().flat_map(|s| s.points.iter().copied());
    let finite: Vec<(f64, f64)> = pts()
        .filter(|p| p.0.is_finite() && p.1.is_finite() && (!log_y || p.1 > 0.0))
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = finite.iter().fold(
        (f64::MAX, f64::MIN, f64::MAX, f64::MIN),
        |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
    );
    // A log axis over less than a decade has no tick labels: draw such data linearly.
    let log_y = log_y && y0 > 0.0 && y1 / y0 > 10.0;
    if unit_square || finite.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + if log_y { y0.abs().max(1e-12) } else { 1.0 };
    }
    canvas(|root| {
        let mut b = ChartBuilder::on(root);
        b.caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56);
        if log_y {
            let mut chart = b
                .build_cartesian_2d(x0..x1, (y0 * 0.9..y1 * 1.1).log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .y_label_formatter(&|v| format!("{v:.2e}"))
                .label_style(("sans-serif", 11))
                .draw()
                .map_err(err)?;
            for (i, s) in series.iter().enumerate() {
                let c = color(i);
                chart
                    .draw_series(LineSeries::new(
                        s.points.iter().copied().filter(|p| p.1 > 0.0),
                        c.stroke_width(2),
                    ))
                    .map_err(err)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c));
            }
            legend(&mut chart)
        } else {
            let mut chart = b.build_cartesian_2d(x0..x1, y0..y1).map_err(err)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .label_style(("sans-serif", 11))
                .draw()
                .map_err(err)?;
            if unit_square {
                chart
                    .draw_series(LineSeries::new(
                        [(0.0, 0.0), (1.0, 1.0)],
                        BLACK.mix(0.35).stroke_width(1),
                    ))
                    .map_err(err)?;
            }
            for (i, s) in series.iter().enumerate() {
                let c = color(i);
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
                    .map_err(err)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c));
            }
            legend(&mut chart)
        }
    })
}

fn legend<'a, 'b, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, Y>>,
) -> Result<()>
where
    'b: 'a,
    X: plotters::coord::ranged1d::Ranged<ValueType = f64>,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 11))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)
}

/// Reliability diagram: observed frequency against mean confidence per bin (circle area
/// grows with the bin's count), with the diagonal of perfect calibration.
pub fn reliability(title: &str, bins: &[(f64, f64, usize)]) -> Result<String> {
    let max = bins.iter().map(|b| b.2).max().unwrap_or(1).max(1) as f64;
    canvas(|root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("mean predicted probability")
            .y_desc("fraction positive")
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                BLACK.mix(0.35).stroke_width(1),
            ))
            .map_err(err)?;
        let used: Vec<&(f64, f64, usize)> = bins.iter().filter(|b| b.2 > 0).collect();
        chart
            .draw_series(LineSeries::new(
                used.iter().map(|b| (b.0, b.1)),
                color(0).stroke_width(2),
            ))
            .map_err(err)?;
        chart
            .draw_series(used.iter().map(|b| {
                let r = 3.0 + 9.0 * (b.2 as f64 / max).sqrt();
                Circle::new((b.0, b.1), r as i32, color(0).mix(0.5).filled())
            }))
            .map_err(err)?;
        Ok(())
    })
}

/// Heatmap of a `rows x cols` row-major matrix, colour stretched from its minimum (white) to
/// its maximum (dark): an entropic plan is close to uniform, so its structure lives in the
/// small differences.
pub fn heatmap(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    rows: usize,
    cols: usize,
    values: &[f64],
) -> Result<String> {
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    let min = values.iter().copied().fold(f64::MAX, f64::min);
    let span = (max - min).max(1e-300);
    canvas(|root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..cols as f64, 0f64..rows as f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(err)?;
        chart
            .draw_series((0..rows).flat_map(|r| {
                (0..cols).map(move |c| {
                    let v = ((values[r * cols + c] - min) / span).clamp(0.0, 1.0);
                    let shade = (255.0 * (1.0 - v)) as u8;
                    let fill = RGBColor(shade, shade, 255u8.saturating_sub((v * 90.0) as u8));
                    // Row 0 at the top, as a matrix is printed.
                    let y = (rows - r) as f64;
                    Rectangle::new([(c as f64, y - 1.0), (c as f64 + 1.0, y)], fill.filled())
                })
            }))
            .map_err(err)?;
        Ok(())
    })
}
