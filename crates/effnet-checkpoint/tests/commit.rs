//! Checkpoint commit semantics on a local directory, the in-memory store and a real S3 server
//! (moto on loopback): an interrupted save is never the latest, a damaged commit falls back to the
//! previous checkpoint, and purging keeps the last k and the best k.

use bytes::Bytes;
use effnet_checkpoint::{CheckpointStore, directory_name};
use effnet_store::testing::S3TestServer;

fn files(step: u64) -> Vec<(String, Bytes)> {
    vec![
        ("model.safetensors".to_string(), Bytes::from(vec![step as u8; 1000])),
        ("optimizer.safetensors".to_string(), Bytes::from(vec![step as u8 + 1; 2000])),
        ("state.json".to_string(), Bytes::from(format!("{{\"step\": {step}}}"))),
    ]
}

async fn latest_step(store: &CheckpointStore) -> Option<u64> {
    store.latest().await.unwrap().map(|(committed, _)| committed.step)
}

async fn put(store: &CheckpointStore, relative: &str, bytes: impl Into<Bytes>) {
    let path = store.location.path(relative).unwrap();
    effnet_store::put_bytes(store.location.store.as_ref(), &path, bytes).await.unwrap();
}

async fn interrupted_saves_are_never_latest(store: CheckpointStore) {
    store.save(10, Some(0.5), files(10)).await.unwrap();
    assert_eq!(latest_step(&store).await, Some(10));
    let (_, loaded) = store.latest().await.unwrap().unwrap();
    assert_eq!(loaded["model.safetensors"], Bytes::from(vec![10u8; 1000]));

    // A save of step 20 killed after each of its files, before COMMIT.
    let content = files(20);
    for written in 0..=content.len() {
        for (name, bytes) in &content[..written] {
            put(&store, &format!("{}/{name}", directory_name(20)), bytes.clone()).await;
        }
        assert_eq!(latest_step(&store).await, Some(10), "after {written} files of step 20");
    }
    // A COMMIT that is not valid JSON (a torn write on a store without atomic PUT).
    put(&store, &format!("{}/COMMIT", directory_name(20)), &b"{\"format\": 1, \"st"[..]).await;
    assert_eq!(latest_step(&store).await, Some(10));

    // A committed checkpoint whose file was damaged afterwards: skipped, the previous one loads.
    store.save(30, None, files(30)).await.unwrap();
    assert_eq!(latest_step(&store).await, Some(30));
    put(&store, &format!("{}/model.safetensors", directory_name(30)), vec![0u8; 1000]).await;
    assert_eq!(latest_step(&store).await, Some(10));
    let error = store.load(&store.committed().await.unwrap()[1]).await.unwrap_err().to_string();
    assert!(error.contains("step-00000030") && error.contains("model.safetensors does not match"), "{error}");

    // A committed checkpoint with a file missing.
    store.save(40, None, files(40)).await.unwrap();
    effnet_store::delete(
        store.location.store.as_ref(),
        &store.location.path(&format!("{}/state.json", directory_name(40))).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(latest_step(&store).await, Some(10));
    store.save(50, None, files(50)).await.unwrap();
    assert_eq!(latest_step(&store).await, Some(50));
}

async fn purge_keeps_last_and_best(store: CheckpointStore) {
    let metrics = [(1, Some(0.30)), (2, Some(0.90)), (3, None), (4, Some(0.50)), (5, Some(0.40)), (6, None)];
    for (step, metric) in metrics {
        store.save(step, metric, files(step)).await.unwrap();
    }
    // An interrupted save older than the newest commit (left by a crash) is cleaned up too.
    put(&store, &format!("{}/model.safetensors", directory_name(0)), vec![1u8; 10]).await;
    // One newer than the newest commit may still be in flight elsewhere: left alone.
    put(&store, &format!("{}/model.safetensors", directory_name(7)), vec![1u8; 10]).await;
    let mut deleted = store.purge(2, 2).await.unwrap();
    deleted.sort();
    assert_eq!(deleted, vec![0, 1, 3]);
    let kept: Vec<u64> = store.committed().await.unwrap().iter().map(|c| c.step).collect();
    assert_eq!(kept, vec![2, 4, 5, 6]);
    let remaining =
        effnet_store::list_prefix(store.location.store.as_ref(), &store.location.path("").unwrap())
            .await
            .unwrap();
    assert!(remaining.iter().any(|o| o.location.as_ref().contains(&directory_name(7))));
    assert!(!remaining.iter().any(|o| o.location.as_ref().contains(&directory_name(1))));
}

#[tokio::test]
async fn local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("a").display().to_string();
    interrupted_saves_are_never_latest(CheckpointStore::new(effnet_store::open(&url).unwrap())).await;
    let url = dir.path().join("b").display().to_string();
    purge_keeps_last_and_best(CheckpointStore::new(effnet_store::open(&url).unwrap())).await;
    // Purged checkpoints leave no empty directories behind: the kept ones and the one in flight.
    let mut left: Vec<String> = std::fs::read_dir(dir.path().join("b"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let expected: Vec<String> = [2, 4, 5, 6, 7].into_iter().map(directory_name).collect();
    assert_eq!(left, expected);
}

/// A step saved again over its committed checkpoint (a run resumed from an older one): the old
/// `COMMIT` goes before any file changes, so a save that fails half way leaves an uncommitted
/// directory, not a commit whose files no longer match; a whole save commits the new files.
#[tokio::test]
async fn a_step_saved_again_is_uncommitted_until_its_new_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::new(effnet_store::open(dir.path().to_str().unwrap()).unwrap());
    store.save(5, None, files(5)).await.unwrap();
    store.save(10, None, files(10)).await.unwrap();
    let step_dir = dir.path().join(directory_name(10));
    // The second file cannot be written: a directory stands where it goes.
    std::fs::remove_file(step_dir.join("optimizer.safetensors")).unwrap();
    std::fs::create_dir(step_dir.join("optimizer.safetensors")).unwrap();
    let error = store.save(10, None, files(11)).await.unwrap_err().to_string();
    assert!(error.contains("optimizer.safetensors"), "{error}");
    assert!(!step_dir.join("COMMIT").exists());
    assert_eq!(std::fs::read(step_dir.join("model.safetensors")).unwrap(), vec![11u8; 1000]);
    assert_eq!(latest_step(&store).await, Some(5));

    std::fs::remove_dir(step_dir.join("optimizer.safetensors")).unwrap();
    let mut shorter = files(12);
    shorter[0].1 = Bytes::from(vec![12u8; 10]);
    store.save(10, None, shorter).await.unwrap();
    let (committed, loaded) = store.latest().await.unwrap().unwrap();
    assert_eq!(committed.step, 10);
    assert_eq!(loaded["model.safetensors"], Bytes::from(vec![12u8; 10]));
    assert_eq!(loaded["optimizer.safetensors"], Bytes::from(vec![13u8; 2000]));
    assert_eq!(committed.commit.files["model.safetensors"].bytes, 10);
}

#[tokio::test]
async fn memory_store() {
    let location = effnet_store::open("memory://checkpoint-test/run/checkpoints").unwrap();
    interrupted_saves_are_never_latest(CheckpointStore::new(location)).await;
    let location = effnet_store::open("memory://checkpoint-test/other/checkpoints").unwrap();
    purge_keeps_last_and_best(CheckpointStore::new(location)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store() {
    let server = S3TestServer::start().unwrap();
    interrupted_saves_are_never_latest(CheckpointStore::new(server.open("jobs/a/checkpoints").unwrap()))
        .await;
    purge_keeps_last_and_best(CheckpointStore::new(server.open("jobs/b/checkpoints").unwrap())).await;
}

#[tokio::test]
async fn loading_an_uncommitted_directory_by_url_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().display().to_string();
    let store = CheckpointStore::new(effnet_store::open(&url).unwrap());
    put(&store, &format!("{}/model.safetensors", directory_name(3)), vec![1u8; 10]).await;
    let error = effnet_checkpoint::load_url(&format!("{url}/{}", directory_name(3))).await.unwrap_err();
    assert!(error.is_bad_input());
    let message = error.to_string();
    assert!(message.contains("no COMMIT marker"), "{message}");
}

/// A checkpoint committed as format 1 wrote it: SHA-256 checksums.
async fn write_with_sha256(store: &CheckpointStore, step: u64, format: u32) {
    let mut listed = serde_json::Map::new();
    for (name, content) in files(step) {
        put(store, &format!("{}/{name}", directory_name(step)), content.clone()).await;
        use sha2::Digest as _;
        let sha256 = format!("{:x}", sha2::Sha256::digest(&content));
        listed.insert(name, serde_json::json!({ "bytes": content.len(), "sha256": sha256 }));
    }
    let commit = serde_json::json!({ "format": format, "step": step, "metric": null, "files": listed });
    put(store, &format!("{}/COMMIT", directory_name(step)), serde_json::to_vec(&commit).unwrap()).await;
}

/// Format 2 checksums with BLAKE3; a format-1 checkpoint (SHA-256, written by earlier versions)
/// still resumes and is still verified; a format this version does not know is refused by name.
#[tokio::test]
async fn commit_formats() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().display().to_string();
    let store = CheckpointStore::new(effnet_store::open(&url).unwrap());
    store.save(10, None, files(10)).await.unwrap();
    let marker = std::fs::read(dir.path().join(directory_name(10)).join("COMMIT")).unwrap();
    let commit: serde_json::Value = serde_json::from_slice(&marker).unwrap();
    assert_eq!(commit["format"], 2);
    for (name, content) in files(10) {
        let digest = &commit["files"][&name];
        assert_eq!(digest["bytes"], content.len() as u64);
        assert_eq!(digest["blake3"].as_str().unwrap(), blake3::hash(&content).to_hex().as_str(), "{name}");
        assert!(digest.get("sha256").is_none(), "{name}");
    }

    // A checkpoint as format 1 wrote it.
    write_with_sha256(&store, 20, 1).await;
    let (committed, loaded) = store.latest().await.unwrap().unwrap();
    assert_eq!((committed.step, committed.commit.format), (20, 1));
    assert_eq!(loaded["optimizer.safetensors"], Bytes::from(vec![21u8; 2000]));
    // ... and is verified: damaged at its committed size, it is skipped for step 10.
    put(&store, &format!("{}/optimizer.safetensors", directory_name(20)), vec![0u8; 2000]).await;
    assert_eq!(latest_step(&store).await, Some(10));

    // A newer format is not a checkpoint this version can vouch for.
    write_with_sha256(&store, 30, 3).await;
    assert_eq!(latest_step(&store).await, Some(10));
    let message =
        effnet_checkpoint::load_url(&format!("{url}/{}", directory_name(30))).await.unwrap_err().to_string();
    assert!(message.contains("format 3") && message.contains("reads formats [1, 2]"), "{message}");

    // A COMMIT that lists a file without any checksum does not vouch for it.
    put(&store, &format!("{}/model.safetensors", directory_name(40)), vec![1u8; 10]).await;
    let commit = serde_json::json!({
        "format": 2, "step": 40, "metric": null, "files": { "model.safetensors": { "bytes": 10 } }
    });
    put(&store, &format!("{}/COMMIT", directory_name(40)), serde_json::to_vec(&commit).unwrap()).await;
    assert_eq!(latest_step(&store).await, Some(10));
}
