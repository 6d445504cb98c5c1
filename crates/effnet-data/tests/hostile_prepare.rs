//! `prepare` fed hostile input: idx headers that overflow or lie, gzip that inflates past the
//! header's promise, image folders with entries that are not images. Each fails with one clear
//! error or is skipped and listed in the manifest; none crashes or allocates what it claims.

use std::io::Write;
use std::path::Path;

use effnet_data::prepare::{encode_grey_png, prepare_image_folder, read_idx_images, read_idx_labels};
use effnet_data::writer::WriterOptions;

fn idx3(count: u32, rows: u32, columns: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = 0x0000_0803u32.to_be_bytes().to_vec();
    for size in [count, rows, columns] {
        bytes.extend(size.to_be_bytes());
    }
    bytes.extend(payload);
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn idx_headers_that_overflow_or_lie_are_named() {
    let dir = tempfile::tempdir().unwrap();
    // 2^32-1 cubed does not fit in 64 bits: checked, not wrapped to something a short file matches.
    let overflow = write(dir.path(), "overflow", &idx3(u32::MAX, u32::MAX, u32::MAX, &[0; 8]));
    let message = read_idx_images(&overflow).err().unwrap().to_string();
    assert_eq!(
        message,
        format!("{}: header dimensions 4294967295×4294967295×4294967295 overflow", overflow.display())
    );
    // 2^22 × 2^21 × 2^21 = 2^64 wraps to exactly 0: the old unchecked product (in a release build)
    // accepted an empty payload as 4,194,304 images of 2097152×2097152, then panicked slicing it.
    let wraps = write(dir.path(), "wraps", &idx3(1 << 22, 1 << 21, 1 << 21, &[]));
    let message = read_idx_images(&wraps).err().unwrap().to_string();
    assert!(message.ends_with("header dimensions 4194304×2097152×2097152 overflow"), "{message}");
    // An honest zero is not an overflow.
    let none = write(dir.path(), "none", &idx3(1 << 16, 1 << 16, 0, &[]));
    assert_eq!(read_idx_images(&none).unwrap().pixels.len(), 0);

    let short = write(dir.path(), "short", &idx3(10, 28, 28, &[0; 100]));
    let message = read_idx_images(&short).err().unwrap().to_string();
    assert!(message.ends_with("header promises 10×28×28 = 7840 bytes, file holds 100"), "{message}");
    let long = write(dir.path(), "long", &idx3(1, 2, 2, &[0; 5]));
    let message = read_idx_images(&long).err().unwrap().to_string();
    assert!(message.ends_with("header promises 1×2×2 = 4 bytes, file holds more"), "{message}");
    let exact = write(dir.path(), "exact", &idx3(2, 1, 2, &[1, 2, 3, 4]));
    let images = read_idx_images(&exact).unwrap();
    assert_eq!((images.count, images.rows, images.columns, images.pixels), (2, 1, 2, vec![1, 2, 3, 4]));

    let header_cut = write(dir.path(), "cut", &idx3(1, 1, 1, &[])[..10]);
    let message = read_idx_images(&header_cut).err().unwrap().to_string();
    assert!(message.contains("not an idx3 image file"), "{message}");
    let empty = write(dir.path(), "empty", &[]);
    assert!(read_idx_labels(&empty).err().unwrap().to_string().contains("not an idx1 label file"));
    let labels = write(dir.path(), "labels.gz", &gzip(&[0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]));
    assert_eq!(read_idx_labels(&labels).unwrap(), vec![7, 8, 9]);
}

#[test]
fn gzip_is_inflated_only_as_far_as_the_header_promises() {
    let dir = tempfile::tempdir().unwrap();
    // 10×28×28 promised, 8 MiB of zeros inflated: refused after 7841 bytes.
    let bomb = write(dir.path(), "bomb.gz", &gzip(&idx3(10, 28, 28, &vec![0; 8 << 20])));
    let message = read_idx_images(&bomb).err().unwrap().to_string();
    assert!(message.ends_with("header promises 10×28×28 = 7840 bytes, file holds more"), "{message}");
    // A gzip stream cut short fails as gzip, with how far it got.
    let whole = gzip(&idx3(10, 28, 28, &(0..7840).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>()));
    let cut = write(dir.path(), "cut.gz", &whole[..whole.len() / 2]);
    let message = read_idx_images(&cut).err().unwrap().to_string();
    assert!(message.contains("gzip: ") || message.contains("file holds"), "{message}");
    let fine = write(dir.path(), "fine.gz", &whole);
    assert_eq!(read_idx_images(&fine).unwrap().pixels.len(), 7840);
}

fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let pixels: Vec<u8> = (0..width * height * 3).map(|i| (i % 253) as u8).collect();
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode(&pixels, width, height, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

/// A grey PNG 16384 wide and 2 rows tall whose header claims 16384 rows.
fn png_bomb() -> Vec<u8> {
    let mut bytes = encode_grey_png(&vec![0; 16384 * 2], 16384, 2).unwrap();
    bytes[20..24].copy_from_slice(&16384u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    bytes
}

#[tokio::test]
async fn image_folder_entries_that_are_not_images_are_skipped_and_listed() {
    let source = tempfile::tempdir().unwrap();
    let (cats, dogs) = (source.path().join("cats"), source.path().join("dogs"));
    std::fs::create_dir_all(cats.join("nested")).unwrap();
    std::fs::create_dir_all(&dogs).unwrap();
    let png = encode_grey_png(&[10, 20, 30, 40], 2, 2).unwrap();
    let photo = jpeg(32, 24);
    write(&cats, "a.png", &png);
    write(&cats, "png-named.jpg", &png);
    write(&cats, "empty.jpg", &[]);
    write(&cats, "notes.jpg", b"these bytes are not an image");
    write(&cats, "truncated.jpg", &photo[..photo.len() / 2]);
    std::os::unix::fs::symlink(cats.join("gone.jpg"), cats.join("dangling.jpg")).unwrap();
    std::os::unix::fs::symlink(cats.join("a.png"), cats.join("link.png")).unwrap();
    write(&dogs, "b.jpg", &photo);
    write(&dogs, "bomb.png", &png_bomb());

    let out = tempfile::tempdir().unwrap();
    let url = out.path().join("set").display().to_string();
    let options = WriterOptions { rows_per_group: 4, groups_per_part: 2 };
    let manifest =
        prepare_image_folder(source.path(), &url, options, effnet_vision::DEFAULT_MAX_PIXELS, |_, _| {})
            .await
            .unwrap();
    assert_eq!(manifest.rows, 4, "a.png, link.png, png-named.jpg, b.jpg: {manifest:?}");
    let skipped: Vec<(&str, &str)> =
        manifest.skipped.iter().map(|s| (s.source.as_str(), s.reason.as_str())).collect();
    let sources: Vec<&str> = skipped.iter().map(|(source, _)| *source).collect();
    assert_eq!(
        sources,
        [
            "cats/dangling.jpg",
            "cats/nested",
            "cats/empty.jpg",
            "cats/notes.jpg",
            "cats/truncated.jpg",
            "dogs/bomb.png"
        ]
    );
    let reason = |source: &str| skipped.iter().find(|(s, _)| *s == source).map(|(_, r)| *r).unwrap();
    assert!(reason("cats/dangling.jpg").starts_with("dangling symbolic link"), "{skipped:?}");
    assert!(reason("cats/nested").contains("folder inside a class folder"), "{skipped:?}");
    assert_eq!(reason("cats/empty.jpg"), "empty file (0 bytes)");
    assert!(reason("cats/notes.jpg").starts_with("unrecognised image format"), "{skipped:?}");
    assert!(reason("cats/truncated.jpg").contains("truncated"), "{skipped:?}");
    assert!(reason("dogs/bomb.png").contains("16384x16384 = 268435456 pixels"), "{skipped:?}");

    // A budget below the photo's 32×24 skips it too, naming its size; and a file larger than any
    // image within that budget (700 × 8 bytes + 1 MiB) is skipped unread.
    let huge = std::fs::File::create(dogs.join("huge.png")).unwrap();
    huge.set_len(2 << 20).unwrap();
    let tight = out.path().join("tight").display().to_string();
    let manifest = prepare_image_folder(source.path(), &tight, options, 700, |_, _| {}).await.unwrap();
    assert_eq!(manifest.rows, 3);
    let huge_reason = manifest.skipped.iter().find(|s| s.source == "dogs/huge.png").unwrap();
    assert_eq!(
        huge_reason.reason,
        "2097152 bytes, more than any JPEG/PNG within the pixel budget can hold (1054176)"
    );
    let photo_reason = manifest.skipped.iter().find(|s| s.source == "dogs/b.jpg").unwrap();
    assert!(
        photo_reason.reason.contains("32x24 = 768 pixels, over the decoded-pixel budget of 700"),
        "{photo_reason:?}"
    );
}
