//! A real S3-protocol server (moto) on 127.0.0.1 for tests.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::Result as StoreResult;
use crate::location::{StoreLocation, open_with};
use crate::options::{Environment, RetrySettings, StoreOptions};

const SETUP_HINT: &str = "run `make venv-reference` (it installs moto[server] into .venv) or point EFFNET_PYTHON at a \
                          Python that has it";

/// The dummy credentials and region the server is used with (moto accepts any keys).
pub const ACCESS_KEY_ID: &str = "effnet-test";
pub const SECRET_ACCESS_KEY: &str = "effnet-test";
pub const REGION: &str = "us-east-1";

/// How long moto gets to import itself and answer (it takes 2–5 s on an idle machine).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the test server could not be started. The tests that need it fail with this message;
/// they are never skipped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestServerError {
    #[error("no Python at {python} for the S3 test server: {hint}")]
    MissingPython { python: PathBuf, hint: &'static str },

    #[error("moto is not importable by {python}: {hint}")]
    MissingMoto { python: PathBuf, hint: &'static str },

    #[error("moto_server on {address} exited during startup ({status}); log tail: {log_tail}")]
    Exited { address: SocketAddr, status: String, log_tail: String },

    #[error("moto_server on {address} did not answer within {seconds} s; last response: {last}")]
    NotReady { address: SocketAddr, seconds: u64, last: String },

    #[error("S3 test server: {what}: {source}")]
    Io { what: String, source: std::io::Error },
}

/// A moto S3 server on a free loopback port with one empty bucket; the process is killed when
/// this value is dropped.
///
/// Requests are signed with dummy keys (moto accepts any), region `us-east-1`, plain HTTP.
pub struct S3TestServer {
    child: Child,
    address: SocketAddr,
    bucket: String,
    log_path: PathBuf,
    /// Where a persistent server ([`S3TestServer::start_persistent`]) keeps its buckets.
    state: Option<tempfile_free::StateDir>,
}

/// moto's server, restoring its buckets from a directory before it serves and saving them there
/// on SIGTERM (moto itself keeps objects only in memory).
const PERSISTENT_LAUNCHER: &str = include_str!("moto_persistent.py");

mod tempfile_free {
    /// A directory removed when dropped (this module is built without the tempfile crate).
    pub struct StateDir(pub std::path::PathBuf);

    impl Drop for StateDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The Python that runs moto: `EFFNET_PYTHON`, else `<workspace root>/.venv/bin/python`.
pub fn python_path() -> PathBuf {
    if let Some(python) = std::env::var_os("EFFNET_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(python);
    }
    // Canonicalise first: the crate may be built through a symlink from another checkout.
    let manifest = FsPath::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = manifest.canonicalize().unwrap_or_else(|_| manifest.to_path_buf());
    manifest
        .ancestors()
        .map(|dir| dir.join(".venv/bin/python"))
        .find(|python| python.exists())
        .unwrap_or_else(|| manifest.join("../../.venv/bin/python"))
}

impl S3TestServer {
    /// Start moto and create a bucket. Blocks the calling thread for a few seconds; in an async
    /// test call it before doing anything else, or through `spawn_blocking`.
    pub fn start() -> Result<S3TestServer, TestServerError> {
        Self::start_with(None)
    }

    /// A server whose buckets survive [`S3TestServer::restart`], as a real S3 server's do.
    pub fn start_persistent() -> Result<S3TestServer, TestServerError> {
        static STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let directory = std::env::temp_dir().join(format!(
            "effnet-moto-state-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(directory.join("buckets")).map_err(|source| TestServerError::Io {
            what: "creating the moto state directory".into(),
            source,
        })?;
        std::fs::write(directory.join("launcher.py"), PERSISTENT_LAUNCHER)
            .map_err(|source| TestServerError::Io { what: "writing the moto launcher".into(), source })?;
        Self::start_with(Some(tempfile_free::StateDir(directory)))
    }

    /// Stop the server (SIGTERM: a persistent one saves its buckets), stay down for `down`
    /// (requests meanwhile find no server), and start it again on the same address.
    pub fn restart(&mut self, down: Duration) -> Result<(), TestServerError> {
        let Some(state) = &self.state else {
            return Err(TestServerError::Io {
                what: "restarting the server".into(),
                source: std::io::Error::other(
                    "only a persistent server (start_persistent) keeps its objects",
                ),
            });
        };
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = self.child.wait();
        std::thread::sleep(down);
        self.child = spawn_moto(&python_path(), self.address, &self.log_path, Some(&state.0))?;
        self.wait_until_ready()
    }

    fn start_with(state: Option<tempfile_free::StateDir>) -> Result<S3TestServer, TestServerError> {
        let mut state = state;
        let python = python_path();
        if !python.exists() {
            return Err(TestServerError::MissingPython { python, hint: SETUP_HINT });
        }
        // A port taken between probing and moto binding it makes moto exit; try a few ports.
        let mut last_error = None;
        for _ in 0..3 {
            match Self::start_on_free_port(&python, &mut state) {
                Ok(server) => return Ok(server),
                Err(TestServerError::Exited { log_tail, .. }) if log_tail.contains("No module named") => {
                    return Err(TestServerError::MissingMoto { python, hint: SETUP_HINT });
                }
                Err(error @ TestServerError::Exited { .. }) => last_error = Some(error),
                Err(error) => return Err(error),
            }
        }
        Err(last_error.expect("three attempts were made"))
    }

    fn start_on_free_port(
        python: &FsPath,
        state: &mut Option<tempfile_free::StateDir>,
    ) -> Result<S3TestServer, TestServerError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| TestServerError::Io { what, source }
        };
        let probe = TcpListener::bind("127.0.0.1:0").map_err(io("binding a probe port on 127.0.0.1"))?;
        let address = probe.local_addr().map_err(io("reading the probe port"))?;
        drop(probe);

        let log_path =
            std::env::temp_dir().join(format!("effnet-moto-{}-{}.log", std::process::id(), address.port()));
        let child = spawn_moto(python, address, &log_path, state.as_ref().map(|s| s.0.as_path()))?;
        let bucket = format!("effnet-test-{}", address.port());
        let mut server = S3TestServer { child, address, bucket, log_path, state: state.take() };
        if let Err(error) = server.wait_until_ready() {
            *state = server.state.take();
            return Err(error);
        }
        Ok(server)
    }

    /// Poll with the bucket creation itself: the first `200` both proves moto is serving and
    /// leaves the bucket in place.
    fn wait_until_ready(&mut self) -> Result<(), TestServerError> {
        let started = Instant::now();
        let mut last = String::from("no connection");
        while started.elapsed() < STARTUP_TIMEOUT {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
                let tail: String = log
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join(" | ");
                return Err(TestServerError::Exited {
                    address: self.address,
                    status: status.to_string(),
                    log_tail: tail,
                });
            }
            match create_bucket(self.address, &self.bucket) {
                // 409: a restarted persistent server already holds the bucket.
                Ok(status_line) if status_line.contains(" 200") || status_line.contains(" 409") => {
                    return Ok(());
                }
                Ok(status_line) => last = status_line,
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(TestServerError::NotReady { address: self.address, seconds: STARTUP_TIMEOUT.as_secs(), last })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The bucket created at startup.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// `s3://BUCKET/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix.trim_start_matches('/'))
    }

    /// The standard AWS variables that reach this server, for a child process under test
    /// (`Command::envs(server.env_vars())`) or for [`Environment::Vars`].
    pub fn env_vars(&self) -> BTreeMap<String, String> {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
    }

    /// Options that reach this server: endpoint, region, plain HTTP, dummy keys, few retries, and
    /// an isolated environment so a developer's own `AWS_*` variables cannot interfere.
    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            endpoint: Some(self.endpoint()),
            region: Some(REGION.to_string()),
            allow_http: Some(true),
            retry: RetrySettings { max_retries: 2, retry_timeout_secs: 10, ..Default::default() },
            environment: Environment::Vars(self.env_vars()),
            ..Default::default()
        }
    }

    /// Create another empty bucket on this server.
    pub fn create_bucket(&self, bucket: &str) -> Result<(), TestServerError> {
        let status = create_bucket(self.address, bucket)
            .map_err(|source| TestServerError::Io { what: format!("creating bucket {bucket}"), source })?;
        if status.contains(" 200") {
            Ok(())
        } else {
            Err(TestServerError::Io {
                what: format!("creating bucket {bucket}"),
                source: std::io::Error::other(status),
            })
        }
    }

    /// Open `s3://BUCKET/prefix` on this server.
    pub fn open(&self, prefix: &str) -> StoreResult<StoreLocation> {
        open_with(&self.url(prefix), &self.options())
    }
}

impl Drop for S3TestServer {
    fn drop(&mut self) {
        // The child is ours (spawned above); kill it by its handle, then reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// moto on `address`, logging to `log_path` (appended: a restart keeps the first run's log);
/// persistent when given a state directory (its `launcher.py`, its `buckets/`).
fn spawn_moto(
    python: &FsPath,
    address: SocketAddr,
    log_path: &FsPath,
    state: Option<&FsPath>,
) -> Result<Child, TestServerError> {
    let io = |what: String| move |source| TestServerError::Io { what, source };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(io("opening the moto log file".into()))?;
    let log_err = log.try_clone().map_err(io("duplicating the moto log file".into()))?;
    let mut command = Command::new(python);
    match state {
        Some(state) => command
            .arg(state.join("launcher.py"))
            .args(["127.0.0.1", &address.port().to_string()])
            .arg(state.join("buckets")),
        None => command.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &address.port().to_string()]),
    };
    command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(io(format!("spawning {}", python.display())))
}

/// `PUT /bucket` with a syntactically valid SigV4 header (moto routes on its credential scope and
/// does not verify the signature). Returns the HTTP status line.
fn create_bucket(address: SocketAddr, bucket: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let request = format!(
        "PUT /{bucket} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/20250101/{REGION}/s3/aws4_request, \
         SignedHeaders=host, Signature=0\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.lines().next().unwrap_or_default().to_string())
}
