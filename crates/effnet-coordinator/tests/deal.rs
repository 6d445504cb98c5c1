//! The coordinator deals each generation itself: it reads the job's checkpoint store (newest
//! committed, at least the newest reported, damaged ones skipped), re-deals the checkpoint's rest
//! of the epoch to the generation's world, stores the deal so every rank and a restarted
//! coordinator hand out the same one, and plans new epochs from the dataset's manifest. Real
//! files on disk: a Parquet dataset written by effnet-data and checkpoints by effnet-checkpoint.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use effnet_checkpoint::CheckpointStore;
use effnet_coordinator::protocol::{
    Assignment, CheckpointReport, JobStart, JoinRequest, LeaveOutcome, LeaveRequest, Progress, StartPoint,
};
use effnet_coordinator::{Client, ClientError, Settings, State};
use effnet_data::plan::{initial_cursors, simulate_rank};
use effnet_data::writer::{DatasetWriter, WriterOptions};
use effnet_data::{DataCursor, EpochPlan, RowGroupRef};
use tokio::net::TcpListener;

const TOKEN: &str = "deal-token";
const SEED: u64 = 5;

/// 80 samples in 10 row groups of 8 (the bytes are never decoded here).
async fn dataset(url: &str) -> Vec<RowGroupRef> {
    let location = effnet_store::open(url).unwrap();
    let options = WriterOptions { rows_per_group: 8, groups_per_part: 4 };
    let mut writer =
        DatasetWriter::create(location, "deal", vec!["a".into(), "b".into()], options).await.unwrap();
    for i in 0..80 {
        writer.push(format!("k{i:03}"), vec![i as u8; 16], i % 2).await.unwrap();
    }
    writer.finish().await.unwrap().row_groups()
}

/// A checkpoint of `step` whose `state.json` holds `data`, committed like the trainer's.
async fn checkpoint(store: &CheckpointStore, step: u64, data: Option<&DataCursor>) {
    let state = serde_json::json!({ "format": 1, "step": step, "data": data });
    let files = vec![
        ("model.safetensors".to_string(), Bytes::from(vec![7u8; 4096])),
        ("state.json".to_string(), Bytes::from(serde_json::to_vec(&state).unwrap())),
    ];
    store.save(step, None, files).await.unwrap();
}

/// Epoch 0 of a 3-rank plan, each rank stopped part-way through its share.
fn mid_epoch(groups: &[RowGroupRef], emitted: [u64; 3]) -> DataCursor {
    let plan = EpochPlan::new(SEED, 0, groups, 3).unwrap();
    let ranks = plan
        .ranks
        .iter()
        .zip(initial_cursors(&plan))
        .zip(emitted)
        .map(|((work, cursor), limit)| simulate_rank(work, &cursor, 12, Some(limit)).1)
        .collect();
    DataCursor { plan, ranks }
}

async fn serve(dir: &Path) -> (String, tokio::sync::oneshot::Sender<()>) {
    let state = Arc::new(State::open(dir, TOKEN, Settings::default()).await.unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(effnet_coordinator::run(listener, state, async move {
        let _ = stopped.await;
    }));
    (url, stop)
}

/// Joins `world` workers (ranks 0..world, the engine's world size) and returns their ids.
async fn generation(client: &Client, job: &str, world: u32) -> Vec<String> {
    let mut ids = Vec::new();
    for rank in 0..world {
        let request = JoinRequest { rank: Some(rank), world_size: Some(world), ..Default::default() };
        ids.push(client.join(job, &request).await.unwrap().worker_id);
    }
    ids
}

async fn restart(client: &Client, job: &str, worker: &str) {
    let request = LeaveRequest { outcome: LeaveOutcome::Restart, message: Some("a peer died".into()) };
    client.leave(job, worker, &request).await.unwrap();
}

/// Every member's assignment; they must all hold the same deal, with their own ranks.
async fn assignments(client: &Client, job: &str, workers: &[String]) -> Assignment {
    let mut all = Vec::new();
    for worker in workers {
        all.push(client.assignment(job, worker).await.unwrap());
    }
    for (rank, assignment) in all.iter().enumerate() {
        assert_eq!(assignment.rank as usize, rank);
        assert_eq!(assignment.deal, all[0].deal, "every rank gets the generation's one deal");
    }
    all.swap_remove(0)
}

fn rejected(error: ClientError) -> (u16, String) {
    match error {
        ClientError::Rejected { status, reason, .. } | ClientError::Server { status, reason, .. } => {
            (status, reason)
        }
        other => panic!("expected an answer, got {other}"),
    }
}

/// A directory with the dataset (`train/`), its row groups, the job's checkpoint store
/// (`checkpoints/`, empty) and a job file `name` reading them with `distributed`.
async fn job_on_disk(
    name: &str,
    distributed: &str,
) -> (tempfile::TempDir, Vec<RowGroupRef>, CheckpointStore, String) {
    let dir = tempfile::tempdir().unwrap();
    let data_url = dir.path().join("train").display().to_string();
    let checkpoints_url = dir.path().join("checkpoints").display().to_string();
    let groups = dataset(&data_url).await;
    let store = CheckpointStore::new(effnet_store::open(&checkpoints_url).unwrap());
    let yaml = format!(
        "name: {name}\nseed: {SEED}\nmodel: {{variant: b0}}\ndata: {{train: '{data_url}'}}\n\
         checkpoint: {{url: '{checkpoints_url}'}}\ndistributed: {distributed}\n"
    );
    (dir, groups, store, yaml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_are_dealt_from_the_checkpoint_store_exactly_once_at_any_world_size() {
    let (dir, groups, store, yaml) =
        job_on_disk("dealt", "{workers: 3, min_workers: 2, max_restarts: 9}").await;
    let state_dir = dir.path().join("coordinator");
    let (url, stop) = serve(&state_dir).await;
    let client = Client::new(&url, TOKEN).unwrap();
    let job = client.submit(&yaml, "dealt.yaml", &JobStart::Latest).await.unwrap().id;

    // Generation 1 forms: no assignment until every rank joined.
    let first = client.join(&job, &JoinRequest { rank: Some(0), ..Default::default() }).await.unwrap();
    let (status, reason) = rejected(client.assignment(&job, &first.worker_id).await.unwrap_err());
    assert_eq!(status, 409, "{reason}");
    assert!(reason.contains("generation 1 is still forming"), "{reason}");
    let mut workers = vec![first.worker_id];
    for rank in 1..3 {
        let request = JoinRequest { rank: Some(rank), ..Default::default() };
        workers.push(client.join(&job, &request).await.unwrap().worker_id);
    }
    // No checkpoint yet: step 0, and epoch plans dealt for 3 ranks from the manifest.
    let dealt = assignments(&client, &job, &workers).await;
    assert_eq!((dealt.generation, dealt.world_size, &dealt.deal.start), (1, 3, &StartPoint::Scratch));
    assert_eq!(dealt.deal.data, None);
    for epoch in [0, 4] {
        let plan = client.epoch_plan(&job, &workers[2], epoch).await.unwrap();
        assert_eq!(plan, EpochPlan::new(SEED, epoch, &groups, 3).unwrap());
        plan.check_covers(&groups, 3).unwrap();
    }

    // Rank 0 commits step 12 mid-epoch and reports it; then a rank dies.
    let saved = mid_epoch(&groups, [9, 14, 5]);
    checkpoint(&store, 12, Some(&saved)).await;
    let report = CheckpointReport { step: 12, url: store.url_of(12) };
    let progress = Progress { step: Some(12), checkpoint: Some(report), ..Default::default() };
    client.heartbeat(&job, &workers[0], &progress).await.unwrap();
    restart(&client, &job, &workers[1]).await;

    // Generation 2 has 2 workers (elastic): the rest of the epoch re-dealt to them, the same
    // samples as the checkpoint's cursor left, each exactly once.
    let workers = generation(&client, &job, 2).await;
    let dealt = assignments(&client, &job, &workers).await;
    assert_eq!(dealt.deal.start, StartPoint::Checkpoint { step: 12, url: store.url_of(12) });
    let data = dealt.deal.data.clone().expect("a mid-epoch checkpoint's rest of the epoch");
    assert_eq!(data.plan.world_size(), 2);
    assert_eq!(data.plan.generation, 1, "re-dealt under a new generation");
    assert_eq!(data.remaining(), 80 - 28);
    assert_eq!(data.remaining_rows(), saved.remaining_rows());
    let (plan, ranks) = saved.resume(2).unwrap();
    assert_eq!(data, DataCursor { plan, ranks });
    // New epochs are planned for this generation's world.
    assert_eq!(
        client.epoch_plan(&job, &workers[1], 1).await.unwrap(),
        EpochPlan::new(SEED, 1, &groups, 2).unwrap()
    );

    // The deal was stored: a restarted coordinator hands out the same one, even after the
    // checkpoint it names was committed over by a newer one.
    let _ = stop.send(());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    checkpoint(&store, 20, Some(&mid_epoch(&groups, [12, 12, 12]))).await;
    let (url, stop) = serve(&state_dir).await;
    let client = Client::new(&url, TOKEN).unwrap();
    assert_eq!(assignments(&client, &job, &workers).await.deal, dealt.deal);
    let detail = client.job(&job).await.unwrap();
    assert_eq!(detail.generations[1].start, Some(dealt.deal.start.clone()));

    // Generation 3: step 20 was committed but never reported (the worker died first); the
    // coordinator finds it in the store. A newer checkpoint with a truncated file is skipped.
    restart(&client, &job, &workers[0]).await;
    checkpoint(&store, 24, None).await;
    let model = store.location.path("step-00000024/model.safetensors").unwrap();
    effnet_store::put_bytes(store.location.store.as_ref(), &model, Bytes::from_static(b"cut")).await.unwrap();
    let workers = generation(&client, &job, 3).await;
    let dealt = assignments(&client, &job, &workers).await;
    assert_eq!(dealt.deal.start, StartPoint::Checkpoint { step: 20, url: store.url_of(20) });
    assert_eq!(dealt.deal.data.as_ref().map(DataCursor::remaining), Some(80 - 36));
    // At its own world size the cursor continues as it was (same buffers and generators).
    assert_eq!(dealt.deal.data, Some(mid_epoch(&groups, [12, 12, 12])));

    // Generation 4 after rank 0 reported step 24 whose file is damaged: the store lost the
    // reported checkpoint, which a restart cannot cure (422, the worker fails the job).
    let report = CheckpointReport { step: 24, url: store.url_of(24) };
    let progress = Progress { step: Some(24), checkpoint: Some(report), ..Default::default() };
    client.heartbeat(&job, &workers[0], &progress).await.unwrap();
    restart(&client, &job, &workers[0]).await;
    let workers = generation(&client, &job, 3).await;
    let (status, reason) = rejected(client.assignment(&job, &workers[0]).await.unwrap_err());
    assert_eq!(status, 422, "{reason}");
    assert!(reason.contains("committed checkpoint step 24") && reason.contains("is step 20"), "{reason}");
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_starts_where_it_was_submitted_to_until_it_commits_its_own_checkpoint() {
    let (dir, groups, store, yaml) = job_on_disk("start", "{workers: 3}").await;
    checkpoint(&store, 8, Some(&mid_epoch(&groups, [4, 4, 4]))).await;
    checkpoint(&store, 16, None).await;
    let (url, stop) = serve(&dir.path().join("coordinator")).await;
    let client = Client::new(&url, TOKEN).unwrap();
    let starts = [
        (JobStart::Latest, StartPoint::Checkpoint { step: 16, url: store.url_of(16) }),
        (JobStart::Fresh, StartPoint::Fresh),
        (
            JobStart::Checkpoint { url: store.url_of(8) },
            StartPoint::Checkpoint { step: 8, url: store.url_of(8) },
        ),
    ];
    for (start, expected) in starts {
        let job = client.submit(&yaml, "start.yaml", &start).await.unwrap().id;
        let workers = generation(&client, &job, 3).await;
        let dealt = assignments(&client, &job, &workers).await;
        assert_eq!(dealt.deal.start, expected, "{start:?}");
        // Step 16 ended an epoch (no cursor); step 8 is mid-epoch, at its own world size.
        assert_eq!(dealt.deal.data.is_some(), matches!(expected, StartPoint::Checkpoint { step: 8, .. }));
        client.cancel(&job).await.unwrap();
    }
    // A --resume URL that holds no checkpoint: the job's problem, named.
    let missing = store.url_of(99);
    let job =
        client.submit(&yaml, "start.yaml", &JobStart::Checkpoint { url: missing.clone() }).await.unwrap().id;
    let workers = generation(&client, &job, 3).await;
    let (status, reason) = rejected(client.assignment(&job, &workers[0]).await.unwrap_err());
    assert_eq!((status, reason), (422, format!("checkpoint {missing}: no such directory")));
    let _ = stop.send(());
}

/// Dealing reads a job's checkpoint store, which may hang (an object store that stopped
/// answering, retried for minutes). That holds up that job's generation only: another job is
/// dealt meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_checkpoint_store_hangs_does_not_hold_up_another_jobs_deal() {
    // An HTTP "store" that accepts connections and never answers.
    let hanging = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_url = format!("http://{}/checkpoints/step-00000008", hanging.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hanging.accept().await {
            held.push(socket);
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });

    let (dir, _groups, _store, yaml) = job_on_disk("deals", "{workers: 1}").await;
    let (url, stop) = serve(&dir.path().join("coordinator")).await;
    let client = Client::new(&url, TOKEN).unwrap();
    let stuck = client.submit(&yaml, "a.yaml", &JobStart::Checkpoint { url: hanging_url }).await.unwrap().id;
    let stuck_worker = generation(&client, &stuck, 1).await.remove(0);
    let stuck_assignment = {
        let client = client.clone();
        tokio::spawn(async move { client.assignment(&stuck, &stuck_worker).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the first job's deal never read its checkpoint store");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let other = client.submit(&yaml, "b.yaml", &JobStart::Fresh).await.unwrap().id;
    let other_worker = generation(&client, &other, 1).await.remove(0);
    let dealt = tokio::time::timeout(Duration::from_secs(20), client.assignment(&other, &other_worker))
        .await
        .expect("the second job's deal waited for the first job's hanging store")
        .unwrap();
    assert_eq!(dealt.deal.start, StartPoint::Fresh);
    assert!(!stuck_assignment.is_finished(), "the first job's store answered: {:?}", stuck_assignment.await);
    stuck_assignment.abort();
    let _ = stop.send(());
}
