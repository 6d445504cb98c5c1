//! `effnet prepare`: convert idx files (MNIST / Fashion-MNIST) and image folders into datasets.
//!
//! idx images are stored as PNG (lossless, ~10× smaller than raw for 28×28 grey); image-folder
//! files are stored as they are after checking they decode. Inputs that fail are skipped and
//! listed in the manifest.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::writer::{DatasetWriter, WriterOptions};

/// Where Debian's `dataset-fashion-mnist` puts the files.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Images of an idx3 file: count, rows, columns and the pixels.
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub columns: usize,
    pub pixels: Vec<u8>,
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path)
        .map_err(|e| Error::InvalidInput { what: path.display().to_string(), reason: e.to_string() })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| Error::InvalidInput {
            what: path.display().to_string(),
            reason: format!("gzip: {e}"),
        })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

pub fn read_idx_images(path: &Path) -> Result<IdxImages> {
    let bytes = read_maybe_gz(path)?;
    let bad = |reason: String| Error::InvalidInput { what: path.display().to_string(), reason };
    if bytes.len() < 16 || be_u32(&bytes, 0) != 0x0000_0803 {
        return Err(bad("not an idx3 image file (magic 0x00000803 of unsigned bytes, 3 dimensions)".into()));
    }
    let (count, rows, columns) =
        (be_u32(&bytes, 4) as usize, be_u32(&bytes, 8) as usize, be_u32(&bytes, 12) as usize);
    let expected = count * rows * columns;
    if bytes.len() - 16 != expected {
        return Err(bad(format!(
            "header promises {count}×{rows}×{columns} = {expected} bytes, file holds {}",
            bytes.len() - 16
        )));
    }
    Ok(IdxImages { count, rows, columns, pixels: bytes[16..].to_vec() })
}

pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    let bytes = read_maybe_gz(path)?;
    let bad = |reason: String| Error::InvalidInput { what: path.display().to_string(), reason };
    if bytes.len() < 8 || be_u32(&bytes, 0) != 0x0000_0801 {
        return Err(bad("not an idx1 label file (magic 0x00000801)".into()));
    }
    let count = be_u32(&bytes, 4) as usize;
    if bytes.len() - 8 != count {
        return Err(bad(format!("header promises {count} labels, file holds {}", bytes.len() - 8)));
    }
    Ok(bytes[8..].to_vec())
}

/// Encode one grey image as PNG.
pub fn encode_grey_png(pixels: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let fail =
        |e: png::EncodingError| Error::InvalidInput { what: "png encoder".into(), reason: e.to_string() };
    let mut writer = encoder.write_header().map_err(fail)?;
    writer.write_image_data(pixels).map_err(fail)?;
    writer.finish().map_err(fail)?;
    Ok(out)
}

/// Find `<prefix>-images-idx3-ubyte[.gz]` and `<prefix>-labels-idx1-ubyte[.gz]`.
pub fn idx_pair(prefix: &str) -> Result<(PathBuf, PathBuf)> {
    let find = |kind: &str| -> Result<PathBuf> {
        for suffix in ["", ".gz"] {
            let candidate = PathBuf::from(format!("{prefix}-{kind}{suffix}"));
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        Err(Error::InvalidInput { what: format!("{prefix}-{kind}[.gz]"), reason: "no such file".into() })
    };
    Ok((find("images-idx3-ubyte")?, find("labels-idx1-ubyte")?))
}

/// Convert one idx pair into a dataset at `out`. Labels outside `classes` are skipped and listed.
pub async fn prepare_idx(
    images: &Path,
    labels: &Path,
    out: &str,
    name: &str,
    classes: Vec<String>,
    options: WriterOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<Manifest> {
    let images_data = read_idx_images(images)?;
    let labels_data = read_idx_labels(labels)?;
    if images_data.count != labels_data.len() {
        return Err(Error::InvalidInput {
            what: labels.display().to_string(),
            reason: format!(
                "{} labels for {} images in {}",
                labels_data.len(),
                images_data.count,
                images.display()
            ),
        });
    }
    let location = effnet_store::open(out)?;
    let class_count = classes.len();
    let mut writer = DatasetWriter::create(location, name, classes, options).await?;
    let size = images_data.rows * images_data.columns;
    let stem = images.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for (index, label) in labels_data.iter().enumerate() {
        let key = format!("{name}/{index:06}");
        if *label as usize >= class_count {
            writer
                .skip(format!("{stem}:{index}"), format!("label {label} outside the {class_count} classes"));
            continue;
        }
        let pixels = &images_data.pixels[index * size..(index + 1) * size];
        let png = encode_grey_png(pixels, images_data.columns as u32, images_data.rows as u32)?;
        writer.push(key, png, *label as i32).await?;
        if index % 1000 == 0 {
            progress(index as u64, labels_data.len() as u64);
        }
    }
    progress(labels_data.len() as u64, labels_data.len() as u64);
    writer.finish().await
}

/// Debian's Fashion-MNIST into `<out>/train` and `<out>/test`.
pub async fn prepare_fashion_mnist(
    source: &Path,
    out: &str,
    options: WriterOptions,
    mut progress: impl FnMut(&str, u64, u64),
) -> Result<(Manifest, Manifest)> {
    let classes: Vec<String> = FASHION_MNIST_CLASSES.iter().map(|c| c.to_string()).collect();
    let base = out.trim_end_matches('/');
    let mut run = async |split: &str, prefix: &str| -> Result<Manifest> {
        let (images, labels) = idx_pair(&source.join(prefix).to_string_lossy())?;
        let name = format!("fashion-mnist/{split}");
        prepare_idx(
            &images,
            &labels,
            &format!("{base}/{split}"),
            &name,
            classes.clone(),
            options,
            |done, total| progress(split, done, total),
        )
        .await
    };
    let train = run("train", "train").await?;
    let test = run("test", "t10k").await?;
    Ok((train, test))
}

/// One folder per class (sorted names are the classes), JPEG/PNG files stored as they are after
/// checking they decode; undecodable files are skipped and listed.
pub async fn prepare_image_folder(
    source: &Path,
    out: &str,
    options: WriterOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<Manifest> {
    let unreadable = |path: &Path, e: std::io::Error| Error::InvalidInput {
        what: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut classes = Vec::new();
    for entry in std::fs::read_dir(source).map_err(|e| unreadable(source, e))? {
        let entry = entry.map_err(|e| unreadable(source, e))?;
        if entry.path().is_dir() {
            classes.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    classes.sort();
    if classes.is_empty() {
        return Err(Error::InvalidInput {
            what: source.display().to_string(),
            reason: "no class folders inside".into(),
        });
    }
    let mut files = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let dir = source.join(class);
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| unreadable(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        names.sort();
        files.extend(names.into_iter().map(|p| (p, label as i32)));
    }
    let location = effnet_store::open(out)?;
    let name =
        source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "images".into());
    let mut writer = DatasetWriter::create(location, &name, classes.clone(), options).await?;
    let total = files.len() as u64;
    for (done, (path, label)) in files.into_iter().enumerate() {
        let relative = path.strip_prefix(source).unwrap_or(&path).to_string_lossy().into_owned();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                writer.skip(relative, e.to_string());
                continue;
            }
        };
        match effnet_vision::decode(&bytes) {
            Ok(_) => writer.push(relative, bytes, label).await?,
            Err(e) => writer.skip(relative, e.to_string()),
        }
        if done % 100 == 0 {
            progress(done as u64, total);
        }
    }
    progress(total, total);
    writer.finish().await
}
