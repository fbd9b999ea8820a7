//! The file store: the only code that writes the data dir's job state.
//!
//! [`Store::open`] replays the data dir, cleans it (damaged files to `quarantine/`, leftover
//! temporary files removed, `queue.json` rewritten), and starts the persistence thread. The
//! worker talks to it through the store's boundary, a [`StoreHandle`], with one call,
//! [`StoreHandle::commit`]: a set of job records and their places in the queue, answered
//! once they are durable.
//!
//! Group commit, pipelined: a request's job files are staged as soon as it arrives, each
//! written to a temporary file and fsynced by one of up to 16 staging threads the store keeps
//! (the device serves many fsyncs at once). Whenever the thread has taken everything waiting
//! in its inbox, the requests whose files are all staged, in arrival order up to the first
//! one still being staged, are committed as one group: the renames, one fsync of the
//! directory, and only then the answers. So a job never becomes durable before one that
//! arrived ahead of it, the fsyncs of newer requests go on during a commit, and under load a
//! group grows, so the cost per job falls. With `sync = "syncfs"` the store thread writes a
//! group's files itself when it commits them, without fsync, and one syncfs makes them
//! durable before the renames.
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
pub mod replay;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::{Change, FIRST_QUEUED_RANK, Placement, StoreError, StoreHandle};
use crate::config::SyncMode;
use crate::job::JobId;
use crate::layout::{JOBS_DIR, LOGS_DIR, QUARANTINE_DIR, QUEUE_FILE};
use crate::metrics::METRICS;
use fsio::{Staged, WriteError};
pub use replay::{Damaged, QueueFile, Recovered};

/// Events the thread takes before it commits what is ready: requests waiting beyond this many
/// are left for the next turn, which bounds a group's memory and the latency of its first
/// request.
const MAX_BATCH: usize = 4096;

/// Requests that may wait for the store at once; further commits wait for a slot, which is
/// how a slow disk pushes back on clients.
const INBOX_SLOTS: usize = 4096;

/// Threads that stage job files when each is fsynced. fsync waits for the device, not the
/// CPU, and the device serves many at once, so this is more than the cores.
const STAGE_THREADS: usize = 16;

/// At most this many files, arriving while nothing else is being written, are staged by the
/// store thread itself.
const STAGE_ALONE: usize = 2;

/// How long to wait before rewriting `queue.json` again after the storage refused it.
const QUEUE_FILE_RETRY: Duration = Duration::from_secs(1);

/// The shortest time between two rewrites of `queue.json`.
pub const QUEUE_FILE_MIN_DELAY: Duration = Duration::from_millis(10);

/// `queue.json` waits at least this many times as long as its last rewrite took, so that
/// rewriting it costs at most about 1/20 of the store's time however long the queue is.
const QUEUE_FILE_COST_FACTOR: u32 = 20;

struct Request {
    changes: Vec<Change>,
    /// Queued jobs re-ranked without a write of their files; see [`StoreHandle::rerank`].
    ranks: Vec<(JobId, u64)>,
    respond_to: oneshot::Sender<Result<(), StoreError>>,
    /// Held until the request is answered.
    _slot: OwnedSemaphorePermit,
}

/// What reaches the persistence thread, in one channel so that it waits on one thing.
enum Event {
    Request(Request),
    /// A staging thread has written one change of a request.
    Staged {
        request: u64,
        change: usize,
        result: Result<Staged, WriteError>,
    },
    /// The last handle is gone: answer what was sent, then stop.
    Closed,
}

/// The way into the persistence thread, shared by every clone of a [`StoreHandle`]; when the
/// last one goes, it tells the thread.
#[derive(Debug)]
struct Inbox {
    /// A std channel, so that the thread can wait with a timeout (for `queue.json`); it is
    /// bounded by `slots`, and sending on it never blocks.
    events: mpsc::Sender<Event>,
    slots: Arc<Semaphore>,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let _ = self.events.send(Event::Closed);
    }
}

/// The cloneable way to the persistence thread, behind a [`StoreHandle`]. The thread ends
/// when every handle is gone, after it has answered everything sent to it.
#[derive(Clone, Debug)]
pub(crate) struct Handle {
    inbox: Arc<Inbox>,
}

impl Handle {
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
            .inbox
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let (respond_to, answer) = oneshot::channel();
        self.inbox
            .events
            .send(Event::Request(Request {
                changes,
                ranks,
                respond_to,
                _slot: slot,
            }))
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
        let (events, inbox) = mpsc::channel();
        let jobs_dir: Arc<Path> = data_dir.join(JOBS_DIR).into();
        let mut thread_state = Persister {
            jobs_dir: Arc::clone(&jobs_dir),
            data_dir,
            queue,
            queue_dirty: false,
            unlisted_since_write: HashSet::new(),
            queue_written_at: Instant::now(),
            queue_cost: Duration::ZERO,
            sync,
            fatal,
            broken: None,
            pending: BTreeMap::new(),
            next_request: 0,
            writing: HashSet::new(),
            deferred: VecDeque::new(),
            pool: StagePool::new(Arc::clone(&jobs_dir), events.clone()),
        };
        thread_state
            .clean(&recovered)
            .map_err(|e| OpenError(e.to_string()))?;
        let thread = thread::Builder::new()
            .name("store".into())
            .spawn(move || thread_state.run(inbox))
            .map_err(|e| OpenError(format!("cannot start the store thread: {e}")))?;
        Ok(Opened {
            handle: StoreHandle::files(Handle {
                inbox: Arc::new(Inbox {
                    events,
                    slots: Arc::new(Semaphore::new(INBOX_SLOTS)),
                }),
            }),
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

/// A request whose job files are being staged, or are staged and wait for the next commit.
struct Pending {
    /// The request's changes, the last record of each job only.
    changes: Arc<Vec<Change>>,
    /// Each change's staged file, as the staging threads report them.
    staged: Vec<Option<Result<Staged, WriteError>>>,
    /// Changes not staged yet.
    outstanding: usize,
    ranks: Vec<(JobId, u64)>,
    respond_to: oneshot::Sender<Result<(), StoreError>>,
    _slot: OwnedSemaphorePermit,
    arrived: Instant,
}

/// The persistence thread's state.
struct Persister {
    data_dir: PathBuf,
    jobs_dir: Arc<Path>,
    queue: QueueMirror,
    /// The mirror changed since `queue.json` was last written.
    queue_dirty: bool,
    /// Jobs taken off the queue (finished) since `queue.json` was last written: the file on
    /// disk may still list them at the places they had. Before such a job is placed again
    /// (a retry), `queue.json` is rewritten, so that a crash cannot leave a file that names
    /// the job queued again at its old place; see [`Persister::unlist_revived`].
    unlisted_since_write: HashSet<JobId>,
    queue_written_at: Instant,
    /// How long the last rewrite of `queue.json` took.
    queue_cost: Duration,
    /// How a batch's files are made durable before their renames.
    sync: SyncMode,
    /// Cancelled on a fatal write error, which makes the daemon exit 74.
    fatal: CancellationToken,
    /// Set after a fatal error: every later request is refused with it.
    broken: Option<String>,
    /// Requests being staged or staged, by arrival.
    pending: BTreeMap<u64, Pending>,
    next_request: u64,
    /// The jobs of the pending requests. A request about one of them waits in `deferred`
    /// until that record is committed, so each job's records reach the disk in order and
    /// never share a temporary file.
    writing: HashSet<JobId>,
    deferred: VecDeque<Request>,
    /// The threads that stage job files.
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

    /// The thread's loop. A request's job files are staged as soon as it arrives (by the
    /// staging threads, each file fsynced; or, with syncfs, written here); whenever the
    /// thread has taken everything waiting for it, every request whose files are all staged
    /// is committed as one group: renamed into place, one fsync of `jobs/`, answered. So the
    /// fsyncs of new requests go on while a group is committed, and under load a group
    /// grows, which makes the cost per job fall.
    fn run(mut self, inbox: mpsc::Receiver<Event>) {
        let mut closed = false;
        loop {
            if closed && self.pending.is_empty() && self.deferred.is_empty() {
                break;
            }
            let first = if self.queue_dirty {
                let wait = self.queue_due().saturating_duration_since(Instant::now());
                match inbox.recv_timeout(wait) {
                    Ok(event) => event,
                    Err(RecvTimeoutError::Timeout) => {
                        self.flush_queue_file();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match inbox.recv() {
                    Ok(event) => event,
                    Err(_) => break,
                }
            };
            let mut turn = vec![first];
            while turn.len() < MAX_BATCH {
                match inbox.try_recv() {
                    Ok(event) => turn.push(event),
                    Err(_) => break,
                }
            }
            // A few files while nothing else is being written are staged here, as a
            // sequence of single requests always was: handing them to another thread would
            // cost more than it overlaps, and it keeps every write of a light load on this
            // thread (the crash-point tests count system calls per thread).
            let changes: usize = turn
                .iter()
                .map(|e| match e {
                    Event::Request(r) => r.changes.len(),
                    _ => 0,
                })
                .sum();
            let alone =
                changes <= STAGE_ALONE && self.pending.is_empty() && self.pool.in_flight == 0;
            for event in turn {
                closed |= self.take(event, alone);
            }
            self.commit_ready();
            if self.queue_dirty && Instant::now() >= self.queue_due() {
                self.flush_queue_file();
            }
        }
        if self.queue_dirty {
            self.flush_queue_file();
        }
        debug!("store stopped: every handle is gone");
    }

    /// Takes one event; true when it says that every handle is gone. `alone`: stage a
    /// request's files on this thread.
    fn take(&mut self, event: Event, alone: bool) -> bool {
        match event {
            Event::Request(request) => self.accept(request, alone),
            Event::Staged {
                request,
                change,
                result,
            } => {
                self.pool.in_flight -= 1;
                let pending = self
                    .pending
                    .get_mut(&request)
                    .expect("a staged file belongs to a pending request");
                pending.staged[change] = Some(result);
                pending.outstanding -= 1;
            }
            Event::Closed => return true,
        }
        false
    }

    /// Starts staging a request's files (here when `alone`, else by the staging threads),
    /// unless the store is broken (refused at once) or a record of one of its jobs is still
    /// pending (it waits for that one).
    fn accept(&mut self, mut request: Request, alone: bool) {
        if let Some(reason) = &self.broken {
            let _ = request
                .respond_to
                .send(Err(StoreError::Fatal(reason.clone())));
            return;
        }
        // The last record of a job in the request is the one that counts. (An enqueue has
        // one record, and nothing to merge.)
        if request.changes.len() > 1 {
            let mut index: HashMap<JobId, usize> = HashMap::new();
            let mut changes: Vec<Change> = Vec::with_capacity(request.changes.len());
            for change in request.changes.drain(..) {
                match index.get(&change.job.id) {
                    Some(&i) => changes[i] = change,
                    None => {
                        index.insert(change.job.id, changes.len());
                        changes.push(change);
                    }
                }
            }
            request.changes = changes;
        }
        if request
            .changes
            .iter()
            .any(|c| self.writing.contains(&c.job.id))
        {
            self.deferred.push_back(request);
            return;
        }
        let number = self.next_request;
        self.next_request += 1;
        let count = request.changes.len();
        self.writing
            .extend(request.changes.iter().map(|c| c.job.id));
        let changes = Arc::new(request.changes);
        let mut staged: Vec<Option<Result<Staged, WriteError>>> =
            (0..count).map(|_| None).collect();
        let mut outstanding = count;
        if alone && self.sync == SyncMode::Fsync {
            for (slot, change) in staged.iter_mut().zip(changes.iter()) {
                *slot = Some(stage(&self.jobs_dir, change, self.sync));
            }
        }
        let handed = !alone
            && self.sync == SyncMode::Fsync
            && count > 0
            && self.pool.stage(number, &changes);
        if !handed {
            // Without a per-file fsync there is nothing to overlap but CPU work, which the
            // HTTP side needs too: the store thread writes these files itself, when it
            // commits them (and any file, should no staging thread start).
            outstanding = 0;
        }
        self.pending.insert(
            number,
            Pending {
                changes,
                staged,
                outstanding,
                ranks: request.ranks,
                respond_to: request.respond_to,
                _slot: request._slot,
                arrived: Instant::now(),
            },
        );
    }

    /// Commits the requests whose files are all staged, in arrival order, as one group, and
    /// starts the deferred requests that no longer wait; again while that leaves some ready.
    fn commit_ready(&mut self) {
        loop {
            // In arrival order only, up to the first request still being staged: a job must not
            // become durable (and reach queue.json) before one that arrived ahead of it,
            // since replay places the queued jobs queue.json does not name after those it
            // does.
            let ready: Vec<u64> = self
                .pending
                .iter()
                .take_while(|(_, p)| p.outstanding == 0)
                .map(|(number, _)| *number)
                .collect();
            if ready.is_empty() {
                return;
            }

            let group: Vec<Pending> = ready
                .iter()
                .filter_map(|number| self.pending.remove(number))
                .collect();
            let done: Vec<JobId> = group
                .iter()
                .flat_map(|p| p.changes.iter().map(|c| c.job.id))
                .collect();
            self.commit(group);
            for id in done {
                self.writing.remove(&id);
            }
            for request in std::mem::take(&mut self.deferred) {
                self.accept(request, false);
            }
        }
    }

    /// Makes a group of staged requests durable and answers them. A request with a file
    /// that could not be staged is refused alone (its other files removed); after a fatal
    /// error every request is refused.
    fn commit(&mut self, group: Vec<Pending>) {
        let oldest = group.iter().map(|p| p.arrived).min();
        let mut ready: Vec<(Pending, Vec<Staged>)> = Vec::with_capacity(group.len());
        for mut pending in group {
            for (slot, change) in pending.staged.iter_mut().zip(pending.changes.iter()) {
                if slot.is_none() && self.broken.is_none() {
                    *slot = Some(stage(&self.jobs_dir, change, self.sync));
                }
            }
            let mut files = Vec::with_capacity(pending.staged.len());
            let mut first_error: Option<WriteError> = None;
            for result in pending.staged.drain(..).flatten() {
                match result {
                    Ok(file) => files.push(file),
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
            match first_error {
                None => ready.push((pending, files)),
                Some(e) => {
                    for file in files {
                        fsio::discard(file);
                    }
                    let error = self.fail(e);
                    let _ = pending.respond_to.send(Err(error));
                }
            }
        }
        let answer = |ready: Vec<(Pending, Vec<Staged>)>, result: Result<(), StoreError>| {
            for (pending, _) in ready {
                let _ = pending.respond_to.send(result.clone());
            }
        };
        if let Some(reason) = &self.broken {
            for file in ready.iter_mut().flat_map(|(_, files)| files.drain(..)) {
                fsio::discard(file);
            }
            let error = StoreError::Fatal(reason.clone());
            answer(ready, Err(error));
            return;
        }
        let mut ready = self.unlist_revived(ready);
        let jobs: usize = ready.iter().map(|(_, files)| files.len()).sum();
        if jobs > 0 {
            if self.sync == SyncMode::Syncfs
                && let Err(e) = fsio::sync_filesystem(&self.jobs_dir)
            {
                for file in ready.iter_mut().flat_map(|(_, files)| files.drain(..)) {
                    fsio::discard(file);
                }
                let error = self.fail(e);
                answer(ready, Err(error));
                return;
            }
            for (renamed, file) in ready.iter().flat_map(|(_, files)| files).enumerate() {
                if let Err(e) = fsio::publish(file) {
                    let error = self.fail(e);
                    let error = if renamed == 0 {
                        error
                    } else {
                        error.outcome_unknown()
                    };
                    answer(ready, Err(error));
                    return;
                }
            }
            if let Err(e) = fsio::sync_dir(&self.jobs_dir) {
                let error = self.fail(e).outcome_unknown();
                answer(ready, Err(error));
                return;
            }
        }
        for (pending, _) in &ready {
            for change in pending.changes.iter() {
                let old = self.queue.place(change.job.id, change.placement);
                self.queue_dirty |= old != change.placement;
                if old != Placement::Off && change.placement == Placement::Off {
                    self.unlisted_since_write.insert(change.job.id);
                }
            }
            self.rerank(&pending.ranks);
        }
        if jobs > 0 {
            METRICS.batch_jobs.observe(jobs as f64);
            if let Some(oldest) = oldest {
                METRICS.flush.observe_duration(oldest.elapsed());
            }
            debug!(requests = ready.len(), jobs, "batch durable");
        }
        answer(ready, Ok(()));
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
            if e.is_refusal() {
                // queue.json is derived and the old one stays in place: a refused rename
                // (the filesystem went read-only, say) is retried like a refused write.
                METRICS.store_refusals.inc();
                warn!(error = %e, "cannot rewrite queue.json; will retry");
            } else {
                let _ = self.fail(e);
            }
            // Refused (a full disk, say): try again in a second, not at the next due time,
            // which may be milliseconds away.
            self.queue_written_at = Instant::now() + QUEUE_FILE_RETRY;
        }
    }

    /// A job placed in the queue again after it finished (a retry) must not become durable
    /// while `queue.json` on disk may still list it at its old place: replay takes a queued
    /// job named there at that place, so a crash would put the retried job back ahead of the
    /// jobs queued before its retry. So `queue.json` is rewritten first (from the mirror,
    /// which has the job off the queue), and the job file, renamed after it, is one that
    /// `queue.json` does not name, which replay places by `created_at`: last. The requests of
    /// such jobs are refused if that write is; the others of the group go on, unless the
    /// error was fatal.
    fn unlist_revived(
        &mut self,
        ready: Vec<(Pending, Vec<Staged>)>,
    ) -> Vec<(Pending, Vec<Staged>)> {
        let revives = |pending: &Pending, stale: &HashSet<JobId>| {
            pending
                .changes
                .iter()
                .any(|c| c.placement != Placement::Off && stale.contains(&c.job.id))
        };
        if self.broken.is_some()
            || !ready
                .iter()
                .any(|(p, _)| revives(p, &self.unlisted_since_write))
        {
            return ready;
        }
        let Err(e) = self.write_queue_file() else {
            return ready;
        };
        let error = self.fail(e);
        // After a fatal error nothing more is written.
        let fatal = self.broken.is_some();
        let (refused, kept): (Vec<_>, Vec<_>) = ready
            .into_iter()
            .partition(|(p, _)| fatal || revives(p, &self.unlisted_since_write));
        for (pending, files) in refused {
            for file in files {
                fsio::discard(file);
            }
            let _ = pending.respond_to.send(Err(error.clone()));
        }
        kept
    }

    fn write_queue_file(&mut self) -> Result<(), WriteError> {
        let started = Instant::now();
        fsio::write_atomic(&self.data_dir, QUEUE_FILE, &self.queue.to_bytes())?;
        self.unlisted_since_write.clear();
        self.queue_dirty = false;
        self.queue_written_at = Instant::now();
        self.queue_cost = started.elapsed();
        Ok(())
    }

    /// Applies re-rankings to the jobs the mirror holds as queued.
    fn rerank(&mut self, ranks: &[(JobId, u64)]) {
        for (id, rank) in ranks {
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

/// The threads that stage job files with an fsync each, started as the load first needs
/// them and kept for the store's life (spawning them for every batch was a tenth of the
/// daemon's CPU time). They take one file at a time from a shared queue and report it on
/// the store's channel; they end when the pool is dropped.
struct StagePool {
    jobs_dir: Arc<Path>,
    /// Where the threads report, the store thread's own channel.
    events: mpsc::Sender<Event>,
    /// The shared queue, made with the first thread; the pool holds both ends, so sending
    /// on it cannot fail.
    queue: Option<(mpsc::Sender<StageTask>, SharedTasks)>,
    threads: usize,
    /// Files handed out and not reported yet.
    in_flight: usize,
}

/// The receiving end of the staging queue, shared by the staging threads.
type SharedTasks = Arc<Mutex<mpsc::Receiver<StageTask>>>;

/// One change of a request to stage: `changes[change]`.
struct StageTask {
    request: u64,
    change: usize,
    changes: Arc<Vec<Change>>,
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
    fn new(jobs_dir: Arc<Path>, events: mpsc::Sender<Event>) -> StagePool {
        StagePool {
            jobs_dir,
            events,
            queue: None,
            threads: 0,
            in_flight: 0,
        }
    }

    /// Starts threads up to `wanted` (at most [`STAGE_THREADS`]), as far as the system gives
    /// them; returns how many there are.
    fn grow(&mut self, wanted: usize) -> usize {
        let wanted = wanted.min(STAGE_THREADS);
        while self.threads < wanted {
            let queue = Arc::clone(
                &self
                    .queue
                    .get_or_insert_with(|| {
                        let (tasks, queue) = mpsc::channel();
                        (tasks, Arc::new(Mutex::new(queue)))
                    })
                    .1,
            );
            let (jobs_dir, events) = (Arc::clone(&self.jobs_dir), self.events.clone());
            let spawned = thread::Builder::new()
                .name("store-stage".into())
                .spawn(move || {
                    loop {
                        let task = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(task) = task else { return };
                        let change = &task.changes[task.change];
                        let result =
                            std::panic::catch_unwind(|| stage(&jobs_dir, change, SyncMode::Fsync))
                                .unwrap_or_else(|_| {
                                    // Whether its file was written and fsynced is unknown: fatal,
                                    // like a failed fsync, so the daemon restarts and replays.
                                    Err(WriteError::Sync {
                                        path: jobs_dir.to_path_buf(),
                                        source: io::Error::other("staging a job file panicked"),
                                    })
                                });
                        // The store thread holds the channel open until every report is in.
                        let _ = events.send(Event::Staged {
                            request: task.request,
                            change: task.change,
                            result,
                        });
                    }
                });
            match spawned {
                Ok(_) => self.threads += 1,
                Err(e) => {
                    warn!(error = %e, threads = self.threads, "cannot start another staging thread; staging with fewer");
                    break;
                }
            }
        }
        self.threads
    }

    /// Hands every change of request `request` to the staging threads; false (nothing
    /// handed) when there are none.
    fn stage(&mut self, request: u64, changes: &Arc<Vec<Change>>) -> bool {
        if self.grow(self.in_flight + changes.len()) == 0 {
            return false;
        }
        let Some((tasks, _)) = &self.queue else {
            return false;
        };
        for change in 0..changes.len() {
            let task = StageTask {
                request,
                change,
                changes: Arc::clone(changes),
            };
            tasks
                .send(task)
                .expect("the pool holds the receiving end of its queue");
            self.in_flight += 1;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Job, Status};

    fn job(n: u128) -> Job {
        crate::job::sample_job(n)
    }

    fn change(job: &Job, placement: Placement) -> Change {
        Change {
            job: job.clone(),
            placement,
        }
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
                change(&a, Placement::Queued(0)),
                change(&b, Placement::Queued(1)),
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
            .commit(vec![change(&running, Placement::Running(0))])
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
    async fn a_job_queued_again_after_it_finished_is_never_left_at_its_old_place_in_queue_json() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Store::open(dir.path(), CancellationToken::new()).unwrap();
        let store = opened.handle.clone();
        let (a, b) = (job(1), job(2));
        store
            .commit(vec![
                change(&a, Placement::Queued(10)),
                change(&b, Placement::Queued(11)),
            ])
            .await
            .unwrap();
        queue_file_becomes(dir.path(), &[], &[a.id, b.id]);
        // a finishes, and is retried at once: before queue.json would follow the finish.
        let mut finished = a.clone();
        finished.finish(
            Status::Cancelled,
            Some("cancelled".into()),
            chrono::Utc::now(),
        );
        store
            .commit(vec![change(&finished, Placement::Off)])
            .await
            .unwrap();
        let mut retried = finished.clone();
        retried.retry(chrono::Utc::now());
        store
            .commit(vec![change(&retried, Placement::Queued(12))])
            .await
            .unwrap();
        // A crash now: queue.json must not name a at its old place ahead of b, and the job
        // files with it replay a after b.
        assert_ne!(
            queue_file(dir.path()).queued,
            [a.id.to_string(), b.id.to_string()]
        );
        assert_eq!(replay::replay(dir.path()).unwrap().order, vec![b.id, a.id]);
        queue_file_becomes(dir.path(), &[], &[b.id, a.id]);
        drop((store, opened.handle));
        opened.thread.join().unwrap();
    }

    #[tokio::test]
    async fn the_last_record_of_a_job_in_one_request_is_the_one_stored() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Store::open(dir.path(), CancellationToken::new()).unwrap();
        let store = opened.handle.clone();
        let (a, b) = (job(1), job(2));
        let mut running = a.clone();
        running.start(chrono::Utc::now(), None);
        store
            .commit(vec![
                change(&a, Placement::Queued(0)),
                change(&b, Placement::Queued(1)),
                change(&running, Placement::Running(0)),
            ])
            .await
            .unwrap();
        let stored: serde_json::Value = serde_json::from_slice(
            &fs::read(dir.path().join(JOBS_DIR).join(format!("{}.json", a.id))).unwrap(),
        )
        .unwrap();
        assert_eq!(Job::from_stored(stored).unwrap().status, Status::Running);
        queue_file_becomes(dir.path(), &[a.id], &[b.id]);
        drop((store, opened.handle));
        opened.thread.join().unwrap();
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
