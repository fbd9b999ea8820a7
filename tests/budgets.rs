//! Time budgets, the deadline order, start estimates and offers, with paused time.
//!
//! The app is assembled in-process as `daemon::run` assembles it (store, worker, executor,
//! router) and driven through the HTTP layer with `Router::oneshot`. The worker reads the
//! time from a clock that follows Tokio's, and Tokio's clock is paused: time moves only when
//! a test calls `tokio::time::advance`, so hours of budget pass at once and every time the
//! API shows can be asserted exactly.
//!
//! Tokio advances a paused clock by itself whenever the runtime has nothing to do, which it
//! would while a test waits for the store's thread or a trainer; a blocking task stops that
//! (see [`ClockHold`]), and waits for such real work poll with pauses taken off the runtime.
//!
//! Trainers are `/bin/sh` loops that run while a hold file of their job exists.

use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use training_worker::config::{OfferConfig, Order, WorkerConfig};
use training_worker::metrics::METRICS;
use training_worker::worker::Clock;

use app_support::{Assembly, executor_config};

#[allow(dead_code)]
mod app_support;

/// The moment the tests' clocks start at.
const T0: &str = "2030-01-01T00:00:00Z";

fn t0() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(T0)
        .expect("T0 is RFC 3339")
        .with_timezone(&chrono::Utc)
}

/// `T0` plus `minutes`, as the API writes times.
fn at(minutes: f64) -> String {
    let t = t0() + chrono::Duration::milliseconds((minutes * 60_000.0).round() as i64);
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Like [`at`], `micros` microseconds later: a job accepted at the same instant as the one
/// before it is accepted a microsecond later, since creation times strictly increase.
fn at_micros(minutes: f64, micros: i64) -> String {
    let t = t0()
        + chrono::Duration::milliseconds((minutes * 60_000.0).round() as i64)
        + chrono::Duration::microseconds(micros);
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn hours(n: f64) -> Duration {
    Duration::from_secs_f64(n * 3600.0)
}

/// Keeps Tokio's paused clock still while the test waits for real work: Tokio does not
/// advance a paused clock by itself while a blocking task runs. Dropping it lets go.
struct ClockHold {
    _release: std::sync::mpsc::Sender<()>,
}

fn hold_clock() -> ClockHold {
    let (release, wait) = std::sync::mpsc::channel::<()>();
    tokio::task::spawn_blocking(move || {
        // Returns once the sender is dropped.
        let _ = wait.recv();
    });
    ClockHold { _release: release }
}

/// A pause in real time that leaves Tokio's clock where it is, between two polls of a
/// condition that real work (the store thread, a trainer) brings about.
async fn real_pause() {
    tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(10)))
        .await
        .expect("the pause ends");
}

/// Polls `check` until it gives a value, for at most 20 s of real time.
async fn wait_for<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        real_pause().await;
    }
}

/// A job id the tests choose, so that its trainer can be held before it starts.
fn id(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn job(n: u32, kind: &str, hours: Option<f64>, gpus: Option<u32>) -> Value {
    let mut job = match kind {
        "TextJob" => json!({
            "type": "TextJob", "model": "org/text-model", "dataset": "d.json",
            "dataset_type": {}, "file_format": "json",
        }),
        _ => json!({"type": "DiffusionJob", "model": "org/image-model", "dataset_zip": "z.zip"}),
    };
    job["job_id"] = json!(id(n));
    if let Some(h) = hours {
        job["hours_to_complete"] = json!(h);
    }
    if let Some(g) = gpus {
        job["gpu_count"] = json!(g);
    }
    job
}

/// The worker settings a test varies.
#[derive(Clone)]
struct Setup {
    max_concurrent: usize,
    gpus: Vec<u32>,
    order: Order,
    assumed: Duration,
    offers: OfferConfig,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            max_concurrent: 1,
            gpus: Vec::new(),
            order: Order::Fifo,
            assumed: hours(1.0),
            offers: OfferConfig::default(),
        }
    }
}

/// A data dir that outlives the daemons started on it, and the trainers' hold files.
struct Sandbox {
    root: TempDir,
    clock: Clock,
}

/// One run of the worker on the box's data dir.
struct App {
    router: Router,
    shutdown: CancellationToken,
    worker: JoinHandle<training_worker::worker::Stopped>,
    store: training_worker::store::Ended,
    trainers: TaskTracker,
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Sandbox {
    /// A new box whose clock reads [`T0`] now.
    fn new() -> Sandbox {
        Sandbox {
            root: tempfile::tempdir().expect("a temp dir"),
            clock: Clock::following_tokio(t0()),
        }
    }

    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn hold_file(&self, n: u32) -> PathBuf {
        self.root.path().join(format!("hold-{}", id(n)))
    }

    /// Keeps job `n`'s trainer running once it starts, until [`Sandbox::release`].
    fn hold(&self, n: u32) {
        std::fs::write(self.hold_file(n), b"").expect("write a hold file");
    }

    fn release(&self, n: u32) {
        std::fs::remove_file(self.hold_file(n)).expect("remove a hold file");
    }

    fn job_file(&self, n: u32) -> Value {
        let path = self.data().join("jobs").join(format!("{}.json", id(n)));
        serde_json::from_slice(&std::fs::read(&path).expect("a job file")).expect("JSON")
    }

    fn write_job_file(&self, n: u32, job: &Value) {
        let path = self.data().join("jobs").join(format!("{}.json", id(n)));
        std::fs::write(path, serde_json::to_vec_pretty(job).expect("JSON")).expect("write");
    }

    /// Boots a worker on the data dir, as the daemon does.
    async fn start(&self, setup: &Setup) -> App {
        let script = format!(
            "while [ -e '{}/hold-'\"$JOB_ID\" ]; do sleep 0.02; done",
            self.root.path().display()
        );
        let parts = app_support::assemble(
            &self.data(),
            Assembly {
                executor: executor_config(vec!["/bin/sh".into(), "-c".into(), script], hours(24.0)),
                worker: WorkerConfig {
                    max_concurrent: setup.max_concurrent,
                    gpus: setup.gpus.clone(),
                    order: setup.order,
                    assumed_duration: setup.assumed,
                    offers: setup.offers.clone(),
                    ..WorkerConfig::default()
                },
                clock: Some(self.clock.clone()),
                api_token: None,
                max_body_bytes: 1024 * 1024,
            },
        )
        .await;
        App {
            router: parts.router,
            shutdown: parts.shutdown,
            worker: parts.worker,
            store: parts.store,
            trainers: parts.trainers,
        }
    }
}

impl App {
    async fn send(&self, method: Method, uri: &str, body: Option<&Value>) -> Reply {
        let mut request = Request::builder().method(method).uri(uri);
        let body = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(body).expect("JSON"))
            }
            None => Body::empty(),
        };
        let request = request.body(body).expect("a request");
        let (status, headers, bytes) = app_support::call(&self.router, request).await;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn submit(&self, job: &Value) -> Value {
        let reply = self.send(Method::POST, "/v1/jobs", Some(job)).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.body
    }

    async fn job(&self, n: u32) -> Value {
        let reply = self
            .send(Method::GET, &format!("/v1/jobs/{}", id(n)), None)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body
    }

    /// Job `n`'s estimated start and end, as the headers of `GET /v1/jobs/{id}` say them.
    async fn estimate(&self, n: u32) -> (String, String) {
        let reply = self
            .send(Method::GET, &format!("/v1/jobs/{}", id(n)), None)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let header = |name: &str| {
            reply
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("no {name} header"))
                .to_string()
        };
        (header("x-estimated-start"), header("x-estimated-finish"))
    }

    async fn offer(&self, offer: Value) -> Value {
        let reply = self.send(Method::POST, "/v1/offers", Some(&offer)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body
    }

    /// `GET /v1/queue` as job numbers: (running, queued).
    async fn queue(&self) -> (Vec<u32>, Vec<u32>) {
        let reply = self.send(Method::GET, "/v1/queue", None).await;
        let numbers = |list: &Value| -> Vec<u32> {
            list.as_array()
                .expect("a list")
                .iter()
                .map(|id| number(id.as_str().expect("an id")))
                .collect()
        };
        (
            numbers(&reply.body["running"]),
            numbers(&reply.body["queued"]),
        )
    }

    /// Waits until job `n` has `status`; returns it.
    async fn wait_status(&self, n: u32, status: &str) -> Value {
        wait_for(&format!("job {n} is {status}"), async || {
            let job = self.job(n).await;
            (job["status"] == status).then_some(job)
        })
        .await
    }

    /// A graceful stop: trainers stopped, interrupted jobs written back, the store closed.
    async fn stop(self) {
        self.shutdown.cancel();
        self.worker.await.expect("the worker ends");
        self.trainers.close();
        self.trainers.wait().await;
        drop(self.router);
        assert!(self.store.wait().await, "the store ends");
    }
}

fn number(id: &str) -> u32 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{id} is not one of the tests' ids"))
}

/// The queued ids `GET /v1/jobs?status=Queued` lists, as numbers.
async fn listed_queued(app: &App) -> Vec<u32> {
    let reply = app.send(Method::GET, "/v1/jobs?status=Queued", None).await;
    reply
        .body
        .as_array()
        .expect("a list")
        .iter()
        .map(|j| number(j["job_id"].as_str().expect("an id")))
        .collect()
}

fn offer(kind: &str, hours: f64, gpus: Option<u32>) -> Value {
    let mut offer = json!({"type": kind, "model": "org/text-model", "hours_to_complete": hours});
    if kind == "DiffusionJob" {
        offer["model"] = json!("org/image-model");
    }
    if let Some(g) = gpus {
        offer["gpu_count"] = json!(g);
    }
    offer
}

#[tokio::test(start_paused = true)]
async fn a_deadline_is_fixed_at_acceptance_and_a_restart_keeps_it() {
    let _hold = hold_clock();
    let sandbox = Sandbox::new();
    let paused = Setup {
        max_concurrent: 0,
        ..Setup::default()
    };
    let app = sandbox.start(&paused).await;
    let stored = app.submit(&job(1, "TextJob", Some(2.0), None)).await;
    assert_eq!(stored["deadline"], at(120.0));
    assert_eq!(stored["created_at"], at(0.0));
    assert_eq!(
        app.estimate(1).await,
        ("none".into(), "none".into()),
        "a paused queue starts nothing"
    );

    tokio::time::advance(hours(1.0)).await;
    app.stop().await;
    sandbox.hold(1);
    let setup = Setup {
        offers: OfferConfig {
            reserve_for: Duration::ZERO,
            ..OfferConfig::default()
        },
        ..Setup::default()
    };
    let app = sandbox.start(&setup).await;
    let running = app.wait_status(1, "Running").await;
    assert_eq!(running["started_at"], at(60.0));
    assert_eq!(
        running["deadline"],
        at(120.0),
        "the restart gave no new budget"
    );
    assert_eq!(sandbox.job_file(1)["deadline"], at(120.0));
    assert_eq!(
        app.estimate(1).await,
        ("none".into(), at(120.0)),
        "it has only the hour that is left"
    );

    // An offer behind it starts when its budget is used up.
    let three_hours = app.offer(offer("TextJob", 3.0, None)).await;
    assert_eq!(three_hours["accepted"], true, "{three_hours}");
    assert_eq!(three_hours["estimated_start"], at(120.0));
    assert_eq!(three_hours["estimated_finish"], at(60.0 + 180.0));
    assert_eq!(three_hours["reservation"], Value::Null);
    // One hour from now is when the running job's budget ends: too late to start by then.
    let one_hour = app.offer(offer("TextJob", 1.0, None)).await;
    assert_eq!(one_hour["accepted"], false);
    assert_eq!(one_hour["estimated_start"], Value::Null);
    let message = one_hour["message"].as_str().expect("a message");
    assert!(
        message.contains("could not start before its deadline"),
        "{message}"
    );

    sandbox.release(1);
    let done = app.wait_status(1, "Completed").await;
    assert_eq!(done["finished_at"], at(60.0));
    app.stop().await;
}

/// The only test in this file whose jobs miss deadlines, so that it can count them exactly.
#[tokio::test(start_paused = true)]
async fn a_job_whose_time_ran_out_fails_instead_of_starting() {
    let _hold = hold_clock();
    let sandbox = Sandbox::new();
    let (queued_before, running_before) = METRICS.deadline_misses();
    let paused = Setup {
        max_concurrent: 0,
        ..Setup::default()
    };
    let app = sandbox.start(&paused).await;
    app.submit(&job(1, "TextJob", Some(0.5), None)).await;
    app.submit(&job(2, "DiffusionJob", None, None)).await;
    tokio::time::advance(hours(1.0)).await;
    app.stop().await;

    // Restarted an hour later: job 1's half hour is gone. It fails instead of starting, and
    // does not hold up job 2 behind it.
    sandbox.hold(2);
    let app = sandbox.start(&Setup::default()).await;
    let failed = app.wait_status(1, "Failed").await;
    assert_eq!(
        failed["error_message"],
        format!(
            "time budget of 30m ran out at {} before the job could start",
            at(30.0)
        )
    );
    assert_eq!(failed["attempts"], 0, "it never started");
    assert_eq!(failed["finished_at"], at(60.0));
    assert!(
        !sandbox
            .data()
            .join("logs")
            .join(format!("{}.log", id(1)))
            .exists(),
        "no trainer ran for it"
    );
    app.wait_status(2, "Running").await;

    // While job 2 runs, job 3's hour passes in the queue.
    app.submit(&job(3, "TextJob", Some(1.0), None)).await;
    sandbox.hold(4);
    app.submit(&job(4, "TextJob", Some(3.0), None)).await;
    tokio::time::advance(hours(1.5)).await;
    sandbox.release(2);
    app.wait_status(2, "Completed").await;
    let failed = app.wait_status(3, "Failed").await;
    assert_eq!(
        failed["error_message"],
        format!(
            "time budget of 1h ran out at {} before the job could start",
            at(120.0)
        )
    );
    let started = app.wait_status(4, "Running").await;
    assert_eq!(started["started_at"], at(150.0));

    // Job 4 runs past its deadline (minute 240): its end is a deadline missed too.
    tokio::time::advance(hours(2.0)).await;
    sandbox.release(4);
    let ended = wait_for("job 4 ends", async || {
        let job = app.job(4).await;
        (job["status"] == "Completed" || job["status"] == "Failed").then_some(job)
    })
    .await;
    assert!(
        ended["finished_at"].as_str() > ended["deadline"].as_str(),
        "{ended}"
    );
    assert_eq!(
        METRICS.deadline_misses(),
        (queued_before + 2, running_before + 1)
    );
    app.stop().await;
}

/// Jobs A (no budget), B (5h), C (1h), D (3h) arrive in that order; D was running when the
/// daemon died. Each order starts D first, then its own.
#[tokio::test(start_paused = true)]
async fn both_orders_start_the_recovered_job_first() {
    let _hold = hold_clock();
    for (order, expected) in [
        (Order::Fifo, vec![1, 2, 3]),
        (Order::Deadline, vec![3, 2, 1]),
    ] {
        let sandbox = Sandbox::new();
        let setup = Setup {
            max_concurrent: 0,
            order,
            ..Setup::default()
        };
        let app = sandbox.start(&setup).await;
        for (n, budget) in [(1, None), (2, Some(5.0)), (3, Some(1.0)), (4, Some(3.0))] {
            app.submit(&job(n, "TextJob", budget, None)).await;
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        app.stop().await;

        // What a crash leaves when job 4's trainer had started: its file says Running.
        let mut crashed = sandbox.job_file(4);
        let deadline = crashed["deadline"].clone();
        crashed["status"] = json!("Running");
        crashed["attempts"] = json!(1);
        crashed["started_at"] = json!(at(1.0));
        sandbox.write_job_file(4, &crashed);

        let app = sandbox.start(&setup).await;
        let mut start_order = vec![4];
        start_order.extend(&expected);
        assert_eq!(
            app.queue().await,
            (vec![], start_order.clone()),
            "{order:?}"
        );
        assert_eq!(listed_queued(&app).await, start_order, "{order:?}");
        let recovered = app.job(4).await;
        assert_eq!(
            recovered["deadline"], deadline,
            "a crash gives no new budget"
        );
        let file = sandbox.data().join("queue.json");
        let expected_file: Vec<String> = start_order.iter().map(|n| id(*n)).collect();
        wait_for("queue.json lists the start order", async || {
            let text = std::fs::read(&file).ok()?;
            let written: Value = serde_json::from_slice(&text).ok()?;
            (written["queued"] == json!(expected_file)).then_some(())
        })
        .await;
        // A job arriving now with the earliest deadline: first among those never started
        // under "deadline", last under "fifo".
        app.submit(&job(5, "TextJob", Some(0.1), None)).await;
        let queued = app.queue().await.1;
        match order {
            Order::Fifo => assert_eq!(queued, [4, 1, 2, 3, 5]),
            Order::Deadline => assert_eq!(queued, [4, 5, 3, 2, 1]),
        }
        app.stop().await;

        // Started for real, the recovered job goes first.
        for n in 1..=5 {
            sandbox.hold(n);
        }
        let app = sandbox
            .start(&Setup {
                max_concurrent: 1,
                ..setup.clone()
            })
            .await;
        app.wait_status(4, "Running").await;
        let (running, queued) = app.queue().await;
        assert_eq!(running, [4], "{order:?}");
        assert_eq!(queued.len(), 4);
        app.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn offer_estimates_follow_the_queue_and_the_gpu_slots() {
    let _hold = hold_clock();
    let sandbox = Sandbox::new();
    let setup = Setup {
        max_concurrent: 2,
        gpus: vec![0, 1],
        offers: OfferConfig {
            max_wait: hours(4.0),
            reserve_for: Duration::ZERO,
            ..OfferConfig::default()
        },
        ..Setup::default()
    };
    let app = sandbox.start(&setup).await;

    let idle = app.offer(offer("TextJob", 2.0, Some(1))).await;
    assert_eq!(idle["accepted"], true, "{idle}");
    assert_eq!(idle["estimated_start"], at(0.0));
    assert_eq!(idle["estimated_finish"], at(120.0));
    assert!(
        idle["message"].as_str().unwrap().contains("start at once"),
        "{idle}"
    );

    // Job 1 takes both GPUs for its 3 hours.
    sandbox.hold(1);
    app.submit(&job(1, "TextJob", Some(3.0), Some(2))).await;
    app.wait_status(1, "Running").await;
    let behind = app.offer(offer("TextJob", 4.0, Some(1))).await;
    assert_eq!(behind["accepted"], true, "{behind}");
    assert_eq!(behind["estimated_start"], at(180.0));
    assert_eq!(behind["estimated_finish"], at(240.0));

    // Job 2 needs one GPU: it starts when job 1 ends, and an offer for one GPU starts on the
    // other one then. (Accepted at the same instant as job 1, job 2 is accepted a
    // microsecond later, and its deadline with it.)
    sandbox.hold(2);
    app.submit(&job(2, "TextJob", Some(5.0), Some(1))).await;
    let job2_deadline = at_micros(300.0, 1);
    assert_eq!(app.job(2).await["deadline"], job2_deadline);
    assert_eq!(app.estimate(2).await, (at(180.0), job2_deadline.clone()));
    // The job lists carry the same estimates when asked for them.
    let listed = app
        .send(Method::GET, "/v1/jobs?status=Queued&estimates=true", None)
        .await;
    assert_eq!(listed.body[0]["job_id"], id(2));
    assert_eq!(listed.body[0]["estimated_start"], at(180.0));
    assert_eq!(listed.body[0]["estimated_finish"], job2_deadline);
    let beside = app.offer(offer("TextJob", 4.0, Some(1))).await;
    assert_eq!(beside["estimated_start"], at(180.0), "{beside}");
    // Two GPUs: free only once job 2 ends at its deadline, beyond max_wait.
    let both = app.offer(offer("TextJob", 6.0, Some(2))).await;
    assert_eq!(both["accepted"], false, "{both}");
    assert_eq!(both["estimated_start"], job2_deadline);
    let message = both["message"].as_str().unwrap();
    assert!(message.contains("offers.max_wait"), "{message}");
    let too_big = app.offer(offer("TextJob", 1.0, Some(3))).await;
    assert_eq!(too_big["accepted"], false);
    assert!(
        too_big["message"]
            .as_str()
            .unwrap()
            .contains("asks for 3 GPUs, and this worker has 2"),
        "{too_big}"
    );

    // Job 1 ends early: job 2 starts at once, and one GPU is free now.
    sandbox.release(1);
    app.wait_status(2, "Running").await;
    let now_free = app.offer(offer("TextJob", 4.0, Some(1))).await;
    assert_eq!(now_free["estimated_start"], at(0.0), "{now_free}");
    assert_eq!(app.estimate(2).await.1, job2_deadline);

    // Half an hour on, the wait for both GPUs is what is left of job 2's budget.
    tokio::time::advance(hours(0.5)).await;
    let both = app.offer(offer("TextJob", 6.0, Some(2))).await;
    assert_eq!(both["estimated_start"], job2_deadline);
    assert_eq!(both["accepted"], false, "4.5 hours is beyond max_wait");
    tokio::time::advance(hours(0.5) + Duration::from_secs(1)).await;
    let both = app.offer(offer("TextJob", 6.0, Some(2))).await;
    assert_eq!(both["estimated_start"], job2_deadline);
    assert_eq!(
        both["accepted"], true,
        "under 4 hours is within max_wait: {both}"
    );

    sandbox.release(2);
    app.wait_status(2, "Completed").await;
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn offers_outside_the_limits_are_refused_with_the_reason() {
    let _hold = hold_clock();
    let sandbox = Sandbox::new();
    let setup = Setup {
        offers: OfferConfig {
            job_types: vec!["TextJob".into()],
            models: vec!["org/text-*".into()],
            max_hours: 12.0,
            ..OfferConfig::default()
        },
        ..Setup::default()
    };
    let app = sandbox.start(&setup).await;
    for (body, reason) in [
        (
            offer("DiffusionJob", 1.0, None),
            "DiffusionJob jobs are not taken here",
        ),
        (
            json!({"type": "TextJob", "model": "other/model", "hours_to_complete": 1}),
            "matches none of offers.models",
        ),
        (offer("TextJob", 13.0, None), "above offers.max_hours (12)"),
    ] {
        let answer = app.offer(body).await;
        assert_eq!(answer["accepted"], false, "{answer}");
        assert_eq!(answer["reservation"], Value::Null);
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(reason), "{message}");
    }
    let bad = app
        .send(
            Method::POST,
            "/v1/offers",
            Some(&json!({"type": "TextJob", "model": "m", "hours_to_complete": -1})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bad.body["error"]
            .as_str()
            .unwrap()
            .starts_with("hours_to_complete:"),
        "{}",
        bad.body
    );
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_reservation_keeps_the_place_for_the_job_that_claims_it() {
    let _hold = hold_clock();
    let sandbox = Sandbox::new();
    let app = sandbox.start(&Setup::default()).await;
    let claimed_before = METRICS.reservations_claimed.get();

    let answer = app.offer(offer("TextJob", 2.0, None)).await;
    assert_eq!(answer["accepted"], true, "{answer}");
    assert_eq!(answer["reservation"]["expires_at"], at(0.5));

    // The only slot is held for the offered job until its deadline: another offer would
    // wait two hours, and a job sent meanwhile waits behind the reserved place.
    let second = app.offer(offer("TextJob", 3.0, None)).await;
    assert_eq!(second["accepted"], false);
    assert_eq!(second["estimated_start"], at(120.0));
    sandbox.hold(2);
    app.submit(&job(2, "DiffusionJob", None, None)).await;
    assert_eq!(app.estimate(2).await.0, at(120.0));

    // The offered job arrives ten seconds later and takes the place: it starts first, and
    // its budget ran from the offer.
    tokio::time::advance(Duration::from_secs(10)).await;
    sandbox.hold(1);
    let claimed = app.submit(&job(1, "TextJob", Some(2.0), None)).await;
    assert_eq!(claimed["created_at"], at(0.0));
    assert_eq!(claimed["deadline"], at(120.0));
    let (running, queued) = wait_for("a job runs", async || {
        let queue = app.queue().await;
        (!queue.0.is_empty()).then_some(queue)
    })
    .await;
    assert_eq!((running, queued), (vec![1], vec![2]));
    assert_eq!(METRICS.reservations_claimed.get(), claimed_before + 1);
    assert_eq!(app.estimate(2).await.0, at(120.0));

    sandbox.release(1);
    sandbox.release(2);
    app.wait_status(2, "Completed").await;
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_unclaimed_reservation_expires_and_the_queue_goes_on() {
    let _hold = hold_clock();
    let sandbox = Sandbox::new();
    let setup = Setup {
        assumed: hours(0.5),
        ..Setup::default()
    };
    let app = sandbox.start(&setup).await;
    let expired_before = METRICS.reservations_expired.get();

    let answer = app.offer(offer("TextJob", 2.0, None)).await;
    assert_eq!(answer["reservation"]["expires_at"], at(0.5));
    sandbox.hold(2);
    app.submit(&job(2, "DiffusionJob", None, None)).await;
    assert_eq!(app.estimate(2).await.0, at(120.0));

    // Thirty-one seconds on, the place is let go and job 2 starts in it.
    tokio::time::advance(Duration::from_secs(31)).await;
    let started = app.wait_status(2, "Running").await;
    assert_eq!(started["started_at"], at(31.0 / 60.0));
    assert_eq!(METRICS.reservations_expired.get(), expired_before + 1);

    // Job 2 has no budget: it is taken to run for assumed_duration.
    let next = app.offer(offer("TextJob", 2.0, None)).await;
    assert_eq!(next["accepted"], true, "{next}");
    assert_eq!(next["estimated_start"], at(31.0 / 60.0 + 30.0));

    // A job that comes after its reservation expired is accepted when it comes.
    tokio::time::advance(Duration::from_secs(31)).await;
    sandbox.hold(3);
    let late = app.submit(&job(3, "TextJob", Some(2.0), None)).await;
    assert_eq!(late["created_at"], at(62.0 / 60.0));

    sandbox.release(2);
    sandbox.release(3);
    app.wait_status(3, "Completed").await;
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn estimates_follow_every_change_at_once() {
    // The clock stands still: estimates kept from a moment ago must not outlive a change.
    let _hold = hold_clock();
    let sandbox = Sandbox::new();
    let app = sandbox.start(&Setup::default()).await;
    sandbox.hold(1);
    app.submit(&job(1, "TextJob", Some(3.0), None)).await;
    app.wait_status(1, "Running").await;
    sandbox.hold(2);
    app.submit(&job(2, "TextJob", Some(5.0), None)).await;
    app.submit(&job(3, "TextJob", Some(8.0), None)).await;

    // Job 3 waits for job 1 (ends at its deadline, 3 hours) and job 2 (at its own).
    let job2_deadline = app.job(2).await["deadline"].clone();
    assert_eq!(app.estimate(2).await.0, at(180.0));
    assert_eq!(app.estimate(3).await.0, job2_deadline);
    assert_eq!(app.estimate(3).await.0, job2_deadline, "asked again");

    // A submission behind it changes nothing for job 3, and has its own estimate at once.
    app.submit(&job(4, "TextJob", Some(12.0), None)).await;
    assert_eq!(app.estimate(4).await.0, app.job(3).await["deadline"]);

    // Job 2 cancelled: job 3 moves up in the same instant.
    let cancelled = app
        .send(Method::POST, &format!("/v1/jobs/{}/cancel", id(2)), None)
        .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
    assert_eq!(app.estimate(3).await.0, at(180.0));
    assert_eq!(app.estimate(2).await, ("none".into(), "none".into()));

    // Job 1 ends early: job 3 starts, and its estimate is its end, at its deadline.
    sandbox.hold(3);
    sandbox.release(1);
    app.wait_status(3, "Running").await;
    let job3_deadline = app.job(3).await["deadline"].as_str().unwrap().to_string();
    assert_eq!(
        app.estimate(3).await,
        ("none".into(), job3_deadline.clone())
    );
    assert_eq!(app.estimate(4).await.0, job3_deadline);
    sandbox.release(3);
    app.wait_status(3, "Completed").await;
    app.stop().await;
}
