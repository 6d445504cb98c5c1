//! Datasets written and read back through real stores: local files, memory, and an S3 server
//! (moto) on loopback. One suite, run against each.

use std::collections::BTreeSet;
use std::sync::Arc;

use effnet_data::Error;
use effnet_data::manifest::{MANIFEST_NAME, Manifest};
use effnet_data::plan::{DataCursor, EpochPlan, RankCursor, initial_cursors};
use effnet_data::prepare::encode_grey_png;
use effnet_data::reader::{Dataset, RankReader};
use effnet_data::writer::{DatasetWriter, WriterOptions};
use effnet_store::StoreLocation;
use effnet_store::testing::S3TestServer;

const SAMPLES: usize = 50;
const OPTIONS: WriterOptions = WriterOptions { rows_per_group: 7, groups_per_part: 3 };

fn classes() -> Vec<String> {
    vec!["zero".into(), "one".into(), "two".into()]
}

/// 50 small PNGs, 7 per row group, 3 row groups per part: 8 row groups in 3 parts.
async fn write_dataset(location: StoreLocation) -> Manifest {
    let mut writer = DatasetWriter::create(location, "synthetic", classes(), OPTIONS).await.unwrap();
    for i in 0..SAMPLES {
        let pixels: Vec<u8> = (0..64).map(|p| ((p * 3 + i * 7) % 256) as u8).collect();
        writer
            .push(format!("sample-{i:03}"), encode_grey_png(&pixels, 8, 8).unwrap(), (i % 3) as i32)
            .await
            .unwrap();
    }
    writer.skip("broken.png", "not an image");
    writer.finish().await.unwrap()
}

async fn read_rank(
    dataset: &Arc<Dataset>,
    plan: &EpochPlan,
    rank: usize,
    cursor: RankCursor,
    limit: Option<usize>,
) -> (Vec<String>, RankCursor) {
    let mut reader = RankReader::new(dataset.clone(), plan.ranks[rank].clone(), cursor, 10, 2).await.unwrap();
    let mut keys = Vec::new();
    while limit.is_none_or(|l| keys.len() < l) {
        match reader.next().await.unwrap() {
            Some(sample) => keys.push(sample.key),
            None => break,
        }
    }
    (keys, reader.cursor())
}

fn all_keys() -> BTreeSet<String> {
    (0..SAMPLES).map(|i| format!("sample-{i:03}")).collect()
}

fn assert_exactly_once(keys: &[String]) {
    let unique: BTreeSet<String> = keys.iter().cloned().collect();
    assert_eq!(unique.len(), keys.len(), "duplicates");
    assert_eq!(unique, all_keys());
}

async fn dataset_suite(location: StoreLocation) {
    let manifest = write_dataset(location.clone()).await;
    assert_eq!(manifest.rows, SAMPLES as u64);
    assert_eq!(manifest.files.len(), 3);
    assert_eq!(manifest.row_groups().len(), 8);
    assert_eq!(manifest.skipped.len(), 1);
    let group_rows: Vec<u32> = manifest.row_groups().iter().map(|g| g.rows).collect();
    assert_eq!(group_rows, [7, 7, 7, 7, 7, 7, 7, 1]);

    let dataset = Dataset::open_location(location.clone()).await.unwrap();
    assert_eq!(dataset.manifest, manifest);

    // Exactly once for world sizes 1..=4, and the order is stable for a seed.
    for world_size in 1..=4 {
        let plan = EpochPlan::new(3, 1, dataset.row_groups(), world_size).unwrap();
        let mut keys = Vec::new();
        for (rank, cursor) in initial_cursors(&plan).into_iter().enumerate() {
            keys.extend(read_rank(&dataset, &plan, rank, cursor, None).await.0);
        }
        assert_exactly_once(&keys);
        if world_size == 2 {
            let mut again = Vec::new();
            for (rank, cursor) in initial_cursors(&plan).into_iter().enumerate() {
                again.extend(read_rank(&dataset, &plan, rank, cursor, None).await.0);
            }
            assert_eq!(keys, again, "order must be stable for a seed");
        }
    }

    // Labels and bytes come back as written.
    let plan = EpochPlan::new(0, 0, dataset.row_groups(), 1).unwrap();
    let mut reader =
        RankReader::new(dataset.clone(), plan.ranks[0].clone(), initial_cursors(&plan)[0].clone(), 4, 1)
            .await
            .unwrap();
    while let Some(sample) = reader.next().await.unwrap() {
        let index: usize = sample.key["sample-".len()..].parse().unwrap();
        assert_eq!(sample.label, (index % 3) as i32);
        let pixels: Vec<u8> = (0..64).map(|p| ((p * 3 + index * 7) % 256) as u8).collect();
        assert_eq!(&sample.image[..], &encode_grey_png(&pixels, 8, 8).unwrap()[..]);
    }

    // Resume mid-epoch from reader cursors, 2 ranks -> 3 ranks: same union, no repeats.
    let plan = EpochPlan::new(9, 4, dataset.row_groups(), 2).unwrap();
    let mut keys = Vec::new();
    let mut saved = Vec::new();
    for (rank, cursor) in initial_cursors(&plan).into_iter().enumerate() {
        let (seen, cursor) = read_rank(&dataset, &plan, rank, cursor, Some(9 + rank * 4)).await;
        keys.extend(seen);
        saved.push(cursor);
    }
    let cursor = DataCursor { plan, ranks: saved };
    let cursor: DataCursor = serde_json::from_str(&serde_json::to_string(&cursor).unwrap()).unwrap();
    let (resumed, cursors) = cursor.resume(3).unwrap();
    for (rank, cursor) in cursors.into_iter().enumerate() {
        keys.extend(read_rank(&dataset, &resumed, rank, cursor, None).await.0);
    }
    assert_exactly_once(&keys);

    // Same world size: the interrupted run continues the uninterrupted sequence.
    let plan = EpochPlan::new(5, 2, dataset.row_groups(), 1).unwrap();
    let straight = read_rank(&dataset, &plan, 0, initial_cursors(&plan)[0].clone(), None).await.0;
    let (mut first, cursor) =
        read_rank(&dataset, &plan, 0, initial_cursors(&plan)[0].clone(), Some(17)).await;
    first.extend(read_rank(&dataset, &plan, 0, cursor, None).await.0);
    assert_eq!(first, straight);
}

#[tokio::test]
async fn local_files() {
    let dir = tempfile::tempdir().unwrap();
    dataset_suite(effnet_store::open(&dir.path().join("ds").to_string_lossy()).unwrap()).await;
}

#[tokio::test]
async fn memory() {
    dataset_suite(effnet_store::open("memory://dataset-suite/ds").unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server() {
    let server = S3TestServer::start().expect("S3 test server (run `make venv-reference`)");
    dataset_suite(server.open("datasets/synthetic").unwrap()).await;
}

#[tokio::test]
async fn bad_datasets_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("ds").to_string_lossy().into_owned();

    // No manifest: not a dataset.
    let err = Dataset::open(&url).await.err().unwrap();
    assert!(matches!(err, Error::NoDataset { .. }) && err.to_string().contains("_manifest.json"), "{err}");

    let manifest = write_dataset(effnet_store::open(&url).unwrap()).await;
    // A second prepare into the same place is refused (no overwrite).
    let err = DatasetWriter::create(effnet_store::open(&url).unwrap(), "again", classes(), OPTIONS)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("already holds a dataset"), "{err}");

    // Labels outside the manifest's classes are skipped and counted: shrink the class list.
    let mut two_classes = manifest.clone();
    two_classes.classes.truncate(2);
    std::fs::write(dir.path().join("ds").join(MANIFEST_NAME), two_classes.to_json().unwrap()).unwrap();
    let dataset = Dataset::open(&url).await.unwrap();
    let plan = EpochPlan::new(0, 0, dataset.row_groups(), 1).unwrap();
    let mut reader =
        RankReader::new(dataset.clone(), plan.ranks[0].clone(), initial_cursors(&plan)[0].clone(), 8, 2)
            .await
            .unwrap();
    let mut good = 0;
    while let Some(sample) = reader.next().await.unwrap() {
        assert!(sample.label < 2);
        good += 1;
    }
    assert_eq!(reader.bad_samples().len(), 16); // labels 2: indices 2, 5, ..., 47
    assert_eq!(good + 16, SAMPLES);
    assert!(reader.bad_samples()[0].reason.contains("label 2"), "{:?}", reader.bad_samples()[0]);

    // A truncated part file: the read fails with the file named.
    std::fs::write(dir.path().join("ds").join(MANIFEST_NAME), manifest.to_json().unwrap()).unwrap();
    let part = dir.path().join("ds").join("part-00001.parquet");
    let bytes = std::fs::read(&part).unwrap();
    std::fs::write(&part, &bytes[..bytes.len() / 2]).unwrap();
    let dataset = Dataset::open(&url).await.unwrap();
    let plan = EpochPlan::new(0, 0, dataset.row_groups(), 1).unwrap();
    let mut reader =
        RankReader::new(dataset.clone(), plan.ranks[0].clone(), initial_cursors(&plan)[0].clone(), 8, 1)
            .await
            .unwrap();
    let err = loop {
        match reader.next().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a truncated file read to the end"),
            Err(err) => break err,
        }
    };
    assert!(err.to_string().contains("part-00001.parquet"), "{err}");

    // A tampered manifest is refused.
    let text =
        String::from_utf8(manifest.to_json().unwrap()).unwrap().replace("\"synthetic\"", "\"renamed\"");
    std::fs::write(dir.path().join("ds").join(MANIFEST_NAME), text).unwrap();
    let err = Dataset::open(&url).await.err().unwrap();
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[tokio::test]
async fn wrong_schema_is_named() {
    use arrow_array::{Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};

    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("ds").to_string_lossy().into_owned();
    let manifest = write_dataset(effnet_store::open(&url).unwrap()).await;
    // Replace part 0 with a file of another schema but the same row groups.
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("pixels", DataType::Utf8, false),
        Field::new("label", DataType::Int64, false),
    ]));
    let mut buffer = Vec::new();
    let properties =
        parquet::file::properties::WriterProperties::builder().set_max_row_group_row_count(Some(7)).build();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut buffer, schema.clone(), Some(properties)).unwrap();
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values((0..21).map(|i| format!("k{i}")))),
            Arc::new(StringArray::from_iter_values((0..21).map(|_| "x"))),
            Arc::new(Int64Array::from_iter_values(0..21)),
        ],
    )
    .unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    std::fs::write(dir.path().join("ds").join("part-00000.parquet"), &buffer).unwrap();
    let mut patched = manifest.clone();
    patched.files[0].bytes = buffer.len() as u64;
    std::fs::write(dir.path().join("ds").join(MANIFEST_NAME), patched.to_json().unwrap()).unwrap();

    let dataset = Dataset::open(&url).await.unwrap();
    let first = dataset.row_groups()[0];
    let err = dataset
        .read_unit(effnet_data::WorkUnit { row_group: first.id, start: 0, end: first.rows })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Schema { .. }), "{err}");
    assert!(err.to_string().contains("part-00000.parquet") && err.to_string().contains("pixels"), "{err}");
}

#[tokio::test]
async fn unreachable_store_is_a_clear_error() {
    use effnet_store::{Environment, RetrySettings, StoreOptions};
    // A closed loopback port: nothing listens on port 1.
    let vars =
        [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let options = StoreOptions {
        endpoint: Some("http://127.0.0.1:1".into()),
        allow_http: Some(true),
        retry: RetrySettings { max_retries: 0, ..RetrySettings::default() },
        environment: Environment::Vars(vars),
        ..StoreOptions::default()
    };
    let location = effnet_store::open_with("s3://nowhere/datasets/x", &options).unwrap();
    let err = Dataset::open_location(location).await.err().unwrap();
    let message = err.to_string();
    assert!(message.contains("nowhere") || message.contains("127.0.0.1"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
}

#[tokio::test]
async fn absurd_row_counts_in_a_manifest_are_checked_against_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("ds").to_string_lossy().into_owned();
    let manifest = write_dataset(effnet_store::open(&url).unwrap()).await;
    // A consistent, checksummed manifest that claims 4294967295 rows in the first row group
    // (which holds 7): nothing may be sized from the claim.
    let mut absurd = manifest.clone();
    let claimed = u32::MAX;
    let first = &mut absurd.files[0];
    first.rows = first.rows - first.row_groups[0].rows as u64 + claimed as u64;
    first.row_groups[0].rows = claimed;
    absurd.rows = absurd.files.iter().map(|f| f.rows).sum();
    std::fs::write(dir.path().join("ds").join(MANIFEST_NAME), absurd.to_json().unwrap()).unwrap();

    let dataset = Dataset::open(&url).await.unwrap();
    assert_eq!(dataset.row_groups()[0].rows, claimed);
    let unit = effnet_data::plan::WorkUnit { row_group: 0, start: 0, end: claimed };
    let err = dataset.read_unit(unit).await.err().unwrap();
    assert!(matches!(err, Error::Read { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("part-00000.parquet"), "{message}");
    assert!(
        message.ends_with(
            "row group 0 holds 7 rows, the manifest's files[0].row_groups[0].rows says 4294967295"
        ),
        "{message}"
    );
    // The same through a rank's reader: an error, not an allocation of billions of samples.
    let plan = EpochPlan::new(0, 0, dataset.row_groups(), 1).unwrap();
    let mut reader =
        RankReader::new(dataset.clone(), plan.ranks[0].clone(), initial_cursors(&plan)[0].clone(), 8, 2)
            .await
            .unwrap();
    let err = loop {
        match reader.next().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a manifest claiming 4294967295 rows read to the end"),
            Err(err) => break err,
        }
    };
    assert!(err.to_string().contains("says 4294967295"), "{err}");
}
