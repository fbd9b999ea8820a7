//! The G.O.D trainer API through crashes and failures: the real binary with a
//! `[god_trainer]` listener over real HTTP on loopback, and a pipeline of four process
//! stages named like upstream's (clone, download, train, upload) that run the stage script.
//!
//! It covers a SIGKILL of the daemon right after a start's 200 and while each of clone,
//! train and upload runs, then a restart on the same data dir: the task keeps answering
//! `training` until it succeeds, no stage recorded as done runs again (an upload never
//! runs twice), and its GPUs stay unavailable and refused to others meanwhile. It also
//! covers a failed stage (no upload, the reason last in `logs`), a fresh run of a failed
//! pair, a start refused when every slot is taken, and the `wandb_url` a stage prints.
//! What ran is judged from what the stage script recorded (`<sandbox>/stage-records`).

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

#[allow(dead_code)]
mod god_support;

use std::fs;
use std::path::PathBuf;

use god_support::{
    TrainerApi, fake_nvidia_smi, fixture, fixtures_or_skip, hotkey, job_id, task_id,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Daemon, Sandbox, secs, wait_until};

const STAGE_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/trainers/stage.sh");
/// The pipeline, in order.
const STAGES: [&str; 4] = ["clone", "download", "train", "upload"];

/// A fixture's body as another pair: its own task id, on `gpus`.
fn pair(name: &str, task_id: &str, gpus: &[u32]) -> Value {
    let mut body = fixture(name);
    body["training_data"]["task_id"] = json!(task_id);
    body["gpu_ids"] = json!(gpus);
    body
}

fn started(body: &Value) -> Value {
    json!({"message": "Started Training!", "task_id": task_id(body)})
}

fn not_found(body: &Value) -> Value {
    json!({"detail": format!(
        "Task with ID '{}' and hotkey '{}' not found.",
        task_id(body),
        hotkey(body)
    )})
}

fn time(value: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    let text = value.as_str().unwrap_or_else(|| panic!("a time: {value}"));
    chrono::DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// One line of `<sandbox>/stage-records`: `start|end|term <stage> <job_id> <attempt> <pid>`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    kind: String,
    stage: String,
    job: String,
    attempt: u32,
}

/// Every complete line of the stage records in `sandbox`, in order.
fn records_in(sandbox: &Sandbox) -> Vec<Record> {
    let text = fs::read_to_string(sandbox.path().join("stage-records")).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|line| match line.split(' ').collect::<Vec<_>>()[..] {
            [kind, stage, job, attempt, _pid] => Record {
                kind: kind.to_string(),
                stage: stage.to_string(),
                job: job.to_string(),
                attempt: attempt.parse().expect("an attempt"),
            },
            _ => panic!("a bad stage record: {line:?}"),
        })
        .collect()
}

/// What the config varies.
struct Shape {
    gpus: usize,
    max_concurrent: usize,
}

const FOUR_GPUS: Shape = Shape {
    gpus: 4,
    max_concurrent: 3,
};

/// A daemon with the trainer API on a port of its own, H100s, and the four stages.
struct Node {
    sandbox: Sandbox,
    daemon: Daemon,
    api: TrainerApi,
}

impl std::ops::Deref for Node {
    type Target = TrainerApi;

    fn deref(&self) -> &TrainerApi {
        &self.api
    }
}

impl Node {
    async fn start(sandbox: Sandbox, shape: &Shape) -> Node {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let program = serde_json::to_string(STAGE_SCRIPT).expect("a string");
        let ids: Vec<String> = (0..shape.gpus).map(|i| i.to_string()).collect();
        let smi = fake_nvidia_smi(sandbox.path(), shape.gpus);
        let mut config = format!(
            "shutdown_grace = \"10s\"\n\n[god_trainer]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [worker]\nmax_concurrent = {}\ngpus = [{}]\nnvidia_smi = {smi}\n\n\
             [executor]\ntimeout = \"60s\"\nkill_grace = \"2s\"\npass_env = []\n",
            shape.max_concurrent,
            ids.join(", ")
        );
        for stage in STAGES {
            config.push_str(&format!(
                "\n[[executor.stages]]\nname = \"{stage}\"\ncommand = [{program}, \
                 \"--task={{task_id}}\"]\n"
            ));
        }
        sandbox.write_config(&config);
        let daemon = sandbox.start().await;
        Node {
            sandbox,
            daemon,
            api: TrainerApi::new(format!("http://127.0.0.1:{port}")),
        }
    }

    /// SIGKILL, as a crash would; the sandbox is left as the crash left it.
    fn crash(self) -> Sandbox {
        let Node {
            sandbox, daemon, ..
        } = self;
        daemon.kill();
        sandbox
    }

    /// Starts the pair and expects the contract's 200.
    async fn start_ok(&self, body: &Value) {
        let (code, answer) = self.start_task(body).await;
        assert_eq!(code, StatusCode::OK, "{answer}");
        assert_eq!(answer, started(body));
    }

    /// The task of a pair that was accepted: a 404 fails the test.
    async fn accepted_task(&self, body: &Value) -> Value {
        let (code, task) = self.task(body).await;
        assert_eq!(code, StatusCode::OK, "never a 404 after a 200: {task}");
        task
    }

    /// Waits until the task has `status`; a 404 or another final status fails at once.
    async fn wait_task(&self, body: &Value, status: &str) -> Value {
        wait_until(format_args!("the task is {status}"), secs(30), async || {
            let task = self.accepted_task(body).await;
            let now = task["status"].as_str().expect("a status");
            assert!(
                now == status || now == "training",
                "the task ended {now}, not {status}: {task}\nrecords: {:#?}",
                self.records()
            );
            (now == status).then_some(task)
        })
        .await
    }

    async fn availability(&self) -> Vec<bool> {
        let (code, gpus) = self
            .call(
                reqwest::Method::GET,
                "/v1/trainer/get_gpu_availability",
                None,
            )
            .await;
        assert_eq!(code, StatusCode::OK, "{gpus}");
        gpus.as_array()
            .expect("a list")
            .iter()
            .map(|g| g["available"].as_bool().expect("available"))
            .collect()
    }

    /// Makes `stage` of the pair's job wait after its start while the file exists.
    fn hold(&self, body: &Value, stage: &str) -> PathBuf {
        let path = self
            .sandbox
            .path()
            .join(format!("hold-{}-{stage}", job_id(body)));
        fs::write(&path, b"").expect("hold");
        path
    }

    /// Makes `stage` of the pair's job fail with exit `status`.
    fn fail(&self, body: &Value, stage: &str, status: i32) -> PathBuf {
        let path = self
            .sandbox
            .path()
            .join(format!("fail-{}-{stage}", job_id(body)));
        fs::write(&path, status.to_string()).expect("fail");
        path
    }

    /// Makes `stage` of the pair's job print `text` after its start.
    fn print(&self, body: &Value, stage: &str, text: &str) {
        let path = self
            .sandbox
            .path()
            .join(format!("print-{}-{stage}", job_id(body)));
        fs::write(path, text).expect("print");
    }

    /// Every complete line of the stage records, in order.
    fn records(&self) -> Vec<Record> {
        records_in(&self.sandbox)
    }

    /// The records of the pair's job.
    fn records_of(&self, body: &Value) -> Vec<Record> {
        let job = job_id(body);
        self.records()
            .into_iter()
            .filter(|r| r.job == job)
            .collect()
    }

    fn recorded(&self, body: &Value, kind: &str, stage: &str, attempt: u32) -> bool {
        self.records_of(body)
            .iter()
            .any(|r| r.kind == kind && r.stage == stage && r.attempt == attempt)
    }

    async fn wait_recorded(&self, body: &Value, kind: &str, stage: &str, attempt: u32) {
        wait_until(
            format_args!("{kind} {stage} is recorded (attempt {attempt})"),
            secs(20),
            async || self.recorded(body, kind, stage, attempt).then_some(()),
        )
        .await;
    }

    /// How many times `stage` of the pair's job started.
    fn starts(&self, body: &Value, stage: &str) -> usize {
        self.records_of(body)
            .iter()
            .filter(|r| r.kind == "start" && r.stage == stage)
            .count()
    }
}

/// Where the sweep SIGKILLs the daemon.
#[derive(Clone, Copy, Debug)]
enum KillPoint {
    /// At once after the 200 of the start, before anything is awaited.
    AfterTheStart,
    /// While this stage runs (held).
    While(&'static str),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_at_any_point_loses_no_task_repeats_no_finished_stage_and_frees_no_gpu() {
    const TEST: &str =
        "a_sigkill_at_any_point_loses_no_task_repeats_no_finished_stage_and_frees_no_gpu";
    if fixtures_or_skip(TEST).is_none() {
        return;
    }
    let mut node = Node::start(Sandbox::new(), &FOUR_GPUS).await;
    let sweep = [
        (KillPoint::AfterTheStart, "start-instruct.json"), // GPU 0
        (KillPoint::While("clone"), "start-dpo.json"),     // GPUs 1 and 2
        (KillPoint::While("train"), "start-grpo.json"),    // GPU 3
        (KillPoint::While("upload"), "start-image.json"),  // GPU 1
    ];
    for (point, name) in sweep {
        let body = fixture(name);
        let id = job_id(&body);
        let gpus: Vec<usize> = body["gpu_ids"]
            .as_array()
            .expect("gpu ids")
            .iter()
            .map(|g| g.as_u64().expect("a GPU id") as usize)
            .collect();
        // What is held stays held across the restart: the task cannot end unseen.
        let held = match point {
            KillPoint::AfterTheStart => "download",
            KillPoint::While(stage) => stage,
        };
        let hold = node.hold(&body, held);
        node.start_ok(&body).await;
        if let KillPoint::While(stage) = point {
            node.wait_recorded(&body, "start", stage, 1).await;
        }
        let sandbox = node.crash();

        // Done at kill time: what the job file records, read before a restart can add to it.
        let on_disk = sandbox.job_file(&id);
        // A job file leaves `stages_done` out while it is empty.
        let recorded: Vec<String> = on_disk
            .get("stages_done")
            .map_or(&[][..], |s| {
                s.as_array()
                    .unwrap_or_else(|| panic!("{point:?}: stages_done in {on_disk}"))
            })
            .iter()
            .map(|s| s.as_str().expect("a stage").to_string())
            .collect();
        // A stage recorded done had ended; one that ended but was not yet recorded when
        // the kill came may run again (it had not been recorded), one recorded never does.
        let before_restart: Vec<Record> = records_in(&sandbox)
            .into_iter()
            .filter(|r| r.job == id)
            .collect();
        for stage in &recorded {
            assert!(
                before_restart
                    .iter()
                    .any(|r| r.kind == "end" && &r.stage == stage),
                "{point:?}: {stage} is recorded done, so it ended: {before_restart:?}"
            );
        }
        let done = recorded.clone();
        if let KillPoint::While(stage) = point {
            let before: Vec<&str> = STAGES.iter().copied().take_while(|s| *s != stage).collect();
            assert_eq!(
                recorded, before,
                "{point:?}: every stage before it was recorded"
            );
            assert!(
                !done.iter().any(|s| s == stage),
                "{point:?}: the held stage never ended: {before_restart:?}"
            );
        }

        node = Node::start(sandbox, &FOUR_GPUS).await;
        // At once after the restart: the task is there and training, its GPUs are held.
        let task = node.accepted_task(&body).await;
        assert_eq!(task["status"], "training", "{point:?}: {task}");
        assert_eq!(task["gpu_ids"], body["gpu_ids"], "{point:?}: {task}");
        assert_eq!(task["finished_at"], Value::Null, "{point:?}: {task}");
        let expected: Vec<bool> = (0..4).map(|g| !gpus.contains(&g)).collect();
        assert_eq!(node.availability().await, expected, "{point:?}");
        // Another pair naming those GPUs is refused, and nothing is stored for it.
        let intruder = pair(name, &format!("intruder-{id}"), &gpus_u32(&gpus));
        let (code, detail) = node.start_task(&intruder).await;
        assert_eq!(code, StatusCode::CONFLICT, "{point:?}: {detail}");
        for g in &gpus {
            assert!(
                detail["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&format!("GPU {g}")),
                "{point:?}: the 409 names GPU {g}: {detail}"
            );
        }
        let (code, missing) = node.task(&intruder).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "{point:?}: {missing}");
        assert_eq!(missing, not_found(&intruder));

        // It resumes at its first unfinished stage, the held one, in a second attempt.
        node.wait_recorded(&body, "start", held, 2).await;
        let task = node.accepted_task(&body).await;
        assert_eq!(task["status"], "training", "{point:?}: {task}");
        assert_eq!(node.availability().await, expected, "{point:?}");
        let (code, detail) = node.start_task(&intruder).await;
        assert_eq!(code, StatusCode::CONFLICT, "{point:?}: {detail}");
        // The retry of a 200 lost in the crash: 200 again.
        node.start_ok(&body).await;

        fs::remove_file(hold).expect("release");
        let task = node.wait_task(&body, "success").await;
        assert!(task["finished_at"].is_string(), "{point:?}: {task}");
        assert_eq!(node.availability().await, [true; 4], "{point:?}");
        let job = node.daemon.job(&id).await;
        assert_eq!(job["stages_done"], json!(STAGES), "{point:?}: {job}");
        assert_eq!(job["attempts"], 2, "{point:?}: {job}");

        // No stage done at kill time started again; every other one ran in attempt 2.
        let records = node.records_of(&body);
        for stage in STAGES {
            let starts: Vec<u32> = records
                .iter()
                .filter(|r| r.kind == "start" && r.stage == stage)
                .map(|r| r.attempt)
                .collect();
            if done.iter().any(|s| s == stage) {
                assert_eq!(
                    starts,
                    [1],
                    "{point:?}: {stage} was done at kill time: {records:#?}"
                );
            } else {
                assert_eq!(
                    starts.last(),
                    Some(&2),
                    "{point:?}: {stage} ran after the restart: {records:#?}"
                );
                assert!(
                    starts.len() <= 2,
                    "{point:?}: {stage} ran at most once per attempt: {records:#?}"
                );
            }
        }
        // Above all, an upload that ended never starts again.
        let upload_ended = records
            .iter()
            .position(|r| r.kind == "end" && r.stage == "upload")
            .expect("upload ended");
        assert!(
            !records[upload_ended..]
                .iter()
                .any(|r| r.kind == "start" && r.stage == "upload"),
            "{point:?}: upload started again after it ended: {records:#?}"
        );
        assert_eq!(
            node.starts(&body, "upload"),
            1 + usize::from(held == "upload")
        );
    }
}

fn gpus_u32(gpus: &[usize]) -> Vec<u32> {
    gpus.iter().map(|&g| g as u32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_train_ends_the_task_as_failure_with_its_reason_last_and_never_uploads() {
    const TEST: &str =
        "a_failed_train_ends_the_task_as_failure_with_its_reason_last_and_never_uploads";
    if fixtures_or_skip(TEST).is_none() {
        return;
    }
    let node = Node::start(Sandbox::new(), &FOUR_GPUS).await;
    let body = fixture("start-dpo.json"); // GPUs 1 and 2
    node.fail(&body, "train", 3);
    node.start_ok(&body).await;
    let task = node.wait_task(&body, "failure").await;
    eprintln!("{task:#}");

    let finished = time(&task["finished_at"]);
    assert!(finished >= time(&task["started_at"]), "{task}");
    let logs: Vec<&str> = task["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .map(|l| l.as_str().expect("a line"))
        .collect();
    let last = logs.last().expect("a line");
    assert!(
        last.contains("status 3") && last.contains("fatal: train ran out of disk (stub)"),
        "the reason, with the exit status and the stage's last line, is last: {logs:#?}"
    );
    assert!(
        last.contains("train"),
        "the reason names the stage: {logs:#?}"
    );
    // The train stage's end is in the lines too; upload appears nowhere.
    assert!(
        logs.iter().all(|l| !l.contains("upload")),
        "nothing about an upload: {logs:#?}"
    );
    let records = node.records_of(&body);
    assert!(
        node.recorded(&body, "end", "train", 1),
        "train ran: {records:#?}"
    );
    assert_eq!(
        node.starts(&body, "upload"),
        0,
        "upload never started: {records:#?}"
    );
    let job = node.daemon.job(&job_id(&body)).await;
    assert_eq!(job["status"], "Failed", "{job}");
    assert_eq!(job["stages_done"], json!(["clone", "download"]), "{job}");
    // Its GPUs are free again.
    assert_eq!(node.availability().await, [true; 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_started_again_after_a_failure_runs_afresh_with_only_its_own_lines_and_times() {
    const TEST: &str =
        "a_pair_started_again_after_a_failure_runs_afresh_with_only_its_own_lines_and_times";
    if fixtures_or_skip(TEST).is_none() {
        return;
    }
    let node = Node::start(Sandbox::new(), &FOUR_GPUS).await;
    let first = fixture("start-grpo.json"); // GPU 3
    let fail = node.fail(&first, "train", 3);
    node.start_ok(&first).await;
    let failed = node.wait_task(&first, "failure").await;
    let failed_lines = failed["logs"].as_array().expect("logs").clone();

    // The same pair again, now on GPUs 0 and 1; its train held to see it training.
    fs::remove_file(fail).expect("train works now");
    let again = pair(
        "start-grpo.json",
        task_id(&first),
        &[0, 1], // the GPUs now named
    );
    let hold = node.hold(&again, "train");
    node.start_ok(&again).await;
    let task = node.accepted_task(&again).await;
    eprintln!("{task:#}");
    assert_eq!(task["status"], "training", "{task}");
    assert_eq!(task["finished_at"], Value::Null, "{task}");
    assert_eq!(task["wandb_url"], Value::Null, "{task}");
    assert_eq!(task["gpu_ids"], json!([0, 1]), "{task}");
    assert!(
        time(&task["started_at"]) >= time(&failed["finished_at"]),
        "started_at is the new run's: {task} after {failed}"
    );
    assert_ne!(task["started_at"], failed["started_at"], "{task}");
    assert_eq!(node.availability().await, [false, false, true, true]);
    node.wait_recorded(&again, "start", "train", 1).await;

    fs::remove_file(hold).expect("release");
    let task = node.wait_task(&again, "success").await;
    eprintln!("{task:#}");
    let logs: Vec<&str> = task["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .map(|l| l.as_str().expect("a line"))
        .collect();
    let started_at = task["started_at"].as_str().expect("started_at");
    assert_eq!(
        logs.first().copied(),
        Some(format!("[{started_at}] accepted on GPUs 0,1").as_str()),
        "{logs:#?}"
    );
    for old in &failed_lines {
        assert!(
            !logs.contains(&old.as_str().expect("a line")),
            "a line of the failed run is shown: {old}\n{logs:#?}"
        );
    }
    for line in &logs {
        assert!(
            !line.contains("status 3") && !line.contains("failed"),
            "nothing of the failed run: {logs:#?}"
        );
        let at = line
            .strip_prefix('[')
            .and_then(|l| l.split_once(']'))
            .map(|(t, _)| t)
            .unwrap_or_else(|| panic!("a time first: {line}"));
        assert!(
            at >= started_at,
            "every line is of the new run: {line} before {started_at}"
        );
    }
    let stage_starts = logs
        .iter()
        .filter(|l| l.contains("stage ") && l.contains(" started"))
        .count();
    assert_eq!(stage_starts, STAGES.len(), "each stage once: {logs:#?}");
    // The stages started over: clone and download ran in both runs, upload in the new one.
    let job = node.daemon.job(&job_id(&again)).await;
    assert_eq!(job["stages_done"], json!(STAGES), "{job}");
    assert_eq!(job["gpu_ids"], json!([0, 1]), "{job}");
    for (stage, runs) in [("clone", 2), ("download", 2), ("train", 2), ("upload", 1)] {
        assert_eq!(
            node.starts(&again, stage),
            runs,
            "{stage}: {:#?}",
            node.records_of(&again)
        );
    }
    // The earlier run stays in the job's log.
    let log = node.daemon.logs(&job_id(&again)).await;
    assert!(log.contains("fatal: train ran out of disk (stub)"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_slot_taken_a_start_on_a_free_gpu_is_a_409_and_stores_nothing() {
    const TEST: &str = "with_every_slot_taken_a_start_on_a_free_gpu_is_a_409_and_stores_nothing";
    if fixtures_or_skip(TEST).is_none() {
        return;
    }
    let shape = Shape {
        gpus: 2,
        max_concurrent: 1,
    };
    let node = Node::start(Sandbox::new(), &shape).await;
    let a = pair("start-instruct.json", "slots-a", &[0]);
    let b = pair("start-chat.json", "slots-b", &[1]);
    let hold = node.hold(&a, "train");
    node.start_ok(&a).await;
    node.wait_recorded(&a, "start", "train", 1).await;

    let (code, detail) = node.start_task(&b).await;
    eprintln!("{code} {detail}");
    assert_eq!(code, StatusCode::CONFLICT, "{detail}");
    assert!(
        detail["detail"]
            .as_str()
            .is_some_and(|d| d.contains("slots")),
        "the 409 says why: {detail}"
    );
    let (code, missing) = node.task(&b).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "nothing stored: {missing}");
    assert_eq!(missing, not_found(&b));
    let reply = node.daemon.get(&format!("/v1/jobs/{}", job_id(&b))).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{reply:?}");
    assert_eq!(node.starts(&b, "clone"), 0);
    assert!(!node.availability().await[0], "GPU 0 is held");
    // The first is unharmed; once it ended, the slot is free for the second.
    assert_eq!(node.accepted_task(&a).await["status"], "training");
    fs::remove_file(hold).expect("release");
    node.wait_task(&a, "success").await;
    node.start_ok(&b).await;
    node.wait_task(&b, "success").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wandb_url_is_the_first_one_a_stage_prints_exactly() {
    const TEST: &str = "the_wandb_url_is_the_first_one_a_stage_prints_exactly";
    if fixtures_or_skip(TEST).is_none() {
        return;
    }
    const URL: &str = "https://wandb.ai/team/project/runs/abc123";
    let node = Node::start(Sandbox::new(), &FOUR_GPUS).await;
    let body = fixture("start-chat.json"); // GPU 0
    node.print(
        &body,
        "train",
        &format!("wandb: Syncing run fine-tune\nwandb: View run at {URL}\n"),
    );
    // A later stage prints another run's address: the first stays.
    node.print(
        &body,
        "upload",
        "wandb: View run at https://wandb.ai/team/project/runs/zzz999\n",
    );
    let hold = node.hold(&body, "download");
    node.start_ok(&body).await;
    node.wait_recorded(&body, "start", "download", 1).await;
    let task = node.accepted_task(&body).await;
    assert_eq!(
        task["wandb_url"],
        Value::Null,
        "nothing printed yet: {task}"
    );
    fs::remove_file(hold).expect("release");
    let task = node.wait_task(&body, "success").await;
    assert_eq!(task["wandb_url"], URL, "{task}");
    let job = node.daemon.job(&job_id(&body)).await;
    assert_eq!(job["wandb_url"], URL, "{job}");
}
