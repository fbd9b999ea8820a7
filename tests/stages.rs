//! The stage pipeline (`[[executor.stages]]`), end to end: a job runs download, train and
//! upload in order, each finished stage but the last is recorded in the job file's
//! `stages_done` before the next starts, and a job recovered after a crash or a graceful
//! stop resumes at its first unrecorded stage. What ran is judged from what the stage script
//! (tests/trainers/stage.sh) recorded, not from what the API says.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

use std::fs;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Daemon, Sandbox, normalise, pid_alive, secs, stage_begins, stage_lines, wait_until};

const STAGE_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/trainers/stage.sh");
const STAGES: [&str; 3] = ["download", "train", "upload"];
const MODEL: &str = "Qwen/Qwen2.5-0.5B";

/// The pipeline config: three process stages of the stage script, with placeholders.
/// Download has a stage timeout of its own, above any budget the tests give.
fn configure(sandbox: &Sandbox, max_concurrent: usize, max_attempts: u32) {
    let program = serde_json::to_string(STAGE_SCRIPT).expect("a string serialises");
    let mut text = format!(
        "shutdown_grace = \"10s\"\n\n[worker]\nmax_concurrent = {max_concurrent}\n\
         max_attempts = {max_attempts}\n\n[executor]\ntimeout = \"60s\"\nkill_grace = \"2s\"\n\
         pass_env = []\n"
    );
    for stage in STAGES {
        text.push_str(&format!(
            "\n[[executor.stages]]\nname = \"{stage}\"\nkind = \"process\"\n\
             command = [{program}, \"--job={{job_id}}\", \"--task-type={{task_type}}\", \
             \"--stage={{stage}}\", \"--attempt={{attempt}}\", \"--model={{model}}\", \
             \"--data-dir={{data_dir}}\", \"--literal={{{{x}}}}\"]\n"
        ));
        if stage == "download" {
            text.push_str("timeout = \"30s\"\n");
        }
    }
    sandbox.write_config(&text);
}

/// An instruct TextJob with a fixed id.
fn job(id: &str) -> Value {
    json!({
        "type": "TextJob",
        "job_id": id,
        "model": MODEL,
        "dataset": "s3://bucket/train.json",
        "dataset_type": {"field_instruction": "instruction", "field_output": "output"},
        "file_format": "s3",
    })
}

fn id(n: u128) -> String {
    uuid::Uuid::from_u128(0x5747_0000_0000_4000_8000_0000_0000_0000 | n).to_string()
}

/// Makes `stage` of job `job` wait after its start until [`release`].
fn hold(sandbox: &Sandbox, job: &str, stage: &str) {
    fs::write(sandbox.path().join(format!("hold-{job}-{stage}")), b"").expect("hold");
}

fn release(sandbox: &Sandbox, job: &str, stage: &str) {
    fs::remove_file(sandbox.path().join(format!("hold-{job}-{stage}"))).expect("release");
}

/// Makes `stage` of job `job` exit with `status`.
fn fail(sandbox: &Sandbox, job: &str, stage: &str, status: i32) {
    fs::write(
        sandbox.path().join(format!("fail-{job}-{stage}")),
        status.to_string(),
    )
    .expect("write a fail file");
}

/// One line of the stage script's records.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Note {
    /// `start`, `end` (finished by itself) or `term` (stopped by SIGTERM).
    kind: String,
    /// `$STAGE` as the script saw it.
    stage: String,
    job: String,
    attempt: u32,
    pid: i32,
}

/// Everything the stage script recorded so far, complete lines only.
fn notes(sandbox: &Sandbox) -> Vec<Note> {
    let text = fs::read_to_string(sandbox.path().join("stage-records")).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .map(|line| match line.split(' ').collect::<Vec<_>>()[..] {
            [kind, stage, job, attempt, pid] => Note {
                kind: kind.into(),
                stage: stage.into(),
                job: job.into(),
                attempt: attempt.parse().expect("attempt is a number"),
                pid: pid.parse().expect("pid is a number"),
            },
            _ => panic!("bad stage record {line:?}"),
        })
        .collect()
}

/// `job`'s records as (kind, stage, attempt), in order.
fn runs(sandbox: &Sandbox, job: &str) -> Vec<(String, String, u32)> {
    notes(sandbox)
        .into_iter()
        .filter(|n| n.job == job)
        .map(|n| (n.kind, n.stage, n.attempt))
        .collect()
}

fn run(kind: &str, stage: &str, attempt: u32) -> (String, String, u32) {
    (kind.into(), stage.into(), attempt)
}

/// Records as [`runs`] gives them, written `kind stage attempt` and separated by commas:
/// `"start download 1, end download 1"`.
fn ran(list: &str) -> Vec<(String, String, u32)> {
    list.split(", ")
        .map(|note| match note.split(' ').collect::<Vec<_>>()[..] {
            [kind, stage, attempt] => run(kind, stage, attempt.parse().expect("an attempt")),
            _ => panic!("not `kind stage attempt`: {note:?}"),
        })
        .collect()
}

/// Waits until `stage` of `job` has started in run number `attempt`; its pid.
async fn stage_started(sandbox: &Sandbox, job: &str, stage: &str, attempt: u32) -> i32 {
    wait_until(
        format_args!("stage {stage} of job {job} starts (attempt {attempt})"),
        secs(15),
        async || {
            notes(sandbox)
                .into_iter()
                .find(|n| {
                    n.kind == "start" && n.stage == stage && n.job == job && n.attempt == attempt
                })
                .map(|n| n.pid)
        },
    )
    .await
}

/// The argv the stage script got in `stage` of run `attempt`, without the program.
fn argv(sandbox: &Sandbox, job: &str, stage: &str, attempt: u32) -> Vec<String> {
    let path = sandbox.path().join(format!("argv-{job}-{stage}-{attempt}"));
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().map(String::from).collect()
}

fn stages_done(job_file: &Value) -> Vec<String> {
    match &job_file["stages_done"] {
        Value::Null => Vec::new(),
        Value::Array(names) => names
            .iter()
            .map(|n| n.as_str().expect("a stage name").to_string())
            .collect(),
        other => panic!("stages_done is not a list: {other}"),
    }
}

/// The job log with the times taken out: `started at T` becomes `started`, and
/// `ended after D: how` becomes `ended: how`.
fn normalised_log(sandbox: &Sandbox, job: &str) -> Vec<String> {
    let path = sandbox.data_dir().join("logs").join(format!("{job}.log"));
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    normalise(&text)
}

fn skipped(stage: &str, index: usize) -> String {
    format!("==> stage {stage} ({index}/3): finished in an earlier attempt; skipped")
}

/// Proves that the daemon has worked through its queue: a job without holds, submitted
/// now, runs all its stages to Completed. With `max_concurrent = 1` and interrupted jobs
/// first, anything that would still run for another job has run before it.
async fn sentinel_completes(daemon: &Daemon, sandbox: &Sandbox, n: u128) {
    let sentinel = id(n);
    daemon.submit(job(&sentinel)).await;
    daemon.wait_status(&sentinel, "Completed", secs(20)).await;
    let ends: Vec<String> = runs(sandbox, &sentinel)
        .into_iter()
        .filter(|(kind, _, _)| kind == "end")
        .map(|(_, stage, _)| stage)
        .collect();
    assert_eq!(ends, STAGES, "the sentinel ran every stage once");
}

/// Writes the pipeline config (`max_concurrent = 1`), starts a daemon, holds each stage of
/// `held` of job `a` and submits `a`.
async fn start_with_job(sandbox: &Sandbox, max_attempts: u32, a: &str, held: &[&str]) -> Daemon {
    configure(sandbox, 1, max_attempts);
    let daemon = sandbox.start().await;
    for stage in held {
        hold(sandbox, a, stage);
    }
    daemon.submit(job(a)).await;
    daemon
}

async fn pid_gone(pid: i32, what: &str) {
    wait_until(
        format_args!("the process of {what} ({pid}) is gone"),
        secs(5),
        async || (!pid_alive(pid)).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_single_command_renders_the_placeholders_of_stages() {
    let sandbox = Sandbox::new();
    let program = serde_json::to_string(STAGE_SCRIPT).expect("a string serialises");
    sandbox.write_config(&format!(
        "shutdown_grace = \"10s\"\n[executor]\ntimeout = \"60s\"\nkill_grace = \"2s\"\n\
         command = [{program}, \"--job={{job_id}}\", \"--model={{model}}\", \
         \"--attempt={{attempt}}\", \"--literal={{{{x}}}}\", \"plain words\"]\n"
    ));
    let daemon = sandbox.start().await;
    let a = id(1);
    assert_eq!(daemon.submit(job(&a)).await, a);
    daemon.wait_status(&a, "Completed", secs(20)).await;
    assert_eq!(
        argv(&sandbox, &a, "command", 1),
        [
            format!("--job={a}"),
            format!("--model={MODEL}"),
            "--attempt=1".to_string(),
            "--literal={x}".to_string(),
            "plain words".to_string(),
        ]
    );

    // An unknown placeholder is a configuration error at start, naming the setting.
    sandbox.write_config(&format!(
        "[executor]\ncommand = [{program}, \"--job={{jobid}}\"]\n"
    ));
    let mut refused = sandbox.spawn();
    let status = refused.wait_exit(secs(10)).await;
    let stderr = refused.stderr();
    assert_eq!(status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("executor.command") && stderr.contains("{jobid}"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_run_in_order_with_rendered_placeholders_and_each_is_recorded_before_the_next() {
    let sandbox = Sandbox::new();
    let a = id(1);
    let daemon = start_with_job(&sandbox, 3, &a, &["train", "upload"]).await;

    // Train has started, so download has finished, and is on disk before train began.
    stage_started(&sandbox, &a, "train", 1).await;
    let file = sandbox.job_file(&a);
    assert_eq!(file["status"], "Running", "{file}");
    assert_eq!(stages_done(&file), ["download"], "{file}");
    assert_eq!(stages_done(&daemon.job(&a).await), ["download"]);
    assert_eq!(
        runs(&sandbox, &a),
        ran("start download 1, end download 1, start train 1")
    );

    release(&sandbox, &a, "train");
    stage_started(&sandbox, &a, "upload", 1).await;
    let file = sandbox.job_file(&a);
    assert_eq!(file["status"], "Running", "{file}");
    assert_eq!(stages_done(&file), ["download", "train"], "{file}");

    release(&sandbox, &a, "upload");
    let done = daemon.wait_status(&a, "Completed", secs(15)).await;
    assert_eq!(done["attempts"], 1, "{done}");
    assert_eq!(done["error_message"], Value::Null, "{done}");
    // The last stage is recorded with the end, like every other stage before it.
    assert_eq!(
        stages_done(&done),
        ["download", "train", "upload"],
        "{done}"
    );
    assert_eq!(sandbox.job_file(&a), done, "the API shows the job file");

    let mut expected = Vec::new();
    for stage in STAGES {
        expected.push(run("start", stage, 1));
        expected.push(run("end", stage, 1));
    }
    assert_eq!(runs(&sandbox, &a), expected);

    // Each stage got its own name in $STAGE (in the records) and in {stage}, and the
    // job's values in the other placeholders, each as one argument.
    let data_dir = sandbox.data_dir().display().to_string();
    for stage in STAGES {
        assert_eq!(
            argv(&sandbox, &a, stage, 1),
            [
                format!("--job={a}"),
                "--task-type=InstructTextTask".to_string(),
                format!("--stage={stage}"),
                "--attempt=1".to_string(),
                format!("--model={MODEL}"),
                format!("--data-dir={data_dir}"),
                "--literal={x}".to_string(),
            ],
            "argv of {stage}"
        );
    }

    let mut log = vec!["==> attempt 1 started".to_string()];
    for (i, stage) in STAGES.iter().enumerate() {
        log.extend(stage_lines(stage, i + 1, &a, 1));
    }
    assert_eq!(normalised_log(&sandbox, &a), log);
    assert_eq!(normalise(&daemon.logs(&a).await), log, "GET .../logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_resumes_at_the_first_unrecorded_stage_and_a_recorded_one_never_runs_again() {
    let sandbox = Sandbox::new();
    let a = id(1);
    let daemon = start_with_job(&sandbox, 5, &a, &STAGES).await;

    // A crash while download runs: it has not finished, so it runs again.
    let pid = stage_started(&sandbox, &a, "download", 1).await;
    assert_eq!(stages_done(&sandbox.job_file(&a)), Vec::<String>::new());
    daemon.kill();
    pid_gone(pid, "download, attempt 1").await;
    let daemon = sandbox.start().await;
    stage_started(&sandbox, &a, "download", 2).await;

    // A crash at the boundary after download: recorded, so only train runs again.
    release(&sandbox, &a, "download");
    let pid = stage_started(&sandbox, &a, "train", 2).await;
    let file = sandbox.job_file(&a);
    assert_eq!(stages_done(&file), ["download"], "{file}");
    assert_eq!(file["attempts"], 2, "{file}");
    daemon.kill();
    pid_gone(pid, "train, attempt 2").await;
    let daemon = sandbox.start().await;
    stage_started(&sandbox, &a, "train", 3).await;

    // A crash at the boundary after train: only upload runs again.
    release(&sandbox, &a, "train");
    let pid = stage_started(&sandbox, &a, "upload", 3).await;
    let file = sandbox.job_file(&a);
    assert_eq!(stages_done(&file), ["download", "train"], "{file}");
    assert_eq!(file["attempts"], 3, "{file}");
    daemon.kill();
    pid_gone(pid, "upload, attempt 3").await;
    let daemon = sandbox.start().await;
    stage_started(&sandbox, &a, "upload", 4).await;
    release(&sandbox, &a, "upload");
    let done = daemon.wait_status(&a, "Completed", secs(15)).await;
    assert_eq!(done["attempts"], 4, "{done}");

    // Each stage ran again only while it was not recorded, and ran to its end exactly once,
    // after which it never started again. The killed runs left no end (SIGKILL).
    assert_eq!(
        runs(&sandbox, &a),
        ran(
            "start download 1, start download 2, end download 2, start train 2, start train 3, \
             end train 3, start upload 3, start upload 4, end upload 4"
        )
    );
    // Each attempt says which stages it skipped.
    let log = normalised_log(&sandbox, &a);
    let attempt = |n: u32| -> Vec<String> {
        let header = format!("==> attempt {n} started");
        let from = log
            .iter()
            .position(|l| *l == header)
            .unwrap_or_else(|| panic!("no {header:?} in {log:#?}"));
        let to = log[from + 1..]
            .iter()
            .position(|l| l.starts_with("==> attempt "))
            .map_or(log.len(), |i| from + 1 + i);
        log[from..to].to_vec()
    };
    let mut third = vec!["==> attempt 3 started".to_string(), skipped("download", 1)];
    third.extend(stage_lines("train", 2, &a, 3));
    third.extend(stage_begins("upload", 3, &a, 3));
    assert_eq!(attempt(3), third);
    let mut last = vec![
        "==> attempt 4 started".to_string(),
        skipped("download", 1),
        skipped("train", 2),
    ];
    last.extend(stage_lines("upload", 3, &a, 4));
    assert_eq!(attempt(4), last);

    // A Completed job never runs anything again, after a crash either.
    daemon.kill();
    let daemon = sandbox.start().await;
    let before = runs(&sandbox, &a);
    sentinel_completes(&daemon, &sandbox, 2).await;
    assert_eq!(
        runs(&sandbox, &a),
        before,
        "nothing of the completed job ran"
    );
    let after = daemon.job(&a).await;
    assert_eq!(after["status"], "Completed", "{after}");
    assert_eq!(after["attempts"], 4, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_during_train_resumes_at_train_without_counting_the_start() {
    let sandbox = Sandbox::new();
    let a = id(1);
    let daemon = start_with_job(&sandbox, 3, &a, &["train"]).await;
    stage_started(&sandbox, &a, "train", 1).await;

    let (status, _) = daemon.terminate(secs(15)).await;
    assert!(status.success(), "a graceful stop exits 0: {status}");
    // Train was stopped (SIGTERM), and the job went back to the queue with download kept
    // and the cut start taken back.
    assert_eq!(runs(&sandbox, &a).last(), Some(&run("term", "train", 1)));
    let file = sandbox.job_file(&a);
    assert_eq!(file["status"], "Queued", "{file}");
    assert_eq!(stages_done(&file), ["download"], "{file}");
    assert_eq!(file["attempts"], 0, "{file}");
    sandbox.wait_queue_file(&[], &[&a]).await;

    release(&sandbox, &a, "train");
    let daemon = sandbox.start().await;
    let done = daemon.wait_status(&a, "Completed", secs(15)).await;
    assert_eq!(
        done["attempts"], 1,
        "the graceful stop did not count: {done}"
    );
    assert_eq!(
        runs(&sandbox, &a),
        ran(
            "start download 1, end download 1, start train 1, term train 1, start train 1, \
             end train 1, start upload 1, end upload 1"
        )
    );
    let mut log = vec!["==> attempt 1 started".to_string()];
    log.extend(stage_lines("download", 1, &a, 1));
    log.extend(stage_begins("train", 2, &a, 1));
    log.extend([
        "train got SIGTERM; stopping".to_string(),
        "==> stage train ended: stopped on request".to_string(),
        "==> attempt 1 started".to_string(),
        skipped("download", 1),
    ]);
    log.extend(stage_lines("train", 2, &a, 1));
    log.extend(stage_lines("upload", 3, &a, 1));
    assert_eq!(normalised_log(&sandbox, &a), log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_stage_fails_the_job_naming_the_stage_and_later_stages_never_run() {
    let sandbox = Sandbox::new();
    let a = id(1);
    fail(&sandbox, &a, "train", 7);
    let daemon = start_with_job(&sandbox, 3, &a, &[]).await;
    let failed = daemon.wait_status(&a, "Failed", secs(15)).await;
    assert_eq!(
        failed["error_message"],
        "stage train: trainer exited with status 7; last output: fatal: train ran out of disk (stub)",
        "{failed}"
    );
    assert_eq!(stages_done(&failed), ["download"], "{failed}");
    assert_eq!(failed["attempts"], 1, "{failed}");
    assert_eq!(
        runs(&sandbox, &a),
        ran("start download 1, end download 1, start train 1, end train 1")
    );
    let mut log = vec!["==> attempt 1 started".to_string()];
    log.extend(stage_lines("download", 1, &a, 1));
    log.extend(stage_begins("train", 2, &a, 1));
    log.extend([
        "train: half done".to_string(),
        "fatal: train ran out of disk (stub)".to_string(),
        "==> stage train ended: exit status 7".to_string(),
    ]);
    assert_eq!(normalised_log(&sandbox, &a), log);

    // Nothing of it runs later: the next job runs all its stages, and the failed one none.
    sentinel_completes(&daemon, &sandbox, 2).await;
    assert!(
        !runs(&sandbox, &a)
            .iter()
            .any(|(_, stage, _)| stage == "upload"),
        "{:?}",
        runs(&sandbox, &a)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_a_stage_stops_it_and_nothing_of_the_job_runs_again() {
    let sandbox = Sandbox::new();
    let a = id(1);
    let daemon = start_with_job(&sandbox, 3, &a, &["train"]).await;
    let pid = stage_started(&sandbox, &a, "train", 1).await;

    let reply = daemon.cancel(&a).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["status"], "Cancelled", "{reply:?}");
    pid_gone(pid, "train").await;
    sandbox.assert_no_trainers_left().await;
    wait_until("the log says train was stopped", secs(10), async || {
        normalised_log(&sandbox, &a)
            .contains(&"==> stage train ended: stopped on request".to_string())
            .then_some(())
    })
    .await;
    let file = sandbox.job_file(&a);
    assert_eq!(file["status"], "Cancelled", "{file}");
    assert_eq!(stages_done(&file), ["download"], "{file}");

    // Were the job to run again, train would now go through and upload would follow.
    release(&sandbox, &a, "train");
    sentinel_completes(&daemon, &sandbox, 2).await;
    daemon.kill();
    let daemon = sandbox.start().await;
    sentinel_completes(&daemon, &sandbox, 3).await;
    assert_eq!(
        runs(&sandbox, &a),
        ran("start download 1, end download 1, start train 1, term train 1")
    );
    assert_eq!(daemon.job(&a).await["status"], "Cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_budget_is_fixed_at_acceptance_and_bounds_the_stage_that_runs_past_it() {
    let sandbox = Sandbox::new();
    // Paused: the job waits in the queue with its deadline through a crash.
    configure(&sandbox, 0, 3);
    let daemon = sandbox.start().await;
    let a = id(1);
    let mut body = job(&a);
    body["hours_to_complete"] = json!(1);
    daemon.submit(body).await;
    let file = sandbox.job_file(&a);
    let deadline = file["deadline"].as_str().expect("a deadline").to_string();
    let created = timestamp(&file["created_at"]);
    assert_eq!(
        timestamp(&file["deadline"]) - created,
        chrono::Duration::hours(1),
        "{file}"
    );
    daemon.kill();
    let daemon = sandbox.start().await;
    let file = sandbox.job_file(&a);
    assert_eq!(file["status"], "Queued", "{file}");
    assert_eq!(file["deadline"], deadline, "{file}");
    assert_eq!(daemon.job(&a).await["deadline"], deadline);

    // Unpaused, it runs within its budget, and its deadline stays what it was.
    let _ = daemon.terminate(secs(15)).await;
    configure(&sandbox, 1, 3);
    let daemon = sandbox.start().await;
    let done = daemon.wait_status(&a, "Completed", secs(15)).await;
    assert_eq!(done["deadline"], deadline, "{done}");
    assert_eq!(sandbox.job_file(&a)["deadline"], deadline);

    // 0.0005 h is 1.8 s: download, held, would run far longer (its own timeout is 30 s).
    let b = id(2);
    hold(&sandbox, &b, "download");
    let mut body = job(&b);
    body["hours_to_complete"] = json!(0.0005);
    daemon.submit(body).await;
    let pid = stage_started(&sandbox, &b, "download", 1).await;
    let failed = daemon.wait_status(&b, "Failed", secs(15)).await;
    let message = failed["error_message"].as_str().expect("an error message");
    assert!(
        message.starts_with("stage download: the time budget (hours_to_complete) ran out"),
        "{message}"
    );
    assert!(
        message.ends_with("; last output: download got SIGTERM; stopping"),
        "{message}"
    );
    let budget = timestamp(&failed["deadline"]) - timestamp(&failed["created_at"]);
    assert_eq!(budget, chrono::Duration::milliseconds(1800), "{failed}");
    let took = timestamp(&failed["finished_at"]) - timestamp(&failed["created_at"]);
    assert!(
        took >= budget && took < budget + chrono::Duration::seconds(5),
        "failed {took} after acceptance: {failed}"
    );
    pid_gone(pid, "download").await;
    assert_eq!(
        runs(&sandbox, &b),
        [run("start", "download", 1), run("term", "download", 1)]
    );
    assert_eq!(stages_done(&failed), Vec::<String>::new());
}

fn timestamp(value: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {value}"));
    chrono::DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// Busy-waits (no sleep: the moment matters) until `job`'s records hold `note`.
fn spin_until_noted(sandbox: &Sandbox, job: &str, note: (String, String, u32)) {
    let started = std::time::Instant::now();
    while !runs(sandbox, job).contains(&note) {
        assert!(
            started.elapsed() < secs(10),
            "{note:?} was never recorded: {:?}",
            runs(sandbox, job)
        );
    }
}

/// Every daemon's stderr in the sandbox so far.
fn daemon_stderr(sandbox: &Sandbox) -> String {
    let mut files: Vec<_> = fs::read_dir(sandbox.path())
        .expect("read the sandbox")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "stderr"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| fs::read_to_string(f).unwrap_or_default())
        .collect()
}

/// A graceful stop that comes just as a stage exits, while its record is being written:
/// once the daemon has said the stage is recorded, the job goes back to the queue with it
/// (and with any later stage that also ended before the stop), and the stage does not run
/// again. The stop has to land within about a millisecond of
/// the stage's exit, so it is tried a few times, each in a fresh sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_just_as_a_stage_finishes_keeps_the_stage_it_recorded() {
    for delay_us in [0, 0, 250, 500, 0, 1000] {
        let sandbox = Sandbox::new();
        let a = id(1);
        let daemon = start_with_job(&sandbox, 3, &a, &["download"]).await;
        stage_started(&sandbox, &a, "download", 1).await;
        release(&sandbox, &a, "download");
        spin_until_noted(&sandbox, &a, run("end", "download", 1));
        let waited = std::time::Instant::now();
        while waited.elapsed() < std::time::Duration::from_micros(delay_us) {}
        let (status, _) = daemon.terminate(secs(15)).await;
        assert!(status.success(), "a graceful stop exits 0: {status}");
        let stderr = daemon_stderr(&sandbox);
        let recorded = stderr
            .lines()
            .find(|l| l.contains("stage finished and recorded") && l.contains("stage=download"));
        let after_stop = sandbox.job_file(&a);
        assert_eq!(after_stop["status"], "Queued", "{after_stop}");
        assert_eq!(after_stop["attempts"], 0, "{after_stop}");

        let daemon = sandbox.start().await;
        daemon.wait_status(&a, "Completed", secs(15)).await;
        let runs = runs(&sandbox, &a);
        let count = |kind: &str, stage: &str| {
            runs.iter()
                .filter(|(k, s, _)| k == kind && s == stage)
                .count()
        };
        assert_eq!(count("end", "upload"), 1, "{runs:?}");
        if let Some(line) = recorded {
            assert!(
                stages_done(&after_stop).first().map(String::as_str) == Some("download")
                    && count("start", "download") == 1,
                "stop {delay_us}us after download ended: the daemon said download was recorded \
                 ({line}), yet after the graceful stop the job file had stages_done = {:?}, and \
                 download ran {} times: {runs:?}",
                stages_done(&after_stop),
                count("start", "download"),
            );
        }
        drop(daemon);
    }
}

/// A pipeline of two stages, `train` with `timeout = "budget"` and `on_timeout =
/// "continue"`, then `upload`.
fn configure_budgeted(sandbox: &Sandbox) {
    let program = serde_json::to_string(STAGE_SCRIPT).expect("a string serialises");
    sandbox.write_config(&format!(
        "shutdown_grace = \"10s\"\n\n[worker]\nmax_attempts = 3\n\n[executor]\ntimeout = \"60s\"\n\
         kill_grace = \"2s\"\npass_env = []\n\n\
         [[executor.stages]]\nname = \"train\"\ncommand = [{program}]\ntimeout = \"budget\"\n\
         on_timeout = \"continue\"\n\n\
         [[executor.stages]]\nname = \"upload\"\ncommand = [{program}]\n"
    ));
}

/// A queued job file with a time budget and no whole-job deadline, as a job of the trainer
/// API has (a job of the main API gets a deadline at acceptance, which bounds every stage).
fn budgeted_job_file(sandbox: &Sandbox, id: &str, hours: f64) {
    let mut job = job(id);
    job["status"] = json!("Queued");
    job["attempts"] = json!(0);
    job["hours_to_complete"] = json!(hours);
    job["created_at"] = json!("2026-01-01T00:00:00Z");
    job["updated_at"] = json!("2026-01-01T00:00:00Z");
    sandbox.write_data_file(
        &format!("jobs/{id}.json"),
        serde_json::to_vec_pretty(&job).expect("json").as_slice(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_stopped_at_its_budget_counts_as_done_and_the_next_stage_runs() {
    if support::not_for_this_store(
        "a_stage_stopped_at_its_budget_counts_as_done_and_the_next_stage_runs",
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    configure_budgeted(&sandbox);
    let a = id(41);
    // 0.001 h: 3.6 s from the first start of train.
    budgeted_job_file(&sandbox, &a, 0.001);
    hold(&sandbox, &a, "train");
    let daemon = sandbox.start().await;
    stage_started(&sandbox, &a, "train", 1).await;
    // The first start is durable before the stage runs.
    let file = sandbox.job_file(&a);
    assert!(file["stages_started"]["train"].is_string(), "{file}");

    let done = daemon.wait_status(&a, "Completed", secs(30)).await;
    assert_eq!(stages_done(&done), ["train", "upload"], "{done}");
    assert_eq!(
        runs(&sandbox, &a),
        ran("start train 1, term train 1, start upload 1, end upload 1")
    );
    let log = daemon.logs(&a).await;
    assert!(
        log.contains("timed out after 3s 600ms; on_timeout = \"continue\": counted as done"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_a_budgeted_stage_gets_only_the_rest_of_its_budget() {
    if support::not_for_this_store(
        "after_a_crash_a_budgeted_stage_gets_only_the_rest_of_its_budget",
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    configure_budgeted(&sandbox);
    let a = id(42);
    // 0.003 h: 10.8 s from the first start of train.
    budgeted_job_file(&sandbox, &a, 0.003);
    hold(&sandbox, &a, "train");
    let daemon = sandbox.start().await;
    stage_started(&sandbox, &a, "train", 1).await;
    let first = timestamp(&sandbox.job_file(&a)["stages_started"]["train"]);
    // Let a good part of the budget pass in the first attempt, then crash.
    wait_until("5 s of the budget have passed", secs(20), async || {
        (chrono::Utc::now().fixed_offset() - first >= chrono::Duration::seconds(5)).then_some(())
    })
    .await;
    daemon.kill();

    let daemon = sandbox.start().await;
    stage_started(&sandbox, &a, "train", 2).await;
    let done = daemon.wait_status(&a, "Completed", secs(30)).await;
    // The restart kept the first start, and the stage was stopped at the budget counted
    // from it, not 10.8 s after its second start.
    assert_eq!(timestamp(&done["stages_started"]["train"]), first, "{done}");
    let stopped = timestamp(&done["finished_at"]);
    assert!(
        stopped - first < chrono::Duration::milliseconds(10_800 + 4_000),
        "stopped {} after the first start",
        stopped - first
    );
    assert_eq!(stages_done(&done), ["train", "upload"], "{done}");
    assert_eq!(
        runs(&sandbox, &a)
            .into_iter()
            .filter(|(kind, ..)| kind != "term")
            .collect::<Vec<_>>(),
        ran("start train 1, start train 2, start upload 2, end upload 2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_tasks_fields_reach_the_stages_as_placeholders() {
    if support::not_for_this_store("a_trainer_tasks_fields_reach_the_stages_as_placeholders") {
        return;
    }
    let sandbox = Sandbox::new();
    let program = serde_json::to_string(STAGE_SCRIPT).expect("a string serialises");
    sandbox.write_config(&format!(
        "shutdown_grace = \"10s\"\n\n[executor]\ntimeout = \"60s\"\nkill_grace = \"2s\"\n\
         pass_env = []\n\n[[executor.stages]]\nname = \"clone\"\ncommand = [{program}, \
         \"--task={{task_id}}\", \"--hotkey={{hotkey}}\", \"--repo={{github_repo}}\", \
         \"--commit={{github_commit_hash}}\"]\n"
    ));
    // A queued job of the trainer API, as its start writes it, and one of the main API.
    let (a, b) = (id(43), id(44));
    let mut task = job(&a);
    task["status"] = json!("Queued");
    task["created_at"] = json!("2026-01-01T00:00:00Z");
    task["trainer_task"] = json!({
        "task_id": "4f0c8a52-8d1e-4d8a-9b43-0a6f2b1c7d01",
        "hotkey": "5FhkTestHotkeyA1111111111111111111111111111111",
        "github_repo": "https://github.com/example/miner-trainer",
        "github_branch": null,
        "github_commit_hash": "8631451156e2915070f77e5547ca0d5ed3d0eb8a",
    });
    sandbox.write_data_file(
        &format!("jobs/{a}.json"),
        serde_json::to_vec_pretty(&task).expect("json").as_slice(),
    );
    let daemon = sandbox.start().await;
    daemon.submit(job(&b)).await;
    daemon.wait_status(&a, "Completed", secs(15)).await;
    daemon.wait_status(&b, "Completed", secs(15)).await;
    assert_eq!(
        argv(&sandbox, &a, "clone", 1),
        [
            "--task=4f0c8a52-8d1e-4d8a-9b43-0a6f2b1c7d01",
            "--hotkey=5FhkTestHotkeyA1111111111111111111111111111111",
            "--repo=https://github.com/example/miner-trainer",
            "--commit=8631451156e2915070f77e5547ca0d5ed3d0eb8a",
        ]
    );
    assert_eq!(
        argv(&sandbox, &b, "clone", 1),
        ["--task=", "--hotkey=", "--repo=", "--commit="]
    );
    // The task stays with its job.
    assert_eq!(
        sandbox.job_file(&a)["trainer_task"]["task_id"],
        "4f0c8a52-8d1e-4d8a-9b43-0a6f2b1c7d01"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_wandb_address_a_stage_prints_is_kept_durably_and_a_retry_forgets_it() {
    let sandbox = Sandbox::new();
    configure(&sandbox, 1, 3);
    let a = id(51);
    // As wandb prints it: coloured, the escape codes around the address.
    fs::write(
        sandbox.path().join(format!("print-{a}-train")),
        "wandb: Syncing run fine-tune\nwandb: View run at \u{1b}[34m\u{1b}[4mhttps://wandb.ai/team/proj/runs/r1\u{1b}[0m\n",
    )
    .expect("write a print file");
    fs::write(
        sandbox.path().join(format!("print-{a}-upload")),
        "see https://wandb.ai/team/proj/runs/later\n",
    )
    .expect("write a print file");
    hold(&sandbox, &a, "train");
    let daemon = sandbox.start().await;
    daemon.submit(job(&a)).await;
    stage_started(&sandbox, &a, "train", 1).await;
    // Recorded in the job file while the stage still runs.
    let file = wait_until("the address is in the job file", secs(15), async || {
        let file = sandbox.job_file(&a);
        file["wandb_url"].is_string().then_some(file)
    })
    .await;
    assert_eq!(file["wandb_url"], "https://wandb.ai/team/proj/runs/r1");
    assert_eq!(file["status"], "Running");
    release(&sandbox, &a, "train");
    let done = daemon.wait_status(&a, "Completed", secs(30)).await;
    // The upload's address came later: the run's first one stays.
    assert_eq!(
        done["wandb_url"], "https://wandb.ai/team/proj/runs/r1",
        "{done}"
    );
    assert!(daemon.logs(&a).await.contains("runs/later"));

    // A fresh run forgets it until a stage prints one again.
    fs::remove_file(sandbox.path().join(format!("print-{a}-train"))).expect("remove");
    fs::remove_file(sandbox.path().join(format!("print-{a}-upload"))).expect("remove");
    hold(&sandbox, &a, "train");
    let retried = daemon
        .post(&format!("/v1/jobs/{a}/retry"), &json!({}))
        .await;
    assert_eq!(retried.status, reqwest::StatusCode::OK, "{}", retried.text);
    assert!(
        retried.json().get("wandb_url").is_none(),
        "{}",
        retried.text
    );
    wait_until("train starts in the fresh run", secs(15), async || {
        let starts = runs(&sandbox, &a)
            .into_iter()
            .filter(|r| *r == run("start", "train", 1))
            .count();
        (starts == 2).then_some(())
    })
    .await;
    release(&sandbox, &a, "train");
    let again = daemon.wait_status(&a, "Completed", secs(30)).await;
    assert!(again.get("wandb_url").is_none(), "{again}");
    assert!(sandbox.job_file(&a).get("wandb_url").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_stage_runs_after_a_failure_once_it_is_recorded_and_in_its_place_otherwise() {
    let sandbox = Sandbox::new();
    configure(&sandbox, 1, 3);
    let program = serde_json::to_string(STAGE_SCRIPT).expect("a string serialises");
    let mut config = fs::read_to_string(sandbox.path().join("config.toml")).expect("the config");
    config.push_str(&format!(
        "\n[[executor.stages]]\nname = \"cleanup\"\nalways = true\ncommand = [{program}]\n"
    ));
    sandbox.write_config(&config);
    let daemon = sandbox.start().await;

    // A failed train: the job fails, then the cleanup runs, upload never.
    let a = id(1);
    fail(&sandbox, &a, "train", 7);
    hold(&sandbox, &a, "cleanup");
    daemon.submit(job(&a)).await;
    stage_started(&sandbox, &a, "cleanup", 1).await;
    // The failure is durable before the cleanup starts: a crash now cannot run train again.
    let failed = daemon.job(&a).await;
    assert_eq!(failed["status"], "Failed", "{failed}");
    assert_eq!(sandbox.job_file(&a)["status"], "Failed");
    assert_eq!(stages_done(&failed), ["download"], "{failed}");
    release(&sandbox, &a, "cleanup");
    wait_until("the cleanup ends", secs(15), async || {
        runs(&sandbox, &a)
            .contains(&run("end", "cleanup", 1))
            .then_some(())
    })
    .await;
    assert_eq!(
        runs(&sandbox, &a),
        ran(
            "start download 1, end download 1, start train 1, end train 1, \
             start cleanup 1, end cleanup 1"
        )
    );
    let after = daemon.job(&a).await;
    assert_eq!(after["error_message"], failed["error_message"], "{after}");
    assert!(
        after["error_message"]
            .as_str()
            .is_some_and(|m| m.starts_with("stage train: trainer exited with status 7")),
        "{after}"
    );
    // The cleanup's end is written to the log once its exit is reported, a moment after
    // the stage script noted its own end.
    let log = wait_until("the log says the cleanup ended", secs(15), async || {
        let log = normalised_log(&sandbox, &a);
        (log.last().map(String::as_str) == Some("==> stage cleanup ended: exit status 0"))
            .then_some(log)
    })
    .await;
    let train_end = "==> stage train ended: exit status 7";
    let at = log
        .iter()
        .position(|l| l == train_end)
        .expect("train's end");
    assert_eq!(log[at + 1], "==> stage cleanup (4/4) started", "{log:?}");
    let raw = fs::read_to_string(sandbox.data_dir().join("logs").join(format!("{a}.log")))
        .expect("the log");
    assert!(
        raw.contains(": always = true, after the failure\n"),
        "{raw}"
    );
    assert_eq!(
        log.last().map(String::as_str),
        Some("==> stage cleanup ended: exit status 0"),
        "{log:?}"
    );

    // A success: the cleanup runs last, once, as a stage like the others.
    let b = id(2);
    daemon.submit(job(&b)).await;
    daemon.wait_status(&b, "Completed", secs(20)).await;
    let ends: Vec<String> = runs(&sandbox, &b)
        .into_iter()
        .filter(|(kind, _, _)| kind == "end")
        .map(|(_, stage, _)| stage)
        .collect();
    assert_eq!(ends, ["download", "train", "upload", "cleanup"]);

    // The cleanup of a job whose stages all ended well fails it like any stage.
    let c = id(3);
    fail(&sandbox, &c, "cleanup", 4);
    daemon.submit(job(&c)).await;
    let failed = daemon.wait_status(&c, "Failed", secs(20)).await;
    assert!(
        failed["error_message"]
            .as_str()
            .is_some_and(|m| m.starts_with("stage cleanup: trainer exited with status 4")),
        "{failed}"
    );
    assert_eq!(
        stages_done(&failed),
        ["download", "train", "upload"],
        "{failed}"
    );
    assert_eq!(
        runs(&sandbox, &c)
            .iter()
            .filter(|(kind, stage, _)| kind == "start" && stage == "cleanup")
            .count(),
        1,
        "a failed cleanup is not run again after its own failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_for_other_job_types_is_skipped_and_the_log_says_so() {
    let sandbox = Sandbox::new();
    let program = serde_json::to_string(STAGE_SCRIPT).expect("a string serialises");
    let mut text = "shutdown_grace = \"10s\"\n\n[executor]\ntimeout = \"60s\"\n\
                    kill_grace = \"2s\"\npass_env = []\n"
        .to_string();
    for (stage, types) in [
        ("train-image", "[\"DiffusionJob\"]"),
        ("train-text", "[\"TextJob\"]"),
        ("upload", "[\"TextJob\", \"DiffusionJob\"]"),
    ] {
        text.push_str(&format!(
            "\n[[executor.stages]]\nname = \"{stage}\"\njob_types = {types}\ncommand = [{program}]\n"
        ));
    }
    sandbox.write_config(&text);
    let daemon = sandbox.start().await;
    let a = id(50);
    daemon.submit(job(&a)).await;
    let done = daemon.wait_status(&a, "Completed", secs(20)).await;
    assert_eq!(
        runs(&sandbox, &a),
        ran("start train-text 1, end train-text 1, start upload 1, end upload 1"),
        "{done}"
    );
    let log = normalised_log(&sandbox, &a);
    assert_eq!(
        log[1], "==> stage train-image (1/3): not for a TextJob; skipped",
        "{log:?}"
    );
    let b = id(51);
    daemon
        .submit(json!({
            "type": "DiffusionJob",
            "job_id": b,
            "model": "org/image-model",
            "dataset_zip": "https://example.com/images.zip",
            "model_type": "sdxl",
        }))
        .await;
    daemon.wait_status(&b, "Completed", secs(20)).await;
    assert_eq!(
        runs(&sandbox, &b),
        ran("start train-image 1, end train-image 1, start upload 1, end upload 1")
    );
}
