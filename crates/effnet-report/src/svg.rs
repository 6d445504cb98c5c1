//! Inline SVG charts for the self-contained HTML report.
//!
//! The output uses no scripts, no external references, no `url(...)` and no loaded fonts, so it
//! satisfies a strict CSP (`default-src 'none'; style-src 'unsafe-inline'; img-src data:`).
//! Rendering is deterministic: the same chart always gives the same string.

/// How an axis maps data values to pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Values map linearly to pixels.
    Linear,
    /// `log10` of the value maps linearly to pixels; non-positive values are not drawn.
    Log,
}

/// One chart axis: title, scale, range and label style.
#[derive(Clone, Debug)]
pub struct Axis {
    /// The axis title.
    pub label: String,
    /// Linear or logarithmic.
    pub scale: Scale,
    /// Fixed range; None = fit the data (with ~5% padding on linear axes; whole decades or nice 1-2-5
    /// bounds on log axes).
    pub range: Option<(f64, f64)>,
    /// Tick labels as percentages: value 0.823 is drawn as "82%" (data are fractions).
    pub percent: bool,
}

impl Axis {
    /// A linear axis fitted to the data.
    pub fn linear(label: &str) -> Axis {
        Axis { label: label.to_string(), scale: Scale::Linear, range: None, percent: false }
    }

    /// A logarithmic axis fitted to the data.
    pub fn log(label: &str) -> Axis {
        Axis { scale: Scale::Log, ..Axis::linear(label) }
    }

    /// Label ticks as percentages of fractions (0.5 is drawn as "50%").
    pub fn percent(self) -> Axis {
        Axis { percent: true, ..self }
    }

    /// Fix the axis range instead of fitting the data; points outside it are clipped.
    pub fn with_range(self, lo: f64, hi: f64) -> Axis {
        Axis { range: Some((lo, hi)), ..self }
    }
}

/// The shape of a point marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// A filled circle.
    Circle,
    /// A filled square.
    Square,
    /// A filled diamond.
    Diamond,
    /// A filled upward triangle.
    Triangle,
    /// An "x" drawn with strokes.
    Cross,
}

/// How a series is drawn.
#[derive(Clone, Debug, PartialEq)]
pub enum Mark {
    /// A polyline through the points.
    Line,
    /// Markers only.
    Points(Shape),
    /// A polyline with a marker at every point.
    LinePoints(Shape),
    /// A staircase line (each value holds until the next point's x), for schedules.
    Step,
}

/// One data series: a legend entry and its points.
#[derive(Clone, Debug)]
pub struct Series {
    /// The legend entry.
    pub name: String,
    /// A CSS colour, e.g. `"#1f77b4"`.
    pub color: String,
    /// How the series is drawn.
    pub mark: Mark,
    /// Draw lines dashed.
    pub dashed: bool,
    /// The `(x, y)` data; non-finite points (and non-positive ones on log axes) are skipped and
    /// break lines.
    pub points: Vec<(f64, f64)>,
    /// Optional text drawn next to each point (same length as points, or empty for none).
    pub labels: Vec<Option<String>>,
}

impl Series {
    /// A solid series without point labels.
    pub fn new(name: &str, color: &str, mark: Mark, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.to_string(),
            color: color.to_string(),
            mark,
            dashed: false,
            points,
            labels: Vec::new(),
        }
    }

    /// Draw the series' lines dashed.
    pub fn dashed(self) -> Series {
        Series { dashed: true, ..self }
    }

    /// Attach a text label to each point (`None` for no label).
    pub fn with_labels(self, labels: Vec<Option<String>>) -> Series {
        Series { labels, ..self }
    }
}

/// A 2-D chart with any number of series, rendered by [`Chart::to_svg`].
#[derive(Clone, Debug)]
pub struct Chart {
    /// The `id` attribute of the <svg> element (tests look it up).
    pub id: String,
    /// The chart title, drawn above the plot and used as the accessible name.
    pub title: String,
    /// The horizontal axis.
    pub x: Axis,
    /// The vertical axis.
    pub y: Axis,
    /// The series, drawn in order (later on top) and listed in the legend.
    pub series: Vec<Series>,
    /// Width in pixels (default 640).
    pub width: u32,
    /// Height in pixels (default 400).
    pub height: u32,
}

/// The palette used by the report (at least 8 distinct colours; tab10-like).
pub const PALETTE: [&str; 8] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

const TICK_FONT: f64 = 11.0;
const LEGEND_FONT: f64 = 11.0;

/// A tick: its value and, for labelled (major) ticks, its label; minor ticks only get a gridline.
#[derive(Clone, Debug, PartialEq)]
struct Tick {
    value: f64,
    label: Option<String>,
}

/// Data-to-pixel mapping for one axis.
struct Map {
    log: bool,
    lo: f64,
    hi: f64,
    p0: f64,
    p1: f64,
}

impl Map {
    fn t(&self, v: f64) -> f64 {
        if self.log { v.log10() } else { v }
    }

    fn px(&self, v: f64) -> f64 {
        let (a, b) = (self.t(self.lo), self.t(self.hi));
        (self.p0 + (self.t(v) - a) / (b - a) * (self.p1 - self.p0)).clamp(-1e6, 1e6)
    }
}

impl Chart {
    /// An empty 640×400 chart.
    pub fn new(id: &str, title: &str, x: Axis, y: Axis) -> Chart {
        Chart {
            id: id.to_string(),
            title: title.to_string(),
            x,
            y,
            series: Vec::new(),
            width: 640,
            height: 400,
        }
    }

    /// Add a series (builder style).
    pub fn series(mut self, s: Series) -> Chart {
        self.series.push(s);
        self
    }

    /// Add a series.
    pub fn push(&mut self, s: Series) {
        self.series.push(s);
    }

    /// The chart as one `<svg>` element (with xmlns, viewBox, width/height, role="img",
    /// a <title> child, and aria-label), ready to inline in HTML or save as a .svg file.
    pub fn to_svg(&self) -> String {
        let (w, h) = (f64::from(self.width.max(160)), f64::from(self.height.max(120)));
        let ok = |a: &Axis, v: f64| v.is_finite() && (a.scale == Scale::Linear || v > 0.0);
        let pts: Vec<Vec<Option<(f64, f64)>>> = self
            .series
            .iter()
            .map(|s| {
                s.points.iter().map(|&(x, y)| (ok(&self.x, x) && ok(&self.y, y)).then_some((x, y))).collect()
            })
            .collect();
        let all: Vec<(f64, f64)> = pts.iter().flatten().flatten().copied().collect();
        let (xlo, xhi) = resolve_range(&self.x, &all.iter().map(|p| p.0).collect::<Vec<_>>());
        let (ylo, yhi) = resolve_range(&self.y, &all.iter().map(|p| p.1).collect::<Vec<_>>());
        let (xt, yt) = (ticks(&self.x, xlo, xhi), ticks(&self.y, ylo, yhi));

        // Layout: y title and tick labels on the left, legend on the right, title on top.
        let ylab_w =
            yt.iter().filter_map(|t| t.label.as_ref()).map(|l| text_w(l, TICK_FONT)).fold(0.0, f64::max);
        let left = if self.y.label.is_empty() { 8.0 } else { 30.0 } + ylab_w + 10.0;
        let top = if self.title.is_empty() { 14.0 } else { 40.0 };
        let bottom = h - if self.x.label.is_empty() { 30.0 } else { 48.0 };
        let name_w = self.series.iter().map(|s| text_w(&s.name, LEGEND_FONT)).fold(0.0, f64::max);
        let legend_w = (name_w + 48.0).min((w * 0.35).max(100.0));
        let right = if self.series.is_empty() { w - 20.0 } else { w - 10.0 - legend_w - 16.0 };
        let right = right.max(left + 40.0);
        let xm = Map { log: self.x.scale == Scale::Log, lo: xlo, hi: xhi, p0: left, p1: right };
        let ym = Map { log: self.y.scale == Scale::Log, lo: ylo, hi: yhi, p0: bottom, p1: top };

        let mut s = String::with_capacity(8192);
        let name = esc(if self.title.is_empty() { &self.id } else { &self.title });
        s.push_str(&format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{}\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" \
             height=\"{h}\" role=\"img\" aria-label=\"{name}\" font-family=\"sans-serif\" \
             style=\"max-width:100%;height:auto\">\n<title>{name}</title>\n\
             <rect width=\"{w}\" height=\"{h}\" fill=\"#ffffff\"/>\n",
            esc(&self.id)
        ));
        // Gridlines (minor lighter than major).
        s.push_str("<g fill=\"none\" shape-rendering=\"crispEdges\">\n");
        for (ts, vertical) in [(&xt, true), (&yt, false)] {
            for t in ts.iter() {
                let col = if t.label.is_some() { "#e0e0e0" } else { "#f0f0f0" };
                let d = if vertical {
                    let x = n(xm.px(t.value));
                    format!("M{x} {}V{}", n(top), n(bottom))
                } else {
                    let y = n(ym.px(t.value));
                    format!("M{} {y}H{}", n(left), n(right))
                };
                s.push_str(&format!("<path d=\"{d}\" stroke=\"{col}\"/>\n"));
            }
        }
        // Axis lines and tick marks.
        let mut d = format!("M{} {}V{}H{}", n(left), n(top), n(bottom), n(right));
        for t in xt.iter().filter(|t| t.label.is_some()) {
            d.push_str(&format!("M{} {}v4", n(xm.px(t.value)), n(bottom)));
        }
        for t in yt.iter().filter(|t| t.label.is_some()) {
            d.push_str(&format!("M{} {}h-4", n(left), n(ym.px(t.value))));
        }
        s.push_str(&format!("<path d=\"{d}\" stroke=\"#444444\"/>\n</g>\n"));
        // Tick labels.
        s.push_str(&format!("<g font-size=\"{TICK_FONT}\" fill=\"#444444\">\n"));
        for t in &xt {
            if let Some(l) = &t.label {
                let (x, y) = (n(xm.px(t.value)), n(bottom + 18.0));
                s.push_str(&format!(
                    "<text class=\"tx\" x=\"{x}\" y=\"{y}\" text-anchor=\"middle\">{}</text>\n",
                    esc(l)
                ));
            }
        }
        for t in &yt {
            if let Some(l) = &t.label {
                let (x, y) = (n(left - 8.0), n(ym.px(t.value)));
                s.push_str(&format!(
                    "<text class=\"ty\" x=\"{x}\" y=\"{y}\" dy=\"0.32em\" text-anchor=\"end\">{}</text>\n",
                    esc(l)
                ));
            }
        }
        s.push_str("</g>\n<g fill=\"#222222\">\n");
        // Titles.
        if !self.title.is_empty() {
            let x = n((left + right) / 2.0);
            s.push_str(&format!(
                "<text x=\"{x}\" y=\"24\" font-size=\"14\" font-weight=\"bold\" text-anchor=\"middle\">{}</text>\n",
                esc(&self.title)
            ));
        }
        if !self.x.label.is_empty() {
            let (x, y) = (n((left + right) / 2.0), n(h - 12.0));
            s.push_str(&format!(
                "<text x=\"{x}\" y=\"{y}\" font-size=\"12\" text-anchor=\"middle\">{}</text>\n",
                esc(&self.x.label)
            ));
        }
        if !self.y.label.is_empty() {
            let y = n((top + bottom) / 2.0);
            s.push_str(&format!(
                "<text x=\"16\" y=\"{y}\" font-size=\"12\" text-anchor=\"middle\" transform=\"rotate(-90 16 {y})\">\
                 {}</text>\n",
                esc(&self.y.label)
            ));
        }
        if all.is_empty() {
            let (x, y) = (n((left + right) / 2.0), n((top + bottom) / 2.0));
            s.push_str(&format!(
                "<text x=\"{x}\" y=\"{y}\" font-size=\"13\" fill=\"#888888\" text-anchor=\"middle\">no data</text>\n"
            ));
        }
        s.push_str("</g>\n");

        // Series.
        let inside =
            |(x, y): (f64, f64)| x >= left - 0.5 && x <= right + 0.5 && y >= top - 0.5 && y <= bottom + 0.5;
        for (ser, p) in self.series.iter().zip(&pts) {
            let px: Vec<Option<(f64, f64)>> =
                p.iter().map(|o| o.map(|(x, y)| (xm.px(x), ym.px(y)))).collect();
            let color = esc(&ser.color);
            if matches!(ser.mark, Mark::Line | Mark::LinePoints(_) | Mark::Step) {
                let d = line_path(&px, ser.mark == Mark::Step, (left, top, right, bottom));
                if !d.is_empty() {
                    let dash = if ser.dashed { " stroke-dasharray=\"6 4\"" } else { "" };
                    s.push_str(&format!(
                        "<path class=\"line\" d=\"{d}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.8\" \
                         stroke-linejoin=\"round\" stroke-linecap=\"round\"{dash}/>\n"
                    ));
                }
            }
            if let Mark::Points(shape) | Mark::LinePoints(shape) = ser.mark {
                s.push_str(&format!("<g fill=\"{color}\" stroke=\"#ffffff\" stroke-width=\"0.8\">\n"));
                for &q in px.iter().flatten().filter(|&&q| inside(q)) {
                    s.push_str(&marker(shape, q, &color, "pt"));
                }
                s.push_str("</g>\n");
            }
            let labelled: Vec<_> = px
                .iter()
                .zip(&ser.labels)
                .filter_map(|(q, l)| Some((q.filter(|&q| inside(q))?, l.as_ref()?)))
                .collect();
            if !labelled.is_empty() {
                s.push_str("<g font-size=\"9\" fill=\"#333333\">\n");
                for ((x, y), l) in labelled {
                    s.push_str(&format!(
                        "<text x=\"{}\" y=\"{}\">{}</text>\n",
                        n(x + 5.0),
                        n(y - 5.0),
                        esc(l)
                    ));
                }
                s.push_str("</g>\n");
            }
        }

        // Legend, to the right of the plot.
        if !self.series.is_empty() {
            let (lx, ly) = (w - 10.0 - legend_w, top);
            let lh = 12.0 + 18.0 * self.series.len() as f64;
            s.push_str(&format!(
                "<g class=\"legend\" font-size=\"{LEGEND_FONT}\">\n<rect x=\"{}\" y=\"{}\" width=\"{}\" \
                 height=\"{}\" rx=\"3\" fill=\"#ffffff\" stroke=\"#cccccc\"/>\n",
                n(lx),
                n(ly),
                n(legend_w),
                n(lh)
            ));
            for (i, ser) in self.series.iter().enumerate() {
                let cy = ly + 15.0 + 18.0 * i as f64;
                let color = esc(&ser.color);
                if matches!(ser.mark, Mark::Line | Mark::LinePoints(_) | Mark::Step) {
                    let dash = if ser.dashed { " stroke-dasharray=\"6 4\"" } else { "" };
                    s.push_str(&format!(
                        "<path d=\"M{} {}h24\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>\n",
                        n(lx + 8.0),
                        n(cy)
                    ));
                }
                if let Mark::Points(shape) | Mark::LinePoints(shape) = ser.mark {
                    s.push_str(&format!("<g fill=\"{color}\" stroke=\"#ffffff\" stroke-width=\"0.8\">"));
                    s.push_str(&marker(shape, (lx + 20.0, cy), &color, "lm"));
                    s.push_str("</g>\n");
                }
                // A name too long for the box is shortened with an ellipsis; the whole name is
                // the entry's tooltip.
                let shown = fit(&ser.name, legend_w - 44.0, LEGEND_FONT);
                let tooltip = if shown == ser.name {
                    String::new()
                } else {
                    format!("<title>{}</title>", esc(&ser.name))
                };
                s.push_str(&format!(
                    "<text x=\"{}\" y=\"{}\" dy=\"0.32em\" fill=\"#222222\">{}{tooltip}</text>\n",
                    n(lx + 38.0),
                    n(cy),
                    esc(&shown)
                ));
            }
            s.push_str("</g>\n");
        }
        s.push_str("</svg>\n");
        s
    }
}

/// One `<path d>` for a polyline (or staircase) in pixel space, broken at skipped points and
/// clipped to the plot rectangle `(left, top, right, bottom)`.
fn line_path(px: &[Option<(f64, f64)>], step: bool, rect: (f64, f64, f64, f64)) -> String {
    let mut d = String::new();
    let mut pen: Option<(String, String)> = None;
    for run in px.split(|p| p.is_none()) {
        let mut v: Vec<(f64, f64)> = Vec::with_capacity(run.len() * 2);
        for &(x, y) in run.iter().flatten() {
            if let (true, Some(&(_, py))) = (step, v.last()) {
                v.push((x, py));
            }
            v.push((x, y));
        }
        for seg in v.windows(2) {
            let Some((a, b)) = clip(seg[0], seg[1], rect) else { continue };
            let (a, b) = ((n(a.0), n(a.1)), (n(b.0), n(b.1)));
            if pen.as_ref() != Some(&a) {
                d.push_str(&format!("M{} {}", a.0, a.1));
            }
            if a != b || pen.as_ref() != Some(&a) {
                d.push_str(&format!("L{} {}", b.0, b.1));
            }
            pen = Some(b);
        }
        pen = None;
    }
    d
}

/// A line segment in pixel space.
type Seg = ((f64, f64), (f64, f64));

/// Liang–Barsky clipping of segment `a`–`b` to `(left, top, right, bottom)`.
fn clip(a: (f64, f64), b: (f64, f64), (l, t, r, btm): (f64, f64, f64, f64)) -> Option<Seg> {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (p, q) in [(-dx, a.0 - l), (dx, r - a.0), (-dy, a.1 - t), (dy, btm - a.1)] {
        if p == 0.0 {
            if q < 0.0 {
                return None;
            }
        } else if p < 0.0 {
            t0 = t0.max(q / p);
        } else {
            t1 = t1.min(q / p);
        }
        if t0 > t1 {
            return None;
        }
    }
    Some(((a.0 + t0 * dx, a.1 + t0 * dy), (a.0 + t1 * dx, a.1 + t1 * dy)))
}

/// One marker element centred at `(x, y)`; the enclosing group sets the fill.
fn marker(shape: Shape, (x, y): (f64, f64), color: &str, class: &str) -> String {
    let poly = |v: &[(f64, f64)]| {
        let d: Vec<String> = v.iter().map(|(dx, dy)| format!("{} {}", n(x + dx), n(y + dy))).collect();
        format!("<path class=\"{class}\" d=\"M{}Z\"/>", d.join("L"))
    };
    match shape {
        Shape::Circle => format!("<circle class=\"{class}\" cx=\"{}\" cy=\"{}\" r=\"3.5\"/>", n(x), n(y)),
        Shape::Square => poly(&[(-3.2, -3.2), (3.2, -3.2), (3.2, 3.2), (-3.2, 3.2)]),
        Shape::Diamond => poly(&[(0.0, -4.4), (4.4, 0.0), (0.0, 4.4), (-4.4, 0.0)]),
        Shape::Triangle => poly(&[(0.0, -4.4), (3.9, 2.6), (-3.9, 2.6)]),
        Shape::Cross => format!(
            "<path class=\"{class}\" d=\"M{} {}l6 6m0 -6l-6 6\" stroke=\"{color}\" stroke-width=\"1.6\" fill=\"none\"/>",
            n(x - 3.0),
            n(y - 3.0)
        ),
    }
}

/// The drawn range of an axis: the fixed one if usable, else fitted to `vals`.
fn resolve_range(axis: &Axis, vals: &[f64]) -> (f64, f64) {
    let (lo, hi) = fit_range(axis, vals);
    let log = axis.scale == Scale::Log;
    match (lo.is_finite() && hi.is_finite() && hi > lo && (!log || lo > 0.0), axis.scale) {
        (true, _) => (lo, hi),
        (false, Scale::Log) => (1.0, 10.0),
        (false, Scale::Linear) => (0.0, 1.0),
    }
}

fn fit_range(axis: &Axis, vals: &[f64]) -> (f64, f64) {
    let log = axis.scale == Scale::Log;
    if let Some((a, b)) = axis.range {
        let (lo, hi) = (a.min(b), a.max(b));
        if lo.is_finite() && hi.is_finite() && (!log || lo > 0.0) {
            return if hi > lo { (lo, hi) } else { widen(lo, log) };
        }
    }
    let (lo, hi) = vals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if lo > hi {
        return if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    if hi <= lo {
        return widen(lo, log);
    }
    if log {
        let (klo, khi) = (lo.log10().floor(), hi.log10().ceil());
        if khi - klo > 2.0 {
            (pow10(klo as i32), pow10(khi as i32))
        } else {
            (nice_below(lo), nice_above(hi))
        }
    } else {
        let pad = 0.05 * (hi - lo);
        (lo - pad, hi + pad)
    }
}

/// A non-empty range around a single value.
fn widen(v: f64, log: bool) -> (f64, f64) {
    if log {
        (nice_below(v * 0.99), nice_above(v * 1.01))
    } else if v == 0.0 {
        (-1.0, 1.0)
    } else {
        (v - 0.1 * v.abs(), v + 0.1 * v.abs())
    }
}

/// Exactly the `f64` nearest to `10^k`.
fn pow10(k: i32) -> f64 {
    format!("1e{k}").parse().unwrap_or(f64::NAN)
}

/// The largest `{1,2,5}·10^k` not above `v > 0`.
fn nice_below(v: f64) -> f64 {
    let k = v.log10().floor() as i32;
    [5.0, 2.0, 1.0]
        .iter()
        .map(|m| m * pow10(k))
        .find(|&c| c <= v * (1.0 + 1e-9))
        .unwrap_or(pow10(k - 1) * 5.0)
}

/// The smallest `{1,2,5,10}·10^k` not below `v > 0`.
fn nice_above(v: f64) -> f64 {
    let k = v.log10().floor() as i32;
    [1.0, 2.0, 5.0].iter().map(|m| m * pow10(k)).find(|&c| c >= v * (1.0 - 1e-9)).unwrap_or(pow10(k + 1))
}

/// The ticks of an axis over `[lo, hi]`.
fn ticks(axis: &Axis, lo: f64, hi: f64) -> Vec<Tick> {
    if axis.scale == Scale::Linear {
        return linear_ticks(lo, hi, axis.percent);
    }
    let (a, b) = (lo.log10(), hi.log10());
    let span = b - a;
    let within = |v: f64| v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9);
    let label = |v: f64| if axis.percent { format!("{}%", compact(v * 100.0)) } else { compact(v) };
    let (k0, k1) = (a.floor() as i32, b.ceil() as i32);
    let cands: Vec<(f64, u32)> = (k0..=k1)
        .flat_map(|k| (1..10).map(move |m| (f64::from(m) * pow10(k), m)))
        .filter(|&(v, _)| within(v))
        .collect();
    let stride = ((span / 8.0).ceil() as i32).max(1);
    let mut major: Vec<bool> = cands
        .iter()
        .map(|&(v, m)| {
            (m == 1 && (v.log10().round() as i32).rem_euclid(stride) == 0)
                || (span < 2.0 && (m == 2 || m == 5))
        })
        .collect();
    if major.iter().filter(|&&b| b).count() < 3 {
        major = vec![true; cands.len()];
    }
    if cands.len() < 2 {
        // Less than one step of the 1..9 grid in range: fall back to linear ticks on the log scale.
        return linear_ticks(lo, hi, axis.percent);
    }
    let minor = span <= 8.0;
    cands
        .iter()
        .zip(major)
        .filter(|&(_, mj)| mj || minor)
        .map(|(&(v, _), mj)| Tick { value: v, label: mj.then(|| label(v)) })
        .collect()
}

/// Labelled ticks at a "nice" step (1, 2, 2.5 or 5 times a power of ten), about 5–8 of them.
fn linear_ticks(lo: f64, hi: f64, percent: bool) -> Vec<Tick> {
    let raw = (hi - lo) / 5.5;
    let mag = pow10(raw.log10().floor() as i32);
    let norm = raw / mag;
    let step = mag
        * [(1.5, 1.0), (2.25, 2.0), (3.5, 2.5), (7.5, 5.0)].iter().find(|c| norm < c.0).map_or(10.0, |c| c.1);
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    if !(step.is_finite() && step > 0.0) || last.saturating_sub(first) > 100 {
        return Vec::new();
    }
    let vals: Vec<f64> = (first..=last).map(|i| i as f64 * step).collect();
    let max_abs = vals.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let (div, suf) = [(1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(d, _)| !percent && max_abs >= 1e4 && max_abs >= d)
        .unwrap_or((1.0, ""));
    vals.into_iter()
        .map(|v| {
            let label = if percent {
                format!("{}%", fixed(v * 100.0, decimals(step * 100.0)))
            } else if !suf.is_empty() && v.abs() < step * 1e-6 {
                "0".to_string()
            } else {
                format!("{}{suf}", fixed(v / div, decimals(step / div)))
            };
            Tick { value: v, label: Some(label) }
        })
        .collect()
}

/// The number of decimals needed to show multiples of `step` exactly.
fn decimals(step: f64) -> usize {
    (0..9)
        .find(|&d| {
            let s = step * 10f64.powi(d as i32);
            (s - s.round()).abs() < 1e-6 * s.max(1.0)
        })
        .unwrap_or(9)
}

/// `v` with `d` decimals, never "-0".
fn fixed(v: f64, d: usize) -> String {
    let s = format!("{v:.d$}");
    if s.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') {
        s.trim_start_matches('-').into()
    } else {
        s
    }
}

/// Compact SI-ish formatting for log-axis labels: 1k, 10M, 1G, 0.5, 1e-5.
fn compact(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && a < 1e-3 {
        let s = format!("{v:.2e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        return format!("{}e{e}", trim(m));
    }
    let (div, suf) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(d, _)| a >= d * (1.0 - 1e-9))
        .unwrap_or((1.0, ""));
    format!("{}{suf}", trim(&format!("{:.3}", v / div)))
}

/// Strip trailing zeros (and a trailing dot) from a decimal string.
fn trim(s: &str) -> String {
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s.to_string() }
}

/// A pixel coordinate with at most 2 decimals.
fn n(v: f64) -> String {
    trim(&fixed(v, 2))
}

/// `text` cut to fit `max_w` pixels at `font` size, ending in "…" when cut.
fn fit(text: &str, max_w: f64, font: f64) -> String {
    if text_w(text, font) <= max_w {
        return text.to_string();
    }
    let mut cut: String = text.to_string();
    while !cut.is_empty() && text_w(&format!("{cut}…"), font) > max_w {
        cut.pop();
    }
    format!("{}…", cut.trim_end())
}

/// Rough rendered width of `s` in a sans-serif font of size `font`.
fn text_w(s: &str, font: f64) -> f64 {
    s.chars().count() as f64 * font * 0.58
}

/// XML-escape text and attribute values; control characters XML 1.0 forbids become U+FFFD.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if c.is_control() && !matches!(c, '\t' | '\n' | '\r') => o.push('\u{fffd}'),
            _ => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_legend_names_are_shortened_with_the_whole_name_as_tooltip() {
        let long = "a very long series name that cannot possibly fit in the legend box of a chart";
        let chart = Chart::new("c", "t", Axis::linear("x"), Axis::linear("y"))
            .series(Series::new(long, "#000000", Mark::Line, vec![(0.0, 0.0), (1.0, 1.0)]))
            .series(Series::new("short", "#ff0000", Mark::Line, vec![(0.0, 1.0)]));
        let svg = chart.to_svg();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let legend = doc.descendants().find(|n| n.attribute("class") == Some("legend")).unwrap();
        let texts: Vec<_> = legend.descendants().filter(|n| n.has_tag_name("text")).collect();
        let shown = texts[0].text().unwrap();
        assert!(shown.ends_with('…') && shown.len() < long.len(), "{shown}");
        assert!(long.starts_with(shown.trim_end_matches('…')));
        assert_eq!(texts[0].children().find(|n| n.has_tag_name("title")).unwrap().text(), Some(long));
        assert_eq!(texts[1].text(), Some("short"));
        assert!(texts[1].children().all(|n| !n.has_tag_name("title")));
    }

    use super::*;

    fn parse(svg: &str) -> roxmltree::Document<'_> {
        roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("invalid XML: {e}\n{svg}"))
    }

    fn texts(doc: &roxmltree::Document, class: &str) -> Vec<(String, f64, f64)> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text") && n.attribute("class") == Some(class))
            .map(|n| {
                let num = |a| n.attribute(a).unwrap().parse::<f64>().unwrap();
                (n.text().unwrap().to_string(), num("x"), num("y"))
            })
            .collect()
    }

    fn circles(doc: &roxmltree::Document) -> Vec<(f64, f64)> {
        doc.descendants()
            .filter(|n| n.has_tag_name("circle") && n.attribute("class") == Some("pt"))
            .map(|n| {
                (n.attribute("cx").unwrap().parse().unwrap(), n.attribute("cy").unwrap().parse().unwrap())
            })
            .collect()
    }

    fn sample_charts() -> Vec<Chart> {
        let line: Vec<(f64, f64)> = (0..2000).map(|i| (f64::from(i), (f64::from(i) / 300.0).sin())).collect();
        vec![
            Chart::new("lin", "Loss", Axis::linear("step"), Axis::linear("loss"))
                .series(Series::new("train", PALETTE[0], Mark::Line, line.clone()))
                .series(
                    Series::new("lr", PALETTE[1], Mark::Step, vec![(0.0, 1.0), (500.0, 0.5), (1500.0, 0.1)])
                        .dashed(),
                ),
            Chart::new("loglog", "Params vs FLOPs", Axis::log("params"), Axis::log("FLOPs")).series(
                Series::new(
                    "B0..B7",
                    PALETTE[2],
                    Mark::LinePoints(Shape::Diamond),
                    vec![(5.3e6, 0.39e9), (66e6, 37e9)],
                ),
            ),
            Chart::new("pct", "Top-1", Axis::linear("epoch"), Axis::linear("acc").percent())
                .series(
                    Series::new(
                        "ours",
                        PALETTE[3],
                        Mark::Points(Shape::Triangle),
                        vec![(1.0, 0.5), (2.0, 0.823)],
                    )
                    .with_labels(vec![Some("B0".into()), None]),
                )
                .series(Series::new("paper", PALETTE[4], Mark::Points(Shape::Cross), vec![(1.0, 0.771)]))
                .series(Series::new("sq", PALETTE[5], Mark::Points(Shape::Square), vec![(1.5, 0.6)])),
            Chart::new("empty", "", Axis::log(""), Axis::linear("")),
            Chart::new("esc<&>", "a \"<b>\" & 'c'", Axis::linear("x<"), Axis::linear("y&"))
                .series(Series::new("<&>\"'", "#000", Mark::Line, vec![(0.0, 0.0), (1.0, 1.0)])),
        ]
    }

    #[test]
    fn svg_is_valid_xml_with_id_title_and_aria() {
        for c in sample_charts() {
            let svg = c.to_svg();
            let doc = parse(&svg);
            let root = doc.root_element();
            assert_eq!(root.tag_name().name(), "svg");
            assert_eq!(root.tag_name().namespace(), Some("http://www.w3.org/2000/svg"));
            assert_eq!(root.attribute("id"), Some(c.id.as_str()));
            assert_eq!(root.attribute("role"), Some("img"));
            assert_eq!(root.attribute("width"), Some("640"));
            assert_eq!(root.attribute("viewBox"), Some("0 0 640 400"));
            assert!(root.attribute("aria-label").is_some());
            assert!(root.first_element_child().is_some_and(|t| t.has_tag_name("title")));
            assert_eq!(svg, c.to_svg(), "deterministic");
        }
    }

    #[test]
    fn escaped_text_round_trips() {
        let c = &sample_charts()[4];
        let svg = c.to_svg();
        let doc = parse(&svg);
        let all: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
        for want in ["<&>\"'", "a \"<b>\" & 'c'", "x<", "y&"] {
            assert!(all.contains(&want), "{want:?} not in {all:?}");
        }
        assert_eq!(doc.root_element().attribute("aria-label"), Some("a \"<b>\" & 'c'"));
        let odd = Chart::new("o", "t\u{1}", Axis::linear(""), Axis::linear("")).to_svg();
        parse(&odd);
        // Extreme values neither hang nor produce invalid XML.
        for pts in [vec![(-1e308, 1.7e308), (1e308, 1e-300)], vec![(1.7e308, 5e-324)]] {
            let c = Chart::new("x", "t", Axis::linear("x"), Axis::log("y")).series(Series::new(
                "s",
                "red",
                Mark::LinePoints(Shape::Circle),
                pts,
            ));
            parse(&c.to_svg());
        }
    }

    #[test]
    fn log_axis_decades_are_labelled_and_equally_spaced() {
        let c = Chart::new("l", "t", Axis::log("params"), Axis::linear("y")).series(Series::new(
            "s",
            PALETTE[0],
            Mark::Points(Shape::Circle),
            vec![(4e6, 1.0), (600e6, 2.0)],
        ));
        let svg = c.to_svg();
        let doc = parse(&svg);
        let xt = texts(&doc, "tx");
        let labels: Vec<&str> = xt.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(labels, ["1M", "10M", "100M", "1G"]);
        let xs: Vec<f64> = xt.iter().map(|t| t.1).collect();
        assert!(xs.windows(2).all(|w| w[1] > w[0]));
        let gaps: Vec<f64> = xs.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|g| (g - gaps[0]).abs() < 0.02), "{gaps:?}");
        // Data inside the 1M..1G frame, in the right order.
        let pts = circles(&doc);
        assert_eq!(pts.len(), 2);
        assert!(pts[0].0 > xs[0] && pts[0].0 < xs[1] && pts[1].0 > xs[2] && pts[1].0 < xs[3]);
    }

    #[test]
    fn log_axis_narrow_range_labels_2_and_5() {
        let ax = Axis::log("x");
        let (lo, hi) = resolve_range(&ax, &[0.3, 4.0]);
        assert_eq!((lo, hi), (0.2, 5.0));
        let labels: Vec<String> = ticks(&ax, lo, hi).into_iter().filter_map(|t| t.label).collect();
        assert_eq!(labels, ["0.2", "0.5", "1", "2", "5"]);
        assert_eq!(resolve_range(&ax, &[0.3, 40.0]), (0.1, 100.0));
        let (lo, hi) = resolve_range(&ax, &[0.55, 0.8]);
        let labels: Vec<String> = ticks(&ax, lo, hi).into_iter().filter_map(|t| t.label).collect();
        assert_eq!(labels, ["0.5", "0.6", "0.7", "0.8", "0.9", "1"]);
        assert_eq!(compact(1e3), "1k");
        assert_eq!(compact(2.5e6), "2.5M");
        assert_eq!(compact(1e9), "1G");
        assert_eq!(compact(1e-5), "1e-5");
        assert_eq!(compact(0.1), "0.1");
    }

    #[test]
    fn linear_tick_labels() {
        let labels = |lo, hi, pct| -> Vec<String> {
            linear_ticks(lo, hi, pct).into_iter().map(|t| t.label.unwrap()).collect()
        };
        assert_eq!(labels(0.0, 1.0, true), ["0%", "20%", "40%", "60%", "80%", "100%"]);
        assert_eq!(labels(-0.05, 1.05, true), ["0%", "20%", "40%", "60%", "80%", "100%"]);
        assert_eq!(labels(0.8, 0.9, true), ["80%", "82%", "84%", "86%", "88%", "90%"]);
        assert_eq!(labels(0.8, 0.95, true), ["80.0%", "82.5%", "85.0%", "87.5%", "90.0%", "92.5%", "95.0%"]);
        assert_eq!(labels(0.0, 1.5, false), ["0.00", "0.25", "0.50", "0.75", "1.00", "1.25", "1.50"]);
        assert_eq!(labels(0.0, 100.0, false), ["0", "20", "40", "60", "80", "100"]);
        assert_eq!(labels(0.0, 50000.0, false), ["0", "10k", "20k", "30k", "40k", "50k"]);
        assert_eq!(labels(-1.0, 1.0, false), ["-1.0", "-0.5", "0.0", "0.5", "1.0"]);
        // A percent chart fitted to [0, 1] shows 0%..100% on its y axis.
        let c = Chart::new("p", "t", Axis::linear("x"), Axis::linear("acc").percent()).series(Series::new(
            "s",
            PALETTE[0],
            Mark::Line,
            vec![(0.0, 0.0), (1.0, 1.0)],
        ));
        let svg = c.to_svg();
        let doc = parse(&svg);
        let yt = texts(&doc, "ty");
        let got: Vec<&str> = yt.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(got, ["0%", "20%", "40%", "60%", "80%", "100%"]);
        assert!(yt.windows(2).all(|w| w[1].2 < w[0].2), "higher values drawn higher");
    }

    #[test]
    fn pixel_mapping_is_monotone() {
        let c = Chart::new("m", "t", Axis::linear("x"), Axis::linear("y")).series(Series::new(
            "s",
            PALETTE[0],
            Mark::Points(Shape::Circle),
            vec![(1.0, 1.0), (2.0, 3.0)],
        ));
        let pts = circles(&parse(&c.to_svg()));
        assert_eq!(pts.len(), 2);
        assert!(pts[1].0 > pts[0].0, "larger x is further right");
        assert!(pts[1].1 < pts[0].1, "larger y is higher up");
    }

    #[test]
    fn undrawable_points_are_skipped() {
        let pts =
            vec![(1.0, 1.0), (f64::NAN, 2.0), (2.0, f64::INFINITY), (3.0, -1.0), (4.0, 0.0), (5.0, 4.0)];
        let c = Chart::new("s", "t", Axis::linear("x"), Axis::log("y")).series(Series::new(
            "s",
            PALETTE[0],
            Mark::LinePoints(Shape::Circle),
            pts.clone(),
        ));
        let svg = c.to_svg();
        assert_eq!(circles(&parse(&svg)).len(), 2);
        let lin = Chart::new("s", "t", Axis::linear("x"), Axis::linear("y")).series(Series::new(
            "s",
            PALETTE[0],
            Mark::Points(Shape::Circle),
            pts,
        ));
        assert_eq!(circles(&parse(&lin.to_svg())).len(), 4);
        // Nothing drawable at all: axes plus "no data".
        let none = Chart::new("n", "t", Axis::log("x"), Axis::log("y")).series(Series::new(
            "s",
            PALETTE[0],
            Mark::Line,
            vec![(0.0, 1.0), (f64::NAN, 1.0)],
        ));
        let svg = none.to_svg();
        let doc = parse(&svg);
        assert!(doc.descendants().any(|n| n.text() == Some("no data")));
        assert!(!doc.descendants().any(|n| n.attribute("class") == Some("line")));
    }

    #[test]
    fn one_path_per_line_and_clipped_to_plot() {
        let c = &sample_charts()[0];
        let svg = c.to_svg();
        let doc = parse(&svg);
        let lines: Vec<_> = doc.descendants().filter(|n| n.attribute("class") == Some("line")).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].attribute("stroke-dasharray"), Some("6 4"));
        assert!(svg.len() < 60_000, "{} bytes", svg.len());
        // A fixed range clips lines to the frame and drops markers outside it.
        let c = Chart::new(
            "c",
            "t",
            Axis::linear("x").with_range(0.0, 1.0),
            Axis::linear("y").with_range(0.0, 1.0),
        )
        .series(Series::new(
            "s",
            "red",
            Mark::LinePoints(Shape::Circle),
            vec![(-1.0, 0.5), (0.5, 0.5), (2.0, 0.5)],
        ));
        let svg = c.to_svg();
        let doc = parse(&svg);
        assert_eq!(circles(&doc).len(), 1);
        let d =
            doc.descendants().find(|n| n.attribute("class") == Some("line")).unwrap().attribute("d").unwrap();
        let xs: Vec<f64> = d
            .split(['M', 'L'])
            .filter(|p| !p.is_empty())
            .map(|p| p.split(' ').next().unwrap().parse().unwrap())
            .collect();
        let tx: Vec<f64> = texts(&doc, "tx").iter().map(|t| t.1).collect();
        assert_eq!(xs.first(), tx.first());
        assert_eq!(xs.last(), tx.last());
    }

    #[test]
    fn no_external_references() {
        for c in sample_charts() {
            let svg = c.to_svg();
            assert_eq!(svg.matches("http").count(), 1);
            assert!(svg.contains("xmlns=\"http://www.w3.org/2000/svg\""));
            for bad in ["href", "<script", "url(", "@import", "<style"] {
                assert!(!svg.contains(bad), "{bad}");
            }
        }
    }
}
