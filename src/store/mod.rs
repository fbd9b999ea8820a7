//! The store: the only code that writes the data dir's job state.
//!
//! [`Store::open`] replays the data dir, cleans it (damaged files to `quarantine/`, leftover
//! temporary files removed, `queue.json` rewritten), and starts the persistence thread. The
//! worker talks to it through a [`StoreHandle`] with one call, [`StoreHandle::commit`]: a set
//! of job records and their places in the queue, answered once they are durable.
//!
//! Group commit: the thread takes every request waiting in its inbox as one batch, stages all
//! job files (write + fsync each), stages `queue.json` once, renames them into place, fsyncs
//! each directory once, and only then answers every request of the batch. Under load a batch
//! grows, so the number of `queue.json` rewrites and directory fsyncs per job falls.
//!
//! Blocking I/O stays off the async runtime: the thread is a plain OS thread, and it is the
//! only one that writes job files, so counting its fsyncs and renames counts the storage path.

pub mod fsio;
pub mod lock;
pub mod replay;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::job::{Job, JobId};
use fsio::{Staged, WriteError};
pub use replay::{Damaged, QueueFile, Recovered};
use replay::{JOBS_DIR, LOGS_DIR, QUARANTINE_DIR, QUEUE_FILE};

/// The rank of the first queued job in replay order. Ranks below it are start numbers, which
/// is where jobs interrupted by a graceful stop go back to: ahead of every other queued job.
pub const FIRST_QUEUED_RANK: u64 = 1 << 62;

/// Requests waiting beyond this many are left for the next batch, which bounds a batch's
/// memory and the latency of its first request.
const MAX_BATCH: usize = 4096;

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
    /// The store has stopped.
    #[error("the store has stopped")]
    Closed,
}

struct Request {
    changes: Vec<Change>,
    respond_to: oneshot::Sender<Result<(), StoreError>>,
}

/// The cloneable way to the persistence thread. The thread ends when every handle is gone,
/// after it has answered everything sent to it.
#[derive(Clone, Debug)]
pub struct StoreHandle {
    inbox: mpsc::Sender<Request>,
}

impl StoreHandle {
    /// Makes `changes` durable. `Ok` means every record and `queue.json` are on disk and
    /// fsynced; on `Err` none of them is.
    pub async fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let (respond_to, answer) = oneshot::channel();
        self.inbox
            .send(Request {
                changes,
                respond_to,
            })
            .await
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
            fatal,
            broken: None,
        };
        thread_state
            .clean(&recovered)
            .map_err(|e| OpenError(e.to_string()))?;
        let (inbox_tx, inbox) = mpsc::channel(1024);
        let thread = thread::Builder::new()
            .name("store".into())
            .spawn(move || thread_state.run(inbox))
            .map_err(|e| OpenError(format!("cannot start the store thread: {e}")))?;
        Ok(Opened {
            handle: StoreHandle { inbox: inbox_tx },
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
    /// Cancelled on a fatal write error, which makes the daemon exit 74.
    fatal: CancellationToken,
    /// Set after a fatal error: every later request is refused with it.
    broken: Option<String>,
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
        fsio::write_atomic(&self.data_dir, QUEUE_FILE, &self.queue.to_bytes())?;
        fsio::sync_dir(&self.jobs_dir)?;
        fsio::sync_dir(&quarantine)?;
        Ok(())
    }

    fn run(mut self, mut inbox: mpsc::Receiver<Request>) {
        let mut batch = Vec::new();
        while let Some(first) = inbox.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match inbox.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            let result = match &self.broken {
                Some(reason) => Err(StoreError::Fatal(reason.clone())),
                None => self.write_batch(&batch),
            };
            for request in batch.drain(..) {
                // A requester that went away no longer needs the answer.
                let _ = request.respond_to.send(result.clone());
            }
        }
        debug!("store stopped: every handle is gone");
    }

    /// Writes every change of the batch and `queue.json`, durably, or none of them.
    fn write_batch(&mut self, batch: &[Request]) -> Result<(), StoreError> {
        // The last record of a job in the batch is the one that counts.
        let mut last: HashMap<JobId, &Change> = HashMap::new();
        let mut ids = Vec::new();
        for change in batch.iter().flat_map(|r| &r.changes) {
            if last.insert(change.job.id, change).is_none() {
                ids.push(change.job.id);
            }
        }
        let mut undo = Vec::with_capacity(ids.len());
        for id in &ids {
            undo.push((*id, self.queue.place(*id, last[id].placement)));
        }

        let mut staged: Vec<Staged> = Vec::with_capacity(ids.len() + 1);
        let mut failure = None;
        for id in &ids {
            match fsio::stage(
                &self.jobs_dir,
                &format!("{id}.json"),
                &last[id].job.to_file_bytes(),
            ) {
                Ok(s) => staged.push(s),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() {
            match fsio::stage(&self.data_dir, QUEUE_FILE, &self.queue.to_bytes()) {
                Ok(s) => staged.push(s),
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            for s in staged {
                fsio::discard(s);
            }
            for (id, old) in undo.into_iter().rev() {
                self.queue.place(id, old);
            }
            return Err(self.fail(e));
        }

        // Job files before queue.json: a crash in between leaves a job file that queue.json
        // does not name yet, which replay places by its fields; never the reverse.
        for s in &staged {
            if let Err(e) = fsio::publish(s) {
                return Err(self.fail(e));
            }
        }
        let synced = fsio::sync_dir(&self.jobs_dir).and_then(|()| fsio::sync_dir(&self.data_dir));
        if let Err(e) = synced {
            return Err(self.fail(e));
        }
        debug!(requests = batch.len(), jobs = ids.len(), "batch durable");
        Ok(())
    }

    fn fail(&mut self, e: WriteError) -> StoreError {
        if !e.is_fatal() {
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
    use crate::job::Status;
    use serde_json::json;

    fn job(n: u128) -> Job {
        let mut job = Job::from_submission(
            json!({"type": "DiffusionJob", "model": "m", "dataset_zip": "z"}),
            chrono::Utc::now(),
        )
        .unwrap();
        job.id = JobId::from_uuid(uuid::Uuid::from_u128(n));
        job
    }

    fn queue_file(dir: &Path) -> QueueFile {
        serde_json::from_slice(&fs::read(dir.join(QUEUE_FILE)).unwrap()).unwrap()
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
        let q = queue_file(dir.path());
        assert_eq!(q.queued, vec![a.id.to_string(), b.id.to_string()]);
        let mut running = b.clone();
        running.start(chrono::Utc::now());
        store
            .commit(vec![Change {
                job: running,
                placement: Placement::Running(0),
            }])
            .await
            .unwrap();
        let q = queue_file(dir.path());
        assert_eq!(
            (q.running, q.queued),
            (vec![b.id.to_string()], vec![a.id.to_string()])
        );
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
    async fn concurrent_commits_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Store::open(dir.path(), CancellationToken::new()).unwrap();
        let mut tasks = Vec::new();
        for n in 0..200u64 {
            let store = opened.handle.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .commit(vec![Change {
                        job: job(n as u128),
                        placement: Placement::Queued(n),
                    }])
                    .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let q = queue_file(dir.path());
        let expected: Vec<String> = (0..200u128).map(|n| job(n).id.to_string()).collect();
        assert_eq!(q.queued, expected);
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
        assert_eq!(queue_file(dir.path()).queued, vec![job(1).id.to_string()]);
        assert!(!jobs.join(format!("{}.json", job(2).id)).exists());
        store
            .commit(vec![Change {
                job: job(3),
                placement: Placement::Queued(2),
            }])
            .await
            .unwrap();
        assert_eq!(
            queue_file(dir.path()).queued,
            vec![job(1).id.to_string(), job(3).id.to_string()]
        );
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
