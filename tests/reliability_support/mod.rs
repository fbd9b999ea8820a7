//! Helpers shared by the reliability suites (tests/crash_loop.rs, tests/two_daemons.rs), on
//! top of tests/e2e_support/mod.rs (which they include as `support`).
//!
//! [`Proc`] runs the real daemon like `support::Daemon` does, but listens on port 0 and reads
//! the address the daemon chose from its "listening" log line, so that no other test's daemon
//! can ever answer in its place; it polls readiness finely (boot times are measured with it),
//! and it never panics on a refused connection (a crash test expects them). The rest: a
//! seeded random generator (the test crate has no `rand`), data dir scans and snapshots, the
//! offline `check`, and percentiles.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use reqwest::StatusCode;

/// The daemon binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_training-worker");

/// How often a starting daemon is polled; fine enough to measure boot times in milliseconds.
const FINE_POLL: Duration = Duration::from_millis(2);

/// The daemon's log line once it listens (before replay); it carries `address=`.
pub const LISTENING_LINE: &str = "listening; replaying the data dir";
/// The daemon's log line once replay and the boot writes are done and the worker runs.
pub const READY_LINE: &str = "training_worker::daemon: ready ";

/// An HTTP client for loopback with a bounded wait.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .expect("build an HTTP client")
}

/// A `training-worker serve` process on `127.0.0.1:0`. SIGKILLed and reaped when dropped.
pub struct Proc {
    child: Child,
    /// When it was spawned.
    pub spawned_at: Instant,
    stderr_path: PathBuf,
    address: Option<String>,
    /// Its exit status and when the exit was first seen, once reaped.
    exit: Option<(ExitStatus, Instant)>,
}

impl Proc {
    /// Spawns `training-worker serve --config CONFIG --data-dir DATA --listen 127.0.0.1:0` in
    /// `cwd`, its stderr going to `stderr_path`.
    pub fn spawn(config: &Path, data_dir: &Path, cwd: &Path, stderr_path: PathBuf) -> Proc {
        Proc::spawn_wrapped(&[BIN.to_string()], config, data_dir, cwd, stderr_path)
    }

    /// Like [`Proc::spawn`], with the binary run by a command of its own: `program` is that
    /// command with its arguments, ending with the binary (`["strace", ..., "--", BIN]`).
    /// The pid is then the wrapper's.
    pub fn spawn_wrapped(
        program: &[String],
        config: &Path,
        data_dir: &Path,
        cwd: &Path,
        stderr_path: PathBuf,
    ) -> Proc {
        let stderr = fs::File::create(&stderr_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", stderr_path.display()));
        let mut command = Command::new(&program[0]);
        command
            .args(&program[1..])
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .current_dir(cwd)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TRAINING_WORKER_") {
                command.env_remove(name);
            }
        }
        let spawned_at = Instant::now();
        let child = command.spawn().expect("run the training-worker binary");
        Proc {
            child,
            spawned_at,
            stderr_path,
            address: None,
            exit: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// `host:port` from the "listening" line, once the daemon has logged it.
    pub fn address(&mut self) -> Option<String> {
        if self.address.is_none() {
            let stderr = self.stderr();
            let line = stderr.lines().find(|l| l.contains(LISTENING_LINE))?;
            let address = line
                .split_whitespace()
                .find_map(|word| word.strip_prefix("address="))?;
            self.address = Some(address.to_string());
        }
        self.address.clone()
    }

    /// `http://host:port`, once known.
    pub fn base(&mut self) -> Option<String> {
        self.address().map(|a| format!("http://{a}"))
    }

    /// Whether the process still runs. Does not reap it, so its pid cannot be reused while
    /// other tasks may still signal it.
    pub fn alive(&self) -> bool {
        self.exit.is_none() && crate::support::pid_alive(self.pid())
    }

    /// Reaps the process if it has exited (non-blocking); its status once it has.
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Some(status) = self.child.try_wait().expect("poll the daemon")
        {
            self.exit = Some((status, Instant::now()));
        }
        self.exit.map(|(status, _)| status)
    }

    /// The exit status, once reaped.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit.map(|(status, _)| status)
    }

    /// From spawn to the moment the exit was seen.
    pub fn exited_after(&self) -> Option<Duration> {
        self.exit.map(|(_, at)| at - self.spawned_at)
    }

    /// Sends `signal`, unless the process was already reaped.
    pub fn signal(&self, signal: i32) {
        if self.exit.is_none() {
            // SAFETY: kill only sends a signal; the child is not reaped yet, so the pid is
            // still ours.
            unsafe {
                libc::kill(self.pid(), signal);
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.reap()
    }

    /// Waits (blocking) for the exit and reaps.
    pub fn reap(&mut self) -> ExitStatus {
        if self.exit.is_none() {
            let status = self.child.wait().expect("reap the daemon");
            self.exit = Some((status, Instant::now()));
        }
        self.exit.expect("reaped").0
    }

    /// Waits (bounded) for the process to exit by itself; `None` on timeout.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(FINE_POLL).await;
        }
    }

    /// Waits until `/readyz` answers 200 on the daemon's own address; returns the time from
    /// spawn. An exit or the deadline is an `Err` that says what happened, with the stderr.
    pub async fn wait_ready(
        &mut self,
        client: &reqwest::Client,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(base) = self.base()
                && let Ok(reply) = client.get(format!("{base}/readyz")).send().await
                && reply.status() == StatusCode::OK
            {
                return Ok(self.spawned_at.elapsed());
            }
            if let Some(status) = self.poll_exit() {
                return Err(format!(
                    "the daemon exited during start ({status}); stderr:\n{}",
                    self.stderr()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the daemon was not ready within {timeout:?}; stderr:\n{}",
                    self.stderr()
                ));
            }
            tokio::time::sleep(FINE_POLL).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.kill();
        }
    }
}

/// `training-worker check --data-dir DIR`: its exit code and its output.
pub fn run_check(data_dir: &Path) -> (Option<i32>, String) {
    let output = Command::new(BIN)
        .arg("check")
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("TRAINING_WORKER_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("run training-worker check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

/// Every file under `dir`, recursively, as paths relative to it.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let Ok(entries) = fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(path),
                _ => found.push(path.strip_prefix(dir).unwrap_or(&path).to_path_buf()),
            }
        }
    }
    found.sort();
    found
}

/// A file that must not be in a data dir, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leftover {
    /// `.<name>.tmp`: a temporary file of an interrupted write.
    Temporary(PathBuf),
    /// An empty file.
    Empty(PathBuf),
    Unreadable(PathBuf, String),
}

impl std::fmt::Display for Leftover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Leftover::Temporary(p) => write!(f, "temporary file {}", p.display()),
            Leftover::Empty(p) => write!(f, "zero-length file {}", p.display()),
            Leftover::Unreadable(p, e) => write!(f, "cannot stat {}: {e}", p.display()),
        }
    }
}

/// Temporary files of interrupted writes and empty files anywhere under `data_dir`, with
/// paths relative to it.
pub fn leftovers(data_dir: &Path) -> Vec<Leftover> {
    let mut found = Vec::new();
    for relative in files_under(data_dir) {
        let name = relative
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') && name.ends_with(".tmp") {
            found.push(Leftover::Temporary(relative.clone()));
        }
        match fs::metadata(data_dir.join(&relative)) {
            Ok(meta) if meta.len() == 0 => found.push(Leftover::Empty(relative)),
            Ok(_) => {}
            Err(e) => found.push(Leftover::Unreadable(relative, e.to_string())),
        }
    }
    found
}

/// One entry of a [`snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir {
        modified: SystemTime,
    },
    File {
        bytes: Vec<u8>,
        modified: SystemTime,
    },
}

/// Every directory and file under `dir` (itself included, as ""), with contents and
/// modification times. Two equal snapshots mean nothing was written, created or removed.
pub fn snapshot(dir: &Path) -> BTreeMap<String, Entry> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let meta = fs::symlink_metadata(&current)
            .unwrap_or_else(|e| panic!("stat {}: {e}", current.display()));
        let modified = meta.modified().expect("file systems here record mtimes");
        let key = current
            .strip_prefix(dir)
            .unwrap_or(&current)
            .display()
            .to_string();
        if meta.is_dir() {
            found.insert(key, Entry::Dir { modified });
            for entry in
                fs::read_dir(&current).unwrap_or_else(|e| panic!("list {}: {e}", current.display()))
            {
                pending.push(entry.expect("a directory entry").path());
            }
        } else {
            let bytes =
                fs::read(&current).unwrap_or_else(|e| panic!("read {}: {e}", current.display()));
            found.insert(key, Entry::File { bytes, modified });
        }
    }
    found
}

/// What differs between two snapshots, one line each; empty when they are equal.
pub fn snapshot_diff(
    before: &BTreeMap<String, Entry>,
    after: &BTreeMap<String, Entry>,
) -> Vec<String> {
    let mut diff = Vec::new();
    for (path, entry) in before {
        match after.get(path) {
            None => diff.push(format!("{path:?} was removed")),
            Some(now) if now != entry => diff.push(format!(
                "{path:?} changed: {} -> {}",
                describe(entry),
                describe(now)
            )),
            Some(_) => {}
        }
    }
    for (path, entry) in after {
        if !before.contains_key(path) {
            diff.push(format!("{path:?} appeared: {}", describe(entry)));
        }
    }
    diff
}

fn describe(entry: &Entry) -> String {
    match entry {
        Entry::Dir { modified } => format!("directory modified {modified:?}"),
        Entry::File { bytes, modified } => {
            let text = String::from_utf8_lossy(bytes);
            let shown: String = text.chars().take(160).collect();
            format!("{} bytes {shown:?} modified {modified:?}", bytes.len())
        }
    }
}

/// Copies `from` (recursively) into `to`, for keeping the evidence of a failure.
pub fn copy_tree(from: &Path, to: &Path) {
    for relative in files_under(from) {
        let target = to.join(&relative);
        if let Some(parent) = target.parent() {
            let _ = fs::create_dir_all(parent);
        }
        let _ = fs::copy(from.join(&relative), target);
    }
}

/// The `p`-th percentile (0..=100) of `values` by nearest rank; zero when there are none.
pub fn percentile(values: &[Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds with one decimal, for summaries.
pub fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

/// A small seeded generator (SplitMix64): the same seed gives the same choices.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// A generator for one part of a run (a round, a client), independent of how many
    /// numbers other parts drew, so a seed replays each round's choices. The inputs are
    /// mixed, not just combined: SplitMix64 states that differ by a multiple of its step
    /// would give overlapping streams.
    pub fn derive(seed: u64, a: u64, b: u64) -> Rng {
        Rng(mix(seed ^ mix(a ^ mix(b ^ 0x5EED))))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64) / ((1u64 << 53) as f64) < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// A duration uniform in `0..=max`.
    pub fn duration_up_to(&mut self, max: Duration) -> Duration {
        Duration::from_micros(self.range(0, max.as_micros() as u64))
    }
}

/// SplitMix64's finaliser: a bijection that scatters every input bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed from the environment variable `name` (decimal or 0x-hex), else from the clock.
pub fn seed_from_env(name: &str) -> u64 {
    match std::env::var(name) {
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("{name}={text:?} is not a number: {e}"))
        }
        Err(_) => {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("the clock is after 1970")
                .as_nanos() as u64;
            nanos ^ (u64::from(std::process::id()) << 40)
        }
    }
}

/// A count from the environment variable `name`, else `default`.
pub fn count_from_env(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={text:?} is not a count: {e}")),
        Err(_) => default,
    }
}
