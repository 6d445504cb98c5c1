//! One conformance suite run against every kind of store (local files, memory, S3 on moto),
//! so the rest of the project can rely on identical behaviour whatever the URL.
//!
//! Each run works under a fresh sub-prefix of the location, so runs may share a store, and
//! deletes what it wrote at the end. Failures panic with the step and the store named.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use object_store::path::Path;

use crate::error::Error;
use crate::io::{
    COMMIT_MARKER, MIN_PART_SIZE, MultipartWriter, delete, exists, get_bytes, get_range, list_prefix,
    put_bytes, read_marker, size, write_marker,
};
use crate::location::StoreLocation;

/// Size of the multipart object: more than two parts of [`MIN_PART_SIZE`] and not a multiple
/// of it, so the short last part is exercised too.
pub const MULTIPART_OBJECT_SIZE: usize = 12 * 1024 * 1024 + 12_345;

/// Deterministic, position-dependent bytes, so a misplaced range or part shows as a mismatch.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect()
}

/// A fresh sub-prefix under the location for one run.
fn run_root(location: &StoreLocation) -> Path {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    location.path(&format!("conformance-{}-{nanos}", std::process::id())).expect("valid run prefix")
}

fn child(root: &Path, relative: &str) -> Path {
    root.parts().chain(Path::from(relative).parts()).collect()
}

/// Run every check against `location`. Panics on the first failure.
pub async fn run_all(location: &StoreLocation) {
    let root = run_root(location);
    put_get_overwrite(location, &root).await;
    ranged_reads_and_size(location, &root).await;
    listing(location, &root).await;
    missing_objects(location, &root).await;
    deletion(location, &root).await;
    multipart_upload(location, &root).await;
    commit_markers(location, &root).await;
    cleanup(location, &root).await;
}

/// Round trip of small objects, including an empty one, and overwrite semantics.
pub async fn put_get_overwrite(location: &StoreLocation, root: &Path) {
    let store = location.store.as_ref();
    let path = child(root, "small/hello.txt");
    put_bytes(store, &path, Bytes::from_static(b"hello, effnet")).await.expect("put");
    assert_eq!(get_bytes(store, &path).await.expect("get"), &b"hello, effnet"[..], "{store}: round trip");

    put_bytes(store, &path, Bytes::from_static(b"second")).await.expect("overwrite");
    assert_eq!(get_bytes(store, &path).await.expect("get"), &b"second"[..], "{store}: overwrite");
    assert_eq!(size(store, &path).await.expect("size"), 6, "{store}: size after overwrite");

    let empty = child(root, "small/empty");
    put_bytes(store, &empty, Bytes::new()).await.expect("put empty");
    assert_eq!(get_bytes(store, &empty).await.expect("get empty").len(), 0, "{store}: empty object");
    assert_eq!(size(store, &empty).await.expect("size empty"), 0, "{store}: empty size");
}

/// Ranged GETs return exactly the requested bytes.
pub async fn ranged_reads_and_size(location: &StoreLocation, root: &Path) {
    let store = location.store.as_ref();
    let path = child(root, "ranged/data.bin");
    let data = pattern(100_000, 1);
    put_bytes(store, &path, data.clone()).await.expect("put");
    assert_eq!(size(store, &path).await.expect("size"), 100_000, "{store}: size");
    for range in [0..1u64, 10..20, 4_096..8_192, 99_990..100_000, 0..100_000] {
        let got = get_range(store, &path, range.clone()).await.expect("get_range");
        assert_eq!(got, &data[range.start as usize..range.end as usize], "{store}: range {range:?}");
    }
    assert_eq!(get_range(store, &path, 3..7).await.expect("range"), &data[3..7]);
}

/// Listing is recursive, by whole path segments, and exact.
pub async fn listing(location: &StoreLocation, root: &Path) {
    let store = location.store.as_ref();
    for name in ["list/a/1", "list/a/2", "list/a/sub/3", "list/ab/4", "list/b/5"] {
        put_bytes(store, &child(root, name), Bytes::from(name.as_bytes().to_vec())).await.expect("put");
    }
    let listed: Vec<String> = list_prefix(store, &child(root, "list/a"))
        .await
        .expect("list")
        .into_iter()
        .map(|meta| meta.location.to_string())
        .collect();
    let expected: Vec<String> =
        ["list/a/1", "list/a/2", "list/a/sub/3"].iter().map(|name| child(root, name).to_string()).collect();
    assert_eq!(listed, expected, "{store}: list of prefix list/a");

    let all = list_prefix(store, &child(root, "list")).await.expect("list all");
    assert_eq!(all.len(), 5, "{store}: list of prefix list");
    let sizes: Vec<u64> = all.iter().map(|meta| meta.size).collect();
    assert_eq!(sizes, [8, 8, 12, 9, 8], "{store}: listed sizes");

    assert!(list_prefix(store, &child(root, "list/none")).await.expect("list empty").is_empty());
}

/// A missing object is [`Error::NotFound`] for every read.
pub async fn missing_objects(location: &StoreLocation, root: &Path) {
    let store = location.store.as_ref();
    let missing = child(root, "missing/object");
    let expect_not_found = |result: Result<(), Error>, what: &str| match result {
        Err(Error::NotFound { path, .. }) => assert_eq!(path, missing.to_string(), "{store}: {what}"),
        other => panic!("{store}: {what} of a missing object gave {other:?}, expected NotFound"),
    };
    expect_not_found(get_bytes(store, &missing).await.map(|_| ()), "get");
    expect_not_found(get_range(store, &missing, 0..4).await.map(|_| ()), "get_range");
    expect_not_found(size(store, &missing).await.map(|_| ()), "head");
    assert!(!exists(store, &missing).await.expect("exists"), "{store}: exists of a missing object");
}

/// Delete removes the object and is idempotent.
pub async fn deletion(location: &StoreLocation, root: &Path) {
    let store = location.store.as_ref();
    let path = child(root, "delete/me");
    put_bytes(store, &path, Bytes::from_static(b"x")).await.expect("put");
    assert!(exists(store, &path).await.expect("exists"), "{store}: exists after put");
    delete(store, &path).await.expect("delete");
    assert!(!exists(store, &path).await.expect("exists"), "{store}: exists after delete");
    delete(store, &path).await.expect("second delete of the same object");
    assert!(list_prefix(store, &child(root, "delete")).await.expect("list").is_empty());
}

/// A 12 MiB object in 5 MiB parts, written in odd-sized chunks, reads back identically,
/// including a range across a part boundary.
pub async fn multipart_upload(location: &StoreLocation, root: &Path) {
    let store = location.store.as_ref();
    let path = child(root, "multipart/large.bin");
    let data = pattern(MULTIPART_OBJECT_SIZE, 7);
    let mut writer =
        MultipartWriter::create(location.store.clone(), &path, MIN_PART_SIZE).await.expect("create upload");
    for chunk in data.chunks(1024 * 1024 + 7) {
        writer.write(chunk).await.expect("write chunk");
    }
    assert_eq!(writer.written(), MULTIPART_OBJECT_SIZE as u64);
    assert_eq!(writer.finish().await.expect("finish"), MULTIPART_OBJECT_SIZE as u64);

    assert_eq!(
        size(store, &path).await.expect("size"),
        MULTIPART_OBJECT_SIZE as u64,
        "{store}: multipart size"
    );
    let read = get_bytes(store, &path).await.expect("get");
    assert!(read == data[..], "{store}: multipart object differs from what was written");
    let boundary = MIN_PART_SIZE as u64;
    let across = get_range(store, &path, boundary - 10..boundary + 10).await.expect("range across parts");
    assert_eq!(
        across,
        &data[MIN_PART_SIZE - 10..MIN_PART_SIZE + 10],
        "{store}: range across a part boundary"
    );

    // An aborted upload leaves no object behind.
    let aborted = child(root, "multipart/aborted.bin");
    let mut writer = MultipartWriter::create(location.store.clone(), &aborted, MIN_PART_SIZE)
        .await
        .expect("create upload");
    writer.write(&data[..MIN_PART_SIZE + 1]).await.expect("write");
    writer.abort().await.expect("abort");
    assert!(!exists(store, &aborted).await.expect("exists"), "{store}: object after abort");
}

/// Content first, marker last: before the marker the directory reads as uncommitted.
pub async fn commit_markers(location: &StoreLocation, root: &Path) {
    let store = location.store.as_ref();
    let directory = child(root, "checkpoint/step-00000010");
    let marker = child(&directory, COMMIT_MARKER);
    put_bytes(store, &child(&directory, "model.safetensors"), pattern(1000, 3)).await.expect("content");
    assert_eq!(
        read_marker(store, &marker).await.expect("read marker"),
        None,
        "{store}: marker before commit"
    );
    write_marker(store, &marker, Bytes::from_static(b"{\"files\":1}")).await.expect("write marker");
    assert_eq!(
        read_marker(store, &marker).await.expect("read marker").as_deref(),
        Some(&b"{\"files\":1}"[..]),
        "{store}: marker after commit"
    );
}

/// Delete everything the run wrote.
pub async fn cleanup(location: &StoreLocation, root: &Path) {
    let store = location.store.as_ref();
    for meta in list_prefix(store, root).await.expect("list for cleanup") {
        delete(store, &meta.location).await.expect("delete during cleanup");
    }
    assert!(list_prefix(store, root).await.expect("list").is_empty(), "{store}: objects left after cleanup");
}
