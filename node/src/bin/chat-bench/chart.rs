//! A line chart as SVG, written by hand: axes with round ticks, one polyline per series, an
//! optional horizontal threshold. Small enough not to need a plotting crate.

use std::fmt::Write;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
/// Plot area margins: left, right, top, bottom.
const MARGIN: (f64, f64, f64, f64) = (70.0, 110.0, 40.0, 50.0);

/// One line of a chart.
pub struct Series {
    name: String,
    color: String,
    points: Vec<(f64, f64)>,
}

impl Series {
    /// A series called `name`, drawn in `color` (any SVG colour).
    pub fn new(name: &str, color: &str, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            color: color.into(),
            points,
        }
    }
}

/// A chart of series sharing axes.
pub struct Chart {
    /// Title above the plot.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Label beside the y axis.
    pub y_label: String,
    /// A logarithmic y axis (values ≤ 0 are left out).
    pub log_y: bool,
    /// The series.
    pub series: Vec<Series>,
    /// A dashed horizontal line at a y value, with its label.
    pub threshold: Option<(f64, String)>,
}

/// Round tick values covering lo..=hi: steps of 1, 2 or 5 × 10^k, about `count` of them.
fn linear_ticks(lo: f64, hi: f64, count: usize) -> Vec<f64> {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / count.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).floor() as i64;
    let last = (hi / step).ceil() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A number for a tick label: no needless decimals.
fn label(v: f64) -> String {
    if v == 0.0 || v.abs() >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart {
    /// The chart as an SVG document.
    pub fn svg(&self) -> String {
        let y_of = |v: f64| if self.log_y { v.log10() } else { v };
        let points: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(_, y)| !self.log_y || *y > 0.0)
            .collect();
        let threshold = self.threshold.as_ref().map(|(y, _)| *y);
        let xs = points.iter().map(|p| p.0);
        let ys = points.iter().map(|p| p.1).chain(threshold);
        let (x_lo, x_hi) = bounds(xs, !self.log_y);
        let (y_lo, y_hi) = bounds(ys.map(y_of), !self.log_y);
        let x_ticks = linear_ticks(x_lo, x_hi, 6);
        let y_ticks: Vec<f64> = if self.log_y {
            (y_lo.floor() as i64..=y_hi.ceil() as i64)
                .map(|e| e as f64)
                .collect()
        } else {
            linear_ticks(y_lo, y_hi, 6)
        };
        // The axes span the ticks, so the outermost ticks sit on the frame.
        let (x_lo, x_hi) = (x_ticks[0], x_ticks[x_ticks.len() - 1]);
        let (y_lo, y_hi) = (y_ticks[0], y_ticks[y_ticks.len() - 1]);
        let (left, right, top, bottom) = MARGIN;
        let plot_w = WIDTH - left - right;
        let plot_h = HEIGHT - top - bottom;
        let px = |x: f64| left + (x - x_lo) / (x_hi - x_lo).max(f64::MIN_POSITIVE) * plot_w;
        let py = |y: f64| top + plot_h - (y - y_lo) / (y_hi - y_lo).max(f64::MIN_POSITIVE) * plot_h;

        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
            left + plot_w / 2.0,
            escape(&self.title)
        );
        for x in &x_ticks {
            let _ = writeln!(
                out,
                r##"<line x1="{0:.1}" y1="{top}" x2="{0:.1}" y2="{1:.1}" stroke="#e5e5e5"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{3}</text>"##,
                px(*x),
                top + plot_h,
                top + plot_h + 16.0,
                label(*x)
            );
        }
        for y in &y_ticks {
            let value = if self.log_y { 10f64.powf(*y) } else { *y };
            let _ = writeln!(
                out,
                r##"<line x1="{left}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#e5e5e5"/><text x="{2:.1}" y="{3:.1}" text-anchor="end">{4}</text>"##,
                py(*y),
                left + plot_w,
                left - 6.0,
                py(*y) + 4.0,
                label(value)
            );
        }
        let _ = writeln!(
            out,
            r#"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            left + plot_w / 2.0,
            HEIGHT - 10.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            out,
            r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
            top + plot_h / 2.0,
            escape(&self.y_label)
        );
        if let Some((y, text)) = &self.threshold {
            let at = py(y_of(*y));
            let _ = writeln!(
                out,
                r##"<line x1="{left}" y1="{at:.1}" x2="{:.1}" y2="{at:.1}" stroke="#888" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" fill="#555">{}</text>"##,
                left + plot_w,
                left + plot_w + 6.0,
                at + 4.0,
                escape(text)
            );
        }
        for (i, s) in self.series.iter().enumerate() {
            let mut coords = String::new();
            for (x, y) in s.points.iter().filter(|(_, y)| !self.log_y || *y > 0.0) {
                let _ = write!(coords, "{:.1},{:.1} ", px(*x), py(y_of(*y)));
                let _ = write!(
                    out,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#,
                    px(*x),
                    py(y_of(*y)),
                    s.color
                );
            }
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
                coords.trim_end(),
                s.color
            );
            let legend_y = top + 10.0 + 18.0 * i as f64;
            let _ = writeln!(
                out,
                r#"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="{3}" stroke-width="2"/><text x="{4:.1}" y="{5:.1}">{6}</text>"#,
                left + plot_w + 8.0,
                legend_y,
                left + plot_w + 28.0,
                s.color,
                left + plot_w + 32.0,
                legend_y + 4.0,
                escape(&s.name)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

/// The range of `values`, from 0 when `from_zero`; a unit range when there are none.
fn bounds(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    if (hi - lo).abs() < f64::EPSILON {
        hi = lo + 1.0;
    }
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            linear_ticks(0.0, 9.3, 5),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        assert_eq!(linear_ticks(0.0, 1000.0, 4), vec![0.0, 500.0, 1000.0]);
    }

    #[test]
    fn a_chart_has_one_polyline_per_series_and_escapes_text() {
        let chart = Chart {
            title: "a < b".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_y: true,
            series: vec![
                Series::new("p50", "blue", vec![(1000.0, 2.0), (2000.0, 3.0)]),
                Series::new("p99", "red", vec![(1000.0, 20.0), (2000.0, 0.0)]),
            ],
            threshold: Some((100.0, "bound".into())),
        };
        let svg = chart.svg();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &lt; b"));
        // The zero latency has no place on a log axis: 3 points drawn, not 4.
        assert_eq!(svg.matches("<circle").count(), 3);
    }
}
