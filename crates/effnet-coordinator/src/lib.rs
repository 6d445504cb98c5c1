//! The coordinator: the control plane of effnet's data-parallel jobs, an HTTP/JSON service with
//! its state in SQLite.
//!
//! ```text
//! effnet submit ──POST /v1/jobs (YAML)──► validate (effnet-config) ──► jobs table (queued)
//! effnet worker ──POST .../workers──────► generation N forming ── world_size joined ──► running
//!               ──POST .../heartbeat────► progress rows; answer: wait | train | restart | stop
//!               ──GET .../assignment────► the generation's deal (read once from the checkpoint
//!                                         store: start checkpoint, rest of the epoch re-dealt)
//!               ──GET .../plan?epoch=N──► a new epoch's plan for the generation's world
//!               ──POST .../leave────────► finished (all ranks) → succeeded, failed → failed,
//!                                         restart → generation ends, the engine relaunches
//! expiry task (every sweep_every) ──────► a worker silent past heartbeat_timeout expires and
//!                                         ends its generation; survivors are told "restart"
//! effnet status / cancel / logs, /metrics (Prometheus), / (status page)
//! ```
//!
//! Every endpoint needs `Authorization: Bearer <token>` (compared in constant time); bodies are
//! limited in size; a refused request changes nothing. `docs/coordinator.md` lists the API.
//!
//! # Layout
//! - `protocol`: the JSON bodies, shared by the server and [`Client`].
//! - `state`: [`State`], what the handlers share: the store, the token, the settings and the
//!   heartbeat deadlines on tokio's clock.
//! - `deal`: where a generation starts and the rows each rank reads, from the job's checkpoint
//!   store and dataset manifest.
//! - `store`: SQLite tables and every decision that reads and writes them, one transaction each.
//! - `api`: routes, the token check, body parsing, errors as JSON.
//! - `metrics`, `page`: `/metrics` and `/`.
//! - `client`: [`Client`] for the CLI and workers.
//! - `error`: [`Error`], one HTTP status per variant.

mod api;
mod client;
mod deal;
mod error;
mod metrics;
mod page;
pub mod protocol;
mod state;
mod store;

use std::future::{Future, IntoFuture};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use client::{Client, ClientError, ClientResult};
pub use error::{Error, Result};
pub use state::{Settings, State};
pub use store::DATABASE_FILE;

/// Serves the API on `listener` until `shutdown` completes (production passes ctrl-c, tests any
/// future), then stops taking connections, finishes the requests in flight and returns. The
/// heartbeat expiry task runs for as long as this does.
pub async fn run(listener: TcpListener, state: Arc<State>, shutdown: impl Future) -> Result<()> {
    let _expiry = AbortOnDrop(tokio::spawn(expire_silent_workers(Arc::clone(&state))));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, api::router(state)).with_graceful_shutdown(async move {
        let _ = stopped.await;
    });
    let mut server = std::pin::pin!(server.into_future());
    tokio::select! {
        served = &mut server => return served.map_err(|source| Error::Serve { source }),
        _ = shutdown => {}
    }
    tracing::info!("coordinator shutting down");
    let _ = stop.send(());
    server.await.map_err(|source| Error::Serve { source })
}

/// The background task: every `sweep_every`, expire the workers past their deadline.
async fn expire_silent_workers(state: Arc<State>) {
    let mut ticks = tokio::time::interval(state.settings().sweep_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(error) = state.expire_silent().await {
            tracing::error!(%error, "expiring silent workers");
        }
    }
}

/// Stops a background task when the server that owns it returns (or its future is dropped).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
