//! Helpers for the end-to-end tests: a sandbox (temp dir with a config, a data dir and the
//! stub trainer's records), the real daemon binary run inside it, and bounded waiting.
//!
//! Every wait is for a condition, polled, with a deadline that fails the test with a message
//! saying what did not happen. A panicking test prints every daemon's stderr and the trainer
//! records, and no process outlives its test: daemons are SIGKILLed when dropped, then
//! anything that still carries the sandbox's trainer mark is killed too.

pub mod pg;

use std::fmt::Display;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

/// The stub trainer every sandbox's config runs.
pub const STUB_TRAINER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/trainers/stub.sh");
/// The seed's example job file, byte for byte.
pub const SEED_JOB: &str = include_str!("../fixtures/seed-job.json");
/// The job id inside [`SEED_JOB`].
pub const SEED_ID: &str = "123e4567-e89b-12d3-a456-426614174000";

/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(25);
/// How long a daemon may take to become ready.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// The variable by which the daemon marks its trainers (and which their children inherit).
const TRAINER_MARK: &str = "TW_DATA_DIR";

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Polls `check` until it gives a value; panics with `what` once `timeout` has passed.
pub async fn wait_until<T>(
    what: impl Display,
    timeout: Duration,
    check: impl AsyncFnMut() -> Option<T>,
) -> T {
    match wait_until_or_timeout(timeout, check).await {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting until {what}"),
    }
}

/// Polls `check` until it gives a value, or `None` once `timeout` has passed.
pub async fn wait_until_or_timeout<T>(
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether `pid` is a live process. A zombie counts as gone: it runs nothing, and an
/// orphan's zombie may never be reaped in a container whose init does not reap.
pub fn pid_alive(pid: i32) -> bool {
    process_state(pid).is_some_and(|state| state != 'Z' && state != 'X')
}

fn process_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

/// A DiffusionJob whose model is a stub trainer command (see tests/trainers/stub.sh).
pub fn diffusion_job(command: &str) -> Value {
    json!({"type": "DiffusionJob", "model": command, "dataset_zip": "images.zip"})
}

/// A TextJob whose model is a stub trainer command.
pub fn text_job(command: &str) -> Value {
    json!({
        "type": "TextJob",
        "model": command,
        "dataset": "train.json",
        "dataset_type": {},
        "file_format": "json",
    })
}

/// A job log with the times taken out: `started at T` becomes `started`, `ended after D: how`
/// becomes `ended: how`, `followed again at T: why` becomes `followed again: why`.
pub fn normalise(log: &str) -> Vec<String> {
    log.lines()
        .map(|line| {
            if !line.starts_with("==> ") {
                return line.to_string();
            }
            if let Some(at) = line.find(" started at ") {
                return format!("{} started", &line[..at]);
            }
            if let Some(at) = line.find(" followed again at ") {
                let why = line[at..].split_once(": ").map_or("", |(_, why)| why);
                return format!("{} followed again: {why}", &line[..at]);
            }
            if let Some(at) = line.find(" ended after ") {
                let how = line[at..].split_once(": ").map_or("", |(_, how)| how);
                return format!("{} ended: {how}", &line[..at]);
            }
            line.to_string()
        })
        .collect()
}

/// The first lines a pipeline stage prints, normalised: its header, then what the stage
/// script and the recorder image both say first.
pub fn stage_begins(stage: &str, index: usize, job: &str, attempt: u32) -> Vec<String> {
    vec![
        format!("==> stage {stage} ({index}/3) started"),
        format!("{stage}: working on {job} (attempt {attempt})"),
    ]
}

/// What a pipeline stage that ran through prints, with its header and footer, normalised.
pub fn stage_lines(stage: &str, index: usize, job: &str, attempt: u32) -> Vec<String> {
    let mut lines = stage_begins(stage, index, job, attempt);
    lines.extend([
        format!("{stage}: done"),
        format!("==> stage {stage} ended: exit status 0"),
    ]);
    lines
}

/// The settings a test varies; the rest of the config is fixed.
#[derive(Clone, Debug)]
pub struct Settings {
    pub max_concurrent: usize,
    pub max_attempts: u32,
    pub timeout: &'static str,
    pub kill_grace: &'static str,
    pub shutdown_grace: &'static str,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            max_concurrent: 1,
            max_attempts: 3,
            timeout: "24h",
            kill_grace: "2s",
            shutdown_grace: "10s",
        }
    }
}

/// One line of the stub trainer's records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// `start`, `end`, `term` (got SIGTERM) or `child` (spawned a grandchild, whose pid this is).
    pub kind: String,
    pub job: String,
    pub attempt: u32,
    pub pid: i32,
}

/// Whether the sandboxes' daemons keep their job records in PostgreSQL
/// (`TW_TEST_STORE=postgres`, a throwaway server of the test binary's own): how CI runs the
/// shared suites against both stores.
// Each test binary takes what it needs of this module; not all of them use these.
#[allow(unused_imports)]
pub use pg::{not_for_this_store, postgres_store};

/// A temp dir holding one test's config, data dir and trainer records.
pub struct Sandbox {
    dir: tempfile::TempDir,
    /// With [`postgres_store`]: this sandbox's database, made at the first start.
    database: std::sync::OnceLock<String>,
    spawned: AtomicUsize,
    /// What the next daemons get on top of (or instead of) the test's own environment.
    env: Mutex<DaemonEnv>,
}

/// Changes to the environment the daemon inherits from the test.
#[derive(Default)]
struct DaemonEnv {
    /// Prefixes of names that are removed, like `TRAINING_WORKER_` always is.
    removed_prefixes: Vec<String>,
    /// Variables set after the removals, in the order given.
    set: Vec<(String, String)>,
    /// RLIMIT_NOFILE (soft, hard) to start under, as after a shell's `ulimit -n`.
    nofile: Option<(u64, u64)>,
}

impl Default for Sandbox {
    fn default() -> Sandbox {
        Sandbox::new()
    }
}

impl Sandbox {
    /// An empty sandbox configured with the default [`Settings`].
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("tw-e2e-")
            .tempdir()
            .expect("create a temp dir");
        let sandbox = Sandbox {
            dir,
            database: std::sync::OnceLock::new(),
            spawned: AtomicUsize::new(0),
            env: Mutex::new(DaemonEnv::default()),
        };
        fs::create_dir_all(sandbox.records_dir()).expect("create the records dir");
        sandbox.configure(&Settings::default());
        sandbox
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path().join("data")
    }

    pub fn jobs_dir(&self) -> PathBuf {
        self.data_dir().join("jobs")
    }

    pub fn config_file(&self) -> PathBuf {
        self.path().join("config.toml")
    }

    /// Where the stub trainer writes: `$TW_DATA_DIR/../trainer-records`.
    pub fn records_dir(&self) -> PathBuf {
        self.path().join("trainer-records")
    }

    /// Sets `name` to `value` in the environment of every daemon spawned from now on.
    pub fn set_env(&self, name: &str, value: impl Into<String>) {
        let mut env = self.env.lock().expect("the env lock");
        env.set.push((name.to_string(), value.into()));
    }

    /// Removes every variable whose name starts with `prefix` from the environment the
    /// daemons spawned from now on inherit; [`Sandbox::set_env`] may still set such names.
    pub fn remove_env_prefix(&self, prefix: &str) {
        let mut env = self.env.lock().expect("the env lock");
        env.removed_prefixes.push(prefix.to_string());
    }

    /// Starts the daemons spawned from now on under RLIMIT_NOFILE `soft` and `hard`.
    pub fn set_nofile_limit(&self, soft: u64, hard: u64) {
        self.env.lock().expect("the env lock").nofile = Some((soft, hard));
    }

    /// Writes the config file the next daemon reads.
    pub fn configure(&self, s: &Settings) {
        let command = serde_json::to_string(STUB_TRAINER).expect("a string serialises");
        self.write_config(&format!(
            "shutdown_grace = \"{}\"\n\n[worker]\nmax_concurrent = {}\nmax_attempts = {}\n\n\
             [executor]\ncommand = [{command}]\ntimeout = \"{}\"\nkill_grace = \"{}\"\npass_env = []\n",
            s.shutdown_grace, s.max_concurrent, s.max_attempts, s.timeout, s.kill_grace,
        ));
    }

    pub fn write_config(&self, text: &str) {
        fs::write(self.config_file(), text).expect("write the config file");
    }

    /// Writes a file under the data dir, creating its directory.
    pub fn write_data_file(&self, relative: &str, bytes: &[u8]) {
        let path = self.data_dir().join(relative);
        fs::create_dir_all(path.parent().expect("a file has a parent dir"))
            .expect("create the data dir");
        fs::write(&path, bytes).expect("write a data file");
    }

    /// Starts a daemon on a free port and waits until `/readyz` says 200. A port taken
    /// between choosing and binding (exit 69) is retried with another.
    pub async fn start(&self) -> Daemon {
        self.start_node(&self.data_dir(), &[]).await
    }

    /// Like [`Sandbox::start`], on `data_dir` with `env` on top of the sandbox's: one node
    /// of several sharing this sandbox. A data dir directly inside the sandbox shares the
    /// stub trainer's records and hold files with the others.
    pub async fn start_node(&self, data_dir: &Path, env: &[(&str, &str)]) -> Daemon {
        for _ in 0..5 {
            let mut daemon = self.spawn_node(data_dir, env);
            if daemon.wait_ready().await {
                return daemon;
            }
        }
        panic!("the daemon could not bind a free port in 5 tries");
    }

    /// Runs `training-worker serve` on a free port without waiting for anything.
    pub fn spawn(&self) -> Daemon {
        self.spawn_node(&self.data_dir(), &[])
    }

    /// Like [`Sandbox::spawn`], on `data_dir` with `env` set after the sandbox's own.
    pub fn spawn_node(&self, data_dir: &Path, node_env: &[(&str, &str)]) -> Daemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port();
        let n = self.spawned.fetch_add(1, Ordering::SeqCst) + 1;
        let name = match data_dir.file_name() {
            Some(dir) if data_dir != self.data_dir() => {
                format!("daemon-{n}-{}.stderr", dir.to_string_lossy())
            }
            _ => format!("daemon-{n}.stderr"),
        };
        let stderr_path = self.path().join(name);
        let stderr = fs::File::create(&stderr_path).expect("create the stderr file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_training-worker"));
        command
            .arg("serve")
            .arg("--config")
            .arg(self.config_file())
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .current_dir(self.path())
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // The daemon reads TRAINING_WORKER_*; the test's own environment must not steer it.
        let env = self.env.lock().expect("the env lock");
        // Plain logs, unless the test removes it to see what the daemon does by itself.
        if !env
            .removed_prefixes
            .iter()
            .any(|p| "NO_COLOR".starts_with(p.as_str()))
        {
            command.env("NO_COLOR", "1");
        }
        for (name, _) in std::env::vars_os() {
            let text = name.to_string_lossy();
            if std::iter::once("TRAINING_WORKER_")
                .chain(env.removed_prefixes.iter().map(String::as_str))
                .any(|prefix| text.starts_with(prefix))
            {
                command.env_remove(name);
            }
        }
        if postgres_store() {
            command
                .env("TRAINING_WORKER_STORE_KIND", "postgres")
                .env("TRAINING_WORKER_DATABASE_URL", self.database_url());
        }
        for (name, value) in &env.set {
            command.env(name, value);
        }
        for (name, value) in node_env {
            command.env(name, value);
        }
        if let Some((soft, hard)) = env.nofile {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: between fork and exec only setrlimit runs, which is async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        drop(env);
        let child = command.spawn().expect("run the training-worker binary");
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(secs(10))
            .build()
            .expect("build an HTTP client");
        Daemon {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client,
            stderr_path,
        }
    }

    /// Makes `job`'s trainer wait after its start until [`Sandbox::release`].
    pub fn hold(&self, job: &str) {
        fs::write(self.records_dir().join(format!("{job}.hold")), b"").expect("write a hold file");
    }

    pub fn release(&self, job: &str) {
        fs::remove_file(self.records_dir().join(format!("{job}.hold")))
            .expect("remove a hold file");
    }

    /// Everything the stub trainers recorded so far, complete lines only.
    pub fn records(&self) -> Vec<Record> {
        let text = fs::read_to_string(self.records_dir().join("events")).unwrap_or_default();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => "",
        };
        complete
            .lines()
            .map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                match fields[..] {
                    [kind, job, attempt, pid] => Record {
                        kind: kind.to_string(),
                        job: job.to_string(),
                        attempt: attempt.parse().expect("attempt is a number"),
                        pid: pid.parse().expect("pid is a number"),
                    },
                    _ => panic!("bad trainer record line {line:?}"),
                }
            })
            .collect()
    }

    /// The pid in the `kind` record of `job`'s run number `attempt`, if there is one.
    pub fn record_pid(&self, kind: &str, job: &str, attempt: u32) -> Option<i32> {
        self.records()
            .into_iter()
            .find(|r| r.kind == kind && r.job == job && r.attempt == attempt)
            .map(|r| r.pid)
    }

    /// Every trainer start so far, in order: (job id, attempt).
    pub fn starts(&self) -> Vec<(String, u32)> {
        self.records()
            .into_iter()
            .filter(|r| r.kind == "start")
            .map(|r| (r.job, r.attempt))
            .collect()
    }

    /// Waits for `job`'s run number `attempt` to start and returns the trainer's pid.
    pub async fn trainer_started(&self, job: &str, attempt: u32) -> i32 {
        wait_until(
            format_args!("the trainer of job {job} starts (attempt {attempt})"),
            secs(15),
            async || self.record_pid("start", job, attempt),
        )
        .await
    }

    /// Checks that no two trainers ever ran at once: every start follows the end of the
    /// previous run. Runs must have ended by themselves or on SIGTERM.
    pub fn assert_one_at_a_time(&self) {
        let records = self.records();
        let mut running: Option<&Record> = None;
        for r in &records {
            match r.kind.as_str() {
                "start" => {
                    if let Some(other) = running {
                        panic!("{r:?} began while {other:?} still ran; records: {records:#?}");
                    }
                    running = Some(r);
                }
                "end" | "term" => running = None,
                _ => {}
            }
        }
    }

    /// Live processes that carry the trainer mark of a data dir in this sandbox: trainers
    /// and their children.
    pub fn trainer_processes(&self) -> Vec<i32> {
        let mark = format!("{TRAINER_MARK}={}/", self.path().display()).into_bytes();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| {
                fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var.starts_with(&mark)))
            })
            .filter(|&pid| pid_alive(pid))
            .collect()
    }

    /// Waits (bounded) until no trainer of this sandbox is left.
    pub async fn assert_no_trainers_left(&self) {
        wait_until("no trainer process is left", secs(5), async || {
            self.trainer_processes().is_empty().then_some(())
        })
        .await;
    }

    /// With [`postgres_store`]: the URL of this sandbox's database.
    pub fn database_url(&self) -> String {
        self.database
            .get_or_init(|| {
                pg::Postgres::shared("a sandbox on the PostgreSQL store")
                    .expect("TW_TEST_STORE=postgres needs PostgreSQL")
                    .database()
            })
            .clone()
    }

    /// A job file as JSON (with [`postgres_store`], the job's row, which holds the same).
    pub fn job_file(&self, id: &str) -> Value {
        if postgres_store() {
            let server = pg::Postgres::shared("a job row").expect("PostgreSQL");
            let body = server.query(
                &self.database_url(),
                &format!("SELECT body FROM tw_jobs WHERE id = '{id}'"),
            );
            assert!(!body.trim().is_empty(), "no row for job {id}");
            return serde_json::from_str(body.trim()).expect("a job row holds JSON");
        }
        let path = self.jobs_dir().join(format!("{id}.json"));
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// `queue.json` as (running, queued) (with [`postgres_store`], the same lists from the
    /// rows' places in the queue).
    pub fn queue_file(&self) -> (Vec<String>, Vec<String>) {
        if postgres_store() {
            let server = pg::Postgres::shared("the queue rows").expect("PostgreSQL");
            let list = |placement: &str| -> Vec<String> {
                server
                    .query(
                        &self.database_url(),
                        &format!(
                            "SELECT id FROM tw_jobs WHERE placement = '{placement}' ORDER BY rank"
                        ),
                    )
                    .lines()
                    .map(str::to_string)
                    .collect()
            };
            return (list("running"), list("queued"));
        }
        let path = self.data_dir().join("queue.json");
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let value: Value = serde_json::from_slice(&bytes).expect("queue.json is JSON");
        id_lists(&value)
    }

    /// Waits until `queue.json` says (running, queued). A live daemon may write it a moment
    /// after the change it reflects; it is not on the acknowledgement path.
    pub async fn wait_queue_file(&self, running: &[&str], queued: &[&str]) {
        let expected = (
            running.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            queued.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        );
        let mut last = None;
        let found = wait_until_or_timeout(secs(3), async || {
            let now = self.queue_file();
            let done = now == expected;
            last = Some(now);
            done.then_some(())
        })
        .await;
        if found.is_none() {
            panic!("queue.json never said {expected:?}; last it said {last:?}");
        }
    }

    /// Names of the files in `quarantine/`.
    pub fn quarantined(&self) -> Vec<String> {
        fs::read_dir(self.data_dir().join("quarantine"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn dump(&self) {
        let mut files: Vec<PathBuf> = fs::read_dir(self.path())
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|x| x == "stderr"));
        files.sort();
        for file in files {
            eprintln!(
                "----- {} -----\n{}",
                file.display(),
                fs::read_to_string(&file).unwrap_or_default()
            );
        }
        eprintln!(
            "----- trainer records -----\n{}",
            fs::read_to_string(self.records_dir().join("events")).unwrap_or_default()
        );
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        // Daemons are dropped (SIGKILLed) before their sandbox; what their trainers started
        // may still run. Kill it so that nothing outlives the test.
        for pid in self.trainer_processes() {
            // SAFETY: kill only sends a signal.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn id_lists(value: &Value) -> (Vec<String>, Vec<String>) {
    let list = |key: &str| -> Vec<String> {
        value[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} is a list in {value}"))
            .iter()
            .map(|v| v.as_str().expect("an id is a string").to_string())
            .collect()
    };
    (list("running"), list("queued"))
}

/// A running `training-worker serve`; SIGKILLed when dropped.
pub struct Daemon {
    child: Child,
    base: String,
    client: reqwest::Client,
    stderr_path: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The daemon's address, as a client's `--server` takes it.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The address it listens on.
    pub fn address(&self) -> std::net::SocketAddr {
        self.base
            .trim_start_matches("http://")
            .parse()
            .expect("the base URL is http://<address>")
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill only sends a signal; the child is not reaped before we wait for it.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits until the daemon listens on its own port and `/readyz` says 200. `false` when
    /// the port was taken by someone else (exit 69); any other exit fails the test.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the daemon") {
                let stderr = self.stderr();
                if status.code() == Some(69) && stderr.contains("cannot listen") {
                    return false;
                }
                panic!("the daemon exited during start ({status}); stderr:\n{stderr}");
            }
            // Our own listening line proves the port is ours, not another test's daemon's.
            if self.stderr().contains("listening; replaying the data dir")
                && self.get_status("/readyz").await == Some(StatusCode::OK)
            {
                return true;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the daemon was not ready within {READY_WITHIN:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn get_status(&self, path: &str) -> Option<StatusCode> {
        let response = self.client.get(format!("{}{path}", self.base)).send().await;
        response.ok().map(|r| r.status())
    }

    /// Waits (bounded) for the daemon to exit by itself and returns how.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = &mut self.child;
        wait_until("the daemon exits", timeout, async || {
            child.try_wait().expect("poll the daemon")
        })
        .await
    }

    /// SIGKILL, as a crash would, and reap it.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        self.child.wait().expect("reap the daemon");
    }

    /// SIGTERM; returns the exit status and how long the stop took.
    pub async fn terminate(self, timeout: Duration) -> (ExitStatus, Duration) {
        self.stop_with(libc::SIGTERM, timeout).await
    }

    /// Sends `signal` and waits for the exit; returns its status and how long it took.
    pub async fn stop_with(mut self, signal: i32, timeout: Duration) -> (ExitStatus, Duration) {
        let asked = Instant::now();
        self.signal(signal);
        let status = self.wait_exit(timeout).await;
        (status, asked.elapsed())
    }

    async fn request(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Reply {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.request(method.clone(), &url);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status();
        let text = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: reading the body: {e}"));
        Reply { status, text }
    }

    /// GET `path`, or `None` when no answer came (the daemon gone, its listener closed).
    pub async fn try_get(&self, path: &str) -> Option<Reply> {
        self.try_request(reqwest::Method::GET, path, None).await
    }

    /// POST `path` with a JSON `body`, or `None` when no answer came.
    pub async fn try_post(&self, path: &str, body: &Value) -> Option<Reply> {
        self.try_request(reqwest::Method::POST, path, Some(body))
            .await
    }

    async fn try_request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Option<Reply> {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.ok()?;
        let status = response.status();
        let text = response.text().await.ok()?;
        Some(Reply { status, text })
    }

    /// GET `path`, whatever it answers.
    pub async fn get(&self, path: &str) -> Reply {
        self.request(reqwest::Method::GET, path, None).await
    }

    /// POST `path` with a JSON `body`, whatever it answers.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    /// POST /v1/jobs as is.
    pub async fn post_job(&self, body: &Value) -> Reply {
        self.post("/v1/jobs", body).await
    }

    /// Submits a job, expects 201 and a Queued job, returns its id.
    pub async fn submit(&self, body: Value) -> String {
        let reply = self.post_job(&body).await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "submit {body}: {reply:?}"
        );
        let job = reply.json();
        assert_eq!(job["status"], "Queued", "{job}");
        job["job_id"].as_str().expect("job_id").to_string()
    }

    /// GET /v1/jobs/{id}, expecting 200.
    pub async fn job(&self, id: &str) -> Value {
        let reply = self
            .request(reqwest::Method::GET, &format!("/v1/jobs/{id}"), None)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "job {id}: {reply:?}");
        reply.json()
    }

    /// GET /v1/jobs?status=..., as ids in the order given.
    pub async fn list_ids(&self, status: &str) -> Vec<String> {
        let reply = self
            .request(
                reqwest::Method::GET,
                &format!("/v1/jobs?status={status}"),
                None,
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "list {status}: {reply:?}");
        reply
            .json()
            .as_array()
            .expect("a list of jobs")
            .iter()
            .map(|j| j["job_id"].as_str().expect("job_id").to_string())
            .collect()
    }

    /// GET /v1/queue as (running, queued).
    pub async fn queue(&self) -> (Vec<String>, Vec<String>) {
        let reply = self.request(reqwest::Method::GET, "/v1/queue", None).await;
        assert_eq!(reply.status, StatusCode::OK, "queue: {reply:?}");
        id_lists(&reply.json())
    }

    /// POST /v1/jobs/{id}/cancel, whatever it answers.
    pub async fn cancel(&self, id: &str) -> Reply {
        self.request(
            reqwest::Method::POST,
            &format!("/v1/jobs/{id}/cancel"),
            None,
        )
        .await
    }

    /// GET /v1/jobs/{id}/logs, expecting 200.
    pub async fn logs(&self, id: &str) -> String {
        let reply = self
            .request(reqwest::Method::GET, &format!("/v1/jobs/{id}/logs"), None)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "logs {id}: {reply:?}");
        reply.text
    }

    pub async fn healthz(&self) -> StatusCode {
        self.request(reqwest::Method::GET, "/healthz", None)
            .await
            .status
    }

    /// Waits until job `id` has `status`; a different final status fails at once.
    pub async fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        wait_until(format_args!("job {id} is {status}"), timeout, async || {
            let job = self.job(id).await;
            let now = job["status"].as_str().expect("status").to_string();
            let finished = ["Completed", "Failed", "Cancelled"].contains(&now.as_str());
            if now != status && finished {
                panic!("job {id} ended {now}, not {status}: {job}");
            }
            (now == status).then_some(job)
        })
        .await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// An HTTP answer: its status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }
}
