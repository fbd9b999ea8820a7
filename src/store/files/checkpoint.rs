//! The checkpointer: writes what the journal holds into the job files and `queue.json`,
//! then retires the journal segments it covered (CONTRACT.md 6).
//!
//! The store thread cuts a checkpoint: the latest bytes of every job changed since the last
//! cut, the queue order at that moment, and the segments whose records end at the cut (the
//! thread appends to a fresh segment from then on). The checkpointer, a thread of its own and
//! off the acknowledgement path, then
//!
//! 1. stages every file (a temporary file each, in the same directory);
//! 2. makes them durable: one syncfs(2) of the data dir's filesystem (`sync = "syncfs"`), or
//!    an fsync per file (`"fsync"`, in parallel for a large checkpoint);
//! 3. renames them into place, the job files first, and fsyncs `jobs/`, then the data dir;
//!
//! and reports; the store thread then marks the segments retired (a header write and an
//! fdatasync each, the journal's calls all on that one thread), before it cuts the next
//! checkpoint, so that segments are retired in order. A crash anywhere before the retirement
//! leaves the segments in use, so the next boot applies their records again: the checkpoint
//! is redone, and redoing it writes the same files. A write the
//! storage refuses (a full disk, a read-only filesystem) is reported and the cut retried a
//! second later; a failed flush is fatal, as everywhere in the store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::fsio::{self, Staged, WriteError};
use super::journal;
use super::replay::QueueFile;
use crate::config::SyncMode;
use crate::job::JobId;
use crate::layout::QUEUE_FILE;

/// Above this many files a checkpoint in `fsync` mode fsyncs them from several threads: the
/// device serves many flushes at once.
const FSYNC_ALONE: usize = 2;
/// Threads that stage files in `fsync` mode.
const FSYNC_THREADS: usize = 16;

/// One checkpoint: what to write and what it retires.
#[derive(Debug, Default)]
pub struct Task {
    /// The latest file of every job changed since the last cut.
    pub files: Vec<(JobId, Arc<Vec<u8>>)>,
    /// The order to write to `queue.json` (running, queued), when it changed; rendered
    /// here, off the thread that answers requests.
    pub queue: Option<(Vec<JobId>, Vec<JobId>)>,
    /// The segments whose records the files will hold: (path, sequence). [`run`] leaves
    /// them; whoever runs it retires them after it succeeded ([`retire`]).
    pub retire: Vec<(PathBuf, u64)>,
}

impl Task {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.queue.is_none() && self.retire.is_empty()
    }
}

/// Where the checkpointer writes, and how it makes files durable.
#[derive(Clone, Debug)]
pub struct Target {
    pub data_dir: PathBuf,
    pub jobs_dir: PathBuf,
    pub sync: SyncMode,
}

/// Runs one checkpoint to its end. Refusals (see [`WriteError::is_refusal`]) leave the
/// segments in use and may be retried; anything else is fatal.
pub fn run(target: &Target, task: &Task) -> Result<(), WriteError> {
    let jobs: Vec<(String, &[u8])> = task
        .files
        .iter()
        .map(|(id, bytes)| (format!("{id}.json"), bytes.as_slice()))
        .collect();
    let staged_jobs = stage_all(&target.jobs_dir, &jobs, target.sync)?;
    let staged_queue = match &task.queue {
        Some((running, queued)) => match stage_one(
            &target.data_dir,
            QUEUE_FILE,
            &queue_bytes(running, queued),
            target.sync,
        ) {
            Ok(staged) => Some(staged),
            Err(e) => {
                staged_jobs.into_iter().for_each(fsio::discard);
                return Err(e);
            }
        },
        None => None,
    };
    if target.sync == SyncMode::Syncfs
        && (!staged_jobs.is_empty() || staged_queue.is_some())
        && let Err(e) = fsio::sync_filesystem(&target.data_dir)
    {
        staged_jobs.into_iter().for_each(fsio::discard);
        staged_queue.into_iter().for_each(fsio::discard);
        return Err(e);
    }
    publish_all(staged_jobs)?;
    if !jobs.is_empty() {
        fsio::sync_dir(&target.jobs_dir)?;
    }
    if let Some(queue) = staged_queue {
        publish_all(vec![queue])?;
        fsio::sync_dir(&target.data_dir)?;
    }
    Ok(())
}

/// Marks the segments a successful checkpoint covered retired, in order.
pub fn retire(segments: &[(PathBuf, u64)]) -> Result<(), WriteError> {
    for (path, seq) in segments {
        journal::retire(path, *seq)?;
    }
    Ok(())
}

/// `queue.json`'s bytes for these lists.
pub fn queue_bytes(running: &[JobId], queued: &[JobId]) -> Vec<u8> {
    let file = QueueFile {
        running: running.iter().map(|id| id.to_string()).collect(),
        queued: queued.iter().map(|id| id.to_string()).collect(),
    };
    let mut bytes = serde_json::to_vec_pretty(&file).expect("a list of strings always serialises");
    bytes.push(b'\n');
    bytes
}

fn stage_one(dir: &Path, name: &str, bytes: &[u8], sync: SyncMode) -> Result<Staged, WriteError> {
    match sync {
        SyncMode::Fsync => fsio::stage(dir, name, bytes),
        SyncMode::Syncfs => fsio::stage_unsynced(dir, name, bytes),
    }
}

/// Stages every file; on an error, removes the ones staged and returns the worst error (a
/// fatal one before a refusal).
fn stage_all(
    dir: &Path,
    files: &[(String, &[u8])],
    sync: SyncMode,
) -> Result<Vec<Staged>, WriteError> {
    let results: Vec<Result<Staged, WriteError>> =
        if sync == SyncMode::Syncfs || files.len() <= FSYNC_ALONE {
            files
                .iter()
                .map(|(name, bytes)| stage_one(dir, name, bytes, sync))
                .collect()
        } else {
            let chunk = files.len().div_ceil(FSYNC_THREADS);
            thread::scope(|scope| {
                let handles: Vec<_> = files
                    .chunks(chunk)
                    .map(|part| {
                        scope.spawn(move || {
                            part.iter()
                                .map(|(name, bytes)| stage_one(dir, name, bytes, sync))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| {
                        h.join().unwrap_or_else(|_| {
                            vec![Err(WriteError::Sync {
                                path: dir.to_path_buf(),
                                source: std::io::Error::other("staging a file panicked"),
                            })]
                        })
                    })
                    .collect()
            })
        };
    let mut staged = Vec::with_capacity(results.len());
    let mut worst: Option<WriteError> = None;
    for result in results {
        match result {
            Ok(file) => staged.push(file),
            Err(e) => {
                if worst.as_ref().is_none_or(|w| e.is_fatal() && !w.is_fatal()) {
                    worst = Some(e);
                }
            }
        }
    }
    match worst {
        None => Ok(staged),
        Some(e) => {
            staged.into_iter().for_each(fsio::discard);
            Err(e)
        }
    }
}

/// Renames staged files into place; on an error the rest are removed.
fn publish_all(staged: Vec<Staged>) -> Result<(), WriteError> {
    let mut files = staged.into_iter();
    while let Some(file) = files.next() {
        if let Err(e) = fsio::publish(&file) {
            fsio::discard(file);
            files.for_each(fsio::discard);
            return Err(e);
        }
    }
    Ok(())
}

/// How a checkpoint ended, for the store thread.
#[derive(Debug)]
pub struct Report {
    pub result: Result<(), WriteError>,
    pub took: Duration,
}

/// Starts the checkpointer thread: it runs each task it is sent and calls `report` with the
/// outcome; it ends when the sender is dropped.
pub fn spawn(
    target: Target,
    report: impl Fn(Report) + Send + 'static,
) -> std::io::Result<mpsc::Sender<Task>> {
    let (tasks, inbox) = mpsc::channel::<Task>();
    thread::Builder::new()
        .name("store-checkpoint".into())
        .spawn(move || {
            for task in inbox {
                let started = Instant::now();
                let result =
                    std::panic::catch_unwind(|| run(&target, &task)).unwrap_or_else(|_| {
                        Err(WriteError::Sync {
                            path: target.data_dir.clone(),
                            source: std::io::Error::other("a checkpoint panicked"),
                        })
                    });
                report(Report {
                    result,
                    took: started.elapsed(),
                });
            }
        })?;
    Ok(tasks)
}
