//! What the client's end-to-end suites share: the real binary run as a child process in an
//! environment that does not steer it, its output collected with a time limit and checked
//! for what a script relies on (no ANSI escapes when piped, one-line errors).

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::support::Daemon;

pub const BIN: &str = env!("CARGO_BIN_EXE_training-worker");
/// How long one client run may take before the test fails instead of hanging.
pub const RUN_WITHIN: Duration = Duration::from_secs(60);

/// A finished client run.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Exit `code` and nothing on stderr.
    pub fn assert_ok(&self) -> &Output {
        assert_eq!((self.code, self.stderr.as_str()), (0, ""), "{self:?}");
        self
    }

    /// Exit `code` with exactly one line `error: ...` on stderr that contains `text`.
    pub fn assert_error(&self, code: i32, text: &str) {
        assert_eq!(self.code, code, "{self:?}");
        assert_eq!(self.stderr.lines().count(), 1, "one line: {self:?}");
        assert!(self.stderr.starts_with("error: "), "{self:?}");
        assert!(self.stderr.contains(text), "{text:?} in {self:?}");
    }
}

/// The client binary with an environment that does not steer it: no `TRAINING_WORKER_*`
/// of the test's own and no `NO_COLOR` (so plain output must come from the pipe).
pub fn client(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if name_text.starts_with("TRAINING_WORKER_") || name_text == "NO_COLOR" {
            command.env_remove(&name);
        }
    }
    command
}

/// Runs the client against `server` with `args` (and `--server server`).
pub fn at(server: &str, args: &[&str]) -> Command {
    let mut command = client(args);
    command.arg("--server").arg(server);
    command
}

pub async fn finish(child: Child) -> Output {
    let output = tokio::time::timeout(RUN_WITHIN, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the client did not finish within {RUN_WITHIN:?}"))
        .expect("collect the client's output");
    let output = Output {
        code: output
            .status
            .code()
            .expect("the client exits, not killed by a signal"),
        stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    };
    for text in [&output.stdout, &output.stderr] {
        assert!(
            !text.contains('\x1b'),
            "no ANSI escapes when piped: {output:?}"
        );
    }
    output
}

pub async fn run(mut command: Command) -> Output {
    finish(command.spawn().expect("run the client")).await
}

pub async fn run_with_stdin(mut command: Command, input: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .spawn()
        .expect("run the client");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // A client that does not read its stdin may exit before the write.
    if let Err(e) = stdin.write_all(input).await {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
    }
    drop(stdin);
    finish(child).await
}

/// The daemon's URL, from the address its log says it listens on.
pub fn server(daemon: &Daemon) -> String {
    let stderr = daemon.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("listening"))
        .unwrap_or_else(|| panic!("no listening line in the daemon's log:\n{stderr}"));
    let start = line.find("address=").expect("the address is logged") + "address=".len();
    let address = line[start..].split_whitespace().next().expect("an address");
    format!("http://{address}")
}
