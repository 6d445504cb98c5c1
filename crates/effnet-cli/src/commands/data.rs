//! `effnet prepare` and `effnet data inspect|verify`.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use effnet_data::plan::EpochPlan;
use effnet_data::prepare::{
    DEBIAN_FASHION_MNIST, idx_pair, prepare_fashion_mnist, prepare_idx, prepare_image_folder,
};
use effnet_data::reader::{Dataset, RankReader};
use effnet_data::writer::WriterOptions;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::commands::positive_u32;
use crate::failure::bad_input;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Source {
    /// Debian's dataset-fashion-mnist files (SRC defaults to their folder); writes OUT/train, OUT/test.
    FashionMnist,
    /// One folder per class with JPEG/PNG files.
    ImageFolder,
    /// An idx pair: SRC is the prefix of `SRC-images-idx3-ubyte[.gz]` / `SRC-labels-idx1-ubyte[.gz]`.
    Idx,
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// What SRC is.
    #[arg(long = "from", value_enum, value_name = "KIND")]
    pub source_kind: Source,
    /// Source path (see --from).
    #[arg(value_name = "SRC")]
    pub source: Option<PathBuf>,
    /// Dataset URL: a path, file://, memory://, s3://, gs:// or az://.
    #[arg(long)]
    pub out: String,
    /// Images per row group (the unit of sharding and ranged reads).
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    pub rows_per_group: i64,
    /// Row groups per part file.
    #[arg(long, default_value_t = 32, allow_negative_numbers = true)]
    pub groups_per_part: i64,
    /// Class names for --from idx, comma-separated (default: 0..=max label).
    #[arg(long)]
    pub classes: Option<String>,
    /// Decoded-pixel budget (width × height) per image for --from image-folder: larger images
    /// (decompression bombs, headers that lie) are skipped and listed (default: Pillow's
    /// MAX_IMAGE_PIXELS, 89478485).
    #[arg(long, allow_negative_numbers = true)]
    pub max_image_pixels: Option<i64>,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Manifest summary: parts, rows, row groups, classes, bytes.
    Inspect {
        url: String,
        #[arg(long)]
        json: bool,
    },
    /// Decode every sample; report counts and the keys of corrupt ones (exit 1 if any).
    Verify {
        url: String,
        #[arg(long)]
        json: bool,
        /// Decoded-pixel budget (width × height) per image, as training's
        /// `data.max_image_pixels`: a larger image is reported as corrupt (default: Pillow's
        /// MAX_IMAGE_PIXELS, 89478485).
        #[arg(long, allow_negative_numbers = true)]
        max_image_pixels: Option<i64>,
    },
}

/// `--max-image-pixels`: at least 1; Pillow's MAX_IMAGE_PIXELS when not given.
fn pixel_budget(flag: Option<i64>) -> anyhow::Result<u64> {
    match flag {
        Some(value) if value < 1 => Err(bad_input!("--max-image-pixels must be at least 1, got {value}")),
        Some(value) => Ok(value as u64),
        None => Ok(effnet_vision::DEFAULT_MAX_PIXELS),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn progress_bar(label: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(label.to_string());
    bar
}

pub fn prepare(args: PrepareArgs) -> anyhow::Result<()> {
    let options = WriterOptions {
        rows_per_group: positive_u32("--rows-per-group", args.rows_per_group)? as usize,
        groups_per_part: positive_u32("--groups-per-part", args.groups_per_part)? as usize,
    };
    let runtime = runtime()?;
    match args.source_kind {
        Source::FashionMnist => {
            let source = args.source.unwrap_or_else(|| PathBuf::from(DEBIAN_FASHION_MNIST));
            if !source.is_dir() {
                return Err(bad_input!(
                    "{}: not a folder (install Debian's dataset-fashion-mnist or pass its folder)",
                    source.display()
                ));
            }
            let bar = progress_bar("fashion-mnist");
            let (train, test) = runtime.block_on(prepare_fashion_mnist(
                &source,
                &args.out,
                options,
                |split, done, total| {
                    bar.set_prefix(format!("fashion-mnist {split}"));
                    bar.set_length(total);
                    bar.set_position(done);
                },
            ))?;
            bar.finish_and_clear();
            out!("{}: {} train and {} test images", args.out, train.rows, test.rows);
        }
        Source::Idx => {
            let prefix =
                args.source.ok_or_else(|| bad_input!("--from idx needs SRC, the idx file prefix"))?;
            let (images, labels) = idx_pair(&prefix.to_string_lossy())?;
            let classes: Vec<String> = match &args.classes {
                Some(list) => list.split(',').map(|c| c.trim().to_string()).collect(),
                None => {
                    let labels_data = effnet_data::prepare::read_idx_labels(&labels)?;
                    let max = labels_data.iter().copied().max().unwrap_or(0);
                    (0..=max).map(|c| c.to_string()).collect()
                }
            };
            let name =
                prefix.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "idx".into());
            let bar = progress_bar(&name);
            let manifest = runtime.block_on(prepare_idx(
                &images,
                &labels,
                &args.out,
                &name,
                classes,
                options,
                |d, t| {
                    bar.set_length(t);
                    bar.set_position(d);
                },
            ))?;
            bar.finish_and_clear();
            out!("{}: {} images, {} skipped", args.out, manifest.rows, manifest.skipped.len());
        }
        Source::ImageFolder => {
            let source =
                args.source.ok_or_else(|| bad_input!("--from image-folder needs SRC, the folder"))?;
            if !source.is_dir() {
                return Err(bad_input!("{}: not a folder", source.display()));
            }
            let max_pixels = pixel_budget(args.max_image_pixels)?;
            let bar = progress_bar("images");
            let manifest =
                runtime.block_on(prepare_image_folder(&source, &args.out, options, max_pixels, |d, t| {
                    bar.set_length(t);
                    bar.set_position(d);
                }))?;
            bar.finish_and_clear();
            out!("{}: {} images, {} skipped", args.out, manifest.rows, manifest.skipped.len());
            for skipped in &manifest.skipped {
                out!("skipped {}: {}", skipped.source, skipped.reason);
            }
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct Inspection {
    url: String,
    name: String,
    parts: usize,
    rows: u64,
    row_groups: usize,
    classes: Vec<String>,
    bytes: u64,
    skipped: usize,
}

#[derive(Debug, Serialize)]
struct Verification {
    url: String,
    samples: u64,
    decoded: u64,
    corrupt: Vec<CorruptSample>,
}

#[derive(Debug, Serialize)]
struct CorruptSample {
    key: String,
    reason: String,
}

pub fn run(command: DataCommand) -> anyhow::Result<()> {
    let runtime = runtime()?;
    match command {
        DataCommand::Inspect { url, json } => {
            let dataset = runtime.block_on(Dataset::open(&url))?;
            let m = &dataset.manifest;
            let report = Inspection {
                url: effnet_store::redact(&url),
                name: m.name.clone(),
                parts: m.files.len(),
                rows: m.rows,
                row_groups: dataset.row_groups().len(),
                classes: m.classes.clone(),
                bytes: m.bytes(),
                skipped: m.skipped.len(),
            };
            if json {
                out!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                out!("{} ({})", report.url, report.name);
                out!(
                    "parts {}  rows {}  row groups {}  bytes {}",
                    report.parts,
                    report.rows,
                    report.row_groups,
                    report.bytes
                );
                out!("classes {}: {}", report.classes.len(), report.classes.join(", "));
                out!("skipped at prepare {}", report.skipped);
            }
            Ok(())
        }
        DataCommand::Verify { url, json, max_image_pixels } => {
            let max_pixels = pixel_budget(max_image_pixels)?;
            let report = runtime.block_on(async {
                let dataset = Dataset::open(&url).await?;
                let plan = EpochPlan::new(0, 0, dataset.row_groups(), 1)?;
                let mut reader = RankReader::for_plan(dataset.clone(), &plan, 0, None, 1, 4).await?;
                let bar = progress_bar("verify");
                bar.set_length(dataset.manifest.rows);
                let mut decoded = 0;
                let mut corrupt = Vec::new();
                while let Some(sample) = reader.next().await? {
                    match effnet_vision::decode_within(&sample.image, max_pixels) {
                        Ok(_) => decoded += 1,
                        Err(e) => corrupt.push(CorruptSample { key: sample.key, reason: e.to_string() }),
                    }
                    bar.inc(1);
                }
                bar.finish_and_clear();
                corrupt.extend(
                    reader
                        .bad_samples()
                        .iter()
                        .map(|b| CorruptSample { key: b.key.clone(), reason: b.reason.clone() }),
                );
                anyhow::Ok(Verification {
                    url: effnet_store::redact(&url),
                    samples: dataset.manifest.rows,
                    decoded,
                    corrupt,
                })
            })?;
            if json {
                out!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                out!(
                    "{}: {} samples, {} decoded, {} corrupt",
                    report.url,
                    report.samples,
                    report.decoded,
                    report.corrupt.len()
                );
                for sample in &report.corrupt {
                    out!("corrupt {}: {}", sample.key, sample.reason);
                }
            }
            if report.corrupt.is_empty() { Ok(()) } else { std::process::exit(1) }
        }
    }
}
