//! Property tests: a real dataset written by the project's own writer, then its Parquet bytes and
//! its manifest mutated. Opening and reading every row group must give samples or a typed error:
//! never a panic, and never an allocation beyond [`LARGEST_ALLOCATION`] (this binary's allocator
//! refuses one, which aborts the test loudly).
//!
//! Cases per property: 48 by default so `make test` stays fast; `PROPTEST_CASES=5000 cargo test
//! -p effnet-data --test fuzz_dataset` for a long run. Failing inputs are saved under
//! `proptest-regressions/` and replayed first on every later run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use effnet_data::manifest::{MANIFEST_NAME, Manifest};
use effnet_data::plan::{EpochPlan, WorkUnit, initial_cursors};
use effnet_data::prepare::encode_grey_png;
use effnet_data::reader::{Dataset, RankReader};
use effnet_data::writer::{DatasetWriter, WriterOptions};
use proptest::prelude::*;

/// A dataset of a few KB never needs more; a count taken on trust would ask for far more.
const LARGEST_ALLOCATION: usize = 256 << 20;

struct CappedAllocator;

// SAFETY: forwards to the system allocator; refusing (null) is allowed by the GlobalAlloc contract.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LARGEST_ALLOCATION {
            std::ptr::null_mut()
        } else {
            unsafe { System.alloc(layout) }
        }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LARGEST_ALLOCATION {
            std::ptr::null_mut()
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > LARGEST_ALLOCATION {
            std::ptr::null_mut()
        } else {
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// 20 PNGs, 6 per row group, 2 row groups per part: 4 row groups in 2 parts. Written once.
static ORIGINAL: LazyLock<(tempfile::TempDir, Manifest)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("ds").display().to_string();
    let manifest = runtime().block_on(async {
        let options = WriterOptions { rows_per_group: 6, groups_per_part: 2 };
        let classes = vec!["even".to_string(), "odd".to_string()];
        let mut writer =
            DatasetWriter::create(effnet_store::open(&url).unwrap(), "fuzz", classes, options).await.unwrap();
        for i in 0..20u32 {
            let pixels: Vec<u8> = (0..16).map(|p| (p * 13 + i * 7) as u8).collect();
            writer
                .push(format!("sample-{i:02}"), encode_grey_png(&pixels, 4, 4).unwrap(), (i % 2) as i32)
                .await
                .unwrap();
        }
        writer.finish().await.unwrap()
    });
    (dir, manifest)
});

/// A fresh copy of the dataset to mutate.
fn copy_dataset() -> (tempfile::TempDir, PathBuf) {
    let (original, _) = &*ORIGINAL;
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("ds");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(original.path().join("ds")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    (dir, copy)
}

/// Open the dataset and read every row group it lists, directly and through a rank's reader.
/// Returns the samples read, or the first error's text; panics only if the code under test does.
fn read_everything(path: &Path) -> Result<usize, String> {
    let url = path.display().to_string();
    runtime().block_on(async {
        let dataset = Dataset::open(&url).await.map_err(|e| e.to_string())?;
        let mut samples = 0;
        for group in dataset.row_groups() {
            let unit = WorkUnit { row_group: group.id, start: 0, end: group.rows };
            let (good, bad) = dataset.read_unit(unit).await.map_err(|e| e.to_string())?;
            samples += good.len() + bad.len();
        }
        let plan = EpochPlan::new(0, 0, dataset.row_groups(), 1).map_err(|e| e.to_string())?;
        let mut reader =
            RankReader::new(dataset.clone(), plan.ranks[0].clone(), initial_cursors(&plan)[0].clone(), 8, 2)
                .await
                .map_err(|e| e.to_string())?;
        while reader.next().await.map_err(|e| e.to_string())?.is_some() {}
        Ok(samples)
    })
}

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

#[test]
fn the_unmutated_dataset_reads_whole() {
    let (_dir, path) = copy_dataset();
    assert_eq!(read_everything(&path), Ok(20));
}

/// The input that made parquet-rs panic ("Decoder for dict should have been set"): byte 81.8% into
/// the first part file set to 228, a data page header's encoding. Kept as an explicit regression
/// case next to proptest's own seed file.
#[test]
fn a_corrupt_page_encoding_is_an_error_naming_the_file() {
    let (_dir, path) = copy_dataset();
    let file = path.join("part-00000.parquet");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = (0.818369921543105 * bytes.len() as f64) as usize;
    bytes[at] = 228;
    std::fs::write(&file, &bytes).unwrap();
    let message = read_everything(&path).unwrap_err();
    assert!(message.contains("part-00000.parquet"), "{message}");
    assert!(
        message
            .contains("corrupt Parquet data (the decoder panicked: Decoder for dict should have been set)"),
        "{message}"
    );
}

proptest! {
    #![proptest_config(config(48))]

    /// Overwritten bytes anywhere in a part file (the footer included), or the file cut short.
    #[test]
    fn mutated_parquet_reads_or_fails_with_a_typed_error(
        part in 0usize..2,
        overwrites in prop::collection::vec((0.0f64..1.0, any::<u8>()), 1..12),
        tail_bias in any::<bool>(),
        keep in prop_oneof![4 => Just(1.0), 1 => 0.0f64..1.0],
    ) {
        let (_dir, path) = copy_dataset();
        let file = path.join(format!("part-{part:05}.parquet"));
        let mut bytes = std::fs::read(&file).unwrap();
        let len = bytes.len();
        for (at, value) in overwrites {
            // Half the cases aim at the last 512 bytes: the footer, where the counts and offsets live.
            let position = if tail_bias { len - 1 - ((at * 512.0) as usize).min(len - 1) } else { (at * len as f64) as usize };
            bytes[position.min(len - 1)] = value;
        }
        bytes.truncate((keep * len as f64).ceil() as usize);
        std::fs::write(&file, &bytes).unwrap();
        match read_everything(&path) {
            Ok(samples) => prop_assert_eq!(samples, 20),
            Err(message) => prop_assert!(!message.is_empty()),
        }
    }

    /// A manifest re-sealed (valid checksum) with arbitrary counts, sizes and offsets.
    #[test]
    fn manifests_with_arbitrary_counts_are_refused_or_read(
        field in 0usize..5,
        value in prop_oneof![any::<u32>().prop_map(|v| v as u64), any::<u64>(), 0u64..64],
        which in 0usize..4,
    ) {
        let (_dir, path) = copy_dataset();
        let mut manifest = ORIGINAL.1.clone();
        let part = which % manifest.files.len();
        let group = which % manifest.files[part].row_groups.len();
        match field {
            0 => {
                // Keep the manifest consistent so the claim reaches the reader.
                let rows = value as u32;
                let old = manifest.files[part].row_groups[group].rows;
                manifest.files[part].row_groups[group].rows = rows;
                manifest.files[part].rows = manifest.files[part].rows - old as u64 + rows as u64;
                manifest.rows = manifest.files.iter().map(|f| f.rows).sum();
            }
            1 => manifest.files[part].bytes = value,
            2 => manifest.files[part].row_groups[group].offset = value,
            3 => manifest.rows = value,
            _ => manifest.files[part].rows = value,
        }
        std::fs::write(path.join(MANIFEST_NAME), manifest.to_json().unwrap()).unwrap();
        match read_everything(&path) {
            Ok(samples) => prop_assert_eq!(samples, 20),
            Err(message) => prop_assert!(!message.is_empty()),
        }
    }

    /// Raw bytes of the manifest overwritten or cut: parsed or refused.
    #[test]
    fn mutated_manifest_bytes_parse_or_fail(
        overwrites in prop::collection::vec((0.0f64..1.0, any::<u8>()), 0..6),
        keep in 0.0f64..=1.0,
    ) {
        let mut bytes = ORIGINAL.1.to_json().unwrap();
        let len = bytes.len();
        for (at, value) in overwrites {
            bytes[((at * len as f64) as usize).min(len - 1)] = value;
        }
        bytes.truncate((keep * len as f64) as usize);
        if let Ok(parsed) = Manifest::from_json(&bytes) {
            prop_assert_eq!(parsed.rows, 20);
        }
    }
}
