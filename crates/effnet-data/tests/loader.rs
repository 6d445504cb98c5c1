//! Batches from a dataset with one corrupt image among good ones.

use std::collections::BTreeSet;

use effnet_data::loader::{BatchLoader, LoaderOptions, Transform};
use effnet_data::plan::{EpochPlan, initial_cursors};
use effnet_data::prepare::encode_grey_png;
use effnet_data::reader::{Dataset, RankReader};
use effnet_data::writer::{DatasetWriter, WriterOptions};
use effnet_vision::{ChannelPolicy, Normalization, RandomResizedCrop, TrainConfig, TrainTransform};

const SAMPLES: usize = 30;
const CORRUPT: usize = 13;

async fn dataset(url: &str) {
    let location = effnet_store::open(url).unwrap();
    let options = WriterOptions { rows_per_group: 8, groups_per_part: 2 };
    let mut writer =
        DatasetWriter::create(location, "loader", vec!["a".into(), "b".into()], options).await.unwrap();
    for i in 0..SAMPLES {
        let image = if i == CORRUPT {
            b"\x89PNG\r\n\x1a\n this is not really a png".to_vec()
        } else {
            let pixels: Vec<u8> = (0..28 * 28).map(|p| ((p + i * 11) % 251) as u8).collect();
            encode_grey_png(&pixels, 28, 28).unwrap()
        };
        writer.push(format!("img-{i:02}"), image, (i % 2) as i32).await.unwrap();
    }
    writer.finish().await.unwrap();
}

fn transform() -> Transform {
    Transform::Train(
        TrainTransform::new(TrainConfig {
            size: 16,
            crop: RandomResizedCrop::default(),
            flip_probability: 0.5,
            rand_augment: None,
            normalization: Normalization::FASHION_MNIST,
            channels: ChannelPolicy::Grey,
            dct_downscale: false,
            max_pixels: effnet_vision::DEFAULT_MAX_PIXELS,
        })
        .unwrap(),
    )
}

async fn epoch(url: &str, threads: usize) -> (Vec<effnet_vision::BatchParts>, Vec<String>) {
    let dataset = Dataset::open(url).await.unwrap();
    let plan = EpochPlan::new(1, 0, dataset.row_groups(), 1).unwrap();
    let reader = RankReader::new(dataset, plan.ranks[0].clone(), initial_cursors(&plan)[0].clone(), 12, 2)
        .await
        .unwrap();
    let options = LoaderOptions { batch_size: 8, threads, seed: 42, epoch: 0 };
    let mut loader = BatchLoader::new(reader, transform(), options).unwrap();
    let mut batches = Vec::new();
    while let Some(batch) = loader.next_batch().await.unwrap() {
        batches.push(batch);
    }
    let skipped = loader.skipped().into_iter().map(|s| s.key).collect();
    (batches, skipped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_skip_corrupt_samples_and_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("ds").to_string_lossy().into_owned();
    dataset(&url).await;

    let (batches, skipped) = epoch(&url, 2).await;
    assert_eq!(skipped, vec![format!("img-{CORRUPT:02}")]);
    // 29 good samples: batches of 8, 8, 8, 5, each full until the end.
    let sizes: Vec<usize> = batches.iter().map(|b| b.labels.len()).collect();
    assert_eq!(sizes, [8, 8, 8, 5]);
    let keys: Vec<&String> = batches.iter().flat_map(|b| &b.keys).collect();
    let unique: BTreeSet<&String> = keys.iter().copied().collect();
    assert_eq!(unique.len(), SAMPLES - 1);
    for batch in &batches {
        assert_eq!(batch.shape, [batch.labels.len() as i64, 1, 16, 16]);
        assert_eq!(batch.pixels.len(), batch.labels.len() * 256);
        for (key, label) in batch.keys.iter().zip(&batch.labels) {
            let index: i64 = key["img-".len()..].parse().unwrap();
            assert_eq!(*label, index % 2);
        }
        // Normalised values, not raw bytes.
        let max = batch.pixels.iter().fold(f32::MIN, |m, v| m.max(*v));
        assert!(max > 0.5 && max <= (1.0 - 0.286) / 0.353 + 1e-4, "{max}");
    }

    // Same seed, other thread count: identical batches.
    let (again, _) = epoch(&url, 1).await;
    assert_eq!(again, batches);
}

/// A grey PNG 16384 wide and 2 rows tall whose header claims 16384 rows (a few hundred bytes).
fn png_bomb() -> Vec<u8> {
    let mut bytes = encode_grey_png(&vec![0; 16384 * 2], 16384, 2).unwrap();
    bytes[20..24].copy_from_slice(&16384u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_samples_are_skipped_counted_and_reported_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("ds").to_string_lossy().into_owned();
    let good = encode_grey_png(&[100; 28 * 28], 28, 28).unwrap();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode(&[90; 32 * 32], 32, 32, image::ExtendedColorType::L8)
        .unwrap();
    let hostile: [(&str, Vec<u8>); 5] = [
        ("bomb.png", png_bomb()),
        ("empty.jpg", Vec::new()),
        ("text.jpg", b"not an image at all".to_vec()),
        ("truncated.jpg", jpeg[..jpeg.len() / 2].to_vec()),
        ("png-named.jpg", good.clone()),
    ];
    {
        let location = effnet_store::open(&url).unwrap();
        let options = WriterOptions { rows_per_group: 4, groups_per_part: 2 };
        let mut writer =
            DatasetWriter::create(location, "hostile", vec!["a".into(), "b".into()], options).await.unwrap();
        for i in 0..6 {
            writer.push(format!("good-{i}"), good.clone(), 0).await.unwrap();
        }
        for (key, bytes) in &hostile {
            writer.push(key.to_string(), bytes.clone(), 1).await.unwrap();
        }
        writer.finish().await.unwrap();
    }
    let dataset = Dataset::open(&url).await.unwrap();
    let plan = EpochPlan::new(1, 0, dataset.row_groups(), 1).unwrap();
    let reader = RankReader::new(dataset, plan.ranks[0].clone(), initial_cursors(&plan)[0].clone(), 12, 2)
        .await
        .unwrap();
    let options = LoaderOptions { batch_size: 4, threads: 2, seed: 1, epoch: 0 };
    let mut loader = BatchLoader::new(reader, transform(), options).unwrap();
    let mut trained = BTreeSet::new();
    while let Some(batch) = loader.next_batch().await.unwrap() {
        trained.extend(batch.keys);
    }
    // The six good samples and the PNG named .jpg (the format comes from the bytes).
    let expected: BTreeSet<String> =
        (0..6).map(|i| format!("good-{i}")).chain(["png-named.jpg".to_string()]).collect();
    assert_eq!(trained, expected);
    let mut skipped: Vec<(String, String)> =
        loader.skipped().into_iter().map(|s| (s.key, s.reason)).collect();
    skipped.sort();
    let keys: Vec<&str> = skipped.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(keys, ["bomb.png", "empty.jpg", "text.jpg", "truncated.jpg"]);
    assert!(
        skipped[0].1.contains("16384x16384 = 268435456 pixels, over the decoded-pixel budget of 89478485"),
        "{skipped:?}"
    );
    assert!(skipped[1].1.starts_with("unrecognised image format (first bytes [];"), "{skipped:?}");
    assert!(skipped[2].1.starts_with("unrecognised image format"), "{skipped:?}");
    assert!(skipped[3].1.contains("truncated"), "{skipped:?}");
}
