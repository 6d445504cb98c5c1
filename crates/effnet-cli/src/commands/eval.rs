//! `effnet eval --checkpoint URL --data URL [--ema] [--json]`: evaluate one committed checkpoint.

use anyhow::Result;
use clap::Args;
use effnet_train::evaluate::{CheckpointEvalOptions, CheckpointReport, evaluate_checkpoint};

use super::positive_u32;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A committed checkpoint directory (`.../checkpoints/step-NNNNNNNN`, any store URL).
    #[arg(long, value_name = "URL")]
    checkpoint: String,
    /// The dataset to evaluate on (its classes must be the model's).
    #[arg(long, value_name = "URL")]
    data: String,
    /// Evaluate the EMA weights instead of the raw ones.
    #[arg(long)]
    ema: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    batch_size: i64,
    /// Only the first N samples.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    max_samples: Option<i64>,
    /// libtorch threads (default: all cores).
    #[arg(long, allow_negative_numbers = true)]
    threads: Option<i64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let options = CheckpointEvalOptions {
        checkpoint: args.checkpoint,
        data: args.data,
        ema: args.ema,
        batch_size: positive_u32("--batch-size", args.batch_size)? as usize,
        max_samples: args.max_samples.map(|n| positive_u32("--max-samples", n)).transpose()?.map(u64::from),
        threads: args.threads.map(|n| positive_u32("--threads", n)).transpose()?.map(|n| n as usize),
    };
    let report = evaluate_checkpoint(&options)?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(report: &CheckpointReport) {
    out!(
        "checkpoint   {} (step {}, epoch {}, job {}, {} weights)",
        report.checkpoint,
        report.step,
        report.epoch,
        report.job,
        report.weights
    );
    out!(
        "model        {}, {} parameters, {:.3} GFLOPs at {}×{}",
        report.architecture,
        report.parameters,
        report.gflops,
        report.resolution,
        report.resolution
    );
    out!("data         {} ({} samples)", report.data, report.samples);
    out!("top-1        {:.2}%", report.top1 * 100.0);
    out!("top-5        {:.2}%", report.top5 * 100.0);
    out!("loss         {:.4}", report.loss);
    out!(
        "throughput   {:.1} images/s on {}{}",
        report.images_per_s,
        report.device,
        report
            .peak_memory_bytes
            .map(|b| format!(", peak memory {:.0} MB", b as f64 / 1e6))
            .unwrap_or_default()
    );
    out!();
    let width = report.classes.iter().map(|c| c.class.len()).max().unwrap_or(5).max(5);
    out!("{:<width$}  {:>7}  {:>7}", "class", "samples", "top-1");
    for class in &report.classes {
        let top1 = class.top1.map(|t| format!("{:.2}%", t * 100.0)).unwrap_or_else(|| "-".into());
        out!("{:<width$}  {:>7}  {:>7}", class.class, class.samples, top1);
    }
    out!();
    out!("confusion (rows: true class, columns: predicted, in class order)");
    for (class, row) in report.classes.iter().zip(&report.confusion) {
        let cells: Vec<String> = row.iter().map(|c| format!("{c:>5}")).collect();
        out!("{:<width$} {}", class.class, cells.join(""));
    }
}
