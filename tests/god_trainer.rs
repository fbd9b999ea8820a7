//! The G.O.D trainer API end to end: the real binary with `[god_trainer] listen` set, its
//! routes over real HTTP on loopback, the fixtures made by the real client's models, a
//! two-stage pipeline of the stage script, and a SIGKILL after a start.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

#[allow(dead_code)]
mod god_support;

use std::fs;
use std::path::PathBuf;

use god_support::{TrainerApi, fake_nvidia_smi, fixture, fixtures_or_skip, job_id};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Daemon, Sandbox, secs, wait_until};

const STAGE_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/trainers/stage.sh");
const TOKEN: &str = "ghp_exampleTokenThatMustNeverBeEchoed0000";

/// A daemon with the trainer API on a port of its own, four GPUs, two stages.
struct Box {
    sandbox: Sandbox,
    daemon: Daemon,
    api: TrainerApi,
}

impl std::ops::Deref for Box {
    type Target = TrainerApi;

    fn deref(&self) -> &TrainerApi {
        &self.api
    }
}

impl Box {
    async fn start(sandbox: Sandbox) -> Box {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let program = serde_json::to_string(STAGE_SCRIPT).expect("a string");
        // Train notes a digest of the token it got (never the token) beside the data dir.
        let note_token = serde_json::to_string(
            "printf %s \"$GITHUB_TOKEN\" | sha256sum | cut -d' ' -f1 \
             > \"$(dirname \"$TW_DATA_DIR\")/token-$JOB_ID\"; exec \"$0\" \"$@\"",
        )
        .expect("a string");
        // Four H100s, as nvidia-smi reports them; the API needs the inventory.
        let smi = fake_nvidia_smi(sandbox.path(), 4);
        sandbox.write_config(&format!(
            "shutdown_grace = \"10s\"\n\n[god_trainer]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [worker]\nmax_concurrent = 3\ngpus = [0, 1, 2, 3]\nnvidia_smi = {smi}\n\n[executor]\ntimeout = \"60s\"\n\
             kill_grace = \"2s\"\npass_env = []\n\n\
             [[executor.stages]]\nname = \"train\"\ncommand = [\"/bin/bash\", \"-c\", {note_token}, \
             {program}, \"--task={{task_id}}\"]\n\n\
             [[executor.stages]]\nname = \"upload\"\ncommand = [{program}]\n"
        ));
        let daemon = sandbox.start().await;
        Box {
            sandbox,
            daemon,
            api: TrainerApi::new(format!("http://127.0.0.1:{port}")),
        }
    }

    async fn restart(self) -> Box {
        let Box {
            sandbox, daemon, ..
        } = self;
        daemon.kill();
        Box::start(sandbox).await
    }

    async fn wait_task(&self, body: &Value, status: &str) -> Value {
        wait_until(format_args!("the task is {status}"), secs(30), async || {
            let (code, task) = self.task(body).await;
            assert_eq!(code, StatusCode::OK, "never a 404 after a 200: {task}");
            (task["status"] == status).then_some(task)
        })
        .await
    }

    /// Holds `stage` of the job the pair names until [`Box::release`].
    fn hold(&self, body: &Value, stage: &str) -> PathBuf {
        let job = job_id(body);
        let path = self.sandbox.path().join(format!("hold-{job}-{stage}"));
        fs::write(&path, b"").expect("hold");
        path
    }
}

/// Every key of the contract's task, with the values it allows.
fn assert_task_shape(task: &Value, sent: &Value) {
    for key in [
        "training_data",
        "github_repo",
        "gpu_ids",
        "hotkey",
        "github_branch",
        "github_commit_hash",
        "github_token",
        "requested_datasets",
        "status",
        "started_at",
        "finished_at",
        "wandb_url",
        "logs",
        "job_type",
        "container_name",
    ] {
        assert!(task.get(key).is_some(), "{key} missing: {task}");
    }
    assert!(
        ["training", "success", "failure"].contains(&task["status"].as_str().unwrap_or("")),
        "{task}"
    );
    assert_eq!(task["training_data"], sent["training_data"], "as sent");
    assert_eq!(task["gpu_ids"], sent["gpu_ids"]);
    assert_eq!(task["github_token"], Value::Null);
    assert_eq!(task["job_type"], "training");
    assert!(task["started_at"].is_string(), "{task}");
    let logs = task["logs"].as_array().expect("logs");
    assert!(
        logs.first()
            .and_then(Value::as_str)
            .is_some_and(|l| l.starts_with('[') && l.contains("] accepted on GPUs")),
        "{task}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_starts_trains_and_succeeds_and_the_token_is_nowhere() {
    const TEST: &str = "every_fixture_starts_trains_and_succeeds_and_the_token_is_nowhere";
    if fixtures_or_skip(TEST).is_none() {
        return;
    }
    let node = Box::start(Sandbox::new()).await;
    let (code, none) = node
        .call(
            reqwest::Method::GET,
            "/v1/trainer/get_recent_tasks?hours=1",
            None,
        )
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{none}");
    let mut answers = Vec::new();
    for name in [
        "start-instruct.json",
        "start-instruct-2026.json",
        "start-dpo.json",
        "start-grpo.json",
        "start-chat.json",
        "start-image.json",
    ] {
        let body = fixture(name);
        let (code, answer) = node.start_task(&body).await;
        assert_eq!(code, StatusCode::OK, "{name}: {answer}");
        assert_eq!(
            answer,
            json!({"message": "Started Training!", "task_id": body["training_data"]["task_id"]})
        );
        let task = node.wait_task(&body, "success").await;
        assert_task_shape(&task, &body);
        assert!(task["finished_at"].is_string(), "{task}");
        let job = node.daemon.job(&job_id(&body)).await;
        assert_eq!(job["stages_done"], json!(["train", "upload"]), "{job}");
        assert_eq!(job["gpu_ids"], body["gpu_ids"], "{job}");
        answers.push(serde_json::to_string(&task).expect("json"));
    }
    let (code, recent) = node
        .call(
            reqwest::Method::GET,
            "/v1/trainer/get_recent_tasks?hours=1",
            None,
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(recent.as_array().map(Vec::len), Some(6), "{recent}");

    // The token of start-instruct-2026 is in no answer, no file and no log line.
    for answer in &answers {
        assert!(!answer.contains(TOKEN), "{answer}");
    }
    assert!(!node.daemon.stderr().contains(TOKEN));
    let mut dirs = vec![node.sandbox.data_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read a dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let bytes = fs::read(&path).unwrap_or_default();
                assert!(
                    !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
                    "the token is in {}",
                    path.display()
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_retries_and_bad_requests_answer_as_the_client_expects() {
    const TEST: &str = "conflicts_retries_and_bad_requests_answer_as_the_client_expects";
    if fixtures_or_skip(TEST).is_none() {
        return;
    }
    let node = Box::start(Sandbox::new()).await;
    let availability = || async {
        let (code, gpus) = node
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
            .collect::<Vec<bool>>()
    };
    assert_eq!(availability().await, [true; 4]);
    let a = fixture("start-dpo.json"); // GPUs 1 and 2
    let hold = node.hold(&a, "train");
    let (code, _) = node.start_task(&a).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(availability().await, [true, false, false, true]);
    // The shape the real client's model made, and then some.
    let (_, gpus) = node
        .call(
            reqwest::Method::GET,
            "/v1/trainer/get_gpu_availability",
            None,
        )
        .await;
    let model = fixture("gpu-availability.json");
    for (ours, theirs) in gpus
        .as_array()
        .unwrap()
        .iter()
        .zip(model.as_array().unwrap())
    {
        for (key, value) in theirs.as_object().unwrap() {
            let same_kind = std::mem::discriminant(value) == std::mem::discriminant(&ours[key]);
            assert!(same_kind, "{key}: {ours} against {theirs}");
        }
        assert_eq!(ours["gpu_type"], "H100");
        assert_eq!(ours["vram_gb"], 79);
        assert_eq!(ours["interconnect"], "SXM");
    }
    // The identical retry of a lost reply: 200, nothing changes.
    let before = node.daemon.job(&job_id(&a)).await;
    let (code, again) = node.start_task(&a).await;
    assert_eq!(code, StatusCode::OK, "{again}");
    assert_eq!(node.daemon.job(&job_id(&a)).await, before);
    // Another body for the unfinished pair.
    let mut other = a.clone();
    other["gpu_ids"] = json!([0]);
    let (code, detail) = node.start_task(&other).await;
    assert_eq!(code, StatusCode::CONFLICT, "{detail}");
    // A busy GPU, an unknown one: 409 naming it, and nothing stored.
    let mut b = fixture("start-image.json"); // GPU 1
    let (code, detail) = node.start_task(&b).await;
    assert_eq!(code, StatusCode::CONFLICT, "{detail}");
    assert!(
        detail["detail"]
            .as_str()
            .unwrap_or("")
            .contains("GPU 1 is held"),
        "{detail}"
    );
    b["gpu_ids"] = json!([9]);
    let (code, detail) = node.start_task(&b).await;
    assert_eq!(code, StatusCode::CONFLICT, "{detail}");
    assert!(
        detail["detail"].as_str().unwrap_or("").contains("GPU 9"),
        "{detail}"
    );
    let (code, missing) = node.task(&b).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{missing}");
    assert_eq!(
        missing["detail"],
        format!(
            "Task with ID '{}' and hotkey '{}' not found.",
            b["training_data"]["task_id"].as_str().unwrap(),
            b["hotkey"].as_str().unwrap()
        )
    );
    // Bad requests: 422 naming the field.
    let (code, detail) = node
        .call(reqwest::Method::GET, "/v1/trainer/some-task", None)
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{detail}");
    let mut bad = a.clone();
    bad.as_object_mut().unwrap().remove("hotkey");
    let (code, detail) = node.start_task(&bad).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{detail}");
    assert!(
        detail["detail"]
            .as_str()
            .unwrap_or("")
            .starts_with("hotkey"),
        "{detail}"
    );

    // From an address not allowed, loopback's other addresses included: 403.
    let outsider = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .expect("a client");
    let reply = outsider
        .get(format!("{}/v1/trainer/get_recent_tasks?hours=1", node.base))
        .send()
        .await
        .expect("an answer");
    assert_eq!(reply.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        reply.json::<Value>().await.expect("json"),
        json!({"detail": "Access forbidden"})
    );

    fs::remove_file(hold).expect("release");
    node.wait_task(&a, "success").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_the_task_keeps_answering_training_and_resumes_on_its_gpus() {
    const TEST: &str = "after_a_sigkill_the_task_keeps_answering_training_and_resumes_on_its_gpus";
    if fixtures_or_skip(TEST).is_none() {
        return;
    }
    let node = Box::start(Sandbox::new()).await;
    let a = fixture("start-grpo.json"); // GPU 3
    let hold = node.hold(&a, "upload");
    let (code, _) = node.start_task(&a).await;
    assert_eq!(code, StatusCode::OK);
    wait_until("train is recorded", secs(20), async || {
        let job = node.daemon.job(&job_id(&a)).await;
        (job["stages_done"] == json!(["train"])).then_some(())
    })
    .await;

    let node = node.restart().await;
    let task = node.wait_task(&a, "training").await;
    assert_task_shape(&task, &a);
    // Resumed on the same GPU at its first unfinished stage; a retried start is a 200.
    let job = wait_until("it runs again", secs(20), async || {
        let job = node.daemon.job(&job_id(&a)).await;
        (job["status"] == "Running").then_some(job)
    })
    .await;
    assert_eq!(job["gpu_ids"], json!([3]), "{job}");
    assert_eq!(job["attempts"], 2, "{job}");
    let (code, _) = node.start_task(&a).await;
    assert_eq!(code, StatusCode::OK);
    fs::remove_file(hold).expect("release");
    node.wait_task(&a, "success").await;
    let records = fs::read_to_string(node.sandbox.path().join("stage-records")).unwrap_or_default();
    let trains = records
        .lines()
        .filter(|l| l.starts_with("start train "))
        .count();
    assert_eq!(trains, 1, "a recorded stage never runs again: {records}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_reaches_stages_and_is_kept_in_a_private_file_only_while_unfinished() {
    const TEST: &str =
        "the_token_reaches_stages_and_is_kept_in_a_private_file_only_while_unfinished";
    if fixtures_or_skip(TEST).is_none() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let node = Box::start(Sandbox::new()).await;
    let a = fixture("start-instruct-2026.json");
    let hold = node.hold(&a, "upload");
    let (code, _) = node.start_task(&a).await;
    assert_eq!(code, StatusCode::OK);
    let id = job_id(&a);
    let kept = node
        .sandbox
        .data_dir()
        .join(format!("secrets/{id}.github_token"));
    let mode = fs::metadata(&kept)
        .expect("kept while unfinished")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    assert_eq!(fs::read_to_string(&kept).expect("the secret"), TOKEN);
    // The stage got it as GITHUB_TOKEN.
    let noted = node.sandbox.path().join(format!("token-{id}"));
    let digest = wait_until("train noted its token", secs(20), async || {
        fs::read_to_string(&noted).ok().filter(|d| !d.is_empty())
    })
    .await;
    let expected = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("printf %s '{TOKEN}' | sha256sum | cut -d' ' -f1"),
        ])
        .output()
        .expect("sha256sum");
    assert_eq!(digest, String::from_utf8_lossy(&expected.stdout));
    fs::remove_file(hold).expect("release");
    node.wait_task(&a, "success").await;
    wait_until(
        "the secret is gone once the job ended",
        secs(10),
        async || (!kept.exists()).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_on_a_gpu_inventory_that_cannot_be_read_is_exit_78() {
    let sandbox = Sandbox::new();
    let program = serde_json::to_string(STAGE_SCRIPT).expect("a string");
    sandbox.write_config(&format!(
        "[god_trainer]\nlisten = \"127.0.0.1:0\"\n\n[worker]\ngpus = [0]\n\
         nvidia_smi = \"/nonexistent/nvidia-smi\"\n\n[executor]\ncommand = [{program}]\n"
    ));
    let mut daemon = sandbox.spawn();
    let status = daemon.wait_exit(secs(20)).await;
    assert_eq!(status.code(), Some(78), "{}", daemon.stderr());
    assert!(
        daemon.stderr().contains("nvidia-smi"),
        "{}",
        daemon.stderr()
    );
}

#[tokio::test]
async fn the_trainer_api_serves_its_own_description_and_answers_as_it_says() {
    let node = Box::start(Sandbox::new()).await;
    let (code, served) = node.call(reqwest::Method::GET, "/openapi.json", None).await;
    assert_eq!(code, StatusCode::OK, "{served}");
    let document: Value =
        serde_json::from_str(training_worker::api::god::openapi_json()).expect("JSON");
    assert_eq!(served, document);
    assert_eq!(document["openapi"], "3.1.0");
    // Every documented operation is routed, and answers one of its documented statuses
    // (with nothing started: the errors, the empty lists).
    let mut operations = 0;
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            let target = match path.as_str() {
                "/v1/trainer/{task_id}" => "/v1/trainer/t1?hotkey=h".to_string(),
                "/v1/trainer/get_recent_tasks" => format!("{path}?hours=1"),
                other => other.to_string(),
            };
            let method =
                reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("a method");
            let body = (method == reqwest::Method::POST).then(|| json!({}));
            let (code, answer) = node.call(method.clone(), &target, body.as_ref()).await;
            let documented = &op["responses"][code.as_str()];
            assert!(
                documented.is_object(),
                "{method} {target}: answered {code}, which is not documented: {answer}"
            );
            assert_ne!(
                answer,
                json!({"detail": "Not Found"}),
                "{method} {target} is documented but not routed"
            );
            operations += 1;
        }
    }
    assert_eq!(operations, 5, "the four routes and the description");
}
