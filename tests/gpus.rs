//! GPU slots: `[worker] gpus` are handed to jobs by their `gpu_count`, never to two running
//! trainers at once, in queue order (strictly, or with `backfill`), across a crash too. The
//! trainer (tests/trainers/gpu.sh) records the `CUDA_VISIBLE_DEVICES` it was given and when
//! it ran, so overlap is judged from what trainers saw, not from what the API says.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

use std::collections::{BTreeSet, HashMap};
use std::fs;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Daemon, Sandbox, secs, wait_until};

const GPU_TRAINER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/trainers/gpu.sh");

fn configure(sandbox: &Sandbox, gpus: &str, backfill: bool, max_concurrent: usize) {
    sandbox.write_config(&format!(
        "shutdown_grace = \"10s\"\n[worker]\nmax_concurrent = {max_concurrent}\ngpus = [{gpus}]\n\
         backfill = {backfill}\n[executor]\ncommand = [\"{GPU_TRAINER}\"]\nkill_grace = \"2s\"\n"
    ));
}

fn job(id: &str, model: &str, gpu_count: Option<u32>) -> Value {
    let mut job =
        json!({"type": "DiffusionJob", "job_id": id, "model": model, "dataset_zip": "z.zip"});
    if let Some(n) = gpu_count {
        job["gpu_count"] = n.into();
    }
    job
}

fn hold(sandbox: &Sandbox, id: &str) {
    fs::write(sandbox.path().join(format!("hold-{id}")), b"").expect("hold");
}

fn release(sandbox: &Sandbox, id: &str) {
    fs::remove_file(sandbox.path().join(format!("hold-{id}"))).expect("release");
}

/// One trainer run as recorded: job, GPUs it saw, start and end (None: still running).
#[derive(Debug, Clone)]
struct Run {
    job: String,
    gpus: String,
    start: u128,
    end: Option<u128>,
}

fn runs(sandbox: &Sandbox) -> Vec<Run> {
    let text = fs::read_to_string(sandbox.path().join("gpu-records")).unwrap_or_default();
    let mut runs: Vec<Run> = Vec::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        let [kind, job, gpus, at] = parts[..] else {
            panic!("bad record line {line:?}");
        };
        let at: u128 = at.parse().expect("a time");
        match kind {
            "start" => runs.push(Run {
                job: job.into(),
                gpus: gpus.into(),
                start: at,
                end: None,
            }),
            "end" => {
                let run = runs
                    .iter_mut()
                    .rev()
                    .find(|r| r.job == job && r.end.is_none())
                    .unwrap_or_else(|| panic!("an end without a start: {line}"));
                run.end = Some(at);
            }
            other => panic!("unknown record {other}"),
        }
    }
    runs
}

fn gpu_set(list: &str) -> BTreeSet<u32> {
    if list == "unset" || list.is_empty() {
        return BTreeSet::new();
    }
    list.split(',')
        .map(|g| g.parse().expect("a GPU id"))
        .collect()
}

/// No two trainers that ran at the same time saw a common GPU.
fn assert_no_overlap(runs: &[Run]) {
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            let a_end = a.end.unwrap_or(u128::MAX);
            let b_end = b.end.unwrap_or(u128::MAX);
            let concurrent = a.start < b_end && b.start < a_end;
            let shared: Vec<u32> = gpu_set(&a.gpus)
                .intersection(&gpu_set(&b.gpus))
                .copied()
                .collect();
            assert!(
                !concurrent || shared.is_empty(),
                "{} and {} ran at the same time on GPUs {shared:?}: {runs:#?}",
                a.job,
                b.job
            );
        }
    }
}

async fn running_gpus(daemon: &Daemon) -> HashMap<String, BTreeSet<u32>> {
    let reply = daemon.get("/v1/jobs?status=Running").await;
    reply
        .json()
        .as_array()
        .expect("a list")
        .iter()
        .map(|j| {
            let ids = j["gpu_ids"]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_u64().expect("id") as u32).collect())
                .unwrap_or_default();
            (j["job_id"].as_str().expect("id").to_string(), ids)
        })
        .collect()
}

/// Waits until exactly `expected` jobs run (by the API and by the trainers' records).
async fn wait_running(
    daemon: &Daemon,
    sandbox: &Sandbox,
    expected: &[&str],
) -> HashMap<String, BTreeSet<u32>> {
    let want: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    wait_until(format!("exactly {want:?} run"), secs(20), async || {
        let running = running_gpus(daemon).await;
        let ids: BTreeSet<String> = running.keys().cloned().collect();
        let started: BTreeSet<String> = runs(sandbox)
            .into_iter()
            .filter(|r| r.end.is_none())
            .map(|r| r.job)
            .collect();
        (ids == want && started == want).then_some(running)
    })
    .await
}

fn id(n: u128) -> String {
    uuid::Uuid::from_u128(0x6770_0000_0000_4000_8000_0000_0000_0000 | n).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpus_go_in_queue_order_and_a_big_job_waits_its_turn() {
    let sandbox = Sandbox::new();
    configure(&sandbox, "0, 1, 2, 3", false, 8);
    let daemon = sandbox.start().await;
    let (a, b, c, d) = (id(1), id(2), id(3), id(4));
    for (job_id, count) in [(&a, 2), (&b, 2), (&c, 3), (&d, 1)] {
        hold(&sandbox, job_id);
        daemon.submit(job(job_id, "ok", Some(count))).await;
    }
    // A and B take all four GPUs; C needs three and heads the queue; D may not pass it.
    let running = wait_running(&daemon, &sandbox, &[&a, &b]).await;
    assert_eq!(running[&a].len() + running[&b].len(), 4);
    assert!(running[&a].is_disjoint(&running[&b]), "{running:?}");
    release(&sandbox, &a);
    // Two GPUs free: C still waits, and D still waits behind it.
    wait_until("A ends", secs(20), async || {
        (daemon.job(&a).await["status"] == "Completed").then_some(())
    })
    .await;
    let running = wait_running(&daemon, &sandbox, &[&b]).await;
    assert_eq!(running.len(), 1);
    release(&sandbox, &b);
    let running = wait_running(&daemon, &sandbox, &[&c, &d]).await;
    assert_eq!(running[&c].len(), 3);
    assert_eq!(running[&d].len(), 1);
    assert!(running[&c].is_disjoint(&running[&d]));
    // What the trainers saw is what the job files say.
    for r in runs(&sandbox).iter().filter(|r| r.end.is_none()) {
        assert_eq!(gpu_set(&r.gpus), running[&r.job], "{r:?}");
    }
    release(&sandbox, &c);
    release(&sandbox, &d);
    wait_until("all four complete", secs(20), async || {
        let done = daemon.list_ids("Completed").await;
        (done.len() == 4).then_some(())
    })
    .await;
    assert_no_overlap(&runs(&sandbox));
    let starts: Vec<String> = runs(&sandbox).into_iter().map(|r| r.job).collect();
    let first: BTreeSet<&String> = starts[..2].iter().collect();
    let last: BTreeSet<&String> = starts[2..].iter().collect();
    assert_eq!(first, BTreeSet::from([&a, &b]), "{starts:?}");
    assert_eq!(last, BTreeSet::from([&c, &d]), "{starts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_backfill_a_small_job_passes_a_big_one_that_waits() {
    let sandbox = Sandbox::new();
    configure(&sandbox, "0, 1, 2, 3", true, 8);
    let daemon = sandbox.start().await;
    let (a, b, c, d) = (id(1), id(2), id(3), id(4));
    for (job_id, count) in [(&a, 2), (&b, 2), (&c, 3), (&d, 1)] {
        hold(&sandbox, job_id);
        daemon.submit(job(job_id, "ok", Some(count))).await;
    }
    wait_running(&daemon, &sandbox, &[&a, &b]).await;
    release(&sandbox, &a);
    // Two GPUs free: C (three) cannot start, D (one) passes it.
    let running = wait_running(&daemon, &sandbox, &[&b, &d]).await;
    assert!(running[&b].is_disjoint(&running[&d]));
    release(&sandbox, &b);
    release(&sandbox, &d);
    let running = wait_running(&daemon, &sandbox, &[&c]).await;
    assert_eq!(running[&c].len(), 3);
    release(&sandbox, &c);
    wait_until("all four complete", secs(20), async || {
        (daemon.list_ids("Completed").await.len() == 4).then_some(())
    })
    .await;
    assert_no_overlap(&runs(&sandbox));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_counts_are_checked_and_zero_takes_none() {
    let sandbox = Sandbox::new();
    configure(&sandbox, "0, 1", false, 4);
    let daemon = sandbox.start().await;
    let reply = daemon.post_job(&job(&id(9), "ok", Some(3))).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("gpu_count"),
        "{reply:?}"
    );
    let reply = daemon
        .post_job(
            &json!({"type": "DiffusionJob", "model": "ok", "dataset_zip": "z", "gpu_count": -1}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert!(!sandbox.jobs_dir().join(format!("{}.json", id(9))).exists());

    // Both GPUs busy (one job by default takes one), yet a job asking for none runs.
    let (a, b, z) = (id(1), id(2), id(3));
    hold(&sandbox, &a);
    hold(&sandbox, &b);
    hold(&sandbox, &z);
    daemon.submit(job(&a, "ok", None)).await;
    daemon.submit(job(&b, "ok", None)).await;
    daemon.submit(job(&z, "ok", Some(0))).await;
    let running = wait_running(&daemon, &sandbox, &[&a, &b, &z]).await;
    assert_eq!(running[&a].len(), 1);
    assert_eq!(running[&b].len(), 1);
    assert!(running[&z].is_empty());
    let seen: HashMap<String, String> = runs(&sandbox)
        .into_iter()
        .map(|r| (r.job, r.gpus))
        .collect();
    assert_eq!(
        seen[&z], "",
        "a job that asked for no GPU sees none: {seen:?}"
    );
    for x in [&a, &b, &z] {
        release(&sandbox, x);
    }
    wait_until("all complete", secs(20), async || {
        (daemon.list_ids("Completed").await.len() == 3).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_overlap_under_concurrency_and_across_a_crash() {
    let sandbox = Sandbox::new();
    configure(&sandbox, "0, 1, 2, 3, 4", true, 6);
    let daemon = sandbox.start().await;
    // Two held jobs run through the crash; many short ones of one or two GPUs churn around.
    let (x, y) = (id(100), id(101));
    hold(&sandbox, &x);
    hold(&sandbox, &y);
    daemon.submit(job(&x, "ok", Some(2))).await;
    daemon.submit(job(&y, "ok", Some(1))).await;
    for n in 0..16u128 {
        daemon
            .submit(job(&id(n + 1), "sleep:0.2", Some(1 + (n % 2) as u32)))
            .await;
    }
    wait_until("the short jobs complete", secs(60), async || {
        (daemon.list_ids("Completed").await.len() == 16).then_some(())
    })
    .await;
    assert_no_overlap(&runs(&sandbox));

    // A crash while X and Y run: their old trainers die with the daemon (and whatever they
    // started is killed at the next boot before any job starts again), so the restarted ones
    // cannot share a GPU with them. The old runs record no end: they end at the kill.
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_nanos();
    daemon.kill();
    let daemon = sandbox.start().await;
    let running = wait_running(&daemon, &sandbox, &[&x, &y]).await;
    assert!(running[&x].is_disjoint(&running[&y]), "{running:?}");
    release(&sandbox, &x);
    release(&sandbox, &y);
    wait_until("X and Y complete", secs(20), async || {
        (daemon.list_ids("Completed").await.len() == 18).then_some(())
    })
    .await;
    let mut all = runs(&sandbox);
    for run in all.iter_mut().filter(|r| r.end.is_none()) {
        assert!(
            run.start < killed_at,
            "a run after the crash never ended: {run:?}"
        );
        run.end = Some(killed_at);
    }
    assert_no_overlap(&all);
    assert_eq!(daemon.job(&x).await["attempts"], 2);
}
