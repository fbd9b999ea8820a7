//! A stop signal during boot is a graceful stop, however early it comes.
//!
//! The crash loop found that a SIGTERM in the first milliseconds killed the daemon by the
//! signal (exit by signal 15, nothing flushed) instead of stopping it: the handlers were
//! installed only once the listener was bound. Here strace holds the daemon at its `bind`
//! (`inject=bind:delay_enter`) for two seconds, after the lock is taken, so the signal lands
//! in that window every time; the daemon must then finish its boot and exit 0.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

use std::process::{Command, Stdio};

use support::{Sandbox, Settings, secs, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_before_the_listener_is_bound_is_a_graceful_stop() {
    let strace = ["/usr/bin/strace", "/bin/strace", "/usr/local/bin/strace"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("strace is installed (.ci/run installs it)");
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings {
        max_concurrent: 0,
        ..Settings::default()
    });
    let stderr = std::fs::File::create(sandbox.path().join("early.stderr")).expect("stderr");
    let mut traced = Command::new(strace)
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=bind"])
        .args(["-e", "inject=bind:delay_enter=2000000"])
        .arg(env!("CARGO_BIN_EXE_training-worker"))
        .arg("serve")
        .arg("--config")
        .arg(sandbox.config_file())
        .arg("--data-dir")
        .arg(sandbox.data_dir())
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("run the daemon under strace");

    // The lock file names the daemon once it holds the lock, just before it binds.
    let lock = sandbox.data_dir().join("lock");
    let pid: i32 = wait_until("the daemon takes the lock", secs(20), async || {
        let text = std::fs::read_to_string(&lock).ok()?;
        text.strip_prefix("pid ")?.split(' ').next()?.parse().ok()
    })
    .await;
    // SAFETY: kill only sends a signal, to the daemon this test started.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = wait_until("the daemon exits", secs(30), async || {
        traced.try_wait().expect("poll strace")
    })
    .await;
    let log = std::fs::read_to_string(sandbox.path().join("early.stderr")).unwrap_or_default();
    // strace exits as the traced program did: 0 for a graceful stop, not death by SIGTERM.
    assert_eq!(status.code(), Some(0), "{status}; stderr:\n{log}");
    assert!(log.contains("stop requested"), "{log}");
    assert!(log.contains("stopped"), "{log}");
}
