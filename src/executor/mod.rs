//! The executor: the only code that spawns processes (trainers, and the docker CLI).
//!
//! A job runs as a pipeline of stages: `[[executor.stages]]`, or the single
//! `executor.command`. A process stage runs its argv in a process group of its own; a docker
//! stage runs a container through the docker CLI ([`docker`]). Either way the output goes to
//! `logs/<job_id>.log` (the file is the process's stdout and stderr, or what `docker logs -f`
//! writes, so it never depends on the daemon reading a pipe), each stage under a header.
//!
//! Between stages the executor asks the worker to record the finished stage durably
//! ([`StageDone`]) and waits for that before the next one starts: a job recovered after a
//! crash resumes at its first stage not recorded, so a recorded stage never runs twice.
//! When the pipeline ends, for whatever reason, the executor sends one [`Event`] to the
//! worker with the [`Outcome`].
//!
//! Stopping (cancel, timeout, shutdown) sends SIGTERM to the whole group, then SIGKILL after
//! `kill_grace`. Trainers never outlive the daemon: each is spawned with a parent-death signal
//! (SIGKILL when the daemon dies), and at boot [`orphans::kill_leftovers`] kills anything a
//! previous daemon of the same data dir left behind (its grandchildren, say).

pub mod docker;
pub mod gpus;
pub mod orphans;
pub mod supervisor;
pub mod template;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{ExecutorConfig, Stage, StageRun};
use crate::job::{Job, JobId};
use crate::layout::{LOGS_DIR, RUN_DIR, SECRETS_DIR};

/// The variable a job's GitHub token reaches its stages as.
pub const GITHUB_TOKEN_ENV: &str = "GITHUB_TOKEN";
use docker::DockerCli;
use supervisor::{LogOffsets, Report, Supervised};
use template::{Template, Values};

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
    /// It could not be started at all: its program could not be run (missing, no
    /// descriptors left). The box's trouble, not the job's: the job goes back to the queue.
    SpawnFailed(String),
    /// Its start was refused: `docker run` ran and failed (an unknown image, say). The
    /// job fails.
    Refused(String),
    /// The job's time budget (`hours_to_complete`) ran out while it ran; it ran this long.
    OutOfTime(Duration),
    /// Its container could no longer be followed (the docker CLI failed).
    Lost(String),
    /// Its supervisor stopped it because this node's lease on the job was not renewed in
    /// time (the daemon paused, or cut off from the database).
    LeaseExpired,
}

/// A trainer has ended.
#[derive(Debug)]
pub struct Event {
    pub job_id: JobId,
    pub outcome: Outcome,
    /// The last non-empty line the trainer printed in this attempt, if any.
    pub last_line: Option<String>,
    /// The stage that ended the pipeline, when stages are configured.
    pub stage: Option<String>,
    /// Told once the job's end is durable; dropped when the worker records something else
    /// (a cancel decided first). The `always` stages after a failure wait for it.
    pub recorded: Option<oneshot::Sender<()>>,
}

/// A stage has finished; the executor waits for `ack` (sent once the stage is recorded in
/// the job file) before it starts the next one. A dropped `ack` means: do not go on.
#[derive(Debug)]
pub struct StageDone {
    pub job_id: JobId,
    pub stage: String,
    /// Not an end but a first start, of a stage with a time budget: recorded (in
    /// `stages_started`) before the stage runs.
    pub started: Option<crate::job::Timestamp>,
    pub ack: oneshot::Sender<()>,
}

/// Where the executor reports to the worker.
#[derive(Clone, Debug)]
pub struct Reports {
    pub events: mpsc::Sender<Event>,
    pub stage_done: mpsc::Sender<StageDone>,
    /// A trainer of this job is running: trainers can be started again.
    pub started: mpsc::Sender<JobId>,
    /// A stage of this job printed this W&B address (the first of its stage).
    pub wandb: mpsc::Sender<(JobId, String)>,
}

impl Event {
    /// The job's error message for this outcome, or `None` for a success.
    pub fn error_message(&self) -> Option<String> {
        let message = self.outcome_message()?;
        Some(match &self.stage {
            Some(stage) => format!("stage {stage}: {message}"),
            None => message,
        })
    }

    fn outcome_message(&self) -> Option<String> {
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
            Outcome::SpawnFailed(e) | Outcome::Refused(e) => {
                Some(format!("could not start the trainer: {e}"))
            }
            Outcome::OutOfTime(after) => Some(format!(
                "the time budget (hours_to_complete) ran out; stopped after {}{said}",
                humantime::format_duration(*after)
            )),
            Outcome::Lost(e) => Some(format!("lost track of the trainer: {e}{said}")),
            Outcome::LeaseExpired => Some(format!(
                "stopped: this node could not renew its lease on the job in time{said}"
            )),
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
    lease: watch::Sender<Option<LeaseWindow>>,
}

impl Execution {
    /// Asks the trainer to stop (SIGTERM, then SIGKILL after the grace). Its [`Event`] still
    /// follows, with [`Outcome::Stopped`] unless it had already ended by itself.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The node's lease on the job holds `window` from now: unless renewed again, the
    /// trainer's supervisor stops it by then (with `grace` between SIGTERM and SIGKILL,
    /// or `docker kill` for a container) and its end says [`Outcome::LeaseExpired`].
    pub fn renew(&self, window: Duration, grace: Duration) {
        self.lease.send_replace(Some(LeaseWindow {
            until: std::time::Instant::now() + window,
            grace,
        }));
    }
}

/// Until when a trainer may run without a renewal, and how it is stopped then.
#[derive(Clone, Copy, Debug)]
pub struct LeaseWindow {
    pub until: std::time::Instant,
    pub grace: Duration,
}

/// The watch a pipeline's stages read their lease from; `None` until the first renewal
/// (the file store, or a node's first turn): no lease, no watchdog.
pub type Lease = watch::Receiver<Option<LeaseWindow>>;

/// The next lease window the worker sets; never, once its sender is gone.
async fn next_lease(lease: &mut Lease) -> Option<LeaseWindow> {
    if lease.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    *lease.borrow_and_update()
}

/// Tells a supervisor the lease window, if there is one.
async fn send_lease(supervised: &mut Supervised, window: Option<LeaseWindow>) {
    if let Some(window) = window {
        let ttl = window
            .until
            .saturating_duration_since(std::time::Instant::now());
        supervised.renew(ttl, window.grace).await;
    }
}

/// The stage a job of these stages is at: its first one not recorded as done that runs for
/// its type.
pub fn current_stage<'a>(stages: &'a [Stage], job: &Job) -> Option<&'a Stage> {
    stages
        .iter()
        .find(|s| !job.stages_done.contains(&s.name) && s.runs_for(job.kind.type_name()))
}

/// The name of the one stage a single `executor.command` makes.
const SINGLE_STAGE: &str = "trainer";

/// Spawns trainers and reports how they end.
pub struct Executor {
    context: Arc<Context>,
    /// Every trainer's task, so that the daemon can wait for all of them at shutdown.
    tracker: TaskTracker,
}

/// What every pipeline run shares.
struct Context {
    /// The stages, in order; one unnamed-in-logs stage for a single command.
    stages: Vec<Stage>,
    /// Whether the stages come from `[[executor.stages]]`: then they are named in logs and
    /// errors, and each finished one is recorded.
    staged: bool,
    data_dir: PathBuf,
    timeout: Duration,
    kill_grace: Duration,
    pass_env: Vec<String>,
    /// A job's log is rotated at this size (0: never); see [`supervisor::LogWriter`].
    max_log_bytes: u64,
    /// The program that runs as every trainer's supervisor.
    supervisor: PathBuf,
    /// The soft descriptor limit trainers get; `None`: the daemon's.
    trainer_nofile: Option<u64>,
    docker: Option<DockerCli>,
    reports: Reports,
    /// Stops the `always` stages that run after a job's failure, which no [`Execution`]
    /// holds any more: at shutdown.
    cleanups: CancellationToken,
}

/// Where a pipeline starts: the job's first unfinished stage, or a container a previous
/// daemon started that is followed instead of started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adoption {
    pub stage: String,
    pub container: String,
}

impl Executor {
    pub fn new(
        config: ExecutorConfig,
        data_dir: PathBuf,
        reports: Reports,
        tracker: TaskTracker,
    ) -> Executor {
        let staged = !config.stages.is_empty();
        let stages = if staged {
            config.stages
        } else {
            vec![Stage {
                name: SINGLE_STAGE.into(),
                timeout: None,
                budget: false,
                on_timeout: crate::config::OnTimeout::Fail,
                pass_env: None,
                always: false,
                job_types: Vec::new(),
                run: StageRun::Process {
                    argv: config.command.iter().map(Template::clone).collect(),
                },
            }]
        };
        let docker = config.docker.map(|program| {
            DockerCli::new(
                program,
                &data_dir,
                &config.pass_env,
                config.supervisor.clone(),
            )
        });
        Executor {
            context: Arc::new(Context {
                stages,
                staged,
                data_dir,
                timeout: config.timeout,
                kill_grace: config.kill_grace,
                pass_env: config.pass_env,
                max_log_bytes: config.max_log_bytes,
                supervisor: config.supervisor,
                trainer_nofile: config.trainer_nofile,
                docker,
                reports,
                cleanups: CancellationToken::new(),
            }),
            tracker,
        }
    }

    /// Where a job's trainer output goes.
    pub fn log_path(&self, id: JobId) -> PathBuf {
        self.context.log_path(id)
    }

    /// Keeps a job's GitHub token on disk while the job is unfinished (so that a restart can
    /// still clone), readable by the daemon's user alone: `secrets/<job_id>.github_token`,
    /// mode 0600, durable before the future resolves. Off the async workers.
    pub fn keep_secret(
        &self,
        id: JobId,
        token: String,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
        let dir = self.context.data_dir.join(SECRETS_DIR);
        async move {
            tokio::task::spawn_blocking(move || write_secret(&dir, id, &token))
                .await
                .map_err(|e| format!("cannot keep the secret: {e}"))?
                .map_err(|e| format!("cannot keep the secret: {e}"))
        }
    }

    /// Removes what the executor keeps of a job while it is unfinished (its secret, the copy
    /// of its record for `JOB_FILE`), once it has ended. Off the async workers.
    pub fn forget_job(&self, id: JobId) -> impl std::future::Future<Output = ()> + Send + 'static {
        let path = secret_path(&self.context.data_dir, id);
        let copy = Some(self.context.job_file(id));
        async move {
            let _ = tokio::task::spawn_blocking(move || {
                for path in std::iter::once(path).chain(copy) {
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => warn!(path = %path.display(), error = %e, "cannot remove a finished job's file"),
                    }
                }
            })
            .await;
        }
    }

    /// Appends a line of the daemon's own to a job's log (a retry's note), off the async
    /// workers. Only for a job with no trainer: a failure costs the line alone and is logged.
    pub fn log_line(
        &self,
        id: JobId,
        text: String,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let log = self.context.log(id);
        async move {
            let _ = tokio::task::spawn_blocking(move || log.line(&text)).await;
        }
    }

    /// Starts the pipeline for `job` (already durable as Running) in the background, at its
    /// first stage not in `stages_done`.
    ///
    /// Must be called from a runtime worker thread: the parent-death signal is tied to the
    /// thread that forks, and the runtime's worker threads live as long as the daemon.
    /// Stops the `always` stages running after failures: the daemon is shutting down.
    pub fn stop_cleanups(&self) {
        self.context.cleanups.cancel();
    }

    pub fn start(&self, job: &Job) -> Execution {
        self.launch(job, None)
    }

    /// Follows a container a previous daemon started for `job` (which is Running), then
    /// goes on with the stages after it.
    pub fn adopt(&self, job: &Job, adoption: Adoption) -> Execution {
        self.launch(job, Some(adoption))
    }

    fn launch(&self, job: &Job, adoption: Option<Adoption>) -> Execution {
        let stop = CancellationToken::new();
        let (lease, lease_rx) = watch::channel(None);
        let run = Run {
            context: self.context.clone(),
            job: job.clone(),
            adoption,
            lease: lease_rx,
        };
        let token = stop.clone();
        self.tracker.spawn(async move {
            let events = run.context.reports.events.clone();
            let (mut event, failed_at) = run.run(token).await;
            let (tx, recorded) = oneshot::channel();
            if failed_at.is_some() {
                event.recorded = Some(tx);
            }
            // The worker may be gone at the very end of a shutdown; nothing is lost then,
            // since the job file still says Running and replay handles it.
            let sent = events.send(event).await.is_ok();
            // The `always` stages after a failure run once the failure is durable, so that
            // a crash meanwhile cannot run the failed stage again; a crash loses only the
            // cleanup.
            if let (true, Some(failed)) = (sent, failed_at) {
                let cleanups = run.context.cleanups.clone();
                tokio::select! {
                    durable = recorded => {
                        if durable.is_ok() {
                            run.clean_up(failed).await;
                        }
                    }
                    _ = cleanups.cancelled() => {}
                }
            }
        });
        Execution { stop, lease }
    }

    /// Between SIGTERM and SIGKILL when a lease stops a trainer: the configured grace, but
    /// at most a fifth of the lease, so that the stop fits well inside it.
    pub fn lease_grace(&self, lease: Duration) -> Duration {
        self.context.kill_grace.min(lease / 5)
    }
}

impl Context {
    fn log_path(&self, id: JobId) -> PathBuf {
        self.data_dir.join(LOGS_DIR).join(format!("{id}.log"))
    }

    fn log(&self, id: JobId) -> Log {
        Log {
            path: self.log_path(id),
            max_bytes: self.max_log_bytes,
        }
    }

    /// Where a supervisor of `id`'s stages sends the first W&B address it sees: to the
    /// worker, which keeps the run's first one in the job.
    fn wandb_sink(&self, id: JobId) -> supervisor::UrlSink {
        let reports = self.reports.wandb.clone();
        // Full only if the worker is far behind; an address is worth no wait.
        Box::new(move |url| {
            let _ = reports.try_send((id, url));
        })
    }

    /// Starts `stage` of `job` afresh, a process or a container, and follows it to its end.
    #[allow(clippy::too_many_arguments)]
    async fn run_stage(
        &self,
        job: &Job,
        stage: &Stage,
        values: &Values,
        log: &Log,
        timeout: Duration,
        stop: &CancellationToken,
        lease: &Lease,
    ) -> Outcome {
        if let Err(e) = self.write_job_copy(job).await {
            return Outcome::SpawnFailed(format!("cannot write the job's copy for JOB_FILE: {e}"));
        }
        match &stage.run {
            StageRun::Process { argv } => {
                let argv: Vec<String> = argv.iter().map(|t| t.render(values)).collect();
                let env = self.process_environment(job, stage);
                run_process(self, job.id, &argv, &env, log, timeout, stop, lease).await
            }
            StageRun::Docker(spec) => {
                // Config loading resolves the CLI whenever a docker stage exists.
                let Some(docker) = &self.docker else {
                    return Outcome::SpawnFailed("no docker CLI configured".into());
                };
                let args = docker.run_args(
                    job,
                    &stage.name,
                    spec,
                    values,
                    &self.job_environment(job, &stage.name),
                    self.pass_env(stage),
                );
                let name = docker::container_name(job.id, &stage.name);
                docker
                    .run(
                        &name,
                        &args,
                        log,
                        timeout,
                        self.kill_grace,
                        stop,
                        lease,
                        self.wandb_sink(job.id),
                    )
                    .await
            }
        }
    }

    /// The `pass_env` names a stage gets.
    fn pass_env<'a>(&'a self, stage: &'a Stage) -> &'a [String] {
        stage.pass_env.as_deref().unwrap_or(&self.pass_env)
    }

    /// A process stage's environment: a small base, the names in `pass_env`, the job's
    /// fields, the owner mark, and the job's GPUs.
    fn process_environment(&self, job: &Job, stage: &Stage) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        for name in BASE_ENV
            .iter()
            .copied()
            .chain(self.pass_env(stage).iter().map(String::as_str))
        {
            if let Ok(value) = std::env::var(name) {
                env.push((name.to_string(), value));
            }
        }
        env.extend(self.job_environment(job, &stage.name));
        if let Some(docker) = &self.docker {
            env.extend(docker.stage_env());
        }
        // A process stage only: a container's variables would be on docker's command line.
        if let Some(token) = read_secret(&self.data_dir, job.id) {
            env.push((GITHUB_TOKEN_ENV.to_string(), token));
        }
        env.push((
            OWNER_ENV.to_string(),
            self.data_dir.to_string_lossy().into_owned(),
        ));
        // Only with GPU accounting: then a job sees exactly its GPUs (none, for a job that
        // asked for none); without it, the trainer's environment decides.
        if let Some(ids) = &job.gpu_ids {
            let list: Vec<String> = ids.iter().map(u32::to_string).collect();
            env.push(("CUDA_VISIBLE_DEVICES".to_string(), list.join(",")));
        }
        env
    }

    /// The trainer's `JOB_FILE`: the executor's copy of the job's record in `run/`, the same
    /// with either store (the database store has no job files), and never the store's own
    /// record, which a trainer could otherwise hold open or change.
    fn job_file(&self, id: JobId) -> PathBuf {
        self.data_dir.join(RUN_DIR).join(format!("{id}.json"))
    }

    /// Writes the job's record where `JOB_FILE` says, for a trainer that reads it: replaced
    /// whole (a temporary file renamed), before each stage, so it says what the stage's
    /// start knows (Running, its attempt, the stages done). A copy, not a record: nothing
    /// reads it back, so it needs no flush.
    async fn write_job_copy(&self, job: &Job) -> io::Result<()> {
        let path = self.job_file(job.id);
        let bytes = job.to_file_bytes();
        tokio::task::spawn_blocking(move || {
            let dir = path.parent().expect("a job file has a directory");
            std::fs::create_dir_all(dir)?;
            let temp = dir.join(format!(".{}.tmp", job_file_name(&path)));
            std::fs::write(&temp, bytes)?;
            std::fs::rename(&temp, &path)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// The job's own variables (CONTRACT 5), for processes and containers alike.
    fn job_environment(&self, job: &Job, stage: &str) -> Vec<(String, String)> {
        let fields = template::KindFields::of(job);
        let task = template::TaskFields::of(job);
        let job_file = self.job_file(job.id);
        let mut env: Vec<(String, String)> = [
            ("JOB_ID", job.id.to_string()),
            ("JOB_TYPE", job.kind.type_name().to_string()),
            ("JOB_FILE", job_file.to_string_lossy().into_owned()),
            ("MODEL", job.model.clone()),
            ("DATASET", fields.dataset.to_string()),
            ("DATASET_TYPE", fields.dataset_type.to_string()),
            ("FILE_FORMAT", fields.file_format.to_string()),
            ("DATASET_ZIP", fields.dataset_zip.to_string()),
            ("MODEL_TYPE", fields.model_type.to_string()),
            (
                "EXPECTED_REPO_NAME",
                job.expected_repo_name.clone().unwrap_or_default(),
            ),
            ("ATTEMPT", job.attempts.to_string()),
            // A G.O.D trainer task's; empty for a job of the main API.
            ("TASK_ID", task.task_id.to_string()),
            ("HOTKEY", task.hotkey.to_string()),
            ("GITHUB_REPO", task.github_repo.to_string()),
            ("GITHUB_COMMIT_HASH", task.github_commit_hash.to_string()),
            ("GITHUB_BRANCH", task.github_branch.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();

        if self.staged {
            env.push(("STAGE".to_string(), stage.to_string()));
        }
        env
    }
}

/// One run of a job's pipeline, moved into its task.
struct Run {
    context: Arc<Context>,
    /// The job as it was durably recorded when the run began.
    job: Job,
    adoption: Option<Adoption>,
    /// The node's lease on the job, as the worker renews it.
    lease: Lease,
}

impl Run {
    /// Runs the pipeline; gives how it ended and, when a stage failed the job, that stage's
    /// index, after which the `always` stages are still to run.
    async fn run(&self, stop: CancellationToken) -> (Event, Option<usize>) {
        let job_id = self.job.id;
        let context = &self.context;
        let log = context.log(job_id);
        let header = match &self.adoption {
            None => format!(
                "==> attempt {} started at {}",
                self.job.attempts,
                crate::job::format_timestamp(&chrono::Utc::now())
            ),
            Some(adopted) => format!(
                "==> attempt {} followed again at {}: the daemon restarted while container {} (stage {}) ran",
                self.job.attempts,
                crate::job::format_timestamp(&chrono::Utc::now()),
                adopted.container,
                adopted.stage
            ),
        };
        // When adopting, the container's output since the previous daemon stopped writing
        // is what is missing from the log; the log's last change says when that was.
        let since = self
            .adoption
            .as_ref()
            .and_then(|_| std::fs::metadata(&log.path).ok())
            .and_then(|m| m.modified().ok());
        if let Err(e) = log.try_line(&header) {
            let msg = format!("cannot open log {}: {e}", log.path.display());
            warn!(%job_id, error = %msg, "trainer not started");
            return (self.event(Outcome::SpawnFailed(msg), None, None), None);
        }
        let total = context.stages.len();
        let first = match &self.adoption {
            Some(adopted) => context
                .stages
                .iter()
                .position(|s| s.name == adopted.stage)
                .unwrap_or(total),
            None => 0,
        };
        let mut last_stage = None;
        for (i, stage) in context.stages.iter().enumerate().skip(first) {
            let adopted = (i == first)
                .then_some(self.adoption.as_ref())
                .flatten()
                .map(|a| a.container.clone());
            let named = context.staged.then(|| stage.name.clone());
            last_stage = named.clone();
            if adopted.is_none() && context.staged && self.job.stages_done.contains(&stage.name) {
                log.line(&format!(
                    "==> stage {} ({}/{total}): finished in an earlier attempt; skipped",
                    stage.name,
                    i + 1
                ));
                continue;
            }
            let job_type = self.job.kind.type_name();
            if !stage.runs_for(job_type) {
                log.line(&format!(
                    "==> stage {} ({}/{total}): not for a {job_type}; skipped",
                    stage.name,
                    i + 1
                ));
                continue;
            }
            if stop.is_cancelled() {
                return (self.event(Outcome::Stopped, None, named), None);
            }
            // A budgeted stage's limit counts from its first start, recorded before it first
            // runs; every other stage's from its start in this attempt.
            let budget = match (stage.budget, self.job.hours_to_complete) {
                (true, Some(hours)) => {
                    let first = match self.job.stage_started_at(&stage.name) {
                        Some(first) => first,
                        None => {
                            let now = chrono::Utc::now();
                            if !self.record(&stage.name, Some(now), &stop).await {
                                return (self.event(Outcome::Stopped, None, named), None);
                            }
                            now
                        }
                    };
                    let total = Duration::from_secs_f64(hours * 3600.0);
                    let used = (chrono::Utc::now() - first).to_std().unwrap_or_default();
                    Some((total, used))
                }
                _ => None,
            };
            let limit = match budget {
                Some((total, _)) => total,
                None => stage.timeout.unwrap_or(context.timeout),
            };
            // An adopted container has run since it started, not since now: its timeout
            // counts from its own start, so that crashes cannot extend it. A budget counts
            // from the stage's first start, which covers that already.
            let ran_before = match (&adopted, &context.docker) {
                _ if budget.is_some() => Duration::ZERO,
                (Some(container), Some(docker)) => match docker.started_at(container).await {
                    Ok(started) => (chrono::Utc::now() - started).to_std().unwrap_or_default(),
                    Err(e) => {
                        warn!(%job_id, container = %container, error = %e, "cannot tell when the adopted container started; its timeout counts from now");
                        Duration::ZERO
                    }
                },
                _ => Duration::ZERO,
            };
            let left = self.job.time_left(chrono::Utc::now());
            let used = budget.map_or(ran_before, |(_, used)| used);
            let limit_left = limit.saturating_sub(used);
            let (timeout, budget_bound) = match left {
                Some(left) if left < limit_left => (left, true),
                _ => (limit_left, false),
            };
            if timeout.is_zero() && budget_bound {
                log.line(&format!(
                    "==> the time budget ran out before {} could start",
                    describe_stage(context.staged, &stage.name)
                ));
                return (
                    self.event(Outcome::OutOfTime(Duration::ZERO), None, named),
                    Some(i),
                );
            }
            // An adopted stage's start is in the log already, under the earlier attempt.
            if context.staged && adopted.is_none() {
                log.line(&format!(
                    "==> stage {} ({}/{total}) started at {}",
                    stage.name,
                    i + 1,
                    crate::job::format_timestamp(&chrono::Utc::now())
                ));
            }
            let offset = log.position();
            let started = Instant::now()
                .checked_sub(ran_before)
                .unwrap_or_else(Instant::now);
            let values = Values::new(&self.job, &stage.name, &context.data_dir.to_string_lossy());
            let mut outcome = if budget.is_some() && limit_left.is_zero() {
                // Its budget was used up before this start (a crash came after it ran out).
                log.line(&format!(
                    "==> stage {} ({}/{total}): its time budget was used up before this start",
                    stage.name,
                    i + 1
                ));
                Outcome::TimedOut(limit)
            } else {
                match (&adopted, &context.docker) {
                    (Some(container), Some(docker)) => {
                        docker
                            .follow(
                                container,
                                since,
                                &log,
                                timeout,
                                context.kill_grace,
                                &stop,
                                &self.lease,
                                context.wandb_sink(job_id),
                            )
                            .await
                    }
                    _ => {
                        context
                            .run_stage(&self.job, stage, &values, &log, timeout, &stop, &self.lease)
                            .await
                    }
                }
            };
            if !matches!(outcome, Outcome::SpawnFailed(_) | Outcome::Refused(_)) {
                // A container stage ran, at least: its start worked.
                let _ = context.reports.started.try_send(job_id);
            }
            if let Outcome::TimedOut(_) = outcome {
                outcome = if budget_bound {
                    Outcome::OutOfTime(timeout + used)
                } else {
                    Outcome::TimedOut(limit)
                };
            }
            // Stopped by its own limit, and told to go on: the stage counts as done.
            let continued = stage.on_timeout == crate::config::OnTimeout::Continue
                && matches!(outcome, Outcome::TimedOut(_));
            // Read before the footer below, which would otherwise be the last line.
            let last_line = log.last_line(offset);
            log.line(&format!(
                "==> {} ended after {}: {}{}",
                describe_stage(context.staged, &stage.name),
                humantime::format_duration(Duration::from_secs(started.elapsed().as_secs())),
                describe(&outcome),
                if continued {
                    "; on_timeout = \"continue\": counted as done"
                } else {
                    ""
                }
            ));
            info!(%job_id, stage = %stage.name, outcome = describe(&outcome), continued, "trainer ended");
            if outcome != Outcome::Exited(0) && !continued {
                // Stopped or never started: the job is not over, so nothing is cleaned up.
                let failed = !matches!(outcome, Outcome::Stopped | Outcome::SpawnFailed(_));
                return (self.event(outcome, last_line, named), failed.then_some(i));
            }
            if context.staged && i + 1 < total && !self.record(&stage.name, None, &stop).await {
                return (self.event(Outcome::Stopped, None, named), None);
            }
        }
        // A success names the last stage too, so that the finished job records it.
        (self.event(Outcome::Exited(0), None, last_stage), None)
    }

    /// Runs the `always` stages after the one at `failed`, which failed the job: each once,
    /// in order, whatever the one before it did, with no GPUs (the job has let go of them)
    /// and no time budget. Their ends go to the job's log only; the job has failed already.
    async fn clean_up(&self, failed: usize) {
        let context = &self.context;
        let job_id = self.job.id;
        let log = context.log(job_id);
        let total = context.stages.len();
        let mut job = self.job.clone();
        if job.gpu_ids.is_some() {
            job.gpu_ids = Some(Vec::new());
        }
        let stop = &context.cleanups;
        for (i, stage) in context.stages.iter().enumerate().skip(failed + 1) {
            if !stage.always || !stage.runs_for(job.kind.type_name()) {
                continue;
            }
            if stop.is_cancelled() {
                log.line(&format!(
                    "==> stage {} ({}/{total}) not run after the failure: the daemon is stopping",
                    stage.name,
                    i + 1
                ));
                continue;
            }
            log.line(&format!(
                "==> stage {} ({}/{total}) started at {}: always = true, after the failure",
                stage.name,
                i + 1,
                crate::job::format_timestamp(&chrono::Utc::now())
            ));
            let started = Instant::now();
            let timeout = stage.timeout.unwrap_or(context.timeout);
            let values = Values::new(&job, &stage.name, &context.data_dir.to_string_lossy());
            let outcome = context
                .run_stage(&job, stage, &values, &log, timeout, stop, &self.lease)
                .await;
            log.line(&format!(
                "==> stage {} ended after {}: {}",
                stage.name,
                humantime::format_duration(Duration::from_secs(started.elapsed().as_secs())),
                describe(&outcome),
            ));
            if outcome == Outcome::Exited(0) {
                info!(%job_id, stage = %stage.name, "cleanup stage ended");
            } else {
                warn!(%job_id, stage = %stage.name, outcome = describe(&outcome), "cleanup stage after a failure did not end well; see the job's log");
            }
        }
    }

    /// Has the worker record `stage` as finished (or, with `started`, as first started at
    /// that time); true once it is durable. False when the run must not go on (stopped
    /// meanwhile, or the worker declined).
    async fn record(
        &self,
        stage: &str,
        started: Option<crate::job::Timestamp>,
        stop: &CancellationToken,
    ) -> bool {
        let (ack, recorded) = oneshot::channel();
        let done = StageDone {
            job_id: self.job.id,
            stage: stage.to_string(),
            started,
            ack,
        };
        if self.context.reports.stage_done.send(done).await.is_err() {
            return false;
        }
        tokio::select! {
            answer = recorded => answer.is_ok() && !stop.is_cancelled(),
            _ = stop.cancelled() => false,
        }
    }

    fn event(&self, outcome: Outcome, last_line: Option<String>, stage: Option<String>) -> Event {
        Event {
            job_id: self.job.id,
            outcome,
            last_line,
            stage,
            recorded: None,
        }
    }
}

fn describe_stage(staged: bool, name: &str) -> String {
    if staged {
        format!("stage {name}")
    } else {
        "trainer".to_string()
    }
}

/// Runs one process stage to its end under a supervisor, which writes its output to the
/// log and kills its whole tree when it ends, is stopped (SIGTERM, SIGKILL after `grace`)
/// on timeout or request, or loses its daemon.
#[allow(clippy::too_many_arguments)]
async fn run_process(
    context: &Context,
    job_id: JobId,
    argv: &[String],
    env: &[(String, String)],
    log: &Log,
    timeout: Duration,
    stop: &CancellationToken,
    lease: &Lease,
) -> Outcome {
    let grace = context.kill_grace;
    let args = supervisor::Args {
        log: log.path.clone(),
        max_log_bytes: log.max_bytes,
        grace,
        nofile: context.trainer_nofile,
        on_lease_expiry: Vec::new(),
        argv: argv.iter().map(std::ffi::OsString::from).collect(),
    };
    let started = match Supervised::spawn(
        &context.supervisor,
        &args,
        env,
        Some(context.wandb_sink(job_id)),
    ) {
        Ok(mut trainer) => trainer.started().await.map(|pid| (trainer, pid)),
        Err(e) => Err(format!("cannot start the supervisor: {e}")),
    };
    let (mut trainer, pid) = match started {
        Ok(started) => started,
        Err(e) => {
            warn!(%job_id, error = %e, "trainer could not be started");
            log.line(&format!("==> could not start {}: {e}", argv[0]));
            return Outcome::SpawnFailed(e);
        }
    };
    info!(%job_id, pid, "trainer started");
    // Full only if the worker is far behind; then it learns it from the next start.
    let _ = context.reports.started.try_send(job_id);
    let mut lease = lease.clone();
    let window = *lease.borrow_and_update();
    send_lease(&mut trainer, window).await;
    let deadline = tokio::time::Instant::now() + timeout;
    let stopped = loop {
        tokio::select! {
            end = trainer.ended() => {
                if trainer.lease_expired {
                    return Outcome::LeaseExpired;
                }
                return from_report(end);
            }
            _ = tokio::time::sleep_until(deadline) => {
                warn!(%job_id, timeout = %humantime::format_duration(timeout), "trainer timed out; stopping it");
                break Outcome::TimedOut(timeout);
            }
            _ = stop.cancelled() => {
                info!(%job_id, "stopping trainer");
                break Outcome::Stopped;
            }
            window = next_lease(&mut lease) => send_lease(&mut trainer, window).await,
        }
    };
    if let Err(e) = trainer.stop(grace).await {
        warn!(%job_id, error = %e, "the trainer's stop was not reported");
    }
    stopped
}

fn from_report(end: Result<Report, String>) -> Outcome {
    match end {
        Ok(Report::Exited(code)) => Outcome::Exited(code),
        Ok(Report::Signalled(sig)) => Outcome::Signalled(sig),
        Ok(other) => Outcome::Lost(format!("unexpected report {other:?}")),
        Err(e) => Outcome::Lost(e),
    }
}

/// A process group of its own, and death with the daemon: every docker CLI call the
/// executor spawns gets both, so a stop reaches all of it and a killed daemon leaves
/// nothing behind.
fn tie_to_daemon(command: &mut Command) {
    command.process_group(0).kill_on_drop(false);
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
}

fn job_file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn secret_path(data_dir: &Path, id: JobId) -> PathBuf {
    data_dir
        .join(SECRETS_DIR)
        .join(format!("{id}.github_token"))
}

/// Writes a secret whole or not at all, mode 0600 from its creation, and makes it durable.
fn write_secret(dir: &Path, id: JobId, token: &str) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let path = dir.join(format!("{id}.github_token"));
    let temp = dir.join(format!(".{id}.github_token.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temp, &path)?;
    File::open(dir)?.sync_all()
}

/// A job's GitHub token, when it has one kept.
fn read_secret(data_dir: &Path, id: JobId) -> Option<String> {
    std::fs::read_to_string(secret_path(data_dir, id)).ok()
}

/// A job's log as the executor writes it: its own lines (headers, footers) between the
/// trainer's output, which the supervisor appends and rotates.
pub struct Log {
    pub path: PathBuf,
    pub max_bytes: u64,
}

impl Log {
    /// Appends `text` as a line of its own: after a newline when the log does not end with
    /// one (a trainer's last line without it), so that a marker always starts a line.
    fn try_line(&self, text: &str) -> io::Result<()> {
        // Opened for each line: the supervisor may have rotated the file since.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)?;
        let len = file.metadata()?.len();
        let mut last = [0u8; 1];
        let glued = len > 0 && file.read_at(&mut last, len - 1).is_ok() && last[0] != b'\n';
        let mut line = String::with_capacity(text.len() + 2);
        if glued {
            line.push('\n');
        }
        line.push_str(text);
        line.push('\n');
        file.write_all(line.as_bytes())
    }

    /// [`Log::try_line`] where a failure only costs the line.
    fn line(&self, text: &str) {
        if let Err(e) = self.try_line(text) {
            warn!(path = %self.path.display(), error = %e, "cannot write to a job's log");
        }
    }

    /// Where the log ends now, counted in the job's whole output (across rotations).
    fn position(&self) -> u64 {
        let len = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        LogOffsets::new(&self.path).base() + len
    }

    /// The last non-empty line written after `position` (a [`Log::position`]).
    fn last_line(&self, position: u64) -> Option<String> {
        let base = LogOffsets::new(&self.path).base();
        last_line(&self.path, position.saturating_sub(base))
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
        Outcome::SpawnFailed(e) | Outcome::Refused(e) => format!("not started: {e}"),
        Outcome::OutOfTime(after) => format!(
            "stopped after {}: the time budget ran out",
            humantime::format_duration(*after)
        ),
        Outcome::Lost(e) => format!("lost: {e}"),
        Outcome::LeaseExpired => "stopped: the node's lease on the job was not renewed".into(),
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
    let start = offset.min(len).max(len.saturating_sub(TAIL));
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
        let log = Log {
            path: path.clone(),
            max_bytes: 0,
        };
        log.try_line("==> attempt 2").unwrap();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let offset = log.position();
        assert_eq!(last_line(&path, offset), None);
        file.write_all(b"step 1\nstep 2\n\n  \n").unwrap();
        assert_eq!(last_line(&path, offset).as_deref(), Some("step 2"));
        file.write_all("é".repeat(1000).as_bytes()).unwrap();
        let long = last_line(&path, offset).unwrap();
        assert_eq!(long.chars().count(), LAST_LINE_MAX + 1);
    }

    #[test]
    fn a_marker_starts_a_line_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        std::fs::write(&path, "50% done").unwrap();
        let log = Log {
            path: path.clone(),
            max_bytes: 0,
        };
        log.try_line("==> trainer ended").unwrap();
        log.try_line("==> next").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "50% done\n==> trainer ended\n==> next\n"
        );
    }

    #[test]
    fn error_messages_say_how_it_ended() {
        let event = |outcome| Event {
            job_id: JobId::new_random(),
            outcome,
            last_line: Some("CUDA out of memory".into()),
            stage: None,
            recorded: None,
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
