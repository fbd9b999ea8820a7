//! `training-worker nodes` end to end: the real binary as a child process against a real
//! daemon (tests/e2e_support), which with the file store is the only node, live. What a
//! script sees is asserted: the table, `--json` as `GET /v1/nodes` answers it, one-line
//! errors and the exit codes. Nothing sleeps blindly: every wait polls a condition.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "cli_support/mod.rs"]
mod cli_support;

use serde_json::{Value, json};

use cli_support::{Output, at, run, server};
use support::{STUB_TRAINER, Sandbox, diffusion_job, secs, wait_until};

/// Runs `training-worker nodes` with `args` against `server`, with `env` added to an
/// environment that does not steer it.
async fn nodes(server: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = at(server, &["nodes"]);
    command.args(args).envs(env.iter().copied());
    let output = run(command).await;
    if output.code != 0 {
        assert_eq!(
            output.stdout, "",
            "nothing on stdout after an error: {output:?}"
        );
    }
    output
}

/// The node's name and address as the daemons here are configured.
const NODE: &str = "gpu-box-1";
const ADDRESS: &str = "http://10.0.0.11:8787";

/// A daemon named [`NODE`] with two GPUs and two slots, running the stub trainer; `extra` is
/// added to its configuration's top level. The shortest lease: with the database, a
/// heartbeat every second.
fn sandbox(extra: &str) -> Sandbox {
    let sandbox = Sandbox::new();
    let trainer = serde_json::to_string(STUB_TRAINER).expect("a string serialises");
    sandbox.write_config(&format!(
        "{extra}shutdown_grace = \"10s\"\n\n[cluster]\nnode_id = \"{NODE}\"\n\
         address = \"{ADDRESS}\"\nlease = \"3s\"\n\n[worker]\nmax_concurrent = 2\ngpus = [0, 1]\n\n\
         [executor]\ncommand = [{trainer}]\nkill_grace = \"2s\"\npass_env = []\n"
    ));
    sandbox
}

/// The rows of a table under its header, split on runs of two spaces or more.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .map(|line| {
            line.split("  ")
                .map(str::trim)
                .filter(|cell| !cell.is_empty())
                .map(str::to_string)
                .collect()
        })
        .collect()
}

/// The table `nodes` prints once `ready` holds for its row of this daemon (the second line).
/// With the database, a node's row is what its last heartbeat wrote (one every third of the
/// lease): the file store's is read when asked.
async fn table_once(url: &str, what: &str, ready: impl Fn(&[String]) -> bool) -> Vec<Vec<String>> {
    wait_until(what, secs(15), async || {
        let out = nodes(url, &[], &[]).await;
        let table = rows(&out.assert_ok().stdout);
        table.get(1).is_some_and(|row| ready(row)).then_some(table)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_shows_this_daemon_live_with_its_running_job_and_free_gpus() {
    let sandbox = sandbox("");
    let daemon = sandbox.start().await;
    let url = server(&daemon);

    // Idle: both GPUs free.
    let table = table_once(&url, "the node shows its GPUs", |row| {
        row.last().is_some_and(|free| free.ends_with("of 2"))
    })
    .await;
    let out = table
        .iter()
        .map(|row| row.join("  "))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        table[0],
        [
            "NODE",
            "ADDRESS",
            "STATE",
            "HEARTBEAT",
            "RUNNING",
            "FREE GPUS"
        ],
        "{out}"
    );
    assert_eq!(table.len(), 2, "one node: {out}");
    assert_eq!(table[1][..3], [NODE, ADDRESS, "live"], "{out}");
    assert!(
        table[1][3] == "just now" || table[1][3].ends_with("s ago"),
        "a heartbeat of seconds ago: {out}"
    );
    assert_eq!(table[1][4..], ["0", "0,1 of 2"], "{out}");

    // A job holding one GPU: one running, the other GPU free.
    let job = uuid::Uuid::new_v4().to_string();
    sandbox.hold(&job);
    let mut body = diffusion_job("ok");
    body["job_id"] = json!(job);
    daemon.submit(body).await;
    daemon.wait_status(&job, "Running", secs(15)).await;
    let gpu = daemon.job(&job).await["gpu_ids"][0]
        .as_u64()
        .expect("the job holds a GPU");
    let free = 1 - gpu;
    let free_text = format!("{free} of 2");
    table_once(&url, "the node shows the running job on its GPU", |row| {
        row[4..] == ["1", free_text.as_str()]
    })
    .await;

    // --json prints what the API answers.
    let out = nodes(&url, &["--json"], &[]).await;
    let printed: Value = serde_json::from_str(&out.assert_ok().stdout).expect("JSON");
    let node = &printed["nodes"][0];
    assert_eq!(
        printed["nodes"].as_array().map(Vec::len),
        Some(1),
        "{printed}"
    );
    assert_eq!(node["id"], NODE, "{printed}");
    assert_eq!(node["address"], ADDRESS, "{printed}");
    assert_eq!(node["live"], true, "{printed}");
    assert_eq!(node["running"], json!([job]), "{printed}");
    assert_eq!(node["gpus"], json!([0, 1]), "{printed}");
    assert_eq!(node["free_gpus"], json!([free]), "{printed}");
    let api = daemon.get("/v1/nodes").await.json();
    for key in ["id", "address", "live", "started_at", "running", "gpus"] {
        assert_eq!(node[key], api["nodes"][0][key], "{key}: {printed} / {api}");
    }
    sandbox.release(&job);
    daemon.wait_status(&job, "Completed", secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_without_gpus_shows_a_dash_and_the_defaults() {
    // Nothing of [cluster] configured: the node is named after the host, and reached at
    // the address it listens on.
    let sandbox = Sandbox::new();
    sandbox.configure(&support::Settings::default());
    let daemon = sandbox.start().await;
    let url = server(&daemon);
    let table = table_once(&url, "the node is listed", |_| true).await;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("the host name");
    assert_eq!(
        table[1][..3],
        [host.trim(), url.as_str(), "live"],
        "{table:?}"
    );
    assert_eq!(table[1][4..], ["0", "-"], "{table:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_fails_in_one_line_like_every_command() {
    // Unreachable: exit 1, naming the server.
    let gone = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port()
    );
    for args in [&[][..], &["--json"][..]] {
        let out = nodes(&gone, args, &[]).await;
        out.assert_error(1, &format!("cannot connect to the daemon at {gone}"));
    }

    // Behind a token: 401 without it, the table with it.
    let sandbox = sandbox("api_token = \"s3cret\"\n");
    let daemon = sandbox.start().await;
    let url = server(&daemon);
    nodes(&url, &[], &[]).await.assert_error(1, "401");
    wait_until("the node is listed with the token", secs(15), async || {
        let token = [("TRAINING_WORKER_API_TOKEN", "s3cret")];
        let out = nodes(&url, &["--json"], &token).await;
        let printed: Value = serde_json::from_str(&out.assert_ok().stdout).expect("JSON");
        let node = &printed["nodes"][0];
        (node["id"] == NODE && node["live"] == true).then_some(())
    })
    .await;
}
