//! The executor: the only code that spawns processes.
//!
//! A job runs as the configured argv, in a process group of its own, with its output going
//! straight to `logs/<job_id>.log` (the file is the trainer's stdout and stderr, so its output
//! never depends on the daemon reading a pipe). When the trainer ends, for whatever reason, the
//! executor sends one [`Event`] to the worker with the [`Outcome`].
//!
//! Stopping (cancel, timeout, shutdown) sends SIGTERM to the whole group, then SIGKILL after
//! `kill_grace`. Trainers never outlive the daemon: each is spawned with a parent-death signal
//! (SIGKILL when the daemon dies), and at boot [`orphans::kill_leftovers`] kills anything a
//! previous daemon of the same data dir left behind (its grandchildren, say).

pub mod orphans;

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::ExecutorConfig;
use crate::job::{Job, JobId, JobKind};
use crate::store::replay::{JOBS_DIR, LOGS_DIR};

/// The variable that marks a trainer as started by the daemon of one data dir.
pub const OWNER_ENV: &str = "TW_DATA_DIR";

/// Variables of the daemon's environment every trainer gets, so that ordinary programs work.
const BASE_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER"];

/// The longest last line quoted in an error message.
const LAST_LINE_MAX: usize = 400;

/// How a trainer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It exited by itself with this code.
    Exited(i32),
    /// A signal ended it (not one the executor sent).
    Signalled(i32),
    /// It ran past the timeout and was stopped.
    TimedOut(Duration),
    /// It was stopped on request (cancel or shutdown).
    Stopped,
    /// It could not be started at all.
    SpawnFailed(String),
}

/// A trainer has ended.
#[derive(Debug)]
pub struct Event {
    pub job_id: JobId,
    pub outcome: Outcome,
    /// The last non-empty line the trainer printed in this attempt, if any.
    pub last_line: Option<String>,
}

impl Event {
    /// The job's error message for this outcome, or `None` for a success.
    pub fn error_message(&self) -> Option<String> {
        let said = match &self.last_line {
            Some(line) => format!("; last output: {line}"),
            None => "; no output".to_string(),
        };
        match &self.outcome {
            Outcome::Exited(0) => None,
            Outcome::Exited(code) => Some(format!("trainer exited with status {code}{said}")),
            Outcome::Signalled(sig) => Some(format!(
                "trainer was killed by signal {sig} ({}){said}",
                signal_name(*sig)
            )),
            Outcome::TimedOut(after) => Some(format!(
                "timed out after {}{said}",
                humantime::format_duration(*after)
            )),
            Outcome::Stopped => Some("trainer was stopped".into()),
            Outcome::SpawnFailed(e) => Some(format!("could not start the trainer: {e}")),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "other",
    }
}

/// A running trainer, as the worker holds it.
#[derive(Debug)]
pub struct Execution {
    stop: CancellationToken,
}

impl Execution {
    /// Asks the trainer to stop (SIGTERM, then SIGKILL after the grace). Its [`Event`] still
    /// follows, with [`Outcome::Stopped`] unless it had already ended by itself.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Spawns trainers and reports how they end.
pub struct Executor {
    config: ExecutorConfig,
    data_dir: PathBuf,
    events: mpsc::Sender<Event>,
    /// Every trainer's task, so that the daemon can wait for all of them at shutdown.
    tracker: TaskTracker,
}

impl Executor {
    pub fn new(
        config: ExecutorConfig,
        data_dir: PathBuf,
        events: mpsc::Sender<Event>,
        tracker: TaskTracker,
    ) -> Executor {
        Executor {
            config,
            data_dir,
            events,
            tracker,
        }
    }

    /// Where a job's trainer output goes.
    pub fn log_path(&self, id: JobId) -> PathBuf {
        self.data_dir.join(LOGS_DIR).join(format!("{id}.log"))
    }

    /// Starts the trainer for `job` (already durable as Running) in the background.
    ///
    /// Must be called from a runtime worker thread: the parent-death signal is tied to the
    /// thread that forks, and the runtime's worker threads live as long as the daemon.
    pub fn start(&self, job: &Job) -> Execution {
        let stop = CancellationToken::new();
        let spec = Spec {
            job_id: job.id,
            argv: self.config.command.clone(),
            env: self.environment(job),
            log_path: self.log_path(job.id),
            attempt: job.attempts,
            timeout: self.config.timeout,
            kill_grace: self.config.kill_grace,
        };
        let events = self.events.clone();
        let token = stop.clone();
        self.tracker.spawn(async move {
            let job_id = spec.job_id;
            let (outcome, last_line) = spec.run(token).await;
            // The worker may be gone at the very end of a shutdown; nothing is lost then,
            // since the job file still says Running and replay handles it.
            let _ = events
                .send(Event {
                    job_id,
                    outcome,
                    last_line,
                })
                .await;
        });
        Execution { stop }
    }

    /// The trainer's environment: a small base, the names in `pass_env`, the job's fields.
    fn environment(&self, job: &Job) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        for name in BASE_ENV
            .iter()
            .copied()
            .chain(self.config.pass_env.iter().map(String::as_str))
        {
            if let Ok(value) = std::env::var(name) {
                env.push((name.to_string(), value));
            }
        }
        let (dataset, dataset_type, file_format, dataset_zip, model_type) = match &job.kind {
            JobKind::Text {
                dataset,
                dataset_type,
                file_format,
            } => (
                dataset.clone(),
                dataset_type.as_json_text().to_string(),
                file_format.as_str().to_string(),
                String::new(),
                String::new(),
            ),
            JobKind::Diffusion {
                dataset_zip,
                model_type,
            } => (
                String::new(),
                String::new(),
                String::new(),
                dataset_zip.clone(),
                model_type.as_str().to_string(),
            ),
        };
        let job_file = self
            .data_dir
            .join(JOBS_DIR)
            .join(format!("{}.json", job.id));
        for (name, value) in [
            ("JOB_ID", job.id.to_string()),
            ("JOB_TYPE", job.kind.type_name().to_string()),
            ("JOB_FILE", job_file.to_string_lossy().into_owned()),
            ("MODEL", job.model.clone()),
            ("DATASET", dataset),
            ("DATASET_TYPE", dataset_type),
            ("FILE_FORMAT", file_format),
            ("DATASET_ZIP", dataset_zip),
            ("MODEL_TYPE", model_type),
            (
                "EXPECTED_REPO_NAME",
                job.expected_repo_name.clone().unwrap_or_default(),
            ),
            ("ATTEMPT", job.attempts.to_string()),
            (OWNER_ENV, self.data_dir.to_string_lossy().into_owned()),
        ] {
            env.push((name.to_string(), value));
        }
        // Only with GPU accounting: then a job sees exactly its GPUs (none, for a job that
        // asked for none); without it, the trainer's environment decides.
        if let Some(ids) = &job.gpu_ids {
            let list: Vec<String> = ids.iter().map(u32::to_string).collect();
            env.push(("CUDA_VISIBLE_DEVICES".to_string(), list.join(",")));
        }
        env
    }
}

/// Everything one run of a trainer needs, moved into its task.
struct Spec {
    job_id: JobId,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    log_path: PathBuf,
    attempt: u32,
    timeout: Duration,
    kill_grace: Duration,
}

impl fmt::Debug for Spec {
    // The environment may hold secrets (pass_env): never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spec")
            .field("job_id", &self.job_id)
            .field("argv", &self.argv)
            .finish_non_exhaustive()
    }
}

impl Spec {
    async fn run(self, stop: CancellationToken) -> (Outcome, Option<String>) {
        let job_id = self.job_id;
        let (log, offset) = match open_log(&self.log_path, self.attempt) {
            Ok(opened) => opened,
            Err(e) => {
                let msg = format!("cannot open log {}: {e}", self.log_path.display());
                warn!(%job_id, error = %msg, "trainer not started");
                return (Outcome::SpawnFailed(msg), None);
            }
        };
        let mut child = match self.spawn(&log) {
            Ok(child) => child,
            Err(e) => {
                warn!(%job_id, error = %e, "trainer could not be started");
                let _ = writeln!(&log, "==> could not start the trainer: {e}");
                return (Outcome::SpawnFailed(e.to_string()), None);
            }
        };
        let pid = child.id();
        info!(%job_id, pid, attempt = self.attempt, "trainer started");
        let started = Instant::now();

        let outcome = tokio::select! {
            status = child.wait() => match status {
                Ok(status) => from_status(status),
                Err(e) => Outcome::SpawnFailed(format!("cannot wait for the trainer: {e}")),
            },
            _ = tokio::time::sleep(self.timeout) => {
                warn!(%job_id, timeout = %humantime::format_duration(self.timeout), "trainer timed out; stopping it");
                terminate(&mut child, pid, self.kill_grace).await;
                Outcome::TimedOut(self.timeout)
            }
            _ = stop.cancelled() => {
                info!(%job_id, "stopping trainer");
                terminate(&mut child, pid, self.kill_grace).await;
                Outcome::Stopped
            }
        };
        // Whatever the leader did, nothing of its group may stay behind.
        if let Some(pid) = pid {
            kill_group(pid, libc::SIGKILL);
        }
        let last_line = last_line(&self.log_path, offset);
        let _ = writeln!(
            &log,
            "==> trainer ended after {}: {}",
            humantime::format_duration(Duration::from_secs(started.elapsed().as_secs())),
            describe(&outcome)
        );
        info!(%job_id, outcome = describe(&outcome), "trainer ended");
        (outcome, last_line)
    }

    fn spawn(&self, log: &File) -> io::Result<Child> {
        let mut command = Command::new(&self.argv[0]);
        command
            .args(&self.argv[1..])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .process_group(0)
            .kill_on_drop(false);
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe system calls (prctl, getppid, kill on itself).
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The daemon may have died between fork and prctl; then nobody would ever
                // send the signal, so act as if it had been sent.
                if libc::getppid() == 1 {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
                Ok(())
            });
        }
        command.spawn()
    }
}

/// Opens the log for appending and writes the attempt's header; returns the offset at which
/// this attempt's own output starts.
fn open_log(path: &Path, attempt: u32) -> io::Result<(File, u64)> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(
        file,
        "==> attempt {attempt} started at {}",
        crate::job::format_timestamp(&chrono::Utc::now())
    )?;
    let offset = file.seek(SeekFrom::End(0))?;
    Ok((file, offset))
}

fn from_status(status: ExitStatus) -> Outcome {
    match (status.code(), status.signal()) {
        (Some(code), _) => Outcome::Exited(code),
        (None, Some(sig)) => Outcome::Signalled(sig),
        (None, None) => Outcome::Exited(-1),
    }
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Exited(code) => format!("exit status {code}"),
        Outcome::Signalled(sig) => format!("killed by signal {sig} ({})", signal_name(*sig)),
        Outcome::TimedOut(after) => {
            format!("timed out after {}", humantime::format_duration(*after))
        }
        Outcome::Stopped => "stopped on request".into(),
        Outcome::SpawnFailed(e) => format!("not started: {e}"),
    }
}

/// SIGTERM to the group, SIGKILL after the grace, and wait for the leader either way.
async fn terminate(child: &mut Child, pid: Option<u32>, grace: Duration) {
    let Some(pid) = pid else {
        return;
    };
    kill_group(pid, libc::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        kill_group(pid, libc::SIGKILL);
        let _ = child.wait().await;
    }
}

/// Sends `signal` to the process group led by `pid`. A group that is already gone is fine.
fn kill_group(pid: u32, signal: i32) {
    let Ok(pgid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill with a negative pid only sends a signal; no memory is involved.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// The last non-empty line written after `offset`, shortened for an error message.
fn last_line(path: &Path, offset: u64) -> Option<String> {
    const TAIL: u64 = 64 * 1024;
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let start = offset.max(len.saturating_sub(TAIL));
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut bytes = Vec::new();
    file.take(TAIL).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let line = text
        .split(['\n', '\r'])
        .map(str::trim)
        .rfind(|l| !l.is_empty())?;
    let mut line = line.to_string();
    if line.chars().count() > LAST_LINE_MAX {
        line = line.chars().take(LAST_LINE_MAX).collect::<String>() + "…";
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_line_reads_only_this_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        std::fs::write(&path, "old attempt\n").unwrap();
        let (mut file, offset) = open_log(&path, 2).unwrap();
        assert_eq!(last_line(&path, offset), None);
        file.write_all(b"step 1\nstep 2\n\n  \n").unwrap();
        assert_eq!(last_line(&path, offset).as_deref(), Some("step 2"));
        file.write_all("é".repeat(1000).as_bytes()).unwrap();
        let long = last_line(&path, offset).unwrap();
        assert_eq!(long.chars().count(), LAST_LINE_MAX + 1);
    }

    #[test]
    fn error_messages_say_how_it_ended() {
        let event = |outcome| Event {
            job_id: JobId::new_random(),
            outcome,
            last_line: Some("CUDA out of memory".into()),
        };
        assert_eq!(event(Outcome::Exited(0)).error_message(), None);
        let msg = event(Outcome::Exited(3)).error_message().unwrap();
        assert!(
            msg.contains("status 3") && msg.contains("CUDA out of memory"),
            "{msg}"
        );
        let msg = event(Outcome::Signalled(9)).error_message().unwrap();
        assert!(msg.contains("SIGKILL"), "{msg}");
        let msg = event(Outcome::TimedOut(Duration::from_secs(90)))
            .error_message()
            .unwrap();
        assert!(msg.starts_with("timed out after 1m 30s"), "{msg}");
    }
}
