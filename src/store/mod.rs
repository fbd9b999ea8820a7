//! The store: the only code that writes the data dir's job state.
//!
//! [`Store::open`] replays the data dir, cleans it (damaged files to `quarantine/`, leftover
//! temporary files removed, `queue.json` rewritten), and starts the persistence thread. The
//! worker talks to it through a [`StoreHandle`] with one call, [`StoreHandle::commit`]: a set
//! of job records and their places in the queue, answered once they are durable.
//!
//! Group commit: the thread takes every request waiting in its inbox as one batch, stages all
//! job files at once (each written to a temporary file and fsynced, by up to 16 threads of a
//! pool it keeps so that the filesystem can merge their journal commits; with
//! `sync = "syncfs"`, written by the store thread alone and made durable by one syncfs),
//! renames them into place, fsyncs the directory once, and only then answers every request
//! of the batch. Under load a batch grows, so the cost per job falls.
//!
//! `queue.json` is derived from the job files (replay rebuilds the same order from them), so
//! it is not on the acknowledgement path: it is rewritten after the batches that changed the
//! order, at most once per [`QUEUE_FILE_MIN_DELAY`] and never taking more than about 1/20 of
//! the thread's time, so a long queue does not make every enqueue slower. It is also written
//! at boot and when the store stops.
//!
//! Blocking I/O stays off the async runtime: the writes happen on this thread and its staging
//! threads ([`StagePool`]), nowhere else.

pub mod fsio;
pub mod lock;
pub mod replay;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::config::SyncMode;
use crate::job::{Job, JobId};
use crate::metrics::METRICS;
use fsio::{Staged, WriteError};
pub use replay::{Damaged, QueueFile, Recovered};
use replay::{JOBS_DIR, LOGS_DIR, QUARANTINE_DIR, QUEUE_FILE};

/// The rank of the first queued job in replay order. Ranks below it are start numbers, which
/// is where jobs interrupted by a graceful stop go back to: ahead of every other queued job.
pub const FIRST_QUEUED_RANK: u64 = 1 << 62;

/// Requests waiting beyond this many are left for the next batch, which bounds a batch's
/// memory and the latency of its first request.
const MAX_BATCH: usize = 4096;

/// Requests that may wait for the store at once; further commits wait for a slot, which is
/// how a slow disk pushes back on clients.
const INBOX_SLOTS: usize = 4096;

/// Threads that stage a batch's files in parallel when each is fsynced. fsync blocks on the
/// device, not the CPU, and concurrent fsyncs share journal commits, so this is more than the
/// cores.
const STAGE_THREADS: usize = 16;

/// Batches of at most this many files are staged by the store thread itself: for so few,
/// handing them to other threads costs more than it overlaps.
const STAGE_ALONE: usize = 2;

/// How long to wait before rewriting `queue.json` again after the storage refused it.
const QUEUE_FILE_RETRY: Duration = Duration::from_secs(1);

/// The shortest time between two rewrites of `queue.json`.
pub const QUEUE_FILE_MIN_DELAY: Duration = Duration::from_millis(10);

/// `queue.json` waits at least this many times as long as its last rewrite took, so that
/// rewriting it costs at most about 1/20 of the store's time however long the queue is.
const QUEUE_FILE_COST_FACTOR: u32 = 20;

/// Where a job stands in `queue.json` after a change. Ranks order each list; the worker
/// chooses them, the store only keeps them to write the file.
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

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Nothing was written (disk full, I/O error, read-only dir); later writes may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// An fsync or rename failed: what is on disk is unknown, so the daemon must stop and
    /// replay. No further write is accepted.
    #[error("fatal storage error: {0}")]
    Fatal(String),
    /// Like `Fatal`, but after some records of the batch were already renamed into place:
    /// they may or may not survive, so the outcome is unknown, not "nothing stored".
    #[error("fatal storage error after the records became visible: {0}")]
    OutcomeUnknown(String),
    /// The store has stopped.
    #[error("the store has stopped")]
    Closed,
}

impl StoreError {
    /// A fatal error after records were renamed into place: nobody can say whether they
    /// will be there after the restart.
    fn outcome_unknown(self) -> StoreError {
        match self {
            StoreError::Fatal(detail) => StoreError::OutcomeUnknown(detail),
            other => other,
        }
    }
}

struct Request {
    changes: Vec<Change>,
    /// Queued jobs re-ranked without a write of their files; see [`StoreHandle::rerank`].
    ranks: Vec<(JobId, u64)>,
    respond_to: oneshot::Sender<Result<(), StoreError>>,
    /// Held until the request is answered.
    _slot: OwnedSemaphorePermit,
}

/// The cloneable way to the persistence thread. The thread ends when every handle is gone,
/// after it has answered everything sent to it.
#[derive(Clone, Debug)]
pub struct StoreHandle {
    /// A std channel, so that the thread can wait with a timeout (for `queue.json`); it is
    /// bounded by `slots`, and sending on it never blocks.
    inbox: mpsc::Sender<Request>,
    slots: Arc<Semaphore>,
}

impl StoreHandle {
    /// Makes `changes` durable. `Ok` means every job record is on disk and fsynced, and so is
    /// its directory entry; on `Err` none of them is.
    pub async fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        self.send(changes, Vec::new()).await
    }

    /// Gives queued jobs new ranks in `queue.json` without writing their files: for an order
    /// the job files already imply (the deadline order, at boot), so there is nothing new to
    /// make durable. A job that is not queued in `queue.json` is left alone, so a finished job
    /// never comes back. Answered once the store's copy of the order has them; `queue.json`
    /// follows as after a commit.
    pub async fn rerank(&self, ranks: Vec<(JobId, u64)>) -> Result<(), StoreError> {
        self.send(Vec::new(), ranks).await
    }

    async fn send(&self, changes: Vec<Change>, ranks: Vec<(JobId, u64)>) -> Result<(), StoreError> {
        if changes.is_empty() && ranks.is_empty() {
            return Ok(());
        }
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let (respond_to, answer) = oneshot::channel();
        self.inbox
            .send(Request {
                changes,
                ranks,
                respond_to,
                _slot: slot,
            })
            .map_err(|_| StoreError::Closed)?;
        answer.await.unwrap_or(Err(StoreError::Closed))
    }
}

/// The data dir's layout and the store's open result.
pub struct Store;

/// What opening the store hands back.
pub struct Opened {
    pub handle: StoreHandle,
    pub recovered: Recovered,
    /// Joins the persistence thread; it ends once every [`StoreHandle`] is dropped.
    pub thread: thread::JoinHandle<()>,
}

/// Why the store could not open.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(String);

impl Store {
    /// Replays and cleans the data dir, then starts the persistence thread. `fatal` is
    /// cancelled if a write ever fails in a way that needs a restart.
    pub fn open(data_dir: &Path, fatal: CancellationToken) -> Result<Opened, OpenError> {
        Store::open_with(data_dir, fatal, SyncMode::default())
    }

    /// Like [`Store::open`], making batches durable the way `sync` says.
    pub fn open_with(
        data_dir: &Path,
        fatal: CancellationToken,
        sync: SyncMode,
    ) -> Result<Opened, OpenError> {
        let data_dir = data_dir.to_path_buf();
        for sub in [JOBS_DIR, QUARANTINE_DIR, LOGS_DIR] {
            let dir = data_dir.join(sub);
            fs::create_dir_all(&dir)
                .map_err(|e| OpenError(format!("cannot create {}: {e}", dir.display())))?;
        }
        let recovered = replay::replay(&data_dir)
            .map_err(|e| OpenError(format!("cannot read {}: {e}", data_dir.display())))?;
        let mut queue = QueueMirror::default();
        for (rank, id) in recovered.order.iter().enumerate() {
            queue.place(*id, Placement::Queued(FIRST_QUEUED_RANK + rank as u64));
        }
        let mut thread_state = Persister {
            jobs_dir: data_dir.join(JOBS_DIR),
            data_dir,
            queue,
            queue_dirty: false,
            queue_written_at: Instant::now(),
            queue_cost: Duration::ZERO,
            sync,
            fatal,
            broken: None,
            pool: StagePool::default(),
        };
        thread_state
            .clean(&recovered)
            .map_err(|e| OpenError(e.to_string()))?;
        let (inbox_tx, inbox) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("store".into())
            .spawn(move || thread_state.run(inbox))
            .map_err(|e| OpenError(format!("cannot start the store thread: {e}")))?;
        Ok(Opened {
            handle: StoreHandle {
                inbox: inbox_tx,
                slots: Arc::new(Semaphore::new(INBOX_SLOTS)),
            },
            recovered,
            thread,
        })
    }
}

/// The store's copy of the queue order, from which `queue.json` is written.
#[derive(Default)]
struct QueueMirror {
    running: BTreeSet<(u64, JobId)>,
    queued: BTreeSet<(u64, JobId)>,
    placed: HashMap<JobId, Placement>,
}

impl QueueMirror {
    /// Moves a job to `placement` and returns where it was, for undo.
    fn place(&mut self, id: JobId, placement: Placement) -> Placement {
        let old = self.placed.remove(&id).unwrap_or(Placement::Off);
        match old {
            Placement::Running(rank) => {
                self.running.remove(&(rank, id));
            }
            Placement::Queued(rank) => {
                self.queued.remove(&(rank, id));
            }
            Placement::Off => {}
        }
        match placement {
            Placement::Running(rank) => {
                self.running.insert((rank, id));
            }
            Placement::Queued(rank) => {
                self.queued.insert((rank, id));
            }
            Placement::Off => {}
        }
        if placement != Placement::Off {
            self.placed.insert(id, placement);
        }
        old
    }

    fn to_bytes(&self) -> Vec<u8> {
        let file = QueueFile {
            running: self.running.iter().map(|(_, id)| id.to_string()).collect(),
            queued: self.queued.iter().map(|(_, id)| id.to_string()).collect(),
        };
        let mut bytes =
            serde_json::to_vec_pretty(&file).expect("a list of strings always serialises");
        bytes.push(b'\n');
        bytes
    }
}

/// The persistence thread's state.
struct Persister {
    data_dir: PathBuf,
    jobs_dir: PathBuf,
    queue: QueueMirror,
    /// The mirror changed since `queue.json` was last written.
    queue_dirty: bool,
    queue_written_at: Instant,
    /// How long the last rewrite of `queue.json` took.
    queue_cost: Duration,
    /// How a batch's files are made durable before their renames.
    sync: SyncMode,
    /// Cancelled on a fatal write error, which makes the daemon exit 74.
    fatal: CancellationToken,
    /// Set after a fatal error: every later request is refused with it.
    broken: Option<String>,
    /// The threads that stage a batch's files.
    pool: StagePool,
}

impl Persister {
    /// Acts on what replay found: quarantine damaged files, remove temporary ones, write a
    /// current `queue.json`, and make all of it durable.
    fn clean(&mut self, recovered: &Recovered) -> Result<(), WriteError> {
        let quarantine = self.data_dir.join(QUARANTINE_DIR);
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ").to_string();
        for damaged in &recovered.damaged {
            let name = damaged
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "unnamed".into());
            let target = quarantine.join(format!("{stamp}-{name}"));
            match fs::rename(&damaged.path, &target) {
                Ok(()) => warn!(
                    file = %damaged.path.display(),
                    moved_to = %target.display(),
                    reason = %damaged.reason,
                    "unreadable file moved to quarantine"
                ),
                Err(e) => warn!(
                    file = %damaged.path.display(),
                    reason = %damaged.reason,
                    error = %e,
                    "unreadable file could not be moved to quarantine; it is ignored"
                ),
            }
        }
        for temp in &recovered.temp_files {
            match fs::remove_file(temp) {
                Ok(()) => {
                    debug!(file = %temp.display(), "removed a temporary file left by an interrupted write")
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(file = %temp.display(), error = %e, "cannot remove a temporary file")
                }
            }
        }
        for id in &recovered.missing {
            warn!(job_id = %id, "queue.json names a job that has no job file; dropped");
        }
        self.write_queue_file()?;
        fsio::sync_dir(&self.jobs_dir)?;
        fsio::sync_dir(&quarantine)?;
        Ok(())
    }

    fn run(mut self, inbox: mpsc::Receiver<Request>) {
        let mut batch = Vec::new();
        loop {
            let first = if self.queue_dirty {
                let wait = self.queue_due().saturating_duration_since(Instant::now());
                match inbox.recv_timeout(wait) {
                    Ok(request) => request,
                    Err(RecvTimeoutError::Timeout) => {
                        self.flush_queue_file();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match inbox.recv() {
                    Ok(request) => request,
                    Err(_) => break,
                }
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match inbox.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            let result = match &self.broken {
                Some(reason) => Err(StoreError::Fatal(reason.clone())),
                None => self.write_batch(&mut batch),
            };
            for request in batch.drain(..) {
                // A requester that went away no longer needs the answer.
                let _ = request.respond_to.send(result.clone());
            }
            if self.queue_dirty && Instant::now() >= self.queue_due() {
                self.flush_queue_file();
            }
        }
        if self.queue_dirty {
            self.flush_queue_file();
        }
        debug!("store stopped: every handle is gone");
    }

    /// When `queue.json` may be rewritten next.
    fn queue_due(&self) -> Instant {
        let delay = QUEUE_FILE_MIN_DELAY.max(self.queue_cost * QUEUE_FILE_COST_FACTOR);
        self.queue_written_at + delay
    }

    /// Rewrites `queue.json` from the mirror. A refused write is retried at the next due
    /// time; a failed fsync is fatal like any other.
    fn flush_queue_file(&mut self) {
        if self.broken.is_some() {
            self.queue_dirty = false;
            return;
        }
        if let Err(e) = self.write_queue_file() {
            let _ = self.fail(e);
            // Refused (a full disk, say): try again in a second, not at the next due time,
            // which may be milliseconds away.
            self.queue_written_at = Instant::now() + QUEUE_FILE_RETRY;
        }
    }

    fn write_queue_file(&mut self) -> Result<(), WriteError> {
        let started = Instant::now();
        fsio::write_atomic(&self.data_dir, QUEUE_FILE, &self.queue.to_bytes())?;
        self.queue_dirty = false;
        self.queue_written_at = Instant::now();
        self.queue_cost = started.elapsed();
        Ok(())
    }

    /// Makes every job record of the batch durable, or none of them.
    fn write_batch(&mut self, batch: &mut [Request]) -> Result<(), StoreError> {
        // The last record of a job in the batch is the one that counts. The records are
        // taken out of the requests, not copied: the staging threads share them.
        let mut index: HashMap<JobId, usize> = HashMap::new();
        let mut changes: Vec<Change> = Vec::new();
        for change in batch.iter_mut().flat_map(|r| r.changes.drain(..)) {
            match index.get(&change.job.id) {
                Some(&i) => changes[i] = change,
                None => {
                    index.insert(change.job.id, changes.len());
                    changes.push(change);
                }
            }
        }
        let started = Instant::now();
        if changes.is_empty() {
            self.rerank(batch);
            return Ok(());
        }
        let placements: Vec<(JobId, Placement)> =
            changes.iter().map(|c| (c.job.id, c.placement)).collect();

        let staged = match self.pool.stage_all(&self.jobs_dir, changes, self.sync) {
            Ok(staged) => staged,
            Err(e) => return Err(self.fail(e)),
        };
        for (i, s) in staged.iter().enumerate() {
            if let Err(e) = fsio::publish(s) {
                let error = self.fail(e);
                return Err(if i == 0 {
                    error
                } else {
                    error.outcome_unknown()
                });
            }
        }
        if let Err(e) = fsio::sync_dir(&self.jobs_dir) {
            return Err(self.fail(e).outcome_unknown());
        }
        for (id, placement) in &placements {
            let old = self.queue.place(*id, *placement);
            self.queue_dirty |= old != *placement;
        }
        self.rerank(batch);
        METRICS.batch_jobs.observe(placements.len() as f64);
        METRICS.flush.observe_duration(started.elapsed());
        debug!(
            requests = batch.len(),
            jobs = placements.len(),
            "batch durable"
        );
        Ok(())
    }

    /// Applies the batch's re-rankings to the jobs the mirror holds as queued.
    fn rerank(&mut self, batch: &[Request]) {
        for (id, rank) in batch.iter().flat_map(|r| &r.ranks) {
            if matches!(self.queue.placed.get(id), Some(Placement::Queued(_))) {
                let old = self.queue.place(*id, Placement::Queued(*rank));
                self.queue_dirty |= old != Placement::Queued(*rank);
            }
        }
    }

    fn fail(&mut self, e: WriteError) -> StoreError {
        if !e.is_fatal() {
            METRICS.store_refusals.inc();
            warn!(error = %e, "write failed; nothing was stored");
            return StoreError::Unavailable(e.to_string());
        }
        error!(error = %e, "storage failed in a way that cannot be retried safely; stopping so that a restart replays from disk");
        self.broken = Some(e.to_string());
        self.fatal.cancel();
        StoreError::Fatal(e.to_string())
    }
}

/// The threads that stage a batch's files, started as batches first need them and kept for
/// the store's life (spawning them for every batch was a tenth of the daemon's CPU time).
/// Each takes its share of a batch over its own channel and answers on the batch's; they
/// end when the pool is dropped.
#[derive(Default)]
struct StagePool {
    threads: Vec<mpsc::Sender<StageTask>>,
}

/// One thread's share of a batch: `changes[range]`.
struct StageTask {
    changes: Arc<Vec<Change>>,
    range: std::ops::Range<usize>,
    jobs_dir: Arc<Path>,
    sync: SyncMode,
    /// The share's number, and its results in order.
    done: mpsc::Sender<(usize, Vec<Result<Staged, WriteError>>)>,
    share: usize,
}

impl StageTask {
    fn run(self) {
        let results = self.changes[self.range.clone()]
            .iter()
            .map(|change| stage(&self.jobs_dir, change, self.sync))
            .collect();
        // The store waits for every share; it is gone only if it panicked.
        let _ = self.done.send((self.share, results));
    }
}

/// Writes a change's job file to its temporary name; fsyncs it unless the batch is made
/// durable by one syncfs.
fn stage(jobs_dir: &Path, change: &Change, sync: SyncMode) -> Result<Staged, WriteError> {
    let name = format!("{}.json", change.job.id);
    let bytes = change.job.to_file_bytes();
    match sync {
        SyncMode::Fsync => fsio::stage(jobs_dir, &name, &bytes),
        SyncMode::Syncfs => fsio::stage_unsynced(jobs_dir, &name, &bytes),
    }
}

impl StagePool {
    /// At least `wanted` threads, as far as the system gives them; returns how many there are.
    fn grow(&mut self, wanted: usize) -> usize {
        while self.threads.len() < wanted {
            let (tasks, inbox) = mpsc::channel::<StageTask>();
            let spawned = thread::Builder::new()
                .name("store-stage".into())
                .spawn(move || {
                    for task in inbox {
                        task.run();
                    }
                });
            match spawned {
                Ok(_) => self.threads.push(tasks),
                Err(e) => {
                    warn!(error = %e, threads = self.threads.len(), "cannot start another staging thread; staging with fewer");
                    break;
                }
            }
        }
        self.threads.len()
    }

    /// Stages every change's job file, in parallel when there are several, and makes them
    /// durable: each by its own fsync, or all by one syncfs. On any error the files already
    /// staged are removed and the first error is returned, a fatal one first.
    fn stage_all(
        &mut self,
        jobs_dir: &Path,
        changes: Vec<Change>,
        sync: SyncMode,
    ) -> Result<Vec<Staged>, WriteError> {
        // Without a per-file fsync there is nothing to overlap but CPU work, and the HTTP
        // side needs the cores: the store thread stages a syncfs batch by itself.
        let threads = if changes.len() <= STAGE_ALONE || sync == SyncMode::Syncfs {
            0
        } else {
            self.grow(changes.len().min(STAGE_THREADS))
        };
        let results: Vec<Result<Staged, WriteError>> = if threads == 0 {
            changes.iter().map(|c| stage(jobs_dir, c, sync)).collect()
        } else {
            let per_thread = changes.len().div_ceil(threads);
            let count = changes.len();
            let changes = Arc::new(changes);
            let jobs_dir: Arc<Path> = Arc::from(jobs_dir);
            let (done, answers) = mpsc::channel();
            let mut shares = 0;
            for (share, start) in (0..count).step_by(per_thread).enumerate() {
                let task = StageTask {
                    changes: Arc::clone(&changes),
                    range: start..count.min(start + per_thread),
                    jobs_dir: Arc::clone(&jobs_dir),
                    sync,
                    done: done.clone(),
                    share,
                };
                // A thread that has ended (it panicked) hands its task back: run it here.
                if let Err(mpsc::SendError(task)) = self.threads[share].send(task) {
                    task.run();
                }
                shares += 1;
            }
            drop(done);
            let mut by_share: Vec<Vec<Result<Staged, WriteError>>> =
                (0..shares).map(|_| Vec::new()).collect();
            for _ in 0..shares {
                let (share, results) = answers.recv().expect("staging a file does not panic");
                by_share[share] = results;
            }
            by_share.into_iter().flatten().collect()
        };
        let mut staged = Vec::with_capacity(results.len());
        let mut first_error: Option<WriteError> = None;
        for result in results {
            match result {
                Ok(s) => staged.push(s),
                Err(e) => {
                    let replace = match &first_error {
                        None => true,
                        Some(prev) => e.is_fatal() && !prev.is_fatal(),
                    };
                    if replace {
                        first_error = Some(e);
                    }
                }
            }
        }
        if first_error.is_none()
            && sync == SyncMode::Syncfs
            && let Err(e) = fsio::sync_filesystem(jobs_dir)
        {
            first_error = Some(e);
        }
        match first_error {
            None => Ok(staged),
            Some(e) => {
                for s in staged {
                    fsio::discard(s);
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Status;

    fn job(n: u128) -> Job {
        crate::job::sample_job(n)
    }

    fn queue_file(dir: &Path) -> QueueFile {
        serde_json::from_slice(&fs::read(dir.join(QUEUE_FILE)).unwrap()).unwrap()
    }

    /// queue.json follows the commits shortly; waits until it says `running` and `queued`.
    fn queue_file_becomes(dir: &Path, running: &[JobId], queued: &[JobId]) {
        let expected = QueueFile {
            running: running.iter().map(|id| id.to_string()).collect(),
            queued: queued.iter().map(|id| id.to_string()).collect(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = queue_file(dir);
            if now == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "queue.json is {now:?}, expected {expected:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[tokio::test]
    async fn commits_are_durable_files_and_queue_json_follows() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Store::open(dir.path(), CancellationToken::new()).unwrap();
        let store = opened.handle.clone();
        let (a, b) = (job(1), job(2));
        store
            .commit(vec![
                Change {
                    job: a.clone(),
                    placement: Placement::Queued(0),
                },
                Change {
                    job: b.clone(),
                    placement: Placement::Queued(1),
                },
            ])
            .await
            .unwrap();
        // Both files are durable when commit returns; queue.json follows.
        for id in [a.id, b.id] {
            assert!(
                dir.path()
                    .join(JOBS_DIR)
                    .join(format!("{id}.json"))
                    .exists()
            );
        }
        queue_file_becomes(dir.path(), &[], &[a.id, b.id]);
        let mut running = b.clone();
        running.start(chrono::Utc::now(), None);
        store
            .commit(vec![Change {
                job: running,
                placement: Placement::Running(0),
            }])
            .await
            .unwrap();
        queue_file_becomes(dir.path(), &[b.id], &[a.id]);
        let stored: serde_json::Value = serde_json::from_slice(
            &fs::read(dir.path().join(JOBS_DIR).join(format!("{}.json", b.id))).unwrap(),
        )
        .unwrap();
        assert_eq!(Job::from_stored(stored).unwrap().status, Status::Running);
        drop((store, opened.handle));
        opened.thread.join().unwrap();
        let rec = replay::replay(dir.path()).unwrap();
        assert_eq!(rec.order, vec![b.id, a.id]);
    }

    #[tokio::test]
    async fn rerank_moves_queued_jobs_without_writing_them_and_never_revives_a_finished_one() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Store::open(dir.path(), CancellationToken::new()).unwrap();
        let store = opened.handle.clone();
        let (a, b) = (job(1), job(2));
        let mut done = job(3);
        done.finish(Status::Completed, None, chrono::Utc::now());
        let changes = [
            (&a, Placement::Queued(10)),
            (&b, Placement::Queued(11)),
            (&done, Placement::Off),
        ];
        store
            .commit(
                changes
                    .iter()
                    .map(|(job, placement)| Change {
                        job: (*job).clone(),
                        placement: *placement,
                    })
                    .collect(),
            )
            .await
            .unwrap();
        queue_file_becomes(dir.path(), &[], &[a.id, b.id]);
        let file_of = |id: JobId| dir.path().join(JOBS_DIR).join(format!("{id}.json"));
        // Every write replaces the file by a rename, so a rewritten file has a new inode.
        use std::os::unix::fs::MetadataExt;
        let inode = fs::metadata(file_of(a.id)).unwrap().ino();
        store.rerank(vec![(a.id, 12), (done.id, 1)]).await.unwrap();
        queue_file_becomes(dir.path(), &[], &[b.id, a.id]);
        assert_eq!(
            fs::metadata(file_of(a.id)).unwrap().ino(),
            inode,
            "a rerank writes no job file"
        );
        drop((store, opened.handle));
        opened.thread.join().unwrap();
    }

    /// Commits jobs 0..n from n concurrent tasks, each its own request, stops the store, and
    /// checks that every job landed, in order, with nothing left over.
    async fn commit_concurrently_and_stop(sync: SyncMode, n: u64) {
        let dir = tempfile::tempdir().unwrap();
        let opened = Store::open_with(dir.path(), CancellationToken::new(), sync).unwrap();
        let mut tasks = Vec::new();
        for k in 0..n {
            let store = opened.handle.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .commit(vec![Change {
                        job: job(k as u128),
                        placement: Placement::Queued(k),
                    }])
                    .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // When the store stops, queue.json is brought up to date before the thread ends.
        drop(opened.handle);
        opened.thread.join().unwrap();
        let expected: Vec<String> = (0..n as u128).map(|k| job(k).id.to_string()).collect();
        assert_eq!(queue_file(dir.path()).queued, expected);
        let rec = replay::replay(dir.path()).unwrap();
        assert_eq!(rec.jobs.len(), n as usize);
        assert!(rec.temp_files.is_empty() && rec.damaged.is_empty());
    }

    #[tokio::test]
    async fn concurrent_commits_all_land() {
        commit_concurrently_and_stop(SyncMode::Fsync, 200).await;
    }

    #[tokio::test]
    async fn a_syncfs_store_commits_the_same_way() {
        commit_concurrently_and_stop(SyncMode::Syncfs, 50).await;
    }

    #[tokio::test]
    async fn a_failed_write_changes_nothing_and_later_writes_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let fatal = CancellationToken::new();
        let opened = Store::open(dir.path(), fatal.clone()).unwrap();
        let store = opened.handle.clone();
        store
            .commit(vec![Change {
                job: job(1),
                placement: Placement::Queued(0),
            }])
            .await
            .unwrap();
        // Make the jobs directory unwritable by replacing it with a file for a moment.
        let jobs = dir.path().join(JOBS_DIR);
        let aside = dir.path().join("jobs-aside");
        fs::rename(&jobs, &aside).unwrap();
        fs::write(&jobs, b"not a dir").unwrap();
        let err = store
            .commit(vec![Change {
                job: job(2),
                placement: Placement::Queued(1),
            }])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(!fatal.is_cancelled());
        fs::remove_file(&jobs).unwrap();
        fs::rename(&aside, &jobs).unwrap();
        // The failed job left no trace, in the files or in queue.json.
        queue_file_becomes(dir.path(), &[], &[job(1).id]);
        assert!(!jobs.join(format!("{}.json", job(2).id)).exists());
        store
            .commit(vec![Change {
                job: job(3),
                placement: Placement::Queued(2),
            }])
            .await
            .unwrap();
        queue_file_becomes(dir.path(), &[], &[job(1).id, job(3).id]);
        let names: Vec<String> = fs::read_dir(&jobs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
    }

    #[test]
    fn open_quarantines_and_cleans() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(JOBS_DIR)).unwrap();
        fs::write(dir.path().join(JOBS_DIR).join("bad.json"), b"{").unwrap();
        fs::write(
            dir.path().join(JOBS_DIR).join(fsio::temp_name("x.json")),
            b"{",
        )
        .unwrap();
        fs::write(dir.path().join(QUEUE_FILE), b"[").unwrap();
        let opened = Store::open(dir.path(), CancellationToken::new()).unwrap();
        assert_eq!(opened.recovered.damaged.len(), 2);
        let jobs: Vec<_> = fs::read_dir(dir.path().join(JOBS_DIR)).unwrap().collect();
        assert!(jobs.is_empty());
        let quarantined: Vec<String> = fs::read_dir(dir.path().join(QUARANTINE_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(quarantined.len(), 2, "{quarantined:?}");
        assert!(quarantined.iter().any(|n| n.ends_with("-bad.json")));
        assert!(quarantined.iter().any(|n| n.ends_with("-queue.json")));
        assert_eq!(queue_file(dir.path()), QueueFile::default());
    }
}
