//! The app assembled in-process the way `daemon::run` assembles it: the store on a data
//! dir, the worker with its executor, and the router over the app state. Each test binary
//! wraps the parts in an app of its own and drives the router with `tower::ServiceExt`.

use std::path::Path;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use training_worker::api::{self, AppState};
use training_worker::config::{ExecutorConfig, WorkerConfig};
use training_worker::executor::Executor;
use training_worker::executor::template::Template;
use training_worker::store::files::{Opened, Store};
use training_worker::worker::{Boot, Clock, Worker};

/// A process executor running `command` for every job, with `timeout` and a 2 s kill grace;
/// no stages, no docker, no environment passed on. The argv is taken literally, braces and all.
pub fn executor_config(command: Vec<String>, timeout: Duration) -> ExecutorConfig {
    ExecutorConfig {
        command: command.iter().map(|a| Template::literal(a)).collect(),
        timeout,
        kill_grace: Duration::from_secs(2),
        pass_env: Vec::new(),
        stages: Vec::new(),
        docker: None,
        adopt_running: false,
        job_copies: false,
        max_log_bytes: 0,
        // This test binary is not the daemon's: the supervisor is the real one.
        supervisor: env!("CARGO_BIN_EXE_training-worker").into(),
        trainer_nofile: None,
    }
}

/// How the app is put together.
pub struct Assembly {
    pub executor: ExecutorConfig,
    pub worker: WorkerConfig,
    /// The worker's clock; `None` keeps the one it boots with.
    pub clock: Option<Clock>,
    pub api_token: Option<String>,
    pub max_body_bytes: usize,
}

/// A running app: its router, and what stops it.
pub struct Parts {
    pub router: Router,
    /// The worker's handle, for what no route asks yet.
    pub handle: training_worker::worker::WorkerHandle,
    pub shutdown: CancellationToken,
    /// The worker's task.
    pub worker: JoinHandle<training_worker::worker::Stopped>,
    /// The store's persistence thread; it ends once every store handle is dropped.
    pub store: std::thread::JoinHandle<()>,
    /// The executor's trainer tasks.
    pub trainers: TaskTracker,
}

/// Sends `request` through `router` without a socket; the answer's status, headers and body.
pub async fn call(router: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    let response = router
        .clone()
        .oneshot(request)
        .await
        .expect("the router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    (status, headers, body)
}

/// Opens the store on `data` (created if need be), boots the worker on what it recovered,
/// spawns the worker and builds the router over an app state that has it.
pub async fn assemble(data: &Path, assembly: Assembly) -> Parts {
    std::fs::create_dir_all(data).expect("the data dir");
    let Opened {
        handle,
        recovered,
        thread,
    } = Store::open(data, CancellationToken::new()).expect("the store opens");
    let shutdown = CancellationToken::new();
    let trainers = TaskTracker::new();
    let tracker = trainers.clone();
    let executor = assembly.executor;
    let exec_data = data.to_path_buf();
    let (handle, worker, _report) = Worker::boot(
        assembly.worker,
        handle,
        move |events| Executor::new(executor, exec_data, events, tracker),
        Boot {
            jobs: recovered.jobs,
            order: recovered.order,
            adopted: Default::default(),
            unsurveyed: Vec::new(),
        },
        shutdown.clone(),
    )
    .await
    .expect("the worker boots");
    let worker = match assembly.clock {
        Some(clock) => worker.with_clock(clock),
        None => worker,
    };
    let worker = tokio::spawn(worker.run());
    let state = AppState::new(
        assembly.api_token,
        assembly.max_body_bytes,
        shutdown.clone(),
    );
    state.set_worker(handle.clone());
    Parts {
        router: api::router(state),
        handle,
        shutdown,
        worker,
        store: thread,
        trainers,
    }
}
