//! The PostgreSQL store against its yardstick, on a throwaway PostgreSQL server of the
//! bench's own (the test suite's, `tests/e2e_support/pg.rs`; skipped with one line where no
//! server binaries are installed):
//!
//! - durable enqueue over HTTP, 64 clients, a daemon on `[store] kind = "postgres"` with the
//!   worker paused; beside it the same daemon on the file store;
//! - the yardstick: the same database's bare single-row `INSERT` and `COMMIT` loop (one
//!   autocommitted statement each) from as many connections, each row the size of a job;
//! - the daemon's CPU ceiling: the file store on tmpfs (`TW_BENCH_TMPFS`, default
//!   `/dev/shm`), where a flush costs nothing, so what is left is HTTP, JSON and the worker;
//! - submit-to-start latency on an idle daemon (one job at a time, `started_at` minus
//!   `created_at`, both the daemon's clock), p50 and p99, on both stores.
//!
//! Each figure is the median of `TW_BENCH_RUNS` runs (default 3), and the ratios are taken
//! within one run. `TW_BENCH_JOBS` jobs per enqueue measurement (default 5000),
//! `TW_BENCH_STARTS` starts for the latency (default 200). Run with
//! `cargo bench --bench postgres`.

#[allow(dead_code)]
#[path = "../tests/e2e_support/pg.rs"]
mod pg;

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::job_body;

const CLIENTS: usize = 64;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Daemon {
    child: Child,
    base: String,
}

impl Daemon {
    /// The daemon on `data_dir` with `store` as its `[store]` section and `worker` as its
    /// `[worker]` section; a trainer that exits at once.
    fn spawn(data_dir: &Path, store: &str, worker: &str) -> Daemon {
        std::fs::create_dir_all(data_dir).expect("the data dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = data_dir.with_extension("toml");
        std::fs::write(
            &config,
            format!("[store]\n{store}\n[worker]\n{worker}\n[executor]\ncommand = [\"true\"]\n"),
        )
        .expect("write the config");
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

    async fn ready(&self, http: &reqwest::Client) {
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

    fn stop(mut self) {
        // SAFETY: kill only sends a signal.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait().expect("wait for the daemon");
        assert!(status.success(), "the daemon exited with {status}");
    }
}

/// Jobs per second: `jobs` submissions from [`CLIENTS`] clients at once.
async fn enqueue_rate(http: &reqwest::Client, base: &str, jobs: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (http, base, next) = (http.clone(), base.to_string(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= jobs {
                        return;
                    }
                    let reply = http
                        .post(format!("{base}/v1/jobs"))
                        .header("content-type", "application/json")
                        .body(job_body(n))
                        .send()
                        .await
                        .expect("submit");
                    assert_eq!(reply.status(), 201, "submission {n}");
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
async fn insert_loop_rate(url: &str, rows: usize) -> f64 {
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
async fn start_latency(http: &reqwest::Client, base: &str, starts: usize) -> (f64, f64) {
    let mut samples = Vec::with_capacity(starts);
    for n in 0..starts {
        let reply = http
            .post(format!("{base}/v1/jobs"))
            .header("content-type", "application/json")
            .body(job_body(n))
            .send()
            .await
            .expect("submit");
        assert_eq!(reply.status(), 201);
        let job: Value = reply.json().await.expect("the job");
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

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        // `cargo test --benches` asks for a list; this bench has no tests.
        return;
    }
    let Some(server) = pg::Postgres::start() else {
        eprintln!("SKIPPED the PostgreSQL bench: no PostgreSQL server binaries are installed");
        return;
    };
    let runs = setting("TW_BENCH_RUNS", 3).max(1);
    let jobs = setting("TW_BENCH_JOBS", 5000).max(CLIENTS);
    let starts = setting("TW_BENCH_STARTS", 200).max(2);
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .expect("a client");
    let root = tempfile::Builder::new()
        .prefix("tw-bench-pg-")
        .tempdir()
        .expect("a temp dir");
    let tmpfs_dir = std::env::var("TW_BENCH_TMPFS").unwrap_or_else(|_| "/dev/shm".into());
    let tmpfs = tempfile::Builder::new()
        .prefix("tw-bench-pg-")
        .tempdir_in(&tmpfs_dir)
        .ok();

    let (mut pg_rates, mut loop_rates, mut file_rates, mut ratios, mut file_ratios) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut pg_lat, mut file_lat) = (Vec::new(), Vec::new());
    let (mut ceilings, mut ceiling_ratios) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let url = server.database();
        let store = format!("kind = \"postgres\"\nurl = \"{url}\"");
        let daemon = Daemon::spawn(
            &root.path().join(format!("pg-{run}")),
            &store,
            "max_concurrent = 0",
        );
        daemon.ready(&http).await;
        let pg_rate = enqueue_rate(&http, &daemon.base, jobs).await;
        daemon.stop();

        let loop_rate = insert_loop_rate(&server.database(), jobs).await;

        let daemon = Daemon::spawn(
            &root.path().join(format!("files-{run}")),
            "kind = \"files\"",
            "max_concurrent = 0",
        );
        daemon.ready(&http).await;
        let file_rate = enqueue_rate(&http, &daemon.base, jobs).await;
        daemon.stop();

        let ceiling = match &tmpfs {
            Some(tmpfs) => {
                let daemon = Daemon::spawn(
                    &tmpfs.path().join(format!("files-{run}")),
                    "kind = \"files\"",
                    "max_concurrent = 0",
                );
                daemon.ready(&http).await;
                let rate = enqueue_rate(&http, &daemon.base, jobs).await;
                daemon.stop();
                rate
            }
            None => f64::NAN,
        };

        let daemon = Daemon::spawn(
            &root.path().join(format!("pg-idle-{run}")),
            &format!("kind = \"postgres\"\nurl = \"{}\"", server.database()),
            "max_concurrent = 1",
        );
        daemon.ready(&http).await;
        pg_lat.push(start_latency(&http, &daemon.base, starts).await);
        daemon.stop();
        let daemon = Daemon::spawn(
            &root.path().join(format!("files-idle-{run}")),
            "kind = \"files\"",
            "max_concurrent = 1",
        );
        daemon.ready(&http).await;
        file_lat.push(start_latency(&http, &daemon.base, starts).await);
        daemon.stop();

        println!(
            "run {}: postgres {pg_rate:.0} jobs/s, insert loop {loop_rate:.0} rows/s ({:.2}x), CPU ceiling {ceiling:.0} jobs/s ({:.2}x), files {file_rate:.0} jobs/s ({:.2}x postgres); start p50/p99 postgres {:.1}/{:.1} ms, files {:.1}/{:.1} ms",
            run + 1,
            pg_rate / loop_rate,
            pg_rate / ceiling,
            file_rate / pg_rate,
            pg_lat[run].0,
            pg_lat[run].1,
            file_lat[run].0,
            file_lat[run].1,
        );
        ceilings.push(ceiling);
        ceiling_ratios.push(pg_rate / ceiling);
        pg_rates.push(pg_rate);
        loop_rates.push(loop_rate);
        file_rates.push(file_rate);
        ratios.push(pg_rate / loop_rate);
        file_ratios.push(file_rate / pg_rate);
    }
    let column = |values: &[(f64, f64)], first: bool| -> Vec<f64> {
        values
            .iter()
            .map(|(a, b)| if first { *a } else { *b })
            .collect()
    };
    println!();
    println!("| measure ({runs} runs, medians) | value |");
    println!("|---|---|");
    println!(
        "| durable enqueue, PostgreSQL store, {CLIENTS} clients | {:.0} jobs/s |",
        median(&pg_rates)
    );
    println!(
        "| bare single-row INSERT + COMMIT loop, {CLIENTS} connections | {:.0} rows/s |",
        median(&loop_rates)
    );
    println!(
        "| PostgreSQL store / insert loop (ratio per run) | {:.2}x |",
        median(&ratios)
    );
    println!(
        "| the daemon's CPU ceiling: file store on tmpfs, {CLIENTS} clients | {:.0} jobs/s |",
        median(&ceilings)
    );
    println!(
        "| PostgreSQL store / CPU ceiling (ratio per run) | {:.2}x |",
        median(&ceiling_ratios)
    );
    println!(
        "| durable enqueue, file store, {CLIENTS} clients | {:.0} jobs/s |",
        median(&file_rates)
    );
    println!(
        "| file store / PostgreSQL store (ratio per run) | {:.2}x |",
        median(&file_ratios)
    );
    println!(
        "| submit-to-start p50 / p99, PostgreSQL store | {:.1} / {:.1} ms |",
        median(&column(&pg_lat, true)),
        median(&column(&pg_lat, false))
    );
    println!(
        "| submit-to-start p50 / p99, file store | {:.1} / {:.1} ms |",
        median(&column(&file_lat, true)),
        median(&column(&file_lat, false))
    );
}
