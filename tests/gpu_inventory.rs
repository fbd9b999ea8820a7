//! The GPU inventory with the real binary and a fake nvidia-smi (a script this test writes):
//! `[worker] gpus = "auto"` takes its ids from the query, a query that cannot be read stops
//! the start with exit 78 and one line saying why, a GPU of no G.O.D type is named in a
//! warning, and a list of ids does without nvidia-smi.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::json;
use support::{Sandbox, secs, wait_until};

const GPU_TRAINER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/trainers/gpu.sh");

/// Writes a fake nvidia-smi into the sandbox: a shell script with `body`. It records the
/// arguments it was given, to show the query asked is the documented one.
fn fake_smi(sandbox: &Sandbox, body: &str) -> PathBuf {
    let path = sandbox.path().join("fake-nvidia-smi");
    let script = format!("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/smi-args\"\n{body}\n");
    fs::write(&path, script).expect("write the fake nvidia-smi");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("make it executable");
    path
}

/// Two GPUs of ids that no default would give, and a third of no G.O.D type.
const THREE_GPUS: &str = "cat <<'EOF'\n\
2, NVIDIA H100 80GB HBM3, 81559\n\
\n\
  5 ,  NVIDIA RTX A6000 , 49140\n\
7, NVIDIA GeForce RTX 4090, 24564\n\
EOF";

fn configure(sandbox: &Sandbox, worker: &str, extra: &str) {
    sandbox.write_config(&format!(
        "shutdown_grace = \"10s\"\n[worker]\nmax_concurrent = 4\n{worker}\n\
         [executor]\ncommand = [\"{GPU_TRAINER}\"]\nkill_grace = \"2s\"\n{extra}"
    ));
}

fn job(id: &str, gpu_count: u32) -> serde_json::Value {
    json!({"type": "DiffusionJob", "job_id": id, "model": "ok", "dataset_zip": "z.zip",
           "gpu_count": gpu_count})
}

/// The `CUDA_VISIBLE_DEVICES` each finished trainer saw, by job.
fn seen_gpus(sandbox: &Sandbox) -> Vec<(String, String)> {
    let text = fs::read_to_string(sandbox.path().join("gpu-records")).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split(' ').collect();
            (parts[0] == "end").then(|| (parts[1].to_string(), parts[2].to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_hands_out_the_gpus_nvidia_smi_reports() {
    let sandbox = Sandbox::new();
    let smi = fake_smi(&sandbox, THREE_GPUS);
    configure(
        &sandbox,
        &format!("gpus = \"auto\"\nnvidia_smi = {:?}", smi.to_string_lossy()),
        "[god_trainer]\ngpu_types = { \"H200\" = \"H100\" }\n",
    );
    let daemon = sandbox.start().await;
    let args = fs::read_to_string(sandbox.path().join("smi-args")).expect("the query ran");
    assert_eq!(
        args.trim(),
        "--query-gpu=index,name,memory.total --format=csv,noheader,nounits"
    );
    assert_eq!(args.lines().count(), 1, "asked once: {args}");

    // Three GPUs: a job may ask for all of them, not for a fourth.
    let reply = daemon.post_job(&job(&uuid(9), 4)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    let a = uuid(1);
    let hold = sandbox.path().join(format!("hold-{a}"));
    fs::write(&hold, b"").expect("hold the trainer");
    daemon.submit(job(&a, 3)).await;
    // While its trainer runs, the job holds all three, and the API says what they are.
    let gpus = wait_until("the job holds its GPUs", secs(20), async || {
        let gpus = daemon.get("/v1/gpus").await.json();
        (gpus[0]["job"] == a.as_str()).then_some(gpus)
    })
    .await;
    assert_eq!(
        gpus,
        json!([
            {"id": 2, "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "job": a, "reserved": false},
            {"id": 5, "name": "NVIDIA RTX A6000", "memory_mib": 49140, "job": a, "reserved": false},
            {"id": 7, "name": "NVIDIA GeForce RTX 4090", "memory_mib": 24564, "job": a, "reserved": false},
        ])
    );
    fs::remove_file(&hold).expect("release the trainer");
    wait_until("the job completes", secs(20), async || {
        (daemon.job(&a).await["status"] == "Completed").then_some(())
    })
    .await;
    assert_eq!(daemon.get("/v1/gpus").await.json()[2]["job"], json!(null));
    assert_eq!(seen_gpus(&sandbox), [(a.clone(), "2,5,7".to_string())]);
    assert_eq!(daemon.job(&a).await["gpu_ids"], json!([2, 5, 7]));

    let stderr = daemon.stderr();
    let inventory = stderr
        .lines()
        .find(|l| l.contains("GPU inventory"))
        .unwrap_or_else(|| panic!("the inventory is logged: {stderr}"));
    assert!(
        inventory.contains("2: NVIDIA H100 80GB HBM3 (81559 MiB)")
            && inventory.contains("5: NVIDIA RTX A6000 (49140 MiB)"),
        "{inventory}"
    );
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("G.O.D"))
        .collect();
    assert_eq!(warnings.len(), 1, "only the RTX 4090 is unmapped: {stderr}");
    assert!(
        warnings[0].contains("NVIDIA GeForce RTX 4090") && warnings[0].contains("gpu=7"),
        "the warning names the GPU: {}",
        warnings[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_works_from_the_environment_too() {
    let sandbox = Sandbox::new();
    let smi = fake_smi(
        &sandbox,
        "echo '0, NVIDIA H200, 143771'; echo '1, NVIDIA H200, 143771'",
    );
    configure(&sandbox, "", "");
    sandbox.set_env("TRAINING_WORKER_WORKER_GPUS", "auto");
    sandbox.set_env("TRAINING_WORKER_WORKER_NVIDIA_SMI", smi.to_string_lossy());
    sandbox.set_env("TRAINING_WORKER_GOD_TRAINER_GPU_TYPES", "H200=H100");
    let daemon = sandbox.start().await;
    let (a, b) = (uuid(1), uuid(2));
    daemon.submit(job(&a, 1)).await;
    daemon.submit(job(&b, 1)).await;
    wait_until("both complete", secs(20), async || {
        (daemon.list_ids("Completed").await.len() == 2).then_some(())
    })
    .await;
    let mut seen: Vec<String> = seen_gpus(&sandbox).into_iter().map(|(_, g)| g).collect();
    seen.sort();
    assert!(
        seen == ["0", "0"] || seen == ["0", "1"],
        "ids from the query: {seen:?}"
    );
    let stderr = daemon.stderr();
    assert!(
        !stderr.contains("G.O.D"),
        "H200 is mapped, so no warning: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_that_cannot_be_read_is_a_bad_configuration() {
    let sandbox = Sandbox::new();
    let missing = sandbox.path().join("no-nvidia-smi-here");
    let cases = [
        (
            "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 1",
            "exited with status 1: \"NVIDIA-SMI has failed because it could not communicate",
        ),
        (
            "echo 'Hello, this is not, a GPU list'; echo more",
            "not a GPU list (the index is not a whole number on line 1): \"Hello, this is not, a GPU list / more\"",
        ),
        ("echo 'No devices were found' >&2", "reports no GPU"),
        ("", "missing"),
    ];
    for (body, cause) in cases {
        let program = if cause == "missing" {
            missing.clone()
        } else {
            fake_smi(&sandbox, body)
        };
        configure(
            &sandbox,
            &format!(
                "gpus = \"auto\"\nnvidia_smi = {:?}",
                program.to_string_lossy()
            ),
            "",
        );
        let mut daemon = sandbox.spawn();
        let status = daemon.wait_exit(secs(20)).await;
        let stderr = daemon.stderr();
        assert_eq!(status.code(), Some(78), "{body}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        let cause = if cause == "missing" {
            "No such file or directory"
        } else {
            cause
        };
        for want in [
            "bad configuration",
            "worker.gpus = \"auto\": cannot read the GPU inventory",
            &*program.to_string_lossy(),
            cause,
        ] {
            assert!(stderr.contains(want), "{want}: {stderr}");
        }
        for noise in ["panicked", "backtrace"] {
            assert!(!stderr.contains(noise), "{noise}: {stderr}");
        }
        assert!(
            !sandbox.data_dir().join("jobs").exists(),
            "refused before the data dir is touched"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_ids_needs_no_nvidia_smi() {
    let sandbox = Sandbox::new();
    let missing = sandbox.path().join("no-nvidia-smi-here");
    configure(
        &sandbox,
        &format!("gpus = [3]\nnvidia_smi = {:?}", missing.to_string_lossy()),
        "",
    );
    let daemon = sandbox.start().await;
    let a = uuid(1);
    daemon.submit(job(&a, 1)).await;
    wait_until("the job completes", secs(20), async || {
        (daemon.job(&a).await["status"] == "Completed").then_some(())
    })
    .await;
    assert_eq!(seen_gpus(&sandbox), [(a, "3".to_string())]);
    assert_eq!(
        daemon.get("/v1/gpus").await.json(),
        json!([{"id": 3, "name": null, "memory_mib": null, "job": null, "reserved": false}])
    );
    let stderr = daemon.stderr();
    assert!(
        !stderr.contains("ERROR") && !stderr.contains("WARN"),
        "unknown names are no trouble: {stderr}"
    );
}

fn uuid(n: u128) -> String {
    uuid::Uuid::from_u128(0x6770_1000_0000_4000_8000_0000_0000_0000 | n).to_string()
}
