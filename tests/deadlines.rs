//! Budgets and the deadline order with the real daemon and real crashes: a SIGKILL gives no
//! job a new budget, a job whose time ran out while the daemon was down fails at the restart
//! instead of starting, and under `order = "deadline"` the recovered job still starts first.
//! Offers and estimates are asked over HTTP as a client would.
//!
//! These run in real time; budgets are hours except for the one that must run out, and every
//! wait is for a condition.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

use serde_json::{Value, json};
use support::{STUB_TRAINER, Sandbox, diffusion_job, secs, text_job, wait_until};

fn with(mut job: Value, id: &str, hours: Option<f64>) -> Value {
    job["job_id"] = json!(id);
    if let Some(hours) = hours {
        job["hours_to_complete"] = json!(hours);
    }
    job
}

fn configure(sandbox: &Sandbox, order: &str) {
    let command = serde_json::to_string(STUB_TRAINER).expect("a string serialises");
    sandbox.write_config(&format!(
        "shutdown_grace = \"10s\"\n[worker]\nmax_concurrent = 1\norder = \"{order}\"\n\
         [executor]\ncommand = [{command}]\nkill_grace = \"2s\"\n"
    ));
}

fn timestamp(value: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(value.as_str().expect("a time"))
        .expect("RFC 3339")
        .with_timezone(&chrono::Utc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_keeps_budgets_and_a_job_out_of_time_fails_at_the_restart() {
    let sandbox = Sandbox::new();
    configure(&sandbox, "fifo");
    let daemon = sandbox.start().await;

    let first = uuid::Uuid::new_v4().to_string();
    sandbox.hold(&first);
    daemon.submit(with(text_job("ok"), &first, Some(2.0))).await;
    let running = daemon.wait_status(&first, "Running", secs(15)).await;
    let first_deadline = running["deadline"].clone();
    // Two seconds of budget behind a job that is expected to run for two hours.
    let second = uuid::Uuid::new_v4().to_string();
    daemon
        .submit(with(diffusion_job("ok"), &second, Some(2.0 / 3600.0)))
        .await;
    let second_deadline = daemon.job(&second).await["deadline"].clone();

    let listed = daemon
        .get("/v1/jobs?status=Queued&estimates=true")
        .await
        .json();
    assert_eq!(listed[0]["job_id"], second.as_str());
    assert_eq!(
        listed[0]["estimated_start"],
        Value::Null,
        "its time runs out before its turn: {listed}"
    );
    let offer = json!({"type": "TextJob", "model": "any/model", "hours_to_complete": 3});
    let reply = daemon.post("/v1/offers", &offer).await;
    assert_eq!(reply.status, reqwest::StatusCode::OK, "{reply:?}");
    let reply = reply.json();
    assert_eq!(reply["estimated_start"], first_deadline, "{reply}");
    assert_eq!(
        reply["accepted"], false,
        "a two-hour wait is beyond max_wait"
    );
    assert!(
        reply["message"]
            .as_str()
            .expect("a message")
            .contains("offers.max_wait"),
        "{reply}"
    );

    daemon.kill();
    wait_until(
        "the second job's deadline has passed",
        secs(10),
        async || (chrono::Utc::now() > timestamp(&second_deadline)).then_some(()),
    )
    .await;

    let daemon = sandbox.start().await;
    sandbox.trainer_started(&first, 2).await;
    assert_eq!(
        daemon.job(&first).await["deadline"],
        first_deadline,
        "the crash gave no new budget"
    );
    assert_eq!(daemon.job(&second).await["status"], "Queued");
    sandbox.release(&first);
    daemon.wait_status(&first, "Completed", secs(15)).await;
    let failed = daemon.wait_status(&second, "Failed", secs(15)).await;
    let reason = failed["error_message"].as_str().expect("a reason");
    assert!(
        reason.contains(&format!(
            "ran out at {} before the job could start",
            second_deadline.as_str().expect("a time")
        )),
        "{reason}"
    );
    assert_eq!(failed["attempts"], 0);
    assert!(
        !sandbox.starts().iter().any(|(job, _)| *job == second),
        "no trainer ran for it"
    );
    let metrics = daemon.get("/metrics").await.text;
    // Labelled with the node's name too, as every sample is.
    assert!(
        metrics.lines().any(|l| {
            l.starts_with("training_worker_deadline_misses_total{node=")
                && l.ends_with(",phase=\"queued\"} 1")
        }),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_order_survives_a_crash_with_the_recovered_job_first() {
    let sandbox = Sandbox::new();
    configure(&sandbox, "deadline");
    let daemon = sandbox.start().await;

    let head = uuid::Uuid::new_v4().to_string();
    sandbox.hold(&head);
    daemon.submit(with(text_job("ok"), &head, None)).await;
    daemon.wait_status(&head, "Running", secs(15)).await;
    let mut ids = Vec::new();
    for hours in [Some(5.0), Some(1.0), None, Some(3.0)] {
        let id = uuid::Uuid::new_v4().to_string();
        daemon.submit(with(diffusion_job("ok"), &id, hours)).await;
        ids.push(id);
    }
    let (five, one, none, three) = (&ids[0], &ids[1], &ids[2], &ids[3]);
    let by_deadline = [one.as_str(), three, five, none];
    assert_eq!(
        daemon.queue().await,
        (vec![head.clone()], by_deadline.map(String::from).to_vec())
    );
    assert_eq!(daemon.list_ids("Queued").await, by_deadline);
    sandbox.wait_queue_file(&[&head], &by_deadline).await;

    daemon.kill();
    let daemon = sandbox.start().await;
    sandbox.trainer_started(&head, 2).await;
    assert_eq!(
        daemon.queue().await,
        (vec![head.clone()], by_deadline.map(String::from).to_vec())
    );
    sandbox.release(&head);
    daemon.wait_status(none, "Completed", secs(30)).await;
    let started: Vec<String> = sandbox.starts().into_iter().map(|(job, _)| job).collect();
    let mut expected = vec![head.clone(), head.clone()];
    expected.extend(by_deadline.map(String::from));
    assert_eq!(started, expected);
}
