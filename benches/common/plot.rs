//! Line charts as SVG for the benchmark reports: labelled axes with units and ticks, an
//! optional right-hand axis, a legend in its own column beside the plot (never on the data),
//! and titles sized to fit. Plain SVG text, no fonts or plotting crate needed.

use std::fmt::Write as _;

pub const COLORS: &[&str] = &[
    "#777777", "#d62728", "#2a9d2a", "#1f77b4", "#9467bd", "#ff7f0e", "#8c564b", "#17becf",
];

const WIDTH: f64 = 900.0;
const LEFT: f64 = 70.0;
const RIGHT_AXIS: f64 = 55.0;
const LEGEND: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 52.0;
/// Average width of a sans-serif character in ems, for fitting text.
const CHAR_EM: f64 = 0.55;

/// One line of a chart.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    /// Vertical bars `(x, low, high)`: the spread behind each point.
    pub bars: Vec<(f64, f64, f64)>,
    /// Plotted against the right-hand axis.
    pub right: bool,
}

/// A chart: axes from 0 to the maxima.
#[derive(Debug, Clone, Default)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_max: f64,
    pub y_max: f64,
    /// Right-hand axis: label and maximum.
    pub y2: Option<(String, f64)>,
    /// Tick labels of the x axis are the value followed by this (e.g. "×").
    pub x_suffix: String,
    pub series: Vec<Series>,
    /// Dashed vertical markers with a label at the top.
    pub marks: Vec<(f64, String)>,
    /// Plot height in pixels (default 300).
    pub height: f64,
}

/// A step of 1, 2 or 5 × 10^k giving about `n` ticks over `max`.
fn tick_step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn label(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else if step >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart {
    fn plot_height(&self) -> f64 {
        if self.height > 0.0 {
            self.height
        } else {
            300.0
        }
    }

    /// Total height of this chart's panel.
    pub fn panel_height(&self) -> f64 {
        TOP + self.plot_height() + BOTTOM
    }

    /// The chart alone, as an SVG document.
    pub fn svg(&self) -> String {
        stack(std::slice::from_ref(self))
    }

    fn draw(&self, out: &mut String, y0: f64) {
        let right_axis = if self.y2.is_some() { RIGHT_AXIS } else { 0.0 };
        let (x0, x1) = (LEFT, WIDTH - LEGEND - right_axis);
        let (top, bottom) = (y0 + TOP, y0 + TOP + self.plot_height());
        let x_max = self.x_max.max(1e-9);
        let y_max = self.y_max.max(1e-9);
        let x = |v: f64| x0 + (x1 - x0) * v / x_max;
        let y = |v: f64| bottom - (bottom - top) * v / y_max;
        // Title, shrunk to fit the width.
        let size = 14.0f64.min((WIDTH - 20.0) / (self.title.chars().count() as f64 * CHAR_EM));
        let _ = writeln!(
            out,
            "<text x=\"10\" y=\"{:.1}\" font-size=\"{size:.1}\" font-weight=\"bold\">{}</text>",
            y0 + 22.0,
            escape(&self.title)
        );
        // Grid, ticks and tick labels.
        let xs = tick_step(x_max, 8.0);
        let mut v = 0.0;
        while v <= x_max * (1.0 + 1e-9) {
            let px = x(v);
            let _ = writeln!(
                out,
                "<line x1=\"{px:.1}\" y1=\"{top:.1}\" x2=\"{px:.1}\" y2=\"{bottom:.1}\" stroke=\"#eeeeee\"/>\n<line x1=\"{px:.1}\" y1=\"{bottom:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n<text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}{}</text>",
                bottom + 5.0,
                bottom + 18.0,
                label(v, xs),
                escape(&self.x_suffix)
            );
            v += xs;
        }
        let ys = tick_step(y_max, 5.0);
        let mut v = 0.0;
        while v <= y_max * (1.0 + 1e-9) {
            let py = y(v);
            let _ = writeln!(
                out,
                "<line x1=\"{x0:.1}\" y1=\"{py:.1}\" x2=\"{x1:.1}\" y2=\"{py:.1}\" stroke=\"#eeeeee\"/>\n<line x1=\"{:.1}\" y1=\"{py:.1}\" x2=\"{x0:.1}\" y2=\"{py:.1}\" stroke=\"black\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                x0 - 5.0,
                x0 - 8.0,
                py + 4.0,
                label(v, ys)
            );
            v += ys;
        }
        // Axes and their labels.
        let _ = writeln!(
            out,
            "<line x1=\"{x0:.1}\" y1=\"{bottom:.1}\" x2=\"{x1:.1}\" y2=\"{bottom:.1}\" stroke=\"black\"/>\n<line x1=\"{x0:.1}\" y1=\"{top:.1}\" x2=\"{x0:.1}\" y2=\"{bottom:.1}\" stroke=\"black\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n<text transform=\"translate({:.1},{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
            (x0 + x1) / 2.0,
            bottom + 40.0,
            escape(&self.x_label),
            18.0,
            (top + bottom) / 2.0,
            escape(&self.y_label)
        );
        let y2 = |v: f64, max: f64| bottom - (bottom - top) * v / max.max(1e-9);
        if let Some((name, max)) = &self.y2 {
            let step = tick_step(*max, 5.0);
            let _ = writeln!(
                out,
                "<line x1=\"{x1:.1}\" y1=\"{top:.1}\" x2=\"{x1:.1}\" y2=\"{bottom:.1}\" stroke=\"black\"/>\n<text transform=\"translate({:.1},{:.1}) rotate(90)\" text-anchor=\"middle\">{}</text>",
                x1 + 42.0,
                (top + bottom) / 2.0,
                escape(name)
            );
            let mut v = 0.0;
            while v <= max * (1.0 + 1e-9) {
                let py = y2(v, *max);
                let _ = writeln!(
                    out,
                    "<line x1=\"{x1:.1}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"black\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                    x1 + 5.0,
                    x1 + 8.0,
                    py + 4.0,
                    label(v, step)
                );
                v += step;
            }
        }
        for (at, text) in &self.marks {
            let px = x(*at);
            let _ = writeln!(
                out,
                "<line x1=\"{px:.1}\" y1=\"{top:.1}\" x2=\"{px:.1}\" y2=\"{bottom:.1}\" stroke=\"#555555\" stroke-dasharray=\"3 3\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#555555\">{}</text>",
                px + 3.0,
                top + 10.0,
                escape(text)
            );
        }
        // Lines, spreads, legend.
        for (i, s) in self.series.iter().enumerate() {
            let max = match (&self.y2, s.right) {
                (Some((_, m)), true) => *m,
                _ => y_max,
            };
            let fy = |v: f64| y2(v.min(max), max);
            let pts: Vec<String> = s
                .points
                .iter()
                .map(|&(a, b)| format!("{:.1},{:.1}", x(a), fy(b)))
                .collect();
            let dash = if s.dashed {
                " stroke-dasharray=\"5 4\""
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
                s.color,
                pts.join(" ")
            );
            for &(a, lo, hi) in &s.bars {
                let _ = writeln!(
                    out,
                    "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"{3}\" stroke-width=\"1.5\"/>",
                    x(a),
                    fy(lo),
                    fy(hi),
                    s.color
                );
            }
            let ly = top + 8.0 + 18.0 * i as f64;
            let lx = WIDTH - LEGEND + 10.0;
            let _ = writeln!(
                out,
                "<line x1=\"{lx:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{}\" stroke-width=\"2\"{dash}/>\n<text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                lx + 22.0,
                s.color,
                lx + 28.0,
                ly + 4.0,
                escape(&s.name)
            );
        }
    }
}

/// Charts one above the other in one SVG document.
pub fn stack(charts: &[Chart]) -> String {
    let h: f64 = charts.iter().map(Chart::panel_height).sum();
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{h:.0}\" viewBox=\"0 0 {WIDTH} {h:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let mut y0 = 0.0;
    for c in charts {
        c.draw(&mut out, y0);
        y0 += c.panel_height();
    }
    out + "</svg>\n"
}
