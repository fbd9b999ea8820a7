//! `config/examples/god-trainer.toml` run as shipped, with only the docker CLI pointed at the
//! fake (tests/support/fake-docker), nvidia-smi faked and the listener on loopback: a miner
//! repository (a local git repository) cloned at the task's commit, the downloader, the image
//! built from its Dockerfile, the trainer on the task's GPUs with upstream's limits, the
//! uploader with the secrets, and the image removed at the end, after a success and after a
//! failure alike. What ran is judged from the fake's record of every docker call.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Sandbox, secs, wait_until};

const FAKE_DOCKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/fake-docker");
const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/config/examples/god-trainer.toml"
);
const DOWNLOADER: &str = "gradientsio/trainer-downloader:latest";
const UPLOADER: &str = "gradientsio/trainer-uploader:latest";
const TOKEN: &str = "ghp_exampleTokenThatMustNeverBeEchoed0000";
const HF_SECRET: &str = "hf_exampleSecretOfTheUploader0000";
const WANDB: &str = "https://wandb.ai/tw-tests/god/runs/a1b2c3";

fn executable(path: &Path, body: &str) {
    fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
    fs::write(path, body).expect("write a script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args([
            "-c",
            "user.email=miner@example.com",
            "-c",
            "user.name=miner",
        ])
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The miner's repository: a trainer "Dockerfile" (to the fake, the image's script) that
/// exits with `status`, committed; gives the commit.
fn commit_trainer(repo: &Path, status: i32) -> String {
    executable(
        &repo.join("dockerfiles/standalone-text-trainer.dockerfile"),
        &format!(
            "#!/bin/bash\necho \"training with $*\"\necho \"wandb dir $WANDB_DIR\"\nexit {status}\n"
        ),
    );
    git(repo, &["add", "-A"]);
    git(
        repo,
        &[
            "commit",
            "-q",
            "-m",
            &format!("a trainer that exits {status}"),
        ],
    );
    git(repo, &["rev-parse", "HEAD"])
}

struct World {
    sandbox: Sandbox,
    state: PathBuf,
    repo: PathBuf,
    trainer: String,
}

impl World {
    fn new() -> World {
        let sandbox = Sandbox::new();
        for prefix in ["DOCKER_", "HUGGINGFACE_", "WANDB_"] {
            sandbox.remove_env_prefix(prefix);
        }
        let state = sandbox.path().join("docker-state");
        executable(
            &state.join("images").join(DOWNLOADER),
            "#!/bin/bash\necho \"downloading $*\"\n",
        );
        executable(
            &state.join("images").join(UPLOADER),
            &format!(
                "#!/bin/bash\n[ -n \"$HUGGINGFACE_TOKEN\" ] || exit 9\n\
                 echo \"uploading $LOCAL_FOLDER\"\necho \"wandb: View run at {WANDB}\"\n"
            ),
        );
        let repo = sandbox.path().join("miner-repo");
        fs::create_dir_all(&repo).expect("mkdir the repo");
        git(&repo, &["init", "-q", "-b", "main"]);
        let smi = sandbox.path().join("nvidia-smi");
        executable(
            &smi,
            "#!/bin/sh\nfor i in 0 1 2 3; do echo \"$i, NVIDIA H100 80GB HBM3, 81559\"; done\n",
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let text = fs::read_to_string(EXAMPLE).expect("read the example");
        let mut rewritten = text.clone();
        for (from, to) in [
            (
                "docker = \"docker\"".to_string(),
                format!("docker = {}", json!(FAKE_DOCKER)),
            ),
            (
                "listen = \"0.0.0.0:8001\"".to_string(),
                format!("listen = \"127.0.0.1:{port}\""),
            ),
            (
                "\ngpus = \"auto\"\n".to_string(),
                format!(
                    "\ngpus = \"auto\"\nnvidia_smi = {}\n",
                    json!(smi.display().to_string())
                ),
            ),
        ] {
            assert!(rewritten.contains(&from), "the example sets {from}");
            rewritten = rewritten.replace(&from, &to);
        }
        sandbox.write_config(&rewritten);
        sandbox.set_env("DOCKER_FAKE_STATE", state.display().to_string());
        sandbox.set_env("DOCKER_FAKE_NCPU", "256");
        sandbox.set_env("HUGGINGFACE_TOKEN", HF_SECRET);
        sandbox.set_env("HUGGINGFACE_USERNAME", "tw-tests");
        sandbox.set_env("WANDB_TOKEN", "wandb-test-value");
        World {
            sandbox,
            state,
            repo,
            trainer: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Every docker call the daemon and its stages made, in order.
    fn calls(&self) -> Vec<Vec<String>> {
        fs::read_to_string(self.state.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON argv"))
            .collect()
    }

    fn calls_text(&self) -> String {
        fs::read_to_string(self.state.join("calls.log")).unwrap_or_default()
    }
}

fn body(task: &str, commit: &str, repo: &Path, gpus: &[u32]) -> Value {
    json!({
        "training_data": {
            "model": "Qwen/Qwen2.5-0.5B",
            "task_id": task,
            "hours_to_complete": 1.5,
            "expected_repo_name": "tw-test-repo",
            "dataset": "https://s3.example.com/datasets/train.json",
            "dataset_type": {"field_instruction": "instruct", "field_output": "output"},
            "file_format": "s3",
        },
        "github_repo": repo.display().to_string(),
        "gpu_ids": gpus,
        "hotkey": "5FhkTestHotkeyA1111111111111111111111111111111",
        "github_commit_hash": commit,
        "github_token": TOKEN,
    })
}

async fn wait_task(client: &reqwest::Client, world: &World, body: &Value, status: &str) -> Value {
    let url = format!(
        "{}/v1/trainer/{}?hotkey={}",
        world.trainer,
        body["training_data"]["task_id"].as_str().expect("a task"),
        body["hotkey"].as_str().expect("a hotkey")
    );
    wait_until(format_args!("the task is {status}"), secs(60), async || {
        let reply = client
            .get(&url)
            .send()
            .await
            .expect("the trainer API answers");
        assert_eq!(reply.status(), StatusCode::OK);
        let task: Value = reply.json().await.expect("json");
        (task["status"] == status).then_some(task)
    })
    .await
}

fn job_id(body: &Value) -> String {
    training_worker::api::god::job_id_of(
        body["training_data"]["task_id"].as_str().expect("a task"),
        body["hotkey"].as_str().expect("a hotkey"),
    )
    .to_string()
}

/// The position of the first call that starts with `head`, and the call.
fn find<'a>(calls: &'a [Vec<String>], head: &[&str]) -> Option<(usize, &'a Vec<String>)> {
    calls
        .iter()
        .enumerate()
        .find(|(_, c)| c.len() >= head.len() && c.iter().zip(head).all(|(a, b)| a == b))
}

fn pair(args: &[String], flag: &str) -> Option<String> {
    args.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_god_trainer_pipeline_builds_trains_uploads_and_removes_its_image() {
    let world = World::new();
    let good = commit_trainer(&world.repo, 0);
    let daemon = world.sandbox.start().await;
    let client = reqwest::Client::new();

    let a = body(
        "4f0c8a52-8d1e-4d8a-9b43-0a6f2b1c7e01",
        &good,
        &world.repo,
        &[0, 1, 2, 3],
    );
    let reply = client
        .post(format!("{}/v1/trainer/start_training", world.trainer))
        .json(&a)
        .send()
        .await
        .expect("the trainer API answers");
    assert_eq!(reply.status(), StatusCode::OK);
    let task = wait_task(&client, &world, &a, "success").await;
    assert_eq!(task["wandb_url"], WANDB, "{task}");
    let job = job_id(&a);
    assert_eq!(
        task["container_name"],
        format!("tw-{job}-upload-text"),
        "{task}"
    );

    let calls = world.calls();
    let owner = world.sandbox.data_dir().display().to_string();
    let repo_dir = format!("{owner}/god/repos/{job}");
    // The image is built from the clone at the task's commit, on the internal network.
    let (built_at, build) = find(&calls, &["build"]).expect("an image build");
    assert_eq!(
        build,
        &[
            "build",
            "--no-cache",
            "--label",
            &format!("training-worker.job={job}"),
            "-t",
            &format!("tw-god-{job}"),
            "-f",
            &format!("{repo_dir}/dockerfiles/standalone-text-trainer.dockerfile"),
            &repo_dir,
        ]
    );
    assert!(
        find(
            &calls,
            &[
                "network",
                "create",
                "--driver",
                "bridge",
                "--internal",
                "internal_bridge"
            ]
        )
        .is_some(),
        "{calls:?}"
    );
    let (downloaded_at, download) = find(
        &calls,
        &["run", "-d", "--name", &format!("tw-{job}-download-text")],
    )
    .expect("the downloader ran");
    assert!(downloaded_at < built_at, "download, then build");
    assert!(!download.contains(&"--gpus".to_string()), "{download:?}");
    assert!(
        download.ends_with(&[
            DOWNLOADER.to_string(),
            "--task-id".into(),
            "4f0c8a52-8d1e-4d8a-9b43-0a6f2b1c7e01".into(),
            "--model".into(),
            "Qwen/Qwen2.5-0.5B".into(),
            "--task-type".into(),
            "InstructTextTask".into(),
            "--dataset".into(),
            "https://s3.example.com/datasets/train.json".into(),
            "--file-format".into(),
            "s3".into(),
        ]),
        "{download:?}"
    );
    // The trainer: the task's four GPUs, upstream's limits for four, the built image.
    let (trained_at, train) = find(
        &calls,
        &["run", "-d", "--name", &format!("tw-{job}-train-text")],
    )
    .expect("the trainer ran");
    assert!(built_at < trained_at);
    assert_eq!(pair(train, "--gpus").as_deref(), Some("\"device=0,1,2,3\""));
    assert_eq!(pair(train, "--memory").as_deref(), Some("440g"));
    assert_eq!(pair(train, "--shm-size").as_deref(), Some("16g"));
    assert_eq!(pair(train, "--network").as_deref(), Some("internal_bridge"));
    for arg in [
        format!("{owner}/god/cache:/cache:ro"),
        format!("{owner}/god/checkpoints/{job}:/app/checkpoints/:rw"),
        "--cap-drop=ALL".into(),
        "--security-opt=no-new-privileges".into(),
        format!("tw-god-{job}"),
        "--hours-to-complete".into(),
        "1.5".into(),
    ] {
        assert!(train.contains(&arg), "{arg} in {train:?}");
    }
    assert!(
        !train
            .iter()
            .any(|a| a.starts_with("HUGGINGFACE") || a == "WANDB_TOKEN"),
        "no secret for the trainer: {train:?}"
    );
    // The uploader gets the secrets by name only, then the image goes.
    let (uploaded_at, upload) = find(
        &calls,
        &["run", "-d", "--name", &format!("tw-{job}-upload-text")],
    )
    .expect("the uploader ran");
    assert!(trained_at < uploaded_at);
    for name in ["HUGGINGFACE_TOKEN", "HUGGINGFACE_USERNAME", "WANDB_TOKEN"] {
        assert!(
            upload.windows(2).any(|w| w == ["-e", name]),
            "{name}: {upload:?}"
        );
    }
    let (removed_at, _) = find(
        &calls,
        &["image", "rm", "--force", &format!("tw-god-{job}")],
    )
    .expect("the image was removed");
    assert!(uploaded_at < removed_at);
    assert!(
        !world
            .state
            .join("images")
            .join(format!("tw-god-{job}"))
            .exists()
    );
    assert!(!Path::new(&repo_dir).exists(), "the clone is removed");
    // No secret reached a command line, and the task's token is nowhere.
    let text = world.calls_text();
    assert!(!text.contains(HF_SECRET) && !text.contains(TOKEN));
    let log = fs::read_to_string(world.sandbox.data_dir().join(format!("logs/{job}.log")))
        .expect("the job's log");
    assert!(
        log.contains(&format!("cloned {} at {good}", world.repo.display())),
        "{log}"
    );
    assert!(!log.contains(TOKEN) && !daemon.stderr().contains(TOKEN));

    // A trainer that fails: no upload, the failure recorded, and still the image removed.
    let bad = commit_trainer(&world.repo, 3);
    let b = body(
        "4f0c8a52-8d1e-4d8a-9b43-0a6f2b1c7e02",
        &bad,
        &world.repo,
        &[1],
    );
    let reply = client
        .post(format!("{}/v1/trainer/start_training", world.trainer))
        .json(&b)
        .send()
        .await
        .expect("the trainer API answers");
    assert_eq!(reply.status(), StatusCode::OK);
    let task = wait_task(&client, &world, &b, "failure").await;
    let failed = job_id(&b);
    let last = task["logs"]
        .as_array()
        .and_then(|l| l.last())
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    assert!(
        last.contains("stage train-text: trainer exited with status 3"),
        "{task}"
    );
    wait_until("the failed task's image is removed", secs(30), async || {
        find(
            &world.calls(),
            &["image", "rm", "--force", &format!("tw-god-{failed}")],
        )
        .map(|_| ())
    })
    .await;
    let calls = world.calls();
    assert!(
        find(
            &calls,
            &["run", "-d", "--name", &format!("tw-{failed}-upload-text")]
        )
        .is_none(),
        "no upload after a failed training"
    );
    let train = find(
        &calls,
        &["run", "-d", "--name", &format!("tw-{failed}-train-text")],
    )
    .expect("the trainer ran")
    .1;
    assert_eq!(pair(train, "--gpus").as_deref(), Some("\"device=1\""));
    assert_eq!(pair(train, "--memory").as_deref(), Some("110g"));
    assert_eq!(pair(train, "--shm-size").as_deref(), Some("8g"));
    // The fake CLI records a call before it acts on it: the image goes a moment later.
    let image = world.state.join("images").join(format!("tw-god-{failed}"));
    wait_until("the failed task's image is gone", secs(10), async || {
        (!image.exists()).then_some(())
    })
    .await;
}
