//! Starts of the G.O.D trainer API's kind, through the worker's handle, in-process: a job
//! that must start at once on exactly the GPUs it names, ahead of the queue, or be refused
//! with nothing stored; the identical retry of an unfinished one; a fresh run of a finished
//! one; and, after a crash, the restart on the GPUs it ran on and never others.

#[allow(dead_code)]
mod app_support;

use std::path::Path;
use std::time::Duration;

use app_support::{Assembly, Parts, assemble, call, executor_config};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use training_worker::config::WorkerConfig;
use training_worker::job::{Job, TrainerTask};
use training_worker::worker::{StartedNow, WorkerError};

/// A trainer that records the GPUs it got and holds while `<data>/../hold-<job>` exists,
/// then exits with the status in `<data>/../exit-<job>` (0 without it).
fn trainer() -> Vec<String> {
    let script = "dir=\"$(dirname \"$JOB_FILE\")/..\"; \
         echo \"on $CUDA_VISIBLE_DEVICES attempt $ATTEMPT\"; \
         while [ -e \"$dir/../hold-$JOB_ID\" ]; do sleep 0.05; done; \
         if [ -e \"$dir/../exit-$JOB_ID\" ]; then exit \"$(cat \"$dir/../exit-$JOB_ID\")\"; fi";
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

async fn app(data: &Path, max_concurrent: usize) -> Parts {
    assemble(
        data,
        Assembly {
            executor: executor_config(trainer(), Duration::from_secs(60)),
            worker: WorkerConfig {
                max_concurrent,
                max_attempts: 3,
                gpus: vec![0, 1, 2],
                backfill: false,
                ..WorkerConfig::default()
            },
            clock: None,
            api_token: None,
            max_body_bytes: 1 << 20,
        },
    )
    .await
}

/// A job of the trainer API for `task`, with hours_to_complete (which gives it no deadline).
fn task_job(n: u128, task: &str) -> Job {
    let id = uuid::Uuid::from_u128(0x5a5a_0000_0000_4000_8000_0000_0000_0000 | n);
    let mut job = Job::from_submission(
        json!({
            "type": "DiffusionJob",
            "job_id": id.to_string(),
            "model": "stabilityai/stable-diffusion-xl-base-1.0",
            "dataset_zip": "https://example.com/images.zip",
            "hours_to_complete": 2,
        }),
        chrono::Utc::now(),
    )
    .expect("a valid job");
    job.trainer_task = Some(TrainerTask {
        task_id: task.into(),
        hotkey: "5FhkTestHotkeyA1111111111111111111111111111111".into(),
        github_repo: "https://github.com/example/miner-trainer".into(),
        github_branch: None,
        github_commit_hash: Some("8631451156e2915070f77e5547ca0d5ed3d0eb8a".into()),
        request: json!({"task": task}),
    });
    job
}

fn hold(data: &Path, job: &Job) {
    std::fs::write(data.join(format!("../hold-{}", job.id)), b"").expect("hold");
}

fn release(data: &Path, job: &Job) {
    std::fs::remove_file(data.join(format!("../hold-{}", job.id))).expect("release");
}

fn job_file(data: &Path, job: &Job) -> Value {
    app_support::record(data, &job.id.to_string())
}

async fn get(parts: &Parts, path: &str) -> (StatusCode, Value) {
    let request = Request::get(path).body(Body::empty()).expect("a request");
    let (status, _, body) = call(&parts.router, request).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Polls the job through the API until `done` holds.
async fn wait_for(parts: &Parts, job: &Job, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, now) = get(parts, &format!("/v1/jobs/{}", job.id)).await;
        if done(&now) {
            return now;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {now}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn log_of(parts: &Parts, job: &Job) -> String {
    let request = Request::get(format!("/v1/jobs/{}/logs", job.id))
        .body(Body::empty())
        .expect("a request");
    let (_, _, body) = call(&parts.router, request).await;
    String::from_utf8_lossy(&body).into_owned()
}

fn busy(answer: Result<StartedNow, WorkerError>) -> String {
    match answer {
        Err(WorkerError::Busy(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_runs_at_once_on_its_gpus_or_is_refused_with_nothing_stored() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let data = dir.path().join("data");
    let parts = app(&data, 2).await;
    let a = task_job(1, "task-a");
    hold(&data, &a);

    let started = parts.handle.start_now(a.clone(), vec![2, 0], None).await;
    let Ok(StartedNow::Started(job)) = started else {
        panic!("not started: {started:?}");
    };
    // Durable as Running on exactly those GPUs before the answer; no whole-job deadline.
    let file = job_file(&data, &a);
    assert_eq!(file["status"], "Running", "{file}");
    assert_eq!(file["gpu_ids"], json!([2, 0]), "{file}");
    assert_eq!(file["attempts"], 1, "{file}");
    assert!(file.get("deadline").is_none(), "{file}");
    assert_eq!(file["trainer_task"]["task_id"], "task-a", "{file}");
    assert_eq!(job.gpu_ids, Some(vec![2, 0]));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !log_of(&parts, &a).await.contains("on 2,0 attempt 1") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the trainer never got its GPUs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The lost reply's retry: the same job on the same GPUs changes nothing.
    let again = parts.handle.start_now(a.clone(), vec![2, 0], None).await;
    assert!(
        matches!(again, Ok(StartedNow::AlreadyStarted(_))),
        "{again:?}"
    );
    assert_eq!(job_file(&data, &a), file);
    // Another body for the unfinished pair is a conflict.
    let other = parts.handle.start_now(a.clone(), vec![1], None).await;
    assert!(
        matches!(other, Err(WorkerError::Conflict { .. })),
        "{other:?}"
    );

    // A GPU held by an unfinished job, one not in the inventory: refused, nothing stored.
    let b = task_job(2, "task-b");
    let why = busy(parts.handle.start_now(b.clone(), vec![1, 0], None).await);
    assert_eq!(why, format!("GPU 0 is held by job {}", a.id));
    let why = busy(parts.handle.start_now(b.clone(), vec![7], None).await);
    assert_eq!(why, "GPU 7 is not in this box's inventory");
    assert!(!data.join(format!("jobs/{}.json", b.id)).exists());
    let (status, _) = get(&parts, &format!("/v1/jobs/{}", b.id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // With both slots taken, even a free GPU is refused.
    let c = task_job(3, "task-c");
    hold(&data, &c);
    assert!(matches!(
        parts.handle.start_now(c.clone(), vec![1], None).await,
        Ok(StartedNow::Started(_))
    ));
    let d = task_job(4, "task-d");
    let why = busy(parts.handle.start_now(d.clone(), vec![], None).await);
    assert_eq!(why, "all 2 slots are taken (worker.max_concurrent)");

    release(&data, &a);
    release(&data, &c);
    wait_for(&parts, &a, "a completes", |j| j["status"] == "Completed").await;
    wait_for(&parts, &c, "c completes", |j| j["status"] == "Completed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_starts_a_fresh_run_on_the_gpus_now_named() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let data = dir.path().join("data");
    let parts = app(&data, 1).await;
    let a = task_job(5, "task-a");
    std::fs::write(dir.path().join(format!("exit-{}", a.id)), b"3").expect("make it fail");
    assert!(matches!(
        parts.handle.start_now(a.clone(), vec![0], None).await,
        Ok(StartedNow::Started(_))
    ));
    let failed = wait_for(&parts, &a, "a fails", |j| j["status"] == "Failed").await;
    assert_eq!(failed["attempts"], 1);

    std::fs::remove_file(dir.path().join(format!("exit-{}", a.id))).expect("let it pass");
    let again = parts.handle.start_now(a.clone(), vec![1], None).await;
    let Ok(StartedNow::Started(job)) = again else {
        panic!("no fresh run: {again:?}");
    };
    assert_eq!(job.attempts, 1, "the fresh run's first start");
    assert_eq!(job.error_message, None);
    let done = wait_for(&parts, &a, "the fresh run completes", |j| {
        j["status"] == "Completed"
    })
    .await;
    assert_eq!(done["gpu_ids"], json!([1]), "{done}");
    let log = log_of(&parts, &a).await;
    // The history stays in the log: both runs, in order.
    let first = log.find("on 0 attempt 1").expect("the first run");
    let second = log.find("on 1 attempt 1").expect("the fresh run");
    assert!(first < second, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_it_starts_again_on_its_own_gpus_and_never_on_others() {
    // It crafts the job file a crash leaves.
    if app_support::not_for_this_store(
        "after_a_crash_it_starts_again_on_its_own_gpus_and_never_on_others",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("a temp dir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("jobs")).expect("the jobs dir");
    // What a crash leaves: a job of the trainer API Running on GPU 2, and a job of the main
    // API queued before it, which the lowest free GPU would otherwise go to first.
    let a = task_job(6, "task-a");
    let mut running = a.clone();
    running.created_at = Some(chrono::Utc::now());
    running.start(chrono::Utc::now(), Some(vec![2]));
    std::fs::write(
        data.join(format!("jobs/{}.json", a.id)),
        running.to_file_bytes(),
    )
    .expect("write the job");
    let main = Job::from_submission(
        json!({"type": "DiffusionJob", "model": "m", "dataset_zip": "z", "gpu_count": 3}),
        chrono::Utc::now(),
    )
    .expect("a job");
    hold(&data, &a);

    let parts = app(&data, 2).await;
    let (status, _) = get(&parts, &format!("/v1/jobs/{}", a.id)).await;
    assert_eq!(status, StatusCode::OK);
    let request = Request::post("/v1/jobs")
        .header("content-type", "application/json")
        .body(Body::from(main.to_json().to_string()))
        .expect("a request");
    let (status, _, _) = call(&parts.router, request).await;
    assert_eq!(status, StatusCode::CREATED);
    let restarted = wait_for(&parts, &a, "a runs again", |j| j["status"] == "Running").await;
    assert_eq!(restarted["gpu_ids"], json!([2]), "{restarted}");
    assert_eq!(
        restarted["attempts"], 2,
        "the crash-cut start counts: {restarted}"
    );
    // The main job needs all three GPUs, one of which is the trainer task's: it waits.
    let (_, queued) = get(&parts, &format!("/v1/jobs/{}", main.id)).await;
    assert_eq!(queued["status"], "Queued", "{queued}");
    release(&data, &a);
    wait_for(&parts, &a, "a completes", |j| j["status"] == "Completed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gpus_an_accepted_offer_holds_cannot_be_started_on() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let data = dir.path().join("data");
    let parts = app(&data, 3).await;
    let offer = json!({
        "type": "DiffusionJob",
        "model": "org/image-model",
        "hours_to_complete": 1,
        "gpu_count": 1,
    });
    let request = Request::post("/v1/offers")
        .header("content-type", "application/json")
        .body(Body::from(offer.to_string()))
        .expect("a request");
    let (status, _, body) = call(&parts.router, request).await;
    let answer: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["accepted"], true, "{answer}");
    assert!(answer["reservation"].is_object(), "{answer}");

    // The lowest free GPU is the offer's until its job comes or the reservation expires.
    let (_, gpus) = get(&parts, "/v1/gpus").await;
    let reserved: Vec<bool> = gpus
        .as_array()
        .expect("a list")
        .iter()
        .map(|g| g["reserved"] == true)
        .collect();
    assert_eq!(reserved, [true, false, false], "{gpus}");
    let a = task_job(20, "task-a");
    let why = busy(parts.handle.start_now(a.clone(), vec![1, 0], None).await);
    assert_eq!(why, "GPU 0 is held for an accepted offer");
    assert!(!data.join(format!("jobs/{}.json", a.id)).exists());

    // The other GPUs are free to start on, and the offer keeps the lowest of what is left.
    hold(&data, &a);
    let started = parts.handle.start_now(a.clone(), vec![1], None).await;
    assert!(matches!(started, Ok(StartedNow::Started(_))), "{started:?}");
    let (_, gpus) = get(&parts, "/v1/gpus").await;
    assert_eq!(gpus[0]["reserved"], true, "{gpus}");
    assert_eq!(gpus[1]["job"], a.id.to_string(), "{gpus}");
    assert_eq!(gpus[1]["reserved"], false, "{gpus}");
    assert_eq!(gpus[2]["reserved"], false, "{gpus}");
    release(&data, &a);
    wait_for(&parts, &a, "a completes", |j| j["status"] == "Completed").await;
}
