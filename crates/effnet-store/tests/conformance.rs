//! The shared conformance suite against the three kinds of store: local files, in-memory, and a
//! real S3-protocol server (moto) on loopback.

use effnet_store::testing::conformance::pattern;
use effnet_store::testing::{S3TestServer, conformance};
use effnet_store::{StoreLocation, buffered_writer, size};
use tokio::io::AsyncWriteExt;

/// `buffered_writer` (the AsyncWrite parquet's AsyncArrowWriter takes) switches to a multipart
/// upload above its buffer and reads back identically.
async fn buffered_writer_round_trip(location: &StoreLocation) {
    let path = location.path("buffered/large.bin").expect("path");
    let data = pattern(effnet_store::DEFAULT_PART_SIZE + 3 * 1024 * 1024 + 1, 11);
    let mut writer = buffered_writer(location.store.clone(), &path);
    for chunk in data.chunks(256 * 1024 + 3) {
        writer.write_all(chunk).await.expect("write");
    }
    writer.shutdown().await.expect("shutdown");
    assert_eq!(size(location.store.as_ref(), &path).await.expect("size"), data.len() as u64);
    let read = get_bytes(location.store.as_ref(), &path).await.expect("get");
    assert!(read == data[..], "{}: buffered object differs", location.store);
    effnet_store::delete(location.store.as_ref(), &path).await.expect("delete");
}
use effnet_store::{Environment, Error, Scheme, StoreOptions, get_bytes, open, open_with, put_bytes};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_files_pass_the_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let location = open(dir.path().join("store").to_str().expect("utf-8 path")).expect("open local");
    assert_eq!(location.scheme, Scheme::File);
    conformance::run_all(&location).await;

    let location = open(&format!("file://{}", dir.path().join("via-url").display())).expect("open file url");
    conformance::run_all(&location).await;
    buffered_writer_round_trip(&location).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_passes_the_suite() {
    let location = open("memory://conformance/some/prefix").expect("open memory");
    assert_eq!(location.scheme, Scheme::Memory);
    conformance::run_all(&location).await;
    buffered_writer_round_trip(&location).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_on_moto_passes_the_suite() {
    let server = S3TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let location = server.open("datasets/conformance").expect("open s3");
    assert_eq!(location.scheme, Scheme::S3);
    assert_eq!(location.prefix.as_ref(), "datasets/conformance");
    conformance::run_all(&location).await;
    buffered_writer_round_trip(&location).await;

    // The same bucket through a second open sees the objects of the first.
    let path = location.path("shared.txt").expect("path");
    put_bytes(location.store.as_ref(), &path, &b"seen"[..]).await.expect("put");
    let again = open_with(&server.url("datasets/conformance"), &server.options()).expect("reopen");
    assert_eq!(get_bytes(again.store.as_ref(), &path).await.expect("get"), &b"seen"[..]);

    // The usual AWS environment variables alone (no explicit options) reach the same server.
    let from_env = StoreOptions { environment: Environment::Vars(server.env_vars()), ..Default::default() };
    let via_env = open_with(&server.url("datasets/conformance"), &from_env).expect("open from environment");
    assert_eq!(get_bytes(via_env.store.as_ref(), &path).await.expect("get via env"), &b"seen"[..]);

    // Without AWS_ALLOW_HTTP the plain-HTTP endpoint is refused rather than used in clear text.
    let mut https_only = from_env.clone();
    if let Environment::Vars(vars) = &mut https_only.environment {
        vars.remove("AWS_ALLOW_HTTP");
    }
    let err = open_with(&server.url("datasets/conformance"), &https_only).unwrap_err();
    assert!(matches!(&err, Error::InvalidOption { name, .. } if name == "allow_http"), "{err:?}");

    // A second bucket on the same server is independent of the first.
    server.create_bucket("effnet-second").expect("create bucket");
    let second = open_with("s3://effnet-second/x", &server.options()).expect("open second bucket");
    assert!(effnet_store::list_prefix(second.store.as_ref(), &second.prefix).await.expect("list").is_empty());

    // A bucket that does not exist is an error naming the object, not a hang.
    let missing_bucket = open_with("s3://no-such-bucket/x", &server.options()).expect("open");
    let err =
        get_bytes(missing_bucket.store.as_ref(), &missing_bucket.path("y").expect("path")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. } | Error::Store { .. }), "{err:?}");
    assert!(err.to_string().contains("x/y"), "{err}");
}

#[tokio::test]
async fn memory_opens_of_one_name_share_objects() {
    let writer = open("memory://shared-pipeline/data").expect("open");
    let reader = open("memory://shared-pipeline/data").expect("open");
    let path = writer.path("part-00000.parquet").expect("path");
    put_bytes(writer.store.as_ref(), &path, &b"rows"[..]).await.expect("put");
    assert_eq!(get_bytes(reader.store.as_ref(), &path).await.expect("get"), &b"rows"[..]);
    let other = open("memory://other-pipeline/data").expect("open");
    assert!(matches!(get_bytes(other.store.as_ref(), &path).await, Err(Error::NotFound { .. })));
}

#[tokio::test]
async fn http_location_refuses_writes_before_any_request() {
    // Port 9 on loopback is not served; the refusal must come before a connection attempt.
    let location = open("http://127.0.0.1:9/datasets").expect("open http");
    let path = location.path("x.bin").expect("path");
    let err = put_bytes(location.store.as_ref(), &path, &b"x"[..]).await.unwrap_err();
    assert!(matches!(&err, Error::ReadOnly { url, .. } if url == "http://127.0.0.1:9/datasets"), "{err:?}");
}

/// The suite again on moto, with one read in three failing: 503s, throttling, timeouts, bodies
/// cut off half way and slow answers (seeded). Every read comes back whole through the retry
/// layer, which resumes cut-off bodies from the byte they reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_on_moto_passes_the_suite_through_read_faults() {
    use effnet_store::faults::{FaultPlan, FaultyStore};
    use effnet_store::retrying::RetryingStore;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    let server = S3TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let plain = server.open("datasets/faults").expect("open s3");
    let plan = FaultPlan::parse(
        "seed=5,error=0.08,throttle=0.06,timeout=0.04,truncate=0.12,slow=0.04,timeout_ms=20,slow_ms=20",
    )
    .expect("plan");
    let faulty = Arc::new(FaultyStore::new(plain.store.clone(), plan));
    let location = StoreLocation { store: Arc::new(RetryingStore::new(faulty.clone())), ..plain };
    conformance::run_all(&location).await;
    buffered_writer_round_trip(&location).await;
    let counts = &faulty.counts;
    let (requests, failures) = (counts.requests.load(Ordering::Relaxed), counts.failures());
    assert!(failures >= 5, "{failures} faults in {requests} requests: the suite did not meet enough faults");
    assert!(counts.truncate.load(Ordering::Relaxed) >= 1, "no body was cut off");
}
