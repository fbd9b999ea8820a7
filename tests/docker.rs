//! Container stages (`kind = "docker"`), end to end: the real daemon runs its pipelines
//! through the fake docker CLI (tests/support/fake-docker), whose "images" are the recorder
//! script (tests/trainers/images/recorder.sh). What is judged is what a user would notice:
//! the exact `docker run` command lines (the fake's `calls.log`), what the containers saw and
//! when they ran (the recorder's records), the containers the fake still has (`docker ps`),
//! the job files, the job logs and the daemon's own log.
//!
//! Each test has its own sandbox: a data dir, a config, and the fake's state dir, which
//! reaches the docker CLI as `DOCKER_FAKE_STATE` through the daemon's environment (the
//! daemon passes every `DOCKER_*` variable of its own to the CLI); the sandbox gives it to
//! every daemon it starts. Every wait polls a condition with a deadline; every container a
//! test leaves is removed when it ends.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Daemon, Sandbox, normalise, pid_alive, secs, stage_lines, wait_until};

const FAKE_DOCKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/fake-docker");
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples");
/// The image every test installs, under whatever names its config uses.
const RECORDER: &str = include_str!("trainers/images/recorder.sh");
const STAGES: [&str; 3] = ["download", "train", "upload"];
const MODEL: &str = "Qwen/Qwen2.5-0.5B";

// ---------------------------------------------------------------------------------------
// The sandbox, the fake's state, the daemon
// ---------------------------------------------------------------------------------------

/// One test's world: a sandbox (config, data dir, daemon stderr files) with the fake's state
/// dir in it. Dropped after its daemons; removes every container the fake still has, so that
/// no process outlives the test, and prints the fake's calls and the records on a panic.
struct World {
    sandbox: Sandbox,
    /// The value of HUGGINGFACE_TOKEN in the daemon's environment.
    secret: String,
}

impl World {
    fn new() -> World {
        let sandbox = Sandbox::new();
        let world = World {
            sandbox,
            secret: format!("hf_{}", uuid::Uuid::new_v4().simple()),
        };
        fs::create_dir_all(world.state().join("images")).expect("create the images dir");
        fs::create_dir_all(world.sandbox.data_dir()).expect("create the data dir");
        // Nothing of the test's own environment may steer the daemon or the fake.
        for prefix in ["DOCKER_", "HUGGINGFACE_", "WANDB_"] {
            world.sandbox.remove_env_prefix(prefix);
        }
        let sandbox = &world.sandbox;
        sandbox.set_env("DOCKER_FAKE_STATE", world.state().display().to_string());
        sandbox.set_env("HUGGINGFACE_TOKEN", world.secret.as_str());
        sandbox.set_env("HUGGINGFACE_USERNAME", "tw-tests");
        sandbox.set_env("WANDB_TOKEN", "wandb-test-value");
        world
    }

    fn path(&self) -> &Path {
        self.sandbox.path()
    }

    /// `DOCKER_FAKE_STATE`.
    fn state(&self) -> PathBuf {
        self.path().join("docker")
    }

    /// The recorder's records (its default for an image in `<sandbox>/docker/images/`).
    fn records(&self) -> PathBuf {
        self.path().join("records")
    }

    /// The data dir as the daemon names it: the value of the owner label.
    fn owner(&self) -> String {
        fs::canonicalize(self.sandbox.data_dir())
            .expect("the data dir exists")
            .display()
            .to_string()
    }

    /// Installs the recorder as image `name`.
    fn image(&self, name: &str) {
        self.image_script(name, RECORDER);
    }

    fn image_script(&self, name: &str, script: &str) {
        let path = self.state().join("images").join(name);
        fs::write(&path, script).expect("write an image");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod an image");
    }

    fn control_file(&self, what: &str, job: &str, stage: &str) -> PathBuf {
        self.path().join(format!("{what}-{job}-{stage}"))
    }

    /// Makes `stage` of `job` wait after its start until [`World::release`].
    fn hold(&self, job: &str, stage: &str) {
        fs::write(self.control_file("hold", job, stage), b"").expect("hold");
    }

    fn release(&self, job: &str, stage: &str) {
        fs::remove_file(self.control_file("hold", job, stage)).expect("release");
    }

    /// Makes a held `stage` of `job` print a tick line about every 0.2 s.
    fn tick(&self, job: &str, stage: &str) {
        fs::write(self.control_file("tick", job, stage), b"").expect("tick");
    }

    /// What the recorder wrote beside its records for one run, if it ran.
    fn seen(&self, what: &str, job: &str, stage: &str, attempt: u32) -> Option<String> {
        fs::read_to_string(self.path().join(format!("{what}-{job}-{stage}-{attempt}"))).ok()
    }

    /// The fake CLI, with the environment the daemon gives it.
    fn docker(&self, args: &[&str]) -> Output {
        Command::new(FAKE_DOCKER)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.path())
            .env("DOCKER_FAKE_STATE", self.state())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("fake-docker {args:?}: {e}"))
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "fake-docker {args:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every container the fake has, of any owner: name -> (state, owner label).
    fn containers(&self) -> BTreeMap<String, (String, String)> {
        let format = r#"{{.Names}}\t{{.State}}\t{{.Label "training-worker.owner"}}"#;
        self.docker_ok(&["ps", "-a", "--no-trunc", "--format", format])
            .lines()
            .filter(|l| !l.is_empty())
            .map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                let [name, state, owner] = fields[..] else {
                    panic!("bad ps line {line:?}");
                };
                (name.to_string(), (state.to_string(), owner.to_string()))
            })
            .collect()
    }

    /// The containers labelled with this data dir.
    fn own_containers(&self) -> BTreeMap<String, String> {
        let owner = self.owner();
        self.containers()
            .into_iter()
            .filter(|(_, (_, o))| *o == owner)
            .map(|(name, (state, _))| (name, state))
            .collect()
    }

    async fn container_gone(&self, name: &str) {
        wait_until(
            format_args!("container {name} is gone"),
            secs(15),
            async || (!self.containers().contains_key(name)).then_some(()),
        )
        .await;
    }

    /// The exit code the fake kept of a removed container named `name`.
    fn removed_exit_code(&self, name: &str) -> Option<i32> {
        let entries = fs::read_dir(self.state().join("removed")).ok()?;
        entries.flatten().find_map(|e| {
            let named = fs::read_to_string(e.path().join("name")).ok()?;
            (named == name).then(|| {
                fs::read_to_string(e.path().join("exitcode"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            })?
        })
    }

    /// Every docker CLI call so far, each as its argv (without the program).
    fn calls(&self) -> Vec<Vec<String>> {
        let text = fs::read_to_string(self.state().join("calls.log")).unwrap_or_default();
        text.lines()
            .map(|line| {
                serde_json::from_str::<Vec<String>>(line)
                    .unwrap_or_else(|e| panic!("calls.log line {line:?}: {e}"))
            })
            .collect()
    }

    /// The `docker run` calls that named their container `name`.
    fn runs_of(&self, name: &str) -> Vec<Vec<String>> {
        self.calls()
            .into_iter()
            .filter(|c| c.first().is_some_and(|v| v == "run") && option(c, "--name") == Some(name))
            .collect()
    }

    /// Everything the recorder noted so far, complete lines only.
    fn notes(&self) -> Vec<Note> {
        let text = fs::read_to_string(self.records()).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|line| match line.split(' ').collect::<Vec<_>>()[..] {
                [kind, stage, job, attempt, pid, at] => Note {
                    kind: kind.into(),
                    stage: stage.into(),
                    job: job.into(),
                    attempt: attempt.parse().expect("attempt is a number"),
                    pid: pid.parse().expect("pid is a number"),
                    at: at.parse().expect("a time"),
                },
                _ => panic!("bad record {line:?}"),
            })
            .collect()
    }

    /// `job`'s notes as (kind, stage, attempt), in order.
    fn runs(&self, job: &str) -> Vec<(String, String, u32)> {
        self.notes()
            .into_iter()
            .filter(|n| n.job == job)
            .map(|n| (n.kind, n.stage, n.attempt))
            .collect()
    }

    /// Waits until `stage` of `job` has started in run number `attempt`; its note.
    async fn started(&self, job: &str, stage: &str, attempt: u32) -> Note {
        wait_until(
            format_args!("stage {stage} of job {job} starts (attempt {attempt})"),
            secs(20),
            async || {
                self.notes().into_iter().find(|n| {
                    n.kind == "start" && n.stage == stage && n.job == job && n.attempt == attempt
                })
            },
        )
        .await
    }

    fn log(&self, job: &str) -> String {
        let path = self.sandbox.data_dir().join(format!("logs/{job}.log"));
        fs::read_to_string(path).unwrap_or_default()
    }

    /// Starts a daemon in the sandbox and waits until it is ready (`/readyz` says 200, which
    /// is after the containers were reconciled).
    async fn start(&self) -> Daemon {
        self.sandbox.start().await
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- calls.log -----\n{}\n----- records -----\n{}",
                fs::read_to_string(self.state().join("calls.log")).unwrap_or_default(),
                fs::read_to_string(self.records()).unwrap_or_default()
            );
        }
        // The daemons are gone (dropped before their world); their containers are not.
        let ids = self.docker(&["ps", "-aq", "--no-trunc"]);
        let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout)
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            let _ = self.docker(&args);
        }
    }
}

/// One line of the recorder's records.
#[derive(Clone, Debug)]
struct Note {
    /// `start`, `end` (finished by itself) or `term` (stopped by SIGTERM).
    kind: String,
    stage: String,
    job: String,
    attempt: u32,
    pid: i32,
    /// Microseconds since the epoch.
    at: u128,
}

/// Submits a job, expects 201, returns its id.
async fn submit(daemon: &Daemon, body: Value) -> String {
    let reply = daemon.post_job(&body).await;
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "submit {body}: {}",
        reply.text
    );
    reply.json()["job_id"].as_str().expect("job_id").to_string()
}

/// Cancels a job, expects 200, returns the job.
async fn cancel(daemon: &Daemon, id: &str) -> Value {
    let reply = daemon.cancel(id).await;
    assert_eq!(reply.status, StatusCode::OK, "cancel {id}: {}", reply.text);
    reply.json()
}

// ---------------------------------------------------------------------------------------
// Configs, jobs, command lines
// ---------------------------------------------------------------------------------------

/// A pipeline of recorder containers, one stage each of `stages`.
struct Pipeline {
    gpus: &'static str,
    max_concurrent: usize,
    adopt_running: bool,
    /// The train stage's own timeout.
    train_timeout: Option<&'static str>,
    stages: &'static [&'static str],
    /// The image of the download stage (the others run "recorder").
    download_image: &'static str,
}

impl Default for Pipeline {
    fn default() -> Pipeline {
        Pipeline {
            gpus: "0",
            max_concurrent: 1,
            adopt_running: false,
            train_timeout: None,
            stages: &STAGES,
            download_image: "recorder",
        }
    }
}

impl Pipeline {
    /// Writes the config; installs the recorder image. The records path reaches the
    /// containers through each stage's `env` table; the token goes to upload alone.
    fn install(&self, world: &World) {
        world.image("recorder");
        let docker = serde_json::to_string(FAKE_DOCKER).expect("a string");
        let records = serde_json::to_string(&world.records().display().to_string())
            .expect("a string serialises");
        let mut text = format!(
            "shutdown_grace = \"10s\"\n\n[worker]\nmax_concurrent = {}\ngpus = [{}]\n\n\
             [executor]\ndocker = {docker}\nadopt_running = {}\ntimeout = \"60s\"\n\
             kill_grace = \"2s\"\npass_env = [\"HUGGINGFACE_TOKEN\"]\n",
            self.max_concurrent, self.gpus, self.adopt_running,
        );
        for stage in self.stages {
            let image = if *stage == "download" {
                self.download_image
            } else {
                "recorder"
            };
            text.push_str(&format!(
                "\n[[executor.stages]]\nname = \"{stage}\"\nkind = \"docker\"\n\
                 image = \"{image}\"\ncommand = [\"--job\", \"{{job_id}}\", \"--gpu-ids\", \
                 \"{{gpu_ids}}\"]\nenv = {{ RECORDS = {records} }}\n"
            ));
            if *stage != "upload" {
                text.push_str("pass_env = []\n");
            }
            if let (true, Some(timeout)) = (*stage == "train", self.train_timeout) {
                text.push_str(&format!("timeout = \"{timeout}\"\n"));
            }
        }
        world.sandbox.write_config(&text);
    }
}

/// An instruct TextJob with a fixed id and `gpu_count`.
fn job(id: &str, gpu_count: u32) -> Value {
    json!({
        "type": "TextJob",
        "job_id": id,
        "model": MODEL,
        "dataset": "s3://bucket/train.json",
        "dataset_type": {"field_instruction": "instruction", "field_output": "output"},
        "file_format": "s3",
        "gpu_count": gpu_count,
    })
}

fn id(n: u128) -> String {
    uuid::Uuid::from_u128(0xd0c4_0000_0000_4000_8000_0000_0000_0000 | n).to_string()
}

fn container(job: &str, stage: &str) -> String {
    format!("tw-{job}-{stage}")
}

/// The value after `flag` in an argv.
fn option<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    argv.windows(2)
        .find(|w| w[0] == flag)
        .map(|w| w[1].as_str())
}

/// The GPU ids a `docker run` argv gives its container (`--gpus "device=0,1"`).
fn devices(argv: &[String]) -> BTreeSet<u32> {
    let Some(value) = option(argv, "--gpus") else {
        return BTreeSet::new();
    };
    let list = value
        .strip_prefix("\"device=")
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or_else(|| panic!("--gpus {value:?} is not \"device=...\" in quotes"));
    list.split(',')
        .map(|g| g.parse().expect("a GPU id"))
        .collect()
}

/// The `-e ATTEMPT=n` of a `docker run` argv.
fn attempt_of(argv: &[String]) -> u32 {
    argv.windows(2)
        .find_map(|w| (w[0] == "-e").then(|| w[1].strip_prefix("ATTEMPT="))?)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no -e ATTEMPT= in {argv:?}"))
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn gpu_ids(job: &Value) -> BTreeSet<u32> {
    job["gpu_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_u64().expect("an id") as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn stages_done(job: &Value) -> Vec<String> {
    job["stages_done"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a name").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn rot13(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            'a'..='z' => (((c as u8 - b'a') + 13) % 26 + b'a') as char,
            'A'..='Z' => (((c as u8 - b'A') + 13) % 26 + b'A') as char,
            c => c,
        })
        .collect()
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                todo.push(path);
            } else if kind.is_file()
                && fs::read(&path).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                found.push(path);
            }
        }
    }
    found
}

/// The line of the daemon's log that says `what` about container `name`.
fn log_line<'a>(stderr: &'a str, what: &str, name: &str) -> Option<&'a str> {
    let field = format!("container={name}");
    stderr
        .lines()
        .find(|l| l.contains(what) && l.split_whitespace().any(|w| w == field))
}

// ---------------------------------------------------------------------------------------
// GPU overlap, judged from the command lines and the records
// ---------------------------------------------------------------------------------------

/// One container as it ran: its GPUs (from its `docker run`) and when its main process ran
/// (from the recorder; `end` None: no end was noted).
#[derive(Clone, Debug)]
struct ContainerRun {
    job: String,
    stage: String,
    attempt: u32,
    devices: BTreeSet<u32>,
    start: u128,
    end: Option<u128>,
}

fn container_runs(world: &World) -> Vec<ContainerRun> {
    let calls = world.calls();
    let notes = world.notes();
    notes
        .iter()
        .filter(|n| n.kind == "start")
        .map(|start| {
            let name = container(&start.job, &start.stage);
            let argv = calls
                .iter()
                .find(|c| {
                    c[0] == "run"
                        && option(c, "--name") == Some(name.as_str())
                        && attempt_of(c) == start.attempt
                })
                .unwrap_or_else(|| panic!("no docker run of {name}, attempt {}", start.attempt));
            let end = notes
                .iter()
                .find(|n| {
                    n.kind != "start"
                        && n.job == start.job
                        && n.stage == start.stage
                        && n.attempt == start.attempt
                })
                .map(|n| n.at);
            ContainerRun {
                job: start.job.clone(),
                stage: start.stage.clone(),
                attempt: start.attempt,
                devices: devices(argv),
                start: start.at,
                end,
            }
        })
        .collect()
}

/// No two containers that ran at the same time were given a common GPU. Returns how many
/// pairs ran at the same time.
fn assert_no_gpu_overlap(runs: &[ContainerRun]) -> usize {
    let mut concurrent_pairs = 0;
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            let concurrent =
                a.start < b.end.unwrap_or(u128::MAX) && b.start < a.end.unwrap_or(u128::MAX);
            if !concurrent {
                continue;
            }
            concurrent_pairs += 1;
            let shared: Vec<&u32> = a.devices.intersection(&b.devices).collect();
            assert!(
                shared.is_empty(),
                "{a:?} and {b:?} ran at the same time on GPUs {shared:?}; all runs: {runs:#?}"
            );
        }
    }
    concurrent_pairs
}

// ---------------------------------------------------------------------------------------
// 1. The example configs' command lines
// ---------------------------------------------------------------------------------------

/// Installs `config/examples/<file>` with only `docker` pointed at the fake, and the
/// recorder as each image it names.
fn install_example(world: &World, file: &str, images: &[&str]) {
    let text = fs::read_to_string(format!("{EXAMPLES}/{file}")).expect("read the example");
    let docker = format!(
        "docker = {}",
        serde_json::to_string(FAKE_DOCKER).expect("a string serialises")
    );
    let rewritten = text.replace("docker = \"docker\"", &docker);
    assert_ne!(rewritten, text, "{file} sets docker = \"docker\"");
    world.sandbox.write_config(&rewritten);
    for image in images {
        world.image(image);
    }
}

/// `-e NAME=value` for each pair.
fn env_args(pairs: &[(&str, String)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(k, v)| ["-e".to_string(), format!("{k}={v}")])
        .collect()
}

/// The start of every `docker run` of the daemon: detached, named and labelled.
fn run_head(job: &str, stage: &str, owner: &str) -> Vec<String> {
    vec![
        "run".into(),
        "-d".into(),
        "--name".into(),
        container(job, stage),
        "--label".into(),
        format!("training-worker.job={job}"),
        "--label".into(),
        format!("training-worker.stage={stage}"),
        "--label".into(),
        format!("training-worker.owner={owner}"),
    ]
}

/// The host's CPUs as the daemon counts them: `--cpus` is capped at it.
fn host_cpus() -> f64 {
    // SAFETY: sysconf only reads a system value.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    assert!(online > 0, "sysconf(_SC_NPROCESSORS_ONLN)");
    online as f64
}

/// Runs one example pipeline to Completed and checks everything a user would see: the
/// three `docker run` command lines exactly, each container removed, the job log, what the
/// containers saw, and the token's value nowhere.
async fn example_pipeline(
    file: &str,
    images: [&str; 3],
    body: Value,
    expected: impl Fn(&str, &str) -> [Vec<String>; 3],
    expected_env: [&[&str]; 3],
) {
    let world = World::new();
    install_example(&world, file, &images);
    let daemon = world.start().await;
    let id = submit(&daemon, body).await;
    let done = daemon.wait_status(&id, "Completed", secs(60)).await;
    assert_eq!(done["attempts"], 1, "{done}");
    assert_eq!(gpu_ids(&done), BTreeSet::from([0]), "{done}");
    let owner = world.owner();
    let expected = expected(&id, &owner);

    let calls = world.calls();
    for (i, stage) in STAGES.iter().enumerate() {
        let name = container(&id, stage);
        let runs: Vec<(usize, &Vec<String>)> = calls
            .iter()
            .enumerate()
            .filter(|(_, c)| c[0] == "run" && option(c, "--name") == Some(name.as_str()))
            .collect();
        assert_eq!(runs.len(), 1, "one docker run of {name}: {calls:#?}");
        let (at, argv) = runs[0];
        assert_eq!(*argv, expected[i], "the docker run of stage {stage}");
        // Its output was followed and its exit code read, then it was removed.
        let rm = strings(&["rm", "-f", &name]);
        assert!(
            calls[at + 1..].contains(&rm),
            "{name} is removed after it ran: {calls:#?}"
        );
        assert!(calls[at + 1..].contains(&strings(&["wait", &name])));
        assert!(calls[at + 1..].contains(&strings(&["logs", "-f", &name])));
        // What the container got: its arguments, and exactly its -e variables and PATH.
        let image_at = argv
            .iter()
            .position(|a| a == images[i])
            .expect("the image in the argv");
        let args: Vec<String> = argv[image_at + 1..].to_vec();
        let seen_args = world.seen("argv", &id, stage, 1).expect("the stage ran");
        let seen_args: Vec<String> = if args.is_empty() {
            assert_eq!(seen_args, "\n", "{stage} got no arguments");
            Vec::new()
        } else {
            seen_args.lines().map(String::from).collect()
        };
        assert_eq!(seen_args, args, "the arguments {stage} got");
        let env: Vec<String> = world
            .seen("env", &id, stage, 1)
            .expect("the stage ran")
            .lines()
            .map(String::from)
            .collect();
        let mut want: Vec<String> = strings(expected_env[i]);
        want.sort();
        assert_eq!(env, want, "the environment of {stage}'s container");
    }
    // The token reached the uploader alone, by value, through the CLI's environment.
    assert_eq!(
        world.seen("token", &id, "upload", 1).map(|t| rot13(&t)),
        Some(world.secret.clone())
    );
    assert_eq!(world.seen("token", &id, "download", 1), None);
    assert_eq!(world.seen("token", &id, "train", 1), None);
    assert!(
        world.own_containers().is_empty(),
        "no container is left: {:?}",
        world.containers()
    );

    // Each stage's output is in the job log under its header.
    let mut log = vec!["==> attempt 1 started".to_string()];
    for (i, stage) in STAGES.iter().enumerate() {
        log.extend(stage_lines(stage, i + 1, &id, 1));
    }
    assert_eq!(normalise(&world.log(&id)), log);

    // The token's value is in no command line, no file (job files, logs, the fake's state,
    // the config) and not in the daemon's log.
    let secret = world.secret.as_bytes();
    assert_eq!(
        files_containing(world.path(), secret),
        Vec::<PathBuf>::new(),
        "files holding the secret"
    );
    assert!(
        !daemon.stderr().contains(&world.secret),
        "the daemon's log holds the secret"
    );
    assert!(
        !calls.iter().flatten().any(|a| a.contains(&world.secret)),
        "a docker command line holds the secret"
    );
}

/// The job's variables every container gets, as `-e` arguments.
#[allow(clippy::too_many_arguments)]
fn job_vars(
    id: &str,
    owner: &str,
    job_type: &str,
    model: &str,
    text: [&str; 3],
    image: [&str; 2],
    repo: &str,
    stage: &str,
) -> Vec<String> {
    env_args(&[
        ("JOB_ID", id.to_string()),
        ("JOB_TYPE", job_type.to_string()),
        ("JOB_FILE", format!("{owner}/run/{id}.json")),
        ("MODEL", model.to_string()),
        ("DATASET", text[0].to_string()),
        ("DATASET_TYPE", text[1].to_string()),
        ("FILE_FORMAT", text[2].to_string()),
        ("DATASET_ZIP", image[0].to_string()),
        ("MODEL_TYPE", image[1].to_string()),
        ("EXPECTED_REPO_NAME", repo.to_string()),
        ("ATTEMPT", "1".to_string()),
        // A G.O.D trainer task's, empty for a job of the main API.
        ("TASK_ID", String::new()),
        ("HOTKEY", String::new()),
        ("GITHUB_REPO", String::new()),
        ("GITHUB_COMMIT_HASH", String::new()),
        ("GITHUB_BRANCH", String::new()),
        ("STAGE", stage.to_string()),
    ])
}

/// The variables of [`job_vars`] plus PATH: what every container's environment holds.
const JOB_ENV: [&str; 18] = [
    "PATH",
    "JOB_ID",
    "JOB_TYPE",
    "JOB_FILE",
    "MODEL",
    "DATASET",
    "DATASET_TYPE",
    "FILE_FORMAT",
    "DATASET_ZIP",
    "MODEL_TYPE",
    "EXPECTED_REPO_NAME",
    "ATTEMPT",
    "TASK_ID",
    "HOTKEY",
    "GITHUB_REPO",
    "GITHUB_COMMIT_HASH",
    "GITHUB_BRANCH",
    "STAGE",
];

/// [`JOB_ENV`] and `extra`: the environment of a container that gets more than the job.
fn job_env_and(extra: &[&'static str]) -> Vec<&'static str> {
    JOB_ENV.iter().chain(extra).copied().collect()
}

/// The god examples' mounts: the shared checkpoint cache and the job's outputs.
fn god_mounts(id: &str, owner: &str) -> (String, String) {
    (
        format!("{owner}/god/checkpoints:/cache:rw"),
        format!("{owner}/god/outputs/{id}:/app/checkpoints/:rw"),
    )
}

/// The start of a god example's `docker run` of download (the cache) or upload (one GPU
/// and the job's outputs), up to the job's variables.
fn god_head(id: &str, stage: &str, owner: &str) -> Vec<String> {
    let (cache, outputs) = god_mounts(id, owner);
    let options = match stage {
        "download" => strings(&["-v", &cache]),
        "upload" => strings(&["--gpus", "\"device=0\"", "-v", &outputs]),
        _ => panic!("god_head is for download and upload, not {stage}"),
    };
    concat(&[&run_head(id, stage, owner), &options])
}

/// The start of a god example's `docker run` of train, up to the job's variables: one GPU,
/// `memory`, up to 8 of the host's CPUs, no network, and both mounts.
fn god_train_head(id: &str, owner: &str, memory: &str) -> Vec<String> {
    let (cache, outputs) = god_mounts(id, owner);
    let cpus = format!("{}", 8f64.min(host_cpus()));
    let options = strings(&[
        "--gpus",
        "\"device=0\"",
        "--memory",
        memory,
        "--cpus",
        &cpus,
        "--network",
        "none",
        "-v",
        &cache,
        "-v",
        &outputs,
    ]);
    concat(&[&run_head(id, "train", owner), &options])
}

/// What a god example's train container gets between its job variables and its image.
const GOD_TRAIN_HARDENING: [&str; 2] = ["--security-opt=no-new-privileges", "--cap-drop=ALL"];

fn concat(parts: &[&[String]]) -> Vec<String> {
    parts.iter().flat_map(|p| p.iter().cloned()).collect()
}

/// What differs between the god examples' three containers: the downloader's and the
/// trainer's commands, the trainer's memory, and the uploader's secrets (passed by name)
/// and settings.
struct GodRuns<'a> {
    download: &'a [&'a str],
    memory: &'a str,
    train: &'a [&'a str],
    secrets: &'a [&'a str],
    upload_env: &'a [(&'a str, String)],
}

impl GodRuns<'_> {
    /// The three `docker run` lines, each with the job's variables for its stage (`vars`).
    fn lines(&self, id: &str, owner: &str, vars: impl Fn(&str) -> Vec<String>) -> [Vec<String>; 3] {
        let secrets: Vec<&str> = self.secrets.iter().flat_map(|name| ["-e", name]).collect();
        [
            concat(&[
                &god_head(id, "download", owner),
                &vars("download"),
                &strings(self.download),
            ]),
            concat(&[
                &god_train_head(id, owner, self.memory),
                &vars("train"),
                &strings(&GOD_TRAIN_HARDENING),
                &strings(self.train),
            ]),
            concat(&[
                &god_head(id, "upload", owner),
                &vars("upload"),
                &strings(&secrets),
                &env_args(self.upload_env),
                &strings(&["hf-uploader"]),
            ]),
        ]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_god_text_example_runs_its_three_containers_with_the_scripts_command_lines() {
    const TEXT_MODEL: &str = "Qwen/Qwen2-0.5B";
    const DATASET: &str = "https://example.com/train_data.json";
    const DATASET_TYPE: &str = r#"{"field_instruction":"instruct","field_output":"output"}"#;
    const REPO: &str = "qwen2-instruct-test";
    let body = json!({
        "type": "TextJob",
        "model": TEXT_MODEL,
        "dataset": DATASET,
        "dataset_type": {"field_instruction": "instruct", "field_output": "output"},
        "file_format": "s3",
        "expected_repo_name": REPO,
        "hours_to_complete": 6,
    });
    let expected = |id: &str, owner: &str| {
        let vars = |stage: &str| {
            job_vars(
                id,
                owner,
                "TextJob",
                TEXT_MODEL,
                [DATASET, DATASET_TYPE, "s3"],
                ["", ""],
                REPO,
                stage,
            )
        };
        GodRuns {
            download: &[
                "trainer-downloader",
                "--task-id",
                id,
                "--model",
                TEXT_MODEL,
                "--dataset",
                DATASET,
                "--file-format",
                "s3",
                "--task-type",
                "InstructTextTask",
            ],
            memory: "64g",
            train: &[
                "standalone-text-trainer",
                "--task-id",
                id,
                "--model",
                TEXT_MODEL,
                "--dataset",
                DATASET,
                "--dataset-type",
                DATASET_TYPE,
                "--task-type",
                "InstructTextTask",
                "--file-format",
                "s3",
                "--hours-to-complete",
                "6",
                "--expected-repo-name",
                REPO,
            ],
            secrets: &["HUGGINGFACE_TOKEN", "HUGGINGFACE_USERNAME", "WANDB_TOKEN"],
            upload_env: &[
                ("EXPECTED_REPO_NAME", REPO.to_string()),
                ("LOCAL_FOLDER", format!("/app/checkpoints/{id}/{REPO}")),
                ("TASK_ID", id.to_string()),
            ],
        }
        .lines(id, owner, vars)
    };
    let upload_env = job_env_and(&[
        "HUGGINGFACE_TOKEN",
        "HUGGINGFACE_USERNAME",
        "WANDB_TOKEN",
        // TASK_ID is every container's; the example's upload sets it to the job id.
        "LOCAL_FOLDER",
    ]);
    example_pipeline(
        "god-text.toml",
        [
            "trainer-downloader",
            "standalone-text-trainer",
            "hf-uploader",
        ],
        body,
        expected,
        [&JOB_ENV, &JOB_ENV, &upload_env],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_god_image_example_runs_its_three_containers_with_the_scripts_command_lines() {
    const IMAGE_MODEL: &str = "stabilityai/stable-diffusion-xl-base-1.0";
    const ZIP: &str = "https://example.com/images.zip";
    const REPO: &str = "sdxl-test";
    let body = json!({
        "type": "DiffusionJob",
        "model": IMAGE_MODEL,
        "dataset_zip": ZIP,
        "model_type": "sdxl",
        "expected_repo_name": REPO,
        "hours_to_complete": 1,
    });
    let expected = |id: &str, owner: &str| {
        let vars = |stage: &str| {
            job_vars(
                id,
                owner,
                "DiffusionJob",
                IMAGE_MODEL,
                ["", "", ""],
                [ZIP, "sdxl"],
                REPO,
                stage,
            )
        };
        GodRuns {
            download: &[
                "trainer-downloader",
                "--task-id",
                id,
                "--model",
                IMAGE_MODEL,
                "--dataset",
                ZIP,
                "--task-type",
                "ImageTask",
            ],
            memory: "32g",
            train: &[
                "standalone-image-trainer",
                "--task-id",
                id,
                "--model",
                IMAGE_MODEL,
                "--dataset-zip",
                ZIP,
                "--model-type",
                "sdxl",
                "--expected-repo-name",
                REPO,
                "--hours-to-complete",
                "1",
            ],
            secrets: &["HUGGINGFACE_TOKEN", "HUGGINGFACE_USERNAME"],
            upload_env: &[
                ("EXPECTED_REPO_NAME", REPO.to_string()),
                ("HF_REPO_SUBFOLDER", "checkpoints".to_string()),
                ("LOCAL_FOLDER", format!("/app/checkpoints/{id}/{REPO}")),
                ("TASK_ID", id.to_string()),
            ],
        }
        .lines(id, owner, vars)
    };
    let upload_env = job_env_and(&[
        "HUGGINGFACE_TOKEN",
        "HUGGINGFACE_USERNAME",
        "HF_REPO_SUBFOLDER",
        // TASK_ID is every container's; the example's upload sets it to the job id.
        "LOCAL_FOLDER",
    ]);
    example_pipeline(
        "god-image.toml",
        [
            "trainer-downloader",
            "standalone-image-trainer",
            "hf-uploader",
        ],
        body,
        expected,
        [&JOB_ENV, &JOB_ENV, &upload_env],
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. Cancel, 3. timeout
// ---------------------------------------------------------------------------------------

/// A job with no holds, submitted now, runs all its stages to Completed: with
/// `max_concurrent = 1`, whatever would still run for an earlier job has run before it.
async fn sentinel_completes(daemon: &Daemon, n: u128) {
    let sentinel = id(n);
    submit(daemon, job(&sentinel, 1)).await;
    daemon.wait_status(&sentinel, "Completed", secs(30)).await;
}

/// Submits job 1 with train held, cancels it once train runs; returns (job, train's note,
/// when the cancel was answered).
async fn cancel_during_train(world: &World, daemon: &Daemon) -> (String, Note, Instant) {
    let a = id(1);
    world.hold(&a, "train");
    submit(daemon, job(&a, 1)).await;
    let train = world.started(&a, "train", 1).await;
    assert_eq!(
        world.own_containers().get(&container(&a, "train")),
        Some(&"running".to_string())
    );
    let cancelled = cancel(daemon, &a).await;
    let at = Instant::now();
    assert_eq!(cancelled["status"], "Cancelled", "{cancelled}");
    (a, train, at)
}

/// What a cancelled train leaves: stopped with `docker stop -t 2` (the kill_grace), then
/// removed; Cancelled with download recorded; upload never started, even once the job
/// would have had time to go on.
async fn assert_cancelled_during_train(world: &World, daemon: &Daemon, a: &str) {
    let name = container(a, "train");
    let calls = world.calls();
    let stop = calls
        .iter()
        .position(|c| *c == strings(&["stop", "-t", "2", &name]))
        .unwrap_or_else(|| panic!("docker stop -t 2 {name} was called: {calls:#?}"));
    assert!(
        calls[stop + 1..].contains(&strings(&["rm", "-f", &name])),
        "{name} is removed after the stop: {calls:#?}"
    );
    wait_until("the log says train was stopped", secs(10), async || {
        normalise(&world.log(a))
            .contains(&"==> stage train ended: stopped on request".to_string())
            .then_some(())
    })
    .await;
    let file = world.sandbox.job_file(a);
    assert_eq!(file["status"], "Cancelled", "{file}");
    assert_eq!(stages_done(&file), ["download"], "{file}");
    assert_eq!(daemon.job(a).await["status"], "Cancelled");

    // Were the job to go on, upload would start now; the next job runs through instead.
    world.release(a, "train");
    sentinel_completes(daemon, 2).await;
    assert_eq!(
        world.runs_of(&container(a, "upload")),
        Vec::<Vec<String>>::new()
    );
    assert!(
        !world.runs(a).iter().any(|(_, stage, _)| stage == "upload"),
        "{:?}",
        world.runs(a)
    );
    assert!(
        world.own_containers().is_empty(),
        "{:?}",
        world.containers()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_the_running_container_and_later_stages_never_start() {
    let world = World::new();
    Pipeline::default().install(&world);
    let daemon = world.start().await;
    let (a, train, _) = cancel_during_train(&world, &daemon).await;
    world.container_gone(&container(&a, "train")).await;
    assert!(!pid_alive(train.pid), "train's process is gone");
    // It got SIGTERM (docker stop) and stopped by itself.
    assert_eq!(
        world.runs(&a),
        [
            ("start".into(), "download".into(), 1),
            ("end".into(), "download".into(), 1),
            ("start".into(), "train".into(), 1),
            ("term".into(), "train".into(), 1),
        ]
    );
    assert_eq!(
        world.removed_exit_code(&container(&a, "train")),
        Some(143),
        "it ended on its SIGTERM"
    );
    assert_cancelled_during_train(&world, &daemon, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_escalates_to_sigkill_when_the_container_ignores_sigterm() {
    let world = World::new();
    Pipeline::default().install(&world);
    world.sandbox.set_env("DOCKER_FAKE_IGNORE_TERM", "1");
    let daemon = world.start().await;
    let (a, train, cancelled_at) = cancel_during_train(&world, &daemon).await;
    world.container_gone(&container(&a, "train")).await;
    let took = cancelled_at.elapsed();
    assert!(!pid_alive(train.pid), "train's process is gone");
    // SIGTERM did nothing; SIGKILL came after the 2 s grace, and not much later.
    assert!(
        took >= Duration::from_millis(1500) && took < secs(8),
        "the container was gone {took:?} after the cancel"
    );
    assert_eq!(world.removed_exit_code(&container(&a, "train")), Some(137));
    assert!(
        !world.runs(&a).iter().any(|(kind, _, _)| kind == "term"),
        "SIGTERM was ignored: {:?}",
        world.runs(&a)
    );
    assert_cancelled_during_train(&world, &daemon, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_past_its_stage_timeout_is_stopped_and_fails_the_job() {
    let world = World::new();
    Pipeline {
        train_timeout: Some("2s"),
        ..Pipeline::default()
    }
    .install(&world);
    let daemon = world.start().await;
    let a = id(1);
    world.hold(&a, "train");
    submit(&daemon, job(&a, 1)).await;
    let train = world.started(&a, "train", 1).await;
    let failed = daemon.wait_status(&a, "Failed", secs(20)).await;
    assert_eq!(
        failed["error_message"],
        "stage train: timed out after 2s; last output: train got SIGTERM; stopping",
        "{failed}"
    );
    assert_eq!(stages_done(&failed), ["download"], "{failed}");
    let name = container(&a, "train");
    let calls = world.calls();
    let stop = calls
        .iter()
        .position(|c| *c == strings(&["stop", "-t", "2", &name]))
        .unwrap_or_else(|| panic!("docker stop -t 2 {name} was called: {calls:#?}"));
    assert!(calls[stop + 1..].contains(&strings(&["rm", "-f", &name])));
    world.container_gone(&name).await;
    assert!(!pid_alive(train.pid));
    assert!(
        normalise(&world.log(&a)).contains(&"==> stage train ended: timed out after 2s".into())
    );
    sentinel_completes(&daemon, 2).await;
    assert_eq!(
        world.runs_of(&container(&a, "upload")),
        Vec::<Vec<String>>::new()
    );
    assert!(
        world.own_containers().is_empty(),
        "{:?}",
        world.containers()
    );
}

// ---------------------------------------------------------------------------------------
// 4. Adoption, 5. no adoption and cleanup at boot
// ---------------------------------------------------------------------------------------

/// The tick numbers in a log, in order.
fn ticks(log: &str, stage: &str) -> Vec<u32> {
    let prefix = format!("{stage}: tick ");
    log.lines()
        .filter_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_daemons_running_container_is_adopted_on_its_gpus_without_a_second_start() {
    let world = World::new();
    Pipeline {
        gpus: "0, 1",
        max_concurrent: 3,
        adopt_running: true,
        ..Pipeline::default()
    }
    .install(&world);
    let daemon = world.start().await;
    let a = id(1);
    let train = container(&a, "train");
    world.hold(&a, "train");
    world.tick(&a, "train");
    submit(&daemon, job(&a, 1)).await;
    world.started(&a, "train", 1).await;
    let before = daemon.job(&a).await;
    assert_eq!(gpu_ids(&before), BTreeSet::from([0]), "{before}");
    assert_eq!(before["attempts"], 1, "{before}");
    wait_until("train's output reaches the job log", secs(10), async || {
        (!ticks(&world.log(&a), "train").is_empty()).then_some(())
    })
    .await;

    // The crash: the container lives on, and goes on printing while no daemon follows it.
    daemon.kill();
    let logged = ticks(&world.log(&a), "train").last().copied().unwrap_or(0);
    assert_eq!(
        world.own_containers().get(&train),
        Some(&"running".to_string())
    );
    wait_until(
        "train prints while no daemon follows it",
        secs(10),
        async || {
            let printed = ticks(&world.docker_ok(&["logs", &train]), "train");
            (printed.last().copied().unwrap_or(0) >= logged + 2).then_some(())
        },
    )
    .await;

    let daemon = world.start().await;
    let stderr = daemon.stderr();
    assert!(
        log_line(&stderr, "container still runs; adopted", &train).is_some(),
        "the daemon logs the adoption: {stderr}"
    );
    assert!(
        stderr.contains("its container still runs and is adopted"),
        "{stderr}"
    );
    let adopted = daemon.job(&a).await;
    assert_eq!(adopted["status"], "Running", "{adopted}");
    assert_eq!(gpu_ids(&adopted), BTreeSet::from([0]), "{adopted}");
    assert_eq!(adopted["attempts"], 1, "no new attempt: {adopted}");
    assert_eq!(stages_done(&adopted), ["download"], "{adopted}");
    assert_eq!(world.sandbox.job_file(&a)["attempts"], 1);

    // GPU 0 is the adopted job's: the next job gets GPU 1, and one more has to wait.
    let (b, c) = (id(2), id(3));
    world.hold(&b, "train");
    submit(&daemon, job(&b, 1)).await;
    submit(&daemon, job(&c, 1)).await;
    world.started(&b, "train", 1).await;
    assert_eq!(gpu_ids(&daemon.job(&b).await), BTreeSet::from([1]));
    for stage in ["download", "train"] {
        let runs = world.runs_of(&container(&b, stage));
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert_eq!(devices(&runs[0]), BTreeSet::from([1]), "{runs:?}");
    }
    let waiting = daemon.job(&c).await;
    assert_eq!(waiting["status"], "Queued", "no GPU is free: {waiting}");
    assert!(world.runs(&c).is_empty());

    // The adopted train goes on to its end, then upload, once; C gets GPU 0 after that.
    world.release(&a, "train");
    let done = daemon.wait_status(&a, "Completed", secs(20)).await;
    assert_eq!(done["attempts"], 1, "{done}");
    world.release(&b, "train");
    daemon.wait_status(&b, "Completed", secs(20)).await;
    let c_done = daemon.wait_status(&c, "Completed", secs(20)).await;
    assert_eq!(c_done["gpu_ids"].as_array().map(Vec::len), Some(1));

    for stage in STAGES {
        let runs = world.runs_of(&container(&a, stage));
        assert_eq!(runs.len(), 1, "one docker run of {stage} of A: {runs:#?}");
        assert_eq!(devices(&runs[0]), BTreeSet::from([0]), "{runs:?}");
    }
    assert_eq!(
        world.runs(&a),
        STAGES
            .iter()
            .flat_map(|s| [
                ("start".into(), s.to_string(), 1),
                ("end".into(), s.to_string(), 1)
            ])
            .collect::<Vec<_>>()
    );
    // Nobody ever shared a GPU with the adopted container, or with anyone else.
    let runs = container_runs(&world);
    assert!(runs.iter().all(|r| r.end.is_some()), "{runs:#?}");
    assert!(
        assert_no_gpu_overlap(&runs) > 0,
        "B ran beside A: {runs:#?}"
    );
    for run in &runs {
        let expected = gpu_ids(&world.sandbox.job_file(&run.job));
        assert_eq!(run.devices, expected, "{run:?}");
    }

    // The log goes on where it stopped: every tick, in order, the ones printed while no
    // daemon followed included, then train's end and upload.
    let log = world.log(&a);
    let seen = ticks(&log, "train");
    let max = *seen.last().expect("ticks");
    let distinct: BTreeSet<u32> = seen.iter().copied().collect();
    assert_eq!(
        distinct,
        (1..=max).collect(),
        "no tick is missing: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]) && seen.len() <= distinct.len() + 1,
        "ticks in order, at most the one at the restart twice: {seen:?}"
    );
    let lines = normalise(&log);
    let header = format!(
        "==> attempt 1 followed again: the daemon restarted while container {train} (stage train) ran"
    );
    let resumed = lines
        .iter()
        .position(|l| *l == header)
        .unwrap_or_else(|| panic!("no {header:?} in {lines:#?}"));
    let after_restart = ticks(&lines[resumed..].join("\n"), "train");
    assert!(
        after_restart.first().is_some_and(|t| *t <= logged + 2),
        "the ticks printed while no daemon followed are in the log after {header:?}: {lines:#?}"
    );
    let mut tail = vec![
        "train: done".to_string(),
        "==> stage train ended: exit status 0".into(),
    ];
    tail.extend(stage_lines("upload", 3, &a, 1));
    assert_eq!(lines[lines.len() - tail.len()..], tail, "{lines:#?}");
    assert!(
        world.own_containers().is_empty(),
        "{:?}",
        world.containers()
    );
}

/// Microseconds since the epoch, the recorder's clock.
fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_micros()
}

/// A stage's `timeout` bounds how long its container runs, a daemon crash or not: the
/// adopted container has already run part of it. (The daemon gives an adopted container the
/// whole timeout again, counted from the adoption.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_container_keeps_the_stage_timeout_counted_from_its_own_start() {
    let world = World::new();
    Pipeline {
        adopt_running: true,
        train_timeout: Some("6s"),
        ..Pipeline::default()
    }
    .install(&world);
    let daemon = world.start().await;
    let a = id(1);
    let name = container(&a, "train");
    world.hold(&a, "train");
    submit(&daemon, job(&a, 1)).await;
    let train = world.started(&a, "train", 1).await;
    wait_until("train has run 4 of its 6 s", secs(10), async || {
        (now_us() >= train.at + 4_000_000).then_some(())
    })
    .await;
    daemon.kill();
    let daemon = world.start().await;
    assert!(
        log_line(&daemon.stderr(), "container still runs; adopted", &name).is_some(),
        "{}",
        daemon.stderr()
    );
    let failed = daemon.wait_status(&a, "Failed", secs(20)).await;
    let message = failed["error_message"].as_str().expect("an error message");
    assert!(
        message.starts_with("stage train: timed out after 6s"),
        "{message}"
    );
    let stopped = world
        .notes()
        .into_iter()
        .find(|n| n.kind == "term" && n.job == a && n.stage == "train")
        .expect("train got SIGTERM");
    let ran = Duration::from_micros((stopped.at - train.at) as u64);
    assert!(
        ran < Duration::from_millis(7500),
        "train has timeout = \"6s\", yet its container was stopped {ran:?} after it started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_adoption_boot_removes_old_containers_and_the_stage_runs_again() {
    let world = World::new();
    Pipeline::default().install(&world);
    world.image_script("idle", "#!/bin/sh\nexec sleep 600\n");
    let daemon = world.start().await;
    let done = id(9);
    submit(&daemon, job(&done, 1)).await;
    daemon.wait_status(&done, "Completed", secs(30)).await;
    let a = id(1);
    let train = container(&a, "train");
    world.hold(&a, "train");
    submit(&daemon, job(&a, 1)).await;
    let first = world.started(&a, "train", 1).await;
    daemon.kill();
    assert_eq!(
        world.own_containers().get(&train),
        Some(&"running".to_string())
    );

    // Containers the new daemon must deal with: one of an unknown job, one of a Completed
    // job, and one of another data dir, which is not its business.
    let owner = world.owner();
    let stray = "tw-stray-train";
    let finished = container(&done, "upload");
    let foreign = format!("{train}-elsewhere");
    let unknown_job = uuid::Uuid::new_v4().to_string();
    for (name, owner, job, stage) in [
        (stray, owner.as_str(), unknown_job.as_str(), "train"),
        (&finished, &owner, &done, "upload"),
        (&foreign, "/elsewhere/data", &a, "train"),
    ] {
        world.docker_ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--label",
            &format!("training-worker.owner={owner}"),
            "--label",
            &format!("training-worker.job={job}"),
            "--label",
            &format!("training-worker.stage={stage}"),
            "idle",
        ]);
    }
    let calls_before = world.calls().len();

    let daemon = world.start().await;
    let stderr = daemon.stderr();
    for (name, reason) in [
        (train.as_str(), "adopt_running is off; the stage runs again"),
        (stray, "its job is unknown here"),
        (finished.as_str(), "its job has finished (Completed)"),
    ] {
        let line = log_line(&stderr, "removing container", name)
            .unwrap_or_else(|| panic!("the daemon logs the removal of {name}: {stderr}"));
        assert!(line.contains(reason), "{line}");
    }
    assert!(
        log_line(&stderr, "removing container", &foreign).is_none(),
        "{stderr}"
    );
    let containers = world.containers();
    assert!(!containers.contains_key(stray), "{containers:?}");
    assert!(!containers.contains_key(&finished), "{containers:?}");
    assert_eq!(
        containers.get(&foreign),
        Some(&("running".to_string(), "/elsewhere/data".to_string())),
        "another data dir's container is left alone"
    );
    assert!(!pid_alive(first.pid), "the old train container was removed");

    // Train runs again as a new attempt; download is not run again.
    world.started(&a, "train", 2).await;
    let calls = world.calls();
    let removed = calls[calls_before..]
        .iter()
        .position(|c| *c == strings(&["rm", "-f", &train]))
        .expect("the old train container is removed");
    let second_run = calls[calls_before..]
        .iter()
        .position(|c| c[0] == "run" && option(c, "--name") == Some(train.as_str()))
        .expect("train runs again");
    assert!(removed < second_run, "{calls:#?}");
    let job_now = daemon.job(&a).await;
    assert_eq!(job_now["attempts"], 2, "{job_now}");
    assert_eq!(stages_done(&job_now), ["download"], "{job_now}");
    world.release(&a, "train");
    let finished_job = daemon.wait_status(&a, "Completed", secs(20)).await;
    assert_eq!(finished_job["attempts"], 2, "{finished_job}");
    let runs: Vec<u32> = world
        .runs_of(&train)
        .iter()
        .map(|r| attempt_of(r))
        .collect();
    assert_eq!(runs, [1, 2], "train ran twice");
    assert_eq!(world.runs_of(&container(&a, "download")).len(), 1);
    assert_eq!(world.runs_of(&container(&a, "upload")).len(), 1);
    assert_eq!(
        world.runs(&a),
        [
            ("start".into(), "download".into(), 1),
            ("end".into(), "download".into(), 1),
            ("start".into(), "train".into(), 1),
            ("start".into(), "train".into(), 2),
            ("end".into(), "train".into(), 2),
            ("start".into(), "upload".into(), 2),
            ("end".into(), "upload".into(), 2),
        ]
    );
    let own: Vec<String> = world.own_containers().into_keys().collect();
    assert_eq!(own, Vec::<String>::new());
    assert!(world.containers().contains_key(&foreign));
}

// ---------------------------------------------------------------------------------------
// 6. docker run failures
// ---------------------------------------------------------------------------------------

/// A job whose download cannot be started fails at once, naming the stage and docker run,
/// and leaves no container; `says` must be in its error message.
async fn run_failure(world: &World, daemon: &Daemon, says: &str) {
    let a = id(1);
    submit(daemon, job(&a, 1)).await;
    let failed = daemon.wait_status(&a, "Failed", secs(20)).await;
    let message = failed["error_message"].as_str().expect("an error message");
    assert!(
        message.starts_with("stage download: could not start the trainer: docker run: "),
        "{message}"
    );
    assert!(message.contains(says), "{message:?} should say {says:?}");
    assert!(
        normalise(&world.log(&a))
            .iter()
            .any(|l| l.starts_with("==> docker run failed: ")),
        "{}",
        world.log(&a)
    );
    assert!(
        world.own_containers().is_empty(),
        "{:?}",
        world.containers()
    );
    let runs = world.calls().into_iter().filter(|c| c[0] == "run").count();
    assert_eq!(runs, 1, "only download was tried: {:#?}", world.calls());
    assert!(world.runs(&a).is_empty());
    assert_eq!(failed["attempts"], 1, "{failed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_docker_run_fails_the_job_and_leaves_no_container() {
    let world = World::new();
    Pipeline::default().install(&world);
    world.sandbox.set_env("DOCKER_FAKE_FAIL_RUN", "1");
    let daemon = world.start().await;
    run_failure(&world, &daemon, "OCI runtime create failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_image_fails_the_job_saying_why() {
    let world = World::new();
    Pipeline {
        download_image: "no-such-image",
        ..Pipeline::default()
    }
    .install(&world);
    let daemon = world.start().await;
    // What docker says: "Unable to find image 'no-such-image:latest' locally", then
    // "docker: Error response from daemon: pull access denied for no-such-image, ...",
    // then "See 'docker run --help'.".
    run_failure(&world, &daemon, "pull access denied for no-such-image").await;
}

// ---------------------------------------------------------------------------------------
// 7. GPUs under concurrency
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_containers_never_share_a_gpu() {
    let world = World::new();
    Pipeline {
        gpus: "0, 1, 2",
        max_concurrent: 3,
        stages: &["train", "upload"],
        ..Pipeline::default()
    }
    .install(&world);
    let daemon = world.start().await;
    let counts = [1, 2, 1, 1, 2, 1, 2, 1, 1];
    let mut jobs = Vec::new();
    for (n, count) in counts.iter().enumerate() {
        let job_id = id(n as u128 + 1);
        let mut body = job(&job_id, *count);
        body["model"] = json!("sleep:0.3");
        submit(&daemon, body).await;
        jobs.push((job_id, *count));
    }
    for (job_id, _) in &jobs {
        daemon.wait_status(job_id, "Completed", secs(60)).await;
    }
    let runs = container_runs(&world);
    assert_eq!(runs.len(), jobs.len() * 2, "{runs:#?}");
    assert!(runs.iter().all(|r| r.end.is_some()), "{runs:#?}");
    let concurrent = assert_no_gpu_overlap(&runs);
    assert!(concurrent > 0, "some containers ran at once: {runs:#?}");
    for (job_id, count) in &jobs {
        let file = world.sandbox.job_file(job_id);
        let held = gpu_ids(&file);
        assert_eq!(held.len(), *count as usize, "{file}");
        for run in runs.iter().filter(|r| r.job == *job_id) {
            assert_eq!(run.devices, held, "{run:?} got the job's GPUs");
            assert_eq!(run.attempt, 1, "{run:?} is the job's only start");
            assert!(["train", "upload"].contains(&run.stage.as_str()), "{run:?}");
        }
    }
    assert!(
        world.own_containers().is_empty(),
        "{:?}",
        world.containers()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_docker_does_not_answer_at_boot_a_running_containers_gpus_stay_held_until_it_does() {
    let world = World::new();
    Pipeline {
        gpus: "0",
        max_concurrent: 2,
        adopt_running: true,
        ..Pipeline::default()
    }
    .install(&world);
    let daemon = world.start().await;
    let (a, b) = (id(1), id(2));
    world.hold(&a, "train");
    submit(&daemon, job(&a, 1)).await;
    world.started(&a, "train", 1).await;
    daemon.kill();

    // The engine restarts while the daemon does: the container runs on, unseen.
    let down = world.state().join("engine-down");
    fs::write(&down, b"").expect("take the engine down");
    let daemon = world.start().await;
    let held = daemon.job(&a).await;
    assert_eq!(held["status"], "Running", "{held}");
    assert_eq!(gpu_ids(&held), BTreeSet::from([0]), "{held}");
    // The one GPU is not given to another job while the container may still hold it.
    submit(&daemon, job(&b, 1)).await;
    let waiting = wait_until("the queue says why b waits", secs(10), async || {
        let queue = daemon.get("/v1/queue").await.json();
        queue["waiting"][b.as_str()].as_str().map(String::from)
    })
    .await;
    assert_eq!(waiting, "needs 1 GPUs and 0 are free");
    assert_eq!(daemon.job(&b).await["status"], "Queued");
    assert_eq!(daemon.get("/readyz").await.status, reqwest::StatusCode::OK);

    fs::remove_file(&down).expect("bring the engine back");
    wait_until(
        "the container is adopted once docker answers",
        secs(30),
        async || {
            daemon
                .stderr()
                .contains("the job's container still runs and is adopted")
                .then_some(())
        },
    )
    .await;
    let adopted = daemon.job(&a).await;
    assert_eq!(adopted["attempts"], 1, "not started again: {adopted}");
    assert_eq!(daemon.job(&b).await["status"], "Queued");
    world.release(&a, "train");
    daemon.wait_status(&a, "Completed", secs(30)).await;
    daemon.wait_status(&b, "Completed", secs(30)).await;
    let runs = container_runs(&world);
    assert_no_gpu_overlap(&runs);
    let trains: Vec<&ContainerRun> = runs.iter().filter(|r| r.stage == "train").collect();
    assert_eq!(trains.len(), 2, "one train of each job: {trains:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_does_not_answer_leaves_the_job_queued_until_it_does() {
    let world = World::new();
    Pipeline::default().install(&world);
    let daemon = world.start().await;
    let down = world.state().join("engine-down");
    fs::write(&down, b"").expect("take the engine down");
    let a = id(1);
    submit(&daemon, job(&a, 1)).await;
    wait_until("a failed try to start", secs(20), async || {
        let queue = daemon.get("/v1/queue").await.json();
        let paused = queue["paused"].as_str().unwrap_or_default().to_string();
        paused
            .contains("Cannot connect to the Docker daemon")
            .then_some(())
    })
    .await;
    let queued = daemon.job(&a).await;
    assert_eq!(
        queued["status"], "Queued",
        "the engine's trouble is not the job's: {queued}"
    );
    assert_eq!(queued["attempts"], 0, "{queued}");
    fs::remove_file(&down).expect("bring the engine back");
    let done = daemon.wait_status(&a, "Completed", secs(60)).await;
    assert_eq!(done["attempts"], 1, "{done}");
}
