//! End to end: the real `training-worker` binary, a temp data dir, real signals, and a stub
//! trainer script (tests/trainers/stub.sh) steered by each job's `model` field.
//!
//! Each test owns a sandbox (its own dir, config and port), so they run in parallel. Nothing
//! sleeps blindly: every wait polls a condition with a deadline.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

use std::fs;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use support::{
    SEED_ID, SEED_JOB, Sandbox, Settings, diffusion_job, pid_alive, secs, text_job, wait_until,
};

fn starts(list: &[(&str, u32)]) -> Vec<(String, u32)> {
    list.iter().map(|(id, n)| (id.to_string(), *n)).collect()
}

fn message(job: &Value) -> &str {
    job["error_message"].as_str().unwrap_or("")
}

/// From `started_at` to `finished_at`.
fn run_time(job: &Value) -> Duration {
    let at = |key: &str| {
        let text = job[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} in {job}"));
        chrono::DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("{key}: {e}"))
    };
    (at("finished_at") - at("started_at"))
        .to_std()
        .expect("a job finishes after it starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_one_at_a_time_in_submission_order_and_complete() {
    let sandbox = Sandbox::new();
    let daemon = sandbox.start().await;

    let a = daemon.submit(diffusion_job("sleep:0.3")).await;
    let b = daemon.submit(text_job("sleep:0.2")).await;
    let c = daemon.submit(diffusion_job("ok")).await;

    let done = daemon.wait_status(&c, "Completed", secs(20)).await;
    assert_eq!(done["attempts"], 1, "{done}");
    assert_eq!(sandbox.starts(), starts(&[(&a, 1), (&b, 1), (&c, 1)]));
    sandbox.assert_one_at_a_time();

    for id in [&a, &b, &c] {
        let job = daemon.job(id).await;
        assert_eq!(job["status"], "Completed", "{job}");
        assert_eq!(job["attempts"], 1, "{job}");
        assert!(job["error_message"].is_null(), "{job}");
        for time in ["created_at", "started_at", "finished_at"] {
            assert!(job[time].is_string(), "{time} in {job}");
        }
        let log = daemon.logs(id).await;
        assert!(log.contains(&format!("hello from {id} attempt=1")), "{log}");
        assert!(log.contains("training finished"), "{log}");
        // The Running record is durable before the trainer starts.
        assert!(log.contains(r#"job file says "status":"Running""#), "{log}");
    }
    let text_log = daemon.logs(&b).await;
    assert!(text_log.contains("type=TextJob"), "{text_log}");
    assert!(
        text_log.contains("DATASET=train.json FILE_FORMAT=json"),
        "{text_log}"
    );
    assert_eq!(daemon.queue().await, (vec![], vec![]));
    sandbox.assert_no_trainers_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_trainer_fails_its_job_with_exit_status_and_last_line() {
    let sandbox = Sandbox::new();
    let daemon = sandbox.start().await;

    let failing = daemon.submit(diffusion_job("fail:3")).await;
    let next = daemon.submit(diffusion_job("ok")).await;

    let job = daemon.wait_status(&failing, "Failed", secs(15)).await;
    let msg = message(&job);
    assert!(msg.contains("exited with status 3"), "{job}");
    assert!(msg.contains("fatal: CUDA out of memory (stub)"), "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    assert!(job["finished_at"].is_string(), "{job}");
    let log = daemon.logs(&failing).await;
    assert!(log.contains("step 1 of 2 done"), "{log}");

    // A failure is final and does not block the queue.
    daemon.wait_status(&next, "Completed", secs(15)).await;
    assert_eq!(sandbox.starts(), starts(&[(&failing, 1), (&next, 1)]));
    assert_eq!(daemon.job(&failing).await["status"], "Failed");

    // A trainer killed from outside (the OOM killer, say) fails its job too.
    let killed = daemon.submit(diffusion_job("sleep:60")).await;
    let pid = sandbox.trainer_started(&killed, 1).await;
    // SAFETY: kill only sends a signal.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let job = daemon.wait_status(&killed, "Failed", secs(15)).await;
    assert!(message(&job).contains("SIGKILL"), "{job}");
    sandbox.assert_no_trainers_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_past_its_timeout_is_stopped_and_its_job_fails() {
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings {
        max_concurrent: 2,
        timeout: "2s",
        kill_grace: "3s",
        ..Settings::default()
    });
    let daemon = sandbox.start().await;

    // One stops on SIGTERM, the other ignores it and needs the SIGKILL after kill_grace.
    let polite = daemon.submit(diffusion_job("sleep:60")).await;
    let stubborn = daemon.submit(diffusion_job("hang:60")).await;
    let polite_pid = sandbox.trainer_started(&polite, 1).await;
    let stubborn_pid = sandbox.trainer_started(&stubborn, 1).await;

    let mut took = Vec::new();
    for id in [&polite, &stubborn] {
        let job = daemon.wait_status(id, "Failed", secs(15)).await;
        assert!(message(&job).starts_with("timed out after 2s"), "{job}");
        took.push(run_time(&job));
    }
    assert!(
        took[0] >= secs(2) && took[0] < secs(5),
        "the polite trainer stopped on SIGTERM at the timeout: {took:?}"
    );
    assert!(
        took[1] >= secs(5),
        "the stubborn trainer was killed only after kill_grace: {took:?}"
    );
    assert!(
        sandbox.record_pid("term", &polite, 1).is_some(),
        "the trainer got SIGTERM"
    );
    assert!(daemon.logs(&polite).await.contains("got SIGTERM; stopping"));
    wait_until("both timed-out trainers are gone", secs(5), async || {
        (!pid_alive(polite_pid) && !pid_alive(stubborn_pid)).then_some(())
    })
    .await;
    sandbox.assert_no_trainers_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_drops_a_queued_one_and_refuses_a_finished_one() {
    let sandbox = Sandbox::new();
    let daemon = sandbox.start().await;

    let running = daemon.submit(diffusion_job("sleep:60")).await;
    let queued = daemon.submit(diffusion_job("ok")).await;
    let after = daemon.submit(diffusion_job("ok")).await;
    let pid = sandbox.trainer_started(&running, 1).await;

    let reply = daemon.cancel(&queued).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["status"], "Cancelled", "{reply:?}");

    let reply = daemon.cancel(&running).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["status"], "Cancelled", "{reply:?}");
    wait_until("the cancelled job's trainer is gone", secs(5), async || {
        (!pid_alive(pid)).then_some(())
    })
    .await;
    assert!(
        sandbox.record_pid("term", &running, 1).is_some(),
        "the cancelled trainer got SIGTERM"
    );

    // The freed slot goes to the next job in line; the cancelled queued one is skipped.
    daemon.wait_status(&after, "Completed", secs(15)).await;
    assert_eq!(sandbox.starts(), starts(&[(&running, 1), (&after, 1)]));
    for id in [&running, &queued] {
        let job = daemon.job(id).await;
        assert_eq!(job["status"], "Cancelled", "{job}");
    }

    for id in [&after, &running] {
        let reply = daemon.cancel(id).await;
        assert_eq!(reply.status, StatusCode::CONFLICT, "{reply:?}");
        assert!(reply.json()["error"].is_string(), "{reply:?}");
    }
    assert_eq!(daemon.job(&after).await["status"], "Completed");

    // Cancelled stays cancelled through a crash.
    daemon.kill();
    let daemon = sandbox.start().await;
    let canary = daemon.submit(diffusion_job("ok")).await;
    daemon.wait_status(&canary, "Completed", secs(15)).await;
    for id in [&running, &queued] {
        let job = daemon.job(id).await;
        assert_eq!(job["status"], "Cancelled", "{job}");
    }
    assert_eq!(
        sandbox.starts(),
        starts(&[(&running, 1), (&after, 1), (&canary, 1)])
    );
    sandbox.assert_no_trainers_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_the_interrupted_job_runs_first_and_no_old_trainer_survives() {
    let sandbox = Sandbox::new();
    let daemon = sandbox.start().await;

    // A's first run starts a grandchild of its own and keeps running until the crash.
    let a = daemon.submit(diffusion_job("once/spawn:60")).await;
    let b = daemon.submit(diffusion_job("ok")).await;
    let c = daemon.submit(text_job("ok")).await;
    let trainer = sandbox.trainer_started(&a, 1).await;
    let grandchild = wait_until("A's trainer has started its child", secs(10), async || {
        sandbox.record_pid("child", &a, 1)
    })
    .await;

    // The trainer's supervisor kills its tree as soon as the daemon is gone; whatever it has
    // not killed yet, the next daemon's boot must (the wait below).
    daemon.kill();

    // Paused restart: inspect the recovered queue.
    sandbox.configure(&Settings {
        max_concurrent: 0,
        ..Settings::default()
    });
    let daemon = sandbox.start().await;
    wait_until(
        "the old daemon's trainer and its child are gone",
        secs(5),
        async || (!pid_alive(trainer) && !pid_alive(grandchild)).then_some(()),
    )
    .await;
    assert!(sandbox.trainer_processes().is_empty());
    let order = vec![a.clone(), b.clone(), c.clone()];
    assert_eq!(daemon.queue().await, (vec![], order.clone()));
    sandbox.wait_queue_file(&[], &[&a, &b, &c]).await;
    assert_eq!(daemon.list_ids("Queued").await, order);
    let job = daemon.job(&a).await;
    assert_eq!(job["status"], "Queued", "{job}");
    assert_eq!(job["attempts"], 1, "a start cut by a crash counts: {job}");
    let (status, _) = daemon.stop_with(libc::SIGINT, secs(10)).await;
    assert_eq!(status.code(), Some(0), "SIGINT is a graceful stop too");

    // Running restart: A again (second attempt), then B and C.
    sandbox.configure(&Settings::default());
    let daemon = sandbox.start().await;
    daemon.wait_status(&c, "Completed", secs(20)).await;
    assert_eq!(
        sandbox.starts(),
        starts(&[(&a, 1), (&a, 2), (&b, 1), (&c, 1)])
    );
    let job = daemon.job(&a).await;
    assert_eq!(job["status"], "Completed", "{job}");
    assert_eq!(job["attempts"], 2, "{job}");
    for id in [&b, &c] {
        assert_eq!(daemon.job(id).await["attempts"], 1);
    }
    let log = daemon.logs(&a).await;
    for attempt in [1, 2] {
        assert!(
            log.contains(&format!("hello from {a} attempt={attempt}")),
            "{log}"
        );
    }
    sandbox.assert_no_trainers_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_trainer_writes_the_job_back_and_it_runs_first_next_time() {
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings {
        shutdown_grace: "10s",
        kill_grace: "2s",
        ..Settings::default()
    });
    let daemon = sandbox.start().await;

    let a = daemon.submit(diffusion_job("once/sleep:60")).await;
    let b = daemon.submit(diffusion_job("ok")).await;
    let pid = sandbox.trainer_started(&a, 1).await;

    let (status, took) = daemon.terminate(secs(15)).await;
    assert_eq!(status.code(), Some(0), "graceful stop exits 0");
    assert!(took < secs(10), "stopped within shutdown_grace: {took:?}");
    assert!(
        sandbox.record_pid("term", &a, 1).is_some(),
        "the trainer got SIGTERM"
    );
    assert!(!pid_alive(pid), "the trainer is gone once the daemon is");
    sandbox.assert_no_trainers_left().await;

    let file = sandbox.job_file(&a);
    assert_eq!(file["status"], "Queued", "{file}");
    assert_eq!(
        file["attempts"], 0,
        "a start cut by a stop is taken back: {file}"
    );
    assert_eq!(sandbox.queue_file(), (vec![], vec![a.clone(), b.clone()]));

    let daemon = sandbox.start().await;
    daemon.wait_status(&b, "Completed", secs(20)).await;
    assert_eq!(sandbox.starts(), starts(&[(&a, 1), (&a, 1), (&b, 1)]));
    let job = daemon.job(&a).await;
    assert_eq!(job["status"], "Completed", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
}

/// A terminal or SSH session that closes sends SIGHUP to a foreground daemon, often twice
/// (the terminal, then the shell passing it on): a graceful stop like SIGTERM, not a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_is_a_graceful_stop_like_sigterm_even_when_it_comes_twice() {
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings {
        shutdown_grace: "10s",
        kill_grace: "2s",
        ..Settings::default()
    });
    let daemon = sandbox.start().await;

    let a = daemon.submit(diffusion_job("once/sleep:60")).await;
    let b = daemon.submit(diffusion_job("ok")).await;
    let pid = sandbox.trainer_started(&a, 1).await;

    daemon.signal(libc::SIGHUP);
    let (status, took) = daemon.stop_with(libc::SIGHUP, secs(15)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "a hangup is a graceful stop: {status}"
    );
    assert!(took < secs(10), "stopped within shutdown_grace: {took:?}");
    assert!(
        sandbox.record_pid("term", &a, 1).is_some(),
        "the trainer got SIGTERM"
    );
    assert!(!pid_alive(pid), "the trainer is gone once the daemon is");
    sandbox.assert_no_trainers_left().await;

    let file = sandbox.job_file(&a);
    assert_eq!(file["status"], "Queued", "{file}");
    assert_eq!(
        file["attempts"], 0,
        "a start cut by a stop is taken back: {file}"
    );
    assert_eq!(sandbox.queue_file(), (vec![], vec![a.clone(), b.clone()]));

    let daemon = sandbox.start().await;
    daemon.wait_status(&b, "Completed", secs(20)).await;
    assert_eq!(sandbox.starts(), starts(&[(&a, 1), (&a, 1), (&b, 1)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_kills_a_trainer_that_ignores_it_after_kill_grace_and_still_exits_0() {
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings {
        shutdown_grace: "5s",
        kill_grace: "1s",
        ..Settings::default()
    });
    let daemon = sandbox.start().await;
    let stubborn = daemon.submit(diffusion_job("once/hang:60")).await;
    let pid = sandbox.trainer_started(&stubborn, 1).await;
    wait_until("the trainer ignores SIGTERM", secs(5), async || {
        daemon
            .logs(&stubborn)
            .await
            .contains("ignoring SIGTERM")
            .then_some(())
    })
    .await;

    let (status, took) = daemon.terminate(secs(10)).await;
    assert_eq!(status.code(), Some(0), "graceful stop exits 0");
    assert!(
        took >= secs(1) && took < secs(5),
        "SIGKILL after kill_grace, exit within shutdown_grace: {took:?}"
    );
    assert!(!pid_alive(pid), "the trainer is gone once the daemon is");
    sandbox.assert_no_trainers_left().await;
    let file = sandbox.job_file(&stubborn);
    assert_eq!(file["status"], "Queued", "{file}");
    assert_eq!(file["attempts"], 0, "{file}");
}

/// During a graceful stop the daemon still answers: `/readyz` says 503 (a load balancer takes
/// it out of rotation instead of seeing connections refused), submissions are refused with
/// 503, and the listener closes only once the interrupted job is written back. Designed 503s
/// are not logged as errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_stopping_the_daemon_answers_readyz_503_and_refuses_submissions() {
    if support::not_for_this_store(
        "while_stopping_the_daemon_answers_readyz_503_and_refuses_submissions",
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings {
        shutdown_grace: "15s",
        kill_grace: "3s",
        ..Settings::default()
    });
    let mut daemon = sandbox.start().await;
    let stubborn = daemon.submit(diffusion_job("once/hang:60")).await;
    sandbox.trainer_started(&stubborn, 1).await;
    wait_until("the trainer ignores SIGTERM", secs(5), async || {
        daemon
            .logs(&stubborn)
            .await
            .contains("ignoring SIGTERM")
            .then_some(())
    })
    .await;

    daemon.signal(libc::SIGTERM);
    let stopping = wait_until("/readyz says 503 while stopping", secs(10), async || {
        let reply = daemon.try_get("/readyz").await?;
        (reply.status == StatusCode::SERVICE_UNAVAILABLE).then_some(reply)
    })
    .await;
    assert_eq!(stopping.json()["status"], "stopping", "{stopping:?}");
    let refused = daemon
        .try_post("/v1/jobs", &diffusion_job("ok"))
        .await
        .expect("the daemon answers during its stop");
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{refused:?}"
    );
    assert!(refused.text.contains("shutting down"), "{refused:?}");

    let status = daemon.wait_exit(secs(20)).await;
    assert_eq!(status.code(), Some(0), "graceful stop exits 0");
    let file = sandbox.job_file(&stubborn);
    assert_eq!(file["status"], "Queued", "{file}");
    assert_eq!(file["attempts"], 0, "{file}");
    let files = fs::read_dir(sandbox.jobs_dir()).expect("jobs/").count();
    assert_eq!(files, 1, "nothing was stored during the stop");
    let stderr = daemon.stderr();
    assert!(
        !stderr.lines().any(|l| l.contains(" ERROR ")),
        "a designed 503 logged as an error:\n{stderr}"
    );
    sandbox.assert_no_trainers_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_data_dir_exits_75_and_the_first_keeps_serving() {
    let sandbox = Sandbox::new();
    let first = sandbox.start().await;
    let running = first.submit(diffusion_job("sleep:60")).await;
    let pid = sandbox.trainer_started(&running, 1).await;

    let mut second = sandbox.spawn();
    let status = second.wait_exit(secs(5)).await;
    let stderr = second.stderr();
    assert_eq!(status.code(), Some(75), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!(
            "in use by another training-worker (pid {}",
            first.pid()
        )),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // The second daemon touched nothing of the first: its trainer runs on, it serves.
    assert!(pid_alive(pid), "the first daemon's trainer still runs");
    assert_eq!(first.healthz().await, StatusCode::OK);
    assert_eq!(first.queue().await, (vec![running.clone()], vec![]));
    let reply = first.cancel(&running).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let next = first.submit(diffusion_job("ok")).await;
    first.wait_status(&next, "Completed", secs(15)).await;
    sandbox.assert_no_trainers_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_exits_78_with_one_line_and_no_panic() {
    let sandbox = Sandbox::new();
    let stub = serde_json::to_string(support::STUB_TRAINER).unwrap();
    let not_executable = sandbox.path().join("not-executable.sh");
    fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    let cases = [
        (
            format!("colour = \"blue\"\n[executor]\ncommand = [{stub}]\n"),
            "colour",
        ),
        (
            format!(
                "shutdown_grace = \"5s\"\n[executor]\ncommand = [{stub}]\nkill_grace = \"5s\"\n"
            ),
            "kill_grace",
        ),
        (
            format!(
                "[executor]\ncommand = [{}]\n",
                serde_json::to_string(&not_executable).unwrap()
            ),
            "executor.command",
        ),
    ];
    for (config, key) in cases {
        sandbox.write_config(&config);
        let mut daemon = sandbox.spawn();
        let status = daemon.wait_exit(secs(10)).await;
        let stderr = daemon.stderr();
        assert_eq!(status.code(), Some(78), "{config}\nstderr: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(key), "names {key}: {stderr}");
        for noise in ["panicked", "backtrace", "RUST_BACKTRACE"] {
            assert!(!stderr.contains(noise), "{noise}: {stderr}");
        }
    }
}

/// `training-worker serve` run in `cwd` with `args`, none of the test's `TRAINING_WORKER_*`
/// and `env` on top; it is expected to refuse to start. Returns the exit code and stderr.
async fn refused_serve(
    cwd: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_training-worker"));
    command
        .arg("serve")
        .args(args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TRAINING_WORKER_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    let output = tokio::time::timeout(secs(10), command.output())
        .await
        .expect("serve refused within 10 s")
        .expect("run the binary");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let code = output.status.code().expect("an exit code, not a signal");
    (code, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_data_dir_or_a_bad_variable_exits_78_naming_it() {
    let sandbox = Sandbox::new();
    let config = sandbox.config_file().display().to_string();
    let cwd = sandbox.path().join("cwd");
    fs::create_dir_all(&cwd).unwrap();
    // The arguments, the variables and the name the error must give.
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["--config", &config, "--data-dir", ""],
            vec![],
            "--data-dir",
        ),
        (
            vec!["--config", &config],
            vec![("TRAINING_WORKER_DATA_DIR", "")],
            "TRAINING_WORKER_DATA_DIR",
        ),
        (
            vec!["--config", &config],
            vec![("TRAINING_WORKER_WORKER_MAX_CONCURRENT", "x")],
            "TRAINING_WORKER_WORKER_MAX_CONCURRENT",
        ),
        (
            vec!["--config", &config],
            vec![("TRAINING_WORKER_EXECUTOR_COMMAND", "'unbalanced")],
            "TRAINING_WORKER_EXECUTOR_COMMAND",
        ),
        // Outside a checkout, without a config file, the built-in trainer is not there:
        // the error says what to set.
        (vec![], vec![], "executor.command"),
    ];
    for (args, env, name) in cases {
        let (code, stderr) = refused_serve(&cwd, &args, &env).await;
        assert_eq!(code, 78, "{args:?} {env:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains(&format!("{name}: ")),
            "names {name}: {stderr}"
        );
    }
    let left: Vec<_> = fs::read_dir(&cwd).unwrap().collect();
    assert!(
        left.is_empty(),
        "the working directory was not used as a data dir: {left:?}"
    );

    let (code, stderr) = refused_serve(&cwd, &[], &[]).await;
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("--config") && stderr.contains("TRAINING_WORKER_EXECUTOR_COMMAND"),
        "says what to set: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_variables_are_warned_about_by_name() {
    let sandbox = Sandbox::new();
    sandbox.set_env("TRAINING_WORKER_WORKER_SLOTS", "2");
    sandbox.set_env("TRAINING_WORKER_SERVER", "http://127.0.0.1:1");
    let daemon = sandbox.start().await;
    let stderr = daemon.stderr();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("unknown environment variable"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("TRAINING_WORKER_WORKER_SLOTS"),
        "{stderr}"
    );
    // The client's variable is known, not warned about.
    assert!(!stderr.contains("TRAINING_WORKER_SERVER"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_out_of_attempts_after_a_crash_fails_at_boot_and_never_runs() {
    if support::not_for_this_store(
        "a_job_out_of_attempts_after_a_crash_fails_at_boot_and_never_runs",
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    // Two jobs the previous daemon had running when it crashed.
    let mut spent: Value = serde_json::from_str(SEED_JOB).unwrap();
    spent["attempts"] = 3.into();
    sandbox.write_data_file(
        &format!("jobs/{SEED_ID}.json"),
        spent.to_string().as_bytes(),
    );
    let other = "00000000-0000-4000-8000-000000000002";
    let mut retry = spent.clone();
    retry["job_id"] = other.into();
    retry["attempts"] = 2.into();
    sandbox.write_data_file(&format!("jobs/{other}.json"), retry.to_string().as_bytes());

    let daemon = sandbox.start().await;
    let job = daemon.job(SEED_ID).await;
    assert_eq!(job["status"], "Failed", "{job}");
    assert!(message(&job).contains("max_attempts"), "{job}");
    assert_eq!(job["attempts"], 3, "{job}");
    assert_eq!(sandbox.job_file(SEED_ID)["status"], "Failed");

    // The one with a start left runs (its third); a canary queued behind it runs after it.
    let canary = daemon.submit(diffusion_job("ok")).await;
    daemon.wait_status(&canary, "Completed", secs(20)).await;
    let job = daemon.job(other).await;
    assert_eq!(job["status"], "Completed", "{job}");
    assert_eq!(job["attempts"], 3, "{job}");
    assert_eq!(sandbox.starts(), starts(&[(other, 3), (&canary, 1)]));
    assert_eq!(daemon.job(SEED_ID).await["status"], "Failed");
    sandbox.assert_no_trainers_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_every_start_ends_in_a_crash_is_failed_after_max_attempts() {
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings {
        max_attempts: 2,
        ..Settings::default()
    });
    let mut daemon = sandbox.start().await;
    let doomed = daemon.submit(diffusion_job("sleep:60")).await;
    let behind = daemon.submit(diffusion_job("ok")).await;
    for attempt in 1..=2 {
        sandbox.trainer_started(&doomed, attempt).await;
        daemon.kill();
        daemon = sandbox.start().await;
    }
    let job = daemon.wait_status(&doomed, "Failed", secs(5)).await;
    assert!(message(&job).contains("max_attempts"), "{job}");
    assert_eq!(job["attempts"], 2, "{job}");
    daemon.wait_status(&behind, "Completed", secs(15)).await;
    assert_eq!(
        sandbox.starts(),
        starts(&[(&doomed, 1), (&doomed, 2), (&behind, 1)])
    );
    sandbox.assert_no_trainers_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_example_job_boots_and_runs_and_missing_queue_ids_are_dropped() {
    if support::not_for_this_store(
        "the_seed_example_job_boots_and_runs_and_missing_queue_ids_are_dropped",
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write_data_file(&format!("jobs/{SEED_ID}.json"), SEED_JOB.as_bytes());
    let waiting = "0f1e2d3c-4b5a-4968-8776-655443322110";
    sandbox.write_data_file(
        &format!("jobs/{waiting}.json"),
        format!(
            r#"{{"type": "DiffusionJob", "job_id": "{waiting}", "model": "ok", "dataset_zip": "z.zip", "status": "Queued"}}"#
        )
        .as_bytes(),
    );
    let missing = "9b2f4c7e-0d1a-4e5b-8c3d-2a1b0c9d8e7f";
    sandbox.write_data_file(
        "queue.json",
        format!(r#"{{"running": ["{SEED_ID}"], "queued": ["{missing}", "{waiting}"]}}"#).as_bytes(),
    );

    sandbox.hold(SEED_ID);

    let daemon = sandbox.start().await;
    // The job that was Running goes first, before the one queue.json had queued.
    sandbox.trainer_started(SEED_ID, 1).await;
    let expected = (vec![SEED_ID.to_string()], vec![waiting.to_string()]);
    assert_eq!(daemon.queue().await, expected);
    sandbox.wait_queue_file(&[SEED_ID], &[waiting]).await;
    sandbox.release(SEED_ID);
    daemon.wait_status(waiting, "Completed", secs(20)).await;
    assert_eq!(sandbox.starts(), starts(&[(SEED_ID, 1), (waiting, 1)]));
    let job = daemon.job(SEED_ID).await;
    assert_eq!(job["status"], "Completed", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");

    let log = daemon.logs(SEED_ID).await;
    for expected in [
        "type=TextJob model=mistralai/Mistral-7B-v0.1",
        "DATASET=my-dataset.json FILE_FORMAT=json",
        "EXPECTED_REPO_NAME=my-fine-tuned-model",
        "You are a helpful assistant.",
    ] {
        assert!(log.contains(expected), "{expected} in {log}");
    }
    sandbox.wait_queue_file(&[], &[]).await;
    let stderr = daemon.stderr();
    assert!(
        stderr.contains(missing),
        "a warning names {missing}: {stderr}"
    );

    // The seed's fields are written back unchanged.
    let file = sandbox.job_file(SEED_ID);
    let seed: Value = serde_json::from_str(SEED_JOB).unwrap();
    for key in [
        "type",
        "model",
        "expected_repo_name",
        "dataset",
        "dataset_type",
        "file_format",
    ] {
        assert_eq!(file[key], seed[key], "{key} in {file}");
    }
    assert_eq!(file["status"], "Completed");
    sandbox.assert_no_trainers_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_files_are_quarantined_and_the_boot_goes_on() {
    if support::not_for_this_store("corrupt_files_are_quarantined_and_the_boot_goes_on") {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write_data_file(&format!("jobs/{SEED_ID}.json"), SEED_JOB.as_bytes());
    let corrupt = "5d3c2b1a-0f9e-4d8c-b7a6-958473625140";
    sandbox.write_data_file(&format!("jobs/{corrupt}.json"), &SEED_JOB.as_bytes()[..60]);
    sandbox.write_data_file("queue.json", b"{\"running\": [\"123e4567");

    sandbox.hold(SEED_ID);

    let daemon = sandbox.start().await;
    let mut quarantined = sandbox.quarantined();
    quarantined.sort();
    assert_eq!(quarantined.len(), 2, "{quarantined:?}");
    assert!(
        quarantined
            .iter()
            .any(|n| n.ends_with(&format!("-{corrupt}.json"))),
        "{quarantined:?}"
    );
    assert!(
        quarantined.iter().any(|n| n.ends_with("-queue.json")),
        "{quarantined:?}"
    );
    assert!(!sandbox.jobs_dir().join(format!("{corrupt}.json")).exists());
    let stderr = daemon.stderr();
    assert!(
        stderr.contains(corrupt),
        "a warning names the file: {stderr}"
    );

    // queue.json is rebuilt from the job files, and the good job runs.
    sandbox.trainer_started(SEED_ID, 1).await;
    sandbox.wait_queue_file(&[SEED_ID], &[]).await;
    sandbox.release(SEED_ID);
    daemon.wait_status(SEED_ID, "Completed", secs(20)).await;
    sandbox.wait_queue_file(&[], &[]).await;
    let reply = daemon.get(&format!("/v1/jobs/{corrupt}")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{reply:?}");
    sandbox.assert_no_trainers_left().await;
}
