//! The PostgreSQL store with the real binary against a throwaway PostgreSQL server of the
//! test's own (see `e2e_support/pg.rs`): jobs kept and recovered across a SIGKILL, the
//! database unreachable at start (exit 69), a second daemon of the same node id on the same
//! database (exit 75), the database stopped and started again under a running daemon (writes 503 and
//! `/readyz` 503 meanwhile, then back, nothing acknowledged lost), bad settings (exit 78).
//!
//! The shared suites run against this store too: CI runs them again with
//! `TW_TEST_STORE=postgres` (see `.ci/run`).

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

use reqwest::StatusCode;
use serde_json::Value;
use support::pg::{Postgres, skip};
use support::{Daemon, Sandbox, secs, text_job, wait_until};

/// A sandbox whose daemons keep their records in `url`.
fn sandbox_on(url: &str) -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.set_env("TRAINING_WORKER_STORE_KIND", "postgres");
    sandbox.set_env("TRAINING_WORKER_DATABASE_URL", url);
    sandbox
}

fn rows(server: &Postgres, url: &str, sql: &str) -> Vec<String> {
    server.query(url, sql).lines().map(str::to_string).collect()
}

async fn wait_exit_code(daemon: &mut Daemon) -> i32 {
    daemon
        .wait_exit(secs(20))
        .await
        .code()
        .expect("an exit code")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_kept_in_the_database_and_the_interrupted_one_runs_first_after_a_sigkill() {
    const TEST: &str =
        "jobs_are_kept_in_the_database_and_the_interrupted_one_runs_first_after_a_sigkill";
    let Some(server) = Postgres::shared(TEST) else {
        return;
    };
    let url = server.database();
    let sandbox = sandbox_on(&url);
    let daemon = sandbox.start().await;
    let a = daemon.submit(text_job("a")).await;
    sandbox.hold(&a);
    let b = daemon.submit(text_job("b")).await;
    let c = daemon.submit(text_job("c")).await;
    sandbox.trainer_started(&a, 1).await;

    // The rows say what the job files would: a Running, b and c queued in order.
    let status = |id: &str| {
        rows(
            server,
            &url,
            &format!("SELECT status, placement FROM tw_jobs WHERE id = '{id}'"),
        )
        .join("")
    };
    assert_eq!(status(&a), "Running|running");
    assert_eq!(status(&b), "Queued|queued");
    assert_eq!(
        rows(
            server,
            &url,
            "SELECT id FROM tw_jobs WHERE placement = 'queued' ORDER BY rank"
        ),
        [b.clone(), c.clone()]
    );
    // The row's body is the job as its file would hold it, unknown fields and all.
    let body: Value = serde_json::from_str(
        server
            .query(&url, &format!("SELECT body FROM tw_jobs WHERE id = '{a}'"))
            .trim(),
    )
    .expect("JSON");
    assert_eq!(body["status"], "Running");
    assert_eq!(body["attempts"], 1);
    assert_eq!(body["model"], "a");
    // No job files: the database holds the records.
    assert!(
        std::fs::read_dir(sandbox.jobs_dir()).map_or(true, |mut d| d.next().is_none()),
        "no job files with the database store"
    );
    // The trainer's JOB_FILE is a copy of the record.
    let copy = sandbox.data_dir().join("run").join(format!("{a}.json"));
    let copy: Value =
        serde_json::from_slice(&std::fs::read(&copy).expect("the job's copy")).expect("JSON");
    assert_eq!(copy["job_id"], a.as_str());

    daemon.kill();
    let daemon = sandbox.start().await;
    // The interrupted job first, then the queue in order, each once more for a.
    sandbox.release(&a);
    for id in [&a, &b, &c] {
        daemon.wait_status(id, "Completed", secs(30)).await;
    }
    assert_eq!(
        sandbox.starts(),
        [
            (a.clone(), 1),
            (a.clone(), 2),
            (b.clone(), 1),
            (c.clone(), 1)
        ]
    );
    let job = daemon.job(&a).await;
    assert_eq!(job["attempts"], 2, "{job}");
    assert_eq!(
        rows(
            server,
            &url,
            "SELECT count(*) FROM tw_jobs WHERE placement <> 'off'"
        ),
        ["0"]
    );
    // The copy is gone with the job's end.
    wait_until("the job's copy is removed", secs(10), async || {
        (!sandbox
            .data_dir()
            .join("run")
            .join(format!("{a}.json"))
            .exists())
        .then_some(())
    })
    .await;
    daemon.terminate(secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_at_start_is_exit_69_naming_it_without_its_password() {
    let sandbox = Sandbox::new();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    sandbox.set_env("TRAINING_WORKER_STORE_KIND", "postgres");
    sandbox.set_env(
        "TRAINING_WORKER_DATABASE_URL",
        format!("postgres://worker:s3cret@127.0.0.1:{port}/queue"),
    );
    let mut daemon = sandbox.spawn();
    assert_eq!(wait_exit_code(&mut daemon).await, 69);
    let stderr = daemon.stderr();
    assert!(
        stderr.contains(&format!("postgres://worker:***@127.0.0.1:{port}/queue")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("s3cret"),
        "the password is never shown: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_with_the_same_node_id_exits_75_naming_the_first() {
    const TEST: &str = "a_second_daemon_with_the_same_node_id_exits_75_naming_the_first";
    let Some(server) = Postgres::shared(TEST) else {
        return;
    };
    let url = server.database();
    let first = sandbox_on(&url);
    let daemon = first.start().await;
    // Another data dir, the same database, the same node id (both default to the host name).
    let second = sandbox_on(&url);
    let mut refused = second.spawn();
    assert_eq!(wait_exit_code(&mut refused).await, 75);
    let stderr = refused.stderr();
    assert!(
        stderr.contains("a live node named") && stderr.contains(&format!("pid {}", daemon.pid())),
        "{stderr}"
    );
    // The first serves on; once it has stopped, the database is free again.
    let id = daemon.submit(text_job("after")).await;
    daemon.wait_status(&id, "Completed", secs(30)).await;
    daemon.terminate(secs(20)).await;
    let daemon = second.start().await;
    let job = daemon.job(&id).await;
    assert_eq!(job["status"], "Completed", "{job}");
    daemon.terminate(secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_down_writes_are_503_and_readyz_503_then_it_reconnects_and_loses_nothing()
{
    const TEST: &str =
        "with_the_database_down_writes_are_503_and_readyz_503_then_it_reconnects_and_loses_nothing";
    // A server of this test's own: it is stopped and started again.
    let Some(server) = Postgres::start() else {
        skip(TEST, "no PostgreSQL server binaries are installed");
        return;
    };
    let url = server.database();
    let sandbox = sandbox_on(&url);
    let daemon = sandbox.start().await;
    let mut acknowledged = Vec::new();
    for n in 0..5 {
        acknowledged.push(daemon.submit(text_job(&format!("before-{n}"))).await);
    }

    server.stop();
    // Readiness says so within moments, and a submission is refused with nothing stored.
    wait_until("/readyz answers 503", secs(20), async || {
        let reply = daemon.try_get("/readyz").await?;
        (reply.status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    let readyz = daemon.get("/readyz").await;
    assert!(
        readyz.json()["reason"]
            .as_str()
            .is_some_and(|r| r.contains("database")),
        "{readyz:?}"
    );
    let refused = daemon.post_job(&text_job("while-down")).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{refused:?}"
    );
    // Reads go on from the worker's state.
    assert_eq!(
        daemon.job(&acknowledged[0]).await["job_id"],
        acknowledged[0].as_str()
    );

    server.run();
    wait_until("/readyz answers 200 again", secs(30), async || {
        let reply = daemon.try_get("/readyz").await?;
        (reply.status == StatusCode::OK).then_some(())
    })
    .await;
    for n in 0..5 {
        acknowledged.push(daemon.submit(text_job(&format!("after-{n}"))).await);
    }
    for id in &acknowledged {
        daemon.wait_status(id, "Completed", secs(60)).await;
    }
    daemon.terminate(secs(20)).await;

    // A new daemon reads every acknowledged job back, and the refused one is nowhere.
    let daemon = sandbox.start().await;
    for id in &acknowledged {
        assert_eq!(daemon.job(id).await["status"], "Completed");
    }
    assert_eq!(
        rows(&server, &url, "SELECT count(*) FROM tw_jobs"),
        [acknowledged.len().to_string()]
    );
    let all: Vec<Value> = daemon
        .get("/v1/jobs")
        .await
        .json()
        .as_array()
        .expect("a list")
        .clone();
    assert!(
        all.iter().all(|j| j["model"] != "while-down"),
        "the refused submission was not stored"
    );
    daemon.terminate(secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_settings_that_cannot_work_exit_78_naming_the_key() {
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[("TRAINING_WORKER_STORE_KIND", "postgres")],
            "store.url: empty",
        ),
        (
            &[("TRAINING_WORKER_STORE_KIND", "sqlite")],
            "TRAINING_WORKER_STORE_KIND: \"sqlite\" is not \"files\" or \"postgres\"",
        ),
        (
            &[
                ("TRAINING_WORKER_STORE_KIND", "postgres"),
                (
                    "TRAINING_WORKER_DATABASE_URL",
                    "postgres://u:pw@h:notaport/db",
                ),
            ],
            "TRAINING_WORKER_DATABASE_URL: \"postgres://u:***@h:notaport/db\" is not a PostgreSQL connection string",
        ),
        (
            &[("TRAINING_WORKER_DATABASE_URL", "postgres://127.0.0.1/db")],
            "is set, but store.kind is \"files\"",
        ),
    ];
    for (env, expected) in cases {
        let sandbox = Sandbox::new();
        for (name, value) in env {
            sandbox.set_env(name, *value);
        }
        let mut daemon = sandbox.spawn();
        assert_eq!(wait_exit_code(&mut daemon).await, 78, "{env:?}");
        let stderr = daemon.stderr();
        assert!(stderr.contains(expected), "{env:?}: {stderr}");
        assert!(!stderr.contains("pw@"), "{stderr}");
    }
}

/// Runs `training-worker migrate --from FROM --to TO`; its exit code and output.
fn migrate(from: &str, to: &str) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_training-worker"))
        .args(["migrate", "--from", from, "--to", to])
        .output()
        .expect("run migrate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("an exit code"), text)
}

/// Every job file of a data dir, by name.
fn job_files(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir.join("jobs"))
        .expect("jobs/")
        .map(|e| e.expect("an entry").path())
        .map(|p| {
            let name = p
                .file_name()
                .expect("a name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&p).expect("a job file"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_copies_a_data_dir_to_a_database_and_back_and_refuses_a_held_or_full_end() {
    const TEST: &str =
        "migrate_copies_a_data_dir_to_a_database_and_back_and_refuses_a_held_or_full_end";
    if support::postgres_store() {
        // The source here is a data dir of files by design.
        eprintln!("NOT RUN {TEST}: it starts from the file store");
        return;
    }
    let Some(server) = Postgres::shared(TEST) else {
        return;
    };
    // A data dir with finished, running (cut by a crash) and queued jobs.
    let sandbox = Sandbox::new();
    let daemon = sandbox.start().await;
    let done = daemon.submit(text_job("done")).await;
    daemon.wait_status(&done, "Completed", secs(30)).await;
    let cancelled = daemon.submit(text_job("cancelled")).await;
    let running = daemon.submit(text_job("running")).await;
    sandbox.hold(&running);
    daemon.cancel(&cancelled).await;
    sandbox.trainer_started(&running, 1).await;
    let queued: Vec<String> = [
        daemon.submit(text_job("q1")).await,
        daemon.submit(text_job("q2")).await,
        daemon.submit(text_job("q3")).await,
    ]
    .into();
    sandbox
        .wait_queue_file(&[&running], &[&queued[0], &queued[1], &queued[2]])
        .await;

    // Held by its daemon: refused, nothing written.
    let url = server.database();
    let dir = sandbox.data_dir().display().to_string();
    let (code, text) = migrate(&dir, &url);
    assert_eq!(code, 75, "{text}");
    assert!(text.contains("in use by another training-worker"), "{text}");
    assert_eq!(
        rows(
            server,
            &url,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'tw_jobs'"
        ),
        ["0"],
        "the destination was not even touched"
    );

    daemon.kill();
    let before = job_files(&sandbox.data_dir());
    let (code, text) = migrate(&dir, &url);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("copied 6 jobs (4 unfinished"), "{text}");
    assert_eq!(rows(server, &url, "SELECT count(*) FROM tw_jobs"), ["6"]);
    // Into a store that holds jobs: refused.
    let (code, text) = migrate(&dir, &url);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("already holds 6 jobs"), "{text}");

    // Back into a fresh data dir: the same files, byte for byte, and the same queue.
    let back = tempfile::tempdir().expect("a temp dir");
    let back_dir = back.path().join("data");
    let (code, text) = migrate(&url, &back_dir.display().to_string());
    assert_eq!(code, 0, "{text}");
    assert_eq!(job_files(&back_dir), before);
    let queue: Value =
        serde_json::from_slice(&std::fs::read(back_dir.join("queue.json")).expect("queue.json"))
            .expect("JSON");
    // The replay order, the interrupted job first (a boot lists every unfinished job as
    // queued until the worker has started one).
    let listed: Vec<Value> = queue["running"]
        .as_array()
        .into_iter()
        .chain(queue["queued"].as_array())
        .flatten()
        .cloned()
        .collect();
    let expected: Vec<Value> = std::iter::once(&running)
        .chain(&queued)
        .map(|id| Value::from(id.as_str()))
        .collect();
    assert_eq!(listed, expected);

    // A daemon on the database runs the interrupted job first, then the queue in order.
    let on_db = sandbox_on(&url);
    let records = sandbox.records_dir();
    let daemon = on_db.start().await;
    for id in [&running, &queued[0], &queued[1], &queued[2]] {
        daemon.wait_status(id, "Completed", secs(30)).await;
    }
    assert_eq!(daemon.job(&done).await["status"], "Completed");
    assert_eq!(daemon.job(&cancelled).await["status"], "Cancelled");
    let starts: Vec<(String, u32)> = on_db.starts();
    assert_eq!(
        starts,
        [
            (running.clone(), 2),
            (queued[0].clone(), 1),
            (queued[1].clone(), 1),
            (queued[2].clone(), 1)
        ],
        "{records:?}"
    );
    daemon.terminate(secs(20)).await;
}

/// What a submission under the restarts was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Stored,
    Refused,
    /// No answer (the connection broke, a timeout): either is possible.
    Unknown,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_restarted_under_load_loses_nothing_acknowledged_and_stores_nothing_refused() {
    const TEST: &str =
        "the_database_restarted_under_load_loses_nothing_acknowledged_and_stores_nothing_refused";
    let Some(server) = Postgres::start() else {
        skip(TEST, "no PostgreSQL server binaries are installed");
        return;
    };
    let url = server.database();
    let sandbox = sandbox_on(&url);
    // Paused: every stored job stays queued, so the check below sees exactly the submissions.
    sandbox.configure(&support::Settings {
        max_concurrent: 0,
        ..support::Settings::default()
    });
    let daemon = sandbox.start().await;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let answers = std::sync::Mutex::new(Vec::<(String, Answer)>::new());
    let stored = || {
        answers
            .lock()
            .expect("answers")
            .iter()
            .filter(|(_, a)| *a == Answer::Stored)
            .count()
    };
    let client = |n: usize| {
        let (daemon, stop, answers) = (&daemon, &stop, &answers);
        async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let id = uuid::Uuid::new_v4().to_string();
                let mut job = text_job(&format!("load-{n}-{i}"));
                job["job_id"] = Value::from(id.as_str());
                let answer = match daemon.try_post("/v1/jobs", &job).await {
                    Some(reply) if reply.status == StatusCode::CREATED => Answer::Stored,
                    Some(reply) if reply.status == StatusCode::SERVICE_UNAVAILABLE => {
                        Answer::Refused
                    }
                    Some(reply) => panic!("submission {id}: {reply:?}"),
                    None => Answer::Unknown,
                };
                answers.lock().expect("answers").push((id, answer));
                i += 1;
                if answer != Answer::Stored {
                    // Not a busy loop while the database is away.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        }
    };
    let restarts = async {
        for round in 0..3 {
            let before = stored();
            wait_until(
                format_args!("round {round}: 50 more jobs are stored"),
                secs(60),
                async || (stored() >= before + 50).then_some(()),
            )
            .await;
            server.stop();
            wait_until(
                format_args!("round {round}: /readyz says the database is away"),
                secs(20),
                async || {
                    let reply = daemon.try_get("/readyz").await?;
                    (reply.status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
                },
            )
            .await;
            server.run();
            wait_until(
                format_args!("round {round}: /readyz says 200 again"),
                secs(30),
                async || {
                    let reply = daemon.try_get("/readyz").await?;
                    (reply.status == StatusCode::OK).then_some(())
                },
            )
            .await;
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    futures_util::future::join(futures_util::future::join_all((0..8).map(client)), restarts).await;
    daemon.terminate(secs(20)).await;

    // A new daemon reads back every acknowledged job, and none that was refused.
    let daemon = sandbox.start().await;
    let answers = answers.into_inner().expect("answers");
    let count = |which: Answer| answers.iter().filter(|(_, a)| *a == which).count();
    eprintln!(
        "stored {}, refused {}, unknown {}",
        count(Answer::Stored),
        count(Answer::Refused),
        count(Answer::Unknown)
    );
    assert!(count(Answer::Refused) > 0, "the restarts were seen");
    for (id, answer) in &answers {
        let reply = daemon.get(&format!("/v1/jobs/{id}")).await;
        match answer {
            Answer::Stored => assert_eq!(reply.status, StatusCode::OK, "acknowledged {id} lost"),
            Answer::Refused => assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "refused {id} was stored"
            ),
            Answer::Unknown => {}
        }
    }
    let queued = rows(
        &server,
        &url,
        "SELECT count(*) FROM tw_jobs WHERE placement = 'queued'",
    );
    let at_most = count(Answer::Stored) + count(Answer::Unknown);
    let queued: usize = queued[0].parse().expect("a count");
    assert!(
        queued >= count(Answer::Stored) && queued <= at_most,
        "{queued} rows for {} stored and {} unknown",
        count(Answer::Stored),
        count(Answer::Unknown)
    );
    daemon.terminate(secs(20)).await;
}
