//! `training-worker check`: an offline validator of a data dir, in the spirit of SQLite's
//! `integrity_check`. It reads, never writes, and reports every problem it finds: files the
//! daemon would quarantine, leftovers of interrupted writes, a `queue.json` that disagrees
//! with the job files, job records whose fields contradict their status.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;

use crate::job::{Job, JobId, Status};
use crate::layout::{
    JOBS_DIR, LOCK_FILE, LOGS_DIR, QUARANTINE_DIR, QUEUE_FILE, RUN_DIR, SECRETS_DIR,
};
use crate::store::files::replay;
use crate::store::order::{deadline_order, requeue_order};

/// What `check` found.
#[derive(Debug, Default)]
pub struct Report {
    /// Things that are wrong; any of them makes `check` exit non-zero.
    pub problems: Vec<String>,
    /// Things worth knowing that are not wrong (quarantined files, a daemon holding the lock).
    pub notes: Vec<String>,
    /// Readable jobs by status.
    pub counts: Vec<(Status, usize)>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// The report as text, one finding per line, a summary last.
    pub fn render(&self, data_dir: &Path) -> String {
        let mut out = String::new();
        for problem in &self.problems {
            let _ = writeln!(out, "problem: {problem}");
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        let counts: Vec<String> = self
            .counts
            .iter()
            .map(|(status, n)| format!("{n} {}", status.as_str().to_lowercase()))
            .collect();
        let _ = writeln!(
            out,
            "{}: {} problem(s); jobs: {}",
            data_dir.display(),
            self.problems.len(),
            if counts.is_empty() {
                "none".to_string()
            } else {
                counts.join(", ")
            }
        );
        out
    }
}

/// Checks the data dir. Only an unreadable directory is an error; everything else is a
/// finding in the report.
pub fn check(data_dir: &Path) -> io::Result<Report> {
    let meta = fs::metadata(data_dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("{} is not a directory", data_dir.display()),
        ));
    }
    let mut report = Report::default();
    // What `serve` refuses to start on (Store::open creates the three directories, the lock
    // is opened as a file): reported here so that check never passes a dir serve rejects.
    let mut layout_ok = true;
    for dir in [JOBS_DIR, LOGS_DIR, QUARANTINE_DIR] {
        if let Some(what) = kind_other_than(&data_dir.join(dir), Kind::Dir) {
            report.problems.push(format!(
                "{dir}: {what} where a directory belongs; serve refuses to start"
            ));
            layout_ok = false;
        }
    }
    if let Some(what) = kind_other_than(&data_dir.join(LOCK_FILE), Kind::File) {
        report.problems.push(format!(
            "{LOCK_FILE}: {what} where the lock file belongs; serve refuses to start"
        ));
        layout_ok = false;
    }
    let markers = [JOBS_DIR, QUEUE_FILE, LOCK_FILE];
    if !markers
        .iter()
        .any(|name| fs::symlink_metadata(data_dir.join(name)).is_ok())
    {
        report.problems.push(format!(
            "not a data dir: it has no {JOBS_DIR}/, {QUEUE_FILE} or {LOCK_FILE} (no daemon ever ran on it; check the path)"
        ));
        return Ok(report);
    }
    // Replay cannot read job files from a `jobs` that is not a directory; the problem with
    // it is already reported.
    if !layout_ok && kind_other_than(&data_dir.join(JOBS_DIR), Kind::Dir).is_some() {
        return Ok(report);
    }
    let recovered = replay::replay(data_dir)?;
    let relative = |path: &Path| {
        path.strip_prefix(data_dir)
            .unwrap_or(path)
            .display()
            .to_string()
    };

    for damaged in &recovered.damaged {
        report
            .problems
            .push(format!("{}: {}", relative(&damaged.path), damaged.reason));
    }
    for temp in &recovered.temp_files {
        report.problems.push(format!(
            "{}: temporary file left by an interrupted write",
            relative(temp)
        ));
    }
    for id in &recovered.missing {
        report
            .problems
            .push(format!("{QUEUE_FILE}: names {id}, which has no job file"));
    }

    for job in &recovered.jobs {
        for issue in record_issues(job) {
            report
                .problems
                .push(format!("{JOBS_DIR}/{}.json: {issue}", job.id));
        }
    }

    let queue_damaged = recovered
        .damaged
        .iter()
        .any(|d| d.path == data_dir.join(QUEUE_FILE));
    if !queue_damaged {
        check_queue_file(&recovered, &mut report);
    }

    for entry in fs::read_dir(data_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let known = [
            JOBS_DIR,
            LOGS_DIR,
            SECRETS_DIR,
            RUN_DIR,
            QUARANTINE_DIR,
            QUEUE_FILE,
            LOCK_FILE,
            "README.md",
            ".gitignore",
        ];
        if !known.contains(&name.as_str()) && !crate::store::files::fsio::is_temp_name(&name) {
            report
                .notes
                .push(format!("{name}: not a file of the daemon's; ignored by it"));
        }
    }
    let quarantined = fs::read_dir(data_dir.join(QUARANTINE_DIR))
        .map(|entries| entries.count())
        .unwrap_or(0);
    if quarantined > 0 {
        report.notes.push(format!(
            "{QUARANTINE_DIR}/ holds {quarantined} file(s) set aside at earlier boots"
        ));
    }
    if lock_is_held(data_dir) {
        report.notes.push(
            "a daemon is running on this data dir; files may change while they are read".into(),
        );
    }

    let mut counts: HashMap<Status, usize> = HashMap::new();
    for job in &recovered.jobs {
        *counts.entry(job.status).or_default() += 1;
    }
    report.counts = Status::ALL
        .into_iter()
        .filter_map(|s| counts.get(&s).map(|n| (s, *n)))
        .collect();
    Ok(report)
}

/// Contradictions inside one job record.
fn record_issues(job: &Job) -> Vec<String> {
    let mut issues = Vec::new();
    match job.status {
        Status::Running => {
            if job.started_at.is_none() && job.created_at.is_some() {
                issues.push("Running without started_at".to_string());
            }
            if job.finished_at.is_some() {
                issues.push("Running but has finished_at".to_string());
            }
        }
        Status::Queued => {
            if job.finished_at.is_some() {
                issues.push("Queued but has finished_at".to_string());
            }
        }
        Status::Completed | Status::Failed | Status::Cancelled => {
            if job.finished_at.is_none() && job.created_at.is_some() {
                issues.push(format!("{} without finished_at", job.status));
            }
            if job.status != Status::Completed && job.error_message.is_none() {
                issues.push(format!("{} without error_message", job.status));
            }
        }
    }
    if let (Some(created), Some(updated)) = (job.created_at, job.updated_at)
        && updated < created
    {
        issues.push("updated_at is before created_at".to_string());
    }
    issues
}

/// Compares `queue.json` (as replay read it; a damaged one is reported as such) with the job
/// files. A missing one is a problem when there are unfinished jobs.
fn check_queue_file(recovered: &replay::Recovered, report: &mut Report) {
    let Some(file) = &recovered.queue_file else {
        if !recovered.order.is_empty() {
            report.problems.push(format!(
                "{QUEUE_FILE}: missing while {} job(s) are unfinished",
                recovered.order.len()
            ));
        }
        return;
    };

    let by_id: HashMap<JobId, &Job> = recovered.jobs.iter().map(|j| (j.id, j)).collect();
    let mut seen = HashSet::new();
    for text in file.running.iter().chain(&file.queued) {
        if !seen.insert(text.as_str()) {
            report
                .problems
                .push(format!("{QUEUE_FILE}: names {text} more than once"));
        }
    }
    let listed = |list: &[String]| -> Vec<JobId> {
        list.iter()
            .filter_map(|t| t.parse::<JobId>().ok())
            .filter(|id| by_id.contains_key(id))
            .collect()
    };
    let running = listed(&file.running);
    let queued = listed(&file.queued);
    // queue.json follows the job files a moment later, so after a crash it may lag them.
    // Replay settles that from the job files, so a lag is worth a note, not a problem.
    let mut lag = Vec::new();
    for id in &running {
        let status = by_id[id].status;
        if status != Status::Running {
            lag.push(format!("lists {id} as running; its job file says {status}"));
        }
    }
    for id in &queued {
        let status = by_id[id].status;
        if status != Status::Queued {
            lag.push(format!("lists {id} as queued; its job file says {status}"));
        }
    }
    let listed_set: HashSet<JobId> = running.iter().chain(&queued).copied().collect();
    for id in &recovered.order {
        if !listed_set.contains(id) {
            lag.push(format!("does not list {id}, which is {}", by_id[id].status));
        }
    }
    for finding in lag {
        report.notes.push(format!(
            "{QUEUE_FILE} lags the job files (normal after a crash; the next boot rewrites it): {finding}"
        ));
    }
    // The order the job files alone give; queue.json must agree with it, or the queue
    // could not be rebuilt exactly if queue.json were lost.
    let jobs: HashMap<JobId, Job> = recovered.jobs.iter().map(|j| (j.id, j.clone())).collect();
    let expected = requeue_order(&jobs, &[], &[], &mut Vec::new());
    let actual: Vec<JobId> = running
        .iter()
        .chain(&queued)
        .copied()
        .filter(|id| by_id[id].status == Status::Running || by_id[id].status == Status::Queued)
        .collect();
    // Under `[worker] order = "deadline"` the queued jobs stand by deadline instead, which
    // the job files give too.
    let by_deadline = deadline_order(&jobs, &expected);
    if actual.len() == expected.len() && actual != expected && actual != by_deadline {
        report.problems.push(format!(
            "{QUEUE_FILE}: order differs from both orders the job files give (running by start, then queued by arrival or by deadline)"
        ));
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
}

/// What is at `path` when it exists and is not of `kind` (symbolic links followed, as
/// `serve` follows them), e.g. "a regular file".
fn kind_other_than(path: &Path, kind: Kind) -> Option<&'static str> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A dangling symbolic link: serve cannot use it either.
            return fs::symlink_metadata(path)
                .is_ok()
                .then_some("a symbolic link to nothing");
        }
        Err(_) => return Some("something that cannot be read"),
    };
    match kind {
        Kind::Dir if meta.is_dir() => None,
        Kind::File if meta.is_file() => None,
        _ if meta.is_dir() => Some("a directory"),
        _ if meta.is_file() => Some("a regular file"),
        _ => Some("a special file"),
    }
}

fn lock_is_held(data_dir: &Path) -> bool {
    let Ok(file) = fs::File::open(data_dir.join(LOCK_FILE)) else {
        return false;
    };
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(fs::TryLockError::WouldBlock) => true,
        Err(fs::TryLockError::Error(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::files::Store;
    use crate::store::{Change, Placement};
    use tokio_util::sync::CancellationToken;

    fn job(n: u128) -> Job {
        crate::job::sample_job(n)
    }

    #[tokio::test]
    async fn a_data_dir_written_by_the_store_is_clean() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Store::open(dir.path(), CancellationToken::new()).unwrap();
        let (a, b) = (job(1), job(2));
        let mut done = job(3);
        done.start(chrono::Utc::now(), None);
        done.finish(Status::Completed, None, chrono::Utc::now());
        opened
            .handle
            .commit(vec![
                Change {
                    job: a,
                    placement: Placement::Queued(10),
                },
                Change {
                    job: b,
                    placement: Placement::Queued(11),
                },
                Change {
                    job: done,
                    placement: Placement::Off,
                },
            ])
            .await
            .unwrap();
        drop(opened.handle);
        opened.thread.join().unwrap();
        let report = check(dir.path()).unwrap();
        assert!(report.is_clean(), "{}", report.render(dir.path()));
        assert!(report.notes.is_empty(), "{:?}", report.notes);
        assert_eq!(
            report.counts,
            vec![(Status::Queued, 2), (Status::Completed, 1)]
        );
        assert!(!report.notes.iter().any(|n| n.contains("daemon is running")));
    }

    #[test]
    fn every_kind_of_damage_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = dir.path().join(JOBS_DIR);
        fs::create_dir_all(&jobs).unwrap();
        let a = job(1);
        fs::write(jobs.join(format!("{}.json", a.id)), a.to_file_bytes()).unwrap();
        let mut contradictory = job(2);
        contradictory.status = Status::Failed;
        fs::write(
            jobs.join(format!("{}.json", contradictory.id)),
            contradictory.to_file_bytes(),
        )
        .unwrap();
        fs::write(jobs.join(format!("{}.json", job(3).id)), b"").unwrap();
        fs::write(jobs.join(".x.json.tmp"), b"{").unwrap();
        let ghost = job(4).id;
        fs::write(
            dir.path().join(QUEUE_FILE),
            format!(r#"{{"running": ["{}"], "queued": ["{ghost}"]}}"#, a.id),
        )
        .unwrap();
        let report = check(dir.path()).unwrap();
        let text = report.render(dir.path());
        assert!(!report.is_clean());
        for expected in [
            "empty file",
            "temporary file",
            &format!("names {ghost}, which has no job file"),
            "Failed without finished_at",
            "Failed without error_message",
        ] {
            assert!(text.contains(expected), "{expected:?} in\n{text}");
        }
        assert!(
            report.notes.iter().any(|n| n.contains(&format!(
                "lists {} as running; its job file says Queued",
                a.id
            ))),
            "{text}"
        );
        // check only reads.
        assert!(jobs.join(".x.json.tmp").exists());
    }

    #[test]
    fn queue_json_may_be_in_arrival_or_deadline_order_and_in_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = dir.path().join(JOBS_DIR);
        fs::create_dir_all(&jobs).unwrap();
        let t0 = chrono::Utc::now();
        let mut made = Vec::new();
        for (n, deadline_hours) in [(1, None), (2, Some(5)), (3, Some(2))] {
            let mut job = job(n);
            job.accept(t0 + chrono::Duration::seconds(n as i64));
            job.deadline = deadline_hours.map(|h| t0 + chrono::Duration::hours(h));
            fs::write(jobs.join(format!("{}.json", job.id)), job.to_file_bytes()).unwrap();
            made.push(job.id);
        }
        let (a, b, c) = (made[0], made[1], made[2]);
        for (queued, clean) in [([a, b, c], true), ([c, b, a], true), ([b, a, c], false)] {
            fs::write(
                dir.path().join(QUEUE_FILE),
                format!(
                    r#"{{"running": [], "queued": ["{}", "{}", "{}"]}}"#,
                    queued[0], queued[1], queued[2]
                ),
            )
            .unwrap();
            let report = check(dir.path()).unwrap();
            assert_eq!(report.is_clean(), clean, "{}", report.render(dir.path()));
        }
    }

    #[test]
    fn what_serve_refuses_to_start_on_is_a_problem_naming_the_path() {
        let cases: &[(&str, bool, &str)] = &[
            (
                LOGS_DIR,
                false,
                "logs: a regular file where a directory belongs",
            ),
            (
                QUARANTINE_DIR,
                false,
                "quarantine: a regular file where a directory belongs",
            ),
            (
                JOBS_DIR,
                false,
                "jobs: a regular file where a directory belongs",
            ),
            (
                LOCK_FILE,
                true,
                "lock: a directory where the lock file belongs",
            ),
        ];
        for (name, as_dir, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(dir.path().join(JOBS_DIR)).ok();
            let path = dir.path().join(name);
            let _ = fs::remove_dir(&path);
            if *as_dir {
                fs::create_dir(&path).unwrap();
            } else {
                fs::write(&path, b"x").unwrap();
            }
            let report = check(dir.path()).unwrap();
            let text = report.render(dir.path());
            assert!(!report.is_clean(), "{name}: {text}");
            assert!(text.contains(&format!("problem: {expected}")), "{text}");
            assert!(text.contains("serve refuses to start"), "{text}");
        }
    }

    #[test]
    fn a_directory_that_is_not_a_data_dir_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let report = check(dir.path()).unwrap();
        assert!(!report.is_clean());
        assert!(
            report.problems[0].starts_with("not a data dir"),
            "{:?}",
            report.problems
        );
        fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
        fs::create_dir(dir.path().join("src")).unwrap();
        assert!(!check(dir.path()).unwrap().is_clean());
        // A daemon that was stopped right after taking the lock left a data dir all the same.
        fs::remove_dir(dir.path().join("src")).unwrap();
        fs::remove_file(dir.path().join("notes.txt")).unwrap();
        fs::write(dir.path().join(LOCK_FILE), b"").unwrap();
        let report = check(dir.path()).unwrap();
        assert!(report.is_clean(), "{}", report.render(dir.path()));
    }

    #[test]
    fn a_missing_queue_file_with_unfinished_jobs_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = dir.path().join(JOBS_DIR);
        fs::create_dir_all(&jobs).unwrap();
        let a = job(1);
        fs::write(jobs.join(format!("{}.json", a.id)), a.to_file_bytes()).unwrap();
        let report = check(dir.path()).unwrap();
        assert!(report.render(dir.path()).contains("queue.json: missing"));
        assert!(check(&dir.path().join("absent")).is_err());
    }
}
