//! A decompression bomb must be refused before its pixel buffer exists. This is the only test in
//! its binary, so the process's peak resident memory (VmHWM) measures this decode alone and no other
//! test's allocations.

use effnet_vision::{Error, decode};

/// Peak resident memory of this process in KiB (Linux `/proc/self/status`).
fn peak_resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM line");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmHWM value in kB")
}

/// CRC-32 as PNG chunks use it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A 16384×2 RGB PNG with its IHDR height rewritten to 16384: a few hundred bytes claiming
/// 268 million pixels (an RGB decode buffer of 0.8 GiB).
fn png_bomb() -> Vec<u8> {
    use image::ImageEncoder;
    let (width, rows, claimed) = (16384u32, 2u32, 16384u32);
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(&vec![0u8; (width * rows * 3) as usize], width, rows, image::ExtendedColorType::Rgb8)
        .expect("encode png");
    bytes[20..24].copy_from_slice(&claimed.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

#[test]
fn a_16384_squared_png_bomb_is_refused_without_growing_resident_memory() {
    let bomb = png_bomb();
    assert!(bomb.len() < 1024, "the bomb is {} bytes", bomb.len());
    let before = peak_resident_kib();
    // Several decodes, as several loader threads would do: none may allocate the claimed size.
    for _ in 0..4 {
        match decode(&bomb) {
            Err(Error::TooManyPixels { width: 16384, height: 16384, .. }) => {}
            other => panic!("expected the pixel budget to refuse the bomb, got {other:?}"),
        }
    }
    let after = peak_resident_kib();
    let growth_mib = (after.saturating_sub(before)) as f64 / 1024.0;
    eprintln!("peak resident before {before} KiB, after {after} KiB, growth {growth_mib:.1} MiB");
    // Without the budget the PNG path zero-fills a 768 MiB buffer (16384² × 3 bytes) before the
    // decoder finds the data missing; 100 MiB leaves room for the allocator and test harness.
    assert!(growth_mib < 100.0, "decoding the bomb grew peak resident memory by {growth_mib:.1} MiB");
}
