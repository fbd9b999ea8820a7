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
use training_worker::config::{ClusterConfig, PostgresConfig, StoreConfig, StoreKind};
use training_worker::config::{ExecutorConfig, WorkerConfig};
use training_worker::executor::Executor;
use training_worker::executor::template::Template;
use training_worker::store::{self, Ended, Opened};
use training_worker::worker::{Boot, Clock, Worker};

#[allow(dead_code)]
#[path = "../e2e_support/pg.rs"]
mod pg;

// Each test binary takes what it needs of this module; not all of them use these.
#[allow(unused_imports)]
pub use pg::{not_for_this_store, postgres_store};

/// The database that stands for the data dir `data` (made at its first use), so that an app
/// assembled again on the same data dir, as after a crash, finds what the last one stored.
pub fn database_of(data: &Path) -> String {
    static DATABASES: std::sync::Mutex<
        Option<std::collections::HashMap<std::path::PathBuf, String>>,
    > = std::sync::Mutex::new(None);
    let mut databases = DATABASES.lock().expect("the databases");
    databases
        .get_or_insert_with(Default::default)
        .entry(data.to_path_buf())
        .or_insert_with(|| {
            pg::Postgres::shared("an in-process app on the PostgreSQL store")
                .expect("TW_TEST_STORE=postgres needs PostgreSQL")
                .database()
        })
        .clone()
}

/// A job's record: its job file under `data`, or with [`postgres_store`] its row.
pub fn record(data: &Path, id: &str) -> serde_json::Value {
    let text = if postgres_store() {
        let body = query(
            &database_of(data),
            &format!("SELECT body FROM tw_jobs WHERE id = '{id}'"),
        );
        assert!(!body.trim().is_empty(), "no row for job {id}");
        body
    } else {
        std::fs::read_to_string(data.join(format!("jobs/{id}.json"))).expect("the job file")
    };
    serde_json::from_str(text.trim()).expect("a job record is JSON")
}

/// Runs `sql` in the database `url` names, on the test binary's PostgreSQL server; its
/// rows, one a line, fields by `|`.
pub fn query(url: &str, sql: &str) -> String {
    pg::Postgres::shared("a query")
        .expect("PostgreSQL")
        .query(url, sql)
}

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
    /// The store's persistence thread (or task); it ends once every store handle is dropped.
    pub store: Ended,
    /// The database's URL when the app keeps its records in PostgreSQL.
    pub database: Option<String>,
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
    // The daemon makes the trainers' logs dir whichever store it has; so does the app.
    std::fs::create_dir_all(data.join(training_worker::layout::LOGS_DIR)).expect("the data dir");
    let database = (postgres_store() && assembly.clock.is_none()).then(|| database_of(data));
    let config = match &database {
        // A test with a clock of its own runs on paused time, which does not go with a real
        // server's I/O (its timeouts would fire at once): it keeps the file store.
        Some(url) => StoreConfig {
            kind: StoreKind::Postgres(PostgresConfig {
                url: url.clone(),
                pool_size: 4,
                cluster: ClusterConfig::exclusive("router-tests"),
            }),
        },
        None => StoreConfig::default(),
    };
    let Opened {
        handle,
        recovered,
        ended,
        ..
    } = store::open(&config, data, CancellationToken::new())
        .await
        .expect("the store opens");
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
            node: ("router-tests".into(), "http://127.0.0.1:0".into()),
            cluster: None,
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
        store: ended,
        database,
        trainers,
    }
}
