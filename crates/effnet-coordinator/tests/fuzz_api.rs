//! Property tests: the coordinator served for real on 127.0.0.1:0 and sent random methods, paths,
//! query strings, tokens, headers and bodies (random bytes, random JSON, and JSON objects built
//! from the protocol's own field names with random values). Every answer must be below 500, or the
//! documented 503 (a deal not ready yet: the worker asks again), and the server must keep
//! answering; a handler panic would show as a dropped connection or a 500.
//!
//! Cases: 48 by default, each sending 6 requests; `PROPTEST_CASES=2000 cargo test -p
//! effnet-coordinator --test fuzz_api` for a long run. Failing inputs are saved next to this file
//! (`fuzz_api.proptest-regressions`) and replayed first on every later run.

use std::sync::{Arc, LazyLock};

use effnet_coordinator::protocol::{JobStart, JoinRequest};
use effnet_coordinator::{Client, Settings, State};
use proptest::prelude::*;
use serde_json::Value;
use tokio::net::TcpListener;

const TOKEN: &str = "fuzz-token";

struct Served {
    runtime: tokio::runtime::Runtime,
    url: String,
    worker: String,
    _dir: tempfile::TempDir,
}

/// One server for the whole binary, with one job and one joined worker so job and worker routes
/// reach real state, not only 404s.
static SERVER: LazyLock<Served> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (url, worker) = runtime.block_on(async {
        let state = Arc::new(State::open(dir.path(), TOKEN, Settings::default()).await.unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(effnet_coordinator::run(listener, state, std::future::pending::<()>()));
        let client = Client::new(&url, TOKEN).unwrap();
        let yaml = "name: demo\nmodel: {variant: b0}\ndata: {train: memory://data/train}\ndistributed: {workers: 2}\n";
        client.submit(yaml, "demo.yaml", &JobStart::Latest).await.unwrap();
        let joined = client.join("demo-1", &JoinRequest::default()).await.unwrap();
        (url, joined.worker_id)
    });
    Served { runtime, url, worker, _dir: dir }
});

#[derive(Debug, Clone)]
struct Request {
    method: &'static str,
    path: String,
    authorization: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("demo-1".to_string()),
        3 => Just("{worker}".to_string()),
        2 => "[a-zA-Z0-9._~-]{0,12}",
        1 => prop::sample::select(vec!["..", "%00", "%ff", "%2F", "demo-1%00", "9999999999999999999999", "-1", " "]).prop_map(String::from),
    ]
}

fn path() -> impl Strategy<Value = String> {
    let routes = vec![
        "/",
        "/metrics",
        "/view/{a}/",
        "/v1/jobs",
        "/v1/jobs/{a}",
        "/v1/jobs/{a}/cancel",
        "/v1/jobs/{a}/restart",
        "/v1/jobs/{a}/progress",
        "/v1/jobs/{a}/workers",
        "/v1/jobs/{a}/workers/{b}/heartbeat",
        "/v1/jobs/{a}/workers/{b}/leave",
        "/v1/jobs/{a}/workers/{b}/rendezvous",
        "/v1/jobs/{a}/workers/{b}/assignment",
        "/v1/jobs/{a}/workers/{b}/plan",
        "/{a}/{b}",
    ];
    let query = prop_oneof![
        3 => Just(String::new()),
        1 => "\\?[a-z_]{0,8}=[a-zA-Z0-9%.-]{0,12}",
        1 => prop::sample::select(vec!["?limit=-1", "?limit=99999999999999999999", "?epoch=18446744073709551615", "?source=../../x", "?limit=0&limit=5"]).prop_map(String::from),
    ];
    (prop::sample::select(routes), segment(), segment(), query)
        .prop_map(|(route, a, b, query)| format!("{}{query}", route.replace("{a}", &a).replace("{b}", &b)))
}

/// Random JSON, a few levels deep.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("JSON has no NaN", |f| f.is_finite()).prop_map(Value::from),
        ".{0,16}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// JSON objects with the protocol's field names, so requests get past "unknown field".
fn protocol_json() -> impl Strategy<Value = Value> {
    let names = vec![
        "host",
        "rank",
        "world_size",
        "step",
        "epoch",
        "samples",
        "loss",
        "generation",
        "worker_id",
        "checkpoint",
        "cursor",
        "data",
        "url",
        "reason",
        "status",
        "outcome",
        "unique_id",
        "address",
        "metrics",
        "lr",
        "progress",
    ];
    prop::collection::btree_map(prop::sample::select(names), json(), 0..5)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

fn request() -> impl Strategy<Value = Request> {
    let method = prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]);
    let authorization = prop_oneof![
        6 => Just(Some(format!("Bearer {TOKEN}"))),
        1 => Just(None),
        1 => Just(Some("Bearer wrong".to_string())),
        1 => "[ -~]{0,40}".prop_map(Some),
    ];
    let content_type = prop::option::of(
        prop::sample::select(vec![
            "application/json",
            "text/plain",
            "application/yaml",
            "x/y; charset=utf-16",
        ])
        .prop_map(String::from),
    );
    let body = prop_oneof![
        2 => protocol_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => "name: [a-z]{1,8}\nmodel: \\{variant: b[0-7]\\}\ndata: \\{train: [a-z:/]{0,12}\\}\n(distributed: \\{workers: [0-9]{1,3}\\}\n)?".prop_map(String::into_bytes),
    ];
    (method, path(), authorization, content_type, body).prop_map(
        |(method, path, authorization, content_type, body)| Request {
            method,
            path,
            authorization,
            content_type,
            body,
        },
    )
}

/// Send one request; the status, or why no answer came.
async fn send(http: &reqwest::Client, served: &Served, request: &Request) -> Result<u16, String> {
    let path = request.path.replace("{worker}", &served.worker);
    let url = format!("{}{path}", served.url);
    let mut builder = http.request(request.method.parse().unwrap(), &url).body(request.body.clone());
    if let Some(value) = &request.authorization {
        builder = builder.header("authorization", value.as_str());
    }
    if let Some(value) = &request.content_type {
        builder = builder.header("content-type", value.as_str());
    }
    let response = builder.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status().as_u16();
    response.bytes().await.map_err(|e| format!("{url}: body: {e}"))?;
    Ok(status)
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_requests_get_no_5xx_but_503_and_the_server_keeps_answering(requests in prop::collection::vec(request(), 1..6)) {
        let served = &*SERVER;
        let http = reqwest::Client::new();
        for request in &requests {
            // A URL reqwest cannot build is the client's refusal, not the server's answer.
            if reqwest::Url::parse(&format!("{}{}", served.url, request.path)).is_err() {
                continue;
            }
            let status = served.runtime.block_on(send(&http, served, request));
            let status = status.map_err(|e| TestCaseError::fail(format!("no answer to {request:?}: {e}")))?;
            prop_assert!(status < 500 || status == 503, "{} for {:?}", status, request);
        }
        let alive = Request { method: "GET", path: "/v1/jobs".into(), authorization: Some(format!("Bearer {TOKEN}")), content_type: None, body: vec![] };
        prop_assert_eq!(served.runtime.block_on(send(&http, served, &alive)), Ok(200));
    }
}
