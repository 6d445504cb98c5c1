//! A small `.gz` idx file that inflates to far more than its header promises must be refused
//! after inflating the promise (plus one byte), not after inflating everything. This is the only
//! test in its binary, so the process's peak resident memory (VmHWM) measures this read alone.

use std::io::Write;

use effnet_data::prepare::read_idx_images;

/// Peak resident memory of this process in KiB (Linux `/proc/self/status`).
fn peak_resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM line");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmHWM value in kB")
}

#[test]
fn a_gzip_bomb_idx_is_refused_without_inflating_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb-images-idx3-ubyte.gz");
    {
        // Header: 10 images of 28×28 (7,840 bytes); then 1 GiB of zeros, written in chunks so
        // the test itself never holds more than one chunk.
        let file = std::fs::File::create(&path).unwrap();
        let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::best());
        let mut header = 0x0000_0803u32.to_be_bytes().to_vec();
        for size in [10u32, 28, 28] {
            header.extend(size.to_be_bytes());
        }
        encoder.write_all(&header).unwrap();
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            encoder.write_all(&chunk).unwrap();
        }
        encoder.finish().unwrap();
    }
    let compressed = std::fs::metadata(&path).unwrap().len();
    assert!(compressed < 2 << 20, "the bomb is {compressed} bytes compressed");
    let before = peak_resident_kib();
    let message = read_idx_images(&path).err().expect("the bomb must be refused").to_string();
    let after = peak_resident_kib();
    assert!(message.ends_with("header promises 10×28×28 = 7840 bytes, file holds more"), "{message}");
    let growth_mib = after.saturating_sub(before) as f64 / 1024.0;
    eprintln!(
        "{compressed}-byte gzip: peak resident before {before} KiB, after {after} KiB, growth {growth_mib:.1} MiB"
    );
    // Inflating it whole would hold 1 GiB (and more while the Vec doubles).
    assert!(growth_mib < 100.0, "reading the bomb grew peak resident memory by {growth_mib:.1} MiB");
}
