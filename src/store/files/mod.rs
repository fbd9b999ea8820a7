//! The file store: the only code that writes the data dir's job state.
//!
//! [`Store::open`] replays the data dir (the job files, `queue.json`, then the journal's
//! records over them), cleans it (damaged files to `quarantine/`, leftover temporary files
//! removed), checkpoints what the journal held, and starts the persistence thread. The
//! worker talks to it through the store's boundary, a [`StoreHandle`], with one call,
//! [`StoreHandle::commit`]: a set of job records and their places in the queue, answered
//! once they are durable.
//!
//! Write-ahead journal, group commit: whenever the thread has taken everything waiting in
//! its inbox, it appends one record per request to the journal ([`journal`]) in one write,
//! flushes it with one fdatasync, and only then answers them all. Under load a group grows,
//! so the cost per job falls; a flush writes data only, since a segment is reused in place.
//!
//! The job files and `queue.json` follow: the thread cuts a checkpoint (the latest bytes of
//! every job changed since the last cut, the queue order, the segments written up to then)
//! and hands it to the checkpointer thread ([`checkpoint`]), which writes them with the one
//! atomic writer ([`fsio`]) and makes them durable; when it reports, this thread retires
//! those segments (so every journal call is this thread's) before the next cut. A cut is made
//! at once when no request came for [`IDLE_DELAY`], and under load once the last one has
//! been done for a while (from [`CHECKPOINT_MIN_INTERVAL`], growing with what a checkpoint
//! costs, to at most [`CHECKPOINT_MAX_INTERVAL`]), so that the files never lag by more
//! than about a second; and when the store stops. At most [`MAX_SEGMENTS`] segments exist:
//! when all of them wait for a checkpoint, the thread waits for it, which is how a slow
//! disk pushes back.
//!
//! Blocking I/O stays off the async runtime: the writes happen on this thread and the
//! checkpointer's, nowhere else.

pub mod checkpoint;
pub mod fsio;
pub mod journal;
pub mod replay;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{Change, FIRST_QUEUED_RANK, Placement, StoreError, StoreHandle};
use crate::config::SyncMode;
use crate::job::JobId;
use crate::layout::{JOBS_DIR, JOURNAL_DIR, LOGS_DIR, QUARANTINE_DIR};
use crate::metrics::METRICS;
use fsio::WriteError;
pub use replay::{Damaged, QueueFile, Recovered};

/// Events the thread takes before it appends what it has: requests waiting beyond this many
/// are left for the next turn, which bounds a group's memory and the latency of its first
/// request.
const MAX_BATCH: usize = 4096;

/// Requests that may wait for the store at once; further commits wait for a slot, which is
/// how a slow disk pushes back on clients.
const INBOX_SLOTS: usize = 4096;

/// A cut is made this long after the last request, when no other came meanwhile.
pub const IDLE_DELAY: Duration = Duration::from_millis(1);

/// Under load, the shortest time from the end of one checkpoint to the next cut.
pub const CHECKPOINT_MIN_INTERVAL: Duration = Duration::from_millis(20);

/// Under load, the longest; in between, twice what the last checkpoint took, so that
/// checkpoints take at most about a third of the checkpointer's time.
pub const CHECKPOINT_MAX_INTERVAL: Duration = Duration::from_millis(500);

/// How long to wait before cutting again after the storage refused a checkpoint.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);

/// A segment this full is closed, and a checkpoint cut soon after.
pub const SEGMENT_TARGET_BYTES: u64 = 16 << 20;

/// Segment files the journal may have; when every one holds records not yet checkpointed,
/// the thread waits for the checkpoint. Bounds the journal at about this many times
/// [`SEGMENT_TARGET_BYTES`].
pub const MAX_SEGMENTS: usize = 8;

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
    /// The checkpointer finished a checkpoint.
    Checkpointed(checkpoint::Report),
    /// The last handle is gone: answer what was sent, checkpoint, then stop.
    Closed,
}

/// The way into the persistence thread, shared by every clone of a [`StoreHandle`]; when the
/// last one goes, it tells the thread.
#[derive(Debug)]
struct Inbox {
    /// A std channel, so that the thread can wait with a timeout (for a checkpoint); it is
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
    /// Makes `changes` durable. `Ok` means every job record is in the journal, flushed; on
    /// `Err` none of them is (but see [`StoreError::OutcomeUnknown`]).
    pub async fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        self.send(changes, Vec::new()).await
    }

    /// Gives queued jobs new ranks in `queue.json` without writing their files: for an order
    /// the job files already imply (the deadline order, at boot), so there is nothing new to
    /// make durable. A job that is not queued in `queue.json` is left alone, so a finished job
    /// never comes back. Answered once the journal has them; `queue.json` follows at the
    /// next checkpoint.
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

    /// Like [`Store::open`], making checkpoints durable the way `sync` says.
    pub fn open_with(
        data_dir: &Path,
        fatal: CancellationToken,
        sync: SyncMode,
    ) -> Result<Opened, OpenError> {
        let data_dir = data_dir.to_path_buf();
        for sub in [JOBS_DIR, QUARANTINE_DIR, LOGS_DIR, JOURNAL_DIR] {
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
        let target = checkpoint::Target {
            jobs_dir: data_dir.join(JOBS_DIR),
            data_dir: data_dir.clone(),
            sync,
        };
        clean(&data_dir, &recovered);
        boot_checkpoint(&target, &recovered, &queue).map_err(|e| OpenError(e.to_string()))?;
        let (events, inbox) = mpsc::channel();
        let reports = events.clone();
        let checkpoints = checkpoint::spawn(target, move |report| {
            let _ = reports.send(Event::Checkpointed(report));
        })
        .map_err(|e| OpenError(format!("cannot start the checkpoint thread: {e}")))?;
        let journal_dir = data_dir.join(JOURNAL_DIR);
        let mut slots = recovered.journal_slots.clone();
        // Two segments made now, so that a light load never creates one: one in use, one
        // to take while the checkpoint of the other runs.
        let mut next_slot = slots.iter().max().map_or(0, |s| s + 1);
        while slots.len() < 2 {
            match journal::Segment::open(&journal_dir, next_slot) {
                Ok(_) => slots.push(next_slot),
                Err(e) => {
                    warn!(error = %e, "cannot make a journal segment now; trying again at the first write");
                    break;
                }
            }
            next_slot += 1;
        }
        let thread_state = Persister {
            journal_dir,
            queue,
            queue_dirty: false,
            fatal,
            broken: None,
            active: None,
            next_slot,
            slots: slots.len(),
            free: slots,
            next_seq: recovered.journal_seq + 1,
            sealed: Vec::new(),
            dirty: HashMap::new(),
            checkpoints: Some(checkpoints),
            in_flight: None,
            last_checkpoint_end: Instant::now(),
            last_checkpoint_cost: Duration::ZERO,
            retry_at: None,
            stashed: VecDeque::new(),
            closed: false,
            refusal: None,
        };
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

/// Acts on what replay found: damaged files to `quarantine/`, temporary files removed. A
/// file that cannot be moved or removed is logged and left; the boot goes on.
fn clean(data_dir: &Path, recovered: &Recovered) {
    let quarantine = data_dir.join(QUARANTINE_DIR);
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
    for torn in &recovered.journal_torn {
        info!(detail = %torn, "journal tail dropped");
    }
    for id in &recovered.missing {
        warn!(job_id = %id, "queue.json names a job that has no job file; dropped");
    }
}

/// The boot's checkpoint: the files of the jobs the journal changed, a current
/// `queue.json`, the directories' moves and removals made durable, and then the journal
/// retired, before anything is acknowledged.
fn boot_checkpoint(
    target: &checkpoint::Target,
    recovered: &Recovered,
    queue: &QueueMirror,
) -> Result<(), WriteError> {
    let by_id: HashMap<JobId, &crate::job::Job> =
        recovered.jobs.iter().map(|j| (j.id, j)).collect();
    let task = checkpoint::Task {
        files: recovered
            .from_journal
            .iter()
            .filter_map(|id| Some((*id, Arc::new(by_id.get(id)?.to_file_bytes()))))
            .collect(),
        queue: Some(queue.lists()),
        retire: recovered.journal_segments.clone(),
    };
    checkpoint::run(target, &task)?;
    checkpoint::retire(&task.retire)?;
    fsio::sync_dir(&target.jobs_dir)?;
    fsio::sync_dir(&target.data_dir.join(QUARANTINE_DIR))?;
    fsio::sync_dir(&target.data_dir.join(JOURNAL_DIR))?;
    if !task.retire.is_empty() {
        info!(
            records = recovered.journal_records,
            jobs = task.files.len(),
            "journal applied to the job files"
        );
    }
    Ok(())
}

/// The store's copy of the queue order, from which `queue.json` is written.
#[derive(Default)]
struct QueueMirror {
    running: BTreeSet<(u64, JobId)>,
    queued: BTreeSet<(u64, JobId)>,
    placed: HashMap<JobId, Placement>,
}

impl QueueMirror {
    /// Moves a job to `placement` and returns where it was.
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

    /// The order as ids, to be written elsewhere (the checkpointer renders them).
    fn lists(&self) -> (Vec<JobId>, Vec<JobId>) {
        (
            self.running.iter().map(|(_, id)| *id).collect(),
            self.queued.iter().map(|(_, id)| *id).collect(),
        )
    }
}

/// One job record of a request: the job, its place, its file's bytes.
type Record = (JobId, Placement, Arc<Vec<u8>>);

/// A segment that holds records no finished checkpoint covers yet.
struct Sealed {
    slot: u32,
    path: PathBuf,
    seq: u64,
}

/// A checkpoint the checkpointer is running: what it covers, to take back if it is refused.
struct InFlight {
    files: Vec<(JobId, Arc<Vec<u8>>)>,
    segments: Vec<Sealed>,
    queue: bool,
}

/// The persistence thread's state.
struct Persister {
    journal_dir: PathBuf,
    queue: QueueMirror,
    /// The mirror changed since the last cut.
    queue_dirty: bool,
    /// Cancelled on a fatal write error, which makes the daemon exit 74.
    fatal: CancellationToken,
    /// Set after a fatal error: every later request is refused with it.
    broken: Option<String>,
    /// The segment appended to, once one is in use.
    active: Option<journal::Segment>,
    /// Slots of segment files that hold nothing to keep, ready to be taken into use.
    free: Vec<u32>,
    /// The number a new segment file gets.
    next_slot: u32,
    /// Segment files there are.
    slots: usize,
    /// The sequence number the next segment taken into use gets.
    next_seq: u64,
    /// Segments closed since the last cut (the active one is closed at each cut).
    sealed: Vec<Sealed>,
    /// The latest file of each job changed since the last cut.
    dirty: HashMap<JobId, Arc<Vec<u8>>>,
    /// Where cuts go; `None` once the thread stops.
    checkpoints: Option<mpsc::Sender<checkpoint::Task>>,
    in_flight: Option<InFlight>,
    last_checkpoint_end: Instant,
    last_checkpoint_cost: Duration,
    /// After a refused checkpoint: not before then.
    retry_at: Option<Instant>,
    /// Events taken while waiting for a checkpoint, handled next.
    stashed: VecDeque<Event>,
    /// Every handle is gone: checkpoint what is left, then stop.
    closed: bool,
    /// Why the last checkpoint was refused, until one succeeds; changes are refused
    /// meanwhile.
    refusal: Option<String>,
}

impl Persister {
    /// The thread's loop: take what waits, append it as one group, answer; cut a
    /// checkpoint when it is due.
    fn run(mut self, inbox: mpsc::Receiver<Event>) {
        loop {
            if self.closed && self.in_flight.is_none() {
                if !self.has_work() || self.broken.is_some() {
                    break;
                }
                if self.retry_at.is_some() {
                    // The storage refused the last checkpoint as the store stops: the journal
                    // keeps everything for the next boot, which must know this stop was not
                    // clean.
                    error!(
                        "stopping with journal records the job files do not hold yet (the storage refused them); the next boot applies them"
                    );
                    self.fatal.cancel();
                    break;
                }
            }
            let first = match self.stashed.pop_front() {
                Some(event) => event,
                None => match self.checkpoint_due() {
                    None => match inbox.recv() {
                        Ok(event) => event,
                        Err(_) => break,
                    },
                    Some(due) => {
                        match inbox.recv_timeout(due.saturating_duration_since(Instant::now())) {
                            Ok(event) => event,
                            Err(RecvTimeoutError::Timeout) => {
                                self.cut();
                                continue;
                            }
                            Err(RecvTimeoutError::Disconnected) => break,
                        }
                    }
                },
            };
            let mut turn = vec![first];
            while turn.len() < MAX_BATCH {
                let next = match self.stashed.pop_front() {
                    Some(event) => event,
                    None => match inbox.try_recv() {
                        Ok(event) => event,
                        Err(_) => break,
                    },
                };
                turn.push(next);
            }
            let mut requests = Vec::new();
            for event in turn {
                match event {
                    Event::Request(request) => requests.push(request),
                    Event::Checkpointed(report) => self.checkpointed(report),
                    Event::Closed => {
                        self.closed = true;
                        // One more try at once, even after a refusal.
                        self.retry_at = None;
                    }
                }
            }
            if !requests.is_empty() {
                self.append(requests, &inbox);
            }
            // Under load the inbox never stays empty for IDLE_DELAY: cut once the interval
            // has passed.
            if self
                .checkpoint_due()
                .is_some_and(|due| due <= Instant::now())
                || (self.checkpoint_due().is_some()
                    && self.retry_at.is_none()
                    && Instant::now() >= self.last_checkpoint_end + self.interval())
            {
                self.cut();
            }
        }
        self.checkpoints = None;
        debug!("store stopped: every handle is gone");
    }

    /// Whether something is written that the job files do not hold yet.
    fn has_work(&self) -> bool {
        !self.dirty.is_empty()
            || self.queue_dirty
            || !self.sealed.is_empty()
            || self.active.as_ref().is_some_and(|s| s.used() > 0)
    }

    /// How long after the end of the last checkpoint the next may be cut under load.
    fn interval(&self) -> Duration {
        (self.last_checkpoint_cost * 2).clamp(CHECKPOINT_MIN_INTERVAL, CHECKPOINT_MAX_INTERVAL)
    }

    /// When the next cut is due, if there is anything to cut and no checkpoint runs.
    fn checkpoint_due(&self) -> Option<Instant> {
        if self.in_flight.is_some() || !self.has_work() || self.broken.is_some() {
            return None;
        }
        if let Some(at) = self.retry_at {
            return Some(at);
        }
        let now = Instant::now();
        if self.closed || self.sealed.len() + 1 >= MAX_SEGMENTS / 2 {
            return Some(now);
        }
        // At once when idle: the timeout runs out only if no request came meanwhile; under
        // load, once the interval has passed.
        Some((now + IDLE_DELAY).min(self.last_checkpoint_end + self.interval()))
    }

    /// Appends a group of requests to the journal as one write and one flush, then answers
    /// them.
    fn append(&mut self, requests: Vec<Request>, inbox: &mpsc::Receiver<Event>) {
        if let Some(reason) = &self.broken {
            for request in requests {
                let _ = request
                    .respond_to
                    .send(Err(StoreError::Fatal(reason.clone())));
            }
            return;
        }
        if let Some(reason) = &self.refusal {
            let error = StoreError::Unavailable(format!(
                "the job files cannot be written ({reason}); nothing new is taken until they can"
            ));
            for request in requests {
                let _ = request.respond_to.send(Err(error.clone()));
            }
            return;
        }
        let arrived = Instant::now();
        // The last record of a job in a request is the one that counts. (An enqueue has
        // one record, and nothing to merge.)
        let mut group: Vec<(Request, Vec<Record>)> = Vec::with_capacity(requests.len());
        let mut size = 0;
        for mut request in requests {
            let mut records: Vec<Record> = Vec::with_capacity(request.changes.len());
            let mut index: HashMap<JobId, usize> = HashMap::new();
            for change in request.changes.drain(..) {
                let record = (
                    change.job.id,
                    change.placement,
                    Arc::new(change.job.to_file_bytes()),
                );
                size += record.2.len() + 32;
                match index.get(&change.job.id) {
                    Some(&i) => records[i] = record,
                    None => {
                        index.insert(change.job.id, records.len());
                        records.push(record);
                    }
                }
            }
            size += request.ranks.len() * 24 + 32;
            group.push((request, records));
        }
        if let Err(e) = self.make_room(size as u64, inbox) {
            let error = self.fail(e);
            for (request, _) in group {
                let _ = request.respond_to.send(Err(error.clone()));
            }
            return;
        }
        let segment = self
            .active
            .as_mut()
            .expect("make_room leaves a segment in use");
        let seq = segment.seq();
        let mut bytes = Vec::with_capacity(size + 64);
        for (request, records) in &group {
            journal::encode_record(seq, &mut bytes, |out| {
                let changes: Vec<(Placement, &[u8])> = records
                    .iter()
                    .map(|(_, placement, bytes)| (*placement, bytes.as_slice()))
                    .collect();
                journal::encode_payload(&changes, &request.ranks, out);
            });
        }
        let written = segment.append(&bytes).and_then(|()| segment.flush());
        if let Err(e) = written {
            // A failed flush: the records may be in the page cache, which a restart reads.
            let error = match &e {
                WriteError::Write { .. } => self.fail(e),
                _ => self.fail(e).outcome_unknown(),
            };
            for (request, _) in group {
                let _ = request.respond_to.send(Err(error.clone()));
            }
            return;
        }
        let jobs: usize = group.iter().map(|(_, records)| records.len()).sum();
        for (request, records) in group {
            for (id, placement, bytes) in records {
                let old = self.queue.place(id, placement);
                self.queue_dirty |= old != placement;
                self.dirty.insert(id, bytes);
            }
            self.rerank(&request.ranks);
            let _ = request.respond_to.send(Ok(()));
        }
        if jobs > 0 {
            METRICS.batch_jobs.observe(jobs as f64);
            METRICS.flush.observe_duration(arrived.elapsed());
        }
        if self
            .active
            .as_ref()
            .is_some_and(|s| s.used() >= SEGMENT_TARGET_BYTES)
        {
            self.seal_active();
        }
    }

    /// Makes sure a segment is in use that takes `size` more bytes (growing it if need
    /// be): takes a free one into use, or makes a new file; when every segment there may
    /// be waits for a checkpoint, waits for it.
    fn make_room(&mut self, size: u64, inbox: &mpsc::Receiver<Event>) -> Result<(), WriteError> {
        if self
            .active
            .as_ref()
            .is_some_and(|s| s.used() > 0 && s.used() + size > SEGMENT_TARGET_BYTES)
        {
            self.seal_active();
        }
        if self.active.is_some() {
            return Ok(());
        }
        while self.free.is_empty() && self.slots >= MAX_SEGMENTS {
            if self.in_flight.is_none() {
                self.cut();
            }
            if self.in_flight.is_none() {
                return Err(WriteError::Write {
                    path: self.journal_dir.clone(),
                    source: io::Error::other(
                        "the journal is full and its records cannot be checkpointed",
                    ),
                });
            }
            // Wait for the checkpoint, keeping whatever else comes for later.
            match inbox.recv() {
                Ok(Event::Checkpointed(report)) => self.checkpointed(report),
                Ok(other) => self.stashed.push_back(other),
                Err(_) => {
                    return Err(WriteError::Write {
                        path: self.journal_dir.clone(),
                        source: io::Error::other("the checkpointer is gone"),
                    });
                }
            }
            if self.broken.is_some() {
                return Err(WriteError::Write {
                    path: self.journal_dir.clone(),
                    source: io::Error::other("the store has stopped"),
                });
            }
        }
        let mut segment = match self.free.pop() {
            Some(slot) => journal::Segment::open(&self.journal_dir, slot)?,
            None => {
                let segment = journal::Segment::open(&self.journal_dir, self.next_slot)?;
                self.next_slot += 1;
                self.slots += 1;
                segment
            }
        };
        if let Err(e) = segment.activate(self.next_seq) {
            self.free.push(segment.slot);
            return Err(e);
        }
        self.next_seq += 1;
        self.active = Some(segment);
        Ok(())
    }

    /// Closes the active segment: records go to a new one from the next group on.
    fn seal_active(&mut self) {
        if let Some(segment) = self.active.take() {
            if segment.used() == 0 {
                self.active = Some(segment);
                return;
            }
            self.sealed.push(Sealed {
                slot: segment.slot,
                path: segment.path.clone(),
                seq: segment.seq(),
            });
        }
    }

    /// Cuts a checkpoint and hands it to the checkpointer.
    fn cut(&mut self) {
        if self.in_flight.is_some() || self.broken.is_some() {
            return;
        }
        self.retry_at = None;
        self.seal_active();
        let files: Vec<(JobId, Arc<Vec<u8>>)> = self.dirty.drain().collect();
        let queue = self.queue_dirty || !files.is_empty();
        self.queue_dirty = false;
        let segments = std::mem::take(&mut self.sealed);
        let task = checkpoint::Task {
            files: files.clone(),
            queue: queue.then(|| self.queue.lists()),
            retire: segments.iter().map(|s| (s.path.clone(), s.seq)).collect(),
        };
        if task.is_empty() {
            return;
        }
        let sent = self
            .checkpoints
            .as_ref()
            .is_some_and(|tasks| tasks.send(task).is_ok());
        let in_flight = InFlight {
            files,
            segments,
            queue,
        };
        if !sent {
            error!("the checkpoint thread is gone; stopping so that a restart replays the journal");
            self.take_back(in_flight);
            self.broken = Some("the checkpoint thread is gone".into());
            self.fatal.cancel();
            return;
        }
        self.in_flight = Some(in_flight);
    }

    /// Puts a checkpoint that did not happen back, behind whatever changed since.
    fn take_back(&mut self, in_flight: InFlight) {
        for (id, bytes) in in_flight.files {
            self.dirty.entry(id).or_insert(bytes);
        }
        let mut segments = in_flight.segments;
        segments.append(&mut self.sealed);
        self.sealed = segments;
        self.queue_dirty |= in_flight.queue;
    }

    /// The checkpointer's report: the segments it retired are free again; a refusal is
    /// retried; anything else is fatal.
    fn checkpointed(&mut self, report: checkpoint::Report) {
        let Some(in_flight) = self.in_flight.take() else {
            return;
        };
        self.last_checkpoint_end = Instant::now();
        self.last_checkpoint_cost = report.took;
        match report.result {
            Ok(()) => {
                let retire: Vec<(PathBuf, u64)> = in_flight
                    .segments
                    .iter()
                    .map(|s| (s.path.clone(), s.seq))
                    .collect();
                if let Err(e) = checkpoint::retire(&retire) {
                    // A segment left in use is applied again at the next boot, with every
                    // later one (none is retired before it is): the same state. Refused, the
                    // checkpoint is done again; a failed flush stops the store, as any does.
                    self.take_back(in_flight);
                    if e.is_refusal() {
                        self.refused(e);
                    } else {
                        let _ = self.fail(e);
                    }
                    return;
                }
                self.refusal = None;
                METRICS.checkpoint.observe_duration(report.took);
                self.free
                    .extend(in_flight.segments.iter().map(|segment| segment.slot));
            }
            Err(e) if e.is_refusal() => {
                self.take_back(in_flight);
                self.refused(e);
            }
            Err(e) => {
                self.take_back(in_flight);
                let _ = self.fail(e);
            }
        }
    }

    /// A checkpoint the storage refused: tried again in a while, and until one succeeds new
    /// changes are refused too. The journal could take them, but it could not be emptied:
    /// this keeps it bounded, and keeps the promise that a full disk refuses writes.
    fn refused(&mut self, e: WriteError) {
        METRICS.store_refusals.inc();
        warn!(error = %e, "cannot write the job files or queue.json; the journal keeps what was acknowledged; refusing changes until a checkpoint succeeds");
        self.refusal = Some(e.to_string());
        self.retry_at = Some(Instant::now() + CHECKPOINT_RETRY);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Job, Status};
    use crate::layout::QUEUE_FILE;

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

    /// The checkpoint follows a commit at once when nothing else comes; waits until job
    /// `id`'s file says `status`.
    fn job_file_becomes(dir: &Path, id: JobId, status: Status) -> Job {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let path = dir.join(JOBS_DIR).join(format!("{id}.json"));
            if let Ok(bytes) = fs::read(&path) {
                let job = Job::from_stored(serde_json::from_slice(&bytes).unwrap()).unwrap();
                if job.status == status {
                    return job;
                }
            }
            assert!(Instant::now() < deadline, "{id} never became {status}");
            std::thread::sleep(Duration::from_millis(5));
        }
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
    async fn commits_are_journalled_and_the_files_and_queue_json_follow() {
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
        // Both are in the journal when commit returns: a crash now replays them.
        assert_eq!(replay::replay(dir.path()).unwrap().order, vec![a.id, b.id]);
        // The checkpoint writes the files and queue.json.
        for id in [a.id, b.id] {
            job_file_becomes(dir.path(), id, Status::Queued);
        }
        queue_file_becomes(dir.path(), &[], &[a.id, b.id]);
        let mut running = b.clone();
        running.start(chrono::Utc::now(), None);
        store
            .commit(vec![change(&running, Placement::Running(0))])
            .await
            .unwrap();
        queue_file_becomes(dir.path(), &[b.id], &[a.id]);
        job_file_becomes(dir.path(), b.id, Status::Running);
        drop((store, opened.handle));
        opened.thread.join().unwrap();
        let rec = replay::replay(dir.path()).unwrap();
        assert_eq!(rec.order, vec![b.id, a.id]);
        // The stop checkpointed everything: the journal holds nothing to apply.
        assert_eq!(rec.journal_records, 0);
        assert!(rec.journal_segments.is_empty());
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
        // A crash now, whatever queue.json says yet: the journal names a, so replay places
        // it by its new arrival, after b.
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
        job_file_becomes(dir.path(), a.id, Status::Running);
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
        job_file_becomes(dir.path(), a.id, Status::Queued);
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
    async fn a_refused_checkpoint_keeps_the_journal_and_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let fatal = CancellationToken::new();
        let opened = Store::open(dir.path(), fatal.clone()).unwrap();
        let store = opened.handle.clone();
        store
            .commit(vec![change(&job(1), Placement::Queued(0))])
            .await
            .unwrap();
        job_file_becomes(dir.path(), job(1).id, Status::Queued);
        // Make the jobs directory unwritable by replacing it with a file for a moment: the
        // checkpoint is refused, the commit is not (the journal has it).
        let jobs = dir.path().join(JOBS_DIR);
        let aside = dir.path().join("jobs-aside");
        fs::rename(&jobs, &aside).unwrap();
        fs::write(&jobs, b"not a dir").unwrap();
        store
            .commit(vec![change(&job(2), Placement::Queued(1))])
            .await
            .unwrap();
        assert!(!fatal.is_cancelled());
        // A crash now would replay it from the journal.
        let journal = journal::read(&dir.path().join(JOURNAL_DIR)).unwrap();
        let records: Vec<Job> = journal
            .segments
            .iter()
            .flat_map(|s| &s.entries)
            .flat_map(|e| &e.changes)
            .map(|c| Job::from_stored(serde_json::from_slice(&c.job_bytes).unwrap()).unwrap())
            .collect();
        assert!(records.iter().any(|j| j.id == job(2).id), "{records:?}");
        fs::remove_file(&jobs).unwrap();
        fs::rename(&aside, &jobs).unwrap();
        // The retry writes it.
        job_file_becomes(dir.path(), job(2).id, Status::Queued);
        queue_file_becomes(dir.path(), &[], &[job(1).id, job(2).id]);
        drop((store, opened.handle));
        opened.thread.join().unwrap();
        assert!(!fatal.is_cancelled());
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
