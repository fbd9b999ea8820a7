//! The service manager's notification protocol (sd_notify(3)): one Unix datagram of
//! `KEY=VALUE` lines per notification, to the socket `NOTIFY_SOCKET` names (a path, or
//! `@name` for an abstract socket).
//!
//! The `sd-notify` crate gives the protocol's vocabulary ([`State`], its lines) and reads the
//! watchdog's interval ([`watchdog_timeout_from_env`]). The datagram is sent here, by a
//! [`Notifier`] made once: the crate's `notify` opens a blocking socket per call, which a
//! manager that reads slowly would stall a runtime thread on, and it cannot reach an
//! abstract socket (`@name`, as container managers give).
//!
//! Without `NOTIFY_SOCKET` every call is a no-op, so the daemon behaves the same under any
//! supervisor, a container runtime or a terminal. A notification that cannot be sent is
//! logged and otherwise ignored: the daemon's work never depends on the service manager.
//!
//! The daemon says `READY=1` once replay and the boot writes are done (when `/readyz` turns
//! 200), `STOPPING=1` when a stop begins, and, when the manager asks for a watchdog
//! (`WATCHDOG_USEC`), `WATCHDOG=1` every half of that time, each only after the worker loop
//! answered a ping: a stuck loop stops the pings, and the manager restarts the daemon.

use std::fmt::Write as _;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// One line of a notification: `READY=1`, `STOPPING=1`, `WATCHDOG=1`, `STATUS=...`.
pub use sd_notify::NotifyState as State;

/// The datagram for `states`: one `KEY=VALUE` line each. A newline inside a status would
/// start a new assignment, so it becomes a space.
pub fn message(states: &[State<'_>]) -> String {
    let mut text = String::new();
    for state in states {
        let line = match state {
            State::Status(status) => format!("STATUS={}", status.replace('\n', " ")),
            other => other.to_string(),
        };
        let _ = writeln!(text, "{line}");
    }
    text
}

/// Where notifications go. Cloning shares the socket.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    /// `None` when the daemon is not run by a service manager that listens.
    target: Option<Arc<Target>>,
}

#[derive(Debug)]
struct Target {
    /// Unbound and non-blocking: a manager that does not read fast enough loses a
    /// notification rather than stalling the runtime thread that sends it.
    socket: UnixDatagram,
    address: SocketAddr,
    /// `NOTIFY_SOCKET` as given, for the log.
    name: String,
}

impl Notifier {
    /// A notifier for the process environment's `NOTIFY_SOCKET`; a no-op one when it is
    /// unset, empty or unusable (the last with a warning).
    pub fn from_env() -> Notifier {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::default();
        };
        let name = name.to_string_lossy().into_owned();
        if name.is_empty() {
            return Notifier::default();
        }
        match Notifier::connect(&name) {
            Ok(notifier) => notifier,
            Err(e) => {
                warn!(notify_socket = %name, error = %e, "cannot use NOTIFY_SOCKET; not notifying the service manager");
                Notifier::default()
            }
        }
    }

    /// A notifier for the socket `name`: an absolute path, or `@` and an abstract name.
    pub fn connect(name: &str) -> io::Result<Notifier> {
        let address = if let Some(abstract_name) = name.strip_prefix('@') {
            SocketAddr::from_abstract_name(abstract_name.as_bytes())?
        } else if name.starts_with('/') {
            SocketAddr::from_pathname(name)?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract name starting with @",
            ));
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            target: Some(Arc::new(Target {
                socket,
                address,
                name: name.to_string(),
            })),
        })
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification; a failure is logged, never returned.
    pub fn notify(&self, states: &[State<'_>]) {
        let Some(target) = &self.target else {
            return;
        };
        let text = message(states);
        if let Err(e) = target.socket.send_to_addr(text.as_bytes(), &target.address) {
            warn!(notify_socket = %target.name, error = %e, message = %text.trim_end().replace('\n', " "), "cannot notify the service manager");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.notify(&[State::Ready, State::Status(status)]);
    }

    /// A status line alone.
    pub fn status(&self, status: &str) {
        self.notify(&[State::Status(status)]);
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self) {
        self.notify(&[State::Stopping, State::Status("stopping")]);
    }
}

/// The watchdog timeout the service manager expects pings within, if it expects any:
/// `WATCHDOG_USEC`, honoured only while `WATCHDOG_PID` is unset or names this process (the
/// variables may have been inherited from a parent that was watched). 0 means none, as in
/// sd_watchdog_enabled(3): a ping every half of it would never rest.
pub fn watchdog_timeout_from_env() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|timeout| !timeout.is_zero())
}

/// Sends `WATCHDOG=1` every half `timeout`, each time only once `ping` has said the worker
/// loop is alive within a quarter of `timeout`, until `shutdown`. Two pings are then never
/// more than three quarters of `timeout` apart while the loop answers; once it stops
/// answering, the pings stop and the manager acts when `timeout` has passed since the last.
pub async fn watchdog<F, Fut>(
    notifier: Notifier,
    timeout: Duration,
    mut ping: F,
    shutdown: CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let period = timeout / 2;
    let patience = timeout / 4;
    let mut healthy = true;
    let mut next = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        next += period;
        let answered = tokio::select! {
            _ = shutdown.cancelled() => return,
            answered = tokio::time::timeout(patience, ping()) => matches!(answered, Ok(true)),
        };
        if answered {
            notifier.notify(&[State::Watchdog]);
            if !healthy {
                info!("the worker loop answers again; watchdog pings resumed");
            }
        } else if healthy {
            warn!(
                within = %humantime::format_duration(patience),
                "the worker loop did not answer a ping; withholding the watchdog ping"
            );
        }
        healthy = answered;
        // After a long stall, ping on the regular beat again rather than in a burst.
        let now = Instant::now();
        if next < now {
            next = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8(buf[..n].to_vec()).expect("text")
    }

    #[test]
    fn messages_are_key_value_lines() {
        assert_eq!(
            message(&[State::Ready, State::Status("ready: 3 jobs")]),
            "READY=1\nSTATUS=ready: 3 jobs\n"
        );
        assert_eq!(message(&[State::Watchdog]), "WATCHDOG=1\n");
        assert_eq!(
            message(&[State::Stopping, State::Status("stopping")]),
            "STOPPING=1\nSTATUS=stopping\n"
        );
        // A newline in a status must not smuggle in an assignment.
        assert_eq!(
            message(&[State::Status("a\nREADY=1")]),
            "STATUS=a READY=1\n"
        );
    }

    #[test]
    fn notifies_a_socket_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::connect(path.to_str().unwrap()).unwrap();
        assert!(notifier.is_enabled());
        notifier.ready("ready");
        assert_eq!(receive(&manager), "READY=1\nSTATUS=ready\n");
        notifier.stopping();
        assert_eq!(receive(&manager), "STOPPING=1\nSTATUS=stopping\n");
    }

    #[test]
    fn notifies_an_abstract_socket() {
        let name = format!(
            "training-worker-test-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        );
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let manager = UnixDatagram::bind_addr(&address).unwrap();
        let notifier = Notifier::connect(&format!("@{name}")).unwrap();
        notifier.notify(&[State::Watchdog]);
        assert_eq!(receive(&manager), "WATCHDOG=1\n");
    }

    #[test]
    fn a_relative_socket_name_is_refused_and_nothing_breaks() {
        assert!(Notifier::connect("notify.sock").is_err());
        let silent = Notifier::default();
        assert!(!silent.is_enabled());
        silent.ready("ready");
        silent.stopping();
    }

    #[test]
    fn a_socket_that_went_away_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::connect(path.to_str().unwrap()).unwrap();
        drop(manager);
        notifier.ready("ready");
    }

    /// Runs the watchdog for `run` with a ping that answers `alive`, and counts the
    /// `WATCHDOG=1` datagrams the manager got.
    async fn pings_in(run: Duration, timeout: Duration, alive: bool) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        manager.set_nonblocking(true).unwrap();
        let notifier = Notifier::connect(path.to_str().unwrap()).unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watchdog(
            notifier,
            timeout,
            move || async move {
                if !alive {
                    // A stuck worker loop: the answer never comes.
                    std::future::pending::<()>().await;
                }
                true
            },
            shutdown.clone(),
        ));
        tokio::time::sleep(run).await;
        shutdown.cancel();
        task.await.unwrap();
        let mut count = 0;
        let mut buf = [0u8; 64];
        while let Ok(n) = manager.recv(&mut buf) {
            assert_eq!(&buf[..n], b"WATCHDOG=1\n");
            count += 1;
        }
        count
    }

    #[tokio::test]
    async fn pings_every_half_timeout_while_the_loop_answers() {
        // At 0, 100, 200, ... ms for a 200 ms timeout: 8 in 750 ms, give or take the
        // scheduling of a busy machine (real time: tokio's test clock is not enabled). Fewer
        // than the 10 datagrams a Unix socket queues by default, so none is refused.
        let count = pings_in(Duration::from_millis(750), Duration::from_millis(200), true).await;
        assert!((4..=9).contains(&count), "{count} pings");
    }

    #[tokio::test]
    async fn a_stuck_loop_gets_no_ping() {
        let count = pings_in(
            Duration::from_millis(600),
            Duration::from_millis(200),
            false,
        )
        .await;
        assert_eq!(count, 0);
    }
}
