//! `effnet prepare` and `effnet data inspect|verify` through the binary.

use std::path::Path;

use crate::common::{assert_bad_input, effnet};
use effnet_data::prepare::encode_grey_png;
use effnet_data::writer::{DatasetWriter, WriterOptions};
use serde_json::Value;

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn fashion_mnist_from_debian_files() {
    let source = Path::new(effnet_data::prepare::DEBIAN_FASHION_MNIST);
    assert!(
        source.is_dir(),
        "Debian's dataset-fashion-mnist is missing: run `make test` as root or apt-get install it"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = path(&dir.path().join("fmnist"));
    let outcome = effnet(&["prepare", "--from", "fashion-mnist", "--out", &out]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert!(outcome.stdout.contains("60000 train and 10000 test images"), "{}", outcome.stdout);

    let inspect = effnet(&["data", "inspect", &format!("{out}/train"), "--json"]);
    assert_eq!(inspect.code, 0, "{}", inspect.stderr);
    let report: Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(report["rows"], 60000);
    assert_eq!(report["row_groups"], 235); // ceil(60000 / 256)
    assert_eq!(report["parts"], 8); // 32 row groups per part
    assert_eq!(report["classes"][9], "Ankle boot");
    assert_eq!(report["skipped"], 0);

    let verify = effnet(&["data", "verify", &format!("{out}/test"), "--json"]);
    assert_eq!(verify.code, 0, "{}", verify.stderr);
    let report: Value = serde_json::from_str(&verify.stdout).unwrap();
    assert_eq!((report["samples"].as_u64(), report["decoded"].as_u64()), (Some(10000), Some(10000)));

    // Preparing into an existing dataset is refused, nothing is overwritten.
    let again = effnet(&["prepare", "--from", "fashion-mnist", "--out", &out]);
    assert_bad_input(&again, &["already holds a dataset"]);
}

fn write_idx(dir: &Path, prefix: &str, labels: &[u8], truncate_images: bool) {
    let (rows, columns) = (4u32, 3u32);
    let mut images = vec![0, 0, 8, 3];
    images.extend((labels.len() as u32).to_be_bytes());
    images.extend(rows.to_be_bytes());
    images.extend(columns.to_be_bytes());
    for i in 0..labels.len() {
        images.extend((0..rows * columns).map(|p| (p as usize * 20 + i) as u8));
    }
    if truncate_images {
        images.truncate(images.len() - 5);
    }
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
    let mut label_bytes = vec![0, 0, 8, 1];
    label_bytes.extend((labels.len() as u32).to_be_bytes());
    label_bytes.extend(labels);
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), label_bytes).unwrap();
}

#[test]
fn idx_with_a_label_outside_the_classes_skips_and_lists_it() {
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), "tiny", &[0, 1, 2, 7, 1], false);
    let out = path(&dir.path().join("ds"));
    let outcome = effnet(&[
        "prepare",
        "--from",
        "idx",
        &path(&dir.path().join("tiny")),
        "--out",
        &out,
        "--classes",
        "a,b,c",
        "--rows-per-group",
        "2",
    ]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert!(outcome.stdout.contains("4 images, 1 skipped"), "{}", outcome.stdout);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("ds/_manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["skipped"][0]["source"], "tiny-images-idx3-ubyte:3");
    assert!(manifest["skipped"][0]["reason"].as_str().unwrap().contains("label 7"));
    assert_eq!(manifest["files"][0]["row_groups"].as_array().unwrap().len(), 2);
}

#[test]
fn bad_inputs_are_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), "broken", &[0, 1], true);
    let out = path(&dir.path().join("ds"));
    let truncated = effnet(&["prepare", "--from", "idx", &path(&dir.path().join("broken")), "--out", &out]);
    assert_bad_input(&truncated, &["broken-images-idx3-ubyte", "header promises"]);
    assert!(!dir.path().join("ds/_manifest.json").exists());

    let missing = effnet(&["prepare", "--from", "idx", &path(&dir.path().join("absent")), "--out", &out]);
    assert_bad_input(&missing, &["absent-images-idx3-ubyte"]);
    let zero = effnet(&["prepare", "--from", "idx", "x", "--out", &out, "--rows-per-group", "0"]);
    assert_bad_input(&zero, &["--rows-per-group", "0"]);
    let scheme = effnet(&["prepare", "--from", "idx", "x", "--out", "ftp://host/x"]);
    assert_eq!(scheme.code, 2, "{}", scheme.stderr);
    let no_dataset = effnet(&["data", "inspect", &path(dir.path())]);
    assert_bad_input(&no_dataset, &["_manifest.json"]);
    let not_folder =
        effnet(&["prepare", "--from", "image-folder", &path(&dir.path().join("nope")), "--out", &out]);
    assert_bad_input(&not_folder, &["nope", "not a folder"]);
}

#[test]
fn image_folder_skips_undecodable_files_and_verify_finds_corrupt_samples() {
    let dir = tempfile::tempdir().unwrap();
    for (class, count) in [("cats", 3), ("dogs", 2)] {
        std::fs::create_dir_all(dir.path().join("images").join(class)).unwrap();
        for i in 0..count {
            let pixels: Vec<u8> = (0..64).map(|p| (p * 4 + i) as u8).collect();
            std::fs::write(
                dir.path().join(format!("images/{class}/{i}.png")),
                encode_grey_png(&pixels, 8, 8).unwrap(),
            )
            .unwrap();
        }
    }
    std::fs::write(dir.path().join("images/dogs/broken.jpg"), b"\xff\xd8\xff\xe0 not a jpeg").unwrap();
    let out = path(&dir.path().join("ds"));
    let outcome =
        effnet(&["prepare", "--from", "image-folder", &path(&dir.path().join("images")), "--out", &out]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert!(outcome.stdout.contains("5 images, 1 skipped"), "{}", outcome.stdout);
    assert!(outcome.stdout.contains("skipped dogs/broken.jpg"), "{}", outcome.stdout);
    assert_eq!(effnet(&["data", "verify", &out]).code, 0);

    // A corrupt image inside an otherwise good file (written with the library, which does not
    // decode): verify reports its key and exits 1.
    let corrupt_url = path(&dir.path().join("corrupt"));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let location = effnet_store::open(&corrupt_url).unwrap();
        let options = WriterOptions { rows_per_group: 2, groups_per_part: 2 };
        let mut writer = DatasetWriter::create(location, "corrupt", vec!["x".into()], options).await.unwrap();
        for i in 0..4 {
            let image = if i == 2 {
                b"\x89PNG\r\n\x1a\ngarbage".to_vec()
            } else {
                encode_grey_png(&[i as u8; 16], 4, 4).unwrap()
            };
            writer.push(format!("s{i}"), image, 0).await.unwrap();
        }
        writer.finish().await.unwrap();
    });
    let verify = effnet(&["data", "verify", &corrupt_url, "--json"]);
    assert_eq!(verify.code, 1, "{}", verify.stderr);
    let report: Value = serde_json::from_str(&verify.stdout).unwrap();
    assert_eq!(report["decoded"], 3);
    assert_eq!(report["corrupt"][0]["key"], "s2");

    // The decoded-pixel budget, as training applies it: the 4×4 images fit 16 pixels, not 15.
    let within = effnet(&["data", "verify", &corrupt_url, "--json", "--max-image-pixels", "16"]);
    assert_eq!(serde_json::from_str::<Value>(&within.stdout).unwrap()["decoded"], 3, "{}", within.stderr);
    let over = effnet(&["data", "verify", &corrupt_url, "--max-image-pixels", "15"]);
    assert_eq!(over.code, 1, "{}", over.stderr);
    assert!(over.stdout.contains("4 samples, 0 decoded, 4 corrupt"), "{}", over.stdout);
    assert!(
        over.stdout.contains("corrupt s0: image claims 4x4 = 16 pixels, over the decoded-pixel budget of 15"),
        "{}",
        over.stdout
    );
    let zero = effnet(&["data", "verify", &corrupt_url, "--max-image-pixels", "0"]);
    assert_bad_input(&zero, &["--max-image-pixels must be at least 1, got 0"]);
}
