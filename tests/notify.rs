//! The service manager's notification protocol end to end: the real daemon, started the way
//! systemd starts a `Type=notify` service with `WatchdogSec=` (`NOTIFY_SOCKET` naming a Unix
//! datagram socket the test binds, `WATCHDOG_USEC` set), tells it `READY=1` once `/readyz`
//! says 200, `WATCHDOG=1` while its worker loop runs, and `STOPPING=1` on SIGTERM, then exits 0.
//!
//! The message format, abstract sockets, `WATCHDOG_PID` and a stuck worker loop (no pings)
//! are tested next to the code, in `src/notify.rs`.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::net::UnixDatagram;

const BINARY: &str = env!("CARGO_BIN_EXE_training-worker");
const DEMO_TRAINER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo-trainer.sh");

/// A daemon that is SIGKILLed if the test ends before it exits, and whose stderr is shown
/// when an assertion fails.
struct Daemon {
    child: Child,
    stderr: std::path::PathBuf,
}

impl Daemon {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with the pid of a child this test started and has not reaped.
        let sent = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(sent, 0, "kill failed");
    }

    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within {within:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr").port()
}

/// Starts the daemon in `dir` with built-in defaults, the demo trainer and `env`.
fn spawn(dir: &Path, port: u16, env: &[(&str, &str)]) -> Daemon {
    let stderr = dir.join("daemon.stderr");
    let mut command = Command::new(BINARY);
    command
        .current_dir(dir)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--data-dir".as_ref(), dir.join("data").as_os_str()])
        .env("TRAINING_WORKER_EXECUTOR_COMMAND", DEMO_TRAINER)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"));
    for (key, value) in env {
        command.env(key, value);
    }
    Daemon {
        child: command.spawn().expect("the daemon starts"),
        stderr,
    }
}

/// The next notification, as its lines; fails the test after `within`.
async fn next(socket: &UnixDatagram, within: Duration, daemon: &Daemon) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    let n = match tokio::time::timeout(within, socket.recv(&mut buf)).await {
        Ok(received) => received.expect("recv"),
        Err(_) => panic!(
            "no notification within {within:?}; stderr:\n{}",
            daemon.stderr()
        ),
    };
    let text = String::from_utf8(buf[..n].to_vec()).expect("a notification is text");
    assert!(text.ends_with('\n'), "{text:?} does not end its last line");
    text.lines().map(String::from).collect()
}

#[tokio::test]
async fn ready_after_replay_watchdog_while_alive_stopping_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    let port = free_port();
    let mut daemon = spawn(
        dir.path(),
        port,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().expect("utf-8 path")),
            ("WATCHDOG_USEC", "200000"),
        ],
    );

    // READY=1 comes with a status line, and only once the daemon is ready.
    let ready = loop {
        let lines = next(&manager, Duration::from_secs(20), &daemon).await;
        assert!(
            !lines.iter().any(|l| l.starts_with("WATCHDOG=")),
            "a watchdog ping before READY: {lines:?}"
        );
        if lines.iter().any(|l| l == "READY=1") {
            break lines;
        }
    };
    assert!(
        ready.iter().any(|l| l.starts_with("STATUS=ready")),
        "READY without a status: {ready:?}"
    );
    let readyz = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .expect("GET /readyz");
    assert_eq!(
        readyz.status(),
        200,
        "READY=1 was sent before /readyz said 200"
    );

    // WATCHDOG=1 every 100 ms (half of WATCHDOG_USEC) while the worker loop answers; a
    // loaded machine may stretch the beat, so only "repeatedly" is asserted.
    let started = Instant::now();
    let mut pings = 0;
    while pings < 4 {
        let lines = next(&manager, Duration::from_secs(5), &daemon).await;
        assert_eq!(lines, ["WATCHDOG=1"], "expected only watchdog pings");
        pings += 1;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "4 watchdog pings took {:?}",
        started.elapsed()
    );

    // SIGTERM: STOPPING=1 (a ping already on its way may come first), then exit 0.
    daemon.signal(libc::SIGTERM);
    loop {
        let lines = next(&manager, Duration::from_secs(10), &daemon).await;
        if lines.iter().any(|l| l == "STOPPING=1") {
            break;
        }
        assert_eq!(lines, ["WATCHDOG=1"], "unexpected before STOPPING=1");
    }
    let status = daemon.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "not a graceful stop; stderr:\n{}",
        daemon.stderr()
    );
}

#[tokio::test]
async fn a_watchdog_meant_for_another_process_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    let port = free_port();
    // WATCHDOG_PID names some other process (pid 1): these variables were inherited.
    let mut daemon = spawn(
        dir.path(),
        port,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().expect("utf-8 path")),
            ("WATCHDOG_USEC", "200000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    loop {
        let lines = next(&manager, Duration::from_secs(20), &daemon).await;
        if lines.iter().any(|l| l == "READY=1") {
            break;
        }
    }
    let quiet = tokio::time::timeout(Duration::from_millis(600), async {
        let mut buf = [0u8; 256];
        manager.recv(&mut buf).await.map(|n| buf[..n].to_vec())
    })
    .await;
    if let Ok(received) = quiet {
        panic!(
            "a notification after READY without a stop: {:?}",
            received.map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        );
    }
    daemon.signal(libc::SIGTERM);
    let lines = next(&manager, Duration::from_secs(10), &daemon).await;
    assert!(lines.iter().any(|l| l == "STOPPING=1"), "{lines:?}");
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(20)).await.code(),
        Some(0)
    );
}

/// `deploy/training-worker.service` as `(section, key) -> value`, comments skipped.
fn unit() -> std::collections::BTreeMap<(String, String), String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/training-worker.service"
    ))
    .expect("deploy/training-worker.service");
    let mut section = String::new();
    let mut entries = std::collections::BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{line:?}: not KEY=VALUE"));
        let previous = entries.insert((section.clone(), key.to_string()), value.to_string());
        assert!(previous.is_none(), "{section}.{key} is set twice");
    }
    entries
}

/// A systemd time span: a number of seconds, or text like `30s`, `5min`.
fn timespan(text: &str) -> Duration {
    match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(text).unwrap_or_else(|e| panic!("{text:?}: {e}")),
    }
}

#[test]
fn the_unit_waits_for_ready_restarts_and_outwaits_the_graceful_stop() {
    let unit = unit();
    let service = |key: &str| {
        unit.get(&("Service".to_string(), key.to_string()))
            .map(String::as_str)
            .unwrap_or_else(|| panic!("[Service] {key}= is missing"))
    };
    assert_eq!(service("Type"), "notify");
    assert_eq!(service("Restart"), "always");
    assert_eq!(
        service("KillMode"),
        "mixed",
        "SIGTERM to the daemon alone; it stops its trainers itself"
    );
    let exec: Vec<&str> = service("ExecStart").split_whitespace().collect();
    assert!(
        exec[0].starts_with('/') && exec[0].ends_with("/training-worker"),
        "ExecStart runs the installed binary: {exec:?}"
    );
    assert_eq!(exec[1], "serve");

    // A graceful stop takes up to shutdown_grace; systemd must wait longer before SIGKILL.
    let defaults: toml::Table =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
            .expect("config/default.toml")
            .parse()
            .expect("TOML");
    let grace = timespan(defaults["shutdown_grace"].as_str().expect("shutdown_grace"));
    let stop = timespan(service("TimeoutStopSec"));
    assert!(
        stop > grace,
        "TimeoutStopSec {stop:?} is not above shutdown_grace {grace:?}"
    );
    let watchdog = timespan(service("WatchdogSec"));
    assert!(
        watchdog >= Duration::from_secs(2),
        "WatchdogSec {watchdog:?}: too short for a loaded box"
    );
    assert!(
        matches!(
            unit.get(&("Service".into(), "NotifyAccess".into()))
                .map(String::as_str),
            None | Some("main")
        ),
        "only the daemon itself notifies"
    );
    assert_eq!(
        unit.get(&("Install".into(), "WantedBy".into()))
            .map(String::as_str),
        Some("multi-user.target")
    );
}
