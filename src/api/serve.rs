//! The HTTP server: the API's router behind an accept loop of our own, so that no client can
//! hold the daemon's descriptors for long or take all of them.
//!
//! - A client must send a request's headers within `[api] header_read_timeout`, and an idle
//!   keep-alive connection is closed after as long (hyper's header read timer covers the
//!   wait for the next request too).
//! - At most [`Limits::max_connections`] are served at once. One more is answered `503` with
//!   `Connection: close` and closed, without ever reaching the router; at most a few such
//!   answers are in progress at once, and beyond them an excess connection is closed at once.
//! - The cap is kept below the descriptor limit ([`connection_cap`]), so that job files,
//!   logs and trainers always find descriptors however many clients connect.
//! - An accept that fails for want of descriptors or memory backs off instead of spinning,
//!   with one warning per episode.
//!
//! `close` ends it: the listener is closed, idle connections are closed, requests in progress
//! get [`DRAIN`] to finish.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::metrics::METRICS;

/// Descriptors kept out of the connections' reach: the store's files (a temporary file per
/// staging thread, the directories), each trainer's log and pipes, the docker CLI, the
/// lock, the listener, the runtime's own. Half the limit when the limit is below twice it.
pub const DESCRIPTOR_RESERVE: u64 = 64;

/// How long a request in progress may take to finish once the server closes.
pub const DRAIN: Duration = Duration::from_secs(5);

/// How long an accept waits after failing for want of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Refusals being answered at once, at most; see [`refusal_slots`].
const REFUSALS_AT_ONCE: usize = 16;

/// How long a refused connection is given to take its 503.
const REFUSAL_PATIENCE: Duration = Duration::from_secs(2);

/// What a refused connection is told.
const REFUSAL: &str = concat!(
    "HTTP/1.1 503 Service Unavailable\r\n",
    "content-type: application/json\r\n",
    "content-length: 67\r\n",
    "retry-after: 1\r\n",
    "connection: close\r\n",
    "\r\n",
    r#"{"error": "too many connections to the daemon; try again shortly"}"#,
    "\n",
);

/// What the server allows each connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_read_timeout: Duration,
    /// Already fitted to the descriptor limit ([`connection_cap`]).
    pub max_connections: usize,
}

/// The connection cap under a soft descriptor limit of `nofile`: `configured`, or less when
/// the limit less its reserve ([`DESCRIPTOR_RESERVE`], or half a small limit) leaves less.
/// At least 1, so that a daemon under any limit still answers.
pub fn connection_cap(configured: usize, nofile: u64) -> usize {
    let reserve = DESCRIPTOR_RESERVE.min(nofile / 2);
    let budget = nofile.saturating_sub(reserve);
    configured
        .min(usize::try_from(budget).unwrap_or(usize::MAX))
        .max(1)
}

/// Refusals answered at once under a cap of `max_connections`: at most 16, and a quarter of
/// a small cap, so that a flood of refusals cannot eat the descriptors kept for jobs.
fn refusal_slots(max_connections: usize) -> usize {
    REFUSALS_AT_ONCE.min(max_connections / 4).max(1)
}

/// Serves `router` on `listener` until `close` is cancelled, then closes the listener and
/// waits for the connections to end (idle ones at once, busy ones within [`DRAIN`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    close: CancellationToken,
) {
    METRICS.set_http_connections_max(limits.max_connections);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(refusal_slots(limits.max_connections)));
    let connections = TaskTracker::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // Whether the last accept failed for want of resources: logged once per episode.
    let mut starved = false;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = close.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok((stream, peer)) => {
                if starved {
                    starved = false;
                    info!("accepting connections again");
                }
                (stream, peer)
            }
            // A connection reset before it was accepted, and the like: that client's problem.
            Err(e) if is_client_error(&e) => {
                debug!(error = %e, "accept failed");
                continue;
            }
            Err(e) => {
                if !starved {
                    starved = true;
                    warn!(error = %e, max_connections = limits.max_connections, "cannot accept connections; backing off");
                }
                // Out of descriptors or memory, most likely. The waiting connections stay in
                // the backlog; retrying at once would only take the CPU the rest of the
                // daemon needs to free them.
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    _ = close.cancelled() => break,
                }
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            METRICS.http_connections_refused.inc();
            match refusals.clone().try_acquire_owned() {
                Ok(permit) => {
                    connections.spawn(refuse(stream, permit));
                }
                // Dropping the stream closes it: the client sees a reset, not a hang.
                Err(_) => drop(stream),
            }
            continue;
        };
        // Small JSON answers; waiting to coalesce them only adds latency.
        let _ = stream.set_nodelay(true);
        // Each request carries its client's address, as `ConnectInfo` (an allowlist reads
        // it).
        let service = tower::ServiceExt::map_request(
            router.clone(),
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                request
            },
        );
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let close = close.clone();
        connections.spawn(async move {
            let _open = Open::new(slot);
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = close.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    match tokio::time::timeout(DRAIN, connection.as_mut()).await {
                        Ok(ended) => ended,
                        Err(_) => {
                            debug!("a request did not finish within the drain time; closing");
                            Ok(())
                        }
                    }
                }
            };
            // Timeouts, resets and malformed requests: the client's doing, not an operator's.
            if let Err(e) = ended {
                debug!(error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// An open connection, counted in the gauge while it holds its slot.
struct Open {
    _slot: OwnedSemaphorePermit,
}

impl Open {
    fn new(slot: OwnedSemaphorePermit) -> Open {
        METRICS.http_connection_opened();
        Open { _slot: slot }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        METRICS.http_connection_closed();
    }
}

/// Answers 503 and closes. What the client sends is read and thrown away until it closes
/// (or briefly): closing a socket with unread data in it resets the connection, and the
/// client could lose the answer before reading it.
async fn refuse(mut stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let answered = tokio::time::timeout(REFUSAL_PATIENCE, async {
        stream.write_all(REFUSAL.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut read = 0usize;
        // A client may send its whole request, but not more than a refusal is worth.
        while read < 64 * 1024 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        std::io::Result::Ok(())
    })
    .await;
    if let Ok(Err(e)) = answered {
        debug!(error = %e, "refused connection ended");
    }
}

/// Errors of accept(2) that belong to the one connection it was taking (accept(2) passes
/// pending network errors on), so the next accept may go on at once. Anything else (out of
/// descriptors: EMFILE, ENFILE; out of memory: ENOBUFS, ENOMEM) would fail again at once.
fn is_client_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EINTR
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENONET
                | libc::ENOPROTOOPT
                | libc::EOPNOTSUPP
                | libc::ETIMEDOUT
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_the_reserve_to_the_rest_of_the_daemon() {
        // The usual limits: the configured cap fits.
        assert_eq!(connection_cap(512, 1024 * 1024), 512);
        assert_eq!(connection_cap(512, 4096), 512);
        // A shell's 1024: still fits with the reserve.
        assert_eq!(connection_cap(512, 1024), 512);
        assert_eq!(connection_cap(2000, 1024), 1024 - 64);
        // Small limits keep half for everything else.
        assert_eq!(connection_cap(512, 128), 64);
        assert_eq!(connection_cap(512, 64), 32);
        assert_eq!(connection_cap(512, 1), 1);
        assert_eq!(connection_cap(512, 0), 1);
    }

    #[test]
    fn only_a_connection_s_own_errors_are_retried_at_once() {
        let os = std::io::Error::from_raw_os_error;
        assert!(is_client_error(&os(libc::ECONNABORTED)));
        for shortage in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(!is_client_error(&os(shortage)), "{shortage}");
        }
    }

    #[test]
    fn refusals_take_a_small_share() {
        assert_eq!(refusal_slots(512), 16);
        assert_eq!(refusal_slots(32), 8);
        assert_eq!(refusal_slots(1), 1);
    }

    #[test]
    fn the_refusal_is_a_complete_http_answer() {
        let (head, body) = REFUSAL.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .expect("a content-length")
            .parse()
            .expect("a number");
        assert_eq!(length, body.len());
        let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert!(json["error"].is_string());
    }
}
