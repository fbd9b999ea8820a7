//! Container stages, through the `docker` CLI.
//!
//! A stage's container is started detached (`docker run -d`) under a deterministic name,
//! `tw-<job_id>-<stage>`, with labels naming the job, the stage and this data dir, so that
//! the next daemon can find it. Its output is streamed to the job's log by `docker logs -f`
//! and its exit code read from `docker wait`; both are plain child processes that die with
//! the daemon, while the container itself lives on in the Docker engine. That is what makes
//! adoption possible: after a crash, boot [`reconcile`]s the labelled containers with the
//! recovered jobs, and either follows a still-running one again or removes it before its
//! stage runs again.
//!
//! Secrets named in `pass_env` reach a container as `-e NAME`: the docker CLI reads the value
//! from its own environment, so it never appears on a command line, in a log or on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime};

use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::supervisor::{self, Supervised};
use super::template::Values;
use super::{Adoption, BASE_ENV, Log, OWNER_ENV, Outcome, kill_group, tie_to_daemon};
use crate::config::{DockerStage, Stage, StageRun};
use crate::job::{Job, JobId, Status, Timestamp};

/// The label with the job id.
pub const LABEL_JOB: &str = "training-worker.job";
/// The label with the stage name.
pub const LABEL_STAGE: &str = "training-worker.stage";
/// The label with the data dir: the containers of one daemon, and no one else's.
pub const LABEL_OWNER: &str = "training-worker.owner";

/// The longest a short CLI call (run, rm, ps, stop beyond its grace, kill) may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `docker logs -f` may take to deliver the rest after the container exited.
const LOGS_DRAIN: Duration = Duration::from_secs(10);

/// The container of a job's stage. Deterministic, so a second start of the same stage
/// meets the first one's container and removes it instead of running beside it.
pub fn container_name(job_id: JobId, stage: &str) -> String {
    format!("tw-{job_id}-{stage}")
}

/// The docker CLI as the daemon calls it.
#[derive(Clone)]
pub struct DockerCli {
    program: PathBuf,
    /// The program that runs `docker logs -f` under a supervisor, as for trainers.
    supervisor: PathBuf,
    /// The CLI's environment: a small base, `DOCKER_*` (host, context, config), the
    /// `pass_env` values (for `-e NAME`), and the owner mark, so that a CLI process left
    /// behind by a killed daemon is found at boot.
    env: Vec<(String, String)>,
    /// The value of [`LABEL_OWNER`].
    owner: String,
    /// The host's CPUs: docker refuses a `--cpus` above it, so per-GPU shares are capped.
    host_cpus: f64,
}

/// Why a CLI call gave no answer.
enum CliError {
    /// The CLI could not be run at all.
    NotRun(String),
    /// It ran and failed, or did not answer in time.
    Failed(String),
}

impl CliError {
    fn into_message(self) -> String {
        match self {
            CliError::NotRun(m) | CliError::Failed(m) => m,
        }
    }
}

impl std::fmt::Debug for DockerCli {
    // The environment may hold secrets: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerCli")
            .field("program", &self.program)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// A labelled container as `docker ps` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub name: String,
    pub running: bool,
    /// `None` when the label is not a job id.
    pub job: Option<JobId>,
    pub stage: String,
}

/// What boot does with one labelled container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Follow it again: the job stays Running on its GPUs, the stage is not started again.
    Adopt { job_id: JobId, adoption: Adoption },
    /// Remove it, for this reason.
    Remove { name: String, reason: String },
}

impl DockerCli {
    pub fn new(
        program: PathBuf,
        data_dir: &Path,
        pass_env: &[String],
        supervisor: PathBuf,
    ) -> DockerCli {
        let mut env: Vec<(String, String)> = Vec::new();
        for name in BASE_ENV.iter().copied().map(String::from).chain(
            std::env::vars()
                .map(|(k, _)| k)
                .filter(|k| k.starts_with("DOCKER_")),
        ) {
            if let Ok(value) = std::env::var(&name) {
                env.push((name, value));
            }
        }
        for name in pass_env {
            if let Ok(value) = std::env::var(name) {
                env.push((name.clone(), value));
            }
        }
        let owner = data_dir.to_string_lossy().into_owned();
        env.push((OWNER_ENV.to_string(), owner.clone()));
        // SAFETY: sysconf only reads a system value.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        DockerCli {
            program,
            supervisor,
            env,
            owner,
            host_cpus: if online > 0 { online as f64 } else { f64::MAX },
        }
    }

    /// What a process stage gets to reach the same engine as the container stages: the
    /// CLI as `DOCKER`, and the daemon's `DOCKER_*` variables.
    pub fn stage_env(&self) -> Vec<(String, String)> {
        let mut env = vec![(
            "DOCKER".to_string(),
            self.program.to_string_lossy().into_owned(),
        )];
        env.extend(
            self.env
                .iter()
                .filter(|(k, _)| k.starts_with("DOCKER_"))
                .cloned(),
        );
        env
    }

    fn command<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        tie_to_daemon(&mut command);
        command
    }

    /// Runs a short CLI call to its end; its stdout, or what its stderr said went wrong.
    async fn output<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: &[S],
        limit: Duration,
    ) -> Result<String, String> {
        self.try_output(args, limit)
            .await
            .map_err(CliError::into_message)
    }

    /// [`DockerCli::output`], telling a CLI that could not be run from one that failed.
    async fn try_output<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: &[S],
        limit: Duration,
    ) -> Result<String, CliError> {
        let child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| CliError::NotRun(format!("cannot run {}: {e}", self.program.display())))?;
        let pid = child.id();
        match tokio::time::timeout(limit, child.wait_with_output()).await {
            Ok(Ok(output)) if output.status.success() => {
                Ok(String::from_utf8_lossy(&output.stdout).into_owned())
            }
            // An engine that does not answer is the box's trouble, like a missing CLI.
            Ok(Ok(output)) if engine_unreachable(&output) => {
                Err(CliError::NotRun(failure(&output)))
            }
            Ok(Ok(output)) => Err(CliError::Failed(failure(&output))),
            Ok(Err(e)) => Err(CliError::Failed(format!(
                "cannot wait for {}: {e}",
                self.program.display()
            ))),
            Err(_) => {
                if let Some(pid) = pid {
                    kill_group(pid, libc::SIGKILL);
                }
                Err(CliError::Failed(format!(
                    "no answer within {}",
                    humantime::format_duration(limit)
                )))
            }
        }
    }

    /// The `docker run` argv for one stage of `job` (without the program).
    pub fn run_args(
        &self,
        job: &Job,
        stage: &str,
        spec: &DockerStage,
        values: &Values,
        job_env: &[(String, String)],
        pass_env: &[String],
    ) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            container_name(job.id, stage),
            "--label".into(),
            format!("{LABEL_JOB}={}", job.id),
            "--label".into(),
            format!("{LABEL_STAGE}={stage}"),
            "--label".into(),
            format!("{LABEL_OWNER}={}", self.owner),
        ];
        let gpus = job.gpu_ids.as_deref().unwrap_or_default();
        if spec.gpus && !gpus.is_empty() {
            let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
            // The CLI reads --gpus as CSV: a list of ids must be one quoted field.
            args.push("--gpus".into());
            args.push(format!("\"device={}\"", list.join(",")));
        }
        // Limits scale with the GPUs the job holds; a job without GPUs counts as one.
        let share = gpus.len().max(1) as u64;
        if let Some(bytes) = spec.memory_per_gpu {
            args.push("--memory".into());
            args.push(format_bytes(bytes.saturating_mul(share)));
        }
        if let Some(cpus) = spec.cpus_per_gpu {
            args.push("--cpus".into());
            args.push(format!("{}", (cpus * share as f64).min(self.host_cpus)));
        }
        if let Some((_, size)) = spec
            .shm_size
            .iter()
            .rev()
            .find(|(from, _)| *from as u64 <= share)
        {
            args.push("--shm-size".into());
            args.push(size.clone());
        }
        if let Some(network) = &spec.network {
            args.push("--network".into());
            args.push(network.clone());
        }
        for volume in &spec.volumes {
            args.push("-v".into());
            args.push(volume.render(values));
        }
        for (name, value) in job_env {
            args.push("-e".into());
            args.push(format!("{name}={value}"));
        }
        for name in pass_env {
            // The value comes from the CLI's environment, never from the command line.
            args.push("-e".into());
            args.push(name.clone());
        }
        for (name, value) in &spec.env {
            args.push("-e".into());
            args.push(format!("{name}={}", value.render(values)));
        }
        args.extend(spec.docker_args.iter().cloned());
        args.push(spec.image.render(values));
        args.extend(spec.args.iter().map(|a| a.render(values)));
        args
    }

    /// Starts the container `name` with `args` and follows it to its end.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        &self,
        name: &str,
        args: &[String],
        log: &Log,
        timeout: Duration,
        grace: Duration,
        stop: &CancellationToken,
        lease: &super::Lease,
        wandb: supervisor::UrlSink,
    ) -> Outcome {
        // A container of an earlier start of this stage (kept by a crash, not adopted) must
        // not run beside the new one, and its name must be free.
        if let Err(e) = self.remove(name).await {
            warn!(container = name, error = %e, "cannot remove an old container");
        }
        if let Err(e) = self.try_output(args, CLI_TIMEOUT).await {
            let not_run = matches!(e, CliError::NotRun(_));
            let e = e.into_message();
            log.line(&format!("==> docker run failed: {e}"));
            // It may have been created before the failure; it must not linger.
            let _ = self.remove(name).await;
            let e = format!("docker run: {e}");
            // A CLI that cannot be run is the box's trouble; a docker run that failed is
            // this start's.
            return if not_run {
                Outcome::SpawnFailed(e)
            } else {
                Outcome::Refused(e)
            };
        }
        info!(container = name, "container started");
        self.follow(name, None, log, timeout, grace, stop, lease, wandb)
            .await
    }

    /// Streams the container's output (all of it, or what it wrote since `since`) to `log`
    /// until it exits, stops it on timeout or request, removes it, and says how it ended.
    #[allow(clippy::too_many_arguments)]
    pub async fn follow(
        &self,
        name: &str,
        since: Option<SystemTime>,
        log: &Log,
        timeout: Duration,
        grace: Duration,
        stop: &CancellationToken,
        lease: &super::Lease,
        wandb: supervisor::UrlSink,
    ) -> Outcome {
        let mut logs_args: Vec<String> = vec!["logs".into(), "-f".into()];
        if let Some(since) = since {
            logs_args.push("--since".into());
            logs_args.push(
                chrono::DateTime::<chrono::Utc>::from(since)
                    .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            );
        }
        logs_args.push(name.to_string());
        // Under a supervisor like a trainer: it caps and rotates the log the same way.
        let mut argv = vec![self.program.clone().into_os_string()];
        argv.extend(logs_args.iter().map(std::ffi::OsString::from));
        let args = supervisor::Args {
            log: log.path.clone(),
            max_log_bytes: log.max_bytes,
            grace: Duration::ZERO,
            nofile: None,
            // The watchdog of the container: `docker logs -f` ends when it is gone.
            on_lease_expiry: vec![
                self.program.clone().into_os_string(),
                "kill".into(),
                name.into(),
            ],
            argv,
        };
        let logs = match Supervised::spawn(&self.supervisor, &args, &self.env, Some(wandb)) {
            Ok(mut logs) => logs.started().await.map(|_| logs),
            Err(e) => Err(e.to_string()),
        };
        let mut logs = match logs {
            Ok(logs) => Some(logs),
            Err(e) => {
                warn!(container = name, error = %e, "cannot follow the container's output");
                None
            }
        };
        let waiter = self
            .command(&["wait", name])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let waiter = match waiter {
            Ok(child) => child,
            Err(e) => {
                self.stop_container(name, grace).await;
                return Outcome::Lost(format!("cannot run docker wait: {e}"));
            }
        };
        let waiter_pid = waiter.id();
        let waited = waiter.wait_with_output();
        tokio::pin!(waited);
        let mut lease = lease.clone();
        if let Some(logs) = logs.as_mut() {
            let window = *lease.borrow_and_update();
            super::send_lease(logs, window).await;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let outcome = loop {
            tokio::select! {
                output = &mut waited => break exit_code(output),
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(container = name, timeout = %humantime::format_duration(timeout), "container timed out; stopping it");
                    self.stop_container(name, grace).await;
                    break Outcome::TimedOut(timeout);
                }
                _ = stop.cancelled() => {
                    info!(container = name, "stopping container");
                    self.stop_container(name, grace).await;
                    break Outcome::Stopped;
                }
                window = super::next_lease(&mut lease) => {
                    if let Some(logs) = logs.as_mut() {
                        super::send_lease(logs, window).await;
                    }
                }
            }
        };
        if matches!(outcome, Outcome::TimedOut(_) | Outcome::Stopped)
            && tokio::time::timeout(CLI_TIMEOUT, &mut waited)
                .await
                .is_err()
            && let Some(pid) = waiter_pid
        {
            kill_group(pid, libc::SIGKILL);
        }
        if let Some(logs) = logs.as_mut()
            && tokio::time::timeout(LOGS_DRAIN, logs.ended())
                .await
                .is_err()
            && let Err(e) = logs.stop(Duration::ZERO).await
        {
            warn!(container = name, error = %e, "cannot stop following the container's output");
        }
        if let Err(e) = self.remove(name).await {
            warn!(container = name, error = %e, "cannot remove the finished container");
        }
        if logs.as_ref().is_some_and(|l| l.lease_expired) {
            return Outcome::LeaseExpired;
        }
        outcome
    }

    /// `docker stop -t GRACE`, and `docker kill` when that fails or hangs.
    async fn stop_container(&self, name: &str, grace: Duration) {
        let seconds = grace.as_secs_f64().ceil().max(1.0) as u64;
        let stopped = self
            .output(
                &["stop", "-t", &seconds.to_string(), name],
                grace + CLI_TIMEOUT,
            )
            .await;
        if let Err(e) = stopped {
            warn!(container = name, error = %e, "docker stop failed; killing the container");
            if let Err(e) = self.output(&["kill", name], CLI_TIMEOUT).await {
                warn!(container = name, error = %e, "docker kill failed");
            }
        }
    }

    /// When the container's main process started.
    pub async fn started_at(&self, name: &str) -> Result<Timestamp, String> {
        let text = self
            .output(
                &["inspect", "-f", "{{.State.StartedAt}}", name],
                CLI_TIMEOUT,
            )
            .await?;
        chrono::DateTime::parse_from_rfc3339(text.trim())
            .map(|t| t.with_timezone(&chrono::Utc))
            .map_err(|e| format!("docker inspect printed {:?}: {e}", text.trim()))
    }

    /// Removes a container, running or not; one that does not exist is fine.
    pub async fn remove(&self, name: &str) -> Result<(), String> {
        match self.output(&["rm", "-f", name], CLI_TIMEOUT).await {
            Ok(_) => Ok(()),
            Err(e) if e.contains("No such container") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every container carrying this data dir's label.
    pub async fn survey(&self) -> Result<Vec<Container>, String> {
        let filter = format!("label={LABEL_OWNER}={}", self.owner);
        let format = format!(
            "{{{{.Names}}}}\t{{{{.State}}}}\t{{{{.Label \"{LABEL_JOB}\"}}}}\t{{{{.Label \"{LABEL_STAGE}\"}}}}"
        );
        let listed = self
            .output(
                &[
                    "ps",
                    "-a",
                    "--no-trunc",
                    "--filter",
                    &filter,
                    "--format",
                    &format,
                ],
                CLI_TIMEOUT,
            )
            .await?;
        Ok(listed
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let mut fields = line.split('\t');
                let name = fields.next().unwrap_or("").trim().to_string();
                let state = fields.next().unwrap_or("").trim();
                let job = fields.next().and_then(|j| j.trim().parse().ok());
                let stage = fields.next().unwrap_or("").trim().to_string();
                Container {
                    name,
                    running: state == "running",
                    job,
                    stage,
                }
            })
            .collect())
    }
}

/// What boot does with each labelled container, given the recovered jobs. Pure, so every
/// rule is tested without a docker engine.
///
/// A container is adopted only when all hold: `adopt_running` is on, it still runs, its job
/// was Running, and its stage is the job's first unfinished one. Everything else is removed:
/// a finished, queued or unknown job's container, a stage that is already recorded as done
/// or no longer configured, an exited container (its stage runs again), and any container
/// when adoption is off.
pub fn plan(
    containers: &[Container],
    jobs: &HashMap<JobId, &Job>,
    stages: &[Stage],
    adopt_running: bool,
) -> Vec<Decision> {
    let mut adopted: Vec<JobId> = Vec::new();
    containers
        .iter()
        .map(|container| {
            let remove = |reason: &str| Decision::Remove {
                name: container.name.clone(),
                reason: reason.to_string(),
            };
            let Some(job) = container.job.and_then(|id| jobs.get(&id)) else {
                return remove("its job is unknown here");
            };
            if job.status.is_finished() {
                return remove(&format!("its job has finished ({})", job.status));
            }
            if job.status != Status::Running {
                return remove("its job is queued, not running");
            }
            let Some(stage) = stages.iter().find(|s| s.name == container.stage) else {
                return remove("its stage is no longer configured");
            };
            if !matches!(stage.run, StageRun::Docker(_)) {
                return remove("its stage is no longer a container stage");
            }
            let current = super::current_stage(stages, job).map(|s| s.name.as_str());
            if current != Some(stage.name.as_str()) {
                return remove("its stage is not the job's current one");
            }
            if !container.running {
                return remove("it exited while no daemon followed it; the stage runs again");
            }
            if !adopt_running {
                return remove("adopt_running is off; the stage runs again");
            }
            if adopted.contains(&job.id) {
                return remove("its job already has a container adopted");
            }
            adopted.push(job.id);
            Decision::Adopt {
                job_id: job.id,
                adoption: Adoption {
                    stage: stage.name.clone(),
                    container: container.name.clone(),
                },
            }
        })
        .collect()
}

/// The Running jobs whose current stage (the first not recorded) is a container: their
/// container may still run, on their GPUs, so until docker has been asked they keep them.
pub fn awaiting_survey(jobs: &[Job], stages: &[Stage]) -> Vec<JobId> {
    jobs.iter()
        .filter(|job| job.status == Status::Running)
        .filter(|job| {
            super::current_stage(stages, job).is_some_and(|s| matches!(s.run, StageRun::Docker(_)))
        })
        .map(|job| job.id)
        .collect()
}

/// Surveys this data dir's containers, logs and carries out the removals of [`plan`], and
/// returns the adoptions; or what docker said when it cannot be asked (then nothing is
/// decided, and the caller keeps the GPUs of [`awaiting_survey`]'s jobs until it can).
pub async fn reconcile(
    docker: &DockerCli,
    jobs: &[Job],
    stages: &[Stage],
    adopt_running: bool,
) -> Result<HashMap<JobId, Adoption>, String> {
    let containers = docker.survey().await?;
    let jobs: HashMap<JobId, &Job> = jobs.iter().map(|job| (job.id, job)).collect();
    let mut adoptions = HashMap::new();
    for decision in plan(&containers, &jobs, stages, adopt_running) {
        match decision {
            Decision::Adopt { job_id, adoption } => {
                info!(%job_id, container = %adoption.container, stage = %adoption.stage, "container still runs; adopted");
                adoptions.insert(job_id, adoption);
            }
            Decision::Remove { name, reason } => {
                info!(container = %name, reason = %reason, "removing container");
                if let Err(e) = docker.remove(&name).await {
                    warn!(container = %name, error = %e, "cannot remove container");
                }
            }
        }
    }
    Ok(adoptions)
}

/// `docker wait` printed the exit code.
fn exit_code(output: std::io::Result<Output>) -> Outcome {
    match output {
        Ok(output) if output.status.success() => {
            let text = String::from_utf8_lossy(&output.stdout);
            match text.trim().parse::<i32>() {
                Ok(code) => Outcome::Exited(code),
                Err(_) => Outcome::Lost(format!("docker wait printed {:?}", text.trim())),
            }
        }
        Ok(output) => Outcome::Lost(format!("docker wait: {}", failure(&output))),
        Err(e) => Outcome::Lost(format!("docker wait: {e}")),
    }
}

/// Whether a failed CLI call says the Docker engine could not be reached (stopped,
/// restarting, its socket gone), rather than that the call itself was refused.
fn engine_unreachable(output: &Output) -> bool {
    let text = String::from_utf8_lossy(&output.stderr);
    text.contains("Cannot connect to the Docker daemon")
        || text.contains("Is the docker daemon running?")
        || text.contains("error during connect")
}

/// What a failed CLI call said went wrong: its last line on stderr that is not a usage hint
/// (`docker run` ends its errors with "See 'docker run --help'."), or its status.
fn failure(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .map(str::trim)
        .filter(|l| !(l.starts_with("See '") && l.ends_with("--help'.")))
        .rfind(|l| !l.is_empty())
        .map(String::from)
        .unwrap_or_else(|| format!("{}", output.status))
}

/// Bytes as the CLI takes them: the largest unit that divides them.
fn format_bytes(bytes: u64) -> String {
    for (unit, size) in [
        ("t", 1u64 << 40),
        ("g", 1 << 30),
        ("m", 1 << 20),
        ("k", 1 << 10),
    ] {
        if bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}b")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DockerStage, Stage, StageRun};
    use crate::executor::template::Template;

    fn docker_stage(name: &str) -> Stage {
        Stage {
            name: name.into(),
            timeout: None,
            budget: false,
            on_timeout: crate::config::OnTimeout::Fail,
            pass_env: None,
            always: false,
            job_types: Vec::new(),
            run: StageRun::Docker(Box::new(DockerStage {
                image: Template::parse(&format!("{name}-image")).unwrap(),
                args: vec![
                    Template::parse("--task-id").unwrap(),
                    Template::parse("{job_id}").unwrap(),
                ],
                gpus: true,
                memory_per_gpu: Some(64 << 30),
                cpus_per_gpu: Some(8.0),
                shm_size: vec![(1, "16g".into())],
                network: Some("none".into()),
                volumes: vec![Template::parse("{data_dir}/cache:/cache:rw").unwrap()],
                env: vec![("CACHE".into(), Template::parse("/cache/{job_id}").unwrap())],
                docker_args: vec!["--cap-drop=ALL".into()],
            })),
        }
    }

    fn running_job(n: u128, gpus: Option<Vec<u32>>) -> Job {
        let mut job = crate::job::sample_job(n);
        job.start(chrono::Utc::now(), gpus);
        job
    }

    #[test]
    fn run_args_carry_names_labels_limits_and_no_secret_values() {
        let mut cli = DockerCli::new(
            "docker".into(),
            Path::new("/srv/tw"),
            &[],
            "supervise".into(),
        );
        cli.host_cpus = 64.0;
        let job = running_job(1, Some(vec![2, 3]));
        let stage = docker_stage("train");
        let StageRun::Docker(spec) = &stage.run else {
            unreachable!()
        };
        let values = Values::new(&job, "train", "/srv/tw");
        let args = cli.run_args(
            &job,
            "train",
            spec,
            &values,
            &[("JOB_ID".into(), job.id.to_string())],
            &["HUGGINGFACE_TOKEN".into()],
        );
        let id = job.id;
        let expected: Vec<String> = [
            "run",
            "-d",
            "--name",
            &format!("tw-{id}-train"),
            "--label",
            &format!("training-worker.job={id}"),
            "--label",
            "training-worker.stage=train",
            "--label",
            "training-worker.owner=/srv/tw",
            "--gpus",
            "\"device=2,3\"",
            "--memory",
            "128g",
            "--cpus",
            "16",
            "--shm-size",
            "16g",
            "--network",
            "none",
            "-v",
            "/srv/tw/cache:/cache:rw",
            "-e",
            &format!("JOB_ID={id}"),
            "-e",
            "HUGGINGFACE_TOKEN",
            "-e",
            &format!("CACHE=/cache/{id}"),
            "--cap-drop=ALL",
            "train-image",
            "--task-id",
            &id.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(args, expected);

        // Without GPUs: no --gpus, limits for one share.
        let job = running_job(2, None);
        let values = Values::new(&job, "train", "/srv/tw");
        let args = cli.run_args(&job, "train", spec, &values, &[], &[]);
        assert!(!args.contains(&"--gpus".to_string()), "{args:?}");
        assert!(
            args.windows(2).any(|w| w == ["--memory", "64g"]),
            "{args:?}"
        );
    }

    #[test]
    fn the_image_takes_placeholders_and_shm_grows_with_the_gpus() {
        let cli = DockerCli::new(
            "docker".into(),
            Path::new("/srv/tw"),
            &[],
            "supervise".into(),
        );
        let mut stage = docker_stage("train");
        let StageRun::Docker(spec) = &mut stage.run else {
            unreachable!()
        };
        spec.image = Template::parse("trainer-{job_id}").unwrap();
        spec.shm_size = vec![(1, "8g".into()), (4, "16g".into())];
        let shm = |spec: &DockerStage, gpus: Option<Vec<u32>>| {
            let job = running_job(3, gpus);
            let values = Values::new(&job, "train", "/srv/tw");
            let args = cli.run_args(&job, "train", spec, &values, &[], &[]);
            assert!(args.contains(&format!("trainer-{}", job.id)), "{args:?}");
            let at = args.iter().position(|a| a == "--shm-size");
            at.map(|i| args[i + 1].clone())
        };
        assert_eq!(shm(spec, None).as_deref(), Some("8g"));
        assert_eq!(shm(spec, Some(vec![0, 1, 2])).as_deref(), Some("8g"));
        assert_eq!(shm(spec, Some(vec![0, 1, 2, 3])).as_deref(), Some("16g"));
        assert_eq!(shm(spec, Some((0..8).collect())).as_deref(), Some("16g"));
        // Only from two GPUs on: a one-GPU job keeps docker's default.
        spec.shm_size = vec![(2, "8g".into())];
        assert_eq!(shm(spec, Some(vec![0])), None);
    }

    #[test]
    fn plan_adopts_only_the_current_running_stage_when_allowed() {
        let stages = vec![
            docker_stage("download"),
            docker_stage("train"),
            docker_stage("upload"),
        ];
        let mut running = running_job(1, Some(vec![0]));
        running.stages_done = vec!["download".into()];
        let finished = {
            let mut j = running_job(2, None);
            j.finish(Status::Completed, None, chrono::Utc::now());
            j
        };
        let queued = crate::job::sample_job(3);
        let all = [running.clone(), finished.clone(), queued.clone()];
        let jobs: HashMap<JobId, &Job> = all.iter().map(|j| (j.id, j)).collect();
        let container = |job: JobId, stage: &str, running: bool| Container {
            name: container_name(job, stage),
            running,
            job: Some(job),
            stage: stage.into(),
        };
        let containers = vec![
            container(running.id, "train", true),
            container(running.id, "download", false),
            container(finished.id, "upload", true),
            container(queued.id, "train", true),
            container(JobId::new_random(), "train", true),
            Container {
                name: "stray".into(),
                running: true,
                job: None,
                stage: String::new(),
            },
        ];
        let decisions = plan(&containers, &jobs, &stages, true);
        assert_eq!(
            decisions[0],
            Decision::Adopt {
                job_id: running.id,
                adoption: Adoption {
                    stage: "train".into(),
                    container: container_name(running.id, "train"),
                },
            }
        );
        for (i, why) in [
            (1, "not the job's current one"),
            (2, "has finished"),
            (3, "queued"),
            (4, "unknown"),
            (5, "unknown"),
        ] {
            match &decisions[i] {
                Decision::Remove { reason, .. } => assert!(reason.contains(why), "{i}: {reason}"),
                other => panic!("{i}: {other:?}"),
            }
        }
        // Adoption off, or the container already gone: removed, the stage runs again.
        let off = plan(&containers[..1], &jobs, &stages, false);
        assert!(
            matches!(&off[0], Decision::Remove { reason, .. } if reason.contains("adopt_running is off"))
        );
        let exited = plan(
            &[container(running.id, "train", false)],
            &jobs,
            &stages,
            true,
        );
        assert!(matches!(&exited[0], Decision::Remove { reason, .. } if reason.contains("exited")));
    }

    #[test]
    fn a_failure_names_the_cause_not_the_usage_hint() {
        use std::os::unix::process::ExitStatusExt;
        let output = Output {
            status: std::process::ExitStatus::from_raw(125 << 8),
            stdout: Vec::new(),
            stderr: b"Unable to find image 'x:latest' locally\ndocker: Error response from daemon: pull access denied for x.\nSee 'docker run --help'.\n".to_vec(),
        };
        assert_eq!(
            failure(&output),
            "docker: Error response from daemon: pull access denied for x."
        );
        let silent = Output {
            stderr: Vec::new(),
            ..output
        };
        assert!(failure(&silent).contains("125"), "{}", failure(&silent));
    }

    #[test]
    fn sizes_use_the_largest_whole_unit() {
        assert_eq!(format_bytes(128 << 30), "128g");
        assert_eq!(format_bytes(1536 << 20), "1536m");
        assert_eq!(format_bytes(1 << 40), "1t");
        assert_eq!(format_bytes(1000), "1000b");
    }
}
