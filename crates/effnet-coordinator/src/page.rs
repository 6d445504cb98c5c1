//! `/`: one self-contained HTML page (inline CSS and SVG, no scripts or external assets) with
//! every job's state, workers, step, throughput, loss curve and newest checkpoint. It reloads
//! itself every few seconds.

use std::fmt::Write as _;

use crate::protocol::{JobSummary, ProgressRecord};

/// Seconds between reloads of the page.
const REFRESH_S: u32 = 5;

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

fn or_dash<T>(value: Option<T>, format: impl Fn(T) -> String) -> String {
    value.map_or_else(|| "–".to_string(), format)
}

/// An inline SVG polyline of rank 0's loss over steps; empty when there are fewer than two points.
pub fn loss_curve(records: &[ProgressRecord]) -> String {
    let points: Vec<(f64, f64)> = records
        .iter()
        .filter(|record| record.rank == 0)
        .filter_map(|record| {
            record.loss.filter(|loss| loss.is_finite()).map(|loss| (record.step as f64, loss))
        })
        .collect();
    if points.len() < 2 {
        return String::new();
    }
    let (width, height) = (240.0, 48.0);
    let (min_x, max_x) =
        points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), (x, _)| (lo.min(*x), hi.max(*x)));
    let (min_y, max_y) =
        points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), (_, y)| (lo.min(*y), hi.max(*y)));
    let span_x = (max_x - min_x).max(1.0);
    let span_y = (max_y - min_y).max(1e-12);
    let path: Vec<String> = points
        .iter()
        .map(|(x, y)| {
            format!("{:.1},{:.1}", (x - min_x) / span_x * width, height - (y - min_y) / span_y * height)
        })
        .collect();
    format!(
        "<svg width=\"{width}\" height=\"{height}\" viewBox=\"-2 -2 {} {}\" role=\"img\" aria-label=\"loss from {max_y:.3} to {min_y:.3}\">\
         <polyline fill=\"none\" stroke=\"#1f6feb\" stroke-width=\"1.5\" points=\"{}\"/></svg>",
        width + 4.0,
        height + 4.0,
        path.join(" ")
    )
}

/// The page for `jobs`, with `curves[i]` the progress records of `jobs[i]`, at time `now`.
pub fn render(jobs: &[JobSummary], curves: &[Vec<ProgressRecord>], now: f64) -> String {
    let mut rows = String::new();
    for (job, records) in jobs.iter().zip(curves) {
        let checkpoint = or_dash(job.last_checkpoint.as_ref(), |c| {
            format!(
                "step {} ({:.0} s ago)<br><small>{}</small>",
                c.step,
                (now - c.reported_at).max(0.0),
                escape(&c.url)
            )
        });
        let generation = match job.generation_state {
            Some(state) => format!("{} ({})", job.generation, state.as_str()),
            None => "–".to_string(),
        };
        let _ = writeln!(
            rows,
            "<tr><td><b>{id}</b><br><small>{name}</small></td><td class=\"{state}\">{state}</td><td>{generation}</td>\
             <td>{workers} / {world}</td><td>{step}</td><td>{epoch}</td><td>{throughput}</td><td>{loss}</td>\
             <td>{curve}</td><td>{restarts}</td><td>{checkpoint}</td></tr>",
            id = escape(&job.id),
            name = escape(&job.name),
            state = job.state.as_str(),
            workers = job.workers,
            world = job.world_size,
            step = or_dash(job.step, |s| s.to_string()),
            epoch = or_dash(job.epoch, |e| format!("{e:.2}")),
            throughput = or_dash(job.images_per_s, |r| format!("{r:.1} img/s")),
            loss = or_dash(job.loss, |l| format!("{l:.4}")),
            curve = loss_curve(records),
            restarts = job.restarts,
        );
    }
    if jobs.is_empty() {
        rows.push_str("<tr><td colspan=\"11\">No jobs yet: <code>effnet submit JOB.yaml --coordinator URL</code></td></tr>\n");
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_S}\"><title>effnet coordinator</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}\
         table{{border-collapse:collapse}}th,td{{border-bottom:1px solid #ddd;padding:.4em .8em;text-align:left;vertical-align:top}}\
         th{{background:#f4f4f4}}.running{{color:#1a7f37}}.failed{{color:#cf222e}}.cancelled{{color:#6e7781}}\
         .succeeded{{color:#0969da}}.queued{{color:#9a6700}}small{{color:#57606a}}</style></head>\n\
         <body><h1>effnet coordinator</h1><p>{count} job(s); this page reloads every {REFRESH_S} s.</p>\n\
         <table><thead><tr><th>job</th><th>state</th><th>generation</th><th>workers</th><th>step</th><th>epoch</th>\
         <th>throughput</th><th>loss</th><th>loss curve (rank 0)</th><th>restarts</th><th>last checkpoint</th></tr></thead>\n\
         <tbody>\n{rows}</tbody></table></body></html>\n",
        count = jobs.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, loss: f64) -> ProgressRecord {
        ProgressRecord {
            at: 0.0,
            worker_id: "w1".into(),
            generation: 1,
            rank: 0,
            step,
            epoch: None,
            images_per_s: None,
            loss: Some(loss),
        }
    }

    #[test]
    fn loss_curve_spans_the_box_from_first_to_last_step() {
        let svg = loss_curve(&[record(0, 2.0), record(10, 1.0), record(20, 0.5)]);
        // Highest loss at the top (y 0), lowest at the bottom (y 48), steps across 240 px.
        assert!(svg.contains("points=\"0.0,0.0 120.0,32.0 240.0,48.0\""), "{svg}");
        assert_eq!(loss_curve(&[record(0, 2.0)]), "");
    }

    #[test]
    fn page_escapes_names_and_has_no_external_assets() {
        let html = render(&[], &[], 0.0);
        assert!(html.contains("No jobs yet"));
        assert!(!html.contains("src="), "{html}");
        assert!(!html.contains("href="), "{html}");
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }
}
