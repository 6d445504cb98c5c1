//! The coordinator served for real on 127.0.0.1:0 with a temporary state directory, spoken to
//! over HTTP (the crate's `Client` and raw requests for what the client would never send).

use std::sync::Arc;
use std::time::Duration;

use effnet_coordinator::protocol::{
    Action, CheckpointReport, GenerationState, JobStart, JobState, JoinRequest, LeaveOutcome, LeaveRequest,
    MemberState, Progress,
};
use effnet_coordinator::{Client, ClientError, Settings, State};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const TOKEN: &str = "s3cret-token";

fn job_yaml(name: &str, workers: u32) -> String {
    format!(
        "name: {name}\nmodel: {{variant: b0}}\ndata: {{train: memory://data/train}}\ndistributed: {{workers: {workers}}}\n"
    )
}

/// A coordinator serving on loopback; dropping `stop` (or sending on it) shuts it down.
struct Server {
    url: String,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<effnet_coordinator::Result<()>>>,
}

impl Server {
    async fn start(dir: &std::path::Path, settings: Settings) -> Server {
        let state = Arc::new(State::open(dir, TOKEN, settings).await.expect("state opens"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(effnet_coordinator::run(listener, Arc::clone(&state), async move {
            let _ = stopped.await;
        }));
        Server { url, state, stop: Some(stop), task: Some(task) }
    }

    fn client(&self) -> Client {
        Client::new(&self.url, TOKEN).unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let served = self.task.take().unwrap().await.unwrap();
        assert!(served.is_ok(), "{served:?}");
    }
}

/// A request the client would never send: any method, token and body.
async fn raw(
    server: &Server,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let http = reqwest::Client::new();
    let mut request = http.request(method.parse().unwrap(), format!("{}{path}", server.url)).body(body);
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

fn rejected(error: ClientError) -> (u16, String) {
    match error {
        ClientError::Rejected { status, reason, .. } => (status, reason),
        other => panic!("expected a 4xx, got {other:?}"),
    }
}

#[tokio::test]
async fn requests_without_the_right_token_get_401_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Settings::default()).await;
    let yaml = job_yaml("demo", 1).into_bytes();
    let wrong_token = format!("Bearer {TOKEN}x");
    let prefix_only = format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]);
    let basic = format!("Basic {TOKEN}");
    for authorization in [
        None,
        Some("Bearer wrong"),
        Some(wrong_token.as_str()),
        Some(prefix_only.as_str()),
        Some(basic.as_str()),
        Some("Bearer "),
    ] {
        let (status, body) = raw(&server, "POST", "/v1/jobs", authorization, yaml.clone()).await;
        assert_eq!(status, 401, "{authorization:?}");
        assert_eq!(
            body["error"], "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
            "{authorization:?}"
        );
    }
    for path in ["/", "/metrics", "/v1/jobs", "/v1/jobs/demo-1", "/no/such/endpoint"] {
        let (status, _) = raw(&server, "GET", path, None, Vec::new()).await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, _) =
        raw(&server, "POST", "/v1/jobs/demo-1/workers", Some("Bearer nope"), b"{}".to_vec()).await;
    assert_eq!(status, 401);
    assert_eq!(server.client().jobs().await.unwrap(), vec![]);
    let wrong = Client::new(&server.url, "nope").unwrap();
    let (status, reason) = rejected(wrong.jobs().await.unwrap_err());
    assert_eq!(status, 401);
    assert!(reason.contains("bearer token"), "{reason}");
    server.stop().await;
}

#[tokio::test]
async fn oversized_and_malformed_bodies_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings { body_limit: 1024, ..Settings::default() };
    let server = Server::start(dir.path(), settings).await;
    let client = server.client();
    let job = client.submit(&job_yaml("demo", 2), "demo.yaml", &JobStart::Latest).await.unwrap();
    assert_eq!(job.id, "demo-1");

    // Too large: a valid job padded with a comment past the limit.
    let mut padded = job_yaml("big", 1);
    padded.push_str(&format!("# {}\n", "x".repeat(2000)));
    let (status, body) = raw(&server, "POST", "/v1/jobs", Some(&bearer()), padded.into_bytes()).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"], "request body larger than 1024 bytes");

    let (status, body) = raw(&server, "POST", "/v1/jobs", Some(&bearer()), vec![b'n', 0xff, 0xfe]).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().starts_with("job.yaml: the job YAML is not UTF-8"), "{body}");

    let (status, body) =
        raw(&server, "POST", "/v1/jobs?source=bad.yaml", Some(&bearer()), b"name: [".to_vec()).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().starts_with("bad.yaml:"), "{body}");

    let (status, body) =
        raw(&server, "POST", "/v1/jobs?colour=red", Some(&bearer()), job_yaml("q", 1).into_bytes()).await;
    assert_eq!(status, 400, "{body}");

    let (status, body) =
        raw(&server, "POST", "/v1/jobs/demo-1/workers", Some(&bearer()), b"{\"host\":".to_vec()).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().starts_with("join request: EOF while parsing"), "{body}");

    let (status, body) =
        raw(&server, "POST", "/v1/jobs/demo-1/workers", Some(&bearer()), b"{\"hots\": \"gpu1\"}".to_vec())
            .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("unknown field `hots`"), "{body}");

    let joined = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    let heartbeat = format!("/v1/jobs/demo-1/workers/{}/heartbeat", joined.worker_id);
    let (status, body) = raw(&server, "POST", &heartbeat, Some(&bearer()), b"{\"step\": -1}".to_vec()).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().starts_with("heartbeat: invalid value: integer `-1`"), "{body}");

    // Nothing but the one job and its one member.
    let jobs = client.jobs().await.unwrap();
    assert_eq!(jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["demo-1"]);
    let detail = client.job("demo-1").await.unwrap();
    assert_eq!(detail.members.len(), 1);
    assert_eq!(detail.members[0].step, None);
    assert_eq!(client.progress("demo-1", 10).await.unwrap(), vec![]);
    server.stop().await;
}

#[tokio::test]
async fn unknown_jobs_workers_and_endpoints_are_404() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Settings::default()).await;
    let client = server.client();
    assert_eq!(rejected(client.job("nope-1").await.unwrap_err()), (404, "unknown job nope-1".to_string()));
    assert_eq!(rejected(client.cancel("nope-1").await.unwrap_err()), (404, "unknown job nope-1".to_string()));
    assert_eq!(
        rejected(client.join("nope-1", &JoinRequest::default()).await.unwrap_err()),
        (404, "unknown job nope-1".to_string())
    );
    assert_eq!(rejected(client.progress("nope-1", 5).await.unwrap_err()).0, 404);
    client.submit(&job_yaml("demo", 1), "demo.yaml", &JobStart::Latest).await.unwrap();
    assert_eq!(
        rejected(client.heartbeat("demo-1", "w9", &Progress::default()).await.unwrap_err()),
        (404, "unknown worker w9 of job demo-1".to_string())
    );
    // A worker id of another job is unknown to this one.
    client.submit(&job_yaml("other", 1), "other.yaml", &JobStart::Latest).await.unwrap();
    let joined = client.join("other-2", &JoinRequest::default()).await.unwrap();
    assert_eq!(
        rejected(client.heartbeat("demo-1", &joined.worker_id, &Progress::default()).await.unwrap_err()).0,
        404
    );
    let (status, body) = raw(&server, "GET", "/v2/jobs", Some(&bearer()), Vec::new()).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("no endpoint GET /v2/jobs")));
    server.stop().await;
}

#[tokio::test]
async fn a_bad_config_is_refused_with_the_run_check_message_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Settings::default()).await;
    let client = server.client();
    let yaml = "name: demo\nmodel: {variant: b0}\ndata: {train: x, batch_size: -3}\n";
    let expected = effnet_config::JobSpec::from_yaml_str(yaml, "job.yaml").unwrap_err().to_string();
    assert_eq!(expected, "job.yaml:3:30: data.batch_size: invalid value -3, expected a positive integer");
    assert_eq!(
        rejected(client.submit(yaml, "job.yaml", &JobStart::Latest).await.unwrap_err()),
        (400, expected)
    );

    let misspelt = "name: demo\nmodel: {variant: b0}\ndata: {train: x}\ntrainig: {steps: 3}\n";
    let (status, reason) =
        rejected(client.submit(misspelt, "configs/x.yaml", &JobStart::Latest).await.unwrap_err());
    assert_eq!(status, 400);
    assert_eq!(
        reason,
        effnet_config::JobSpec::from_yaml_str(misspelt, "configs/x.yaml").unwrap_err().to_string()
    );
    assert!(reason.starts_with("configs/x.yaml:4:1: "), "{reason}");
    assert_eq!(client.jobs().await.unwrap(), vec![]);
    server.stop().await;
}

#[tokio::test]
async fn submit_list_show_and_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Settings::default()).await;
    let client = server.client();
    let yaml = job_yaml("demo", 2);
    let submitted = client.submit(&yaml, "demo.yaml", &JobStart::Latest).await.unwrap();
    assert_eq!(
        (submitted.id.as_str(), submitted.name.as_str(), submitted.state),
        ("demo-1", "demo", JobState::Queued)
    );
    let second = client.submit(&job_yaml("demo", 1), "demo.yaml", &JobStart::Latest).await.unwrap();
    assert_eq!(second.id, "demo-2");

    let jobs = client.jobs().await.unwrap();
    assert_eq!(
        jobs.iter().map(|j| (j.id.as_str(), j.state, j.world_size)).collect::<Vec<_>>(),
        [("demo-1", JobState::Queued, 2), ("demo-2", JobState::Queued, 1)]
    );
    let detail = client.job("demo-1").await.unwrap();
    assert_eq!(detail.yaml, yaml);
    assert_eq!(detail.spec["model"]["variant"], "b0");
    assert_eq!(detail.spec["distributed"]["workers"], 2);
    assert_eq!((detail.summary.generation, detail.summary.restarts), (0, 0));
    assert!(detail.generations.is_empty() && detail.members.is_empty());

    let cancelled = client.cancel("demo-1").await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(cancelled.updated_at >= cancelled.created_at);
    assert_eq!(
        rejected(client.cancel("demo-1").await.unwrap_err()),
        (409, "job demo-1 is already cancelled".to_string())
    );
    assert_eq!(
        rejected(client.join("demo-1", &JoinRequest::default()).await.unwrap_err()),
        (409, "job demo-1 is cancelled; nothing can join it".to_string())
    );
    assert_eq!(client.job("demo-2").await.unwrap().summary.state, JobState::Queued);
    server.stop().await;
}

#[tokio::test]
async fn workers_join_a_generation_heartbeat_and_finish_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Settings::default()).await;
    let client = server.client();
    client.submit(&job_yaml("demo", 2), "demo.yaml", &JobStart::Latest).await.unwrap();

    let first = client
        .join("demo-1", &JoinRequest { host: Some("gpu-a".into()), ..Default::default() })
        .await
        .unwrap();
    assert_eq!((first.generation, first.rank, first.world_size, first.members), (1, 0, 2, 1));
    assert_eq!(first.generation_state, GenerationState::Forming);
    let waiting = client.heartbeat("demo-1", &first.worker_id, &Progress::default()).await.unwrap();
    assert_eq!((waiting.action, waiting.job_state), (Action::Wait, JobState::Queued));

    let second = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    assert_eq!((second.generation, second.rank, second.members), (1, 1, 2));
    assert_eq!(second.generation_state, GenerationState::Running);
    let (status, reason) = rejected(client.join("demo-1", &JoinRequest::default()).await.unwrap_err());
    assert_eq!(status, 409);
    assert_eq!(reason, "generation 1 of job demo-1 is complete (2 ranks); a new one forms after it ends");

    for (worker, loss, rate) in [(&first.worker_id, 2.5, 100.0), (&second.worker_id, 2.7, 110.0)] {
        for step in [1, 2] {
            let progress = Progress {
                step: Some(step),
                epoch: Some(0.1 * step as f64),
                images_per_s: Some(rate),
                loss: Some(loss / step as f64),
                checkpoint: (step == 2)
                    .then(|| CheckpointReport { step: 2, url: "memory://ckpt/step-00000002".into() }),
            };
            let answer = client.heartbeat("demo-1", worker, &progress).await.unwrap();
            assert_eq!(
                (answer.action, answer.job_state, answer.members),
                (Action::Train, JobState::Running, 2)
            );
        }
    }
    // A repeated step (a long step's second heartbeat) adds no history row.
    client
        .heartbeat("demo-1", &first.worker_id, &Progress { step: Some(2), ..Default::default() })
        .await
        .unwrap();

    let summary = client.job("demo-1").await.unwrap().summary;
    assert_eq!((summary.state, summary.generation, summary.workers), (JobState::Running, 1, 2));
    assert_eq!(summary.step, Some(2));
    assert_eq!(summary.images_per_s, Some(210.0));
    assert_eq!(summary.loss, Some(1.25), "rank 0's loss");
    let checkpoint = summary.last_checkpoint.unwrap();
    assert_eq!((checkpoint.step, checkpoint.url.as_str()), (2, "memory://ckpt/step-00000002"));

    let history = client.progress("demo-1", 100).await.unwrap();
    let steps: Vec<(u32, u64)> = history.iter().map(|r| (r.rank, r.step)).collect();
    assert_eq!(steps, [(0, 1), (0, 2)], "the history is rank 0's");
    assert_eq!(client.progress("demo-1", 1).await.unwrap().len(), 1);

    let (status, metrics) = raw(&server, "GET", "/metrics", Some(&bearer()), Vec::new()).await;
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap();
    for line in [
        "effnet_jobs{state=\"running\"} 1",
        "effnet_workers{job=\"demo-1\",state=\"active\"} 2",
        "effnet_job_step{job=\"demo-1\"} 2",
        "effnet_job_images_per_second{job=\"demo-1\"} 210",
        "effnet_job_loss{job=\"demo-1\"} 1.25",
        "effnet_job_restarts{job=\"demo-1\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line:?} in\n{metrics}");
    }
    assert!(metrics.contains("effnet_job_last_checkpoint_age_seconds{job=\"demo-1\"} "), "{metrics}");

    let (status, page) = raw(&server, "GET", "/", Some(&bearer()), Vec::new()).await;
    assert_eq!(status, 200);
    let page = page.as_str().unwrap();
    assert!(
        page.contains("<b>demo-1</b>") && page.contains("210.0 img/s") && page.contains("<polyline"),
        "{page}"
    );

    let finished = LeaveRequest { outcome: LeaveOutcome::Finished, message: None };
    let answer = client.leave("demo-1", &first.worker_id, &finished).await.unwrap();
    assert_eq!((answer.action, answer.job_state, answer.members), (Action::Train, JobState::Running, 1));
    let answer = client.leave("demo-1", &second.worker_id, &finished).await.unwrap();
    assert_eq!((answer.action, answer.job_state), (Action::Stop, JobState::Succeeded));
    let detail = client.job("demo-1").await.unwrap();
    assert_eq!(detail.generations[0].state, GenerationState::Ended);
    assert_eq!(detail.generations[0].end_reason.as_deref(), Some("finished"));
    assert!(
        detail
            .members
            .iter()
            .all(|m| m.state == MemberState::Left && m.end_reason.as_deref() == Some("finished"))
    );
    assert_eq!(
        client.heartbeat("demo-1", &first.worker_id, &Progress::default()).await.unwrap().action,
        Action::Stop
    );
    assert_eq!(server.state.watched(), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_restart_ends_the_generation_and_the_next_join_forms_another() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Settings::default()).await;
    let client = server.client();
    client.submit(&job_yaml("demo", 2), "demo.yaml", &JobStart::Latest).await.unwrap();
    let first = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    let second = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    let restart =
        LeaveRequest { outcome: LeaveOutcome::Restart, message: Some("all-reduce timed out".into()) };
    let answer = client.leave("demo-1", &second.worker_id, &restart).await.unwrap();
    assert_eq!((answer.action, answer.generation_state), (Action::Restart, GenerationState::Ended));
    // Leaving twice changes nothing.
    assert_eq!(client.leave("demo-1", &second.worker_id, &restart).await.unwrap(), answer);
    let survivor = client
        .heartbeat("demo-1", &first.worker_id, &Progress { step: Some(9), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(survivor.action, Action::Restart);

    let detail = client.job("demo-1").await.unwrap();
    let reason = format!("worker {} (rank 1) left (restart: all-reduce timed out)", second.worker_id);
    assert_eq!(detail.generations[0].end_reason.as_deref(), Some(reason.as_str()));
    let survivor_row = detail.members.iter().find(|m| m.id == first.worker_id).unwrap();
    assert_eq!(survivor_row.state, MemberState::Left);
    assert_eq!(survivor_row.step, None, "progress of a member of an ended generation is not recorded");
    assert_eq!(server.state.watched(), 0);

    let again = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    assert_eq!((again.generation, again.rank), (2, 0));
    let summary = client.job("demo-1").await.unwrap().summary;
    assert_eq!((summary.restarts, summary.generation, summary.state), (1, 2, JobState::Running));

    // A failure ends the job.
    client.join("demo-1", &JoinRequest::default()).await.unwrap();
    let failed = LeaveRequest { outcome: LeaveOutcome::Failed, message: Some("dataset unreadable".into()) };
    let answer = client.leave("demo-1", &again.worker_id, &failed).await.unwrap();
    assert_eq!((answer.action, answer.job_state), (Action::Stop, JobState::Failed));
    server.stop().await;
}

/// Each generation resumes from the newest checkpoint any worker reported before it formed,
/// chosen once; `max_restarts` caps the generations; an engine ends a generation at once
/// (`POST .../restart`) or gives up on bad input.
#[tokio::test]
async fn generations_resume_from_the_newest_reported_checkpoint_until_restarts_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Settings::default()).await;
    let client = server.client();
    let yaml = job_yaml("demo", 2).replace("{workers: 2}", "{workers: 2, max_restarts: 2}");
    client.submit(&yaml, "demo.yaml", &JobStart::Latest).await.unwrap();
    let first = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    let detail = client.job("demo-1").await.unwrap();
    assert_eq!(detail.generations[0].resume, None, "nothing to resume from yet");
    assert!((first.heartbeat_interval_s - 12.0).abs() < 1e-9, "a fifth of the 60 s timeout");
    let second = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    let checkpoint = |step: u64| CheckpointReport { step, url: format!("file:///c/step-{step:08}") };
    for step in [8, 16] {
        let progress =
            Progress { step: Some(step), checkpoint: Some(checkpoint(step)), ..Default::default() };
        client.heartbeat("demo-1", &first.worker_id, &progress).await.unwrap();
    }
    // The engine saw the workers fail: the generation ends now, not after the timeout.
    let summary = client.restart("demo-1", "mpirun exited with signal 9", false).await.unwrap();
    assert_eq!((summary.state, summary.generation_state), (JobState::Running, Some(GenerationState::Ended)));
    let answer = client.heartbeat("demo-1", &second.worker_id, &Progress::default()).await.unwrap();
    assert_eq!(answer.action, Action::Restart);

    // Generation 2 resumes from step 16, and keeps that choice while newer ones are reported.
    let a = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    assert_eq!(a.generation, 2);
    let b = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    let progress = Progress { step: Some(24), checkpoint: Some(checkpoint(24)), ..Default::default() };
    let answer = client.heartbeat("demo-1", &b.worker_id, &progress).await.unwrap();
    assert_eq!(answer.action, Action::Train);
    let detail = client.job("demo-1").await.unwrap();
    assert_eq!(detail.generations[1].resume, Some(checkpoint(16)));
    let restart = LeaveRequest { outcome: LeaveOutcome::Restart, message: Some("NCCL timeout".into()) };
    client.leave("demo-1", &a.worker_id, &restart).await.unwrap();

    // Generation 3 (the second restart) resumes from step 24; when it ends the job has used
    // its two restarts and fails, naming why.
    let c = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    assert_eq!(c.generation, 3);
    assert_eq!(client.job("demo-1").await.unwrap().generations[2].resume, Some(checkpoint(24)));
    client.leave("demo-1", &c.worker_id, &restart).await.unwrap();
    let summary = client.job("demo-1").await.unwrap().summary;
    assert_eq!((summary.state, summary.restarts, summary.max_restarts), (JobState::Failed, 2, 2));
    let reason = summary.reason.unwrap();
    assert!(reason.contains("generation 3 ended") && reason.contains("after 2 restarts"), "{reason}");
    let (status, message) = rejected(client.join("demo-1", &JoinRequest::default()).await.unwrap_err());
    assert_eq!((status, message.as_str()), (409, "job demo-1 is failed; nothing can join it"));
    assert_eq!(rejected(client.restart("demo-1", "again", false).await.unwrap_err()).0, 409);

    // An engine whose workers failed on bad input gives up: no restart.
    client.submit(&job_yaml("other", 2), "other.yaml", &JobStart::Latest).await.unwrap();
    client.join("other-2", &JoinRequest::default()).await.unwrap();
    let summary = client.restart("other-2", "workers exited with status 2", true).await.unwrap();
    assert_eq!((summary.state, summary.restarts), (JobState::Failed, 0));
    assert_eq!(summary.reason.as_deref(), Some("workers exited with status 2"));
    server.stop().await;
}

/// An elastic job (`min_workers: 2` of 3): each generation runs with the world its engine
/// launched, from 2 to 3 ranks; every member of a generation must agree on it.
#[tokio::test]
async fn elastic_generations_take_the_world_the_engine_launched() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Settings::default()).await;
    let client = server.client();
    let yaml = job_yaml("demo", 3).replace("{workers: 3}", "{workers: 3, min_workers: 2}");
    client.submit(&yaml, "demo.yaml", &JobStart::Latest).await.unwrap();
    let join = |rank: u32, world_size: u32| JoinRequest {
        rank: Some(rank),
        world_size: Some(world_size),
        host: None,
    };
    let (status, reason) = rejected(client.join("demo-1", &join(0, 1)).await.unwrap_err());
    assert_eq!(
        (status, reason.as_str()),
        (409, "world size 1 from the engine disagrees with the job's distributed.min_workers..workers 2..3")
    );
    let first = client.join("demo-1", &join(0, 3)).await.unwrap();
    assert_eq!((first.world_size, first.generation_state), (3, GenerationState::Forming));
    let (status, reason) = rejected(client.join("demo-1", &join(1, 2)).await.unwrap_err());
    assert_eq!(
        (status, reason.as_str()),
        (409, "world size 2 from the engine disagrees with generation 1's 3")
    );
    client.join("demo-1", &join(1, 3)).await.unwrap();
    client.join("demo-1", &join(2, 3)).await.unwrap();
    // A node is lost: the engine ends the generation and launches two workers.
    client.restart("demo-1", "rank 2's node is gone", false).await.unwrap();
    let a = client.join("demo-1", &join(1, 2)).await.unwrap();
    assert_eq!((a.generation, a.world_size, a.generation_state), (2, 2, GenerationState::Forming));
    let (status, reason) = rejected(client.join("demo-1", &join(2, 2)).await.unwrap_err());
    assert_eq!((status, reason.as_str()), (400, "rank 2 is outside generation 2's world of 2 (ranks 0..1)"));
    let b = client.join("demo-1", &join(0, 2)).await.unwrap();
    assert_eq!((b.generation_state, b.members), (GenerationState::Running, 2));
    let detail = client.job("demo-1").await.unwrap();
    let worlds: Vec<u32> = detail.generations.iter().map(|g| g.world_size).collect();
    assert_eq!(worlds, [3, 2]);
    assert_eq!((detail.summary.state, detail.summary.workers), (JobState::Running, 2));
    server.stop().await;
}

#[tokio::test]
async fn engine_ranks_and_world_sizes_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Settings::default()).await;
    let client = server.client();
    client.submit(&job_yaml("demo", 2), "demo.yaml", &JobStart::Latest).await.unwrap();
    let (status, reason) = rejected(
        client.join("demo-1", &JoinRequest { world_size: Some(3), ..Default::default() }).await.unwrap_err(),
    );
    assert_eq!(
        (status, reason.as_str()),
        (409, "world size 3 from the engine disagrees with the job's distributed.workers 2")
    );
    let (status, reason) = rejected(
        client.join("demo-1", &JoinRequest { rank: Some(2), ..Default::default() }).await.unwrap_err(),
    );
    assert_eq!((status, reason.as_str()), (400, "rank 2 is outside generation 1's world of 2 (ranks 0..1)"));
    let summary = client.job("demo-1").await.unwrap().summary;
    assert_eq!(summary.generation, 0, "the refused join formed no generation");
    let one =
        client.join("demo-1", &JoinRequest { rank: Some(1), world_size: Some(2), host: None }).await.unwrap();
    assert_eq!(one.rank, 1);
    let (status, reason) = rejected(
        client.join("demo-1", &JoinRequest { rank: Some(1), ..Default::default() }).await.unwrap_err(),
    );
    assert_eq!(
        (status, reason),
        (409, format!("rank 1 of generation 1 is taken by worker {}", one.worker_id))
    );
    let zero = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    assert_eq!((zero.rank, zero.generation_state), (0, GenerationState::Running));
    assert_eq!(client.job("demo-1").await.unwrap().generations.len(), 1, "refused joins made no generation");
    server.stop().await;
}

#[tokio::test]
async fn a_restarted_coordinator_keeps_its_jobs_and_watches_their_workers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Settings::default()).await;
    let client = server.client();
    client.submit(&job_yaml("demo", 2), "demo.yaml", &JobStart::Latest).await.unwrap();
    client.submit(&job_yaml("gone", 1), "gone.yaml", &JobStart::Latest).await.unwrap();
    client.cancel("gone-2").await.unwrap();
    let joined = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    client
        .heartbeat("demo-1", &joined.worker_id, &Progress { step: Some(5), ..Default::default() })
        .await
        .unwrap();
    let before = client.job("demo-1").await.unwrap();
    server.stop().await;
    assert!(dir.path().join(effnet_coordinator::DATABASE_FILE).is_file());

    let server = Server::start(dir.path(), Settings::default()).await;
    assert_eq!(server.state.watched(), 1, "the active member is watched again");
    let client = server.client();
    assert_eq!(client.job("demo-1").await.unwrap(), before);
    let states: Vec<(String, JobState)> =
        client.jobs().await.unwrap().into_iter().map(|j| (j.id, j.state)).collect();
    assert_eq!(
        states,
        [("demo-1".to_string(), JobState::Queued), ("gone-2".to_string(), JobState::Cancelled)]
    );
    // The worker re-attaches with its next heartbeat, and the generation completes.
    let answer = client
        .heartbeat("demo-1", &joined.worker_id, &Progress { step: Some(6), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(answer.action, Action::Wait);
    let second = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    assert_eq!((second.generation, second.rank, second.generation_state), (1, 1, GenerationState::Running));
    assert_eq!(
        client.submit(&job_yaml("next", 1), "next.yaml", &JobStart::Latest).await.unwrap().id,
        "next-3"
    );
    server.stop().await;
}

/// Expiry on tokio's paused clock: the server's expiry task runs on it, and `advance` moves it.
#[tokio::test(start_paused = true)]
async fn a_worker_silent_past_the_timeout_expires_and_ends_its_generation() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        heartbeat_timeout: Duration::from_secs(10),
        sweep_every: Duration::from_secs(1),
        ..Settings::default()
    };
    let server = Server::start(dir.path(), settings).await;
    let state = Arc::clone(&server.state);
    state.submit(job_yaml("demo", 2), "demo.yaml", JobStart::Latest, None).await.unwrap();
    let first = state.join("demo-1", JoinRequest::default()).await.unwrap();
    let second = state.join("demo-1", JoinRequest::default()).await.unwrap();
    assert_eq!(state.watched(), 2);

    tokio::time::advance(Duration::from_secs(6)).await;
    state.heartbeat("demo-1", &first.worker_id, Progress::default()).await.unwrap();
    tokio::time::advance(Duration::from_secs(3)).await;
    // 9 s after joining: the second worker is silent, but not yet past the timeout.
    settle().await;
    let detail = state.job("demo-1").await.unwrap();
    assert!(detail.members.iter().all(|m| m.state == MemberState::Active), "{:?}", detail.members);
    assert_eq!(detail.generations[0].state, GenerationState::Running);

    tokio::time::advance(Duration::from_secs(2)).await;
    let mut detail = state.job("demo-1").await.unwrap();
    for _ in 0..100 {
        if detail.generations[0].state == GenerationState::Ended {
            break;
        }
        settle().await;
        detail = state.job("demo-1").await.unwrap();
    }
    let reason = format!("worker {} (rank 1) sent no heartbeat for 10 s", second.worker_id);
    assert_eq!(detail.generations[0].end_reason.as_deref(), Some(reason.as_str()));
    let expired = detail.members.iter().find(|m| m.id == second.worker_id).unwrap();
    assert_eq!(expired.state, MemberState::Expired);
    let survivor = detail.members.iter().find(|m| m.id == first.worker_id).unwrap();
    assert_eq!(survivor.state, MemberState::Left, "its generation ended; it has not expired");
    assert_eq!(detail.summary.state, JobState::Running, "the job goes on with a new generation");
    assert_eq!(state.watched(), 0);
    let answer = state.heartbeat("demo-1", &first.worker_id, Progress::default()).await.unwrap();
    assert_eq!(answer.action, Action::Restart);
    server.stop().await;
}

/// Lets the expiry task run what the last `advance` woke (its database work is on a blocking
/// thread, which holds the paused clock still until it is done).
async fn settle() {
    for _ in 0..5 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A state directory written by another schema is refused when the coordinator opens it, with
/// what to do, instead of failing its requests later.
#[tokio::test]
async fn a_state_directory_of_another_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let old = rusqlite::Connection::open(dir.path().join(effnet_coordinator::DATABASE_FILE)).unwrap();
        old.execute_batch("CREATE TABLE jobs (id TEXT); PRAGMA user_version = 1;").unwrap();
    }
    let error = State::open(dir.path(), TOKEN, Settings::default()).await.err().expect("refused");
    let text = error.to_string();
    assert!(
        text.contains(
            "coordinator.sqlite3 was written by another version of effnet (schema 1; this one reads 3)"
        ),
        "{text}"
    );
    // A new directory opens, and opens again.
    let fresh = tempfile::tempdir().unwrap();
    drop(State::open(fresh.path(), TOKEN, Settings::default()).await.unwrap());
    State::open(fresh.path(), TOKEN, Settings::default()).await.unwrap();
}

/// A submission with a key is idempotent: every pod of a Kubernetes Job submits the job file with
/// the Job's uid and they all get the one job; the same key with another YAML is refused.
#[tokio::test]
async fn submissions_with_the_same_key_get_the_same_job() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Settings::default()).await;
    let client = server.client();
    let yaml = job_yaml("demo", 2);
    let first = client.submit_keyed(&yaml, "demo.yaml", &JobStart::Latest, Some("uid-1")).await.unwrap();
    let again = client.submit_keyed(&yaml, "demo.yaml", &JobStart::Latest, Some("uid-1")).await.unwrap();
    assert_eq!((first.id.as_str(), again.id.as_str()), ("demo-1", "demo-1"));
    let other = client.submit_keyed(&yaml, "demo.yaml", &JobStart::Latest, Some("uid-2")).await.unwrap();
    let unkeyed = client.submit(&yaml, "demo.yaml", &JobStart::Latest).await.unwrap();
    assert_eq!((other.id.as_str(), unkeyed.id.as_str()), ("demo-2", "demo-3"));
    // Still the same job once it runs.
    client.join("demo-1", &JoinRequest::default()).await.unwrap();
    client.join("demo-1", &JoinRequest::default()).await.unwrap();
    let running = client.submit_keyed(&yaml, "demo.yaml", &JobStart::Latest, Some("uid-1")).await.unwrap();
    assert_eq!((running.id.as_str(), running.state), ("demo-1", JobState::Running));

    let changed = job_yaml("demo", 3);
    let error =
        client.submit_keyed(&changed, "demo.yaml", &JobStart::Latest, Some("uid-1")).await.unwrap_err();
    assert_eq!(
        rejected(error),
        (409, "key uid-1 was used for job demo-1, submitted with another job file".into())
    );
    let error = client.submit_keyed(&yaml, "demo.yaml", &JobStart::Latest, Some("\u{7}")).await.unwrap_err();
    assert_eq!(rejected(error), (400, "key: 1 to 200 printable characters".into()));
    assert_eq!(client.jobs().await.unwrap().len(), 3, "nothing else was stored");
    server.stop().await;
}

/// Credentials in a job's URLs reach workers (`?credentials=true`) but no listing, detail, page
/// or metric that people read.
#[tokio::test]
async fn people_see_job_urls_redacted_and_workers_see_them_whole() {
    const SIGNATURE: &str = "fake-signature-4f2a";
    const SESSION: &str = "fake-session-token-9c1e";
    const PASSWORD: &str = "fake-password-77d0";
    let dir = tempfile::tempdir().unwrap();
    // A database an earlier version left readable by everyone (an empty file is an empty database).
    let database = dir.path().join(effnet_coordinator::DATABASE_FILE);
    std::fs::write(&database, b"").unwrap();
    std::fs::set_permissions(&database, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let server = Server::start(dir.path(), Settings::default()).await;
    let client = server.client();
    let train = format!(
        "https://bucket.s3.amazonaws.com/train?X-Amz-Security-Token={SESSION}&X-Amz-Signature={SIGNATURE}"
    );
    let yaml = format!(
        "name: demo\nmodel: {{variant: b0}}\ndata: {{train: '{train}', val: 'http://user:{PASSWORD}@host/val'}}\n"
    );
    client.submit(&yaml, "demo.yaml", &JobStart::Latest).await.unwrap();
    let worker = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    let checkpoint =
        CheckpointReport { step: 4, url: format!("s3://b/c/step-4?X-Amz-Signature={SIGNATURE}") };
    let progress = Progress { step: Some(4), checkpoint: Some(checkpoint), ..Default::default() };
    client.heartbeat("demo-1", &worker.worker_id, &progress).await.unwrap();

    let whole = client.job_with_credentials("demo-1").await.unwrap();
    assert_eq!(whole.yaml, yaml, "the worker's copy is the job as submitted");
    assert_eq!(whole.spec["data"]["train"], train.as_str());

    let detail = client.job("demo-1").await.unwrap();
    assert_eq!(detail.spec["data"]["val"], "http://user:REDACTED@host/val");
    assert_eq!(
        detail.summary.last_checkpoint.as_ref().unwrap().url,
        "s3://b/c/step-4?X-Amz-Signature=REDACTED"
    );
    let seen_by_people = [
        serde_json::to_string(&detail).unwrap(),
        serde_json::to_string(&client.jobs().await.unwrap()).unwrap(),
        raw(&server, "GET", "/", Some(&bearer()), vec![]).await.1.to_string(),
        raw(&server, "GET", "/metrics", Some(&bearer()), vec![]).await.1.to_string(),
    ];
    for (text, secret) in seen_by_people.iter().flat_map(|t| [SIGNATURE, SESSION, PASSWORD].map(|s| (t, s))) {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert!(seen_by_people[0].contains("X-Amz-Signature=REDACTED"), "{}", seen_by_people[0]);
    assert!(seen_by_people[2].contains("step-4"), "the page shows the checkpoint: {}", seen_by_people[2]);
    // The database keeps the job whole, so it and SQLite's files beside it are the owner's only.
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&entry.metadata().unwrap().permissions()) & 0o777;
        files.push((entry.file_name().to_string_lossy().into_owned(), mode));
    }
    files.sort();
    let wal = format!("{}-wal", effnet_coordinator::DATABASE_FILE);
    assert!(files.iter().any(|(name, _)| *name == wal), "{files:?}");
    assert!(
        files.iter().all(|(_, mode)| *mode == 0o600),
        "modes {:?}",
        files.iter().map(|(name, mode)| format!("{name} {mode:o}")).collect::<Vec<_>>()
    );
    server.stop().await;
}

/// The coordinator's rendezvous (NCCL's unique id for a job's workers) needs the bearer token to
/// publish and to fetch: without it or with a wrong one the answer is 401, nothing is published
/// or overwritten, and the real ranks exchange their bytes.
#[tokio::test]
async fn rendezvous_refuses_requests_without_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Settings::default()).await;
    let client = server.client();
    client.submit(&job_yaml("demo", 2), "demo.yaml", &JobStart::Latest).await.unwrap();
    let rank_zero = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    let rank_one = client.join("demo-1", &JoinRequest::default()).await.unwrap();
    assert_eq!((rank_zero.rank, rank_one.rank), (0, 1));
    let path = |worker: &str| format!("/v1/jobs/demo-1/workers/{worker}/rendezvous");
    let rogue_blob = br#"{"blob": "0badc0de"}"#.to_vec();
    let unauthorized = (
        401,
        serde_json::json!({ "error": "missing or wrong bearer token (send 'Authorization: Bearer <token>')" }),
    );
    for authorization in [None, Some("Bearer wrong-token"), Some("Bearer s3cret-tokeN"), Some("s3cret-token")]
    {
        let published =
            raw(&server, "POST", &path(&rank_zero.worker_id), authorization, rogue_blob.clone()).await;
        assert_eq!(published, unauthorized, "publish with {authorization:?}");
        let fetched = raw(&server, "GET", &path(&rank_one.worker_id), authorization, vec![]).await;
        assert_eq!(fetched, unauthorized, "fetch with {authorization:?}");
    }
    assert_eq!(client.rendezvous("demo-1", &rank_one.worker_id).await.unwrap(), None, "nothing published");
    let wrong = Client::new(&server.url, "wrong-token").unwrap();
    assert_eq!(rejected(wrong.rendezvous("demo-1", &rank_one.worker_id).await.unwrap_err()).0, 401);

    client.publish_rendezvous("demo-1", &rank_zero.worker_id, b"unique-id").await.unwrap();
    let overwrite = wrong.publish_rendezvous("demo-1", &rank_zero.worker_id, b"rogue").await.unwrap_err();
    assert_eq!(rejected(overwrite).0, 401);
    let fetched = client.rendezvous("demo-1", &rank_one.worker_id).await.unwrap();
    assert_eq!(fetched.as_deref(), Some(&b"unique-id"[..]));
    server.stop().await;
}
