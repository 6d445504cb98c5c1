//! [`Client`]: the HTTP API from the other side, for the CLI (`effnet submit/status/cancel/logs`)
//! and workers. Answers the server refused with a 4xx are [`ClientError::Rejected`], carrying the
//! server's one-line reason, so a CLI can report them as bad input.

use effnet_store::{redact, redact_text};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::protocol::{
    Assignment, ErrorBody, HeartbeatAnswer, JobDetail, JobStart, JobSummary, JoinRequest, Joined,
    LeaveRequest, Progress, ProgressRecord, RendezvousBlob, RestartRequest, Submitted,
};

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator refused the request (4xx): bad input, wrong token, unknown job.
    #[error("coordinator {}: {reason} ({status})", redact(.url))]
    Rejected { url: String, status: u16, reason: String },
    /// The coordinator failed (5xx) or answered something that is not the API.
    #[error("coordinator {}: {} ({status})", redact(.url), redact_text(.reason))]
    Server { url: String, status: u16, reason: String },
    /// The coordinator could not be reached.
    #[error("coordinator {}: {}", redact(.url), redact_text(&.source.to_string()))]
    Transport { url: String, source: reqwest::Error },
    #[error("coordinator URL {}: {}", redact(.url), redact_text(.reason))]
    BadUrl { url: String, reason: String },
}

impl ClientError {
    /// Whether the request was refused for what the user sent (a 4xx answer, a malformed URL).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, ClientError::Rejected { .. } | ClientError::BadUrl { .. })
    }
}

pub type ClientResult<T> = Result<T, ClientError>;

/// A coordinator's API at `base_url` with a bearer token.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    token: String,
}

impl Client {
    /// `base_url` like `http://127.0.0.1:7700`; a trailing `/` is ignored. Requests time out
    /// after 30 s. A client's pooled connections belong to the tokio runtime that opened them:
    /// give each runtime its own client (a clone shares the pool).
    pub fn new(base_url: &str, token: &str) -> ClientResult<Client> {
        let base_url = base_url.trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(ClientError::BadUrl {
                url: base_url,
                reason: "must start with http:// or https://".into(),
            });
        }
        // A coordinator that stops answering must not hang a worker's heartbeat for ever.
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|source| ClientError::Transport { url: base_url.clone(), source })?;
        Ok(Client { http, base_url, token: token.to_string() })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn send<T: DeserializeOwned>(&self, method: Method, path: &str, body: Body<'_>) -> ClientResult<T> {
        let url = format!("{}{path}", self.base_url);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        request = match body {
            Body::None => request,
            Body::Text(text) => request.header("content-type", "application/yaml").body(text.to_string()),
            Body::Json(value) => request.json(&value),
        };
        let response =
            request.send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        let status = response.status();
        let bytes =
            response.bytes().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|error| ClientError::Server {
                url,
                status: status.as_u16(),
                reason: format!("unexpected answer: {error}"),
            });
        }
        let reason = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => body.error,
            Err(_) => String::from_utf8_lossy(&bytes).trim().chars().take(200).collect(),
        };
        let reason =
            if reason.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { reason };
        if status.is_client_error() && status != StatusCode::REQUEST_TIMEOUT {
            Err(ClientError::Rejected { url, status: status.as_u16(), reason })
        } else {
            Err(ClientError::Server { url, status: status.as_u16(), reason })
        }
    }

    /// Submits job YAML; `source_name` names it in validation errors (the file name); `start`
    /// is where its first generation starts.
    pub async fn submit(&self, yaml: &str, source_name: &str, start: &JobStart) -> ClientResult<Submitted> {
        self.submit_keyed(yaml, source_name, start, None).await
    }

    /// [`Client::submit`] with an idempotency key: submitting the same YAML with the same key
    /// again answers the job the first submission made (a different YAML is a 409).
    pub async fn submit_keyed(
        &self,
        yaml: &str,
        source_name: &str,
        start: &JobStart,
        key: Option<&str>,
    ) -> ClientResult<Submitted> {
        let mut path = format!("/v1/jobs?source={}", encode(source_name));
        if let Some(key) = key {
            path.push_str(&format!("&key={}", encode(key)));
        }
        match start {
            JobStart::Latest => {}
            JobStart::Fresh => path.push_str("&start=fresh"),
            JobStart::Checkpoint { url } => path.push_str(&format!("&resume={}", encode(url))),
        }
        self.send(Method::POST, &path, Body::Text(yaml)).await
    }

    pub async fn jobs(&self) -> ClientResult<Vec<JobSummary>> {
        self.send(Method::GET, "/v1/jobs", Body::None).await
    }

    /// The job as people see it: URLs with credentials redacted ([`JobDetail::redacted`]).
    pub async fn job(&self, id: &str) -> ClientResult<JobDetail> {
        self.send(Method::GET, &format!("/v1/jobs/{}", encode(id)), Body::None).await
    }

    /// The job as submitted, credentials included: for a worker, which opens its URLs.
    pub async fn job_with_credentials(&self, id: &str) -> ClientResult<JobDetail> {
        self.send(Method::GET, &format!("/v1/jobs/{}?credentials=true", encode(id)), Body::None).await
    }

    pub async fn cancel(&self, id: &str) -> ClientResult<JobSummary> {
        self.send(Method::POST, &format!("/v1/jobs/{}/cancel", encode(id)), Body::None).await
    }

    /// Ends the job's newest generation now (an engine saw its workers fail).
    pub async fn restart(&self, id: &str, reason: &str, give_up: bool) -> ClientResult<JobSummary> {
        let request = RestartRequest { reason: Some(reason.to_string()), give_up };
        self.send(Method::POST, &format!("/v1/jobs/{}/restart", encode(id)), Body::json(&request)).await
    }

    pub async fn progress(&self, id: &str, limit: u32) -> ClientResult<Vec<ProgressRecord>> {
        self.send(Method::GET, &format!("/v1/jobs/{}/progress?limit={limit}", encode(id)), Body::None).await
    }

    pub async fn join(&self, job: &str, request: &JoinRequest) -> ClientResult<Joined> {
        self.send(Method::POST, &format!("/v1/jobs/{}/workers", encode(job)), Body::json(request)).await
    }

    pub async fn heartbeat(
        &self,
        job: &str,
        worker: &str,
        progress: &Progress,
    ) -> ClientResult<HeartbeatAnswer> {
        let path = format!("/v1/jobs/{}/workers/{}/heartbeat", encode(job), encode(worker));
        self.send(Method::POST, &path, Body::json(progress)).await
    }

    /// Rank 0 publishes its generation's rendezvous bytes (NCCL's unique id).
    pub async fn publish_rendezvous(&self, job: &str, worker: &str, bytes: &[u8]) -> ClientResult<()> {
        let path = format!("/v1/jobs/{}/workers/{}/rendezvous", encode(job), encode(worker));
        let blob = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let _: RendezvousBlob =
            self.send(Method::POST, &path, Body::json(&RendezvousBlob { blob: Some(blob) })).await?;
        Ok(())
    }

    /// The generation's rendezvous bytes, `None` until rank 0 published them.
    pub async fn rendezvous(&self, job: &str, worker: &str) -> ClientResult<Option<Vec<u8>>> {
        let path = format!("/v1/jobs/{}/workers/{}/rendezvous", encode(job), encode(worker));
        let answer: RendezvousBlob = self.send(Method::GET, &path, Body::None).await?;
        let Some(hex) = answer.blob else { return Ok(None) };
        let bytes: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| hex.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
            .collect();
        bytes.map(Some).ok_or_else(|| ClientError::Server {
            url: format!("{}{path}", self.base_url),
            status: 200,
            reason: "the rendezvous blob is not hex".into(),
        })
    }

    /// This worker's start in its running generation (409 while it forms).
    pub async fn assignment(&self, job: &str, worker: &str) -> ClientResult<Assignment> {
        let path = format!("/v1/jobs/{}/workers/{}/assignment", encode(job), encode(worker));
        self.send(Method::GET, &path, Body::None).await
    }

    /// Epoch `epoch`'s plan for this worker's generation.
    pub async fn epoch_plan(
        &self,
        job: &str,
        worker: &str,
        epoch: u64,
    ) -> ClientResult<effnet_data::EpochPlan> {
        let path = format!("/v1/jobs/{}/workers/{}/plan?epoch={epoch}", encode(job), encode(worker));
        self.send(Method::GET, &path, Body::None).await
    }

    pub async fn leave(
        &self,
        job: &str,
        worker: &str,
        request: &LeaveRequest,
    ) -> ClientResult<HeartbeatAnswer> {
        let path = format!("/v1/jobs/{}/workers/{}/leave", encode(job), encode(worker));
        self.send(Method::POST, &path, Body::json(request)).await
    }
}

enum Body<'a> {
    None,
    Text(&'a str),
    Json(serde_json::Value),
}

impl Body<'_> {
    fn json<T: Serialize>(value: &T) -> Body<'static> {
        // The protocol types are plain data; serialising them cannot fail.
        Body::Json(serde_json::to_value(value).unwrap_or(serde_json::Value::Null))
    }
}

/// Percent-encodes a path segment or query value (job names are `[A-Za-z0-9._-]`, but a user
/// may type anything).
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_reserved_bytes() {
        assert_eq!(encode("demo-1"), "demo-1");
        assert_eq!(encode("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(encode("jobs/ü.yaml"), "jobs%2F%C3%BC.yaml");
    }

    #[test]
    fn rejects_urls_without_a_scheme() {
        let error = Client::new("127.0.0.1:7700", "t").unwrap_err();
        assert!(error.is_bad_input());
        assert_eq!(error.to_string(), "coordinator URL 127.0.0.1:7700: must start with http:// or https://");
    }
}
