//! Replay: what a data dir holds, read without changing anything.
//!
//! [`replay`] is a pure function from a directory to [`Recovered`]: the readable jobs, the
//! order in which the unfinished ones run again, and what is damaged or left over. Acting on
//! it (moving damaged files to `quarantine/`, removing temporary files, rewriting
//! `queue.json`) is the store's business, so this function can be tested on crafted
//! directories and run by `check` without touching them.
//!
//! The order (CONTRACT.md 6): jobs that were running first, in the order they had started
//! (status Running, and Queued jobs with a start time, which were running when an earlier
//! crash or a graceful stop interrupted them); then Queued jobs in `queue.json` order; then
//! Queued jobs missing from `queue.json`, by `created_at`. Since the daemon writes
//! `queue.json` in exactly that order, the queue rebuilt from the job files alone is the
//! queue that was lost.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::fsio;
use crate::job::{Job, JobId};
use crate::layout::{JOBS_DIR, QUEUE_FILE};
use crate::store::order::requeue_order;

/// `queue.json`: the ids of the running jobs in start order, then the queued ones in the
/// order they will start. A cache of what the job files say, kept current.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueFile {
    pub running: Vec<String>,
    pub queued: Vec<String>,
}

/// A file that could not be read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    pub path: PathBuf,
    pub reason: String,
}

/// Everything replay found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every readable job, finished ones included.
    pub jobs: Vec<Job>,
    /// The unfinished jobs (Running and Queued) in the order they run again.
    pub order: Vec<JobId>,
    /// Files that could not be read; they go to `quarantine/`.
    pub damaged: Vec<Damaged>,
    /// Temporary files left by interrupted writes; they are removed.
    pub temp_files: Vec<PathBuf>,
    /// Ids that `queue.json` names but that have no job file; they are dropped.
    pub missing: Vec<String>,
    /// `queue.json` as read, when it was present and readable.
    pub queue_file: Option<QueueFile>,
}

/// Reads the data dir. An I/O error on the directories themselves is returned; a bad file
/// never is: it is reported in [`Recovered::damaged`].
pub fn replay(data_dir: &Path) -> io::Result<Recovered> {
    let mut recovered = Recovered::default();
    let jobs_dir = data_dir.join(JOBS_DIR);

    for entry in read_dir_if_exists(data_dir)? {
        let name = entry.file_name().to_string_lossy().into_owned();
        if fsio::is_temp_name(&name) {
            match not_a_regular_file(&entry) {
                None => recovered.temp_files.push(entry.path()),
                // Something else in a temporary file's place would block the next write of
                // queue.json: set it aside.
                Some(what) => recovered.damaged.push(Damaged {
                    path: entry.path(),
                    reason: format!("{what} where a temporary file is written"),
                }),
            }
        }
    }

    let mut jobs: HashMap<JobId, Job> = HashMap::new();
    let entries = read_dir_if_exists(&jobs_dir)?;
    let mut progress = Progress::new(entries.len());
    for entry in entries {
        progress.tick();
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // Only regular files are read: a FIFO would block the boot forever, and a symbolic
        // link could point anywhere.
        if let Some(what) = not_a_regular_file(&entry) {
            recovered.damaged.push(Damaged {
                path,
                reason: format!("{what} where only job files belong"),
            });
            continue;
        }
        if fsio::is_temp_name(&name) {
            recovered.temp_files.push(path);
            continue;
        }
        match read_job_file(&path, &name) {
            Ok(job) => {
                jobs.insert(job.id, job);
            }
            Err(reason) => recovered.damaged.push(Damaged { path, reason }),
        }
    }

    let queue_path = data_dir.join(QUEUE_FILE);
    let queue_file = match fs::symlink_metadata(&queue_path).map(|m| m.file_type()) {
        Ok(kind) if !kind.is_file() => {
            recovered.damaged.push(Damaged {
                path: queue_path,
                reason: format!("{} where queue.json belongs", describe_type(kind)),
            });
            QueueFile::default()
        }
        _ => read_queue_file(&queue_path, &mut recovered),
    };
    recovered.order = requeue_order(
        &jobs,
        &queue_file.running,
        &queue_file.queued,
        &mut recovered.missing,
    );
    let mut all: Vec<Job> = jobs.into_values().collect();
    all.sort_by(by_creation);
    recovered.jobs = all;
    recovered.damaged.sort_by(|a, b| a.path.cmp(&b.path));
    recovered.temp_files.sort();
    Ok(recovered)
}

/// Reports how far a long replay has got, so that an operator watching a slow boot sees it
/// move: every [`PROGRESS_EVERY`] files, and after [`PROGRESS_INTERVAL`] without a report,
/// whichever comes first, and only when there are enough files for it to matter.
struct Progress {
    total: usize,
    done: usize,
    started: std::time::Instant,
    last: std::time::Instant,
}

const PROGRESS_EVERY: usize = 10_000;
const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

impl Progress {
    fn new(total: usize) -> Progress {
        let now = std::time::Instant::now();
        Progress {
            total,
            done: 0,
            started: now,
            last: now,
        }
    }

    fn tick(&mut self) {
        self.done += 1;
        if self.total < PROGRESS_EVERY {
            return;
        }
        let now = std::time::Instant::now();
        if self.done.is_multiple_of(PROGRESS_EVERY) || now - self.last >= PROGRESS_INTERVAL {
            self.last = now;
            tracing::info!(
                read = self.done,
                total = self.total,
                elapsed_ms = (now - self.started).as_millis() as u64,
                "replaying job files"
            );
        }
    }
}

/// Reads `queue.json`; a missing one is an empty queue, an unreadable one is damaged.
fn read_queue_file(path: &Path, recovered: &mut Recovered) -> QueueFile {
    match fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<QueueFile>(&bytes) {
            Ok(q) => {
                recovered.queue_file = Some(q.clone());
                q
            }
            Err(e) => {
                recovered.damaged.push(Damaged {
                    path: path.to_path_buf(),
                    reason: format!("not a queue file: {e}"),
                });
                QueueFile::default()
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => QueueFile::default(),
        Err(e) => {
            recovered.damaged.push(Damaged {
                path: path.to_path_buf(),
                reason: format!("unreadable: {e}"),
            });
            QueueFile::default()
        }
    }
}

/// What a directory entry is when it is not a regular file (a symbolic link counts as not
/// one: it is never followed).
fn not_a_regular_file(entry: &fs::DirEntry) -> Option<&'static str> {
    match entry.file_type() {
        Ok(kind) if kind.is_file() => None,
        Ok(kind) => Some(describe_type(kind)),
        Err(_) => Some("an entry of unknown type"),
    }
}

fn describe_type(kind: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else if kind.is_file() {
        "a file"
    } else {
        "an entry of unknown type"
    }
}

fn read_dir_if_exists(dir: &Path) -> io::Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(entries) => entries.collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Reads one job file; the error is the reason it goes to quarantine.
fn read_job_file(path: &Path, name: &str) -> Result<Job, String> {
    let Some(stem) = name.strip_suffix(".json") else {
        return Err("not a job file (the name is not <job_id>.json)".into());
    };
    let Ok(id) = stem.parse::<JobId>() else {
        return Err("not a job file (the name is not <job_id>.json)".into());
    };
    if id.to_string() != stem {
        return Err("not a job file (the job id in the name is not lowercase)".into());
    }
    let bytes = fs::read(path).map_err(|e| format!("unreadable: {e}"))?;
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| format!("invalid JSON: {e}"))?;
    let job = Job::from_stored(value).map_err(|e| format!("invalid job: {e}"))?;
    if job.id != id {
        return Err(format!(
            "the file is named for job {id} but holds job {}",
            job.id
        ));
    }
    Ok(job)
}

/// Oldest first; jobs without a creation time (the seed's files) before the rest.
fn by_creation(a: &Job, b: &Job) -> Ordering {
    (a.created_at, a.id).cmp(&(b.created_at, b.id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Status, Timestamp};
    use crate::store::order::deadline_order;
    use serde_json::json;

    const SEED_EXAMPLE: &str = include_str!("../../../tests/fixtures/seed-job.json");

    struct Dir {
        root: tempfile::TempDir,
    }

    impl Dir {
        fn new() -> Dir {
            let root = tempfile::tempdir().unwrap();
            fs::create_dir(root.path().join(JOBS_DIR)).unwrap();
            Dir { root }
        }

        fn path(&self) -> &Path {
            self.root.path()
        }

        fn job(&self, n: u128, status: &str, created: i64, started: Option<i64>) -> JobId {
            let id = JobId::from_uuid(uuid::Uuid::from_u128(n));
            let at = |s: i64| Timestamp::from_timestamp(1_800_000_000 + s, 0).unwrap();
            let value = json!({
                "type": "DiffusionJob",
                "job_id": id.to_string(),
                "model": "m",
                "dataset_zip": "z.zip",
                "status": status,
                "attempts": if started.is_some() { 1 } else { 0 },
                "created_at": crate::job::format_timestamp(&at(created)),
                "started_at": started.map(|s| crate::job::format_timestamp(&at(s))),
            });
            self.raw(&format!("{id}.json"), &serde_json::to_vec(&value).unwrap());
            id
        }

        fn raw(&self, name: &str, bytes: &[u8]) {
            fs::write(self.path().join(JOBS_DIR).join(name), bytes).unwrap();
        }

        fn queue(&self, running: &[JobId], queued: &[JobId]) {
            let q = QueueFile {
                running: running.iter().map(|id| id.to_string()).collect(),
                queued: queued.iter().map(|id| id.to_string()).collect(),
            };
            fs::write(
                self.path().join(QUEUE_FILE),
                serde_json::to_vec(&q).unwrap(),
            )
            .unwrap();
        }
    }

    #[test]
    fn running_first_in_start_order_then_queue_order_then_orphans() {
        let d = Dir::new();
        let r_late = d.job(1, "Running", 0, Some(50));
        let r_early = d.job(2, "Running", 1, Some(40));
        let q_b = d.job(3, "Queued", 2, None);
        let q_a = d.job(4, "Queued", 3, None);
        let orphan_new = d.job(5, "Queued", 9, None);
        let orphan_old = d.job(6, "Queued", 8, None);
        let done = d.job(7, "Completed", 0, Some(1));
        d.queue(&[r_late, r_early], &[q_a, q_b]);
        let rec = replay(d.path()).unwrap();
        assert_eq!(
            rec.order,
            vec![r_early, r_late, q_a, q_b, orphan_old, orphan_new]
        );
        assert_eq!(rec.jobs.len(), 7);
        assert!(rec.jobs.iter().any(|j| j.id == done));
        assert!(rec.damaged.is_empty() && rec.missing.is_empty());
        assert!(rec.queue_file.is_some());
    }

    #[test]
    fn without_queue_file_interrupted_jobs_lead_the_rebuilt_queue() {
        let d = Dir::new();
        let fresh = d.job(1, "Queued", 0, None);
        let interrupted_b = d.job(2, "Queued", 5, Some(30));
        let interrupted_a = d.job(3, "Queued", 6, Some(20));
        let running = d.job(4, "Running", 7, Some(40));
        let rec = replay(d.path()).unwrap();
        assert!(rec.queue_file.is_none());
        // All three were running once: by start time, then the job that never started.
        assert_eq!(
            rec.order,
            vec![interrupted_a, interrupted_b, running, fresh]
        );
    }

    #[test]
    fn an_interrupted_job_goes_first_even_where_queue_json_is_older() {
        let d = Dir::new();
        // queue.json was written while r ran; r was then written back as Queued (a graceful
        // stop) and the daemon died before queue.json followed.
        let r = d.job(1, "Queued", 0, Some(10));
        let b = d.job(2, "Queued", 1, None);
        let c = d.job(3, "Queued", 2, None);
        d.queue(&[r], &[b, c]);
        assert_eq!(replay(d.path()).unwrap().order, vec![r, b, c]);
    }

    #[test]
    fn running_and_interrupted_jobs_share_one_start_order() {
        // A crash between the renames of the boot's requeue batch: one job already written
        // back as Queued, the other still Running.
        let d = Dir::new();
        let first = d.job(1, "Queued", 0, Some(10));
        let second = d.job(2, "Running", 1, Some(20));
        let third = d.job(3, "Queued", 2, Some(30));
        let waiting = d.job(4, "Queued", 3, None);
        d.queue(&[], &[first, second, third, waiting]);
        assert_eq!(
            replay(d.path()).unwrap().order,
            vec![first, second, third, waiting]
        );
    }

    #[test]
    fn the_deadline_order_keeps_the_interrupted_head_and_sorts_the_rest_by_deadline() {
        let at = |s: i64| Timestamp::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let job = |n: u128,
                   status: Status,
                   created: i64,
                   started: Option<i64>,
                   deadline: Option<Timestamp>| {
            let mut j = crate::job::sample_job(n);
            j.status = status;
            j.created_at = Some(at(created));
            j.started_at = started.map(at);
            j.deadline = deadline;
            j
        };
        let jobs: HashMap<JobId, Job> = [
            // Interrupted jobs keep their places, whatever their deadlines.
            job(1, Status::Running, 0, Some(10), Some(at(9000))),
            job(2, Status::Queued, 1, Some(20), None),
            job(3, Status::Queued, 2, None, None),
            job(4, Status::Queued, 3, None, Some(at(500))),
            // The same second as 4 and later: behind it.
            job(
                5,
                Status::Queued,
                4,
                None,
                Some(at(500) + chrono::Duration::milliseconds(900)),
            ),
            job(6, Status::Queued, 5, None, Some(at(100))),
            job(7, Status::Queued, 6, None, None),
        ]
        .into_iter()
        .map(|j| (j.id, j))
        .collect();
        let ids = |ns: &[u128]| -> Vec<JobId> {
            ns.iter()
                .map(|n| JobId::from_uuid(uuid::Uuid::from_u128(*n)))
                .collect()
        };
        let order = requeue_order(&jobs, &[], &[], &mut Vec::new());
        assert_eq!(order, ids(&[1, 2, 3, 4, 5, 6, 7]));
        assert_eq!(deadline_order(&jobs, &order), ids(&[1, 2, 6, 4, 5, 3, 7]));
    }

    #[test]
    fn ids_without_job_files_are_reported_missing() {
        let d = Dir::new();
        let q = d.job(1, "Queued", 0, None);
        let ghost = JobId::from_uuid(uuid::Uuid::from_u128(99));
        d.queue(&[ghost], &[ghost, q]);
        fs::write(
            d.path().join(QUEUE_FILE),
            format!(r#"{{"running":["{ghost}"],"queued":["{ghost}","{q}","not-a-uuid"]}}"#),
        )
        .unwrap();
        let rec = replay(d.path()).unwrap();
        assert_eq!(rec.order, vec![q]);
        assert_eq!(
            rec.missing,
            vec![ghost.to_string(), "not-a-uuid".to_string()]
        );
    }

    #[test]
    fn damaged_files_are_reported_and_the_rest_loads() {
        let d = Dir::new();
        let good = d.job(0xabcdef, "Queued", 0, None);
        let other = JobId::from_uuid(uuid::Uuid::from_u128(2));
        d.raw(&format!("{other}.json"), b"");
        let truncated = JobId::from_uuid(uuid::Uuid::from_u128(3));
        d.raw(&format!("{truncated}.json"), &SEED_EXAMPLE.as_bytes()[..40]);
        let wrong_type = JobId::from_uuid(uuid::Uuid::from_u128(4));
        d.raw(
            &format!("{wrong_type}.json"),
            br#"{"type":"DiffusionJob","job_id":"00000000-0000-0000-0000-000000000004","dataset_zip":"z","model":1,"status":"Queued"}"#,
        );
        // A file named for one job that holds another: a duplicate of the good one.
        let impostor = JobId::from_uuid(uuid::Uuid::from_u128(5));
        let good_bytes = fs::read(d.path().join(JOBS_DIR).join(format!("{good}.json"))).unwrap();
        d.raw(&format!("{impostor}.json"), &good_bytes);
        d.raw("notes.txt", b"hello");
        d.raw(
            &format!("{}.json", good.to_string().to_uppercase()),
            &good_bytes,
        );
        fs::write(d.path().join(QUEUE_FILE), b"{\"running\": [").unwrap();
        d.raw(&fsio::temp_name(&format!("{good}.json")), b"{\"half");
        fs::write(d.path().join(fsio::temp_name(QUEUE_FILE)), b"").unwrap();

        let rec = replay(d.path()).unwrap();
        assert_eq!(rec.order, vec![good]);
        assert_eq!(rec.jobs.len(), 1);
        let damaged: Vec<String> = rec
            .damaged
            .iter()
            .map(|x| x.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(damaged.len(), 7, "{:?}", rec.damaged);
        for name in [
            format!("{other}.json"),
            format!("{truncated}.json"),
            format!("{wrong_type}.json"),
            format!("{impostor}.json"),
            "notes.txt".to_string(),
            QUEUE_FILE.to_string(),
        ] {
            assert!(damaged.contains(&name), "{name} in {damaged:?}");
        }
        let reasons: Vec<&str> = rec.damaged.iter().map(|x| x.reason.as_str()).collect();
        assert!(
            reasons.iter().any(|r| r.contains("empty file")),
            "{reasons:?}"
        );
        assert!(reasons.iter().any(|r| r.contains("model")), "{reasons:?}");
        assert!(
            reasons.iter().any(|r| r.contains("holds job")),
            "{reasons:?}"
        );
        assert_eq!(rec.temp_files.len(), 2);
        assert!(rec.queue_file.is_none());
    }

    #[test]
    fn entries_that_are_not_regular_files_are_set_aside_unread() {
        let d = Dir::new();
        let good = d.job(1, "Queued", 0, None);
        let jobs = d.path().join(JOBS_DIR);
        let fifo = jobs.join("00000000-0000-0000-0000-000000000002.json");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        std::os::unix::fs::symlink(
            "/etc/passwd",
            jobs.join("00000000-0000-0000-0000-000000000003.json"),
        )
        .unwrap();
        fs::create_dir(jobs.join(".x.json.tmp")).unwrap();
        fs::create_dir(d.path().join(fsio::temp_name(QUEUE_FILE))).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", d.path().join(QUEUE_FILE)).unwrap();
        let rec = replay(d.path()).unwrap();
        assert_eq!(rec.order, vec![good]);
        let reasons: Vec<String> = rec.damaged.iter().map(|x| x.reason.clone()).collect();
        assert_eq!(rec.damaged.len(), 5, "{reasons:?}");
        assert!(
            reasons.iter().any(|r| r.starts_with("a FIFO")),
            "{reasons:?}"
        );
        assert_eq!(
            reasons
                .iter()
                .filter(|r| r.starts_with("a symbolic link"))
                .count(),
            2
        );
        assert_eq!(
            reasons
                .iter()
                .filter(|r| r.starts_with("a directory"))
                .count(),
            2
        );
        assert!(rec.temp_files.is_empty());
    }

    #[test]
    fn the_seed_example_file_loads_as_a_running_job() {
        let d = Dir::new();
        d.raw(
            "123e4567-e89b-12d3-a456-426614174000.json",
            SEED_EXAMPLE.as_bytes(),
        );
        let rec = replay(d.path()).unwrap();
        assert!(rec.damaged.is_empty(), "{:?}", rec.damaged);
        assert_eq!(rec.order.len(), 1);
        assert_eq!(rec.jobs[0].status, Status::Running);
    }

    #[test]
    fn an_empty_or_missing_dir_is_an_empty_queue() {
        let dir = tempfile::tempdir().unwrap();
        let rec = replay(&dir.path().join("absent")).unwrap();
        assert!(rec.jobs.is_empty() && rec.order.is_empty() && rec.damaged.is_empty());
    }

    #[test]
    fn replay_changes_nothing_on_disk() {
        let d = Dir::new();
        d.job(1, "Running", 0, Some(1));
        d.raw("junk.json", b"{");
        fs::write(d.path().join(QUEUE_FILE), b"garbage").unwrap();
        let before = snapshot(d.path());
        replay(d.path()).unwrap();
        assert_eq!(snapshot(d.path()), before);
    }

    fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                out.extend(snapshot(&entry.path()));
            } else {
                out.push((entry.path(), fs::read(entry.path()).unwrap()));
            }
        }
        out.sort();
        out
    }
}
