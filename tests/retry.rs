//! Retrying a finished job end to end: the real binary, the stub trainer
//! (tests/trainers/stub.sh), and a SIGKILL right after the retry's answer.
//!
//! A retry is a fresh run: the job goes back to Queued at the end of the queue with its
//! attempts at 0, its log keeps the earlier runs, and the answer comes only once that is
//! durable, so a crash at once replays the job at the place it was given.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Sandbox, Settings, diffusion_job, secs, text_job, wait_until};

fn starts(list: &[(&str, u32)]) -> Vec<(String, u32)> {
    list.iter().map(|(id, n)| (id.to_string(), *n)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_retried_keeps_its_place_through_a_crash_then_runs_again_and_completes() {
    if support::not_for_this_store(
        "a_failed_job_retried_keeps_its_place_through_a_crash_then_runs_again_and_completes",
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    let daemon = sandbox.start().await;

    // The first run fails; every later run succeeds.
    let retried = daemon.submit(diffusion_job("once/fail:3")).await;
    let failed = daemon.wait_status(&retried, "Failed", secs(15)).await;
    assert_eq!(failed["attempts"], 1, "{failed}");

    // One job runs (held) and one waits: the retried job goes behind both.
    let running = uuid::Uuid::new_v4().to_string();
    let mut job = diffusion_job("ok");
    job["job_id"] = json!(running);
    sandbox.hold(&running);
    daemon.submit(job).await;
    sandbox.trainer_started(&running, 1).await;
    let waiting = daemon.submit(text_job("ok")).await;

    // The body is not read; the retry is the path alone.
    let reply = daemon
        .post(&format!("/v1/jobs/{retried}/retry"), &json!({}))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let answered = reply.json();
    assert_eq!(answered["status"], "Queued", "{answered}");
    assert_eq!(answered["attempts"], 0, "{answered}");
    for cleared in ["error_message", "started_at", "finished_at"] {
        assert_eq!(answered[cleared], Value::Null, "{cleared}: {answered}");
    }
    // A job that arrives after the retry goes behind it.
    let later = daemon.submit(diffusion_job("ok")).await;
    // A crash at once, and queue.json lost with it: the job files alone must give the order.
    daemon.kill();
    std::fs::remove_file(sandbox.data_dir().join("queue.json")).expect("remove queue.json");

    // The retry was durable: the job is still Queued, as answered, behind the job that was
    // running (requeued first) and the one that was waiting, ahead of the later one.
    sandbox.configure(&Settings {
        max_concurrent: 0,
        ..Settings::default()
    });
    let daemon = sandbox.start().await;
    assert_eq!(daemon.job(&retried).await, answered);
    assert_eq!(sandbox.job_file(&retried), answered);
    let order = [
        running.as_str(),
        waiting.as_str(),
        retried.as_str(),
        later.as_str(),
    ];
    assert_eq!(
        daemon.queue().await,
        (vec![], order.iter().map(|id| id.to_string()).collect())
    );
    sandbox.wait_queue_file(&[], &order).await;
    daemon.terminate(secs(10)).await;

    // Then the queue runs in that order, and the retried job completes on its fresh run,
    // whose first start is attempt 1 again.
    sandbox.release(&running);
    sandbox.configure(&Settings::default());
    let daemon = sandbox.start().await;
    daemon.wait_status(&later, "Completed", secs(30)).await;
    let completed = daemon.wait_status(&retried, "Completed", secs(5)).await;
    assert_eq!(completed["attempts"], 1, "{completed}");
    assert_eq!(completed["error_message"], Value::Null, "{completed}");
    assert_eq!(
        sandbox.starts(),
        starts(&[
            (&retried, 1),
            (&running, 1),
            (&running, 2),
            (&waiting, 1),
            (&retried, 1),
            (&later, 1),
        ])
    );

    // Its log holds both runs, the retry between them.
    let log = daemon.logs(&retried).await;
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in the log:\n{log}"))
    };
    let hello = format!("hello from {retried} attempt=1");
    assert_eq!(log.matches(&hello).count(), 2, "{log}");
    assert!(
        at("fatal: CUDA out of memory (stub)") < at("==> retried at"),
        "{log}"
    );
    assert!(at("==> retried at") < log.rfind(&hello).unwrap(), "{log}");
    assert!(
        log.contains("a fresh run (the last run ended Failed)"),
        "{log}"
    );
    assert!(at("training finished") > at("==> retried at"), "{log}");

    // A completed job may be retried too, and the daemon counts the retries it made.
    let reply = daemon
        .post(&format!("/v1/jobs/{later}/retry"), &json!({}))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let metrics = daemon.get("/metrics").await.text;
    // Labelled with the node's name, as every sample is.
    assert!(
        metrics.lines().any(
            |l| l.starts_with("training_worker_jobs_retried_total{node=") && l.ends_with("} 1")
        ),
        "{metrics}"
    );
    daemon.wait_status(&later, "Completed", secs(15)).await;
    wait_until(
        "the retried job's second run is recorded",
        secs(15),
        async || {
            (sandbox.starts().last() == Some(&(later.clone(), 1)) && sandbox.starts().len() == 7)
                .then_some(())
        },
    )
    .await;
    sandbox.assert_no_trainers_left().await;
}
