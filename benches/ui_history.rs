//! The dashboard's history page with 100,000 finished jobs: how long one page takes.
//!
//! `cargo bench --bench ui_history` writes `TW_BENCH_HISTORY_JOBS` (100,000) finished job
//! files, boots the store and the worker on them in-process (as tests/app_support does), and
//! asks the router for history pages, printing p50 and p99 of:
//!
//! - `warm`: the first page, no change in between (the job list of this change is reused);
//! - `filtered`: status, type, model and time filters with an id prefix, no change between;
//! - `deep`: the 1,000th page;
//! - `after a change`: the first page right after a job was submitted, so the job list is
//!   taken from the worker again (what a page costs while jobs are moving).

use std::path::Path;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::json;
use training_worker::config::WorkerConfig;
use training_worker::job::{Job, JobId, Status};

#[allow(dead_code)]
#[path = "../tests/app_support/mod.rs"]
mod app_support;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes `count` finished jobs (a mix of statuses, types and models, finished over the
/// last two days) as job files, the way the store writes them.
fn write_jobs(data: &Path, count: usize) {
    let jobs_dir = data.join("jobs");
    std::fs::create_dir_all(&jobs_dir).expect("the jobs dir");
    let now = chrono::Utc::now();
    for n in 0..count {
        let body = if n % 3 == 0 {
            json!({"type": "DiffusionJob", "model": format!("sdxl-{}", n % 7), "dataset_zip": "z.zip"})
        } else {
            json!({"type": "TextJob", "model": format!("mistral-{}", n % 11), "dataset": "d.json",
                   "dataset_type": {"field_instruction": "instruction"}, "file_format": "json"})
        };
        let created =
            now - chrono::Duration::seconds((2 * 86_400 * (count - n) / count) as i64 + 60);
        let mut job = Job::from_submission(body, created).expect("a valid job");
        job.id = JobId::from_uuid(uuid::Uuid::from_u128(n as u128 * 7919 + 1));
        job.status = [
            Status::Completed,
            Status::Completed,
            Status::Failed,
            Status::Cancelled,
        ][n % 4];
        job.attempts = 1;
        job.started_at = Some(created + chrono::Duration::seconds(5));
        job.finished_at = Some(created + chrono::Duration::seconds(50));
        job.updated_at = job.finished_at;
        std::fs::write(
            jobs_dir.join(format!("{}.json", job.id)),
            serde_json::to_vec(&job.to_json()).expect("json"),
        )
        .expect("a job file");
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let count = setting("TW_BENCH_HISTORY_JOBS", 100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let root = tempfile::tempdir().expect("a temp dir");
    let data = root.path().join("data");
    let started = Instant::now();
    write_jobs(&data, count);
    eprintln!("wrote {count} job files in {:?}", started.elapsed());
    runtime.block_on(async {
        let started = Instant::now();
        let parts = app_support::assemble(
            &data,
            app_support::Assembly {
                executor: app_support::executor_config(
                    vec!["/bin/sh".into(), "-c".into(), "exit 0".into()],
                    Duration::from_secs(60),
                ),
                worker: WorkerConfig {
                    max_concurrent: 0,
                    ..WorkerConfig::default()
                },
                clock: None,
                api_token: None,
                max_body_bytes: 1024 * 1024,
            },
        )
        .await;
        eprintln!("booted on them in {:?}", started.elapsed());
        let router = parts.router;
        let page = async |uri: &str| {
            let request = Request::get(uri).body(Body::empty()).expect("a request");
            let started = Instant::now();
            let (status, _, body) = app_support::call(&router, request).await;
            let took = started.elapsed();
            assert_eq!(status, StatusCode::OK, "{uri}");
            assert!(body.len() > 1000, "{uri}");
            took
        };
        let submit = async || {
            let body = json!({"type": "DiffusionJob", "model": "m", "dataset_zip": "z"});
            let request = Request::post("/v1/jobs")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .expect("a request");
            let (status, _, _) = app_support::call(&router, request).await;
            assert_eq!(status, StatusCode::CREATED);
        };
        println!("| history page, {count} finished jobs | p50 | p99 | requests |");
        println!("|---|---|---|---|");
        let cases: [(&str, &str); 3] = [
            ("warm", "/ui/history"),
            (
                "filtered",
                "/ui/history?status=Failed&type=TextJob&model=mistral-3&within=24&q=0",
            ),
            ("deep", "/ui/history?page=1000"),
        ];
        for (name, uri) in cases {
            page(uri).await;
            let mut times = Vec::new();
            for _ in 0..300 {
                times.push(page(uri).await);
            }
            times.sort();
            println!(
                "| {name} | {:.2} ms | {:.2} ms | {} |",
                percentile(&times, 0.5).as_secs_f64() * 1e3,
                percentile(&times, 0.99).as_secs_f64() * 1e3,
                times.len()
            );
        }
        let mut times = Vec::new();
        for _ in 0..100 {
            submit().await;
            times.push(page("/ui/history").await);
        }
        times.sort();
        println!(
            "| after a change | {:.2} ms | {:.2} ms | {} |",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
            times.len()
        );
        parts.shutdown.cancel();
    });
}
