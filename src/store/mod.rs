//! The store: the one boundary between the worker and persistence.
//!
//! The worker sends [`Change`]s (a job record and its place in the queue) through a
//! [`StoreHandle`] and acts on none of them before the answer says they are durable; at
//! boot, [`open`] gives back what was stored as [`Recovered`]: every job, and the unfinished
//! ones in the order they run again. Two backends stand behind it, chosen by
//! `[store] kind`, and the worker never learns which:
//!
//! - [`files`]: the data dir's job files and `queue.json`, written by a thread of its own
//!   with group commits; the embedded default for one box.
//! - [`postgres`]: a PostgreSQL database, one transaction per group of changes.
//!
//! What both share lives here once: the change and error types, the ranks, and the
//! recovery order ([`order`]).

pub mod files;
pub mod lock;
pub mod order;
pub mod postgres;

use std::path::Path;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::StoreConfig;
use crate::job::{Job, JobId};

/// The rank of the first queued job in replay order. Ranks below it are start numbers, which
/// is where jobs interrupted by a graceful stop go back to: ahead of every other queued job.
pub const FIRST_QUEUED_RANK: u64 = 1 << 62;

/// Where a job stands in the queue after a change. Ranks order each list; the worker
/// chooses them, a backend only keeps them (in `queue.json`, or a column) to give the order
/// back at boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Running(u64),
    Queued(u64),
    /// Finished: in neither list.
    Off,
}

/// One job record to make durable, with its new place in the queue.
#[derive(Clone, Debug)]
pub struct Change {
    pub job: Job,
    pub placement: Placement,
}

/// A [`Change`] as the worker writes it: on the record it was decided from, and whose claim
/// on the job it needs. The file store has one writer and ignores both; the database store
/// refuses the change with [`StoreError::Conflict`] when either does not hold.
#[derive(Clone, Debug)]
pub struct Write {
    pub change: Change,
    /// The version of the record the change was decided from (0: a new job).
    pub base: u64,
    pub fence: Fence,
}

/// Whose claim on a job a write needs, when several nodes share the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fence {
    /// The job is no node's, or this node's with its lease still holding: every change of
    /// the node that runs the job, and every change of a job that does not run.
    Owner,
    /// The job is this node's, or its owner's lease has lapsed: a boot putting back what
    /// its crash cut, and a takeover.
    Recover,
    /// Whoever runs it: a cancel, which the owner learns from the record.
    Any,
}

/// A job record as the database holds it, read because another node changed it (or a
/// write of this node's met it instead of the version it expected).
#[derive(Clone, Debug)]
pub struct Remote {
    pub job: Job,
    pub placement: Placement,
    /// The node whose running job it is.
    pub owner: Option<String>,
    /// Its owner's lease has lapsed: any node may take it over.
    pub expired: bool,
    pub version: u64,
}

/// What the database store tells the worker about the other nodes and this node's leases.
#[derive(Debug)]
pub enum ClusterEvent {
    /// Records another node changed, or this node must read again.
    Changed(Vec<Remote>),
    /// Running jobs whose owner's lease has lapsed: to take over, as a boot recovers what a
    /// crash cut.
    Expired(Vec<Remote>),
    /// This node renewed its leases: the jobs it still holds, and until when, by this
    /// process's clock, the shortest of the leases surely holds. A running job of this node
    /// that is not listed has lost its lease.
    Renewed {
        held: Vec<JobId>,
        /// When the renewal was sent: starts that landed after it are not in `held`.
        asked_at: std::time::Instant,
        until: std::time::Instant,
    },
}

/// A node of the cluster, as `GET /v1/nodes` shows it.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct NodeView {
    /// The node's name (`cluster.node_id`).
    pub id: String,
    /// Where its API is reached (`cluster.address`).
    pub address: String,
    /// Whether the node is up now: it holds its lock on the database.
    pub live: bool,
    /// When it started, RFC 3339.
    pub started_at: String,
    /// Its last heartbeat, RFC 3339.
    pub heartbeat_at: String,
    /// The ids of the jobs it runs.
    pub running: Vec<String>,
    /// Its GPUs, and those free at its last heartbeat.
    pub gpus: Vec<u32>,
    pub free_gpus: Vec<u32>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Nothing was written (disk full, I/O error, read-only dir, the database out of reach);
    /// later writes may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// An fsync or rename failed, or the database holds what this daemon did not write:
    /// what is stored is unknown, so the daemon must stop and replay. No further write is
    /// accepted.
    #[error("fatal storage error: {0}")]
    Fatal(String),
    /// Like `Fatal`, but after some records of the batch were already renamed into place:
    /// they may or may not survive, so the outcome is unknown, not "nothing stored".
    #[error("fatal storage error after the records became visible: {0}")]
    OutcomeUnknown(String),
    /// The store has stopped.
    #[error("the store has stopped")]
    Closed,
    /// Nothing of the commit was stored: the job's record is not the one the change was
    /// decided from (another node changed it), or the claim the change needs does not hold.
    /// `current` is the record now, when the database could say.
    #[error("the job changed on another node")]
    Conflict { current: Option<Box<Remote>> },
}

impl StoreError {
    /// A fatal error after records were renamed into place: nobody can say whether they
    /// will be there after the restart.
    pub(crate) fn outcome_unknown(self) -> StoreError {
        match self {
            StoreError::Fatal(detail) => StoreError::OutcomeUnknown(detail),
            other => other,
        }
    }
}

/// The cloneable way to the store, whichever backend it is. The backend ends once every
/// handle is gone, after it has answered everything sent to it.
#[derive(Clone, Debug)]
pub struct StoreHandle {
    backend: Backend,
    /// Why writes are refused now (the database out of reach), or `None`; for readiness.
    trouble: watch::Receiver<Option<String>>,
}

#[derive(Clone, Debug)]
enum Backend {
    Files(files::Handle),
    Postgres(postgres::Handle),
}

impl StoreHandle {
    /// Makes `changes` durable. `Ok` means every job record is stored durably; on `Err`
    /// none of them is (but see [`StoreError::OutcomeUnknown`]).
    pub async fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Files(files) => files.commit(changes).await,
            Backend::Postgres(pg) => pg.commit(changes).await,
        }
    }

    /// Makes `writes` durable, each on the record and claim it names (see [`Write`]).
    pub async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Files(files) => {
                files
                    .commit(writes.into_iter().map(|w| w.change).collect())
                    .await
            }
            Backend::Postgres(pg) => pg.write(writes).await,
        }
    }

    /// The nodes sharing the database, or `None` for the file store (a single box).
    pub async fn nodes(&self) -> Option<Result<Vec<NodeView>, StoreError>> {
        match &self.backend {
            Backend::Files(_) => None,
            Backend::Postgres(pg) => Some(pg.nodes().await),
        }
    }

    /// Reads the records of `ids` again, for a worker that cannot tell what another node
    /// did to them; `None` for the file store, which has no other writer.
    pub async fn reload(&self, ids: Vec<JobId>) -> Option<Result<Vec<Remote>, StoreError>> {
        match &self.backend {
            Backend::Files(_) => None,
            Backend::Postgres(pg) => Some(pg.reload(ids).await),
        }
    }

    /// Tells the cluster task what the node's heartbeat reports: its free GPUs and how
    /// many jobs it runs. Nothing for the file store.
    pub fn report(&self, gpus: Vec<u32>, free_gpus: Vec<u32>, running: usize) {
        if let Backend::Postgres(pg) = &self.backend {
            pg.report(gpus, free_gpus, running);
        }
    }

    /// Gives queued jobs new ranks without writing their records: for an order the records
    /// already imply (the deadline order, at boot), so there is nothing new to make
    /// durable. A job that is not queued is left alone, so a finished job never comes back.
    pub async fn rerank(&self, ranks: Vec<(JobId, u64)>) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Files(files) => files.rerank(ranks).await,
            Backend::Postgres(pg) => pg.rerank(ranks).await,
        }
    }

    /// Why the store refuses writes at the moment, if it does (the database is out of reach
    /// and the store is reconnecting), as a watch, for a reader that must not keep the store
    /// open. The file store never says so: each of its writes tries the disk again.
    pub fn trouble_watch(&self) -> watch::Receiver<Option<String>> {
        self.trouble.clone()
    }
}

/// What a backend gave back at boot: the recovery order both share, applied to what it
/// held.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every readable job, finished ones included.
    pub jobs: Vec<Job>,
    /// The unfinished jobs (Running and Queued) in the order they run again.
    pub order: Vec<JobId>,
    /// Records that could not be read and were set aside (files to `quarantine/`, rows to
    /// the quarantine table).
    pub quarantined: usize,
    /// Each record's version, for [`Write::base`] (empty for the file store).
    pub versions: std::collections::HashMap<JobId, u64>,
    /// The ranks of `order` as the database holds them, shared with the other nodes (empty
    /// for the file store, whose ranks are the replay order's).
    pub ranks: std::collections::HashMap<JobId, u64>,
    /// Jobs other nodes run: in `jobs`, not in `order`.
    pub elsewhere: std::collections::HashMap<JobId, String>,
}

/// An open store: its handle, what it recovered, and how to wait for its end.
pub struct Opened {
    pub handle: StoreHandle,
    pub recovered: Recovered,
    pub ended: Ended,
    /// The database store's news for the worker; `None` for the file store.
    pub cluster: Option<tokio::sync::mpsc::Receiver<ClusterEvent>>,
}

/// Waits for a backend's end once every [`StoreHandle`] is dropped: the file store's
/// thread, or the PostgreSQL store's task.
pub enum Ended {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

impl Ended {
    /// Whether the backend ended cleanly (answered everything and closed).
    pub async fn wait(self) -> bool {
        match self {
            Ended::Thread(thread) => tokio::task::spawn_blocking(move || thread.join().is_ok())
                .await
                .unwrap_or(false),
            Ended::Task(task) => task.await.is_ok(),
        }
    }
}

/// Why the store could not open, and how the daemon exits for it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The data dir or the database could not be read or prepared (exit 74).
    #[error("{0}")]
    Storage(String),
    /// The database cannot be reached (exit 69).
    #[error("{0}")]
    Unreachable(String),
    /// Another daemon holds the store, or a live node has this node's name (exit 75).
    #[error("{0}")]
    Held(String),
}

/// Opens the store `config` names: replays what it holds, cleans it, starts the backend.
/// `fatal` is cancelled if a write ever fails in a way that needs a restart. Blocking work
/// runs off the async workers.
pub async fn open(
    config: &StoreConfig,
    data_dir: &Path,
    fatal: CancellationToken,
) -> Result<Opened, OpenError> {
    match &config.kind {
        crate::config::StoreKind::Files { sync } => {
            let data_dir = data_dir.to_path_buf();
            let sync = *sync;
            let opened = tokio::task::spawn_blocking(move || {
                files::Store::open_with(&data_dir, fatal, sync)
            })
            .await
            .map_err(|e| OpenError::Storage(format!("replay failed: {e}")))?
            .map_err(|e| OpenError::Storage(e.to_string()))?;
            Ok(Opened {
                handle: opened.handle,
                recovered: Recovered {
                    quarantined: opened.recovered.damaged.len(),
                    jobs: opened.recovered.jobs,
                    order: opened.recovered.order,
                    ..Recovered::default()
                },
                ended: Ended::Thread(opened.thread),
                cluster: None,
            })
        }
        crate::config::StoreKind::Postgres(pg) => postgres::open(pg, fatal).await,
    }
}

impl StoreHandle {
    pub(crate) fn files(handle: files::Handle) -> StoreHandle {
        let (_, trouble) = watch::channel(None);
        StoreHandle {
            backend: Backend::Files(handle),
            trouble,
        }
    }

    pub(crate) fn postgres(
        handle: postgres::Handle,
        trouble: watch::Receiver<Option<String>>,
    ) -> StoreHandle {
        StoreHandle {
            backend: Backend::Postgres(handle),
            trouble,
        }
    }
}
