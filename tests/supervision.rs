//! Each trainer under its supervisor, end to end with the real binary: a trainer that
//! cannot be started leaves the queue as it was and the jobs start once it is back; a
//! wrapper script's whole tree dies with a SIGKILLed daemon and with its job, processes
//! that left the job's process group (or dropped the owner mark) included; a GPU is given
//! to the next job only once the tree of the last is gone; a job's log is capped and
//! rotated, and `logs --follow` reads on across the rotations.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{STUB_TRAINER, Sandbox, pid_alive, secs, wait_until};

/// Writes an executable bash script into the sandbox.
fn script(sandbox: &Sandbox, name: &str, body: &str) -> PathBuf {
    let path = sandbox.path().join(name);
    fs::write(&path, format!("#!/usr/bin/env bash\nset -u\n{body}")).expect("write a script");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("make it executable");
    path
}

fn configure(sandbox: &Sandbox, command: &Path, extra: &str) {
    let command = serde_json::to_string(&command.to_string_lossy()).expect("a string");
    sandbox.write_config(&format!(
        "shutdown_grace = \"10s\"\n{extra}\n[executor]\ncommand = [{command}]\ntimeout = \"60s\"\n\
         kill_grace = \"2s\"\npass_env = []\n"
    ));
}

/// The pids a tree script wrote, one a line, once there are `n`.
async fn pids(file: &Path, n: usize) -> Vec<i32> {
    wait_until(
        format_args!("{n} pids in {}", file.display()),
        secs(10),
        async || {
            let text = fs::read_to_string(file).unwrap_or_default();
            let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            (pids.len() >= n).then_some(pids)
        },
    )
    .await
}

/// The sample `name` of a scrape, whatever its labels (every sample has the node's).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no {name} in the metrics:\n{text}"))
}

fn job(n: u32) -> Value {
    json!({
        "type": "DiffusionJob",
        "job_id": format!("5e1f0000-0000-4000-8000-{n:012x}"),
        "model": "ok",
        "dataset_zip": "images.zip",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_that_cannot_start_keeps_the_queue_and_the_jobs_start_when_it_is_back() {
    let sandbox = Sandbox::new();
    // The trainer the config names, moved away after the daemon has started (a redeploy).
    let trainer = script(
        &sandbox,
        "trainer",
        &format!("exec {STUB_TRAINER:?} \"$@\"\n"),
    );
    let away = sandbox.path().join("trainer.away");
    configure(&sandbox, &trainer, "[worker]\nmax_concurrent = 2\n");
    let daemon = sandbox.start().await;
    fs::rename(&trainer, &away).expect("move the trainer away");

    let ids: Vec<String> = [
        daemon.submit(job(1)).await,
        daemon.submit(job(2)).await,
        daemon.submit(job(3)).await,
    ]
    .into();
    // Several tries fail, with backoff; the jobs stay queued and uncounted meanwhile.
    wait_until("three failed tries", secs(20), async || {
        let metrics = daemon.get("/metrics").await.text;
        (metric(&metrics, "training_worker_trainer_spawn_failures_total") >= 3.0).then_some(())
    })
    .await;
    // Each try holds its job as Running for the moment it takes to fail, so the jobs are
    // looked at between tries: all queued, none counted, in memory and on disk.
    let queue = wait_until(
        "the jobs queued and uncounted between tries",
        secs(20),
        async || {
            for id in &ids {
                let job = daemon.job(id).await;
                if job["status"] != "Queued" || job["attempts"] != 0 {
                    return None;
                }
                if sandbox.job_file(id)["status"] != "Queued" {
                    return None;
                }
            }
            let queue = daemon.get("/v1/queue").await.json();
            (queue["queued"].as_array().map(Vec::len) == Some(3)).then_some(queue)
        },
    )
    .await;
    let paused = queue["paused"].as_str().unwrap_or_default();
    assert!(
        paused.starts_with("trainers cannot be started") && paused.contains("No such file"),
        "{queue}"
    );
    assert_eq!(daemon.get("/readyz").await.status, StatusCode::OK);
    // Logged once for the episode, not once per try.
    let warning = "a trainer could not be started";
    assert_eq!(
        daemon.stderr().matches(warning).count(),
        1,
        "{}",
        daemon.stderr()
    );

    fs::rename(&away, &trainer).expect("put the trainer back");
    for id in &ids {
        let job = daemon.wait_status(id, "Completed", secs(60)).await;
        assert_eq!(job["attempts"], 1, "{job}");
    }
    assert!(
        daemon
            .stderr()
            .contains("a trainer started again; starts resume")
    );
    assert_eq!(daemon.get("/v1/queue").await.json()["paused"], Value::Null);
    let starts = sandbox.starts();
    assert_eq!(starts.len(), 3, "every job ran once: {starts:?}");
}

/// A wrapper's tree: a child with a grandchild, a process that left the process group, and
/// one that also dropped the owner mark. Writes their pids to `tree-pids`, then runs.
const TREE: &str = r#"records="$TW_DATA_DIR/../trainer-records"
mkdir -p "$records"
( sleep 300 & echo "$!" >> "$records/tree-pids"; wait ) &
echo "$!" >> "$records/tree-pids"
setsid sleep 301 &
echo "$!" >> "$records/tree-pids"
env -u TW_DATA_DIR setsid sleep 302 &
echo "$!" >> "$records/tree-pids"
echo "$$" >> "$records/tree-pids"
echo "tree is up"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapper_trainers_whole_tree_dies_with_a_sigkilled_daemon() {
    let sandbox = Sandbox::new();
    let trainer = script(&sandbox, "tree", &format!("{TREE}wait\n"));
    configure(&sandbox, &trainer, "");
    let daemon = sandbox.start().await;
    let id = daemon.submit(job(1)).await;
    daemon.wait_status(&id, "Running", secs(10)).await;
    let tree = pids(&sandbox.records_dir().join("tree-pids"), 5).await;
    assert!(
        tree.iter().all(|p| pid_alive(*p)),
        "the tree runs: {tree:?}"
    );

    daemon.kill();
    // Nobody restarts the daemon: the tree must go by itself.
    wait_until("every process of the tree is gone", secs(10), async || {
        tree.iter().all(|p| !pid_alive(*p)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_a_finished_job_outlives_it_and_its_gpu_waits_for_the_whole_tree() {
    let sandbox = Sandbox::new();
    // The leader exits at once, without a final newline, leaving its tree behind.
    let trainer = script(
        &sandbox,
        "tree",
        &format!("{TREE}printf 'last words without a newline'\nexit 0\n"),
    );
    configure(
        &sandbox,
        &trainer,
        "[worker]\nmax_concurrent = 2\ngpus = [0]\n",
    );
    let daemon = sandbox.start().await;
    let first = daemon.submit(job(1)).await;
    let second = daemon.submit(job(2)).await;

    let done = daemon.wait_status(&first, "Completed", secs(20)).await;
    assert_eq!(done["gpu_ids"], json!([0]), "{done}");
    let tree = pids(&sandbox.records_dir().join("tree-pids"), 5).await;
    // Reported only once the tree was gone: nothing of it is left now.
    let left: Vec<i32> = tree[..5]
        .iter()
        .copied()
        .filter(|p| pid_alive(*p))
        .collect();
    assert!(left.is_empty(), "left of a finished job: {left:?}");

    // The second job got the one GPU after that, and its own tree was cleaned up too.
    let done = daemon.wait_status(&second, "Completed", secs(20)).await;
    assert_eq!(done["gpu_ids"], json!([0]), "{done}");
    let tree = pids(&sandbox.records_dir().join("tree-pids"), 10).await;
    assert!(tree.iter().all(|p| !pid_alive(*p)), "{tree:?}");

    // A marker of the daemon's starts a line of its own after output without a newline.
    let log = daemon.logs(&first).await;
    assert!(
        log.contains("last words without a newline\n==> trainer ended"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_is_capped_and_rotated_and_a_follower_reads_every_line_across_rotations() {
    let sandbox = Sandbox::new();
    // 120 lines of about 1 KiB, ten a second: the 16 KiB log rotates every ~1.6 s, slower
    // than a follower polls.
    let trainer = script(
        &sandbox,
        "chatty",
        "pad=$(printf '%01000d' 0)\nfor i in $(seq 1 120); do echo \"line $i $pad\"; sleep 0.1; done\n",
    );
    configure(&sandbox, &trainer, "");
    let text = fs::read_to_string(sandbox.config_file()).expect("the config");
    sandbox.write_config(&text.replace("[executor]\n", "[executor]\nmax_log_bytes = \"16k\"\n"));
    let daemon = sandbox.start().await;
    let id = daemon.submit(job(1)).await;

    let follower = tokio::process::Command::new(env!("CARGO_BIN_EXE_training-worker"))
        .args(["logs", "--follow", &id, "--server", daemon.base()])
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the follower");
    let output = tokio::time::timeout(secs(60), follower.wait_with_output())
        .await
        .expect("the follower ends with the job")
        .expect("the follower's output");
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8_lossy(&output.stdout);
    let numbers: Vec<u32> = printed
        .lines()
        .filter_map(|l| l.strip_prefix("line ")?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(
        numbers,
        (1..=120).collect::<Vec<u32>>(),
        "every line once, in order"
    );

    let logs = sandbox.data_dir().join("logs");
    let current = fs::metadata(logs.join(format!("{id}.log")))
        .expect("the log")
        .len();
    let rotated = fs::metadata(logs.join(format!("{id}.log.1")))
        .expect("a rotated part")
        .len();
    // Within the cap, give or take the last write before a rotation (64 KiB at most).
    assert!(current < 16 * 1024 + 64 * 1024, "{current}");
    assert!(rotated < 16 * 1024 + 64 * 1024, "{rotated}");
}
