//! `report.md` and `report.html` from a [`Report`], and the charts both show. Every figure is
//! formatted by [`crate::format`] from the report's values, so the two documents and
//! `report.json` agree.

use std::fmt::Write as _;

use crate::format::{count, duration, epochs, fixed, megabytes, percent, percent1, ratio};
use crate::job::JobReport;
use crate::svg::{Axis, Chart, Mark, PALETTE, Series, Shape};
use crate::{MeasuredRow, Report};

const REFERENCE_COLOR: &str = "#1f77b4";
const OTHER_COLOR: &str = "#7f7f7f";
const MEASURED_COLOR: &str = "#d62728";

/// A short label for a measured point: what it is and on what.
pub fn measured_label(row: &MeasuredRow) -> String {
    format!(
        "{} · {} · {}px · {} ep{}",
        row.label,
        row.dataset,
        row.resolution,
        epochs(row.epochs),
        if row.imagenet { "" } else { " (not ImageNet)" }
    )
}

fn accuracy_chart(report: &Report, id: &str, title: &str, x_label: &str, flops: bool) -> Chart {
    let x = |params: f64, flops_value: Option<f64>| if flops { flops_value } else { Some(params) };
    let mut chart = Chart::new(id, title, Axis::log(x_label), Axis::linear("top-1 accuracy").percent());
    let efficientnets: Vec<_> = report.reference.rows.iter().filter(|r| r.efficientnet).collect();
    let points: Vec<(f64, f64)> =
        efficientnets.iter().filter_map(|r| Some((x(r.params, r.flops)?, r.top1))).collect();
    let labels = efficientnets
        .iter()
        .filter(|r| x(r.params, r.flops).is_some())
        .map(|r| Some(r.model.trim_start_matches("EfficientNet-").to_string()))
        .collect();
    chart.push(
        Series::new("EfficientNet B0–B7 (paper)", REFERENCE_COLOR, Mark::LinePoints(Shape::Circle), points)
            .with_labels(labels),
    );
    // The other models are named in the table; labels here would cover each other.
    let others = report.reference.rows.iter().filter(|r| !r.efficientnet);
    chart.push(Series::new(
        "other models (paper)",
        OTHER_COLOR,
        Mark::Points(Shape::Square),
        others.filter_map(|r| Some((x(r.params, r.flops)?, r.top1))).collect(),
    ));
    for (i, row) in report.measured.iter().enumerate() {
        let color = if i == 0 { MEASURED_COLOR } else { PALETTE[(i + 2) % PALETTE.len()] };
        let value = if flops { row.flops } else { row.params };
        let ema = row.weights == "ema";
        // The raw row's point says what it was measured on; its EMA twin sits beside it.
        let label = (!ema).then(|| measured_label(row));
        chart.push(
            Series::new(
                &if report.jobs.len() > 1 {
                    format!("{} [{}]", row.label, row.job)
                } else {
                    row.label.clone()
                },
                color,
                Mark::Points(if ema { Shape::Triangle } else { Shape::Diamond }),
                vec![(value, row.top1)],
            )
            .with_labels(vec![label]),
        );
    }
    chart
}

fn job_color(index: usize) -> &'static str {
    PALETTE[index % PALETTE.len()]
}

/// Every chart of the report, in order. Their ids name the SVG files of `report.md`.
pub fn charts(report: &Report) -> Vec<Chart> {
    let mut charts = vec![
        accuracy_chart(report, "accuracy-vs-params", "Top-1 accuracy vs parameters", "parameters", false),
        accuracy_chart(report, "accuracy-vs-flops", "Top-1 accuracy vs FLOPs", "FLOPs (multiply-adds)", true),
    ];
    let many = report.jobs.len() > 1;
    let name =
        |job: &JobReport, what: &str| if many { format!("{} {what}", job.name) } else { what.to_string() };
    let mut loss = Chart::new("loss", "Training loss", Axis::linear("epoch"), Axis::linear("loss"));
    let mut accuracy = Chart::new(
        "val-accuracy",
        "Validation top-1",
        Axis::linear("epoch"),
        Axis::linear("top-1").percent(),
    );
    let mut lr = Chart::new("lr", "Learning rate", Axis::linear("epoch"), Axis::linear("learning rate"));
    let mut drop_path =
        Chart::new("drop-path", "Drop-path rate (last block)", Axis::linear("epoch"), Axis::linear("rate"));
    let mut speed = Chart::new(
        "throughput",
        "Training throughput",
        Axis::linear("minutes since the first start"),
        Axis::linear("images/s"),
    );
    let mut wait = Chart::new(
        "data-wait",
        "Share of step time waiting for data",
        Axis::linear("epoch"),
        Axis::linear("data wait").percent(),
    );
    for (j, job) in report.jobs.iter().enumerate() {
        for (k, (attempt, points)) in job.series.loss.iter().enumerate() {
            let color = if many { job_color(j) } else { job_color(k) };
            let label = if job.series.loss.len() > 1 {
                name(job, &format!("attempt {attempt}"))
            } else {
                name(job, "loss")
            };
            // Several jobs: one colour per job, later attempts dashed.
            let series = Series::new(&label, color, Mark::Line, points.clone());
            loss.push(if many && k > 0 { series.dashed() } else { series });
        }
        const SHAPES: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Diamond];
        for (k, (attempt, points)) in job.series.throughput.iter().enumerate() {
            let color = if many { job_color(j) } else { job_color(k) };
            let shape = if many { SHAPES[k % SHAPES.len()] } else { Shape::Circle };
            speed.push(Series::new(
                &name(job, &format!("attempt {attempt}")),
                color,
                Mark::Points(shape),
                points.clone(),
            ));
        }
        let raw: Vec<(f64, f64)> = job.evals.iter().map(|e| (e.epoch, e.top1)).collect();
        let ema: Vec<(f64, f64)> = job.evals.iter().filter_map(|e| Some((e.epoch, e.ema_top1?))).collect();
        if !raw.is_empty() {
            accuracy.push(Series::new(
                &name(job, "raw"),
                job_color(2 * j),
                Mark::LinePoints(Shape::Circle),
                raw,
            ));
        }
        if !ema.is_empty() {
            accuracy.push(
                Series::new(&name(job, "EMA"), job_color(2 * j + 1), Mark::LinePoints(Shape::Triangle), ema)
                    .dashed(),
            );
        }
        lr.push(Series::new(&name(job, "lr"), job_color(j), Mark::Line, job.series.lr.clone()));
        drop_path.push(Series::new(
            &name(job, "drop path"),
            job_color(j),
            Mark::Line,
            job.series.drop_path.clone(),
        ));
        wait.push(Series::new(
            &name(job, "data wait"),
            job_color(j),
            Mark::Line,
            job.series.data_wait.clone(),
        ));
    }
    charts.extend([loss, accuracy, lr, drop_path, speed, wait]);
    charts
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Markdown table cells cannot hold `|` or newlines.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// A table as header and rows of already formatted cells.
struct Table {
    id: &'static str,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    /// Rows (by index) that start a new part, with a caption.
    parts: Vec<(usize, String)>,
}

impl Table {
    fn new(id: &'static str, header: &[&str]) -> Table {
        Table {
            id,
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            parts: Vec::new(),
        }
    }

    fn part(&mut self, caption: &str) {
        self.parts.push((self.rows.len(), caption.to_string()));
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn markdown(&self, out: &mut String) {
        let _ = writeln!(out, "| {} |", self.header.iter().map(|h| cell(h)).collect::<Vec<_>>().join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(self.header.len()));
        for (i, row) in self.rows.iter().enumerate() {
            if let Some((_, caption)) = self.parts.iter().find(|(at, _)| *at == i) {
                let mut cells = vec![format!("**{}**", cell(caption))];
                cells.resize(self.header.len(), String::new());
                let _ = writeln!(out, "| {} |", cells.join(" | "));
            }
            let _ = writeln!(out, "| {} |", row.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | "));
        }
        out.push('\n');
    }

    fn html(&self, out: &mut String) {
        let _ = write!(out, "<table id=\"{}\"><thead><tr>", self.id);
        for h in &self.header {
            let _ = write!(out, "<th>{}</th>", escape(h));
        }
        out.push_str("</tr></thead><tbody>\n");
        for (i, row) in self.rows.iter().enumerate() {
            if let Some((_, caption)) = self.parts.iter().find(|(at, _)| *at == i) {
                let _ = writeln!(
                    out,
                    "<tr class=\"part\"><td colspan=\"{}\">{}</td></tr>",
                    self.header.len(),
                    escape(caption)
                );
            }
            out.push_str("<tr>");
            for c in row {
                // Figures align right, words left.
                let numeric =
                    c.len() < 16 && c.starts_with(|ch: char| ch.is_ascii_digit() || ch == '–' || ch == '-');
                let class = if numeric { " class=\"num\"" } else { "" };
                let _ = write!(out, "<td{class}>{}</td>", escape(c));
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</tbody></table>\n");
    }
}

fn accuracy_table(report: &Report) -> Table {
    let mut table = Table::new(
        "accuracy-table",
        &[
            "model",
            "dataset",
            "resolution",
            "epochs",
            "top-1",
            "top-5",
            "params",
            "params ratio",
            "FLOPs",
            "FLOPs ratio",
            "ratios relative to",
        ],
    );
    table.part("The paper's Table 2 (ImageNet)");
    for row in &report.reference.rows {
        table.row(vec![
            row.model.clone(),
            "ImageNet".into(),
            "–".into(),
            "–".into(),
            percent1(row.top1),
            percent1(row.top5),
            count(row.params),
            ratio(row.params_ratio),
            row.flops.map(count).unwrap_or("–".into()),
            row.flops_ratio.map(ratio).unwrap_or("–".into()),
            row.group.clone(),
        ]);
    }
    if !report.measured.is_empty() {
        table.part("Measured here (dataset as named: only ImageNet rows compare with the paper's accuracy)");
    }
    for row in &report.measured {
        table.row(vec![
            format!("{} [{}]", row.label, row.job),
            format!("{} ({} classes)", row.dataset, row.classes),
            format!("{}×{}", row.resolution, row.resolution),
            epochs(row.epochs),
            percent(row.top1),
            percent(row.top5),
            count(row.params),
            ratio(row.params_ratio),
            count(row.flops),
            row.flops_ratio.map(ratio).unwrap_or("–".into()),
            format!("{} ({})", row.reference, row.reference_basis),
        ]);
    }
    table
}

fn summary_table(job: &JobReport) -> Table {
    let mut table = Table::new("job-summary", &["", ""]);
    let mut add = |k: &str, v: String| table.row(vec![k.to_string(), v]);
    add("status", job.status.clone());
    add(
        "model",
        format!(
            "{} at {}×{}, {} classes, {} input channel(s), {} parameters, {} FLOPs",
            job.model.architecture,
            job.model.resolution,
            job.model.resolution,
            job.model.classes,
            job.model.input_channels,
            count(job.model.params),
            count(job.model.flops)
        ),
    );
    add("training data", format!("{} ({} samples)", job.data.train, job.data.train_samples));
    add(
        "validation data",
        match (&job.data.val, job.data.val_samples) {
            (Some(name), Some(n)) => format!("{name} ({n} samples)"),
            (Some(name), None) => name.clone(),
            _ => "none".into(),
        },
    );
    add(
        "trained",
        format!(
            "{} of {} steps = {} of {} epochs, global batch {}, {} worker(s)",
            job.steps_done,
            job.total_steps,
            epochs(job.epochs_done),
            epochs(job.epochs_planned),
            job.global_batch,
            job.world_size
        ),
    );
    add(
        "throughput",
        format!(
            "{} images/s; data wait {} and all-reduce {} of step time",
            fixed(job.throughput.images_per_s, 1),
            percent(job.throughput.data_wait_fraction),
            percent(job.throughput.comm_fraction)
        ),
    );
    add(
        "time",
        format!(
            "{} wall over {} attempt(s), {} restart(s), {} lost to interruptions",
            duration(job.wall_s),
            job.attempts.len(),
            job.restarts,
            duration(job.time_lost_s)
        ),
    );
    if let Some(bytes) = job.peak_memory_bytes {
        add("peak memory", format!("{} (resident, trainer process)", megabytes(bytes as f64)));
    }
    if let Some(bytes) = job.gpu_memory_peak_bytes {
        add("peak GPU memory", format!("{} (held by tensors, rank 0)", megabytes(bytes as f64)));
    }
    add("skipped samples", format!("{} (unusable; keys in metrics.jsonl)", job.skipped_samples));
    for note in &job.notes {
        add("note", note.clone());
    }
    if job.unreadable_lines > 0 {
        add(
            "unreadable log lines",
            format!("{} in metrics.jsonl (a torn line after a crash)", job.unreadable_lines),
        );
    }
    table
}

fn evals_table(job: &JobReport) -> Table {
    let mut table = Table::new(
        "evaluations",
        &["step", "epoch", "top-1", "top-5", "loss", "EMA top-1", "EMA top-5", "EMA loss"],
    );
    for e in &job.evals {
        table.row(vec![
            e.step.to_string(),
            epochs(e.epoch),
            percent(e.top1),
            percent(e.top5),
            fixed(e.loss, 4),
            e.ema_top1.map(percent).unwrap_or("–".into()),
            e.ema_top5.map(percent).unwrap_or("–".into()),
            e.ema_loss.map(|l| fixed(l, 4)).unwrap_or("–".into()),
        ]);
    }
    table
}

fn per_class_table(job: &JobReport) -> Option<Table> {
    let evaluation = job.final_evaluation.as_ref()?;
    let mut header = vec!["class", "samples", "top-1"];
    if evaluation.ema.is_some() {
        header.push("EMA top-1");
    }
    let mut table = Table::new("per-class", &header);
    for (i, class) in evaluation.raw.classes.iter().enumerate() {
        let mut row = vec![
            class.class.clone(),
            class.samples.to_string(),
            class.top1.map(percent).unwrap_or("–".into()),
        ];
        if let Some(ema) = &evaluation.ema {
            row.push(ema.classes.get(i).and_then(|c| c.top1).map(percent).unwrap_or("–".into()));
        }
        table.row(row);
    }
    Some(table)
}

/// The confusion matrix of the raw weights when it is small enough to read, else its largest
/// off-diagonal cells.
fn confusion_table(job: &JobReport) -> Option<Table> {
    let evaluation = &job.final_evaluation.as_ref()?.raw;
    let names: Vec<&str> = evaluation.classes.iter().map(|c| c.class.as_str()).collect();
    if names.len() <= 20 {
        let mut header = vec!["true \\ predicted".to_string()];
        header.extend(names.iter().map(|n| n.to_string()));
        let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
        let mut table = Table::new("confusion", &header_refs);
        for (name, row) in names.iter().zip(&evaluation.confusion) {
            let mut cells = vec![name.to_string()];
            cells.extend(row.iter().map(|c| c.to_string()));
            table.row(cells);
        }
        Some(table)
    } else {
        let mut cells: Vec<(u64, usize, usize)> = Vec::new();
        for (t, row) in evaluation.confusion.iter().enumerate() {
            for (p, &c) in row.iter().enumerate() {
                if t != p && c > 0 {
                    cells.push((c, t, p));
                }
            }
        }
        cells.sort_by(|a, b| b.0.cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        let mut table = Table::new("confusion", &["true class", "predicted as", "samples"]);
        for (c, t, p) in cells.into_iter().take(20) {
            table.row(vec![names[t].to_string(), names[p].to_string(), c.to_string()]);
        }
        Some(table)
    }
}

fn attempts_table(job: &JobReport) -> Table {
    let mut table = Table::new(
        "attempts",
        &[
            "attempt",
            "started",
            "from step",
            "to step",
            "outcome",
            "steps redone",
            "time lost",
            "of which downtime",
        ],
    );
    for a in &job.attempts {
        table.row(vec![
            a.attempt.to_string(),
            crate::format::utc_iso(a.started_at),
            a.start_step.to_string(),
            a.last_step.to_string(),
            a.outcome.clone(),
            a.redone_steps.to_string(),
            duration(a.lost_s),
            duration(a.downtime_s),
        ]);
    }
    table
}

fn checkpoints_table(job: &JobReport) -> Table {
    let mut table = Table::new("checkpoints", &["step", "attempt", "size", "save time"]);
    for c in &job.checkpoints {
        table.row(vec![
            c.step.to_string(),
            c.attempt.to_string(),
            megabytes(c.bytes as f64),
            format!("{} s", fixed(c.save_s, 2)),
        ]);
    }
    table
}

fn environment_table(job: &JobReport) -> Table {
    let mut table = Table::new("environment", &["", ""]);
    if let Some(object) = job.environment.as_object() {
        for (key, value) in object {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "–".into(),
                other => other.to_string(),
            };
            table.row(vec![key.clone(), text]);
        }
    }
    table
}

fn headline(report: &Report) -> String {
    let names: Vec<&str> = report.jobs.iter().map(|j| j.name.as_str()).collect();
    format!("effnet report: {}", names.join(", "))
}

fn note(report: &Report) -> String {
    format!(
        "Generated {} by {}. Reference rows: {}. Measured rows name the dataset they were evaluated on; \
         a number on another dataset is not an ImageNet accuracy.",
        report.generated_at, report.generated_by, report.reference.source
    )
}

/// One part of the report, written as Markdown or as HTML.
enum Block {
    /// A heading of `level` (1–3), with an optional trailing code span (`Job x (`dir`)`).
    Heading(u8, String, Option<String>),
    /// The paragraph under the title (greyed in HTML).
    Note(String),
    Text(String),
    Table(Table),
    /// Charts by index into the report's charts.
    Charts(std::ops::Range<usize>),
    /// A collapsed section in HTML, a heading and a fenced block in Markdown.
    Details {
        summary: String,
        language: &'static str,
        body: String,
    },
}

/// The report's structure, shared by both documents.
fn blocks(report: &Report, charts: &[Chart]) -> Vec<Block> {
    let mut blocks = vec![
        Block::Heading(1, headline(report), None),
        Block::Note(note(report)),
        Block::Heading(2, "Accuracy against parameters and FLOPs".into(), None),
        Block::Table(accuracy_table(report)),
        Block::Charts(0..2),
        Block::Heading(2, "Training curves".into(), None),
        Block::Charts(2..charts.len()),
    ];
    for job in &report.jobs {
        blocks.push(Block::Heading(2, format!("Job {}", job.name), Some(job.dir.clone())));
        if let Some(description) = &job.description {
            blocks.push(Block::Text(format!("What was trained, and why: {description}")));
        }
        blocks.push(Block::Table(summary_table(job)));
        if !job.evals.is_empty() {
            blocks.push(Block::Heading(3, "Evaluations during training".into(), None));
            blocks.push(Block::Table(evals_table(job)));
        }
        if let Some(table) = per_class_table(job) {
            let e = &job.final_evaluation.as_ref().expect("per-class needs it").raw;
            blocks.push(Block::Heading(
                3,
                format!(
                    "Final evaluation: {} (step {}, {} samples of {})",
                    e.checkpoint, e.step, e.samples, e.data
                ),
                None,
            ));
            blocks.push(Block::Table(table));
            if let Some(confusion) = confusion_table(job) {
                blocks.push(Block::Text(
                    "Confusion (raw weights; rows: true class, columns: predicted):".into(),
                ));
                blocks.push(Block::Table(confusion));
            }
        }
        blocks.push(Block::Heading(3, "Attempts, restarts and time lost".into(), None));
        blocks.push(Block::Table(attempts_table(job)));
        blocks.push(Block::Heading(3, "Checkpoints".into(), None));
        blocks.push(Block::Table(checkpoints_table(job)));
        blocks.push(Block::Heading(3, "Environment".into(), None));
        blocks.push(Block::Table(environment_table(job)));
        blocks.push(Block::Details {
            summary: "Configuration (resolved job spec)".into(),
            language: "json",
            body: serde_json::to_string_pretty(&job.config).unwrap_or_default(),
        });
    }
    blocks
}

/// Both documents and the charts they show (built once).
pub struct Documents {
    pub markdown: String,
    pub html: String,
    pub charts: Vec<Chart>,
}

pub fn documents(report: &Report) -> Documents {
    let charts = charts(report);
    let blocks = blocks(report, &charts);
    Documents { markdown: to_markdown(&blocks, &charts), html: to_html(report, &blocks, &charts), charts }
}

/// Markdown with the plots as SVG files beside it (`<chart id>.svg`).
pub fn markdown(report: &Report) -> String {
    documents(report).markdown
}

/// One self-contained HTML file: inline CSS and SVG, no script, and a content security policy
/// that forbids every fetch.
pub fn html(report: &Report) -> String {
    documents(report).html
}

fn to_markdown(blocks: &[Block], charts: &[Chart]) -> String {
    let mut out = String::new();
    for block in blocks {
        match block {
            Block::Heading(level, text, code) => {
                let code = code.as_ref().map(|c| format!(" (`{c}`)")).unwrap_or_default();
                let _ = writeln!(out, "{} {text}{code}\n", "#".repeat(*level as usize));
            }
            Block::Note(text) | Block::Text(text) => {
                let _ = writeln!(out, "{text}\n");
            }
            Block::Table(table) => table.markdown(&mut out),
            Block::Charts(range) => {
                for chart in &charts[range.clone()] {
                    let _ = writeln!(out, "![{}]({}.svg)\n", chart.title, chart.id);
                }
            }
            Block::Details { summary, language, body } => {
                let _ = writeln!(out, "### {summary}\n\n```{language}\n{body}\n```\n");
            }
        }
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}\
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:1em 0;font-size:.9em}\
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}\
th{background:#f4f4f4}td.num{text-align:right;white-space:nowrap}\
tr.part td{background:#eef3fa;font-weight:bold;text-align:left}\
.charts{display:flex;flex-wrap:wrap;gap:1em}.charts>svg{width:calc(50% - .5em);height:auto}.note{color:#555}\
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}";

fn to_html(report: &Report, blocks: &[Block], charts: &[Chart]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{}</title><style>{STYLE}</style></head><body>\n",
        escape(&headline(report))
    );
    for block in blocks {
        match block {
            Block::Heading(level, text, code) => {
                let code =
                    code.as_ref().map(|c| format!(" (<code>{}</code>)", escape(c))).unwrap_or_default();
                let _ = writeln!(out, "<h{level}>{}{code}</h{level}>", escape(text));
            }
            Block::Note(text) => {
                let _ = writeln!(out, "<p class=\"note\">{}</p>", escape(text));
            }
            Block::Text(text) => {
                let _ = writeln!(out, "<p>{}</p>", escape(text));
            }
            Block::Table(table) => table.html(&mut out),
            Block::Charts(range) => {
                out.push_str("<div class=\"charts\">");
                for chart in &charts[range.clone()] {
                    out.push_str(&chart.to_svg());
                }
                out.push_str("</div>\n");
            }
            Block::Details { summary, body, .. } => {
                let _ = writeln!(
                    out,
                    "<details><summary>{}</summary><pre>{}</pre></details>",
                    escape(summary),
                    escape(body)
                );
            }
        }
    }
    out.push_str("</body></html>\n");
    out
}
