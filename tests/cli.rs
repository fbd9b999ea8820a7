//! The command-line client end to end: the real `training-worker` binary run as a child
//! process against a real daemon (tests/e2e_support), with the stub trainer
//! (tests/trainers/stub.sh) steered by each job's `model`.
//!
//! Every run is piped, so the output must be plain: no ANSI escapes even without
//! `NO_COLOR`. Assertions are on what a script sees: stdout, one-line errors on stderr, and
//! the exit codes (0 success/Completed, 1 error, 2 usage, 3 not found, 4 conflict, 5 Failed,
//! 6 Cancelled, 7 wait timed out, 8 offer declined). Nothing sleeps blindly: every wait polls
//! a condition.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "cli_support/mod.rs"]
mod cli_support;

use std::path::PathBuf;
use std::process::Stdio;

use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, BufReader};

use cli_support::{BIN, at, client, finish, run, run_with_stdin, server};
use support::{STUB_TRAINER, Sandbox, Settings, diffusion_job, secs, text_job, wait_until};

/// A port nothing listens on (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port()
}

/// Writes `job` as a file in the sandbox and returns its path.
fn job_file(sandbox: &Sandbox, name: &str, job: &Value) -> PathBuf {
    let path = sandbox.path().join(name);
    std::fs::write(&path, job.to_string()).expect("write a job file");
    path
}

fn paused() -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings {
        max_concurrent: 0,
        ..Settings::default()
    });
    sandbox
}

/// Reads a follower's stdout line by line until a line contains `text`; returns all it read.
async fn read_until(stdout: &mut (impl AsyncBufRead + Unpin), text: &str) -> String {
    let mut seen = String::new();
    let found = tokio::time::timeout(secs(20), async {
        loop {
            let mut line = String::new();
            let n = stdout.read_line(&mut line).await.expect("read the client");
            seen.push_str(&line);
            if n == 0 || line.contains(text) {
                return n > 0;
            }
        }
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "{text:?} never came; the client printed {seen:?}"
    );
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_status_list_queue_and_cancel_in_plain_text_and_json() {
    let sandbox = paused();
    let daemon = sandbox.start().await;
    let url = server(&daemon);
    let a = "0b5f6f5e-8d1c-4c41-9a3e-2f4c8b9a1d01";
    let mut a_job = text_job("mistralai/Mistral-7B-v0.1");
    a_job["job_id"] = json!(a);
    let a_file = job_file(&sandbox, "a.json", &a_job);
    let a_path = a_file.to_str().expect("a UTF-8 path");

    // Submit from a file prints the id; from stdin too.
    let out = run(at(&url, &["submit", a_path])).await;
    assert_eq!(out.assert_ok().stdout, format!("{a}\n"));
    let out = run_with_stdin(
        at(&url, &["submit", "-"]),
        diffusion_job("sleep:1").to_string().as_bytes(),
    )
    .await;
    let b = out.assert_ok().stdout.trim().to_string();
    assert_eq!(daemon.job(&b).await["model"], "sleep:1");
    assert_eq!(daemon.list_ids("Queued").await, [a, b.as_str()]);

    // The same job again is a safe retry; the same id with other content is a conflict.
    let out = run(at(&url, &["submit", a_path, "--json"])).await;
    assert_eq!(out.assert_ok().json(), daemon.job(a).await);
    a_job["model"] = json!("another-model");
    let other = job_file(&sandbox, "other.json", &a_job);
    let out = run(at(&url, &["submit", other.to_str().expect("UTF-8")])).await;
    out.assert_error(4, "different content");
    assert_eq!(out.stdout, "");

    // Bad input is exit 1 with the daemon's reason, naming the field; a missing file too.
    let out = run_with_stdin(at(&url, &["submit", "-"]), b"{\"type\": \"TextJob\"").await;
    out.assert_error(1, "invalid JSON");
    let out = run_with_stdin(
        at(&url, &["submit", "-"]),
        br#"{"type": "TextJob", "model": "m", "dataset_type": {}}"#,
    )
    .await;
    out.assert_error(1, "dataset");
    let missing = sandbox.path().join("missing.json");
    let out = run(at(&url, &["submit", missing.to_str().expect("UTF-8")])).await;
    out.assert_error(1, "missing.json");

    // status: a readable block; --json: the API's job.
    let out = run(at(&url, &["status", a])).await;
    let text = &out.assert_ok().stdout;
    for line in [
        &format!("id        {a}"),
        "status    Queued",
        "type      TextJob",
        "model     mistralai/Mistral-7B-v0.1",
        "dataset   train.json (json)",
        "attempts  0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("created   ") && (l.contains(" ago") || l.contains("just now"))),
        "{text}"
    );
    // A paused queue starts nothing, and the block says so.
    assert!(
        text.lines()
            .any(|l| l.starts_with("starts    not expected: the queue is paused")),
        "{text}"
    );
    let out = run(at(&url, &["status", &b, "--json"])).await;
    assert_eq!(out.assert_ok().json(), daemon.job(&b).await);

    // list: a table, newest first; queued ones in queue order; --json is the API's list.
    let out = run(at(&url, &["list"])).await;
    let lines: Vec<&str> = out.assert_ok().stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID", "STATUS", "TYPE", "ATTEMPTS", "CREATED", "RUNTIME", "MODEL"
        ]
    );
    assert!(
        lines[1].starts_with(&format!("{b}  Queued  DiffusionJob")),
        "{out:?}"
    );
    assert!(lines[1].ends_with("sleep:1"), "{out:?}");
    assert!(
        lines[2].starts_with(&format!("{a}  Queued  TextJob")),
        "{out:?}"
    );
    assert!(lines[2].ends_with("mistralai/Mistral-7B-v0.1"), "{out:?}");
    let out = run(at(&url, &["list", "--status", "queued"])).await;
    let ids: Vec<&str> = out.assert_ok().stdout.lines().skip(1).collect();
    assert!(ids[0].starts_with(a) && ids[1].starts_with(&b), "{out:?}");
    let out = run(at(&url, &["list", "--json"])).await;
    assert_eq!(out.assert_ok().json(), daemon.get("/v1/jobs").await.json());
    let out = run(at(
        &url,
        &["list", "--status", "Queued", "--limit", "1", "--json"],
    ))
    .await;
    let list = out.assert_ok().json();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["job_id"], a);
    let out = run(at(&url, &["list", "--status", "Completed"])).await;
    assert_eq!(out.assert_ok().stdout, "no Completed jobs\n");
    let out = run(at(&url, &["list", "--status", "Done"])).await;
    assert_eq!(out.code, 2, "an unknown status is a usage error: {out:?}");

    // queue: in the order the jobs will start; --json is the API's object.
    let out = run(at(&url, &["queue"])).await;
    let lines: Vec<&str> = out.assert_ok().stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{out:?}");
    // Nothing starts in this daemon, and the view says why.
    assert_eq!(
        lines[3], "paused: starts are paused (worker.max_concurrent = 0)",
        "{out:?}"
    );
    assert!(
        lines[0].contains("  DEADLINE  EST. START  MODEL"),
        "{out:?}"
    );
    assert!(
        lines[1].starts_with(&format!("1    {a}  Queued")),
        "{out:?}"
    );
    assert!(
        lines[2].starts_with(&format!("2    {b}  Queued")),
        "{out:?}"
    );
    let out = run(at(&url, &["queue", "--json"])).await;
    assert_eq!(out.assert_ok().json(), daemon.get("/v1/queue").await.json());

    // cancel prints the job's new status; a finished job is a conflict.
    let out = run(at(&url, &["cancel", &b])).await;
    assert_eq!(out.assert_ok().stdout, format!("{b} Cancelled\n"));
    assert_eq!(daemon.job(&b).await["status"], "Cancelled");
    let out = run(at(&url, &["cancel", &b])).await;
    out.assert_error(4, "already finished");
    let out = run(at(&url, &["cancel", a, "--json"])).await;
    let job = out.assert_ok().json();
    assert_eq!(job["status"], "Cancelled", "{job}");
    assert_eq!(job, daemon.job(a).await);
    let out = run(at(&url, &["queue"])).await;
    assert_eq!(
        out.assert_ok().stdout,
        "the queue is empty\npaused: starts are paused (worker.max_concurrent = 0)\n"
    );

    // A job that does not exist is exit 3 for every command about one job.
    let nobody = "7d444840-9dc0-11d1-b245-5ffdce74fad2";
    for command in ["status", "cancel", "logs", "wait"] {
        let out = run(at(&url, &[command, nobody])).await;
        out.assert_error(3, &format!("job {nobody} not found"));
        assert_eq!(out.stdout, "", "{out:?}");
    }
    // Not a job id at all: a usage error, caught before any request.
    let out = run(at(&url, &["status", "not-a-uuid"])).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("not a job id"), "{out:?}");

    // The first characters of an id name the job, as long as no other id starts so.
    let out = run(at(&url, &["status", &a[..8], "--json"])).await;
    assert_eq!(out.assert_ok().json()["job_id"], a);
    let mut twin = text_job("ok");
    twin["job_id"] = json!(format!("{}-0000-4000-8000-000000000000", &a[..8]));
    daemon.submit(twin).await;
    let out = run(at(&url, &["cancel", &a[..8]])).await;
    out.assert_error(1, "ambiguous");
    let out = run(at(&url, &["status", &a[..11]])).await;
    assert!(
        out.assert_ok()
            .stdout
            .starts_with(&format!("id        {a}\n")),
        "{out:?}"
    );
    let out = run(at(&url, &["wait", &format!("{}-9", &a[..8])])).await;
    out.assert_error(3, "no job's id starts with");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_queues_a_finished_job_again_last_and_an_unfinished_one_is_a_conflict() {
    let sandbox = paused();
    let daemon = sandbox.start().await;
    let url = server(&daemon);
    let a = daemon.submit(diffusion_job("ok")).await;
    let b = daemon.submit(diffusion_job("ok")).await;

    // Queued: not finished, the same exit code as cancel's conflict, and nothing changes.
    let out = run(at(&url, &["retry", &a])).await;
    out.assert_error(4, &format!("job {a} is not finished (Queued)"));
    assert_eq!(out.stdout, "", "{out:?}");
    assert_eq!(daemon.job(&a).await["status"], "Queued");

    // Finished: queued again at the end, after b; the id prefix names it too.
    run(at(&url, &["cancel", &a])).await.assert_ok();
    let out = run(at(&url, &["retry", &a[..8]])).await;
    assert_eq!(out.assert_ok().stdout, format!("{a} Queued\n"));
    let job = daemon.job(&a).await;
    assert_eq!(
        (job["status"].as_str(), job["attempts"].as_u64()),
        (Some("Queued"), Some(0))
    );
    assert_eq!(job["error_message"], Value::Null, "{job}");
    assert_eq!(
        daemon.get("/v1/queue").await.json()["queued"],
        json!([b.as_str(), a.as_str()])
    );
    let out = run(at(&url, &["retry", &a, "--json"])).await;
    out.assert_error(4, "not finished (Queued)");

    // --json prints the stored job as the API answered it.
    run(at(&url, &["cancel", &b])).await.assert_ok();
    let out = run(at(&url, &["retry", &b, "--json"])).await;
    let job = out.assert_ok().json();
    assert_eq!(job["status"], "Queued", "{job}");
    assert_eq!(job, daemon.job(&b).await);
    assert_eq!(
        daemon.get("/v1/queue").await.json()["queued"],
        json!([a.as_str(), b.as_str()])
    );

    let nobody = "7d444840-9dc0-11d1-b245-5ffdce74fad2";
    let out = run(at(&url, &["retry", nobody])).await;
    out.assert_error(3, &format!("job {nobody} not found"));
    let out = run(at(&url, &["retry", "not-a-uuid"])).await;
    assert_eq!(out.code, 2, "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_a_job_are_shown_escaped_and_json_stays_exact() {
    let sandbox = paused();
    let daemon = sandbox.start().await;
    let url = server(&daemon);
    // ESC [2J clears a terminal; ESC ] 0 ; ... BEL sets its title.
    let model = "org/m\u{1b}[2Jodel";
    let mut job = text_job(model);
    job["dataset"] = json!("d\u{1b}]0;pwned\u{7}.json");
    let id = daemon.submit(job).await;

    // `finish` also holds every output free of a raw ESC.
    for args in [vec!["status", id.as_str()], vec!["list"], vec!["queue"]] {
        let out = run(at(&url, &args)).await;
        let text = &out.assert_ok().stdout;
        assert!(text.contains("org/m\\u{1b}[2Jodel"), "{args:?}: {text}");
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{args:?}: {text:?}"
        );
    }
    let out = run(at(&url, &["status", &id])).await;
    assert!(
        out.stdout.contains("d\\u{1b}]0;pwned\\u{7}.json"),
        "{}",
        out.stdout
    );
    let out = run(at(&url, &["status", &id, "--json"])).await;
    assert_eq!(out.assert_ok().json()["model"], model);
    let out = run(at(&url, &["list", "--json"])).await;
    assert_eq!(out.assert_ok().json()[0]["model"], model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_exit_codes_tell_completed_failed_cancelled_and_timed_out() {
    let sandbox = Sandbox::new();
    let daemon = sandbox.start().await;
    let url = server(&daemon);

    let ok = daemon.submit(diffusion_job("ok")).await;
    let out = run(at(&url, &["wait", &ok])).await;
    assert!(
        out.assert_ok()
            .stdout
            .starts_with(&format!("{ok} Completed after ")),
        "{out:?}"
    );

    let failing = daemon.submit(text_job("fail:3")).await;
    let out = run(at(&url, &["wait", &failing, "--json"])).await;
    assert_eq!(out.code, 5, "{out:?}");
    let job = out.json();
    assert_eq!(job["status"], "Failed", "{job}");
    assert_eq!(job, daemon.job(&failing).await);
    let out = run(at(&url, &["wait", &failing])).await;
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stdout.contains("Failed after"), "{out:?}");
    assert!(out.stdout.contains("exited with status 3"), "{out:?}");

    // A wait in progress sees the cancel.
    let long = daemon.submit(diffusion_job("sleep:60")).await;
    let waiter = at(&url, &["wait", &long]).spawn().expect("run the client");
    sandbox.trainer_started(&long, 1).await;
    run(at(&url, &["cancel", &long])).await.assert_ok();
    let out = finish(waiter).await;
    assert_eq!(out.code, 6, "{out:?}");
    assert!(
        out.stdout.starts_with(&format!("{long} Cancelled")),
        "{out:?}"
    );

    // A job that does not end in time: exit 7, and the job is left alone.
    let stuck = daemon.submit(diffusion_job("sleep:60")).await;
    let out = run(at(&url, &["wait", &stuck, "--timeout", "300ms"])).await;
    out.assert_error(7, &format!("job {stuck} is still "));
    assert!(out.stderr.contains("after 300ms"), "{out:?}");
    assert!(
        ["Queued", "Running"].contains(&daemon.job(&stuck).await["status"].as_str().unwrap()),
        "the job goes on"
    );
    let out = run(at(&url, &["wait", &stuck, "--timeout", "soon"])).await;
    assert_eq!(out.code, 2, "a bad duration is a usage error: {out:?}");
    run(at(&url, &["cancel", &stuck])).await.assert_ok();
    sandbox.assert_no_trainers_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_tail_and_follow_see_the_trainer_output_to_the_end() {
    let sandbox = Sandbox::new();
    let daemon = sandbox.start().await;
    let url = server(&daemon);
    let id = "4c1d2f7a-6b8e-4e3a-9c5d-1a2b3c4d5e6f";
    let mut job = diffusion_job("ok");
    job["job_id"] = json!(id);
    sandbox.hold(id);
    daemon.submit(job).await;
    sandbox.trainer_started(id, 1).await;

    // The follower prints what the trainer wrote before the hold, then, released, the rest.
    let mut follower = at(&url, &["logs", id, "--follow"])
        .spawn()
        .expect("run the client");
    let mut stdout = BufReader::new(follower.stdout.take().expect("stdout is piped"));
    let mut followed = read_until(&mut stdout, "job file says").await;
    assert!(
        followed.contains(&format!("hello from {id} attempt=1")),
        "{followed}"
    );
    assert!(!followed.contains("training finished"), "{followed}");
    sandbox.release(id);
    stdout
        .read_to_string(&mut followed)
        .await
        .expect("read the client");
    let rest = finish(follower).await;
    assert_eq!(rest.assert_ok().stdout, "", "all of stdout was read above");
    assert_eq!(followed.matches("hello from").count(), 1, "{followed}");
    assert_eq!(
        followed.matches("training finished").count(),
        1,
        "{followed}"
    );

    // The whole log, once the job has ended, is what the follower saw, byte for byte.
    let out = run(at(&url, &["logs", id])).await;
    assert_eq!(out.assert_ok().stdout, followed);
    assert_eq!(out.stdout, daemon.logs(id).await);
    let out = run(at(&url, &["logs", id, "--tail", "2"])).await;
    let last_two: Vec<&str> = followed.lines().rev().take(2).collect();
    let tail: Vec<&str> = out.assert_ok().stdout.lines().rev().collect();
    assert_eq!(tail, last_two);
    // Following a finished job prints and ends at once, with the job's exit code.
    let out = run(at(&url, &["logs", id, "-f", "--tail", "1"])).await;
    assert_eq!(
        out.assert_ok().stdout.lines().collect::<Vec<_>>(),
        [last_two[0]]
    );

    let failing = daemon.submit(text_job("fail:4")).await;
    let out = run(at(&url, &["logs", &failing, "--follow"])).await;
    assert_eq!(out.code, 5, "{out:?}");
    assert!(
        out.stdout.contains("fatal: CUDA out of memory (stub)"),
        "{out:?}"
    );
    assert_eq!(out.stdout, daemon.logs(&failing).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_are_one_line_and_exit_0_or_1() {
    let sandbox = paused();
    let daemon = sandbox.start().await;
    let url = server(&daemon);
    let out = run(at(&url, &["health"])).await;
    assert_eq!(out.assert_ok().stdout, "ok\n");
    let out = run(at(&url, &["health", "--ready"])).await;
    assert_eq!(out.assert_ok().stdout, "ready\n");

    let gone = format!("http://127.0.0.1:{}", free_port());
    for args in [&["health"][..], &["health", "--ready"][..]] {
        let out = run(at(&gone, args)).await;
        out.assert_error(1, &format!("cannot connect to the daemon at {gone}"));
        assert_eq!(out.stdout, "");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_daemon_is_a_one_line_error_and_exit_1() {
    let gone = format!("http://127.0.0.1:{}", free_port());
    let id = "7d444840-9dc0-11d1-b245-5ffdce74fad2";
    let commands: [&[&str]; 8] = [
        &["status", id],
        &["list"],
        &["queue"],
        &["cancel", id],
        &["retry", id],
        &["logs", id, "--follow"],
        &["wait", id],
        &["submit", "-"],
    ];
    for args in commands {
        let out = run_with_stdin(at(&gone, args), b"{}").await;
        out.assert_error(1, &format!("cannot connect to the daemon at {gone}"));
        assert!(out.stderr.contains("onnection refused"), "{out:?}");
        assert_eq!(out.stdout, "", "{out:?}");
    }
    // The same over https, and a scheme the client does not speak.
    let gone_tls = format!("https://127.0.0.1:{}", free_port());
    let out = run(at(&gone_tls, &["list"])).await;
    out.assert_error(1, &format!("cannot connect to the daemon at {gone_tls}"));
    let out = run(at("ftp://127.0.0.1:8787", &["list"])).await;
    out.assert_error(1, "unsupported scheme");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_and_the_server_come_from_the_environment() {
    let sandbox = Sandbox::new();
    let trainer = serde_json::to_string(STUB_TRAINER).expect("a string serialises");
    sandbox.write_config(&format!(
        "api_token = \"s3cret\"\n\n[worker]\nmax_concurrent = 0\n\n\
         [executor]\ncommand = [{trainer}]\n"
    ));
    let daemon = sandbox.start().await;
    let url = server(&daemon);

    let out = run(at(&url, &["list"])).await;
    out.assert_error(1, "401");
    assert!(out.stderr.contains("TRAINING_WORKER_API_TOKEN"), "{out:?}");
    let mut wrong = at(&url, &["list"]);
    wrong.env("TRAINING_WORKER_API_TOKEN", "guess");
    run(wrong).await.assert_error(1, "401");

    // TRAINING_WORKER_SERVER stands for --server; the token goes as a bearer token.
    let mut submit = client(&["submit", "-"]);
    submit
        .env("TRAINING_WORKER_SERVER", &url)
        .env("TRAINING_WORKER_API_TOKEN", "s3cret");
    let out = run_with_stdin(submit, diffusion_job("ok").to_string().as_bytes()).await;
    let id = out.assert_ok().stdout.trim().to_string();
    let mut list = client(&["list", "--json"]);
    list.env("TRAINING_WORKER_SERVER", &url)
        .env("TRAINING_WORKER_API_TOKEN", "s3cret");
    let jobs = run(list).await.assert_ok().json();
    assert_eq!(jobs[0]["job_id"], id.as_str(), "{jobs}");

    // Health needs no token.
    run(at(&url, &["health", "--ready"])).await.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_what_serve_refuses_and_documents_its_exit_codes() {
    let out = run(client(&["check", "--help"])).await;
    let help = &out.assert_ok().stdout;
    for code in ["0   ", "1   ", "2   ", "74  ", "78  "] {
        assert!(help.contains(&format!("\n  {code}")), "{code:?} in {help}");
    }

    let sandbox = Sandbox::new();
    let check = |dir: &std::path::Path| {
        let dir = dir.to_str().expect("a UTF-8 path").to_string();
        async move { run(client(&["check", "--data-dir", &dir])).await }
    };
    // A directory no daemon ever ran on is not a clean data dir.
    let empty = sandbox.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = check(&empty).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains("problem: not a data dir"), "{out:?}");

    // What serve cannot start on, each named by its path.
    let data = sandbox.path().join("data");
    std::fs::create_dir_all(data.join("jobs")).unwrap();
    std::fs::write(data.join("logs"), b"").unwrap();
    std::fs::create_dir(data.join("lock")).unwrap();
    let out = check(&data).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout.contains("problem: logs: a regular file"),
        "{out:?}"
    );
    assert!(out.stdout.contains("problem: lock: a directory"), "{out:?}");
    std::fs::remove_dir(data.join("jobs")).unwrap();
    std::fs::write(data.join("jobs"), b"").unwrap();
    let out = check(&data).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout.contains("problem: jobs: a regular file"),
        "{out:?}"
    );
    assert_eq!(out.stderr, "", "{out:?}");

    let out = check(&sandbox.path().join("absent")).await;
    out.assert_error(74, "cannot read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_help_are_printed() {
    let out = run(client(&["completions", "bash"])).await;
    let script = &out.assert_ok().stdout;
    assert!(script.contains("_training__worker()"), "{script}");
    assert!(script.contains("complete -F _training__worker"), "{script}");
    // Completes the command as installed, not the Rust function name.
    assert!(script.contains("-o default training-worker\n"), "{script}");
    for command in [
        "submit", "status", "list", "queue", "cancel", "retry", "logs", "wait", "offer", "health",
    ] {
        assert!(script.contains(command), "{command} in the bash script");
    }
    let out = run(client(&["completions", "zsh"])).await;
    assert!(
        out.assert_ok()
            .stdout
            .starts_with("#compdef training-worker"),
        "{out:?}"
    );
    let out = run(client(&["completions", "fish"])).await;
    assert!(
        out.assert_ok()
            .stdout
            .contains("complete -c training-worker"),
        "{out:?}"
    );
    let out = run(client(&["completions", "tcsh"])).await;
    assert_eq!(out.code, 2, "{out:?}");

    let out = run(client(&["--help"])).await;
    assert!(out.assert_ok().stdout.contains("Exit codes"), "{out:?}");
    let out = run(client(&["wait", "--help"])).await;
    assert!(
        out.assert_ok().stdout.contains("7  wait --timeout"),
        "{out:?}"
    );
}

/// A daemon on a port the test chose, so that a restart comes back at the same address.
struct FixedDaemon {
    child: std::process::Child,
    stderr: PathBuf,
}

impl FixedDaemon {
    fn start(sandbox: &Sandbox, port: u16, n: usize) -> FixedDaemon {
        let stderr = sandbox.path().join(format!("fixed-{n}.stderr"));
        let mut command = std::process::Command::new(BIN);
        command
            .args(["serve", "--config"])
            .arg(sandbox.config_file())
            .arg("--data-dir")
            .arg(sandbox.data_dir())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .current_dir(sandbox.path())
            // tower_http's request lines show which client has been answered.
            .env("RUST_LOG", "info,tower_http=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("create the stderr file"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TRAINING_WORKER_") {
                command.env_remove(name);
            }
        }
        let child = command.spawn().expect("run the daemon");
        FixedDaemon { child, stderr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Whether the daemon has answered `GET {path}` (exactly that path) with a 200.
    fn answered(&self, path: &str) -> bool {
        let span = format!("method=GET uri={path} ");
        self.log().lines().any(|l| {
            l.contains(&span) && l.contains("finished processing") && l.contains("status=200")
        })
    }

    async fn wait_ready(&mut self, url: &str) {
        wait_until(
            "the daemon on the fixed port is ready",
            secs(20),
            async || {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("the daemon exited during start ({status}):\n{}", self.log());
                }
                if !self.log().contains("listening; replaying the data dir") {
                    return None;
                }
                (run(at(url, &["health", "--ready"])).await.code == 0).then_some(())
            },
        )
        .await;
    }
}

impl Drop for FixedDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_and_follow_ride_out_a_daemon_restart() {
    let sandbox = Sandbox::new();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut first = FixedDaemon::start(&sandbox, port, 1);
    first.wait_ready(&url).await;

    let id = "9e8d7c6b-5a49-4382-a716-0f1e2d3c4b5a";
    let mut job = diffusion_job("ok");
    job["job_id"] = json!(id);
    sandbox.hold(id);
    let out = run_with_stdin(at(&url, &["submit", "-"]), job.to_string().as_bytes()).await;
    out.assert_ok();
    sandbox.trainer_started(id, 1).await;

    let mut follower = at(&url, &["logs", id, "--follow"])
        .spawn()
        .expect("run the client");
    let mut stdout = BufReader::new(follower.stdout.take().expect("stdout is piped"));
    let mut follower_err = BufReader::new(follower.stderr.take().expect("stderr is piped"));
    let mut followed = read_until(&mut stdout, "job file says").await;
    // Only the waiter asks for the job itself; once answered, it rides out what follows.
    let mut waiter = at(&url, &["wait", id, "--timeout", "60s"])
        .spawn()
        .expect("run the client");
    let mut waiter_err = BufReader::new(waiter.stderr.take().expect("stderr is piped"));
    let job_path = format!("/v1/jobs/{id}");
    wait_until("the daemon has answered the waiter", secs(20), async || {
        first.answered(&job_path).then_some(())
    })
    .await;

    // A crash: the trainer dies with its daemon; the restarted one runs the job again.
    drop(first);
    // Both notice, say so in one line, and keep trying.
    for stderr in [&mut follower_err, &mut waiter_err] {
        let warning = read_until(stderr, "retrying").await;
        assert_eq!(warning.lines().count(), 1, "{warning}");
        assert!(
            warning.starts_with(&format!("warning: cannot connect to the daemon at {url}")),
            "{warning}"
        );
    }
    let mut second = FixedDaemon::start(&sandbox, port, 2);
    second.wait_ready(&url).await;
    sandbox.trainer_started(id, 2).await;
    sandbox.release(id);

    stdout
        .read_to_string(&mut followed)
        .await
        .expect("read the client");
    let rest = finish(follower).await;
    assert_eq!(rest.code, 0, "{rest:?}");
    assert!(followed.contains("attempt=1"), "{followed}");
    assert!(followed.contains("attempt=2"), "{followed}");
    assert_eq!(
        followed.matches("training finished").count(),
        1,
        "{followed}"
    );
    let out = run(at(&url, &["logs", id])).await;
    assert_eq!(out.assert_ok().stdout, followed, "every byte once");

    let out = finish(waiter).await;
    assert_eq!(out.code, 0, "{out:?}");
    for mut stderr in [follower_err, waiter_err] {
        let mut rest = String::new();
        stderr.read_to_string(&mut rest).await.expect("read stderr");
        assert_eq!(rest, "", "one warning per outage");
    }
    assert!(
        out.stdout.starts_with(&format!("{id} Completed")),
        "{out:?}"
    );
    drop(second);
    sandbox.assert_no_trainers_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_says_whether_and_when_and_exits_8_when_declined() {
    // A slot for each accepted offer: each holds one while its reservation lasts.
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings {
        max_concurrent: 3,
        ..Settings::default()
    });
    let daemon = sandbox.start().await;
    let url = server(&daemon);

    // From flags: a readable answer, accepted, with its estimates and the place held.
    let flags = [
        "offer",
        "--type",
        "TextJob",
        "--model",
        "unsloth/Llama-3.2-1B",
        "--hours",
        "3",
    ];
    let out = run(at(&url, &flags)).await;
    let text = &out.assert_ok().stdout;
    let labels: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(
        labels,
        ["offer", "starts", "ends", "reserved", "message"],
        "{text}"
    );
    assert!(text.starts_with("offer     accepted\n"), "{text}");
    assert!(text.contains("held until"), "{text}");

    // From a file (the job itself is an offer), with --json: the API's answer as it is.
    let mut job = text_job("unsloth/Llama-3.2-1B");
    job["hours_to_complete"] = json!(2);
    let file = job_file(&sandbox, "offer.json", &job);
    let out = run(at(
        &url,
        &["offer", file.to_str().expect("UTF-8"), "--json"],
    ))
    .await;
    let answer = out.assert_ok().json();
    assert_eq!(answer["accepted"], true, "{answer}");
    assert!(answer["estimated_start"].is_string(), "{answer}");
    assert!(answer["reservation"]["id"].is_string(), "{answer}");
    // From stdin.
    let out = run_with_stdin(
        at(&url, &["offer", "-", "--json"]),
        job.to_string().as_bytes(),
    )
    .await;
    assert_eq!(out.assert_ok().json()["accepted"], true);

    // A bad field is exit 1 naming it; flags and a file together are a usage error.
    let mut bad = flags.to_vec();
    bad.extend(["--job-id", "not-a-uuid"]);
    let out = run(at(&url, &bad)).await;
    out.assert_error(1, "job_id");
    let out = run(at(&url, &["offer", "-", "--model", "m"])).await;
    assert_eq!(out.code, 2, "{out:?}");
    let out = run(at(&url, &["offer", "--model", "m"])).await;
    assert_eq!(out.code, 2, "{out:?}");

    // A box that runs nothing declines: exit 8, the reason on stdout, nothing on stderr.
    let stopped = paused();
    let stopped_daemon = stopped.start().await;
    let stopped_url = server(&stopped_daemon);
    let out = run(at(&stopped_url, &flags)).await;
    assert_eq!((out.code, out.stderr.as_str()), (8, ""), "{out:?}");
    assert!(out.stdout.starts_with("offer     declined\n"), "{out:?}");
    assert!(out.stdout.contains("message"), "{out:?}");
    let mut json_flags = flags.to_vec();
    json_flags.push("--json");
    let out = run(at(&stopped_url, &json_flags)).await;
    assert_eq!(out.code, 8, "{out:?}");
    assert_eq!(out.json()["accepted"], false, "{out:?}");
    assert!(
        daemon.list_ids("Queued").await.is_empty(),
        "an offer stores nothing"
    );
    // An unreachable daemon is exit 1, as for every command.
    let nobody = format!("http://127.0.0.1:{}", free_port());
    run(at(&nobody, &flags))
        .await
        .assert_error(1, "cannot connect");
}
