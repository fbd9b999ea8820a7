//! What the PostgreSQL and cluster benches share: a daemon to start and stop, the enqueue
//! rate through one or several daemons, the same database's bare INSERT loop, and the
//! submit-to-start latency.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::support::job_body;

pub const CLIENTS: usize = 64;

pub fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub struct Daemon {
    pub child: Child,
    pub base: String,
}

impl Daemon {
    /// The daemon on `data_dir` with `store` as its `[store]` section and `worker` as its
    /// `[worker]` section; a trainer that exits at once.
    pub fn spawn(data_dir: &Path, store: &str, worker: &str) -> Daemon {
        Daemon::with_config(
            data_dir,
            &format!("[store]\n{store}\n[worker]\n{worker}\n[executor]\ncommand = [\"true\"]\n"),
        )
    }

    /// The daemon on `data_dir` with `config` as its whole configuration file.
    pub fn with_config(data_dir: &Path, config_text: &str) -> Daemon {
        std::fs::create_dir_all(data_dir).expect("the data dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = data_dir.with_extension("toml");
        std::fs::write(&config, config_text).expect("write the config");
        let child = Command::new(env!("CARGO_BIN_EXE_training-worker"))
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .expect("start the daemon");
        Daemon {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    pub async fn ready(&self, http: &reqwest::Client) {
        let since = Instant::now();
        loop {
            let answer = http.get(format!("{}/readyz", self.base)).send().await;
            if answer.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(
                since.elapsed() < Duration::from_secs(120),
                "the daemon never became ready"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn stop(mut self) {
        // SAFETY: kill only sends a signal.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait().expect("wait for the daemon");
        assert!(status.success(), "the daemon exited with {status}");
    }
}

/// The runs, jobs per enqueue measurement and starts for the latency that
/// `TW_BENCH_RUNS`, `TW_BENCH_JOBS` and `TW_BENCH_STARTS` ask for (3, 5,000, 200).
pub fn sizes() -> (usize, usize, usize) {
    (
        setting("TW_BENCH_RUNS", 3).max(1),
        setting("TW_BENCH_JOBS", 5000).max(CLIENTS),
        setting("TW_BENCH_STARTS", 200).max(2),
    )
}

/// The bench's HTTP client: no proxy, a connection kept per client.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .expect("a client")
}

/// Submits the `n`th job to the daemon at `base` and checks its `201`; the answer, unread
/// (the enqueue rate does not pay for parsing it).
pub async fn submit(http: &reqwest::Client, base: &str, n: usize) -> reqwest::Response {
    let reply = http
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "application/json")
        .body(job_body(n))
        .send()
        .await
        .expect("submit");
    assert_eq!(reply.status(), 201, "submission {n}");
    reply
}

/// Jobs per second: `jobs` submissions from [`CLIENTS`] clients at once, spread over the
/// daemons at `bases` (client `i` talks to `bases[i % len]`).
pub async fn enqueue_rate(http: &reqwest::Client, bases: &[&str], jobs: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let base = bases[i % bases.len()].to_string();
            let (http, next) = (http.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= jobs {
                        return;
                    }
                    submit(&http, &base, n).await;
                }
            })
        })
        .collect();
    for client in clients {
        client.await.expect("a client");
    }
    jobs as f64 / began.elapsed().as_secs_f64()
}

/// Rows per second: `rows` single-row INSERTs, each its own transaction, from [`CLIENTS`]
/// connections at once.
pub async fn insert_loop_rate(url: &str, rows: usize) -> f64 {
    let (setup, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    setup
        .batch_execute(
            "DROP TABLE IF EXISTS bench_rows; \
             CREATE TABLE bench_rows (id uuid PRIMARY KEY, body json NOT NULL)",
        )
        .await
        .expect("the table");
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        clients.push(client);
    }
    let began = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| {
            let next = next.clone();
            tokio::spawn(async move {
                let insert = client
                    .prepare("INSERT INTO bench_rows (id, body) VALUES ($1, $2::text::json)")
                    .await
                    .expect("prepare");
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= rows {
                        return;
                    }
                    client
                        .execute(&insert, &[&uuid::Uuid::new_v4(), &job_body(n)])
                        .await
                        .expect("insert");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a client");
    }
    rows as f64 / began.elapsed().as_secs_f64()
}

/// Submit-to-start latency, in milliseconds (p50, p99): one job at a time on an idle daemon,
/// each waited for until it has completed.
pub async fn start_latency(http: &reqwest::Client, base: &str, starts: usize) -> (f64, f64) {
    let mut samples = Vec::with_capacity(starts);
    for n in 0..starts {
        let job: Value = submit(http, base, n).await.json().await.expect("the job");
        let id = job["job_id"].as_str().expect("an id").to_string();
        let done = loop {
            let job: Value = http
                .get(format!("{base}/v1/jobs/{id}"))
                .send()
                .await
                .expect("get")
                .json()
                .await
                .expect("the job");
            if job["status"] == "Completed" {
                break job;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let at = |field: &str| {
            chrono::DateTime::parse_from_rfc3339(done[field].as_str().expect("a time"))
                .expect("RFC 3339")
        };
        samples.push((at("started_at") - at("created_at")).as_seconds_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    let pick = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    (pick(0.5), pick(0.99))
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}
