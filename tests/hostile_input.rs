//! Hostile input (CONTRACT.md 4: "no request can crash the daemon"): the real binary on
//! loopback, paused (`max_concurrent = 0`), fed seeded random and mutated bodies, path
//! traversal in every position, huge, deep and odd JSON, malformed HTTP, slow, half-closed
//! and idle connections, while a normal client keeps checking that it gets correct answers.
//!
//! Every test ends with the same checks: the daemon is alive and healthy; no answer was a
//! 5xx; nothing was written outside the data dir; `data/jobs` holds exactly the files of the
//! jobs that got a 201, each readable back as answered; a graceful stop, `check`, and a
//! restart find every one of them again; and the daemon's peak memory (VmHWM) stays bounded.
//!
//! The malformed-HTTP cases go over raw TCP (an HTTP client would refuse to send them or
//! would normalise them); the rest use reqwest.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "hostile_support/mod.rs"]
mod hostile_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use hostile_support::{Rng, case_seed, is_job_file_name, listen_address, proc_status_kib};
use support::{Daemon, Sandbox, Settings, pid_alive, secs, wait_until};
use training_worker::job::Job;

const BASE_SEED: u64 = 0x0051_1e47_1a9e_2026;
/// The daemon's default `max_body_bytes`, which the sandbox's config keeps.
const LIMIT: usize = 1024 * 1024;
/// A generous bound on the daemon's peak resident memory.
const MAX_HWM_KIB: u64 = 200 * 1024;
/// What a normal request may take while the daemon is under attack.
const NORMAL_LATENCY: Duration = Duration::from_secs(2);

/// The fields a client may not set; the server owns them.
const SERVER_FIELDS: &[&str] = &[
    "status",
    "attempts",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "error_message",
];

// ---------------------------------------------------------------------------------------
// The target: one daemon, what it acknowledged, and what went wrong
// ---------------------------------------------------------------------------------------

struct Target {
    base: String,
    addr: SocketAddr,
    client: reqwest::Client,
    /// Jobs the daemon acknowledged with a 201: id -> the job it answered.
    created: Mutex<BTreeMap<String, Value>>,
    /// Ids answered 200 (same job resubmitted) or 409 (a different job with that id).
    existing: Mutex<BTreeSet<String>>,
    failures: Mutex<Vec<String>>,
    requests: AtomicUsize,
    statuses: Mutex<BTreeMap<u16, usize>>,
}

impl Target {
    fn new(daemon: &Daemon) -> Target {
        let addr = listen_address(&daemon.stderr()).expect("the daemon logs its address");
        Target {
            base: format!("http://{addr}"),
            addr,
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(secs(20))
                .build()
                .expect("build an HTTP client"),
            created: Mutex::new(BTreeMap::new()),
            existing: Mutex::new(BTreeSet::new()),
            failures: Mutex::new(Vec::new()),
            requests: AtomicUsize::new(0),
            statuses: Mutex::new(BTreeMap::new()),
        }
    }

    fn fail(&self, what: String) {
        self.failures.lock().expect("not poisoned").push(what);
    }

    fn count(&self, status: u16) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        *self
            .statuses
            .lock()
            .expect("not poisoned")
            .entry(status)
            .or_default() += 1;
    }

    /// Sends one request; `None` (and a failure) when no answer came.
    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Option<(StatusCode, Vec<u8>)> {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(ct) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, ct);
        }
        // A body over the limit is refused from its Content-Length, unread; closing a socket
        // with unread data makes the kernel send a reset, which can overtake the 413 on its way
        // to a client still sending. Losing that answer is the client's lot, not a defect.
        let over_limit = body.as_ref().is_some_and(|b| b.len() > LIMIT);
        if let Some(body) = body {
            request = request.body(body);
        }
        let answer = async {
            let response = request.send().await?;
            let status = response.status();
            let bytes = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, bytes.to_vec()))
        }
        .await;
        match answer {
            Ok((status, bytes)) => {
                self.count(status.as_u16());
                if status.is_server_error() {
                    self.fail(format!(
                        "{method} {path}: {status} {}",
                        String::from_utf8_lossy(&bytes)
                    ));
                }
                Some((status, bytes))
            }
            Err(_) if over_limit => None,
            Err(e) => {
                self.fail(format!("{method} {path}: no answer: {e}"));
                None
            }
        }
    }

    /// POST /v1/jobs with `body`, judged against what the body is: not JSON or not an object
    /// must be 400, a wrong content type 415, a 2xx must be a valid Queued job that kept every
    /// field the client set. `must_create`: the body is a valid new job.
    async fn submit(
        &self,
        what: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
        must_create: bool,
    ) {
        let parsed: Option<Value> = serde_json::from_slice(&body).ok();
        let json_type = content_type.is_some_and(|ct| {
            let ct = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            ct == "application/json" || (ct.starts_with("application/") && ct.ends_with("+json"))
        });
        let size = body.len();
        let Some((status, reply)) = self
            .send(Method::POST, "/v1/jobs", content_type, Some(body))
            .await
        else {
            return;
        };
        let text = String::from_utf8_lossy(&reply).into_owned();
        let context = || {
            format!("{what} (content-type {content_type:?}, {size} bytes) -> {status} {text:.300}")
        };
        let code = status.as_u16();
        if !status.is_success() {
            match serde_json::from_slice::<Value>(&reply) {
                Ok(v) if v["error"].is_string() => {}
                _ => self.fail(format!(
                    "error body is not {{\"error\": ...}}: {}",
                    context()
                )),
            }
        }
        let allowed: &[u16] = if !json_type {
            &[415]
        } else if size > LIMIT {
            &[413]
        } else {
            match &parsed {
                None => &[400],
                Some(Value::Object(_)) if must_create => &[201],
                Some(Value::Object(_)) => &[200, 201, 400, 409],
                Some(_) => &[400],
            }
        };
        if !allowed.contains(&code) {
            self.fail(format!("expected one of {allowed:?}: {}", context()));
            return;
        }
        if !status.is_success() {
            if code == 409
                && let Some(id) = parsed.as_ref().and_then(|v| v["job_id"].as_str())
            {
                self.existing
                    .lock()
                    .expect("not poisoned")
                    .insert(id.to_lowercase());
            }
            return;
        }
        let sent = parsed.expect("a 2xx answers a JSON object");
        let job: Value = match serde_json::from_slice(&reply) {
            Ok(job) => job,
            Err(e) => return self.fail(format!("2xx body is not JSON ({e}): {}", context())),
        };
        if let Err(e) = Job::from_stored(job.clone()) {
            return self.fail(format!("2xx body is not a valid job ({e}): {}", context()));
        }
        if job["status"] != "Queued" || job["attempts"] != 0 || !job["error_message"].is_null() {
            self.fail(format!("2xx job is not a fresh Queued job: {}", context()));
        }
        for (key, value) in sent.as_object().expect("an object") {
            if SERVER_FIELDS.contains(&key.as_str()) || value.is_null() {
                continue;
            }
            let expected = if key == "job_id" {
                json!(value.as_str().unwrap_or("").to_lowercase())
            } else {
                value.clone()
            };
            if job.get(key) != Some(&expected) {
                self.fail(format!(
                    "field {key} sent as {value:.200}, stored as {:.200}: {}",
                    job.get(key).map(|v| v.to_string()).unwrap_or_default(),
                    context()
                ));
            }
        }
        let id = job["job_id"].as_str().unwrap_or("").to_string();
        if code == 201 {
            // Durable before the answer: the file is there now.
            let previous = self
                .created
                .lock()
                .expect("not poisoned")
                .insert(id.clone(), job);
            if previous.is_some() {
                self.fail(format!("a second 201 for job {id}: {}", context()));
            }
        } else {
            self.existing.lock().expect("not poisoned").insert(id);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Raw HTTP over TCP
// ---------------------------------------------------------------------------------------

/// What came back on a raw connection.
#[derive(Debug)]
struct RawReply {
    /// The status of each complete response, in order.
    statuses: Vec<u16>,
    bodies: Vec<Vec<u8>>,
    bytes: Vec<u8>,
    /// The daemon closed (or reset) the connection.
    closed: bool,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses complete HTTP/1.1 responses (Content-Length or chunked bodies).
fn parse_responses(mut bytes: &[u8]) -> (Vec<u16>, Vec<Vec<u8>>) {
    let mut statuses = Vec::new();
    let mut bodies = Vec::new();
    while let Some(end) = find(bytes, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
        let Some(status) = head
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u16>().ok())
        else {
            break;
        };
        let rest = &bytes[end + 4..];
        let header = |name: &str| {
            head.lines().find_map(|l| {
                l.strip_prefix(&format!("{name}:"))
                    .map(|v| v.trim().to_string())
            })
        };
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut body = Vec::new();
            let mut at = rest;
            let complete = loop {
                let Some(line_end) = find(at, b"\r\n") else {
                    break None;
                };
                let Ok(size) =
                    usize::from_str_radix(String::from_utf8_lossy(&at[..line_end]).trim(), 16)
                else {
                    break None;
                };
                let chunk = &at[line_end + 2..];
                if chunk.len() < size + 2 {
                    break None;
                }
                body.extend_from_slice(&chunk[..size]);
                at = &chunk[size + 2..];
                if size == 0 {
                    break Some(at);
                }
            };
            let Some(after) = complete else {
                break;
            };
            statuses.push(status);
            bodies.push(body);
            bytes = after;
        } else {
            let len = header("content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if rest.len() < len {
                break;
            }
            // An interim (1xx) response is not an answer; the final one follows.
            if status >= 200 {
                statuses.push(status);
                bodies.push(rest[..len].to_vec());
            }
            bytes = &rest[len..];
        }
    }
    (statuses, bodies)
}

/// Writes `request` (a write error is fine: the daemon may close early), optionally shuts
/// down the writing half, and reads until `responses` complete responses came, the daemon
/// closed the connection, or `within` passed.
async fn raw(
    addr: SocketAddr,
    request: &[u8],
    half_close: bool,
    responses: usize,
    within: Duration,
) -> RawReply {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the daemon");
    let _ = stream.write_all(request).await;
    if half_close {
        let _ = stream.shutdown().await;
    }
    read_replies(&mut stream, responses, within).await
}

async fn read_replies(stream: &mut TcpStream, responses: usize, within: Duration) -> RawReply {
    let deadline = tokio::time::Instant::now() + within;
    let mut bytes = Vec::new();
    let mut closed = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if parse_responses(&bytes).0.len() >= responses {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let (statuses, bodies) = parse_responses(&bytes);
    RawReply {
        statuses,
        bodies,
        bytes,
        closed,
    }
}

// ---------------------------------------------------------------------------------------
// The normal client, and the checks every test ends with
// ---------------------------------------------------------------------------------------

/// A well-behaved client that submits a job, reads it back and sees it in the queue, over
/// and over, until `stop`; every wrong or slow answer is a failure.
fn spawn_normal_client(
    target: Arc<Target>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(secs(10))
            .build()
            .expect("build an HTTP client");
        let mut rounds = 0;
        let mut pace = tokio::time::interval(Duration::from_millis(40));
        while !stop.is_cancelled() {
            tokio::select! {
                _ = pace.tick() => {}
                _ = stop.cancelled() => break,
            }
            let started = Instant::now();
            let body = json!({
                "type": "TextJob",
                "model": "normal/client",
                "dataset": "normal.json",
                "dataset_type": {"field_instruction": "q", "field_output": "a"},
                "file_format": "json",
                "expected_repo_name": format!("normal-{rounds}"),
            });
            let outcome: Result<(), String> = async {
                let r = client
                    .post(format!("{}/v1/jobs", target.base))
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| format!("submit: {e}"))?;
                let status = r.status();
                let job: Value = r.json().await.map_err(|e| format!("submit body: {e}"))?;
                if status != StatusCode::CREATED {
                    return Err(format!("submit: {status} {job}"));
                }
                let id = job["job_id"].as_str().unwrap_or("").to_string();
                target
                    .created
                    .lock()
                    .expect("not poisoned")
                    .insert(id.clone(), job.clone());
                let r = client
                    .get(format!("{}/v1/jobs/{id}", target.base))
                    .send()
                    .await
                    .map_err(|e| format!("get: {e}"))?;
                let status = r.status();
                let back: Value = r.json().await.map_err(|e| format!("get body: {e}"))?;
                if status != StatusCode::OK || back != job {
                    return Err(format!("get {id}: {status} {back}, submitted {job}"));
                }
                let r = client
                    .get(format!("{}/v1/queue", target.base))
                    .send()
                    .await
                    .map_err(|e| format!("queue: {e}"))?;
                let queue: Value = r.json().await.map_err(|e| format!("queue body: {e}"))?;
                let listed = queue["queued"]
                    .as_array()
                    .is_some_and(|q| q.iter().any(|x| x == id.as_str()));
                if !listed {
                    return Err(format!("queue does not list {id}"));
                }
                let r = client
                    .get(format!("{}/healthz", target.base))
                    .send()
                    .await
                    .map_err(|e| format!("healthz: {e}"))?;
                if r.status() != StatusCode::OK {
                    return Err(format!("healthz: {}", r.status()));
                }
                Ok(())
            }
            .await;
            target.requests.fetch_add(4, Ordering::Relaxed);
            let took = started.elapsed();
            match outcome {
                Err(e) => target.fail(format!("normal client, round {rounds}: {e}")),
                Ok(()) if took > NORMAL_LATENCY * 4 => target.fail(format!(
                    "normal client, round {rounds}: four requests took {took:?}"
                )),
                Ok(()) => {}
            }
            rounds += 1;
        }
        rounds
    })
}

/// Everything under the sandbox outside `data/`, except the daemons' stderr (which grows).
fn outside_data(sandbox: &Sandbox) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    hostile_support::snapshot(sandbox.path(), &|rel: &Path| {
        rel.starts_with("data") || rel.extension().is_some_and(|x| x == "stderr")
    })
}

struct Attack {
    name: &'static str,
    sandbox: Sandbox,
    daemon: Daemon,
    target: Arc<Target>,
    outside_before: BTreeMap<PathBuf, Option<Vec<u8>>>,
    stop_normal: CancellationToken,
    normal: tokio::task::JoinHandle<usize>,
    started: Instant,
}

impl Attack {
    async fn begin(name: &'static str) -> Attack {
        let sandbox = Sandbox::new();
        sandbox.configure(&Settings {
            max_concurrent: 0,
            ..Settings::default()
        });
        let daemon = sandbox.start().await;
        let target = Arc::new(Target::new(&daemon));
        let outside_before = outside_data(&sandbox);
        let stop_normal = CancellationToken::new();
        let normal = spawn_normal_client(target.clone(), stop_normal.clone());
        Attack {
            name,
            sandbox,
            daemon,
            target,
            outside_before,
            stop_normal,
            normal,
            started: Instant::now(),
        }
    }

    /// The checks every test ends with.
    async fn finish(self) {
        let Attack {
            name,
            sandbox,
            daemon,
            target,
            outside_before,
            stop_normal,
            normal,
            started,
        } = self;
        stop_normal.cancel();
        let rounds = normal.await.expect("the normal client does not panic");
        {
            let failures = target.failures.lock().expect("not poisoned");
            assert!(
                failures.is_empty(),
                "{name}: {} failure(s):\n{}",
                failures.len(),
                failures
                    .iter()
                    .take(30)
                    .map(|f| format!("  - {f}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        assert!(rounds >= 3, "the normal client ran only {rounds} rounds");

        let pid = daemon.pid();
        assert!(pid_alive(pid), "the daemon died");
        assert_eq!(
            daemon.healthz().await,
            StatusCode::OK,
            "/healthz at the end"
        );
        let rss = proc_status_kib(pid, "VmRSS").expect("VmRSS");
        let hwm = proc_status_kib(pid, "VmHWM").expect("VmHWM");

        // Nothing outside the data dir changed.
        let outside_after = outside_data(&sandbox);
        assert_eq!(
            outside_after.keys().collect::<Vec<_>>(),
            outside_before.keys().collect::<Vec<_>>(),
            "files outside data/ appeared or vanished"
        );
        assert!(
            outside_after == outside_before,
            "a file outside data/ changed"
        );

        // data/ holds the daemon's files only, and jobs/ exactly the acknowledged jobs.
        let created = target.created.lock().expect("not poisoned").clone();
        let data = sandbox.data_dir();
        // A temporary file may be in flight: queue.json follows the job files a moment later.
        let top: BTreeSet<String> = entries(&data)
            .into_iter()
            .filter(|n| !(n.starts_with('.') && n.ends_with(".tmp")))
            .collect();
        let known: BTreeSet<String> = ["jobs", "logs", "quarantine", "queue.json", "lock"]
            .into_iter()
            .map(String::from)
            .collect();
        assert!(top.is_subset(&known), "data/ holds {top:?}");
        assert!(
            entries(&data.join("logs")).is_empty(),
            "a paused daemon wrote logs"
        );
        assert!(
            entries(&data.join("quarantine")).is_empty(),
            "quarantine/ is not empty"
        );
        let files = entries(&sandbox.jobs_dir());
        for name in &files {
            assert!(
                is_job_file_name(name),
                "data/jobs/{name:?} is not <lowercase uuid>.json"
            );
        }
        let expected: BTreeSet<String> = created.keys().map(|id| format!("{id}.json")).collect();
        assert_eq!(
            files, expected,
            "data/jobs/ against the jobs that got a 201"
        );
        for id in target.existing.lock().expect("not poisoned").iter() {
            assert!(
                created.contains_key(id),
                "200 or 409 for {id}, which never got a 201"
            );
        }
        for (id, job) in &created {
            assert_eq!(&sandbox.job_file(id), job, "jobs/{id}.json against its 201");
        }
        let (running, queued) = daemon.queue().await;
        assert!(running.is_empty());
        assert_eq!(
            queued.iter().cloned().collect::<BTreeSet<_>>(),
            created.keys().cloned().collect::<BTreeSet<_>>(),
            "the queue against the jobs that got a 201"
        );
        for (id, job) in &created {
            assert_eq!(&daemon.job(id).await, job, "GET {id} against its 201");
        }

        // A graceful stop, the offline check, and a restart find every job again.
        let (status, _) = daemon.terminate(secs(20)).await;
        assert_eq!(status.code(), Some(0), "graceful stop after the attack");
        let check = Command::new(env!("CARGO_BIN_EXE_training-worker"))
            .arg("check")
            .arg("--data-dir")
            .arg(&data)
            .env_remove("TRAINING_WORKER_DATA_DIR")
            .output()
            .expect("run training-worker check");
        assert!(
            check.status.success(),
            "check after the attack: {}",
            String::from_utf8_lossy(&check.stdout)
        );
        let daemon = sandbox.start().await;
        assert!(
            sandbox.quarantined().is_empty(),
            "the restart quarantined {:?}",
            sandbox.quarantined()
        );
        let (_, queued_again) = daemon.queue().await;
        assert_eq!(queued_again, queued, "the queue after a restart");
        for (id, job) in &created {
            assert_eq!(&daemon.job(id).await, job, "GET {id} after a restart");
        }

        let statuses = target.statuses.lock().expect("not poisoned").clone();
        eprintln!(
            "{}: {} requests in {:.1?}, statuses {statuses:?}, {} jobs created, normal client {rounds} rounds; daemon VmRSS {} KiB, VmHWM {} KiB",
            name,
            target.requests.load(Ordering::Relaxed),
            started.elapsed(),
            created.len(),
            rss,
            hwm
        );
        assert!(
            hwm < MAX_HWM_KIB,
            "the daemon's peak memory {hwm} KiB is over {MAX_HWM_KIB} KiB"
        );
    }
}

fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|e| {
            e.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------

const DATASET_TYPES: [&str; 5] = [
    r#"{"system_prompt": "s", "field_instruction": "instruction", "field_output": "output", "field": null}"#,
    r#"{"field_prompt": "p", "field_chosen": "c", "field_rejected": "r", "prompt_format": "{prompt}"}"#,
    r#"{"field_prompt": "p", "reward_functions": [{"reward_func": "def f(c): return 1", "reward_weight": 0.5}], "extra_column": null}"#,
    r#"{"chat_template": "chatml", "chat_column": "conversations", "chat_role_field": "from"}"#,
    r#"{}"#,
];

/// A valid job, without a job_id.
fn valid_job(rng: &mut Rng) -> Value {
    if rng.chance(30) {
        let mut job = json!({
            "type": "DiffusionJob",
            "model": "stabilityai/sdxl",
            "dataset_zip": "https://example.com/images.zip",
        });
        if rng.chance(50) {
            job["model_type"] = json!(*rng.pick(&["sdxl", "flux"]));
        }
        job
    } else {
        json!({
            "type": "TextJob",
            "model": "Qwen/Qwen2.5-0.5B",
            "dataset": "train.json",
            "dataset_type": serde_json::from_str::<Value>(rng.pick::<&str>(&DATASET_TYPES)).expect("valid"),
            "file_format": *rng.pick(&["csv", "json", "hf", "s3"]),
            "expected_repo_name": if rng.chance(50) { json!("my-repo") } else { Value::Null },
        })
    }
}

const ODD_NUMBERS: [&str; 14] = [
    "0",
    "-0",
    "-0.0",
    "1e999",
    "-1e999",
    "1e-999",
    "123456789012345678901234567890",
    "-123456789012345678901234567890",
    "0.1e1",
    "1E+2",
    "3.141592653589793238462643383279",
    "18446744073709551616",
    "-1",
    "2.50",
];

const ODD_STRINGS: [&str; 22] = [
    "",
    " ",
    "TextJob",
    "DiffusionJob",
    "Queued",
    "Completed",
    "sdxl",
    "flux",
    "json",
    "../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e/%2e%2e/etc/passwd",
    "a\u{0}b",
    "..\\..\\windows\\system32",
    "/etc/passwd",
    "C:\\Windows\\win.ini",
    "file:///etc/passwd",
    "$(touch /tmp/tw-pwned)",
    "🚀\u{202e}",
    "null",
    "123e4567-e89b-12d3-a456-426614174000",
    "123E4567-E89B-12D3-A456-426614174000",
];

fn random_value(rng: &mut Rng, depth: usize) -> Value {
    let kinds = if depth >= 3 { 5 } else { 8 };
    match rng.below(kinds) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => serde_json::from_str(rng.pick::<&str>(&ODD_NUMBERS)).expect("a JSON number"),
        3 => json!(*rng.pick(&ODD_STRINGS)),
        4 => {
            let len = rng.below(40);
            json!(String::from_utf8_lossy(&rng.bytes(len)).into_owned())
        }
        5 => Value::Array(
            (0..rng.below(5))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        6 => {
            let mut object = Map::new();
            for _ in 0..rng.below(5) {
                let key = random_key(rng);
                object.insert(key, random_value(rng, depth + 1));
            }
            Value::Object(object)
        }
        _ => serde_json::from_str(rng.pick::<&str>(&DATASET_TYPES)).expect("valid"),
    }
}

const KEYS: [&str; 22] = [
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
    "started_at",
    "reward_functions",
    "field_chosen",
    "chat_template",
    "field_instruction",
    "reward_weight",
    "reward_func",
    "schema_version",
    "",
];

fn random_key(rng: &mut Rng) -> String {
    if rng.chance(70) {
        rng.pick(&KEYS).to_string()
    } else {
        format!("x_{}", rng.below(100))
    }
}

/// A job id for a submission: mostly from a small pool, so that resubmissions (200) and
/// conflicts (409) happen too.
fn job_id(rng: &mut Rng, pool: &[String]) -> Value {
    match rng.below(10) {
        0..=5 => json!(rng.pick(pool)),
        6 => json!(rng.pick(pool).to_uppercase()),
        7 => json!(rng.uuid()),
        8 => json!(*rng.pick(&ODD_STRINGS)),
        _ => random_value(rng, 2),
    }
}

/// A body for POST /v1/jobs: a valid job mutated at the value level, the byte level, or
/// both, or a random JSON value. `true` when it is a valid new job, which must get a 201.
fn hostile_body(rng: &mut Rng, pool: &[String]) -> (Vec<u8>, bool) {
    if rng.chance(5) {
        let value = random_value(rng, 0);
        return (serde_json::to_vec(&value).expect("serialises"), false);
    }
    let mut job = valid_job(rng);
    if rng.chance(8) {
        return (serde_json::to_vec(&job).expect("serialises"), true);
    }
    if rng.chance(40) {
        job["job_id"] = job_id(rng, pool);
    }
    for _ in 0..rng.between(0, 3) {
        let object = job.as_object_mut().expect("an object");
        match rng.below(6) {
            0 => {
                let keys: Vec<String> = object.keys().cloned().collect();
                if !keys.is_empty() {
                    object.shift_remove(rng.pick(&keys));
                }
            }
            1 | 2 => {
                let key = random_key(rng);
                let value = random_value(rng, 1);
                object.insert(key, value);
            }
            3 => {
                if let Some(Value::Object(dt)) = object.get_mut("dataset_type") {
                    let key = random_key(rng);
                    let value = random_value(rng, 2);
                    dt.insert(key, value);
                }
            }
            4 => {
                if let Some(Value::Array(fs)) = object
                    .get_mut("dataset_type")
                    .and_then(|d| d.get_mut("reward_functions"))
                {
                    fs.push(json!({"reward_func": random_value(rng, 2), "reward_weight": random_value(rng, 2)}));
                }
            }
            _ => {
                let status = *rng.pick(&["Queued", "Running", "Completed", "queued", ""]);
                object.insert("status".into(), json!(status));
            }
        }
    }
    let mut bytes = serde_json::to_vec(&job).expect("serialises");
    if rng.chance(35) {
        for _ in 0..rng.between(1, 3) {
            if bytes.is_empty() {
                break;
            }
            let at = rng.below(bytes.len());
            match rng.below(7) {
                0 => bytes[at] ^= 1 << rng.below(8),
                1 => bytes.insert(at, rng.next_u64() as u8),
                2 => {
                    bytes.remove(at);
                }
                3 => bytes.truncate(at),
                4 => {
                    let end = (at + rng.below(20)).min(bytes.len());
                    let slice = bytes[at..end].to_vec();
                    bytes.splice(at..at, slice);
                }
                5 => {
                    bytes.splice(at..at, [0xff, 0xc0, 0xaf]);
                }
                _ => {
                    bytes.splice(at..at, *b"\\ud800");
                }
            }
        }
    }
    (bytes, false)
}

const CONTENT_TYPES: [Option<&str>; 12] = [
    Some("application/json"),
    Some("application/json; charset=utf-8"),
    Some("Application/JSON"),
    Some("application/merge-patch+json"),
    None,
    Some("text/plain"),
    Some("application/x-www-form-urlencoded"),
    Some("multipart/form-data; boundary=x"),
    Some("application/jsonx"),
    Some("application/json, text/plain"),
    Some(""),
    Some("json"),
];

// ---------------------------------------------------------------------------------------
// The attacks
// ---------------------------------------------------------------------------------------

/// How many random bodies; a few thousand requests in all.
const RANDOM_BODIES: usize = 3000;
const SENDERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_mutated_bodies_get_an_error_or_a_valid_job() {
    let attack = Attack::begin("random and mutated bodies").await;
    let mut pool_rng = Rng::new(BASE_SEED);
    let pool: Arc<Vec<String>> = Arc::new((0..40).map(|_| pool_rng.uuid()).collect());
    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let target = attack.target.clone();
        let pool = pool.clone();
        senders.push(tokio::spawn(async move {
            for i in (sender..RANDOM_BODIES).step_by(SENDERS) {
                let seed = case_seed(BASE_SEED, i);
                let mut rng = Rng::new(seed);
                let (body, valid) = hostile_body(&mut rng, &pool);
                let content_type = if rng.chance(90) {
                    Some("application/json")
                } else {
                    *rng.pick(&CONTENT_TYPES)
                };
                let what = format!("body {i} (seed {seed:#x})");
                target.submit(&what, content_type, body, valid).await;
                if rng.chance(3) {
                    // Other methods and routes with a body.
                    let method = rng
                        .pick(&[Method::PUT, Method::DELETE, Method::PATCH, Method::GET])
                        .clone();
                    let path = *rng.pick(&[
                        "/v1/jobs",
                        "/v1/queue",
                        "/healthz",
                        "/v1/jobs/x/cancel",
                        "/",
                    ]);
                    let (body, _) = hostile_body(&mut rng, &pool);
                    target
                        .send(method, path, Some("application/json"), Some(body))
                        .await;
                }
            }
        }));
    }
    for sender in senders {
        sender.await.expect("a sender does not panic");
    }
    let created = attack.target.created.lock().expect("not poisoned").len();
    assert!(
        created > 100,
        "only {created} random bodies were valid jobs: the generator is off"
    );
    attack.finish().await;
}

const TRAVERSALS: [&str; 16] = [
    "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%2e%2e",
    "..",
    ".",
    "%00",
    "abc%00.json",
    "..%5C..%5Cetc%5Cpasswd",
    "..\\..\\etc\\passwd",
    "%2Fetc%2Fpasswd",
    "..%252F..%252Fetc%252Fpasswd",
    "%ff%fe",
    "123e4567-e89b-12d3-a456-426614174000%2F..%2F..%2Fqueue.json",
    "123e4567-e89b-12d3-a456-426614174000.json",
    "/etc/passwd",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_traversal_in_every_position_stays_inside_the_data_dir() {
    let attack = Attack::begin("path traversal").await;
    let target = attack.target.clone();
    let mut rng = Rng::new(BASE_SEED ^ 1);

    // The job id segment of every route, sent verbatim (an HTTP client would normalise).
    let mut segments: Vec<String> = TRAVERSALS.iter().map(|s| s.to_string()).collect();
    segments.push("a".repeat(10_000));
    segments.push(rng.uuid().to_uppercase());
    segments.push(format!("{}/../../../../etc/passwd", rng.uuid()));
    segments.push(format!("{}/..", rng.uuid()));
    for segment in &segments {
        for (method, suffix) in [
            ("GET", ""),
            ("GET", "/logs"),
            ("POST", "/cancel"),
            ("DELETE", ""),
        ] {
            let path = format!("/v1/jobs/{segment}{suffix}");
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let reply = raw(target.addr, request.as_bytes(), false, 1, secs(5)).await;
            judge_raw(&target, &path, &reply, false);
            for body in &reply.bodies {
                if find(body, b"root:").is_some() {
                    target.fail(format!("{method} {path} answered with /etc/passwd"));
                }
            }
        }
    }
    // Other request targets: above the root, absolute form, a backslash.
    for path in [
        "/../../../../etc/passwd",
        "/v1/../../etc/passwd",
        "/v1/jobs/..",
        "http://127.0.0.1/../../etc/passwd",
        "\\..\\..\\etc\\passwd",
        "/v1/jobs?status=../../etc/passwd",
        "/v1/jobs?status=Queued&limit=../../x",
        "/v1/jobs?status=%00",
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let reply = raw(target.addr, request.as_bytes(), false, 1, secs(5)).await;
        judge_raw(&target, path, &reply, false);
        for body in &reply.bodies {
            if find(body, b"root:").is_some() {
                target.fail(format!("GET {path} answered with /etc/passwd"));
            }
        }
    }

    // job_id: never a path.
    for bad in TRAVERSALS.iter().chain(&[
        "/tmp/x",
        "C:\\x",
        "a\u{0}b",
        "../123e4567-e89b-12d3-a456-426614174000",
    ]) {
        let mut job = valid_job(&mut rng);
        job["job_id"] = json!(bad);
        let what = format!("job_id {bad:?}");
        let body = serde_json::to_vec(&job).expect("serialises");
        let Some((status, _)) = target
            .send(
                Method::POST,
                "/v1/jobs",
                Some("application/json"),
                Some(body),
            )
            .await
        else {
            continue;
        };
        if status != StatusCode::BAD_REQUEST {
            target.fail(format!("{what}: {status}, expected 400"));
        }
    }

    // Strings that look like paths are data: stored exactly, naming no file.
    let hostile_strings: Vec<String> = TRAVERSALS
        .iter()
        .map(|s| s.to_string())
        .chain([
            "a\u{0}b".to_string(),
            "/tmp/tw-hostile-absolute".to_string(),
            "~/.ssh/id_rsa".to_string(),
            "$(touch tw-pwned)".to_string(),
            "`touch tw-pwned`".to_string(),
            format!("../{}", "../".repeat(200)),
        ])
        .collect();
    for s in &hostile_strings {
        for field in [
            "model",
            "dataset",
            "expected_repo_name",
            "dataset_zip",
            "dataset_type",
        ] {
            let mut job = if field == "dataset_zip" {
                json!({"type": "DiffusionJob", "model": "m", "dataset_zip": "z.zip"})
            } else {
                json!({"type": "TextJob", "model": "m", "dataset": "d.json", "dataset_type": {}, "file_format": "json"})
            };
            if field == "dataset_type" {
                job["dataset_type"] =
                    json!({"field_instruction": s, "chat_template": s, "x_path": s});
            } else {
                job[field] = json!(s);
            }
            // A NUL cannot reach a trainer as an argument or a variable, so it is refused;
            // inside dataset_type it is an escape in the JSON text the trainer gets, and kept.
            let valid = !s.trim().is_empty() && (field == "dataset_type" || !s.contains('\0'));
            let body = serde_json::to_vec(&job).expect("serialises");
            target
                .submit(
                    &format!("{field} = {s:?}"),
                    Some("application/json"),
                    body,
                    valid,
                )
                .await;
        }
        // The same strings raw in JSON text: a NUL byte unescaped is not JSON.
        let raw_body = format!(
            r#"{{"type": "DiffusionJob", "model": "m{}", "dataset_zip": "z"}}"#,
            s.replace('\\', "\\\\").replace('"', "\\\"")
        );
        target
            .submit(
                &format!("raw model {s:?}"),
                Some("application/json"),
                raw_body.into_bytes(),
                false,
            )
            .await;
    }
    // Logs of the jobs whose fields name paths: empty (nothing ran), never a file they name.
    let ids: Vec<String> = target
        .created
        .lock()
        .expect("not poisoned")
        .keys()
        .cloned()
        .collect();
    for id in ids.iter().take(40) {
        if let Some((status, body)) = target
            .send(Method::GET, &format!("/v1/jobs/{id}/logs"), None, None)
            .await
            && (status != StatusCode::OK || !body.is_empty())
        {
            target.fail(format!(
                "logs of {id}: {status} {:?}",
                String::from_utf8_lossy(&body)
            ));
        }
    }
    let pwned = ["tw-pwned", "tw-hostile-absolute"];
    for name in pwned {
        assert!(
            !attack.sandbox.path().join(name).exists(),
            "{name} was created"
        );
    }
    assert!(!Path::new("/tmp/tw-hostile-absolute").exists());
    attack.finish().await;
}

/// Judges a raw exchange: a 5xx is a failure; `must_answer` requires a response.
fn judge_raw(target: &Target, what: &str, reply: &RawReply, must_answer: bool) {
    for status in &reply.statuses {
        target.count(*status);
        if *status >= 500 {
            target.fail(format!(
                "{what:.200}: {status}: {:.300}",
                String::from_utf8_lossy(&reply.bytes)
            ));
        }
    }
    if reply.statuses.is_empty() {
        target.requests.fetch_add(1, Ordering::Relaxed);
        if must_answer || !reply.closed {
            target.fail(format!(
                "{what:.200}: no answer (closed: {}, got {:?})",
                reply.closed,
                String::from_utf8_lossy(&reply.bytes)
            ));
        }
    }
}

fn nested(depth: usize, open: &str, close: &str, inner: &str) -> String {
    format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_deep_and_odd_json_is_refused_or_kept_exactly() {
    let attack = Attack::begin("huge, deep and odd JSON").await;
    let target = attack.target.clone();
    let ct = Some("application/json");

    // Around the body limit: a valid job padded with a long unknown field (a model name that
    // long is refused: no trainer's environment could hold it).
    let padded = |total: usize| {
        let shell = r#"{"type": "DiffusionJob", "dataset_zip": "z", "model": "m", "pad": ""}"#;
        let pad = "p".repeat(total - shell.len());
        format!(r#"{{"type": "DiffusionJob", "dataset_zip": "z", "model": "m", "pad": "{pad}"}}"#)
            .into_bytes()
    };
    for total in [LIMIT - 1000, LIMIT - 1, LIMIT] {
        target
            .submit(&format!("a {total}-byte job"), ct, padded(total), true)
            .await;
    }
    for total in [LIMIT + 1, LIMIT + 1000, 4 * LIMIT] {
        target
            .submit(&format!("a {total}-byte job"), ct, padded(total), false)
            .await;
    }
    // Over the limit without a Content-Length (chunked), over raw TCP.
    let mut chunked = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..(2 * LIMIT / chunk.len()) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let reply = raw(target.addr, &chunked, false, 1, secs(10)).await;
    judge_raw(&target, "a 2 MiB chunked body", &reply, false);
    if reply.statuses.first().is_some_and(|s| *s != 413) {
        target.fail(format!(
            "a 2 MiB chunked body: {:?}, expected 413",
            reply.statuses
        ));
    }

    // Huge strings and arrays in unknown fields, just under the limit.
    let big_array = format!(
        r#"{{"type": "DiffusionJob", "model": "m", "dataset_zip": "z", "x": [{}0]}}"#,
        "0,".repeat((LIMIT - 200) / 2)
    );
    target
        .submit("an array of 500k numbers", ct, big_array.into_bytes(), true)
        .await;
    let objects = format!(
        r#"{{"type": "DiffusionJob", "model": "m", "dataset_zip": "z", "x": [{}{{}}]}}"#,
        "{},".repeat((LIMIT - 200) / 3)
    );
    target
        .submit("an array of 350k objects", ct, objects.into_bytes(), true)
        .await;
    let escapes = format!(
        r#"{{"type": "DiffusionJob", "model": "m", "dataset_zip": "z", "x": "{}"}}"#,
        "\\u0000".repeat((LIMIT - 200) / 6)
    );
    target
        .submit(
            "a string of 170k escaped NULs",
            ct,
            escapes.into_bytes(),
            true,
        )
        .await;
    // dataset_type reaches the trainer as one environment variable (DATASET_TYPE): 3k
    // reward functions fit in the kernel's 128 KiB per string, 25k do not and are refused.
    let reward_functions = |n: usize| {
        format!(
            r#"{{"type": "TextJob", "model": "m", "dataset": "d", "file_format": "csv", "dataset_type": {{"reward_functions": [{}{{"reward_func": "f", "reward_weight": 1}}]}}}}"#,
            r#"{"reward_func": "f", "reward_weight": 1},"#.repeat(n)
        )
    };
    target
        .submit(
            "3k reward functions",
            ct,
            reward_functions(3_000).into_bytes(),
            true,
        )
        .await;
    target
        .submit(
            "25k reward functions",
            ct,
            reward_functions((LIMIT - 300) / 41).into_bytes(),
            false,
        )
        .await;

    // Deep nesting: 10k levels is refused, whatever the brackets; shallow nesting is kept
    // and must survive the restart at the end (replay parses what was accepted).
    for (open, close) in [("[", "]"), (r#"{"a":"#, "}")] {
        let deep = nested(10_000, open, close, "1");
        target
            .submit(
                "10k levels, top level",
                ct,
                deep.clone().into_bytes(),
                false,
            )
            .await;
        let body =
            format!(r#"{{"type": "DiffusionJob", "model": "m", "dataset_zip": "z", "x": {deep}}}"#);
        target
            .submit("10k levels in a field", ct, body.into_bytes(), false)
            .await;
        for depth in [64, 120, 125, 126, 127, 128, 129, 130] {
            let body = format!(
                r#"{{"type": "DiffusionJob", "model": "m", "dataset_zip": "z", "x": {}}}"#,
                nested(depth, open, close, "1")
            );
            target
                .submit(
                    &format!("{depth} levels in a field"),
                    ct,
                    body.into_bytes(),
                    false,
                )
                .await;
        }
    }

    // Invalid UTF-8 and other things that are not JSON text.
    for (what, bytes) in [
        (
            "0xff in a string",
            br#"{"type": "DiffusionJob", "model": "m\xff", "dataset_zip": "z"}"#.to_vec(),
        ),
        (
            "an overlong encoding",
            b"{\"type\": \"DiffusionJob\", \"model\": \"m\xc0\xaf\", \"dataset_zip\": \"z\"}"
                .to_vec(),
        ),
        (
            "a lone surrogate",
            br#"{"type": "DiffusionJob", "model": "m\ud800", "dataset_zip": "z"}"#.to_vec(),
        ),
        (
            "a UTF-8 BOM",
            b"\xef\xbb\xbf{\"type\": \"DiffusionJob\", \"model\": \"m\", \"dataset_zip\": \"z\"}"
                .to_vec(),
        ),
        (
            "UTF-16",
            "{\"type\": \"DiffusionJob\"}"
                .encode_utf16()
                .flat_map(|u| u.to_le_bytes())
                .collect(),
        ),
        (
            "a raw NUL in a string",
            b"{\"type\": \"DiffusionJob\", \"model\": \"m\0\", \"dataset_zip\": \"z\"}".to_vec(),
        ),
        (
            "NaN",
            br#"{"type": "DiffusionJob", "model": "m", "dataset_zip": "z", "x": NaN}"#.to_vec(),
        ),
        ("empty", Vec::new()),
        ("whitespace", b"   \n\t ".to_vec()),
        (
            "two objects",
            br#"{"type": "DiffusionJob", "model": "m", "dataset_zip": "z"}{}"#.to_vec(),
        ),
    ] {
        target.submit(what, ct, bytes, false).await;
    }

    // Odd numbers are kept with their spelling where unknown, judged where known.
    for number in ODD_NUMBERS {
        let body = format!(
            r#"{{"type": "DiffusionJob", "model": "m", "dataset_zip": "z", "n": {number}, "attempts": {number}}}"#
        );
        target
            .submit(&format!("number {number}"), ct, body.into_bytes(), true)
            .await;
        let body = format!(
            r#"{{"type": "TextJob", "model": "m", "dataset": "d", "file_format": "csv", "dataset_type": {{"reward_functions": [{{"reward_func": "f", "reward_weight": {number}}}]}}}}"#
        );
        target
            .submit(
                &format!("reward_weight {number}"),
                ct,
                body.into_bytes(),
                false,
            )
            .await;
        let body = format!(r#"{{"type": "DiffusionJob", "model": {number}, "dataset_zip": "z"}}"#);
        target
            .submit(&format!("model {number}"), ct, body.into_bytes(), false)
            .await;
    }
    // Numbers are not converted to floating point: each comes back with its spelling
    // (serde_json writes an exponent as `e+N`, the one normalisation allowed).
    let created = target.created.lock().expect("not poisoned").clone();
    let mut spellings = BTreeSet::new();
    for job in created.values() {
        let Some(n) = job.get("n") else {
            continue;
        };
        let text = n.to_string();
        let kept = ODD_NUMBERS.iter().any(|x| {
            *x == text
                || (x.contains(['e', 'E'])
                    && x.to_lowercase()
                        .replace("e+", "e")
                        .replace('e', "e+")
                        .replace("e+-", "e-")
                        == text)
        });
        if !kept {
            target.fail(format!("number {text} is not a spelling that was sent"));
        }
        spellings.insert(text);
    }
    if spellings.len() != ODD_NUMBERS.len() {
        target.fail(format!(
            "{} numbers sent, {} spellings kept: {spellings:?}",
            ODD_NUMBERS.len(),
            spellings.len()
        ));
    }
    eprintln!("numbers as stored: {spellings:?}");

    // Duplicate keys: the last one counts, consistently, and the file is named by the id
    // the job holds.
    let (a, b) = (Rng::new(3).uuid(), Rng::new(4).uuid());
    for body in [
        format!(r#"{{"type": "TextJob", "type": "DiffusionJob", "model": "m", "dataset_zip": "z", "job_id": "{a}", "job_id": "{b}"}}"#),
        r#"{"type": "DiffusionJob", "model": "", "model": "m", "dataset_zip": "z"}"#.to_string(),
        r#"{"type": "DiffusionJob", "model": "m", "dataset_zip": "z", "status": "Queued", "status": "Completed"}"#.to_string(),
    ] {
        target.submit("duplicate keys", ct, body.into_bytes(), false).await;
    }
    if let Some((status, _)) = target
        .send(Method::GET, &format!("/v1/jobs/{a}"), None, None)
        .await
        && status != StatusCode::NOT_FOUND
    {
        target.fail(format!(
            "job {a}, overridden by a later job_id key, answers {status}"
        ));
    }

    // Content types.
    for content_type in CONTENT_TYPES {
        let body =
            serde_json::to_vec(&json!({"type": "DiffusionJob", "model": "m", "dataset_zip": "z"}))
                .expect("serialises");
        let json_type = matches!(
            content_type,
            Some(
                "application/json"
                    | "application/json; charset=utf-8"
                    | "Application/JSON"
                    | "application/merge-patch+json"
            )
        );
        target
            .submit(
                &format!("content type {content_type:?}"),
                content_type,
                body,
                json_type,
            )
            .await;
    }
    attack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_slow_half_closed_and_idle_connections_do_not_disturb_service() {
    let attack = Attack::begin("malformed, slow, half-closed and idle connections").await;
    let target = attack.target.clone();
    let addr = target.addr;
    let job = br#"{"type": "DiffusionJob", "model": "slow", "dataset_zip": "z"}"#;

    // Malformed requests, each complete: the daemon answers (4xx) or closes, promptly.
    let long_header = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let many_headers = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..5000)
            .map(|i| format!("X-{i}: {i}\r\n"))
            .collect::<String>()
    );
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"GARBAGE\r\n\r\n".to_vec()),
        ("binary", vec![0xff, 0x00, 0xfe, 0x0d, 0x0a, 0x0d, 0x0a]),
        ("no Host", b"GET /healthz HTTP/1.1\r\n\r\n".to_vec()),
        ("HTTP/1.0", b"GET /healthz HTTP/1.0\r\n\r\n".to_vec()),
        ("header without a colon", b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n".to_vec()),
        ("a 200 KB header", long_header.into_bytes()),
        ("5000 headers", many_headers.into_bytes()),
        ("a 100 KB URI", long_uri.into_bytes()),
        ("Content-Length -1", b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: -1\r\n\r\n".to_vec()),
        ("Content-Length abc", b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec()),
        ("two Content-Lengths", b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}".to_vec()),
        ("huge Content-Length", b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_vec()),
        ("bad chunk size", b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_vec()),
        ("Content-Length and chunked", b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()),
        ("NUL in the target", b"GET /v1/jobs/\0 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("invalid UTF-8 in the target", b"GET /v1/jobs/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("invalid UTF-8 content type", b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\xff\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_vec()),
        ("lowercase method", b"get /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("unknown method", b"BREW /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()),
        ("CONNECT", b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n".to_vec()),
        ("asterisk form", b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()),
        ("absolute form", b"GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()),
        ("h2c upgrade", b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".to_vec()),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
        ("bare LF line ends", b"GET /healthz HTTP/1.1\nHost: x\nConnection: close\n\n".to_vec()),
        ("Expect: 100-continue", b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]".to_vec()),
        ("bad Authorization", b"GET /v1/queue HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n".to_vec()),
    ];
    let mut unsupported_version = Vec::new();
    for (what, request) in &cases {
        let reply = raw(addr, request, false, 1, secs(5)).await;
        judge_raw(&target, what, &reply, false);
        if reply.statuses.is_empty() && !reply.closed {
            target.fail(format!("{what}: neither answered nor closed within 5 s"));
        }
    }
    // An unknown HTTP version: 505 is the protocol's answer, not a fault; anything else
    // below 500 is fine too.
    for version in ["HTTP/9.9", "HTTP/1.2", "HTTP/0.9", "FOO/1.1"] {
        let request = format!("GET /healthz {version}\r\nHost: x\r\n\r\n");
        let reply = raw(addr, request.as_bytes(), false, 1, secs(5)).await;
        let statuses: Vec<u16> = reply
            .statuses
            .iter()
            .copied()
            .filter(|s| *s != 505)
            .collect();
        unsupported_version.push((version, reply.statuses.clone()));
        judge_raw(
            &target,
            &format!("version {version}"),
            &RawReply { statuses, ..reply },
            false,
        );
    }
    eprintln!("unknown HTTP versions answered: {unsupported_version:?}");

    // Pipelined requests on one connection are answered in order.
    let pipelined = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/jobs/x HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let reply = raw(addr, pipelined, false, 3, secs(5)).await;
    judge_raw(&target, "pipelined", &reply, true);
    if reply.statuses != [200, 400, 404] {
        target.fail(format!("pipelined requests answered {:?}", reply.statuses));
    }

    // Half-closed: a partial request, then shutdown(Write). An answer or a close, promptly.
    let partial_body = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        job.len()
    )
    .into_bytes()
    .into_iter()
    .chain(job[..job.len() / 2].iter().copied())
    .collect::<Vec<u8>>();
    for (what, request) in [
        ("half a request line", b"GET /heal".to_vec()),
        ("headers without their end", b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec()),
        ("half a body", partial_body),
        ("a chunked body cut short", b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"type\"".to_vec()),
        ("a whole request", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
    ] {
        let reply = raw(addr, &request, true, 1, secs(5)).await;
        judge_raw(&target, &format!("half-closed after {what}"), &reply, false);
        if reply.statuses.is_empty() && !reply.closed {
            target.fail(format!("half-closed after {what}: neither answered nor closed within 5 s"));
        }
        if what == "a whole request" {
            eprintln!("a whole request, then shutdown(Write): answered {:?}, closed {}", reply.statuses, reply.closed);
        }
    }

    // 200 idle connections (half of them with a partial request) held open while the normal
    // client keeps working, plus slow clients sending a valid job a byte at a time.
    let fds_before = open_fds(attack.daemon.pid());
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut stream = TcpStream::connect(addr)
            .await
            .expect("connect an idle client");
        if i % 2 == 1 {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHo")
                .await
                .expect("write a partial request");
        }
        idle.push(stream);
    }
    let slow_for = Duration::from_millis(2500);
    let mut slow = Vec::new();
    for i in 0..10 {
        let target = target.clone();
        slow.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(target.addr).await.expect("connect a slow client");
            let head = format!(
                "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                job.len()
            );
            // Half of them dribble the headers too.
            let (fast, dribbled): (&[u8], Vec<u8>) = if i % 2 == 0 {
                (head.as_bytes(), job.to_vec())
            } else {
                (b"", [head.as_bytes(), job].concat())
            };
            stream.write_all(fast).await.expect("write the headers");
            let pause = slow_for / dribbled.len() as u32;
            let mut pace = tokio::time::interval(pause);
            for byte in &dribbled {
                pace.tick().await;
                if stream.write_all(&[*byte]).await.is_err() {
                    return Err(format!("slow client {i}: the daemon closed the connection mid-body"));
                }
            }
            let reply = read_replies(&mut stream, 1, secs(10)).await;
            judge_raw(&target, &format!("slow client {i}"), &reply, true);
            match (reply.statuses.first(), reply.bodies.first()) {
                (Some(201), Some(body)) => {
                    let job: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
                    let id = job["job_id"].as_str().unwrap_or("").to_string();
                    target.created.lock().expect("not poisoned").insert(id, job);
                    Ok(())
                }
                _ => Err(format!("slow client {i}: {:?}", String::from_utf8_lossy(&reply.bytes))),
            }
        }));
    }
    // While all that is open, a fresh connection is served promptly, again and again.
    let probe_until = Instant::now() + slow_for;
    let mut probes = 0;
    while Instant::now() < probe_until {
        let asked = Instant::now();
        let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let reply = raw(addr, request, false, 1, NORMAL_LATENCY).await;
        if reply.statuses != [200] {
            target.fail(format!(
                "healthz with 200 idle connections open: {:?} after {:?}",
                reply.statuses,
                asked.elapsed()
            ));
        }
        probes += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for task in slow {
        if let Err(e) = task.await.expect("a slow client does not panic") {
            target.fail(e);
        }
    }
    // The idle clients are still connected (or were dropped by a timeout, which is fine);
    // a partial request, completed now, is answered.
    let mut finished = 0;
    for stream in idle.iter_mut().skip(1).step_by(2).take(20) {
        if stream
            .write_all(b"st: x\r\nConnection: close\r\n\r\n")
            .await
            .is_ok()
        {
            let reply = read_replies(stream, 1, secs(5)).await;
            if reply.statuses == [200] {
                finished += 1;
            }
        }
    }
    drop(idle);
    eprintln!(
        "{probes} probes served while 200 idle connections were open; {finished}/20 idle partial requests completed later"
    );
    // The connections' descriptors are released.
    let pid = attack.daemon.pid();
    wait_until(
        format_args!("the daemon's open descriptors fall back to about {fds_before}"),
        secs(10),
        async || (open_fds(pid) <= fds_before + 20).then_some(()),
    )
    .await;
    attack.finish().await;
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}
