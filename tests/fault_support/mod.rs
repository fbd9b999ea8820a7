//! Helpers for the fault suites (`crash_points.rs`, `storage_faults.rs`), on top of
//! `tests/e2e_support` (which they reuse as `crate::support`):
//!
//! - [`TestDaemon`]: the real binary, like `support::Daemon`, but its requests report a
//!   broken connection instead of panicking (a crash in the middle of a request is the
//!   point of these tests), it can run any config file, and it can be waited on while
//!   strace holds it;
//! - [`Strace`]: strace attached to a running daemon to inject faults into its system calls;
//! - [`Mount`]: a tmpfs or read-only bind mount that is undone when dropped, even when the
//!   test fails;
//! - checks of a data dir on disk: `training-worker check`, leftovers of interrupted writes.
//!
//! A daemon's stderr goes to `<sandbox>/<label>-<n>.stderr`, which the sandbox prints when
//! its test panics.

use std::ffi::CString;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::support::{Reply, STUB_TRAINER, Sandbox, secs, wait_until, wait_until_or_timeout};

/// The daemon binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_training-worker");

/// sysexits.h EX_IOERR: what the daemon exits with on a fatal storage error.
pub const EXIT_STORAGE: i32 = 74;

/// How often conditions are polled here.
pub const POLL: Duration = Duration::from_millis(10);

static SPAWNED: AtomicUsize = AtomicUsize::new(0);

/// Writes a line to the real stderr, past the test harness's output capture, so that the
/// figures a suite reports show in a plain `cargo test` run.
pub fn report(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// The settings of a config file written by [`write_config`].
#[derive(Clone, Debug)]
pub struct Config {
    pub max_concurrent: usize,
    /// The trainer's argv.
    pub trainer: Vec<String>,
    pub kill_grace: &'static str,
    pub shutdown_grace: &'static str,
}

impl Config {
    /// The stub trainer of tests/trainers/stub.sh.
    pub fn stub(max_concurrent: usize) -> Config {
        Config {
            max_concurrent,
            trainer: vec![STUB_TRAINER.to_string()],
            kill_grace: "2s",
            shutdown_grace: "10s",
        }
    }
}

/// Writes a config file for [`TestDaemon::start`].
pub fn write_config(path: &Path, c: &Config) {
    let command = serde_json::to_string(&c.trainer).expect("argv serialises");
    let text = format!(
        "shutdown_grace = \"{}\"\n\n[worker]\nmax_concurrent = {}\nmax_attempts = 3\n\n\
         [executor]\ncommand = {command}\ntimeout = \"24h\"\nkill_grace = \"{}\"\npass_env = []\n",
        c.shutdown_grace, c.max_concurrent, c.kill_grace,
    );
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A `training-worker serve` of a sandbox; SIGKILLed when dropped.
pub struct TestDaemon {
    child: Child,
    status: Option<ExitStatus>,
    /// Started under a wrapper (strace): the daemon is the wrapper's child.
    wrapped: bool,
    pub base: String,
    client: reqwest::Client,
    stderr_path: PathBuf,
}

impl TestDaemon {
    /// Runs `serve` with `config` on the sandbox's data dir and a free port, without waiting.
    pub fn spawn(sandbox: &Sandbox, config: &Path, label: &str) -> TestDaemon {
        TestDaemon::spawn_under(sandbox, config, label, &[])
    }

    /// Like [`TestDaemon::spawn`], with `wrapper` (e.g. strace and its options, ending in
    /// `--`) in front of the daemon's command line; the wrapper is then this handle's child.
    pub fn spawn_under(
        sandbox: &Sandbox,
        config: &Path,
        label: &str,
        wrapper: &[String],
    ) -> TestDaemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port();
        let n = SPAWNED.fetch_add(1, Ordering::SeqCst);
        let stderr_path = sandbox.path().join(format!("{label}-{n}.stderr"));
        let stderr = fs::File::create(&stderr_path).expect("create the stderr file");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(BIN);
                command
            }
            None => Command::new(BIN),
        };
        command
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(sandbox.data_dir())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .current_dir(sandbox.path())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TRAINING_WORKER_") {
                command.env_remove(name);
            }
        }
        let child = command.spawn().expect("run the training-worker binary");
        TestDaemon {
            child,
            status: None,
            wrapped: !wrapper.is_empty(),
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(secs(15))
                .build()
                .expect("build an HTTP client"),
            stderr_path,
        }
    }

    /// Waits until the daemon is ready (`None`) or has exited (`Some(how)`). Readiness is
    /// `/readyz` 200 after this daemon's own "listening" line, so that another test's
    /// daemon on a reused port is not mistaken for it.
    pub async fn ready_or_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if self.stderr().contains("listening; replaying the data dir")
                && matches!(self.send(Method::GET, "/readyz", None).await, Ok(r) if r.status == StatusCode::OK)
            {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon was neither ready nor gone within {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Spawns a daemon and waits until `/readyz` says 200; a port taken between choosing
    /// and binding (exit 69) is retried with another. Any other exit fails the test.
    pub async fn start(sandbox: &Sandbox, config: &Path, label: &str) -> TestDaemon {
        for _ in 0..5 {
            let mut daemon = TestDaemon::spawn(sandbox, config, label);
            match daemon.ready_or_exit(secs(30)).await {
                None => return daemon,
                Some(status) => {
                    let stderr = daemon.stderr();
                    if status.code() == Some(69) && stderr.contains("cannot listen") {
                        continue;
                    }
                    panic!("the daemon exited during start ({status}); stderr:\n{stderr}");
                }
            }
        }
        panic!("the daemon could not bind a free port in 5 tries");
    }

    /// The pid of this handle's child: the daemon, or the wrapper it runs under.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The daemon's own pid (under a wrapper, the wrapper's only child).
    pub fn daemon_pid(&self) -> Option<i32> {
        if !self.wrapped {
            return Some(self.pid());
        }
        let children =
            fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid())).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// How the daemon ended, once it has (reaped here).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("poll the daemon");
        }
        self.status
    }

    pub fn alive(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Sends `signal` to the daemon (not to a wrapper).
    pub fn signal(&self, signal: i32) {
        if self.status.is_none()
            && let Some(pid) = self.daemon_pid()
        {
            // SAFETY: kill only sends a signal; our child is not reaped yet, so neither it
            // nor (under a wrapper that waits for it) its child has been replaced.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Waits (bounded) for the daemon to exit and returns how.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let found = wait_until_or_timeout(timeout, async || self.exit_status()).await;
        found.unwrap_or_else(|| {
            panic!(
                "the daemon did not exit within {timeout:?}; stderr:\n{}",
                self.stderr()
            )
        })
    }

    /// SIGTERM, and the exit status (bounded wait).
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(secs(30)).await
    }

    /// SIGTERM, expecting a graceful stop (exit 0).
    pub async fn stop_gracefully(&mut self) {
        let status = self.terminate().await;
        assert_eq!(
            status.code(),
            Some(0),
            "a graceful stop exits 0, not {status}; stderr:\n{}",
            self.stderr()
        );
    }

    /// One request; `Err` when no complete answer came (refused, reset, cut short).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, String> {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{method} {path}: {e:?}"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| format!("{method} {path}: reading the body: {e:?}"))?;
        Ok(Reply { status, text })
    }

    /// A request that must get an answer.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Reply {
        self.send(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{e}; daemon stderr:\n{}", self.stderr()))
    }

    pub async fn post_job(&self, body: &Value) -> Reply {
        self.call(Method::POST, "/v1/jobs", Some(body)).await
    }

    pub async fn cancel(&self, id: &str) -> Reply {
        self.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None)
            .await
    }

    /// GET /v1/jobs/{id}: `Some` on 200, `None` on 404; anything else fails the test.
    pub async fn job(&self, id: &str) -> Option<Value> {
        let reply = self
            .call(Method::GET, &format!("/v1/jobs/{id}"), None)
            .await;
        match reply.status {
            StatusCode::OK => Some(reply.json()),
            StatusCode::NOT_FOUND => None,
            _ => panic!("GET job {id}: {reply:?}"),
        }
    }

    /// GET /v1/queue as (running, queued).
    pub async fn queue(&self) -> (Vec<String>, Vec<String>) {
        let reply = self.call(Method::GET, "/v1/queue", None).await;
        assert_eq!(reply.status, StatusCode::OK, "GET /v1/queue: {reply:?}");
        id_lists(&reply.json())
    }

    /// GET /v1/jobs?status=..., as ids in the order given.
    pub async fn list_ids(&self, status: &str) -> Vec<String> {
        let reply = self
            .call(Method::GET, &format!("/v1/jobs?status={status}"), None)
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

    /// Waits until job `id` has `status` (as the API says).
    pub async fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        wait_until(format_args!("job {id} is {status}"), timeout, async || {
            let job = self.job(id).await?;
            (job["status"] == status).then_some(job)
        })
        .await
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGKILL);
            // SAFETY: kill only sends a signal.
            unsafe {
                libc::kill(self.pid(), libc::SIGKILL);
            }
            let _ = self.child.wait();
        }
    }
}

/// `{"running": [...], "queued": [...]}` as two lists of ids.
pub fn id_lists(value: &Value) -> (Vec<String>, Vec<String>) {
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

/// Whether an exit status is death by SIGKILL.
pub fn killed_by_sigkill(status: ExitStatus) -> bool {
    status.signal() == Some(libc::SIGKILL)
}

/// The strace binary. The fault suites need it; CI installs it (.ci/run), so a machine
/// without it fails here with a clear message rather than passing without testing.
pub fn strace_binary() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("strace"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "strace is not installed, and these tests inject faults with it: install it \
             (apt-get install -y strace; .ci/run does this in CI)"
        )
    })
}

/// strace attached to a running process and all its threads (`-f -p`), tampering with its
/// system calls as `filter` says. Detached (SIGTERM) when dropped.
///
/// Two facts about strace (6.1) shape how the suites use it:
/// - `-e inject=` acts only on system calls that are also traced: with `-e trace=none`
///   nothing is injected, silently. So `filter` traces exactly the injected calls and the
///   trace goes to a file (or /dev/null).
/// - `when=K` counts per system call and per tracee, that is per thread. Attaching once the
///   daemon is ready means every counter starts at the workload, not at boot (whose writes
///   run on another thread).
pub struct Strace {
    child: Child,
    status: Option<ExitStatus>,
    stderr_path: PathBuf,
}

impl Strace {
    /// Attaches to `pid` with `filter` (strace options such as `-e trace=fsync`), writing
    /// the trace to `output`, and returns once every thread of `pid` is traced.
    pub async fn attach(pid: i32, filter: &[String], output: &Path, stderr: &Path) -> Strace {
        let stderr_file = fs::File::create(stderr).expect("create strace's stderr file");
        let child = Command::new(strace_binary())
            .arg("-f")
            .arg("-qq")
            .arg("-o")
            .arg(output)
            .args(filter)
            .arg("-p")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_file)
            .spawn()
            .expect("run strace");
        let mut strace = Strace {
            child,
            status: None,
            stderr_path: stderr.to_path_buf(),
        };
        let tracer = strace.child.id() as i32;
        let deadline = Instant::now() + secs(20);
        loop {
            if let Some(status) = strace.exit_status() {
                panic!(
                    "strace exited ({status}) before it attached to {pid}: {}",
                    strace.stderr()
                );
            }
            if all_threads_traced_by(pid, tracer) {
                return strace;
            }
            assert!(
                Instant::now() < deadline,
                "strace did not attach to every thread of {pid} within 20s: {}",
                strace.stderr()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("poll strace");
        }
        self.status
    }

    /// Waits (bounded) for strace to end by itself, as it does once its tracees are gone.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until_or_timeout(timeout, async || self.exit_status()).await
    }

    /// Detaches from the tracees (strace does on SIGTERM) and waits for strace to end.
    pub async fn detach(mut self) {
        if self.exit_status().is_none() {
            // SAFETY: kill only sends a signal to our own child.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
        }
        if self.wait_exit(secs(20)).await.is_none() {
            panic!("strace did not detach within 20s: {}", self.stderr());
        }
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        if self.status.is_some() || !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: kill only sends a signal to our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether every thread of `pid` is traced by `tracer`.
fn all_threads_traced_by(pid: i32, tracer: i32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for task in tasks.flatten() {
        let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let traced_by = status
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .and_then(|v| v.trim().parse::<i32>().ok());
        match traced_by {
            Some(t) if t == tracer => any = true,
            // A thread that ended between listing and reading does not count.
            None => {}
            Some(_) => return false,
        }
    }
    any
}

/// Whether this process runs as root (mounts need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A mount made by a test; unmounted when dropped (lazily if it is still busy).
pub struct Mount {
    path: PathBuf,
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in a path")
}

fn mount_call(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let source = source.map(|s| CString::new(s).expect("no NUL"));
    let fstype = fstype.map(|s| CString::new(s).expect("no NUL"));
    let data = data.map(|s| CString::new(s).expect("no NUL"));
    let target_c = c_path(target);
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a valid NUL-terminated string or null, as mount(2) allows.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "mount on {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        ))
    }
}

impl Mount {
    /// Mounts a tmpfs of `size` (as mount's `size=` option, e.g. "512k") on `path`.
    pub fn tmpfs(path: &Path, size: &str) -> Result<Mount, String> {
        fs::create_dir_all(path).map_err(|e| format!("create {}: {e}", path.display()))?;
        mount_call(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            0,
            Some(&format!("size={size},mode=0755")),
        )?;
        Ok(Mount {
            path: path.to_path_buf(),
        })
    }

    /// Bind-mounts `path` over itself and makes that mount read-only. Files already open
    /// stay writable (they belong to the mount below); every new open sees the read-only one.
    pub fn bind_read_only(path: &Path) -> Result<Mount, String> {
        mount_call(
            Some(&path.to_string_lossy()),
            path,
            None,
            libc::MS_BIND,
            None,
        )?;
        let mount = Mount {
            path: path.to_path_buf(),
        };
        mount.set_read_only(true)?;
        Ok(mount)
    }

    /// Switches this (bind) mount between read-only and read-write.
    pub fn set_read_only(&self, read_only: bool) -> Result<(), String> {
        let ro = if read_only { libc::MS_RDONLY } else { 0 };
        mount_call(
            None,
            &self.path,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | ro,
            None,
        )
    }

    /// Unmounts now; `Err` if it is busy.
    pub fn unmount(self) -> Result<(), String> {
        let path = c_path(&self.path);
        // SAFETY: a valid path; umount2 has no other preconditions.
        let rc = unsafe { libc::umount2(path.as_ptr(), 0) };
        let result = if rc == 0 {
            Ok(())
        } else {
            Err(format!(
                "umount {}: {}",
                self.path.display(),
                std::io::Error::last_os_error()
            ))
        };
        if result.is_ok() {
            std::mem::forget(self);
        }
        result
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let path = c_path(&self.path);
        for _ in 0..50 {
            // SAFETY: a valid path; umount2 has no other preconditions.
            if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
                return;
            }
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EBUSY) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Still busy (a process that outlived its test): detach it from the tree at least.
        // SAFETY: as above.
        unsafe {
            libc::umount2(path.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// What `training-worker check --data-dir` said: whether it exited 0, and its output.
pub fn run_check(data_dir: &Path) -> (bool, String) {
    let output = Command::new(BIN)
        .arg("check")
        .arg("--data-dir")
        .arg(data_dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("run training-worker check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    match output.status.code() {
        Some(0) => (true, text),
        Some(1) => (false, text),
        _ => panic!("check ended with {}: {text}", output.status),
    }
}

/// Runs `check` and fails the test unless it passes.
pub fn assert_check_passes(data_dir: &Path, context: &str) {
    let (clean, text) = run_check(data_dir);
    assert!(clean, "{context}: check found problems:\n{text}");
}

/// The lines of `check`'s output that report problems.
pub fn check_problems(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("problem:"))
        .map(str::to_string)
        .collect()
}

/// Files in `dir` as (name, length); empty when `dir` does not exist.
pub fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    (e.file_name().to_string_lossy().into_owned(), len)
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Leftovers of interrupted writes and empty files in the data dir and its `jobs/`, and
/// anything in `quarantine/`: all should be absent once a daemon has booted (and stopped).
pub fn leftovers(data_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for (dir, rel) in [
        (data_dir.to_path_buf(), ""),
        (data_dir.join("jobs"), "jobs/"),
    ] {
        for (name, len) in listing(&dir) {
            let path = dir.join(&name);
            if path.is_dir() || name == "lock" || name == "README.md" || name == ".gitignore" {
                continue;
            }
            if name.starts_with('.') || name.ends_with(".tmp") {
                found.push(format!("{rel}{name}: a temporary file"));
            } else if len == 0 {
                found.push(format!("{rel}{name}: an empty file"));
            }
        }
    }
    for (name, _) in listing(&data_dir.join("quarantine")) {
        found.push(format!("quarantine/{name}: a quarantined file"));
    }
    found
}

/// Names in `jobs/` (every one, temporary files included).
pub fn job_file_names(data_dir: &Path) -> Vec<String> {
    listing(&data_dir.join("jobs"))
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// A job file as JSON, if it exists and parses.
pub fn read_job_file(data_dir: &Path, id: &str) -> Option<Value> {
    let bytes = fs::read(data_dir.join("jobs").join(format!("{id}.json"))).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// `queue.json` as (running, queued), if it exists and parses.
pub fn read_queue_file(data_dir: &Path) -> Option<(Vec<String>, Vec<String>)> {
    let bytes = fs::read(data_dir.join("queue.json")).ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    Some(id_lists(&value))
}

/// A text summary of a data dir, for failure messages.
pub fn describe_data_dir(data_dir: &Path) -> String {
    let mut out = String::new();
    for (dir, rel) in [
        (data_dir.to_path_buf(), ""),
        (data_dir.join("jobs"), "jobs/"),
        (data_dir.join("quarantine"), "quarantine/"),
    ] {
        for (name, len) in listing(&dir) {
            let _ = writeln!(out, "  {rel}{name} ({len} bytes)");
        }
    }
    if let Ok(text) = fs::read_to_string(data_dir.join("queue.json")) {
        let _ = writeln!(
            out,
            "  queue.json: {}",
            text.split_whitespace().collect::<String>()
        );
    }
    for (name, _) in listing(&data_dir.join("jobs")) {
        if let Ok(text) = fs::read_to_string(data_dir.join("jobs").join(&name)) {
            let compact: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let _ = writeln!(out, "  jobs/{name}: {compact}");
        }
    }
    out
}
