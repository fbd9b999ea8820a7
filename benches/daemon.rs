//! Measures the release daemon end to end: durable enqueue over HTTP, and boot (replay)
//! of the data dir that the enqueue left.
//!
//! `cargo bench --bench daemon` (settings: TW_BENCH_JOBS, default 5000; TW_BENCH_CLIENTS,
//! default 64; TW_BENCH_RUNS, default 5). Each run starts the daemon on a fresh temporary
//! data dir with the worker paused, submits the jobs from the concurrent clients (every 201
//! is a durable job), measures a single client's enqueue latency, then stops the daemon with
//! SIGTERM and times a restart until `/readyz` answers 200. Medians over the runs are printed.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local address")
        .port()
}

struct Daemon {
    child: Child,
    base: String,
}

impl Daemon {
    fn start(dir: &Path, port: u16) -> Daemon {
        let config = dir.join("bench.toml");
        std::fs::write(
            &config,
            "[worker]\nmax_concurrent = 0\n[executor]\ncommand = [\"true\"]\n",
        )
        .expect("write config");
        let child = Command::new(env!("CARGO_BIN_EXE_training-worker"))
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.join("data"))
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

    /// Time from now until /readyz answers 200.
    async fn ready(&self, http: &reqwest::Client) -> Duration {
        let started = Instant::now();
        loop {
            let answer = http.get(format!("{}/readyz", self.base)).send().await;
            if answer.is_ok_and(|r| r.status() == 200) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "daemon never became ready"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn stop(mut self) {
        // SAFETY: kill only sends a signal.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait().expect("wait for the daemon");
        assert!(status.success(), "daemon exited with {status}");
    }
}

fn job_body(n: usize) -> String {
    format!(
        r#"{{"type":"TextJob","model":"mistralai/Mistral-7B-v0.1","dataset":"dataset-{n}.json","dataset_type":{{"system_prompt":"You are a helpful assistant.","field_instruction":"instruction","field_input":"input","field_output":"output"}},"file_format":"json","expected_repo_name":"repo-{n}"}}"#
    )
}

async fn submit(http: &reqwest::Client, base: &str, n: usize) {
    let r = http
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "application/json")
        .body(job_body(n))
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 201, "submission {n}");
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let i = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[i]
}

#[tokio::main]
async fn main() {
    let jobs = setting("TW_BENCH_JOBS", 5000);
    let clients = setting("TW_BENCH_CLIENTS", 64).max(1);
    let runs = setting("TW_BENCH_RUNS", 5).max(1);
    let latency_jobs = 300;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .expect("http client");

    let mut rates = Vec::new();
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut boots = Vec::new();
    let mut empty_boots = Vec::new();
    for run in 1..=runs {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let daemon = Daemon::start(dir.path(), port);
        empty_boots.push(daemon.ready(&http).await.as_secs_f64() * 1000.0);

        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let http = http.clone();
            let base = daemon.base.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = c;
                while n < jobs {
                    submit(&http, &base, n).await;
                    n += clients;
                }
            }));
        }
        for t in tasks {
            t.await.expect("client task");
        }
        let rate = jobs as f64 / started.elapsed().as_secs_f64();
        rates.push(rate);

        let mut latencies = Vec::new();
        for n in 0..latency_jobs {
            let t = Instant::now();
            submit(&http, &daemon.base, jobs + n).await;
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let p50 = percentile(&mut latencies, 0.5);
        let p99 = percentile(&mut latencies, 0.99);
        p50s.push(p50);
        p99s.push(p99);
        daemon.stop();

        let total = jobs + latency_jobs;
        let daemon = Daemon::start(dir.path(), port);
        let boot = daemon.ready(&http).await.as_secs_f64() * 1000.0;
        boots.push(boot);
        daemon.stop();
        println!(
            "run {run}: enqueue {rate:.0} jobs/s ({clients} clients), 1-client p50 {p50:.2} ms p99 {p99:.2} ms, boot with {total} jobs {boot:.0} ms"
        );
    }

    println!();
    println!("| measure ({runs} runs, median) | value |");
    println!("|---|---|");
    println!(
        "| durable enqueue, {clients} clients, {jobs} jobs | {:.0} jobs/s |",
        median(&mut rates)
    );
    println!(
        "| enqueue latency, 1 client, p50 | {:.2} ms |",
        median(&mut p50s)
    );
    println!(
        "| enqueue latency, 1 client, p99 | {:.2} ms |",
        median(&mut p99s)
    );
    println!(
        "| boot of an empty data dir until /readyz | {:.0} ms |",
        median(&mut empty_boots)
    );
    println!(
        "| boot with {} jobs until /readyz | {:.0} ms |",
        jobs + latency_jobs,
        median(&mut boots)
    );
}
