//! HTTP-layer tests (CONTRACT.md 3 and 4): the router is assembled in-process the way
//! `daemon::run` assembles it (store, worker, executor, app state) and driven with
//! `tower::ServiceExt::oneshot`, without a socket.
//!
//! Most apps run paused (`max_concurrent = 0`) so that nothing starts; the few tests that
//! need a trainer use `/bin/sh -c '...'` as the executor's argv.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use training_worker::api::{self, AppState};
use training_worker::config::WorkerConfig;

use app_support::{Assembly, executor_config};

#[allow(dead_code)]
mod app_support;

// ---------------------------------------------------------------------------------------
// The app
// ---------------------------------------------------------------------------------------

struct Options {
    api_token: Option<String>,
    max_concurrent: usize,
    max_body_bytes: usize,
    command: Vec<String>,
    gpus: Vec<u32>,
    order: training_worker::config::Order,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            api_token: None,
            max_concurrent: 0,
            max_body_bytes: 1024 * 1024,
            command: vec!["/bin/sh".into(), "-c".into(), "exit 0".into()],
            gpus: Vec::new(),
            order: training_worker::config::Order::Fifo,
        }
    }
}

struct App {
    router: Router,
    /// The temporary directory that holds the data dir; nothing else is ever written here.
    root: TempDir,
    data: PathBuf,
    shutdown: CancellationToken,
    worker_task: Option<JoinHandle<training_worker::worker::Stopped>>,
    /// With `TW_TEST_STORE=postgres`: the database that holds the records instead of `jobs/`.
    database: Option<String>,
}

impl App {
    fn jobs_dir(&self) -> PathBuf {
        self.data.join("jobs")
    }

    fn job_file(&self, id: &str) -> PathBuf {
        self.jobs_dir().join(format!("{id}.json"))
    }

    /// The job's record as text: its job file, or its row's body.
    fn raw_record(&self, id: &str) -> String {
        if let Some(url) = &self.database {
            let body =
                app_support::query(url, &format!("SELECT body FROM tw_jobs WHERE id = '{id}'"));
            assert!(!body.trim().is_empty(), "no row for job {id}");
            return body.trim_end_matches('\n').to_string();
        }
        std::fs::read_to_string(self.job_file(id))
            .unwrap_or_else(|e| panic!("job file of {id} not readable: {e}"))
    }

    /// Whether the store holds a record of `id`.
    fn has_record(&self, id: &str) -> bool {
        match &self.database {
            Some(_) => self.job_files().contains(&format!("{id}.json")),
            None => self.job_file(id).exists(),
        }
    }

    fn read_job_file(&self, id: &str) -> Value {
        serde_json::from_str(&self.raw_record(id)).expect("a job record is JSON")
    }

    /// The names of the files in `jobs/`, sorted (the same names for the rows of a database).
    fn job_files(&self) -> Vec<String> {
        if let Some(url) = &self.database {
            return app_support::query(url, "SELECT id || '.json' FROM tw_jobs ORDER BY 1")
                .lines()
                .map(str::to_string)
                .collect();
        }
        let mut names: Vec<String> = std::fs::read_dir(self.jobs_dir())
            .expect("jobs dir readable")
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// `queue.json` as `(running, queued)` (the rows' places in the queue, for a database).
    fn queue_file(&self) -> (Vec<String>, Vec<String>) {
        if let Some(url) = &self.database {
            let list = |placement: &str| -> Vec<String> {
                app_support::query(
                    url,
                    &format!(
                        "SELECT id FROM tw_jobs WHERE placement = '{placement}' ORDER BY rank"
                    ),
                )
                .lines()
                .map(str::to_string)
                .collect()
            };
            return (list("running"), list("queued"));
        }
        let bytes = std::fs::read(self.data.join("queue.json")).expect("queue.json readable");
        let value: Value = serde_json::from_slice(&bytes).expect("queue.json is JSON");
        (ids(&value["running"]), ids(&value["queued"]))
    }

    /// `queue.json` follows the job files a moment after a change (the job files are what
    /// is durable before a reply); waits until it says `expected`.
    async fn queue_file_becomes(&self, expected: (Vec<String>, Vec<String>)) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.queue_file();
            if now == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "queue.json is {now:?}, expected {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Like [`App::queue_file_becomes`], for the queued list alone.
    async fn queued_file_becomes(&self, expected: Vec<String>) {
        let running = self.queue_file().0;
        self.queue_file_becomes((running, expected)).await;
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        let (status, headers, body) = app_support::call(&self.router, request).await;
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, uri: &str) -> Reply {
        self.send(request(Method::GET, uri, &[], Body::empty()))
            .await
    }

    async fn post_json(&self, uri: &str, body: &Value) -> Reply {
        self.post_raw(uri, serde_json::to_vec(body).unwrap()).await
    }

    async fn post_raw(&self, uri: &str, body: impl Into<Vec<u8>>) -> Reply {
        self.send(request(
            Method::POST,
            uri,
            &[("content-type", "application/json")],
            Body::from(body.into()),
        ))
        .await
    }

    async fn post_empty(&self, uri: &str) -> Reply {
        self.send(request(Method::POST, uri, &[], Body::empty()))
            .await
    }

    /// Submits `job` and expects 201; returns the stored job.
    async fn submit(&self, job: &Value) -> Value {
        let reply = self.post_json("/v1/jobs", job).await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "submit: {}",
            reply.text()
        );
        reply.json()
    }

    /// Polls the job until `done` holds for it, for at most 15 s.
    async fn wait_for(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let reply = self.get(&format!("/v1/jobs/{id}")).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            let job = reply.json();
            if done(&job) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} never became {what}: {job:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Builds the app as `daemon::run` does: store, worker (with its executor), app state.
async fn spawn_app(options: Options) -> App {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let parts = app_support::assemble(
        &data,
        Assembly {
            executor: executor_config(options.command, Duration::from_secs(60)),
            worker: WorkerConfig {
                max_concurrent: options.max_concurrent,
                max_attempts: 3,
                gpus: options.gpus,
                backfill: false,
                order: options.order,
                ..WorkerConfig::default()
            },
            clock: None,
            api_token: options.api_token,
            max_body_bytes: options.max_body_bytes,
        },
    )
    .await;
    App {
        router: parts.router,
        root,
        data,
        shutdown: parts.shutdown,
        worker_task: Some(parts.worker),
        database: parts.database,
    }
}

/// An app whose worker was never set: the daemon while it replays.
fn unready_app() -> App {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    std::fs::create_dir_all(data.join("jobs")).unwrap();
    let shutdown = CancellationToken::new();
    let state = AppState::new(None, 1024 * 1024, shutdown.clone());
    App {
        router: api::router(state),
        root,
        data,
        shutdown,
        worker_task: None,
        database: None,
    }
}

fn request(method: Method, uri: &str, headers: &[(&str, &str)], body: Body) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(body).expect("a valid request")
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} answered with a body that is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Asserts an error reply: `status`, JSON, `{"error": "<text naming needle>", ...}`.
    /// Returns the body.
    #[track_caller]
    fn expect_error(&self, status: StatusCode, needle: &str) -> Value {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert!(
            self.content_type().starts_with("application/json"),
            "{status} content-type is {:?}",
            self.content_type()
        );
        let body = self.json();
        let error = body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{status} body has no \"error\" string: {body}"));
        assert!(!error.trim().is_empty(), "empty error message");
        assert!(
            error.to_lowercase().contains(&needle.to_lowercase()),
            "{status} error {error:?} does not mention {needle:?}"
        );
        body
    }
}

fn ids(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_str().expect("an id string").to_string())
        .collect()
}

fn job_ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .map(|j| j["job_id"].as_str().expect("job_id").to_string())
        .collect()
}

/// Every file and directory under `dir` with its contents (directories map to `None`).
fn tree(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.insert(path.clone(), None);
                stack.push(path);
            } else {
                out.insert(path.clone(), Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------------------

fn seed_job() -> Value {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seed-job.json"),
    )
    .expect("seed job fixture");
    serde_json::from_str(&text).expect("seed job is JSON")
}

/// The seed's job, as a client would submit it (no status), under a fresh id.
fn text_job() -> Value {
    let mut job = seed_job();
    let object = job.as_object_mut().unwrap();
    object.remove("status");
    object.insert("job_id".into(), uuid::Uuid::new_v4().to_string().into());
    job
}

fn diffusion_job() -> Value {
    json!({
        "type": "DiffusionJob",
        "model": "stabilityai/stable-diffusion-xl-base-1.0",
        "dataset_zip": "https://example.com/images.zip",
        "model_type": "sdxl",
        "expected_repo_name": null
    })
}

fn with(mut job: Value, key: &str, value: Value) -> Value {
    job.as_object_mut().unwrap().insert(key.into(), value);
    job
}

fn without(mut job: Value, key: &str) -> Value {
    job.as_object_mut().unwrap().remove(key);
    job
}

fn id_of(job: &Value) -> String {
    job["job_id"].as_str().expect("job_id string").to_string()
}

// ---------------------------------------------------------------------------------------
// POST /v1/jobs
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn submit_answers_201_with_the_stored_job_after_it_is_on_disk() {
    let app = spawn_app(Options::default()).await;
    let reply = app.post_json("/v1/jobs", &diffusion_job()).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert!(reply.content_type().starts_with("application/json"));
    let job = reply.json();
    let id = id_of(&job);

    // A server-assigned id: a v4 UUID, lowercase and hyphenated.
    let uuid = uuid::Uuid::parse_str(&id).expect("job_id is a UUID");
    assert_eq!(uuid.get_version_num(), 4, "{id}");
    assert_eq!(id, uuid.hyphenated().to_string());
    assert_eq!(id, id.to_lowercase());

    assert_eq!(job["status"], "Queued");
    assert_eq!(job["type"], "DiffusionJob");
    assert_eq!(job["model"], "stabilityai/stable-diffusion-xl-base-1.0");
    assert_eq!(job["dataset_zip"], "https://example.com/images.zip");
    assert_eq!(job["model_type"], "sdxl");
    assert_eq!(job["error_message"], Value::Null);
    assert_eq!(job["attempts"], 0);
    let created = job["created_at"].as_str().expect("created_at is set");
    let created = chrono::DateTime::parse_from_rfc3339(created).expect("created_at is RFC 3339");
    assert_eq!(created.offset().local_minus_utc(), 0, "created_at is UTC");
    assert!(job["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(job["started_at"], Value::Null);
    assert_eq!(job["finished_at"], Value::Null);
    assert_eq!(
        reply
            .headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok()),
        Some(format!("/v1/jobs/{id}").as_str())
    );

    // Durable before the reply: the job file and queue.json already say so.
    assert_eq!(app.job_files(), vec![format!("{id}.json")]);
    assert_eq!(
        app.read_job_file(&id),
        job,
        "the file is the job as answered"
    );
    app.queue_file_becomes((vec![], vec![id.clone()])).await;

    // And the API serves the same job; its estimates come as headers (a paused queue
    // starts nothing).
    let got = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("x-estimated-start"), Some("none"));
    assert_eq!(got.header("x-estimated-finish"), Some("none"));
    assert_eq!(got.json(), job);
}

#[tokio::test]
async fn a_client_chosen_uppercase_job_id_is_stored_lowercase() {
    let app = spawn_app(Options::default()).await;
    let lower = uuid::Uuid::new_v4().to_string();
    let upper = lower.to_uppercase();
    let job = app
        .submit(&with(diffusion_job(), "job_id", upper.clone().into()))
        .await;
    assert_eq!(job["job_id"], lower.as_str());
    assert_eq!(app.job_files(), vec![format!("{lower}.json")]);
    assert_eq!(app.read_job_file(&lower)["job_id"], lower.as_str());
    app.queued_file_becomes(vec![lower.clone()]).await;

    // Either spelling names the same job.
    for spelling in [&lower, &upper] {
        let reply = app.get(&format!("/v1/jobs/{spelling}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["job_id"], lower.as_str());
    }
    // And resubmitting it in lowercase is the same job, not a second one.
    let again = app
        .post_json(
            "/v1/jobs",
            &with(diffusion_job(), "job_id", lower.clone().into()),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    assert_eq!(app.job_files().len(), 1);
}

#[tokio::test]
async fn the_seed_job_is_accepted_without_status_or_with_queued() {
    let app = spawn_app(Options::default()).await;

    let mut seed = seed_job();
    assert_eq!(seed["status"], "Running", "the fixture is the seed's file");
    seed.as_object_mut().unwrap().remove("status");
    let job = app.submit(&seed).await;
    assert_eq!(job["job_id"], "123e4567-e89b-12d3-a456-426614174000");
    assert_eq!(job["status"], "Queued");
    assert_eq!(job["type"], "TextJob");
    assert_eq!(job["dataset"], "my-dataset.json");
    assert_eq!(job["file_format"], "json");
    assert_eq!(job["expected_repo_name"], "my-fine-tuned-model");
    assert_eq!(job["dataset_type"], seed_job()["dataset_type"]);
    assert!(app.has_record("123e4567-e89b-12d3-a456-426614174000"));

    // The same with "status": "Queued", under another id.
    let queued = with(text_job(), "status", "Queued".into());
    let job = app.submit(&queued).await;
    assert_eq!(job["status"], "Queued");
    assert_eq!(job["dataset_type"], seed_job()["dataset_type"]);
}

#[tokio::test]
async fn unknown_fields_are_kept_and_written_back_unchanged() {
    let app = spawn_app(Options::default()).await;
    let mut submitted = text_job();
    let object = submitted.as_object_mut().unwrap();
    object.insert("hours_to_complete".into(), json!(3));
    object.insert("x".into(), json!({"y": [1, 2]}));
    object["dataset_type"]
        .as_object_mut()
        .unwrap()
        .insert("custom_key".into(), json!({"a": [true, null]}));
    let mut body = serde_json::to_string(&submitted).unwrap();
    // Numbers whose text a float would change: kept as sent.
    body.pop(); // the closing brace
    body.push_str(r#","price":1.50,"big":123456789012345678901234567890}"#);

    let reply = app.post_raw("/v1/jobs", body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let id = id_of(&reply.json());

    let got = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(got.status, StatusCode::OK);
    let job = got.json();
    assert_eq!(job["hours_to_complete"], json!(3));
    assert_eq!(job["x"], json!({"y": [1, 2]}));
    assert_eq!(
        job["dataset_type"]["custom_key"],
        json!({"a": [true, null]})
    );
    let text = got.text();
    assert!(text.contains(r#""price":1.50"#), "{text}");
    assert!(
        text.contains(r#""big":123456789012345678901234567890"#),
        "{text}"
    );
    // The file on disk has them too.
    let file = app.read_job_file(&id);
    assert_eq!(file["hours_to_complete"], json!(3));
    assert_eq!(file["x"], json!({"y": [1, 2]}));
    assert_eq!(
        file["dataset_type"]["custom_key"],
        json!({"a": [true, null]})
    );
    let raw = app.raw_record(&id);
    assert!(raw.contains("1.50"), "{raw}");
    assert!(raw.contains("123456789012345678901234567890"), "{raw}");
}

/// The unknown keys of a job, in the order the object holds them.
fn unknown_keys(job: &Value) -> Vec<String> {
    const KNOWN: &[&str] = &[
        "type",
        "job_id",
        "model",
        "status",
        "error_message",
        "expected_repo_name",
        "dataset",
        "dataset_type",
        "file_format",
        "dataset_zip",
        "model_type",
        "attempts",
        "created_at",
        "updated_at",
        "started_at",
        "finished_at",
    ];
    job.as_object()
        .unwrap()
        .keys()
        .filter(|k| !KNOWN.contains(&k.as_str()))
        .cloned()
        .collect()
}

/// `job::Job::extra` promises "fields this version does not know, in the order they came,
/// written back unchanged". A seed-shaped submission carries `"error_message": null`, which
/// `Job::from_submission` drops with `Map::remove`, a swap-remove under `preserve_order`:
/// the last unknown key jumps into its place, ahead of the others.
#[tokio::test]
async fn unknown_fields_keep_their_order() {
    let app = spawn_app(Options::default()).await;
    let mut job = text_job();
    assert!(
        job.get("error_message").is_some(),
        "the seed sends error_message"
    );
    for key in ["first_extra", "second_extra", "third_extra"] {
        job = with(job, key, json!(key.len()));
    }
    let expected = ["first_extra", "second_extra", "third_extra"];
    let created = app.submit(&job).await;
    let id = id_of(&created);
    assert_eq!(unknown_keys(&created), expected, "order in the 201 reply");
    let got = app.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(unknown_keys(&got), expected, "order in GET");
    assert_eq!(
        unknown_keys(&app.read_job_file(&id)),
        expected,
        "order in the job file"
    );
}

#[tokio::test]
async fn bad_json_and_non_object_bodies_are_400_naming_the_body() {
    let app = spawn_app(Options::default()).await;
    for body in [
        "",
        "{",
        "not json",
        r#"{"type": "TextJob",}"#,
        "{\"type\": \"DiffusionJob\"} trailing",
        "\u{feff}{}",
    ] {
        let reply = app.post_raw("/v1/jobs", body).await;
        reply.expect_error(StatusCode::BAD_REQUEST, "body");
    }
    for body in ["[1, 2]", "\"a job\"", "42", "null", "true", "[]"] {
        let reply = app.post_raw("/v1/jobs", body).await;
        reply.expect_error(StatusCode::BAD_REQUEST, "body");
    }
    // Deep nesting is refused, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    app.post_raw("/v1/jobs", deep)
        .await
        .expect_error(StatusCode::BAD_REQUEST, "body");
    // Invalid UTF-8.
    app.post_raw("/v1/jobs", vec![b'{', b'"', 0xff, 0xfe, b'"', b'}'])
        .await
        .expect_error(StatusCode::BAD_REQUEST, "body");

    assert!(app.job_files().is_empty(), "{:?}", app.job_files());
    app.queue_file_becomes((vec![], vec![])).await;
}

#[tokio::test]
async fn invalid_fields_are_400_naming_the_field() {
    let app = spawn_app(Options::default()).await;
    let grpo = |functions: Value| {
        with(
            text_job(),
            "dataset_type",
            json!({"field_prompt": "prompt", "reward_functions": functions}),
        )
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        ("empty object", json!({}), "type"),
        ("missing type", without(text_job(), "type"), "type"),
        (
            "unknown type",
            with(text_job(), "type", "AudioJob".into()),
            "type",
        ),
        (
            "type not a string",
            with(text_job(), "type", json!(5)),
            "type",
        ),
        ("missing model", without(text_job(), "model"), "model"),
        ("empty model", with(text_job(), "model", "".into()), "model"),
        (
            "blank model",
            with(text_job(), "model", "   ".into()),
            "model",
        ),
        (
            "model not a string",
            with(text_job(), "model", json!(["m"])),
            "model",
        ),
        // The first problem in the documented field order is the one named.
        (
            "missing model and dataset",
            without(without(text_job(), "model"), "dataset"),
            "model",
        ),
        ("missing dataset", without(text_job(), "dataset"), "dataset"),
        (
            "empty dataset",
            with(text_job(), "dataset", "".into()),
            "dataset",
        ),
        (
            "missing file_format",
            without(text_job(), "file_format"),
            "file_format",
        ),
        (
            "unknown file_format",
            with(text_job(), "file_format", "xml".into()),
            "file_format",
        ),
        (
            "file_format not a string",
            with(text_job(), "file_format", json!(1)),
            "file_format",
        ),
        (
            "missing dataset_type",
            without(text_job(), "dataset_type"),
            "dataset_type",
        ),
        (
            "dataset_type not an object",
            with(text_job(), "dataset_type", "instruct".into()),
            "dataset_type",
        ),
        (
            "instruct field not a string",
            with(text_job(), "dataset_type", json!({"field_instruction": 7})),
            "dataset_type.field_instruction",
        ),
        (
            "DPO field not a string",
            with(
                text_job(),
                "dataset_type",
                json!({"field_prompt": "p", "field_chosen": ["c"], "field_rejected": "r"}),
            ),
            "dataset_type.field_chosen",
        ),
        (
            "chat template field not a string",
            with(
                text_job(),
                "dataset_type",
                json!({"chat_template": "chatml", "chat_column": 3}),
            ),
            "dataset_type.chat_column",
        ),
        (
            "GRPO negative reward_weight",
            grpo(json!([{"reward_func": "def f(c): return 1.0", "reward_weight": -0.5}])),
            "reward_weight",
        ),
        (
            "GRPO reward_weight not a number",
            grpo(json!([{"reward_func": "def f(c): return 1.0", "reward_weight": "1"}])),
            "reward_weight",
        ),
        (
            "GRPO missing reward_weight",
            grpo(json!([{"reward_func": "def f(c): return 1.0"}])),
            "reward_weight",
        ),
        (
            "GRPO second function bad",
            grpo(json!([
                {"reward_func": "def f(c): return 1.0", "reward_weight": 1},
                {"reward_func": "def g(c): return 0.0", "reward_weight": -1}
            ])),
            "reward_functions[1].reward_weight",
        ),
        (
            "GRPO empty reward_func",
            grpo(json!([{"reward_func": "", "reward_weight": 1}])),
            "reward_func",
        ),
        (
            "GRPO reward_functions not an array",
            grpo(json!("f")),
            "reward_functions",
        ),
        (
            "GRPO reward_functions empty",
            grpo(json!([])),
            "reward_functions",
        ),
        (
            "missing dataset_zip",
            without(diffusion_job(), "dataset_zip"),
            "dataset_zip",
        ),
        (
            "empty dataset_zip",
            with(diffusion_job(), "dataset_zip", "".into()),
            "dataset_zip",
        ),
        (
            "unknown model_type",
            with(diffusion_job(), "model_type", "sd3".into()),
            "model_type",
        ),
        (
            "expected_repo_name not a string",
            with(diffusion_job(), "expected_repo_name", json!(5)),
            "expected_repo_name",
        ),
        // A trainer could never be started with these: execve(2) takes no NUL byte and
        // no argument or `NAME=value` over 128 KiB.
        (
            "NUL in model",
            with(text_job(), "model", "Qwen\u{0}/x".into()),
            "model",
        ),
        (
            "NUL in dataset",
            with(text_job(), "dataset", "d\u{0}.json".into()),
            "dataset",
        ),
        (
            "NUL in expected_repo_name",
            with(diffusion_job(), "expected_repo_name", "r\u{0}".into()),
            "expected_repo_name",
        ),
        (
            "NUL in dataset_zip",
            with(diffusion_job(), "dataset_zip", "\u{0}".into()),
            "dataset_zip",
        ),
        (
            "model over the kernel's argument limit",
            with(text_job(), "model", "m".repeat(131_072).into()),
            "model",
        ),
        (
            "dataset_type JSON over the kernel's argument limit",
            with(
                text_job(),
                "dataset_type",
                json!({"field_instruction": "q".repeat(131_072)}),
            ),
            "dataset_type",
        ),
        (
            "job_id not a UUID",
            with(diffusion_job(), "job_id", "job-1".into()),
            "job_id",
        ),
        (
            "job_id a number",
            with(diffusion_job(), "job_id", json!(42)),
            "job_id",
        ),
        (
            "job_id a path",
            with(diffusion_job(), "job_id", "../../etc/passwd".into()),
            "job_id",
        ),
        (
            "job_id in braces",
            with(
                diffusion_job(),
                "job_id",
                "{123e4567-e89b-12d3-a456-426614174000}".into(),
            ),
            "job_id",
        ),
        (
            "status Running",
            with(diffusion_job(), "status", "Running".into()),
            "status",
        ),
        (
            "status Completed",
            with(diffusion_job(), "status", "Completed".into()),
            "status",
        ),
        (
            "status not a string",
            with(diffusion_job(), "status", json!(1)),
            "status",
        ),
        ("the seed as is (status Running)", seed_job(), "status"),
    ];
    for (what, body, field) in cases {
        let reply = app.post_json("/v1/jobs", &body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{what}: {}",
            reply.text()
        );
        let error = reply.expect_error(StatusCode::BAD_REQUEST, field);
        eprintln!("{what}: {error}");
    }
    assert!(app.job_files().is_empty(), "{:?}", app.job_files());
    app.queue_file_becomes((vec![], vec![])).await;
    let listed = app.get("/v1/jobs").await;
    assert_eq!(listed.json(), json!([]));
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_and_stores_nothing() {
    const LIMIT: usize = 1024;
    let app = spawn_app(Options {
        max_body_bytes: LIMIT,
        ..Options::default()
    })
    .await;
    // A valid job padded to exactly `size` bytes.
    let padded = |size: usize| {
        let base = serde_json::to_vec(&with(diffusion_job(), "pad", "".into())).unwrap();
        let body = with(diffusion_job(), "pad", "p".repeat(size - base.len()).into());
        let bytes = serde_json::to_vec(&body).unwrap();
        assert_eq!(bytes.len(), size);
        bytes
    };

    let reply = app.post_raw("/v1/jobs", padded(LIMIT + 1)).await;
    reply.expect_error(StatusCode::PAYLOAD_TOO_LARGE, "body");
    assert!(reply.json()["error"].as_str().unwrap().contains("1024"));
    let reply = app.post_raw("/v1/jobs", padded(64 * 1024)).await;
    reply.expect_error(StatusCode::PAYLOAD_TOO_LARGE, "body");
    // Declared with a content-length, too.
    let big = padded(4 * LIMIT);
    let reply = app
        .send(request(
            Method::POST,
            "/v1/jobs",
            &[
                ("content-type", "application/json"),
                ("content-length", &big.len().to_string()),
            ],
            Body::from(big),
        ))
        .await;
    reply.expect_error(StatusCode::PAYLOAD_TOO_LARGE, "body");
    assert!(app.job_files().is_empty(), "{:?}", app.job_files());
    app.queue_file_becomes((vec![], vec![])).await;

    // Exactly at the limit is fine.
    let reply = app.post_raw("/v1/jobs", padded(LIMIT)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(app.job_files().len(), 1);
}

#[tokio::test]
async fn a_missing_or_non_json_content_type_is_415() {
    let app = spawn_app(Options::default()).await;
    let body = serde_json::to_vec(&diffusion_job()).unwrap();
    let mut types = vec![None];
    types.extend(
        [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonx",
            "text/json",
            "",
        ]
        .map(Some),
    );
    for content_type in types {
        let headers: Vec<(&str, &str)> = content_type
            .map(|t| vec![("content-type", t)])
            .unwrap_or_default();
        let reply = app
            .send(request(
                Method::POST,
                "/v1/jobs",
                &headers,
                Body::from(body.clone()),
            ))
            .await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}: {}",
            reply.text()
        );
        reply.expect_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "content-type");
    }
    assert!(app.job_files().is_empty(), "{:?}", app.job_files());

    // JSON with parameters, or in another case, is JSON.
    for content_type in ["application/json; charset=utf-8", "Application/JSON"] {
        let reply = app
            .send(request(
                Method::POST,
                "/v1/jobs",
                &[("content-type", content_type)],
                Body::from(body.clone()),
            ))
            .await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "{content_type}: {}",
            reply.text()
        );
    }
    assert_eq!(app.job_files().len(), 2);
}

#[tokio::test]
async fn resubmitting_the_same_job_is_200_and_different_content_is_409() {
    let app = spawn_app(Options::default()).await;
    let job = text_job();
    let id = id_of(&job);
    let first = app.submit(&job).await;

    // A safe retry: same id, same content. The existing job comes back, unchanged.
    let again = app.post_json("/v1/jobs", &job).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    assert_eq!(again.json(), first);
    // The same content in another key order, with "status": "Queued" spelled out.
    let mut reordered = serde_json::Map::new();
    let object = job.as_object().unwrap();
    for key in object.keys().rev() {
        reordered.insert(key.clone(), object[key].clone());
    }
    reordered.insert("status".into(), "Queued".into());
    let again = app.post_json("/v1/jobs", &Value::Object(reordered)).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    assert_eq!(again.json(), first);
    assert_eq!(app.job_files(), vec![format!("{id}.json")]);
    app.queued_file_becomes(vec![id.clone()]).await;

    // Same id, different content: a conflict, and the stored job is untouched.
    for changed in [
        with(job.clone(), "model", "other/model".into()),
        with(job.clone(), "dataset", "other.json".into()),
        with(job.clone(), "file_format", "csv".into()),
        with(job.clone(), "expected_repo_name", Value::Null),
        with(job.clone(), "hours_to_complete", json!(5)),
        with(diffusion_job(), "job_id", id.clone().into()),
    ] {
        let reply = app.post_json("/v1/jobs", &changed).await;
        reply.expect_error(StatusCode::CONFLICT, &id);
    }
    assert_eq!(app.job_files(), vec![format!("{id}.json")]);
    assert_eq!(app.read_job_file(&id), first);
    let listed = app.get("/v1/jobs").await.json();
    assert_eq!(job_ids(&listed), vec![id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submissions_of_one_id_create_it_once() {
    let app = std::sync::Arc::new(spawn_app(Options::default()).await);
    let id = uuid::Uuid::new_v4().to_string();
    let same = with(diffusion_job(), "job_id", id.clone().into());

    // The same job, many times at once: one 201, the rest 200 with that same job.
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (app, job) = (app.clone(), same.clone());
        tasks.push(tokio::spawn(async move {
            app.post_json("/v1/jobs", &job).await
        }));
    }
    let mut created = Vec::new();
    let mut existing = Vec::new();
    for task in tasks {
        let reply = task.await.unwrap();
        match reply.status {
            StatusCode::CREATED => created.push(reply.json()),
            StatusCode::OK => existing.push(reply.json()),
            other => panic!("{other}: {}", reply.text()),
        }
    }
    assert_eq!(created.len(), 1, "exactly one submission creates the job");
    assert_eq!(existing.len(), 31);
    assert!(existing.iter().all(|j| *j == created[0]));
    assert_eq!(app.job_files(), vec![format!("{id}.json")]);
    app.queue_file_becomes((vec![], vec![id.clone()])).await;

    // Different contents under one new id at once: one wins, every other one is a 409.
    let contested = uuid::Uuid::new_v4().to_string();
    let mut tasks = Vec::new();
    for n in 0..16 {
        let app = app.clone();
        let job = with(
            with(diffusion_job(), "job_id", contested.clone().into()),
            "model",
            format!("model-{n}").into(),
        );
        tasks.push(tokio::spawn(async move {
            app.post_json("/v1/jobs", &job).await
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let reply = task.await.unwrap();
        match reply.status {
            StatusCode::CREATED => winners.push(reply.json()),
            StatusCode::CONFLICT => {
                reply.expect_error(StatusCode::CONFLICT, &contested);
            }
            other => panic!("{other}: {}", reply.text()),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one of the contents is stored");
    assert_eq!(app.read_job_file(&contested), winners[0]);
    app.queue_file_becomes((vec![], vec![id, contested])).await;
}

// ---------------------------------------------------------------------------------------
// GET /v1/jobs/{id}, path traversal
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn get_job_answers_200_400_and_404() {
    let app = spawn_app(Options::default()).await;
    let job = app.submit(&diffusion_job()).await;
    let id = id_of(&job);

    let reply = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.content_type().starts_with("application/json"));
    assert_eq!(reply.json(), job);

    for bad in [
        "not-a-uuid",
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "123e4567e89b12d3a456426614174000",
        "%7B123e4567-e89b-12d3-a456-426614174000%7D",
        "urn:uuid:123e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-42661417400g",
        "%20123e4567-e89b-12d3-a456-42661417400",
        "..",
        "%2e%2e",
        "%00",
    ] {
        let reply = app.get(&format!("/v1/jobs/{bad}")).await;
        reply.expect_error(StatusCode::BAD_REQUEST, "id");
    }

    let unknown = uuid::Uuid::new_v4().to_string();
    let reply = app.get(&format!("/v1/jobs/{unknown}")).await;
    let body = reply.expect_error(StatusCode::NOT_FOUND, &unknown);
    assert_eq!(body["status"], "Not Found");
}

#[tokio::test]
async fn path_traversal_never_reads_or_writes_outside_the_data_dir() {
    let app = spawn_app(Options::default()).await;
    let job = app.submit(&diffusion_job()).await;
    let id = id_of(&job);
    // queue.json follows the job file a moment later; the snapshot below must not race it.
    app.queue_file_becomes((vec![], vec![id.clone()])).await;
    // Bait: files a traversal would reach from the data dir or from jobs/ or logs/.
    std::fs::create_dir_all(app.root.path().join("etc")).unwrap();
    std::fs::write(app.root.path().join("etc/passwd"), "root:x:0:0:bait\n").unwrap();
    std::fs::write(app.root.path().join("secret.json"), "{\"bait\": true}").unwrap();
    std::fs::write(app.data.join("secret.json"), "{\"bait\": true}").unwrap();
    std::fs::write(app.data.join("secret.log"), "root:x:0:0:bait\n").unwrap();
    let before = tree(app.root.path());

    let targets = [
        "../../etc/passwd",
        "../secret",
        "..%2F..%2Fetc%2Fpasswd",
        "..%2f..%2fetc%2fpasswd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "..%252F..%252Fetc%252Fpasswd",
        "..%5C..%5Cetc%5Cpasswd",
        "%2Fetc%2Fpasswd",
        "..%2Fsecret",
        "..%2F..%2Fsecret",
        "..",
        "%2e%2e",
        ".",
        "secret",
        "%2e%2e%2f..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "..%00",
        "%00..%2Fsecret",
    ];
    let mut requests: Vec<(Method, String)> = Vec::new();
    for target in targets {
        for suffix in ["", "/logs", "/cancel"] {
            let method = if suffix == "/cancel" {
                Method::POST
            } else {
                Method::GET
            };
            requests.push((method, format!("/v1/jobs/{target}{suffix}")));
        }
    }
    requests.push((Method::GET, "/v1/jobs/../../etc/passwd".into()));
    requests.push((Method::GET, "/v1/../../etc/passwd".into()));
    requests.push((Method::GET, "/../../etc/passwd".into()));
    requests.push((Method::GET, format!("/v1/jobs/{id}/../../../secret.json")));
    requests.push((Method::GET, format!("/v1/jobs/{id}/..%2F..%2Fsecret.log")));
    requests.push((Method::GET, format!("/v1/jobs/{id}%2F..%2F..%2Fsecret")));
    requests.push((
        Method::GET,
        format!("/v1/jobs/{id}%2F..%2F..%2Fsecret/logs"),
    ));

    for (method, uri) in requests {
        let reply = app
            .send(request(method.clone(), &uri, &[], Body::empty()))
            .await;
        assert!(
            reply.status.is_client_error(),
            "{method} {uri} answered {}: {}",
            reply.status,
            reply.text()
        );
        let body = reply.json();
        assert!(body["error"].is_string(), "{method} {uri}: {body}");
        assert!(
            !reply.text().contains("bait"),
            "{method} {uri} leaked a file: {}",
            reply.text()
        );
    }

    // Submitting a traversal as a job_id is refused as well.
    for bad in ["../../etc/passwd", "../secret", "/tmp/x", "..\\..\\x"] {
        app.post_json("/v1/jobs", &with(diffusion_job(), "job_id", bad.into()))
            .await
            .expect_error(StatusCode::BAD_REQUEST, "job_id");
    }

    assert_eq!(
        tree(app.root.path()),
        before,
        "files changed under the temporary root"
    );
    // The real job is untouched and still queued.
    let reply = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(reply.json(), job);
}

// ---------------------------------------------------------------------------------------
// GET /v1/jobs?status=, GET /v1/queue
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn list_filters_by_status_in_queue_order_or_newest_first() {
    let app = spawn_app(Options::default()).await;
    let mut submitted = Vec::new();
    for _ in 0..4 {
        submitted.push(id_of(&app.submit(&diffusion_job()).await));
    }
    let (a, b, c, d) = (
        submitted[0].as_str(),
        submitted[1].as_str(),
        submitted[2].as_str(),
        submitted[3].as_str(),
    );

    let queued = app.get("/v1/jobs?status=Queued").await;
    assert_eq!(queued.status, StatusCode::OK);
    assert_eq!(job_ids(&queued.json()), [a, b, c, d]);
    assert!(
        queued.json().as_array().unwrap()[0].is_object(),
        "a list of jobs"
    );
    let all = app.get("/v1/jobs").await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(job_ids(&all.json()), [d, c, b, a], "newest first");
    let limited = app.get("/v1/jobs?status=Queued&limit=2").await;
    assert_eq!(job_ids(&limited.json()), [a, b]);

    // Cancelled jobs leave the queued list and show under their own status.
    for id in [b, d] {
        let reply = app.post_empty(&format!("/v1/jobs/{id}/cancel")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let queued = app.get("/v1/jobs?status=Queued").await.json();
    assert_eq!(job_ids(&queued), [a, c]);
    let cancelled = app.get("/v1/jobs?status=Cancelled").await.json();
    assert_eq!(job_ids(&cancelled), [d, b], "newest first");
    let all = app.get("/v1/jobs").await.json();
    assert_eq!(job_ids(&all), [d, c, b, a]);
    for status in ["Running", "Completed", "Failed"] {
        let reply = app.get(&format!("/v1/jobs?status={status}")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json(), json!([]), "{status}");
    }

    for bad in ["bogus", "", "Queued,Running", "%00"] {
        let reply = app.get(&format!("/v1/jobs?status={bad}")).await;
        reply.expect_error(StatusCode::BAD_REQUEST, "status");
    }
    for bad in ["limit=-1", "limit=x", "limit=99999999999999999999999999"] {
        let reply = app.get(&format!("/v1/jobs?{bad}")).await;
        reply.expect_error(StatusCode::BAD_REQUEST, "limit");
    }
}

#[tokio::test]
async fn the_queue_lists_queued_ids_in_submission_order() {
    let app = spawn_app(Options::default()).await;
    let empty = app.get("/v1/queue").await;
    assert_eq!(empty.status, StatusCode::OK);
    assert_eq!(
        empty.json(),
        json!({"running": [], "queued": [], "paused": "starts are paused (worker.max_concurrent = 0)", "waiting": {}})
    );

    let mut submitted = Vec::new();
    for n in 0..5 {
        let job = if n % 2 == 0 {
            text_job()
        } else {
            diffusion_job()
        };
        submitted.push(id_of(&app.submit(&job).await));
    }
    let reply = app.get("/v1/queue").await;
    assert_eq!(reply.status, StatusCode::OK);
    let view = reply.json();
    assert_eq!(
        view.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["running", "queued", "paused", "waiting"]
    );
    assert_eq!(ids(&view["running"]), Vec::<String>::new());
    assert_eq!(ids(&view["queued"]), submitted);
    // Same meaning as queue.json.
    app.queue_file_becomes((vec![], submitted.clone())).await;

    app.post_empty(&format!("/v1/jobs/{}/cancel", submitted[2]))
        .await;
    let view = app.get("/v1/queue").await.json();
    let mut expected = submitted.clone();
    expected.remove(2);
    assert_eq!(ids(&view["queued"]), expected);
    app.queue_file_becomes((vec![], expected)).await;
}

// ---------------------------------------------------------------------------------------
// POST /v1/jobs/{id}/cancel
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn cancel_is_durable_before_the_reply_and_refused_when_finished() {
    let app = spawn_app(Options::default()).await;
    let a = id_of(&app.submit(&diffusion_job()).await);
    let b = id_of(&app.submit(&text_job()).await);

    let reply = app.post_empty(&format!("/v1/jobs/{a}/cancel")).await;
    // Read the file before anything else: it must already say Cancelled.
    let on_disk = app.read_job_file(&a);
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let job = reply.json();
    assert_eq!(job["job_id"], a.as_str());
    assert_eq!(job["status"], "Cancelled");
    let reason = job["error_message"].as_str().expect("error_message is set");
    assert!(!reason.trim().is_empty());
    assert!(job["finished_at"].is_string(), "{job}");
    assert_eq!(on_disk["status"], "Cancelled");
    assert_eq!(on_disk, job, "the file is the job as answered");
    app.queue_file_becomes((vec![], vec![b.clone()])).await;

    let view = app.get("/v1/queue").await.json();
    let paused = "starts are paused (worker.max_concurrent = 0)";
    assert_eq!(
        view,
        json!({"running": [], "queued": [b], "paused": paused, "waiting": {b.as_str(): paused}})
    );
    let got = app.get(&format!("/v1/jobs/{a}")).await.json();
    assert_eq!(got["status"], "Cancelled");

    // Already finished: 409, and nothing changes.
    let again = app.post_empty(&format!("/v1/jobs/{a}/cancel")).await;
    again.expect_error(StatusCode::CONFLICT, &a);
    assert_eq!(app.read_job_file(&a), job);

    // A cancelled job is not brought back by resubmitting it.
    let resubmitted = app
        .post_json(
            "/v1/jobs",
            &with(diffusion_job(), "job_id", a.clone().into()),
        )
        .await;
    assert_eq!(resubmitted.status, StatusCode::OK, "{}", resubmitted.text());
    assert_eq!(resubmitted.json()["status"], "Cancelled");
    app.queue_file_becomes((vec![], vec![b.clone()])).await;

    let unknown = uuid::Uuid::new_v4().to_string();
    let reply = app.post_empty(&format!("/v1/jobs/{unknown}/cancel")).await;
    let body = reply.expect_error(StatusCode::NOT_FOUND, &unknown);
    assert_eq!(body["status"], "Not Found");
    assert!(!app.has_record(&unknown));

    for bad in ["not-a-uuid", "..%2F..%2Fetc%2Fpasswd"] {
        app.post_empty(&format!("/v1/jobs/{bad}/cancel"))
            .await
            .expect_error(StatusCode::BAD_REQUEST, "id");
    }
    // b was never touched.
    assert_eq!(app.read_job_file(&b)["status"], "Queued");
}

// ---------------------------------------------------------------------------------------
// POST /v1/jobs/{id}/retry
// ---------------------------------------------------------------------------------------

/// A stored timestamp, parsed.
fn time_of(job: &Value, key: &str) -> chrono::DateTime<chrono::Utc> {
    job[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a time: {job}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

#[tokio::test]
async fn a_retried_job_is_queued_last_durably_also_for_a_replay_without_queue_json() {
    if app_support::not_for_this_store(
        "a_retried_job_is_queued_last_durably_also_for_a_replay_without_queue_json",
    ) {
        return;
    }
    let app = spawn_app(Options::default()).await;
    let a = id_of(&app.submit(&diffusion_job()).await);
    let b = id_of(&app.submit(&text_job()).await);
    let c = id_of(&app.submit(&diffusion_job()).await);
    let c_created = time_of(&app.read_job_file(&c), "created_at");

    // Queued: nothing to retry, and nothing changes.
    let before = app.read_job_file(&a);
    app.post_empty(&format!("/v1/jobs/{a}/retry"))
        .await
        .expect_error(
            StatusCode::CONFLICT,
            &format!("job {a} is not finished (Queued)"),
        );
    assert_eq!(app.read_job_file(&a), before);

    let cancelled = app.post_empty(&format!("/v1/jobs/{a}/cancel")).await.json();
    let reply = app.post_empty(&format!("/v1/jobs/{a}/retry")).await;
    // Read the file before anything else: it must already say Queued.
    let on_disk = app.read_job_file(&a);
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let job = reply.json();
    assert_eq!(on_disk, job, "the file is the job as answered");
    assert_eq!(job["status"], "Queued");
    assert_eq!(job["attempts"], 0);
    for cleared in ["error_message", "started_at", "finished_at"] {
        assert_eq!(job[cleared], Value::Null, "{cleared}: {job}");
    }
    assert!(
        time_of(&job, "created_at") > c_created,
        "a new arrival's creation time, after every job queued before: {job}"
    );
    assert!(time_of(&job, "updated_at") > time_of(&cancelled, "updated_at"));
    for kept in [
        "type",
        "model",
        "dataset_zip",
        "model_type",
        "expected_repo_name",
    ] {
        assert_eq!(job[kept], cancelled[kept], "{kept}");
    }

    // At the end of the queue, in the API and in queue.json.
    let view = app.get("/v1/queue").await.json();
    assert_eq!(ids(&view["queued"]), [b.clone(), c.clone(), a.clone()]);
    app.queued_file_becomes(vec![b.clone(), c.clone(), a.clone()])
        .await;
    let queued = app.get("/v1/jobs?status=Queued").await.json();
    assert_eq!(job_ids(&queued), [b.as_str(), c.as_str(), a.as_str()]);

    // The job files alone give the same order: a replay that has lost queue.json places
    // the queued jobs by created_at.
    let copy = tempfile::tempdir().unwrap();
    std::fs::create_dir(copy.path().join("jobs")).unwrap();
    for name in app.job_files() {
        std::fs::copy(
            app.jobs_dir().join(&name),
            copy.path().join("jobs").join(&name),
        )
        .unwrap();
    }
    let recovered = training_worker::store::files::replay::replay(copy.path()).unwrap();
    let order: Vec<String> = recovered.order.iter().map(|id| id.to_string()).collect();
    assert_eq!(order, [b.clone(), c.clone(), a.clone()]);

    // Queued again: a second retry is a conflict.
    app.post_empty(&format!("/v1/jobs/{a}/retry"))
        .await
        .expect_error(StatusCode::CONFLICT, "not finished (Queued)");
    assert_eq!(app.read_job_file(&a), job);

    let unknown = uuid::Uuid::new_v4().to_string();
    let body = app
        .post_empty(&format!("/v1/jobs/{unknown}/retry"))
        .await
        .expect_error(StatusCode::NOT_FOUND, &unknown);
    assert_eq!(body["status"], "Not Found");
    assert!(!app.has_record(&unknown));
    for bad in ["not-a-uuid", "..%2F..%2Fetc%2Fpasswd"] {
        app.post_empty(&format!("/v1/jobs/{bad}/retry"))
            .await
            .expect_error(StatusCode::BAD_REQUEST, "id");
    }
}

#[tokio::test]
async fn under_the_deadline_order_a_retried_job_gets_a_new_deadline_from_now() {
    let app = spawn_app(Options {
        order: training_worker::config::Order::Deadline,
        ..Options::default()
    })
    .await;
    let budget = |hours: f64| with(diffusion_job(), "hours_to_complete", json!(hours));
    // a has the earliest deadline and goes first; b's is a second later; c's an hour later.
    let a = id_of(&app.submit(&budget(1.0)).await);
    let b = id_of(&app.submit(&budget(1.0 + 1.0 / 3600.0)).await);
    let c = id_of(&app.submit(&budget(2.0)).await);
    let first = app.read_job_file(&a);
    assert_eq!(
        ids(&app.get("/v1/queue").await.json()["queued"]),
        [a.clone(), b.clone(), c.clone()]
    );
    // Deadlines are compared to the second: wait long enough for a's new one to pass b's.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    app.post_empty(&format!("/v1/jobs/{a}/cancel")).await;
    let job = app.post_empty(&format!("/v1/jobs/{a}/retry")).await.json();
    let deadline = time_of(&job, "deadline");
    assert_eq!(
        deadline,
        time_of(&job, "created_at") + chrono::Duration::hours(1),
        "{job}"
    );
    assert!(
        deadline >= time_of(&first, "deadline") + chrono::Duration::seconds(2),
        "{job}"
    );
    assert_eq!(app.read_job_file(&a), job);
    // Placed by its new deadline: after b's, before c's.
    let order = vec![b.clone(), a.clone(), c.clone()];
    assert_eq!(ids(&app.get("/v1/queue").await.json()["queued"]), order);
    app.queued_file_becomes(order).await;
}

#[tokio::test]
async fn a_retry_the_storage_refuses_is_503_and_leaves_the_job_finished() {
    if app_support::not_for_this_store(
        "a_retry_the_storage_refuses_is_503_and_leaves_the_job_finished",
    ) {
        return;
    }
    let app = spawn_app(Options::default()).await;
    let a = id_of(&app.submit(&diffusion_job()).await);
    let b = id_of(&app.submit(&diffusion_job()).await);
    let cancelled = app.post_empty(&format!("/v1/jobs/{a}/cancel")).await.json();
    app.queued_file_becomes(vec![b.clone()]).await;

    // Tests run as root, so permissions would not stop a write: put a file where jobs/ was.
    let jobs = app.jobs_dir();
    let aside = app.data.join("jobs-aside");
    std::fs::rename(&jobs, &aside).unwrap();
    std::fs::write(&jobs, b"not a directory").unwrap();
    app.post_empty(&format!("/v1/jobs/{a}/retry"))
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "storage");
    assert_eq!(app.get(&format!("/v1/jobs/{a}")).await.json(), cancelled);
    assert_eq!(
        ids(&app.get("/v1/queue").await.json()["queued"]),
        [b.as_str()]
    );
    std::fs::remove_file(&jobs).unwrap();
    std::fs::rename(&aside, &jobs).unwrap();
    assert_eq!(app.read_job_file(&a), cancelled);

    // Once the storage is back, the retry goes through.
    let reply = app.post_empty(&format!("/v1/jobs/{a}/retry")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    app.queued_file_becomes(vec![b, a]).await;
}

// ---------------------------------------------------------------------------------------
// GET /v1/jobs/{id}/logs
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn logs_of_a_queued_job_are_empty_text_and_unknown_jobs_404() {
    let app = spawn_app(Options::default()).await;
    let id = id_of(&app.submit(&diffusion_job()).await);
    let reply = app.get(&format!("/v1/jobs/{id}/logs")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        reply.content_type().starts_with("text/plain"),
        "{:?}",
        reply.content_type()
    );
    assert!(reply.body.is_empty(), "{:?}", reply.text());

    let unknown = uuid::Uuid::new_v4().to_string();
    let reply = app.get(&format!("/v1/jobs/{unknown}/logs")).await;
    let body = reply.expect_error(StatusCode::NOT_FOUND, &unknown);
    assert_eq!(body["status"], "Not Found");
    app.get("/v1/jobs/not-a-uuid/logs")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "id");
    // Asking created no log file.
    let logs: Vec<_> = std::fs::read_dir(app.data.join("logs")).unwrap().collect();
    assert!(logs.is_empty());
}

// ---------------------------------------------------------------------------------------
// Health, readiness, shutdown
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn healthz_and_readyz_answer_200_when_the_worker_runs() {
    let app = spawn_app(Options::default()).await;
    let reply = app.get("/healthz").await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = app.get("/readyz").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test]
async fn before_the_worker_is_set_readyz_and_v1_answer_503() {
    let app = unready_app();
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
    let reply = app.get("/readyz").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);

    app.get("/v1/jobs")
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "ready");
    app.get("/v1/queue")
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "ready");
    app.get("/v1/nodes")
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "ready");
    let id = uuid::Uuid::new_v4();
    app.get(&format!("/v1/jobs/{id}"))
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "ready");
    app.post_empty(&format!("/v1/jobs/{id}/cancel"))
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "ready");
    app.get(&format!("/v1/jobs/{id}/logs"))
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "ready");
    app.post_json("/v1/jobs", &diffusion_job())
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "ready");
    assert!(app.job_files().is_empty());
    // Malformed requests are still told what is wrong with them.
    app.post_raw("/v1/jobs", "{")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "body");
    app.get("/v1/jobs/not-a-uuid")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "id");
}

#[tokio::test]
async fn after_shutdown_readyz_is_503_and_writes_are_refused() {
    let mut app = spawn_app(Options::default()).await;
    let id = id_of(&app.submit(&diffusion_job()).await);
    app.shutdown.cancel();
    let reply = app.get("/readyz").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);

    // Once the worker has stopped, /v1/ answers 503 and nothing is stored.
    let worker = app.worker_task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("the worker stops after shutdown")
        .expect("the worker did not panic");
    let submitted = with(
        diffusion_job(),
        "job_id",
        uuid::Uuid::new_v4().to_string().into(),
    );
    app.post_json("/v1/jobs", &submitted)
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    app.post_empty(&format!("/v1/jobs/{id}/cancel"))
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    app.get(&format!("/v1/jobs/{id}"))
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    assert_eq!(app.job_files(), vec![format!("{id}.json")]);
    assert_eq!(app.read_job_file(&id)["status"], "Queued");
}

#[tokio::test]
async fn while_the_worker_stops_readyz_is_503_changes_are_refused_and_reads_go_on() {
    // A trainer that ignores SIGTERM keeps the worker stopping for the 2 s kill grace.
    let mut app = spawn_app(Options {
        max_concurrent: 1,
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "trap '' TERM; sleep 30".into(),
        ],
        ..Options::default()
    })
    .await;
    let running = id_of(&app.submit(&diffusion_job()).await);
    let queued = id_of(&app.submit(&diffusion_job()).await);
    app.wait_for(&running, "Running", |job| job["status"] == "Running")
        .await;
    app.shutdown.cancel();
    let worker = app.worker_task.take().unwrap();
    assert!(!worker.is_finished(), "the worker waits for its trainer");

    assert_eq!(
        app.get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let submitted = with(
        diffusion_job(),
        "job_id",
        uuid::Uuid::new_v4().to_string().into(),
    );
    app.post_json("/v1/jobs", &submitted)
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    app.post_empty(&format!("/v1/jobs/{queued}/cancel"))
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    // Refused before the worker is asked (which would answer 409 for a queued job).
    app.post_empty(&format!("/v1/jobs/{queued}/retry"))
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    app.post_json(
        "/v1/offers",
        &json!({"type": "DiffusionJob", "model": "m", "hours_to_complete": 1}),
    )
    .await
    .expect_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    // The worker still answers what is asked of it, until it has stopped.
    if !worker.is_finished() {
        assert_eq!(
            app.get(&format!("/v1/jobs/{queued}")).await.status,
            StatusCode::OK
        );
    }

    tokio::time::timeout(Duration::from_secs(15), worker)
        .await
        .expect("the worker stops after its trainer's kill grace")
        .expect("the worker did not panic");
    let mut files = vec![format!("{running}.json"), format!("{queued}.json")];
    files.sort();
    assert_eq!(app.job_files(), files, "nothing was stored during the stop");
    assert_eq!(app.read_job_file(&queued)["status"], "Queued");
    assert_eq!(app.read_job_file(&running)["status"], "Queued");
}

// ---------------------------------------------------------------------------------------
// The API token
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn with_a_token_every_v1_call_needs_the_bearer_header() {
    let app = spawn_app(Options {
        api_token: Some("s3cret".into()),
        ..Options::default()
    })
    .await;
    let id = uuid::Uuid::new_v4().to_string();
    let body = serde_json::to_vec(&with(diffusion_job(), "job_id", id.clone().into())).unwrap();
    let calls: Vec<(Method, String, Vec<u8>)> = vec![
        (Method::POST, "/v1/jobs".into(), body.clone()),
        (Method::POST, "/v1/jobs".into(), b"{".to_vec()),
        (Method::GET, "/v1/jobs".into(), vec![]),
        (Method::GET, "/v1/jobs?status=bogus".into(), vec![]),
        (Method::GET, format!("/v1/jobs/{id}"), vec![]),
        (Method::GET, "/v1/jobs/not-a-uuid".into(), vec![]),
        (Method::GET, format!("/v1/jobs/{id}/logs"), vec![]),
        (Method::POST, format!("/v1/jobs/{id}/cancel"), vec![]),
        (Method::GET, "/v1/queue".into(), vec![]),
        (Method::GET, "/v1/nodes".into(), vec![]),
    ];
    let wrong: [&[(&str, &str)]; 7] = [
        &[],
        &[("authorization", "Bearer nope")],
        &[("authorization", "Bearer s3cre")],
        &[("authorization", "Bearer s3cret2")],
        &[("authorization", "s3cret")],
        &[("authorization", "Basic s3cret")],
        &[("authorization", "Bearer ")],
    ];
    for (method, uri, body) in &calls {
        for auth in wrong {
            let mut headers = vec![("content-type", "application/json")];
            headers.extend_from_slice(auth);
            let reply = app
                .send(request(
                    method.clone(),
                    uri,
                    &headers,
                    Body::from(body.clone()),
                ))
                .await;
            reply.expect_error(StatusCode::UNAUTHORIZED, "token");
            assert_eq!(
                reply
                    .headers
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer"),
                "{method} {uri} with {auth:?}"
            );
        }
    }
    assert!(
        app.job_files().is_empty(),
        "an unauthorized submit stored a job"
    );

    // With the token, the calls go through.
    let authorized = |method: Method, uri: &str, body: Vec<u8>| {
        request(
            method,
            uri,
            &[
                ("content-type", "application/json"),
                ("authorization", "Bearer s3cret"),
            ],
            Body::from(body),
        )
    };
    let reply = app.send(authorized(Method::POST, "/v1/jobs", body)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(app.job_files(), vec![format!("{id}.json")]);
    for (uri, status) in [
        (format!("/v1/jobs/{id}"), StatusCode::OK),
        ("/v1/jobs".to_string(), StatusCode::OK),
        ("/v1/queue".to_string(), StatusCode::OK),
        (format!("/v1/jobs/{id}/logs"), StatusCode::OK),
    ] {
        let reply = app.send(authorized(Method::GET, &uri, vec![])).await;
        assert_eq!(reply.status, status, "{uri}: {}", reply.text());
    }
    let reply = app
        .send(authorized(
            Method::POST,
            &format!("/v1/jobs/{id}/cancel"),
            vec![],
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // Health and readiness need no token.
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(app.get("/readyz").await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_bearer_scheme_is_matched_in_any_case_and_the_token_exactly() {
    let app = spawn_app(Options {
        api_token: Some("s3cret".into()),
        ..Options::default()
    })
    .await;
    let queue = |auth: &str| {
        request(
            Method::GET,
            "/v1/queue",
            &[("authorization", auth)],
            Body::empty(),
        )
    };
    // RFC 7235 2.1: the scheme's name is case-insensitive; the token is not.
    for auth in [
        "Bearer s3cret",
        "bearer s3cret",
        "BEARER s3cret",
        "bEaReR s3cret",
        "Bearer  s3cret",
    ] {
        let reply = app.send(queue(auth)).await;
        assert_eq!(reply.status, StatusCode::OK, "{auth:?}: {}", reply.text());
    }
    for auth in [
        "bearer S3CRET",
        "BEARER nope",
        "bearer",
        "bearers3cret",
        "Bearers s3cret",
    ] {
        app.send(queue(auth))
            .await
            .expect_error(StatusCode::UNAUTHORIZED, "token");
    }
}

// ---------------------------------------------------------------------------------------
// Routing errors, robustness
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405_in_json() {
    let app = spawn_app(Options::default()).await;
    for uri in [
        "/",
        "/v1",
        "/v1/",
        "/v2/jobs",
        "/v1/jobz",
        "/v1/jobs/a/b/c",
        "/healthz/x",
    ] {
        let reply = app.get(uri).await;
        reply.expect_error(StatusCode::NOT_FOUND, "route");
    }
    for (method, uri) in [
        (Method::DELETE, "/v1/queue".to_string()),
        (Method::POST, "/v1/queue".to_string()),
        (Method::PUT, "/v1/jobs".to_string()),
        (Method::DELETE, "/v1/jobs".to_string()),
        (Method::DELETE, format!("/v1/jobs/{}", uuid::Uuid::new_v4())),
        (
            Method::GET,
            format!("/v1/jobs/{}/cancel", uuid::Uuid::new_v4()),
        ),
        (
            Method::POST,
            format!("/v1/jobs/{}/logs", uuid::Uuid::new_v4()),
        ),
        (Method::POST, "/healthz".to_string()),
        (Method::DELETE, "/readyz".to_string()),
    ] {
        let reply = app
            .send(request(method.clone(), &uri, &[], Body::empty()))
            .await;
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {uri}: {}",
            reply.text()
        );
        reply.expect_error(StatusCode::METHOD_NOT_ALLOWED, "method");
    }
}

#[tokio::test]
async fn malformed_requests_have_no_side_effects() {
    let app = spawn_app(Options {
        max_body_bytes: 4096,
        ..Options::default()
    })
    .await;
    let before = tree(app.root.path());
    let valid = serde_json::to_vec(&diffusion_job()).unwrap();
    let json_ct = [("content-type", "application/json")];
    let requests = vec![
        request(Method::POST, "/v1/jobs", &json_ct, Body::from("{")),
        request(Method::POST, "/v1/jobs", &json_ct, Body::from("[]")),
        request(Method::POST, "/v1/jobs", &json_ct, Body::from("{}")),
        request(
            Method::POST,
            "/v1/jobs",
            &json_ct,
            Body::from(
                serde_json::to_vec(&with(diffusion_job(), "status", "Running".into())).unwrap(),
            ),
        ),
        request(
            Method::POST,
            "/v1/jobs",
            &json_ct,
            Body::from(serde_json::to_vec(&without(text_job(), "dataset")).unwrap()),
        ),
        request(
            Method::POST,
            "/v1/jobs",
            &json_ct,
            Body::from(
                serde_json::to_vec(&with(diffusion_job(), "pad", "x".repeat(8192).into())).unwrap(),
            ),
        ),
        request(Method::POST, "/v1/jobs", &[], Body::from(valid.clone())),
        request(
            Method::POST,
            "/v1/jobs",
            &[("content-type", "text/plain")],
            Body::from(valid.clone()),
        ),
        request(Method::PUT, "/v1/jobs", &json_ct, Body::from(valid.clone())),
        request(Method::DELETE, "/v1/queue", &[], Body::empty()),
        request(
            Method::POST,
            "/v1/jobs/not-a-uuid/cancel",
            &[],
            Body::empty(),
        ),
        request(
            Method::POST,
            &format!("/v1/jobs/{}/cancel", uuid::Uuid::new_v4()),
            &[],
            Body::empty(),
        ),
        request(
            Method::GET,
            &format!("/v1/jobs/{}/logs", uuid::Uuid::new_v4()),
            &[],
            Body::empty(),
        ),
        request(Method::GET, "/v1/jobs?status=bogus", &[], Body::empty()),
        request(Method::GET, "/v1/jobs/..%2F..%2Fx", &[], Body::empty()),
        request(Method::POST, "/v1/nope", &json_ct, Body::from(valid)),
    ];
    for req in requests {
        let what = format!("{} {}", req.method(), req.uri());
        let reply = app.send(req).await;
        assert!(
            reply.status.is_client_error(),
            "{what} answered {}: {}",
            reply.status,
            reply.text()
        );
        assert!(
            reply.json()["error"].is_string(),
            "{what}: {}",
            reply.text()
        );
    }
    assert!(app.job_files().is_empty(), "{:?}", app.job_files());
    app.queue_file_becomes((vec![], vec![])).await;
    assert_eq!(tree(app.root.path()), before, "the data dir changed");
    // The daemon still works.
    app.submit(&diffusion_job()).await;
}

// ---------------------------------------------------------------------------------------
// Storage failure
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_storage_failure_is_503_and_stores_nothing() {
    if app_support::not_for_this_store("a_storage_failure_is_503_and_stores_nothing") {
        return;
    }
    let app = spawn_app(Options::default()).await;
    let a = id_of(&app.submit(&diffusion_job()).await);
    let queue_before = (vec![], vec![a.clone()]);
    app.queue_file_becomes(queue_before.clone()).await;

    // Tests run as root, so permissions would not stop a write: put a file where jobs/ was.
    let jobs = app.jobs_dir();
    let aside = app.data.join("jobs-aside");
    std::fs::rename(&jobs, &aside).unwrap();
    std::fs::write(&jobs, b"not a directory").unwrap();

    let failed = uuid::Uuid::new_v4().to_string();
    let reply = app
        .post_json(
            "/v1/jobs",
            &with(diffusion_job(), "job_id", failed.clone().into()),
        )
        .await;
    let body = reply.expect_error(StatusCode::SERVICE_UNAVAILABLE, "storage");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("nothing was stored"),
        "{body}"
    );
    // Reads keep working, and the failed job is nowhere.
    let reply = app.get(&format!("/v1/jobs/{a}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    app.get(&format!("/v1/jobs/{failed}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, &failed);
    let view = app.get("/v1/queue").await.json();
    let paused = "starts are paused (worker.max_concurrent = 0)";
    assert_eq!(
        view,
        json!({"running": [], "queued": [a], "paused": paused, "waiting": {a.as_str(): paused}})
    );
    app.queue_file_becomes(queue_before).await;
    // A cancel cannot be stored either, and leaves the job queued.
    app.post_empty(&format!("/v1/jobs/{a}/cancel"))
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "storage");
    assert_eq!(
        app.get(&format!("/v1/jobs/{a}")).await.json()["status"],
        "Queued"
    );

    std::fs::remove_file(&jobs).unwrap();
    std::fs::rename(&aside, &jobs).unwrap();

    // Writes are accepted again, and the failed job left no trace.
    let c = id_of(&app.submit(&text_job()).await);
    app.get(&format!("/v1/jobs/{failed}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, &failed);
    let mut expected_files = vec![format!("{a}.json"), format!("{c}.json")];
    expected_files.sort();
    assert_eq!(app.job_files(), expected_files);
    app.queue_file_becomes((vec![], vec![a.clone(), c.clone()]))
        .await;
    assert_eq!(app.read_job_file(&a)["status"], "Queued");
    // The client's retry of the failed job now succeeds, as a new job.
    let retried = app
        .post_json(
            "/v1/jobs",
            &with(diffusion_job(), "job_id", failed.clone().into()),
        )
        .await;
    assert_eq!(retried.status, StatusCode::CREATED, "{}", retried.text());
    app.queued_file_becomes(vec![a, c, failed]).await;
}

// ---------------------------------------------------------------------------------------
// With a trainer
// ---------------------------------------------------------------------------------------

fn shell(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_job_serves_its_log_and_cannot_be_cancelled() {
    let app = spawn_app(Options {
        max_concurrent: 1,
        command: shell("echo \"hello from $JOB_ID\"; echo to stderr >&2; exit 0"),
        ..Options::default()
    })
    .await;
    let id = id_of(&app.submit(&diffusion_job()).await);
    let job = app
        .wait_for(&id, "Completed", |j| j["status"] == "Completed")
        .await;
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["error_message"], Value::Null);
    assert!(job["finished_at"].is_string());
    assert_eq!(app.read_job_file(&id)["status"], "Completed");

    let logs = app.get(&format!("/v1/jobs/{id}/logs")).await;
    assert_eq!(logs.status, StatusCode::OK);
    assert!(logs.content_type().starts_with("text/plain"));
    let text = logs.text();
    assert!(text.contains(&format!("hello from {id}")), "{text}");
    assert!(text.contains("to stderr"), "{text}");

    app.post_empty(&format!("/v1/jobs/{id}/cancel"))
        .await
        .expect_error(StatusCode::CONFLICT, "Completed");
    assert_eq!(app.read_job_file(&id)["status"], "Completed");
    let listed = app.get("/v1/jobs?status=Completed").await.json();
    assert_eq!(job_ids(&listed), [id.as_str()]);
    let view = app.get("/v1/queue").await.json();
    assert_eq!(
        view,
        json!({"running": [], "queued": [], "paused": null, "waiting": {}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_says_why() {
    let app = spawn_app(Options {
        max_concurrent: 1,
        command: shell("echo working; echo 'CUDA out of memory'; exit 3"),
        ..Options::default()
    })
    .await;
    let id = id_of(&app.submit(&text_job()).await);
    let job = app
        .wait_for(&id, "Failed", |j| j["status"] == "Failed")
        .await;
    let reason = job["error_message"].as_str().expect("a reason");
    assert!(reason.contains('3'), "{reason}");
    assert!(reason.contains("CUDA out of memory"), "{reason}");
    app.post_empty(&format!("/v1/jobs/{id}/cancel"))
        .await
        .expect_error(StatusCode::CONFLICT, "Failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_stops_its_trainer_and_it_stays_cancelled() {
    let app = spawn_app(Options {
        max_concurrent: 1,
        command: shell("echo started; exec sleep 60"),
        ..Options::default()
    })
    .await;
    let id = id_of(&app.submit(&diffusion_job()).await);
    let next = id_of(&app.submit(&diffusion_job()).await);
    app.wait_for(&id, "Running", |j| j["status"] == "Running")
        .await;
    let view = app.get("/v1/queue").await.json();
    assert_eq!(
        view,
        json!({
            "running": [id],
            "queued": [next],
            "paused": null,
            "waiting": {next.as_str(): "the one slot is busy (worker.max_concurrent = 1)"},
        })
    );
    // Wait for the trainer's own output, so that it is surely running.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !app
        .get(&format!("/v1/jobs/{id}/logs"))
        .await
        .text()
        .contains("started")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "trainer never printed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let reply = app.post_empty(&format!("/v1/jobs/{id}/cancel")).await;
    let on_disk = app.read_job_file(&id);
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["status"], "Cancelled");
    assert!(reply.json()["error_message"].is_string());
    assert_eq!(on_disk["status"], "Cancelled");
    // queue.json follows the job files, off the acknowledgement path.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.queue_file().0.contains(&id) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue.json still lists the cancelled job as running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The trainer is stopped (the executor notes its end in the log) well before its
    // 60 s sleep, and the job stays Cancelled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = app.get(&format!("/v1/jobs/{id}/logs")).await.text();
        if log.contains("==> trainer ended") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "trainer not stopped: {log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The next job starts in the freed slot; the cancelled one never runs again.
    app.wait_for(&next, "Running", |j| j["status"] == "Running")
        .await;
    let job = app.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(job["status"], "Cancelled");
    assert_eq!(job["attempts"], 1);
    assert_eq!(app.read_job_file(&id)["status"], "Cancelled");
    let view = app.get("/v1/queue").await.json();
    assert_eq!(
        view,
        json!({"running": [next], "queued": [], "paused": null, "waiting": {}})
    );
    // Stop the second trainer so that no sleep outlives the test.
    let reply = app.post_empty(&format!("/v1/jobs/{next}/cancel")).await;
    assert_eq!(reply.status, StatusCode::OK);
    app.shutdown.cancel();
    if let Some(worker) = app.worker_task {
        let _ = tokio::time::timeout(Duration::from_secs(10), worker).await;
    }
}

/// Waits until the job's log holds `needle`; returns the log.
async fn log_holds(app: &App, id: &str, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let log = app.get(&format!("/v1/jobs/{id}/logs")).await.text();
        if log.contains(needle) {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "log of {id} never held {needle:?}: {log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_completed_job_retried_runs_afresh_and_its_log_keeps_every_run() {
    // Fails the first time, succeeds after: the mark beside the job files says which.
    let app = spawn_app(Options {
        max_concurrent: 1,
        gpus: vec![0, 1],
        command: shell(
            "mark=\"$(dirname \"$JOB_FILE\")/../$JOB_ID.mark\"; \
             if [ -e \"$mark\" ]; then echo \"run ok on $CUDA_VISIBLE_DEVICES\"; exit 0; fi; \
             touch \"$mark\"; echo 'first run breaks'; exit 3",
        ),
        ..Options::default()
    })
    .await;
    let id = id_of(&app.submit(&diffusion_job()).await);
    let failed = app
        .wait_for(&id, "Failed", |j| j["status"] == "Failed")
        .await;
    assert_eq!(failed["attempts"], 1);
    assert_eq!(failed["gpu_ids"], json!([0]), "{failed}");

    let reply = app.post_empty(&format!("/v1/jobs/{id}/retry")).await;
    let on_disk = app.read_job_file(&id);
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let retried = reply.json();
    // Durable before the answer; by now the fresh run may have started already.
    assert_eq!(on_disk["created_at"], retried["created_at"], "{on_disk}");
    assert_ne!(on_disk["status"], "Failed", "{on_disk}");
    assert_eq!(retried["status"], "Queued");
    assert_eq!(retried["attempts"], 0);
    assert_eq!(retried["error_message"], Value::Null);
    assert_eq!(retried["started_at"], Value::Null);
    assert_eq!(retried["finished_at"], Value::Null);
    assert!(retried.get("gpu_ids").is_none(), "{retried}");
    assert!(retried.get("stages_done").is_none(), "{retried}");

    let completed = app
        .wait_for(&id, "Completed", |j| j["status"] == "Completed")
        .await;
    assert_eq!(completed["attempts"], 1, "the fresh run's first start");
    assert_eq!(completed["error_message"], Value::Null);
    let log = log_holds(&app, &id, "run ok on 0").await;
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in the log: {log}"))
    };
    assert!(at("first run breaks") < at("==> retried at"), "{log}");
    assert!(at("==> retried at") < at("run ok on 0"), "{log}");
    assert!(
        log.contains("a fresh run (the last run ended Failed)"),
        "{log}"
    );
    assert_eq!(log.matches("==> attempt 1 started").count(), 2, "{log}");

    // Completed is finished too: a retry runs it once more.
    let again = app.post_empty(&format!("/v1/jobs/{id}/retry")).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let job = app.get(&format!("/v1/jobs/{id}")).await.json();
        let log = app.get(&format!("/v1/jobs/{id}/logs")).await.text();
        if job["status"] == "Completed" && log.matches("run ok on").count() == 2 {
            assert!(log.contains("the last run ended Completed"), "{log}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{job:#} {log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.read_job_file(&id)["status"], "Completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_and_a_cancelled_one_whose_trainer_is_still_stopping_cannot_be_retried() {
    // The trainer ignores SIGTERM, so a cancel leaves it stopping for the 2 s kill grace.
    let app = spawn_app(Options {
        max_concurrent: 1,
        command: shell("trap '' TERM; echo \"started $ATTEMPT\"; sleep 30"),
        ..Options::default()
    })
    .await;
    let id = id_of(&app.submit(&diffusion_job()).await);
    app.wait_for(&id, "Running", |j| j["status"] == "Running")
        .await;
    app.post_empty(&format!("/v1/jobs/{id}/retry"))
        .await
        .expect_error(
            StatusCode::CONFLICT,
            &format!("job {id} is not finished (Running)"),
        );
    log_holds(&app, &id, "started 1").await;

    let reply = app.post_empty(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    app.post_empty(&format!("/v1/jobs/{id}/retry"))
        .await
        .expect_error(StatusCode::CONFLICT, "its trainer is still stopping");
    assert_eq!(app.read_job_file(&id)["status"], "Cancelled");

    // Once the trainer is gone (SIGKILL after the grace), the retry goes through, and only
    // then does a second trainer of the job start.
    let log = log_holds(&app, &id, "==> trainer ended").await;
    assert!(!log.contains("==> retried"), "{log}");
    let reply = app.post_empty(&format!("/v1/jobs/{id}/retry")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    app.wait_for(&id, "Running", |j| j["status"] == "Running")
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let log = loop {
        let log = app.get(&format!("/v1/jobs/{id}/logs")).await.text();
        if log.matches("started 1").count() == 2 {
            break log;
        }
        assert!(tokio::time::Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ended = log
        .find("==> trainer ended")
        .expect("the first trainer's end");
    let retried = log.find("==> retried at").expect("the retry's line");
    let second = log
        .rfind("==> attempt 1 started")
        .expect("the fresh run's header");
    assert!(ended < retried && retried < second, "{log}");

    let reply = app.post_empty(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(reply.status, StatusCode::OK);
    app.shutdown.cancel();
    if let Some(worker) = app.worker_task {
        let _ = tokio::time::timeout(Duration::from_secs(10), worker).await;
    }
}

// ---------------------------------------------------------------------------------------
// GET /v1/nodes
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_lists_this_daemon_live_with_its_running_job_and_free_gpus() {
    // With the database, the in-process app opens it as a node alone on it (exclusive, as
    // `migrate` does), which registers no node; tests/cli_nodes.rs runs real daemons there.
    if app_support::postgres_store() {
        eprintln!(
            "NOT RUN nodes_lists_this_daemon_live_with_its_running_job_and_free_gpus: the file store's single node"
        );
        return;
    }
    let app = spawn_app(Options {
        max_concurrent: 1,
        gpus: vec![0, 1],
        command: shell("exec sleep 60"),
        ..Options::default()
    })
    .await;
    let idle = app.get("/v1/nodes").await;
    assert_eq!(idle.status, StatusCode::OK, "{}", idle.text());
    let idle = idle.json();
    let nodes = idle["nodes"].as_array().expect("a list of nodes");
    assert_eq!(nodes.len(), 1, "this daemon alone: {idle}");
    let node = &nodes[0];
    // As app_support names the app's node.
    assert_eq!(node["id"], "router-tests", "{idle}");
    assert_eq!(node["address"], "http://127.0.0.1:0", "{idle}");
    assert_eq!(node["live"], true, "{idle}");
    assert_eq!(node["running"], json!([]), "{idle}");
    assert_eq!(node["gpus"], json!([0, 1]), "{idle}");
    assert_eq!(node["free_gpus"], json!([0, 1]), "{idle}");
    let time = |key: &str| {
        chrono::DateTime::parse_from_rfc3339(node[key].as_str().unwrap_or(""))
            .unwrap_or_else(|e| panic!("{key} is not RFC 3339 ({e}): {idle}"))
    };
    assert!(time("started_at") <= time("heartbeat_at"), "{idle}");

    let id = id_of(&app.submit(&diffusion_job()).await);
    let running = app
        .wait_for(&id, "Running", |j| j["status"] == "Running")
        .await;
    assert_eq!(running["gpu_ids"], json!([0]), "{running}");
    // Free GPUs are as of the node's last heartbeat: with a database, up to a renewal ago.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let busy = loop {
        let view = app.get("/v1/nodes").await.json();
        if view["nodes"][0]["running"] == json!([id]) || tokio::time::Instant::now() > deadline {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(busy["nodes"][0]["id"], node["id"], "{busy}");
    assert_eq!(busy["nodes"][0]["running"], json!([id]), "{busy}");
    assert_eq!(busy["nodes"][0]["free_gpus"], json!([1]), "{busy}");

    let reply = app.post_empty(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}
