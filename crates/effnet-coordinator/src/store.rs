//! The coordinator's state in SQLite: jobs, generations, members and their progress.
//!
//! One connection behind a mutex, used from `spawn_blocking` ([`Store::call`]) so a slow disk
//! never stalls the async runtime. Every request's changes run in one transaction, so an error
//! part-way leaves the database as it was. Decisions (which generation a worker joins, when a
//! job succeeds) are made here, next to the rows they read, so they are atomic too.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::{Connection, OptionalExtension, Params, Row, params};

use crate::error::{Error, Result};
use crate::protocol::{
    Action, CheckpointReport, Deal, Generation, GenerationState, HeartbeatAnswer, JobDetail, JobStart,
    JobState, JobSummary, JoinRequest, Joined, LastCheckpoint, LeaveOutcome, LeaveRequest, Member,
    MemberState, Progress, ProgressRecord, RestartRequest, Submitted,
};

/// The database file inside the state directory.
pub const DATABASE_FILE: &str = "coordinator.sqlite3";

/// The version of [`SCHEMA`], kept in the database's `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    yaml TEXT NOT NULL,
    spec TEXT NOT NULL,
    world_size INTEGER NOT NULL,
    state TEXT NOT NULL,
    restarts INTEGER NOT NULL DEFAULT 0,
    max_restarts INTEGER NOT NULL,
    min_workers INTEGER NOT NULL,
    start TEXT NOT NULL,
    key TEXT UNIQUE,
    reason TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS generations (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    number INTEGER NOT NULL,
    world_size INTEGER NOT NULL,
    state TEXT NOT NULL,
    end_reason TEXT,
    started_at REAL NOT NULL,
    ended_at REAL,
    resume_step INTEGER,
    resume_url TEXT,
    rendezvous TEXT,
    deal TEXT,
    PRIMARY KEY (job_id, number)
);
CREATE TABLE IF NOT EXISTS members (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    generation INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    host TEXT,
    state TEXT NOT NULL,
    end_reason TEXT,
    joined_at REAL NOT NULL,
    last_heartbeat REAL NOT NULL,
    step INTEGER,
    epoch REAL,
    images_per_s REAL,
    loss REAL,
    checkpoint_step INTEGER,
    checkpoint_url TEXT,
    checkpoint_at REAL
);
CREATE INDEX IF NOT EXISTS members_by_job ON members (job_id, generation);
-- Covers the count of a generation's active members that answers every heartbeat.
CREATE INDEX IF NOT EXISTS members_by_state ON members (job_id, generation, state);
CREATE TABLE IF NOT EXISTS progress (
    job_id TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    at REAL NOT NULL,
    step INTEGER NOT NULL,
    epoch REAL,
    images_per_s REAL,
    loss REAL
);
CREATE INDEX IF NOT EXISTS progress_by_job ON progress (job_id);
";

/// The database, shared by the request handlers and the expiry task.
pub(crate) struct Store {
    connection: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl From<rusqlite::Error> for Error {
    /// The path is filled in by [`Store::call`], which knows it.
    fn from(source: rusqlite::Error) -> Error {
        Error::Database { path: PathBuf::new(), source }
    }
}

/// The database holds the jobs' specs, whose URLs may carry credentials (presigned query
/// strings, `user:password@`): it is created readable and writable by its owner only, and an
/// existing one is narrowed to that where this user may (else a warning: a database another
/// user owns still opens). SQLite gives its `-wal` and `-shm` files the database's permissions.
fn owner_only(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path)?;
        if let Err(error) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!(path = %path.display(), %error, "could not make the database readable by its owner only");
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|source| Error::StateDir { path: dir.to_path_buf(), source })?;
        let path = dir.join(DATABASE_FILE);
        owner_only(&path).map_err(|source| Error::StateDir { path: path.clone(), source })?;
        let database = |source| Error::Database { path: path.clone(), source };
        let connection = Connection::open(&path).map_err(database)?;
        // WAL: a crash mid-write leaves the last committed state; NORMAL is durable at
        // checkpoints, enough for a coordinator whose workers re-report their progress.
        connection
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get::<_, String>(0))
            .map_err(database)?;
        connection
            .execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(database)?;
        // A database of another schema would fail its requests one by one: refuse it here.
        let version: i64 =
            connection.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(database)?;
        let tables: i64 = connection
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'jobs'",
                [],
                |row| row.get(0),
            )
            .map_err(database)?;
        if tables > 0 && version != SCHEMA_VERSION {
            return Err(Error::StateDir {
                path: dir.to_path_buf(),
                source: std::io::Error::other(format!(
                    "{DATABASE_FILE} was written by another version of effnet (schema {version}; this one reads \
                     {SCHEMA_VERSION}): start this coordinator with a new state directory"
                )),
            });
        }
        connection.execute_batch(SCHEMA).map_err(database)?;
        connection.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION};")).map_err(database)?;
        // Every statement is prepared once and reused (`prepare_cached`): parsing SQL was a
        // sixth of a heartbeat's CPU time (docs/benchmarks.md).
        connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Store { connection: Arc::new(Mutex::new(connection)), path })
    }

    /// Runs `work` in one transaction; commits only when it succeeds. It runs right here, on the
    /// request's thread: a transaction takes tens of microseconds (WAL, no fsync per commit),
    /// less than handing it to a blocking thread and back (that hand-off was a quarter of the
    /// coordinator's CPU at 1,000 heartbeats a second, docs/benchmarks.md).
    pub async fn call<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let outcome = (|| {
            // A panic in another request's transaction rolled it back; the connection is fine.
            let mut connection = self.connection.lock().unwrap_or_else(PoisonError::into_inner);
            let transaction = connection.transaction()?;
            let value = work(&transaction)?;
            transaction.commit()?;
            Ok(value)
        })();
        outcome.map_err(|error| match error {
            Error::Database { path, source } if path.as_os_str().is_empty() => {
                Error::Database { path: self.path.clone(), source }
            }
            other => other,
        })
    }
}

/// More than the distinct statements of this module, so none is ever parsed twice.
const STATEMENT_CACHE: usize = 64;

/// `Connection::execute` through the statement cache.
fn execute(connection: &Connection, sql: &str, params: impl Params) -> rusqlite::Result<usize> {
    connection.prepare_cached(sql)?.execute(params)
}

/// `Connection::query_row` through the statement cache.
fn query_row<T>(
    connection: &Connection,
    sql: &str,
    params: impl Params,
    map: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    connection.prepare_cached(sql)?.query_row(params, map)
}

fn parse<T: std::str::FromStr<Err = String>>(text: String) -> Result<T> {
    text.parse().map_err(|what| Error::Corrupt { message: format!("unknown {what}") })
}

fn to_sql_u64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn from_sql_u64(value: Option<i64>) -> Option<u64> {
    value.and_then(|v| u64::try_from(v).ok())
}

/// The columns of `jobs` every decision reads.
struct JobRow {
    id: String,
    name: String,
    state: JobState,
    world_size: u32,
    restarts: u32,
    max_restarts: u32,
    min_workers: u32,
    reason: Option<String>,
    created_at: f64,
    updated_at: f64,
}

fn job_row(connection: &Connection, id: &str) -> Result<JobRow> {
    let row = query_row(
        connection,
        "SELECT id, name, state, world_size, restarts, max_restarts, reason, created_at, updated_at,
         min_workers FROM jobs WHERE id = ?1",
        [id],
        |row| {
            Ok(JobRow {
                id: row.get(0)?,
                name: row.get(1)?,
                // Parsed below, where a typed error can be returned.
                state: JobState::Queued,
                world_size: row.get(3)?,
                restarts: row.get(4)?,
                max_restarts: row.get(5)?,
                reason: row.get(6)?,
                created_at: row.get(7)?,
                updated_at: row.get(8)?,
                min_workers: row.get(9)?,
            })
            .map(|job| (job, row.get::<_, String>(2)))
        },
    )
    .optional()?;
    let Some((mut job, state)) = row else {
        return Err(Error::UnknownJob { id: id.to_string() });
    };
    job.state = parse(state?)?;
    Ok(job)
}

fn set_job_state(connection: &Connection, id: &str, state: JobState, now: f64) -> Result<()> {
    execute(
        connection,
        "UPDATE jobs SET state = ?2, updated_at = ?3 WHERE id = ?1",
        params![id, state.as_str(), now],
    )?;
    Ok(())
}

fn set_job_reason(connection: &Connection, id: &str, reason: &str) -> Result<()> {
    execute(connection, "UPDATE jobs SET reason = ?2 WHERE id = ?1", params![id, reason])?;
    Ok(())
}

/// After generation `number` ended while the job goes on: the job fails when it has used its
/// `max_restarts`, else the next join forms the next generation.
fn after_generation_ended(
    connection: &Connection,
    job_id: &str,
    number: u32,
    reason: &str,
    now: f64,
) -> Result<()> {
    let job = job_row(connection, job_id)?;
    if job.state.is_terminal() || job.restarts < job.max_restarts {
        return Ok(());
    }
    set_job_state(connection, job_id, JobState::Failed, now)?;
    set_job_reason(
        connection,
        job_id,
        &format!(
            "generation {number} ended ({reason}) after {} restarts, the job's distributed.max_restarts",
            job.restarts
        ),
    )
}

fn generations(connection: &Connection, job_id: &str) -> Result<Vec<Generation>> {
    generations_where(connection, job_id, None)
}

/// A job's generations, or the one numbered `number`.
fn generations_where(connection: &Connection, job_id: &str, number: Option<u32>) -> Result<Vec<Generation>> {
    let mut statement = connection.prepare_cached(
        "SELECT number, world_size, state, end_reason, started_at, ended_at, resume_step, resume_url, deal
         FROM generations WHERE job_id = ?1 AND (?2 IS NULL OR number = ?2) ORDER BY number",
    )?;
    let rows = statement.query_map(params![job_id, number], |row| {
        let resume = match (row.get::<_, Option<i64>>(6)?, row.get::<_, Option<String>>(7)?) {
            (Some(step), Some(url)) => {
                Some(CheckpointReport { step: from_sql_u64(Some(step)).unwrap_or(0), url })
            }
            _ => None,
        };
        let deal = row.get::<_, Option<String>>(8)?;
        Ok((
            Generation {
                number: row.get(0)?,
                world_size: row.get(1)?,
                // Parsed below, where a typed error can be returned.
                state: GenerationState::Forming,
                end_reason: row.get(3)?,
                started_at: row.get(4)?,
                ended_at: row.get(5)?,
                resume,
                start: None,
            },
            row.get::<_, String>(2)?,
            deal,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (mut generation, state, deal) = row?;
        generation.state = parse(state)?;
        if let Some(deal) = deal {
            generation.start = Some(read_deal(&deal)?.start);
        }
        out.push(generation);
    }
    Ok(out)
}

/// The newest checkpoint any worker of the job reported committed.
fn newest_reported_checkpoint(connection: &Connection, job_id: &str) -> Result<Option<LastCheckpoint>> {
    Ok(query_row(
        connection,
        "SELECT checkpoint_step, checkpoint_url, checkpoint_at FROM members
             WHERE job_id = ?1 AND checkpoint_step IS NOT NULL
             ORDER BY checkpoint_step DESC, checkpoint_at DESC LIMIT 1",
        [job_id],
        |row| {
            Ok(LastCheckpoint {
                step: from_sql_u64(row.get(0)?).unwrap_or(0),
                url: row.get(1)?,
                reported_at: row.get(2)?,
            })
        },
    )
    .optional()?)
}

/// One generation of a job by number.
fn generation(connection: &Connection, job_id: &str, number: u32) -> Result<Option<Generation>> {
    Ok(generations_where(connection, job_id, Some(number))?.pop())
}

fn newest_generation(connection: &Connection, job_id: &str) -> Result<Option<Generation>> {
    Ok(generations(connection, job_id)?.pop())
}

const MEMBER_COLUMNS: &str =
    "id, generation, rank, host, state, end_reason, joined_at, last_heartbeat, step, epoch,
    images_per_s, loss, checkpoint_step, checkpoint_url, checkpoint_at, job_id";

fn read_member(row: &Row<'_>) -> rusqlite::Result<(Member, String, String)> {
    let checkpoint = match (row.get::<_, Option<i64>>(12)?, row.get::<_, Option<String>>(13)?) {
        (Some(step), Some(url)) => Some(LastCheckpoint {
            step: from_sql_u64(Some(step)).unwrap_or(0),
            url,
            reported_at: row.get::<_, Option<f64>>(14)?.unwrap_or(0.0),
        }),
        _ => None,
    };
    let member = Member {
        id: row.get(0)?,
        generation: row.get(1)?,
        rank: row.get(2)?,
        host: row.get(3)?,
        // Parsed by the caller, which can return a typed error.
        state: MemberState::Active,
        end_reason: row.get(5)?,
        joined_at: row.get(6)?,
        last_heartbeat: row.get(7)?,
        step: from_sql_u64(row.get(8)?),
        epoch: row.get(9)?,
        images_per_s: row.get(10)?,
        loss: row.get(11)?,
        checkpoint,
    };
    Ok((member, row.get(4)?, row.get(15)?))
}

fn members(connection: &Connection, job_id: &str, generation: Option<u32>) -> Result<Vec<Member>> {
    let sql = format!(
        "SELECT {MEMBER_COLUMNS} FROM members WHERE job_id = ?1 AND (?2 IS NULL OR generation = ?2) ORDER BY seq"
    );
    let mut statement = connection.prepare_cached(&sql)?;
    let rows = statement.query_map(params![job_id, generation], read_member)?;
    let mut out = Vec::new();
    for row in rows {
        let (mut member, state, _) = row?;
        member.state = parse(state)?;
        out.push(member);
    }
    Ok(out)
}

/// A member by id with its job id; `job_id` must match when given.
fn member(connection: &Connection, job_id: &str, worker_id: &str) -> Result<Member> {
    let sql = format!("SELECT {MEMBER_COLUMNS} FROM members WHERE id = ?1");
    let found = query_row(connection, &sql, [worker_id], read_member).optional()?;
    match found {
        Some((mut member, state, owner)) if owner == job_id => {
            member.state = parse(state)?;
            Ok(member)
        }
        _ => {
            job_row(connection, job_id)?;
            Err(Error::UnknownWorker { job: job_id.to_string(), worker: worker_id.to_string() })
        }
    }
}

fn summary(connection: &Connection, job: &JobRow) -> Result<JobSummary> {
    let newest = newest_generation(connection, &job.id)?;
    let current = match &newest {
        Some(generation) => members(connection, &job.id, Some(generation.number))?,
        None => Vec::new(),
    };
    let active: Vec<&Member> = current.iter().filter(|m| m.state == MemberState::Active).collect();
    let rates: Vec<f64> = active.iter().filter_map(|m| m.images_per_s).collect();
    let last_checkpoint = newest_reported_checkpoint(connection, &job.id)?;
    Ok(JobSummary {
        id: job.id.clone(),
        name: job.name.clone(),
        state: job.state,
        created_at: job.created_at,
        updated_at: job.updated_at,
        restarts: job.restarts,
        world_size: job.world_size,
        generation: newest.as_ref().map_or(0, |g| g.number),
        generation_state: newest.as_ref().map(|g| g.state),
        workers: u32::try_from(active.len()).unwrap_or(u32::MAX),
        step: current.iter().filter_map(|m| m.step).max(),
        epoch: current.iter().filter_map(|m| m.epoch).reduce(f64::max),
        images_per_s: if rates.is_empty() { None } else { Some(rates.iter().sum()) },
        loss: current.iter().find(|m| m.rank == 0).and_then(|m| m.loss),
        last_checkpoint,
        reason: job.reason.clone(),
        max_restarts: job.max_restarts,
    })
}

/// A validated job about to be stored.
pub(crate) struct NewJob {
    pub name: String,
    pub yaml: String,
    pub spec: serde_json::Value,
    pub world_size: u32,
    pub max_restarts: u32,
    pub min_workers: u32,
    pub start: JobStart,
    /// The submitter's idempotency key: a second submission with it gets the same job.
    pub key: Option<String>,
}

/// Stores a new job; with a key another submission already used, answers that job instead
/// (its YAML must be the same).
pub(crate) fn insert_job(connection: &Connection, job: &NewJob, now: f64) -> Result<Submitted> {
    if let Some(key) = &job.key {
        let existing: Option<(String, String, String, String)> =
            query_row(connection, "SELECT id, name, state, yaml FROM jobs WHERE key = ?1", [key], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .optional()?;
        if let Some((id, name, state, yaml)) = existing {
            if yaml != job.yaml {
                return Err(Error::conflict(format!(
                    "key {key} was used for job {id}, submitted with another job file"
                )));
            }
            return Ok(Submitted { id, name, state: parse(state)? });
        }
    }
    let start = serde_json::to_string(&job.start).map_err(|e| Error::Internal { message: e.to_string() })?;
    let seq: i64 = query_row(connection, "SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs", [], |row| row.get(0))?;
    let id = format!("{}-{seq}", job.name);
    execute(
        connection,
        "INSERT INTO jobs (seq, id, name, yaml, spec, world_size, state, restarts, max_restarts, min_workers,
             start, key, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, ?9, ?11, ?12, ?10, ?10)",
        params![
            seq,
            id,
            job.name,
            job.yaml,
            job.spec.to_string(),
            job.world_size,
            JobState::Queued.as_str(),
            job.max_restarts,
            job.min_workers,
            now,
            start,
            job.key
        ],
    )?;
    Ok(Submitted { id, name: job.name.clone(), state: JobState::Queued })
}

pub(crate) fn list_jobs(connection: &Connection) -> Result<Vec<JobSummary>> {
    let ids: Vec<String> = {
        let mut statement = connection.prepare_cached("SELECT id FROM jobs ORDER BY seq")?;
        statement.query_map([], |row| row.get(0))?.collect::<rusqlite::Result<_>>()?
    };
    ids.iter().map(|id| summary(connection, &job_row(connection, id)?)).collect()
}

pub(crate) fn job_summary(connection: &Connection, id: &str) -> Result<JobSummary> {
    summary(connection, &job_row(connection, id)?)
}

pub(crate) fn job_detail(connection: &Connection, id: &str) -> Result<JobDetail> {
    let job = job_row(connection, id)?;
    let (yaml, spec): (String, String) =
        query_row(connection, "SELECT yaml, spec FROM jobs WHERE id = ?1", [id], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?;
    let spec = serde_json::from_str(&spec)
        .map_err(|error| Error::Corrupt { message: format!("job {id}: stored spec: {error}") })?;
    Ok(JobDetail {
        summary: summary(connection, &job)?,
        yaml,
        spec,
        generations: generations(connection, id)?,
        members: members(connection, id, None)?,
    })
}

/// Ends a generation that has not ended; its members still active are marked `left` with the
/// reason. Returns the ids of those members (the expiry task stops watching them).
fn end_generation(
    connection: &Connection,
    job_id: &str,
    number: u32,
    reason: &str,
    now: f64,
) -> Result<Vec<String>> {
    let changed = execute(
        connection,
        "UPDATE generations SET state = 'ended', end_reason = ?3, ended_at = ?4
         WHERE job_id = ?1 AND number = ?2 AND state != 'ended'",
        params![job_id, number, reason, now],
    )?;
    if changed == 0 {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = {
        let mut statement = connection.prepare_cached(
            "SELECT id FROM members WHERE job_id = ?1 AND generation = ?2 AND state = 'active'",
        )?;
        statement.query_map(params![job_id, number], |row| row.get(0))?.collect::<rusqlite::Result<_>>()?
    };
    execute(
        connection,
        "UPDATE members SET state = 'left', end_reason = ?3
         WHERE job_id = ?1 AND generation = ?2 AND state = 'active'",
        params![job_id, number, format!("generation ended: {reason}")],
    )?;
    Ok(ids)
}

/// Cancels a job that has not ended. Returns its summary and the members no longer watched.
pub(crate) fn cancel(connection: &Connection, id: &str, now: f64) -> Result<(JobSummary, Vec<String>)> {
    let job = job_row(connection, id)?;
    if job.state.is_terminal() {
        return Err(Error::conflict(format!("job {id} is already {}", job.state)));
    }
    set_job_state(connection, id, JobState::Cancelled, now)?;
    set_job_reason(connection, id, "cancelled")?;
    let ended = match newest_generation(connection, id)? {
        Some(generation) => end_generation(connection, id, generation.number, "cancelled", now)?,
        None => Vec::new(),
    };
    Ok((job_summary(connection, id)?, ended))
}

/// Adds a worker to the job's forming generation (starting one when there is none or the last
/// ended, which counts as a restart after the first), assigning the requested or lowest free rank.
pub(crate) fn join(connection: &Connection, job_id: &str, request: &JoinRequest, now: f64) -> Result<Joined> {
    let job = job_row(connection, job_id)?;
    if job.state.is_terminal() {
        return Err(Error::conflict(format!("job {job_id} is {}; nothing can join it", job.state)));
    }
    // An elastic job (min_workers < workers) takes any world from min_workers up, as launched.
    if let Some(world_size) = request.world_size
        && !(job.min_workers..=job.world_size).contains(&world_size)
    {
        let expected = if job.min_workers == job.world_size {
            format!("the job's distributed.workers {}", job.world_size)
        } else {
            format!("the job's distributed.min_workers..workers {}..{}", job.min_workers, job.world_size)
        };
        return Err(Error::conflict(format!(
            "world size {world_size} from the engine disagrees with {expected}"
        )));
    }
    let generation = match newest_generation(connection, job_id)? {
        Some(generation) if generation.state == GenerationState::Running => {
            return Err(Error::conflict(format!(
                "generation {} of job {job_id} is complete ({} ranks); a new one forms after it ends",
                generation.number, generation.world_size
            )));
        }
        Some(generation) if generation.state == GenerationState::Forming => {
            if let Some(world_size) = request.world_size
                && world_size != generation.world_size
            {
                return Err(Error::conflict(format!(
                    "world size {world_size} from the engine disagrees with generation {}'s {}",
                    generation.number, generation.world_size
                )));
            }
            generation
        }
        previous => {
            let world_size = request.world_size.unwrap_or(job.world_size);
            let number = previous.as_ref().map_or(1, |g| g.number + 1);
            // The newest checkpoint reported so far: the generation starts from it or a newer one
            // (decided at its first assignment, crate::deal).
            let resume = newest_reported_checkpoint(connection, job_id)?
                .map(|c| CheckpointReport { step: c.step, url: c.url });
            execute(
                connection,
                "INSERT INTO generations (job_id, number, world_size, state, started_at, resume_step, resume_url)
                 VALUES (?1, ?2, ?3, 'forming', ?4, ?5, ?6)",
                params![
                    job_id,
                    number,
                    world_size,
                    now,
                    resume.as_ref().map(|r| to_sql_u64(r.step)),
                    resume.as_ref().map(|r| r.url.clone())
                ],
            )?;
            if previous.is_some() {
                execute(
                    connection,
                    "UPDATE jobs SET restarts = restarts + 1, updated_at = ?2 WHERE id = ?1",
                    params![job_id, now],
                )?;
            }
            Generation {
                number,
                world_size,
                state: GenerationState::Forming,
                end_reason: None,
                started_at: now,
                ended_at: None,
                resume,
                start: None,
            }
        }
    };
    if let Some(rank) = request.rank
        && rank >= generation.world_size
    {
        return Err(Error::bad_request(format!(
            "rank {rank} is outside generation {}'s world of {} (ranks 0..{})",
            generation.number,
            generation.world_size,
            generation.world_size - 1
        )));
    }
    // A forming generation ends as soon as one of its members leaves or expires, so every
    // member of it is active.
    let taken = members(connection, job_id, Some(generation.number))?;
    let rank = match request.rank {
        Some(rank) => {
            if let Some(holder) = taken.iter().find(|m| m.rank == rank) {
                return Err(Error::conflict(format!(
                    "rank {rank} of generation {} is taken by worker {}",
                    generation.number, holder.id
                )));
            }
            rank
        }
        None => (0..generation.world_size).find(|rank| taken.iter().all(|m| m.rank != *rank)).ok_or_else(
            || Error::Internal { message: format!("generation {} has no free rank", generation.number) },
        )?,
    };
    let seq: i64 =
        query_row(connection, "SELECT COALESCE(MAX(seq), 0) + 1 FROM members", [], |row| row.get(0))?;
    let worker_id = format!("w{seq}");
    execute(
        connection,
        "INSERT INTO members (seq, id, job_id, generation, rank, host, state, joined_at, last_heartbeat)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'active', ?7, ?7)",
        params![seq, worker_id, job_id, generation.number, rank, request.host, now],
    )?;
    let count = u32::try_from(taken.len() + 1).unwrap_or(u32::MAX);
    let mut generation_state = GenerationState::Forming;
    if count == generation.world_size {
        generation_state = GenerationState::Running;
        execute(
            connection,
            "UPDATE generations SET state = 'running' WHERE job_id = ?1 AND number = ?2",
            params![job_id, generation.number],
        )?;
        set_job_state(connection, job_id, JobState::Running, now)?;
    }
    Ok(Joined {
        worker_id,
        generation: generation.number,
        rank,
        world_size: generation.world_size,
        members: count,
        generation_state,
        // Filled in by the state, which knows the timeout.
        heartbeat_interval_s: 0.0,
    })
}

/// What a member should do, from the job's and its generation's state.
fn answer(connection: &Connection, job_id: &str, member: &Member) -> Result<HeartbeatAnswer> {
    let job = job_row(connection, job_id)?;
    let generation = generation(connection, job_id, member.generation)?
        .ok_or_else(|| Error::Corrupt { message: format!("worker {} has no generation", member.id) })?;
    let count: u32 = query_row(
        connection,
        "SELECT COUNT(*) FROM members WHERE job_id = ?1 AND generation = ?2 AND state = 'active'",
        params![job_id, member.generation],
        |row| row.get(0),
    )?;
    let action = if job.state.is_terminal() {
        Action::Stop
    } else {
        match generation.state {
            GenerationState::Forming => Action::Wait,
            GenerationState::Running => Action::Train,
            GenerationState::Ended => Action::Restart,
        }
    };
    Ok(HeartbeatAnswer {
        action,
        job_state: job.state,
        generation: generation.number,
        generation_state: generation.state,
        rank: member.rank,
        world_size: generation.world_size,
        members: count,
    })
}

/// Records a heartbeat and its progress. The flag says whether the expiry task should keep
/// watching the worker (an active member of a generation that has not ended).
pub(crate) fn heartbeat(
    connection: &Connection,
    job_id: &str,
    worker_id: &str,
    progress: &Progress,
    now: f64,
) -> Result<(HeartbeatAnswer, bool)> {
    let member = member(connection, job_id, worker_id)?;
    if member.state == MemberState::Active {
        execute(
            connection,
            "UPDATE members SET last_heartbeat = ?2,
                 step = COALESCE(?3, step), epoch = COALESCE(?4, epoch),
                 images_per_s = COALESCE(?5, images_per_s), loss = COALESCE(?6, loss)
             WHERE id = ?1",
            params![
                worker_id,
                now,
                progress.step.map(to_sql_u64),
                progress.epoch,
                progress.images_per_s,
                progress.loss
            ],
        )?;
        if let Some(checkpoint) = &progress.checkpoint {
            execute(
                connection,
                "UPDATE members SET checkpoint_step = ?2, checkpoint_url = ?3, checkpoint_at = ?4 WHERE id = ?1",
                params![worker_id, to_sql_u64(checkpoint.step), checkpoint.url, now],
            )?;
        }
        // The history is rank 0's, the job's view (every member's latest values are in its
        // row): one row per new step, as heartbeats repeat the step while a step is long. All
        // ranks' rows would grow the table by a row per worker per heartbeat.
        if let Some(step) = progress.step
            && member.step != Some(step)
            && member.rank == 0
        {
            execute(connection,
                "INSERT INTO progress (job_id, worker_id, generation, rank, at, step, epoch, images_per_s, loss)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    job_id,
                    worker_id,
                    member.generation,
                    member.rank,
                    now,
                    to_sql_u64(step),
                    progress.epoch,
                    progress.images_per_s,
                    progress.loss
                ],
            )?;
        }
    }
    let answer = answer(connection, job_id, &member)?;
    let watched = member.state == MemberState::Active && answer.generation_state != GenerationState::Ended;
    Ok((answer, watched))
}

/// A worker says goodbye. `finished` from every rank of a running generation succeeds the job,
/// `failed` fails it, `restart` (or any goodbye while the generation forms) ends the generation
/// with the job going on. Leaving twice changes nothing. Returns the answer and the members no
/// longer watched.
pub(crate) fn leave(
    connection: &Connection,
    job_id: &str,
    worker_id: &str,
    request: &LeaveRequest,
    now: f64,
) -> Result<(HeartbeatAnswer, Vec<String>)> {
    let mut member = member(connection, job_id, worker_id)?;
    if member.state != MemberState::Active {
        return Ok((answer(connection, job_id, &member)?, Vec::new()));
    }
    let outcome = match request.outcome {
        LeaveOutcome::Finished => "finished",
        LeaveOutcome::Failed => "failed",
        LeaveOutcome::Restart => "restart",
    };
    let reason = match &request.message {
        Some(message) => format!("{outcome}: {message}"),
        None => outcome.to_string(),
    };
    execute(
        connection,
        "UPDATE members SET state = 'left', end_reason = ?2, last_heartbeat = ?3 WHERE id = ?1",
        params![worker_id, reason, now],
    )?;
    member.state = MemberState::Left;
    let generation = generation(connection, job_id, member.generation)?
        .ok_or_else(|| Error::Corrupt { message: format!("worker {worker_id} has no generation") })?;
    let who = format!("worker {worker_id} (rank {})", member.rank);
    let mut unwatched = vec![worker_id.to_string()];
    match (request.outcome, generation.state) {
        (_, GenerationState::Ended) => {}
        (LeaveOutcome::Finished, GenerationState::Running) => {
            let unfinished: u32 = query_row(
                connection,
                "SELECT COUNT(*) FROM members WHERE job_id = ?1 AND generation = ?2
                 AND (state != 'left' OR end_reason IS NULL OR end_reason NOT LIKE 'finished%')",
                params![job_id, generation.number],
                |row| row.get(0),
            )?;
            if unfinished == 0 {
                end_generation(connection, job_id, generation.number, "finished", now)?;
                set_job_state(connection, job_id, JobState::Succeeded, now)?;
            }
        }
        (LeaveOutcome::Failed, _) => {
            let message = format!(
                "{who} failed{}",
                request.message.as_ref().map(|m| format!(": {m}")).unwrap_or_default()
            );
            unwatched.extend(end_generation(connection, job_id, generation.number, &message, now)?);
            set_job_state(connection, job_id, JobState::Failed, now)?;
            set_job_reason(connection, job_id, &message)?;
        }
        (LeaveOutcome::Restart, _) | (LeaveOutcome::Finished, GenerationState::Forming) => {
            let message = format!("{who} left ({reason})");
            unwatched.extend(end_generation(connection, job_id, generation.number, &message, now)?);
            after_generation_ended(connection, job_id, generation.number, &message, now)?;
        }
    }
    Ok((answer(connection, job_id, &member)?, unwatched))
}

/// A worker silent past the heartbeat timeout: it expires and its generation ends. Returns the
/// members no longer watched (empty when it had already left or its generation ended).
pub(crate) fn expire(
    connection: &Connection,
    worker_id: &str,
    timeout_s: f64,
    now: f64,
) -> Result<Vec<String>> {
    let found: Option<(String, u32, u32, String)> = query_row(
        connection,
        "SELECT job_id, generation, rank, state FROM members WHERE id = ?1",
        [worker_id],
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
    )
    .optional()?;
    let Some((job_id, generation, rank, state)) = found else { return Ok(Vec::new()) };
    if parse::<MemberState>(state)? != MemberState::Active {
        return Ok(Vec::new());
    }
    execute(
        connection,
        "UPDATE members SET state = 'expired', end_reason = ?2 WHERE id = ?1",
        params![worker_id, format!("no heartbeat for {timeout_s} s")],
    )?;
    let reason = format!("worker {worker_id} (rank {rank}) sent no heartbeat for {timeout_s} s");
    let mut unwatched = vec![worker_id.to_string()];
    unwatched.extend(end_generation(connection, &job_id, generation, &reason, now)?);
    execute(connection, "UPDATE jobs SET updated_at = ?2 WHERE id = ?1", params![job_id, now])?;
    after_generation_ended(connection, &job_id, generation, &reason, now)?;
    Ok(unwatched)
}

/// An engine ends the job's newest generation now (its workers failed) instead of after the
/// heartbeat timeout. A generation that already ended is left as it is. Returns the job's summary
/// and the members no longer watched.
pub(crate) fn restart(
    connection: &Connection,
    job_id: &str,
    request: &RestartRequest,
    now: f64,
) -> Result<(JobSummary, Vec<String>)> {
    let reason = request.reason.as_deref();
    let job = job_row(connection, job_id)?;
    if job.state.is_terminal() {
        return Err(Error::conflict(format!("job {job_id} is {}; it does not restart", job.state)));
    }
    let mut unwatched = Vec::new();
    if let Some(generation) = newest_generation(connection, job_id)?
        && generation.state != GenerationState::Ended
    {
        let reason = format!("the engine restarts it: {}", reason.unwrap_or("its workers failed"));
        unwatched = end_generation(connection, job_id, generation.number, &reason, now)?;
        execute(connection, "UPDATE jobs SET updated_at = ?2 WHERE id = ?1", params![job_id, now])?;
        after_generation_ended(connection, job_id, generation.number, &reason, now)?;
    }
    if request.give_up && !job_row(connection, job_id)?.state.is_terminal() {
        set_job_state(connection, job_id, JobState::Failed, now)?;
        set_job_reason(connection, job_id, reason.unwrap_or("the engine gave up"))?;
    }
    Ok((job_summary(connection, job_id)?, unwatched))
}

/// Active members of generations that have not ended: the workers the expiry task watches.
pub(crate) fn watched_members(connection: &Connection) -> Result<Vec<String>> {
    let mut statement = connection.prepare_cached(
        "SELECT m.id FROM members m JOIN generations g ON m.job_id = g.job_id AND m.generation = g.number
         WHERE m.state = 'active' AND g.state != 'ended' ORDER BY m.seq",
    )?;
    let ids = statement.query_map([], |row| row.get(0))?.collect::<rusqlite::Result<_>>()?;
    Ok(ids)
}

/// The newest `limit` progress records of a job, oldest first.
pub(crate) fn progress_history(
    connection: &Connection,
    job_id: &str,
    limit: u32,
) -> Result<Vec<ProgressRecord>> {
    job_row(connection, job_id)?;
    let mut statement = connection.prepare_cached(
        "SELECT at, worker_id, generation, rank, step, epoch, images_per_s, loss FROM
             (SELECT rowid, * FROM progress WHERE job_id = ?1 ORDER BY rowid DESC LIMIT ?2)
         ORDER BY rowid",
    )?;
    let rows = statement.query_map(params![job_id, limit], |row| {
        Ok(ProgressRecord {
            at: row.get(0)?,
            worker_id: row.get(1)?,
            generation: row.get(2)?,
            rank: row.get(3)?,
            step: from_sql_u64(row.get(4)?).unwrap_or(0),
            epoch: row.get(5)?,
            images_per_s: row.get(6)?,
            loss: row.get(7)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Members by job and state, for `/metrics`.
pub(crate) fn member_counts(connection: &Connection) -> Result<Vec<(String, MemberState, u64)>> {
    let mut statement = connection.prepare_cached(
        "SELECT job_id, state, COUNT(*) FROM members GROUP BY job_id, state ORDER BY job_id, state",
    )?;
    let rows = statement.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, i64>(2)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (job, state, count) = row?;
        out.push((job, parse(state)?, from_sql_u64(Some(count)).unwrap_or(0)));
    }
    Ok(out)
}

/// The active member of a generation that has not ended, for the rendezvous.
fn rendezvous_member(connection: &Connection, job_id: &str, worker_id: &str) -> Result<Member> {
    Ok(live_member(connection, job_id, worker_id)?.0)
}

/// An active member of a generation that has not ended, and that generation.
fn live_member(connection: &Connection, job_id: &str, worker_id: &str) -> Result<(Member, Generation)> {
    let member = member(connection, job_id, worker_id)?;
    let generation = generation(connection, job_id, member.generation)?
        .ok_or_else(|| Error::Corrupt { message: format!("worker {worker_id} has no generation") })?;
    if member.state != MemberState::Active || generation.state == GenerationState::Ended {
        return Err(Error::conflict(format!(
            "worker {worker_id} is not an active member of a live generation (generation {} is {})",
            generation.number,
            generation.state.as_str()
        )));
    }
    Ok((member, generation))
}

/// Rank 0 publishes its generation's rendezvous bytes (hex), once.
pub(crate) fn publish_rendezvous(
    connection: &Connection,
    job_id: &str,
    worker_id: &str,
    blob: &str,
) -> Result<()> {
    let member = rendezvous_member(connection, job_id, worker_id)?;
    if member.rank != 0 {
        return Err(Error::conflict(format!(
            "worker {worker_id} is rank {}; only rank 0 publishes the rendezvous",
            member.rank
        )));
    }
    match generation_rendezvous(connection, job_id, member.generation)? {
        Some(existing) if existing == blob => Ok(()),
        Some(_) => Err(Error::conflict(format!(
            "generation {}'s rendezvous is already published",
            member.generation
        ))),
        None => {
            execute(
                connection,
                "UPDATE generations SET rendezvous = ?3 WHERE job_id = ?1 AND number = ?2",
                params![job_id, member.generation, blob],
            )?;
            Ok(())
        }
    }
}

/// The member's generation's rendezvous bytes (hex), `None` until rank 0 published them.
pub(crate) fn rendezvous(connection: &Connection, job_id: &str, worker_id: &str) -> Result<Option<String>> {
    let member = rendezvous_member(connection, job_id, worker_id)?;
    generation_rendezvous(connection, job_id, member.generation)
}

fn generation_rendezvous(connection: &Connection, job_id: &str, number: u32) -> Result<Option<String>> {
    Ok(query_row(
        connection,
        "SELECT rendezvous FROM generations WHERE job_id = ?1 AND number = ?2",
        params![job_id, number],
        |row| row.get(0),
    )?)
}

fn read_deal(text: &str) -> Result<Deal> {
    serde_json::from_str(text).map_err(|e| Error::Corrupt { message: format!("a generation's deal: {e}") })
}

/// What the coordinator needs to deal a member's generation: the member, its generation, the
/// deal if made already, and the job's YAML and start.
pub(crate) struct DealContext {
    pub member: Member,
    pub generation: Generation,
    pub deal: Option<Deal>,
    pub yaml: String,
    pub start: JobStart,
}

/// The context of an active member of a running generation; a forming one has no deal yet.
pub(crate) fn deal_context(connection: &Connection, job_id: &str, worker_id: &str) -> Result<DealContext> {
    let (member, generation) = live_member(connection, job_id, worker_id)?;
    if generation.state != GenerationState::Running {
        return Err(Error::conflict(format!(
            "generation {} is still forming: its assignment is dealt once every rank joined",
            generation.number
        )));
    }
    let (yaml, start, deal): (String, String, Option<String>) = query_row(
        connection,
        "SELECT jobs.yaml, jobs.start, generations.deal FROM jobs JOIN generations ON generations.job_id = jobs.id
         WHERE jobs.id = ?1 AND generations.number = ?2",
        params![job_id, member.generation],
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
    )?;
    let start = serde_json::from_str(&start)
        .map_err(|e| Error::Corrupt { message: format!("a job's start: {e}") })?;
    let deal = deal.as_deref().map(read_deal).transpose()?;
    Ok(DealContext { member, generation, deal, yaml, start })
}

/// Records generation `number`'s deal, unless one was recorded first (which is then returned).
pub(crate) fn save_deal(connection: &Connection, job_id: &str, number: u32, deal: &Deal) -> Result<Deal> {
    let text = serde_json::to_string(deal).map_err(|e| Error::Internal { message: e.to_string() })?;
    execute(
        connection,
        "UPDATE generations SET deal = ?3 WHERE job_id = ?1 AND number = ?2 AND deal IS NULL",
        params![job_id, number, text],
    )?;
    let stored: Option<String> = query_row(
        connection,
        "SELECT deal FROM generations WHERE job_id = ?1 AND number = ?2",
        params![job_id, number],
        |row| row.get(0),
    )?;
    read_deal(&stored.unwrap_or(text))
}
