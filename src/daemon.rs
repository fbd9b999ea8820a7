//! The daemon: lock the data dir, replay it, run the store, the worker, the executor and the
//! API under one shutdown token and one task tracker, and report how it all ended.
//!
//! Start order matters. The GPU inventory comes first: `[worker] gpus = "auto"` that finds
//! no GPUs is a bad configuration, refused (exit 78) before anything is touched. Then the
//! lock, so that nothing of a live daemon is touched; then trainers left by a dead one are
//! killed; then the listener is bound, so `/healthz` answers and `/readyz` says 503 during a
//! long replay; then replay, the boot writes, and only then does the worker start jobs and
//! `/v1/` accept requests.
//!
//! Stop order is the reverse. On a signal `/readyz` says 503 and submissions, cancels and
//! offers are refused with 503 while the worker stops its trainers and writes their jobs
//! back; the listener stays open meanwhile, so that a load balancer sees the daemon stopping
//! rather than gone. Only then does the listener close, and the store flush and end.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::api::{self, AppState, serve};
use crate::config::Config;
use crate::executor::{self, Executor};
use crate::gpu;
use crate::metrics::METRICS;
use crate::notify::{self, Notifier};
use crate::store::lock::{self, LockError};
use crate::store::{self, OpenError};
use crate::worker::{Boot, ClusterBoot, Worker};

/// The exit codes a supervisor can branch on (sysexits.h values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A graceful stop: everything flushed.
    Graceful = 0,
    /// The stop did not finish within `shutdown_grace`; the next boot replays.
    Unclean = 1,
    /// The listen address could not be bound, or the database cannot be reached at start.
    Unavailable = 69,
    /// Storage failed (a failed fsync, an unwritable data dir); a restart replays.
    Storage = 74,
    /// Another daemon holds the data dir (or the database).
    Locked = 75,
    /// The configuration is invalid.
    Config = 78,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// How long boot waits for trainers of a dead daemon to disappear after SIGKILL.
const LEFTOVER_PATIENCE: Duration = Duration::from_secs(10);

/// Runs the daemon until `stop` (a signal, in production) or a fatal storage error.
/// Errors are logged here, in one line each; the exit code says what happened.
pub async fn run(mut config: Config, stop: impl Future<Output = ()> + Send + 'static) -> Exit {
    // Before anything is served: every scrape carries the node's name.
    METRICS.set_node(&config.cluster.node_id);
    if let Err(e) = resolve_gpus(&mut config).await {
        error!("bad configuration: {e}");
        return Exit::Config;
    }
    if let Err(e) = std::fs::create_dir_all(&config.data_dir) {
        error!(data_dir = %config.data_dir.display(), error = %e, "cannot create the data dir");
        return Exit::Storage;
    }
    // One spelling of the data dir for every run: trainers are marked with it, and the next
    // daemon finds their leftovers by it, whatever path it was started with.
    match std::fs::canonicalize(&config.data_dir) {
        Ok(canonical) => config.data_dir = canonical,
        Err(e) => {
            error!(data_dir = %config.data_dir.display(), error = %e, "cannot resolve the data dir");
            return Exit::Storage;
        }
    }
    let data_dir = config.data_dir.clone();
    let _lock = match lock::lock_data_dir(&data_dir) {
        Ok(lock) => lock,
        Err(e @ LockError::Held { .. }) => {
            error!("{e}");
            return Exit::Locked;
        }
        Err(e) => {
            error!("{e}");
            return Exit::Storage;
        }
    };
    // The trainers' logs are the box's own, whichever store holds the records.
    let logs = data_dir.join(crate::layout::LOGS_DIR);
    if let Err(e) = std::fs::create_dir_all(&logs) {
        error!(dir = %logs.display(), error = %e, "cannot create the logs dir");
        return Exit::Storage;
    }

    let started = Instant::now();
    let leftovers = {
        let data_dir = data_dir.clone();
        tokio::task::spawn_blocking(move || {
            executor::orphans::kill_leftovers(&data_dir, LEFTOVER_PATIENCE)
        })
        .await
        .unwrap_or(0)
    };
    if leftovers > 0 {
        warn!(
            killed = leftovers,
            "killed trainer processes left by a previous daemon"
        );
    }

    let (nofile, inherited) = raise_descriptor_limit();
    // Trainers get the limit the daemon was given: a raised one can break a program that
    // uses select(2), and a trainer that needs more raises its own.
    config.executor.trainer_nofile = inherited.filter(|soft| *soft < nofile);
    let listener = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            error!(listen = %config.listen, error = %e, "cannot listen");
            return Exit::Unavailable;
        }
    };
    let address = listener.local_addr().unwrap_or(config.listen);
    // The G.O.D trainer API, when configured: its own listener, bound as early.
    let trainer_listener = match config.trainer_api.listen {
        None => None,
        Some(listen) => match TcpListener::bind(listen).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                error!(listen = %listen, error = %e, "cannot listen for the trainer API (god_trainer.listen)");
                return Exit::Unavailable;
            }
        },
    };
    let limits = serve::Limits {
        header_read_timeout: config.api.header_read_timeout,
        max_connections: serve::connection_cap(config.api.max_connections, nofile),
    };
    if limits.max_connections < config.api.max_connections {
        warn!(
            configured = config.api.max_connections,
            max_connections = limits.max_connections,
            nofile,
            "api.max_connections lowered to fit the descriptor limit"
        );
    }

    let shutdown = CancellationToken::new();
    // Closes the listener: only once the worker has stopped, after `shutdown`, so that
    // during the stop clients get 503s (and `/readyz` says "stopping") instead of a refused
    // connection.
    let close_http = CancellationToken::new();
    let fatal = CancellationToken::new();
    let tracker = TaskTracker::new();
    let state = AppState::new(
        config.api_token.clone(),
        config.max_body_bytes,
        shutdown.clone(),
    )
    .with_data_dir(&data_dir);
    tracker.spawn(serve::serve(
        listener,
        api::router(state.clone()),
        limits,
        close_http.clone(),
    ));
    if let Some(trainer_listener) = trainer_listener {
        let trainer_address = trainer_listener.local_addr().ok();
        let trainer_state = api::god::TrainerState::new(
            state.clone(),
            config.trainer_api.allow.clone(),
            config.executor.stages.clone(),
            config.god_trainer.gpu_types.clone(),
        );
        tracker.spawn(serve::serve(
            trainer_listener,
            api::god::router(trainer_state),
            limits,
            close_http.clone(),
        ));
        info!(address = ?trainer_address, allow = ?config.trainer_api.allow, "the G.O.D trainer API listens");
    }
    info!(
        %address,
        data_dir = %data_dir.display(),
        max_connections = limits.max_connections,
        nofile,
        "listening; replaying the data dir"
    );
    // A no-op unless a service manager (systemd, Type=notify) set NOTIFY_SOCKET.
    let notifier = Notifier::from_env();
    notifier.status("replaying the data dir");

    // Signals and fatal errors are watched from here on, so that a stop during a long
    // replay is honoured as soon as replay ends.
    tokio::spawn({
        let shutdown = shutdown.clone();
        let fatal = fatal.clone();
        async move {
            tokio::select! {
                _ = stop => info!("stop requested; shutting down"),
                _ = fatal.cancelled() => {}
            }
            shutdown.cancel();
        }
    });

    let replay_started = Instant::now();
    let opened = match store::open(&config.store, &data_dir, fatal.clone()).await {
        Ok(opened) => opened,
        Err(e) => {
            let exit = match &e {
                OpenError::Storage(_) => Exit::Storage,
                OpenError::Unreachable(_) => Exit::Unavailable,
                OpenError::Held(_) => Exit::Locked,
            };
            error!(error = %e, "cannot open the store");
            return stop_after_failure(shutdown, close_http, tracker, exit).await;
        }
    };
    let quarantined = opened.recovered.quarantined;
    METRICS.set_replay_duration(replay_started.elapsed());
    METRICS.quarantined.inc_by(quarantined as u64);
    // Containers of a crashed daemon: adopted, or removed before their stage runs again.
    // When docker cannot be asked, the jobs whose container may still run keep their GPUs
    // until it can (see `survey_until_answered`).
    let docker = config.executor.docker.as_ref().map(|program| {
        executor::docker::DockerCli::new(
            program.clone(),
            &data_dir,
            &config.executor.pass_env,
            config.executor.supervisor.clone(),
        )
    });
    // Jobs other nodes run are not this box's: a container of one here is removed.
    let here: Vec<crate::job::Job> = opened
        .recovered
        .jobs
        .iter()
        .filter(|j| !opened.recovered.elsewhere.contains_key(&j.id))
        .cloned()
        .collect();
    let (adopted, unsurveyed) = match &docker {
        Some(docker) => match executor::docker::reconcile(
            docker,
            &here,
            &config.executor.stages,
            config.executor.adopt_running,
        )
        .await
        {
            Ok(adopted) => (adopted, Vec::new()),
            Err(e) => {
                let held = executor::docker::awaiting_survey(&here, &config.executor.stages);
                warn!(error = %e, jobs = held.len(), "cannot list this data dir's containers; the jobs whose container may still run keep their GPUs until docker answers");
                (std::collections::HashMap::new(), held)
            }
        },
        None => (std::collections::HashMap::new(), Vec::new()),
    };
    drop(here);
    let store::Opened {
        handle: store_handle,
        recovered,
        cluster: cluster_events,
        ended: store_ended,
    } = opened;
    let boot = Boot {
        jobs: recovered.jobs,
        order: recovered.order,
        adopted,
        unsurveyed: unsurveyed.clone(),
        node: (
            config.cluster.node_id.clone(),
            config.cluster.address.clone(),
        ),
        cluster: cluster_events.map(|events| ClusterBoot {
            node_id: config.cluster.node_id.clone(),
            lease: config.cluster.lease,
            versions: recovered.versions,
            ranks: recovered.ranks,
            elsewhere: recovered.elsewhere,
            events,
        }),
    };
    let executor_config = config.executor.clone();
    let executor_tracker = tracker.clone();
    let exec_data_dir = data_dir.clone();
    let booted = Worker::boot(
        config.worker.clone(),
        store_handle,
        move |reports| Executor::new(executor_config, exec_data_dir, reports, executor_tracker),
        boot,
        shutdown.clone(),
    )
    .await;
    let (handle, worker, report) = match booted {
        Ok(booted) => booted,
        Err(e) => {
            error!(error = %e, "cannot write the recovered state");
            return stop_after_failure(shutdown, close_http, tracker, Exit::Storage).await;
        }
    };
    let worker_task = tracker.spawn(worker.run());
    if let Some(docker) = docker.filter(|_| !unsurveyed.is_empty()) {
        tracker.spawn(survey_until_answered(
            docker,
            handle.clone(),
            config.executor.stages.clone(),
            config.executor.adopt_running,
            shutdown.clone(),
        ));
    }
    state.set_worker(handle.clone());
    state.set_boot_report(report, quarantined);
    info!(
        jobs = report.loaded,
        requeued = report.requeued,
        interrupted = report.interrupted,
        adopted = report.adopted,
        awaiting_survey = report.awaiting_survey,
        failed_out_of_attempts = report.failed_attempts,
        quarantined,
        took_ms = started.elapsed().as_millis() as u64,
        "ready"
    );
    // Now, not earlier: READY means what a 200 from /readyz means.
    notifier.ready(&format!(
        "ready: {} jobs loaded, {} to run; listening on {address}",
        report.loaded, report.requeued
    ));
    if let Some(timeout) = notify::watchdog_timeout_from_env().filter(|_| notifier.is_enabled()) {
        let ping = move || {
            let handle = handle.clone();
            async move { handle.ping().await.is_ok() }
        };
        tracker.spawn(notify::watchdog(
            notifier.clone(),
            timeout,
            ping,
            shutdown.clone(),
        ));
    }

    shutdown.cancelled().await;
    notifier.stopping();
    let grace = config.shutdown_grace;
    let deadline = Instant::now() + grace;
    // The API's state holds the last worker handle outside the tracker's tasks.
    drop(state);
    // The worker stops its trainers and writes their jobs back meanwhile; then the listener
    // closes. A worker that does not end in time is reported by the wait below.
    let stopped = tokio::time::timeout(grace, worker_task).await;
    close_http.cancel();
    tracker.close();
    let left = deadline.saturating_duration_since(Instant::now());
    if tokio::time::timeout(left, tracker.wait()).await.is_err() {
        error!(grace = %humantime::format_duration(grace), "shutdown did not finish within shutdown_grace; exiting anyway, the next boot replays");
        return Exit::Unclean;
    }
    // Every store handle is gone with the worker, so the store thread is finishing.
    let left = deadline.saturating_duration_since(Instant::now());
    let joined = tokio::time::timeout(left, store_ended.wait()).await;
    if joined != Ok(true) {
        error!("the store did not finish within shutdown_grace");
        return Exit::Unclean;
    }
    if fatal.is_cancelled() {
        error!("stopped after a fatal storage error; restart to replay from disk");
        return Exit::Storage;
    }
    // What the worker said when it ended: whether the stop was clean.
    let unwritten = match stopped {
        Ok(Ok(stopped)) => stopped.unwritten,
        _ => 0,
    };
    if unwritten > 0 {
        error!(
            jobs = unwritten,
            "stopped, but interrupted jobs could not be written back; the next boot counts their starts"
        );
        return Exit::Storage;
    }
    info!("stopped");
    Exit::Graceful
}

/// Asks nvidia-smi what the GPUs are (`executor::gpus::inventory`) and puts the answer in
/// `config.worker`: the ids to hand out, and the inventory that the APIs report. Says what
/// it found, and names each GPU that the trainer API would leave out.
async fn resolve_gpus(config: &mut Config) -> Result<(), executor::gpus::InventoryError> {
    // Names and memory are needed by the trainer API, which reports them: with it on, an
    // inventory that cannot be read is a configuration error.
    let required = config.trainer_api.listen.is_some();
    let inventory =
        executor::gpus::inventory(&config.worker, required, executor::gpus::QUERY_TIMEOUT).await?;
    config.worker.gpus = inventory.ids;
    config.worker.inventory = inventory.gpus;
    if config.worker.inventory.is_empty() {
        return Ok(());
    }
    let found: Vec<String> = config
        .worker
        .inventory
        .iter()
        .map(|g| format!("{}: {} ({} MiB)", g.id, g.name, g.memory_mib))
        .collect();
    info!(gpus = %found.join(", "), "GPU inventory");
    for gpu in &config.worker.inventory {
        if gpu.memory_mib == 0 {
            warn!(gpu = gpu.id, name = %gpu.name, "nvidia-smi does not say how much memory this GPU has; it is reported as unknown (vram_gb 0 to the trainer API)");
        }
    }
    for gpu in gpu::unmapped(&config.worker.inventory, &config.god_trainer.gpu_types) {
        warn!(
            gpu = gpu.id,
            name = %gpu.name,
            "GPU of no type the G.O.D client accepts (H100, A100, A6000): the trainer API leaves it out; map a part of its name in [god_trainer] gpu_types"
        );
    }
    Ok(())
}

/// Raises the soft limit on open descriptors to the hard limit, and returns the soft limit
/// now in force and the one inherited (when it could be read). A shell's soft limit (often 1024) is a default for interactive programs;
/// the daemon's clients, job files and trainers all need descriptors, and the hard limit is
/// what the administrator allows.
fn raise_descriptor_limit() -> (u64, Option<u64>) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        let e = std::io::Error::last_os_error();
        warn!(error = %e, "cannot read the descriptor limit (RLIMIT_NOFILE); assuming 1024");
        return (1024, None);
    }
    let (soft, hard) = (limit.rlim_cur, limit.rlim_max);
    if soft >= hard {
        return (soft, Some(soft));
    }
    let raised = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        let e = std::io::Error::last_os_error();
        warn!(soft, hard, error = %e, "cannot raise the descriptor limit (RLIMIT_NOFILE); keeping the soft limit");
        return (soft, Some(soft));
    }
    info!(
        from = soft,
        nofile = hard,
        "raised the descriptor limit (RLIMIT_NOFILE) to its hard limit"
    );
    (hard, Some(soft))
}

/// Asks docker again, with a backoff from 1 s to a minute, until it answers, then hands the
/// worker what it found for the jobs that kept their GPUs meanwhile. The plan is made from
/// those jobs as they stand then (one cancelled meanwhile has its container removed).
async fn survey_until_answered(
    docker: executor::docker::DockerCli,
    worker: crate::worker::WorkerHandle,
    stages: Vec<crate::config::Stage>,
    adopt_running: bool,
    shutdown: CancellationToken,
) {
    let mut wait = Duration::from_secs(1);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        let Ok(jobs) = worker.awaiting_survey().await else {
            return;
        };
        match executor::docker::reconcile(&docker, &jobs, &stages, adopt_running).await {
            Ok(adopted) => {
                info!(
                    jobs = jobs.len(),
                    adopted = adopted.len(),
                    "docker answers again; the held jobs are adopted or requeued"
                );
                let _ = worker.surveyed(adopted).await;
                return;
            }
            Err(e) => {
                wait = (wait * 2).min(Duration::from_secs(60));
                tracing::debug!(error = %e, retry_in = ?wait, "docker still does not answer");
            }
        }
    }
}

/// Boot failed after the API started: stop it and return `exit`.
async fn stop_after_failure(
    shutdown: CancellationToken,
    close_http: CancellationToken,
    tracker: TaskTracker,
    exit: Exit,
) -> Exit {
    shutdown.cancel();
    close_http.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    exit
}

/// Installs the SIGTERM, SIGINT and SIGHUP handlers now, and returns a future that resolves
/// when one arrives. Installed before anything else, so that a stop during boot is graceful
/// too. SIGHUP is a stop like the others: it is what a closing terminal or SSH session sends
/// a foreground daemon, and its default action would kill the daemon mid-run, counting the
/// running job's start as a crash. A second SIGTERM or SIGINT exits at once: everything
/// acknowledged is already durable, so nothing is lost by not waiting. A second SIGHUP does
/// not: a hangup often comes twice (from the terminal and from the shell passing it on to its
/// jobs), and nobody asked for haste.
pub fn termination_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let installed = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    );
    async move {
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = installed else {
            error!("cannot install signal handlers; stop the daemon with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => info!(signal = "SIGTERM", "stop signal"),
            _ = int.recv() => info!(signal = "SIGINT", "stop signal"),
            _ = hup.recv() => info!(signal = "SIGHUP", "stop signal"),
        }
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    // Tokio keeps the handler installed, so a later SIGHUP is only noted.
                    _ = hup.recv() => info!(signal = "SIGHUP", "already stopping"),
                }
            }
            warn!("second stop signal; exiting now");
            std::process::exit(Exit::Unclean as i32);
        });
    }
}
