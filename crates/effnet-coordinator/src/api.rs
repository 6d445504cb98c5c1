//! The HTTP routes: a bearer-token check in front of everything, a body-size limit, and one
//! handler per endpoint that parses its input, calls [`State`], and answers JSON (or text for
//! `/metrics`, HTML for `/`). Every error is `{"error": "<one line>"}` with the status of
//! [`Error::status`].

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State as Shared};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::protocol::{
    Assignment, ErrorBody, JobStart, JobSummary, JoinRequest, LeaveRequest, Progress, RendezvousBlob,
    RestartRequest,
};
use crate::state::State;
use crate::{metrics, page};

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut response = (status, Json(ErrorBody { error: self.to_string() })).into_response();
        if matches!(self, Error::Unauthorized) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type Answer<T> = Result<T, Error>;

/// The routes over `state`, behind the token check and the body limit.
pub fn router(state: Arc<State>) -> Router {
    let limit = state.settings().body_limit;
    Router::new()
        .route("/", get(status_page))
        .route("/view/{key}/", get(status_page_view))
        .route("/metrics", get(prometheus))
        .route("/v1/jobs", post(submit).get(list))
        .route("/v1/jobs/{job}", get(show))
        .route("/v1/jobs/{job}/cancel", post(cancel))
        .route("/v1/jobs/{job}/restart", post(restart))
        .route("/v1/jobs/{job}/progress", get(progress))
        .route("/v1/jobs/{job}/workers", post(join))
        .route("/v1/jobs/{job}/workers/{worker}/heartbeat", post(heartbeat))
        .route("/v1/jobs/{job}/workers/{worker}/leave", post(leave))
        .route("/v1/jobs/{job}/workers/{worker}/rendezvous", post(publish_rendezvous).get(rendezvous))
        .route("/v1/jobs/{job}/workers/{worker}/assignment", get(assignment))
        .route("/v1/jobs/{job}/workers/{worker}/plan", get(epoch_plan))
        .fallback(unknown_endpoint)
        .layer(DefaultBodyLimit::max(limit))
        // Outermost: nothing runs, and no body is read, for a request without the token.
        .layer(middleware::from_fn_with_state(Arc::clone(&state), authorize))
        .with_state(state)
}

async fn authorize(Shared(state): Shared<Arc<State>>, request: Request, next: Next) -> Response {
    // The status page by its key (checked by its handler) needs no bearer header.
    if request.method() == axum::http::Method::GET && request.uri().path().starts_with("/view/") {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(token) if state.token_matches(token) => next.run(request).await,
        _ => Error::Unauthorized.into_response(),
    }
}

async fn unknown_endpoint(request: Request) -> Error {
    Error::UnknownEndpoint { method: request.method().to_string(), path: request.uri().path().to_string() }
}

/// The body, or the reason it could not be read (too large, cut off).
fn body(state: &State, body: Result<Bytes, BytesRejection>) -> Answer<Bytes> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::TooLarge { limit: state.settings().body_limit }
        } else {
            Error::bad_request(format!("request body: {}", rejection.body_text()))
        }
    })
}

/// A JSON body; an empty one reads as `{}` so requests with only optional fields may omit it.
fn json_body<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Answer<T> {
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { bytes };
    serde_json::from_slice(bytes).map_err(|error| Error::bad_request(format!("{what}: {error}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitQuery {
    /// Names the YAML in validation errors, as the file name does for `effnet run --check`.
    source: Option<String>,
    /// `fresh`: the first generation starts at step 0 and deletes the job's checkpoints.
    start: Option<String>,
    /// The first generation resumes from this checkpoint directory.
    resume: Option<String>,
    /// Idempotency key: a second submission with it answers the first one's job.
    key: Option<String>,
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Answer<T> {
    query.map(|Query(value)| value).map_err(|rejection| Error::bad_request(rejection.body_text()))
}

async fn submit(
    Shared(state): Shared<Arc<State>>,
    submit_query: Result<Query<SubmitQuery>, QueryRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> Answer<(StatusCode, Json<crate::protocol::Submitted>)> {
    let submit_query = query(submit_query)?;
    let start = match (submit_query.start.as_deref(), submit_query.resume) {
        (None | Some("latest"), None) => JobStart::Latest,
        (Some("fresh"), None) => JobStart::Fresh,
        (None, Some(url)) if !url.is_empty() => JobStart::Checkpoint { url },
        (Some(other), None) => {
            return Err(Error::bad_request(format!("start={other}: expected latest or fresh")));
        }
        _ => return Err(Error::bad_request("give start=fresh or resume=URL, not both")),
    };
    let source = submit_query.source.clone().unwrap_or_else(|| "job.yaml".to_string());
    let bytes = body(&state, bytes)?;
    let yaml = String::from_utf8(bytes.to_vec())
        .map_err(|error| Error::bad_request(format!("{source}: the job YAML is not UTF-8: {error}")))?;
    let submitted = state.submit(yaml, &source, start, submit_query.key).await?;
    tracing::info!(job = %submitted.id, "job submitted");
    Ok((StatusCode::CREATED, Json(submitted)))
}

async fn list(Shared(state): Shared<Arc<State>>) -> Answer<Json<Vec<crate::protocol::JobSummary>>> {
    Ok(Json(state.jobs().await?.into_iter().map(JobSummary::redacted).collect()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShowQuery {
    /// The job as stored, credentials in its URLs included: what a worker needs to open its
    /// data and checkpoints. Everyone else (`effnet status`) gets it redacted. The same token
    /// allows both; this keeps secrets out of terminals and logs, it is no access control.
    #[serde(default)]
    credentials: bool,
}

async fn show(
    Shared(state): Shared<Arc<State>>,
    Path(job): Path<String>,
    show_query: Result<Query<ShowQuery>, QueryRejection>,
) -> Answer<Json<crate::protocol::JobDetail>> {
    let detail = state.job(&job).await?;
    Ok(Json(if query(show_query)?.credentials { detail } else { detail.redacted() }))
}

async fn cancel(
    Shared(state): Shared<Arc<State>>,
    Path(job): Path<String>,
) -> Answer<Json<crate::protocol::JobSummary>> {
    let summary = state.cancel(&job).await?;
    tracing::info!(job = %job, "job cancelled");
    Ok(Json(summary))
}

async fn restart(
    Shared(state): Shared<Arc<State>>,
    Path(job): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> Answer<Json<crate::protocol::JobSummary>> {
    let request: RestartRequest = json_body(&body(&state, bytes)?, "restart request")?;
    let summary = state.restart(&job, request).await?;
    tracing::info!(job = %job, state = %summary.state, restarts = summary.restarts, "generation ended by the engine");
    Ok(Json(summary))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgressQuery {
    limit: Option<u32>,
}

async fn progress(
    Shared(state): Shared<Arc<State>>,
    Path(job): Path<String>,
    progress_query: Result<Query<ProgressQuery>, QueryRejection>,
) -> Answer<Json<Vec<crate::protocol::ProgressRecord>>> {
    let limit = query(progress_query)?.limit.unwrap_or(100);
    Ok(Json(state.progress(&job, limit).await?))
}

async fn join(
    Shared(state): Shared<Arc<State>>,
    Path(job): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> Answer<Json<crate::protocol::Joined>> {
    let request: JoinRequest = json_body(&body(&state, bytes)?, "join request")?;
    let joined = state.join(&job, request).await?;
    tracing::info!(job = %job, worker = %joined.worker_id, rank = joined.rank, generation = joined.generation, "worker joined");
    Ok(Json(joined))
}

async fn heartbeat(
    Shared(state): Shared<Arc<State>>,
    Path((job, worker)): Path<(String, String)>,
    bytes: Result<Bytes, BytesRejection>,
) -> Answer<Json<crate::protocol::HeartbeatAnswer>> {
    let progress: Progress = json_body(&body(&state, bytes)?, "heartbeat")?;
    Ok(Json(state.heartbeat(&job, &worker, progress).await?))
}

async fn leave(
    Shared(state): Shared<Arc<State>>,
    Path((job, worker)): Path<(String, String)>,
    bytes: Result<Bytes, BytesRejection>,
) -> Answer<Json<crate::protocol::HeartbeatAnswer>> {
    let request: LeaveRequest = json_body(&body(&state, bytes)?, "leave request")?;
    let answer = state.leave(&job, &worker, request).await?;
    tracing::info!(job = %job, worker = %worker, "worker left");
    Ok(Json(answer))
}

async fn publish_rendezvous(
    Shared(state): Shared<Arc<State>>,
    Path((job, worker)): Path<(String, String)>,
    bytes: Result<Bytes, BytesRejection>,
) -> Answer<Json<RendezvousBlob>> {
    let request: RendezvousBlob = json_body(&body(&state, bytes)?, "rendezvous")?;
    let blob = request.blob.ok_or_else(|| Error::bad_request("rendezvous: blob is null"))?;
    state.publish_rendezvous(&job, &worker, blob.clone()).await?;
    Ok(Json(RendezvousBlob { blob: Some(blob) }))
}

async fn rendezvous(
    Shared(state): Shared<Arc<State>>,
    Path((job, worker)): Path<(String, String)>,
) -> Answer<Json<RendezvousBlob>> {
    Ok(Json(RendezvousBlob { blob: state.rendezvous(&job, &worker).await? }))
}

async fn assignment(
    Shared(state): Shared<Arc<State>>,
    Path((job, worker)): Path<(String, String)>,
) -> Answer<Json<Assignment>> {
    Ok(Json(state.assignment(&job, &worker).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanQuery {
    epoch: u64,
}

async fn epoch_plan(
    Shared(state): Shared<Arc<State>>,
    Path((job, worker)): Path<(String, String)>,
    plan_query: Result<Query<PlanQuery>, QueryRejection>,
) -> Answer<Json<effnet_data::EpochPlan>> {
    let epoch = query(plan_query)?.epoch;
    Ok(Json(state.epoch_plan(&job, &worker, epoch).await?))
}

async fn prometheus(Shared(state): Shared<Arc<State>>) -> Answer<Response> {
    let jobs: Vec<JobSummary> = state.jobs().await?.into_iter().map(JobSummary::redacted).collect();
    let members = state.member_counts().await?;
    let text = metrics::render(&jobs, &members, crate::state::now());
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

/// `/view/{key}/`: the status page for a browser that has the view key; any other key is an
/// unknown endpoint, as if the path did not exist.
async fn status_page_view(
    Shared(state): Shared<Arc<State>>,
    Path(key): Path<String>,
    request: Request,
) -> Answer<Html<String>> {
    if !state.view_key_matches(&key) {
        return Err(Error::UnknownEndpoint { method: "GET".into(), path: request.uri().path().to_string() });
    }
    status_page(Shared(state)).await
}

async fn status_page(Shared(state): Shared<Arc<State>>) -> Answer<Html<String>> {
    let jobs: Vec<JobSummary> = state.jobs().await?.into_iter().map(JobSummary::redacted).collect();
    let mut curves = Vec::with_capacity(jobs.len());
    for job in &jobs {
        curves.push(state.progress(&job.id, 500).await?);
    }
    Ok(Html(page::render(&jobs, &curves, crate::state::now())))
}
