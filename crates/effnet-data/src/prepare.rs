//! `effnet prepare`: convert idx files (MNIST / Fashion-MNIST) and image folders into datasets.
//!
//! idx images are stored as PNG (lossless, ~10× smaller than raw for 28×28 grey); image-folder
//! files are stored as they are after checking they decode. Inputs that fail are skipped and
//! listed in the manifest.

use std::io::{BufRead, Read};
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

/// An idx file's dimensions and payload. The file may be gzip-compressed (Yann LeCun's
/// distribution ships `.gz` files); either way at most what the header promises, plus one byte to
/// detect excess, is read or inflated, so a small `.gz` that inflates to gigabytes or a header
/// promising more than the file holds costs no more memory than the promise.
fn read_idx(path: &Path, magic: u32, kind: &str) -> Result<(Vec<usize>, Vec<u8>)> {
    let what = || path.display().to_string();
    let bad = |reason: String| Error::InvalidInput { what: what(), reason };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut buffered = std::io::BufReader::new(file);
    let gzip = buffered.fill_buf().map_err(|e| bad(e.to_string()))?.starts_with(&[0x1f, 0x8b]);
    let mut reader: Box<dyn Read> =
        if gzip { Box::new(flate2::read::GzDecoder::new(buffered)) } else { Box::new(buffered) };
    let dimensions = (magic & 0xFF) as usize;
    let not_idx = || bad(format!("not an {kind}"));
    let mut header = vec![0u8; 4 + 4 * dimensions];
    reader.read_exact(&mut header).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => not_idx(),
        _ => bad(format!("{}{e}", if gzip { "gzip: " } else { "" })),
    })?;
    if be_u32(&header, 0) != magic {
        return Err(not_idx());
    }
    let sizes: Vec<usize> = (0..dimensions).map(|d| be_u32(&header, 4 + 4 * d) as usize).collect();
    let described = sizes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("×");
    // The sizes are the file's claim: multiply with checks so a hostile header cannot wrap around
    // to a small product that a short file then matches.
    let expected = sizes
        .iter()
        .try_fold(1usize, |product, &size| product.checked_mul(size))
        .ok_or_else(|| bad(format!("header dimensions {described} overflow")))?;
    // No capacity from the claim: the buffer grows with what is actually there.
    let mut payload = Vec::new();
    reader.take(expected as u64 + 1).read_to_end(&mut payload).map_err(|e| {
        bad(format!(
            "{}{e} (after {} of {expected} promised bytes)",
            if gzip { "gzip: " } else { "" },
            payload.len()
        ))
    })?;
    if payload.len() != expected {
        let holds = if payload.len() > expected { "more".to_string() } else { payload.len().to_string() };
        return Err(bad(format!("header promises {described} = {expected} bytes, file holds {holds}")));
    }
    Ok((sizes, payload))
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

pub fn read_idx_images(path: &Path) -> Result<IdxImages> {
    let (sizes, pixels) =
        read_idx(path, 0x0000_0803, "idx3 image file (magic 0x00000803 of unsigned bytes, 3 dimensions)")?;
    Ok(IdxImages { count: sizes[0], rows: sizes[1], columns: sizes[2], pixels })
}

pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    read_idx(path, 0x0000_0801, "idx1 label file (magic 0x00000801)").map(|(_, labels)| labels)
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
/// checking they decode within `max_pixels` (width × height, see
/// [`effnet_vision::DEFAULT_MAX_PIXELS`]). Entries that cannot be stored are skipped and listed in
/// the manifest with the reason: undecodable, empty, over the budget, unreadable, a dangling link,
/// a folder inside a class folder. The format comes from the bytes, not the name, so a PNG named
/// `.jpg` is stored (as Pillow would open it).
pub async fn prepare_image_folder(
    source: &Path,
    out: &str,
    options: WriterOptions,
    max_pixels: u64,
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
    let relative = |path: &Path| path.strip_prefix(source).unwrap_or(path).to_string_lossy().into_owned();
    // Files are read whole before decoding: bound that by what an image within the budget can
    // take (8 bytes a pixel, 16-bit RGBA stored uncompressed, plus 1 MiB of metadata), so a huge
    // file that is no image is skipped without being read into memory.
    let largest_file = max_pixels.saturating_mul(8).saturating_add(1 << 20);
    let mut files = Vec::new();
    // Entries that are not files are reported once the writer exists (it keeps the skip list).
    let mut not_files: Vec<(String, String)> = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let dir = source.join(class);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| unreadable(&dir, e))? {
            let path = match entry {
                Ok(entry) => entry.path(),
                Err(e) => {
                    not_files.push((relative(&dir), format!("unreadable folder entry: {e}")));
                    continue;
                }
            };
            // `metadata` follows links: a link to a file is a file, a dangling one an error.
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() && meta.len() > largest_file => not_files.push((
                    relative(&path),
                    format!(
                        "{} bytes, more than any JPEG/PNG within the pixel budget can hold ({largest_file})",
                        meta.len()
                    ),
                )),
                Ok(meta) if meta.is_file() => names.push(path),
                Ok(meta) if meta.is_dir() => {
                    not_files.push((relative(&path), "a folder inside a class folder (not an image)".into()))
                }
                Ok(_) => not_files.push((relative(&path), "not a regular file".into())),
                Err(e) if path.is_symlink() => {
                    not_files.push((relative(&path), format!("dangling symbolic link: {e}")))
                }
                Err(e) => not_files.push((relative(&path), e.to_string())),
            }
        }
        names.sort();
        files.extend(names.into_iter().map(|p| (p, label as i32)));
    }
    not_files.sort();
    let location = effnet_store::open(out)?;
    let name =
        source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "images".into());
    let mut writer = DatasetWriter::create(location, &name, classes.clone(), options).await?;
    for (path, reason) in not_files {
        writer.skip(path, reason);
    }
    let total = files.len() as u64;
    for (done, (path, label)) in files.into_iter().enumerate() {
        let relative = relative(&path);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                writer.skip(relative, e.to_string());
                continue;
            }
        };
        if bytes.is_empty() {
            writer.skip(relative, "empty file (0 bytes)");
            continue;
        }
        match effnet_vision::decode_within(&bytes, max_pixels) {
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
