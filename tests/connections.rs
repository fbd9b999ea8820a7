//! Slow, idle and too many clients against the real daemon, over raw TCP on loopback: the
//! header read timeout, the connection cap and its 503, the descriptor limit raised at start,
//! and the descriptors kept for job files and trainers however many clients connect.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::{Sandbox, Settings, diffusion_job, wait_until, wait_until_or_timeout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Long enough to mean "it hangs", on any machine.
const HANG: Duration = Duration::from_secs(20);

/// Writes the default settings plus an `[api]` table with `api`.
fn configure(sandbox: &Sandbox, api: &str) {
    sandbox.configure(&Settings::default());
    let config = std::fs::read_to_string(sandbox.config_file()).expect("the config");
    sandbox.write_config(&format!("{config}\n[api]\n{api}\n"));
}

/// Reads until the peer closes (EOF or reset); what it sent before. Panics after `within`.
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the daemon did not close the connection within {within:?}; it sent {:?}",
        String::from_utf8_lossy(&got)
    );
    got
}

/// One HTTP/1.1 answer: status, head, body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// Reads one answer (with a `content-length`) from `stream`.
async fn read_answer(stream: &mut TcpStream) -> Answer {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(HANG, async {
        loop {
            if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&bytes[..end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .expect("a content-length");
                if bytes.len() >= end + 4 + length {
                    let body = String::from_utf8_lossy(&bytes[end + 4..end + 4 + length]);
                    let status = head[9..12].parse().expect("a status code");
                    return Answer {
                        status,
                        head,
                        body: body.to_string(),
                    };
                }
            }
            let n = stream.read(&mut buf).await.expect("read an answer");
            assert!(
                n > 0,
                "closed mid-answer: {:?}",
                String::from_utf8_lossy(&bytes)
            );
            bytes.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    read.unwrap_or_else(|_| panic!("no answer within {HANG:?}"))
}

/// Sends a request on a kept-alive connection and reads its answer.
async fn ask(stream: &mut TcpStream, method: &str, path: &str, body: Option<&Value>) -> Answer {
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send a request");
    read_answer(stream).await
}

async fn connect(address: SocketAddr) -> TcpStream {
    TcpStream::connect(address).await.expect("connect")
}

/// A sample of `/metrics`, asked on `stream`, whatever its labels (every sample has the
/// node's).
async fn metric(stream: &mut TcpStream, name: &str) -> f64 {
    let answer = ask(stream, "GET", "/metrics", None).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer
        .body
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            match rest.strip_prefix('{') {
                Some(labelled) => Some(labelled.split_once("} ")?.1),
                None => rest.strip_prefix(' '),
            }
        })
        .unwrap_or_else(|| panic!("no {name} in\n{}", answer.body))
        .parse()
        .expect("a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalled_in_its_headers_or_silent_is_disconnected_after_the_timeout() {
    let sandbox = Sandbox::new();
    configure(&sandbox, "header_read_timeout = \"1s\"");
    let daemon = sandbox.start().await;
    let address = daemon.address();

    let mut half = connect(address).await;
    half.write_all(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Ty")
        .await
        .expect("send half the headers");
    let mut silent = connect(address).await;
    // A kept-alive connection that has had its answer and then says nothing more.
    let mut idle = connect(address).await;
    assert_eq!(ask(&mut idle, "GET", "/healthz", None).await.status, 200);

    for (what, stream) in [
        ("half the headers", &mut half),
        ("nothing", &mut silent),
        ("nothing after a request", &mut idle),
    ] {
        let sent = read_to_close(stream, HANG).await;
        // Closed, and never with a request that reached the API.
        let text = String::from_utf8_lossy(&sent);
        assert!(
            !text.contains("201") && !text.contains("job_id"),
            "{what}: {text}"
        );
    }
    assert_eq!(daemon.healthz().await, reqwest::StatusCode::OK);
    assert!(std::fs::read_dir(sandbox.jobs_dir()).is_ok_and(|mut d| d.next().is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_one_more_gets_503_and_service_returns_once_they_close() {
    let sandbox = Sandbox::new();
    configure(
        &sandbox,
        "max_connections = 4\nheader_read_timeout = \"60s\"",
    );
    let daemon = sandbox.start().await;
    let address = daemon.address();

    // The first keeps its connection to watch the metrics; idle ones fill the rest (the
    // sandbox's own client may keep one open too).
    let mut watcher = connect(address).await;
    assert_eq!(
        metric(&mut watcher, "training_worker_http_connections_max").await,
        4.0
    );
    let open = metric(&mut watcher, "training_worker_http_connections_open").await as usize;
    let mut idle = Vec::new();
    for _ in open..4 {
        idle.push(connect(address).await);
    }
    wait_until("the daemon holds the 4 connections", HANG, async || {
        let open = metric(&mut watcher, "training_worker_http_connections_open").await;
        (open == 4.0).then_some(())
    })
    .await;

    // One more: answered 503 and closed at once, never left hanging.
    let mut extra = connect(address).await;
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send a request");
    let answer = String::from_utf8_lossy(&read_to_close(&mut extra, HANG).await).to_string();
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(answer.contains("too many connections"), "{answer}");
    assert_eq!(
        metric(
            &mut watcher,
            "training_worker_http_connections_refused_total"
        )
        .await,
        1.0
    );

    // Once the idle clients go, a submission is served again.
    drop(idle);
    drop(watcher);
    wait_until("a request is served again", HANG, async || {
        daemon
            .get("/healthz")
            .await
            .status
            .is_success()
            .then_some(())
    })
    .await;
    let id = daemon.submit(diffusion_job("ok")).await;
    daemon.wait_status(&id, "Completed", HANG).await;
}

/// Soft and hard descriptor limits of a process, from `/proc/<pid>/limits`.
fn nofile_limits(pid: i32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_soft_descriptor_limit_is_raised_to_the_hard_limit_at_start() {
    let sandbox = Sandbox::new();
    sandbox.set_nofile_limit(64, 1024);
    let daemon = sandbox.start().await;
    assert_eq!(nofile_limits(daemon.pid()), (1024, 1024));
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("raised the descriptor limit") && stderr.contains("from=64"),
        "{stderr}"
    );
    // A trainer gets the limit the daemon was given, not the raised one.
    let id = daemon.submit(diffusion_job("sleep:30")).await;
    let trainer = sandbox.trainer_started(&id, 1).await;
    assert_eq!(nofile_limits(trainer), (64, 1024));
    let reply = daemon.cancel(&id).await;
    assert_eq!(reply.status, reqwest::StatusCode::OK, "{reply:?}");
}

/// With the hard limit itself tight, many idle clients take every connection the cap allows
/// and more; the descriptors kept in reserve still let a submission be stored and its trainer
/// run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_under_a_tight_descriptor_limit_cannot_starve_jobs() {
    const NOFILE: u64 = 128;
    const IDLE: usize = 150;
    let sandbox = Sandbox::new();
    sandbox.set_nofile_limit(NOFILE, NOFILE);
    configure(&sandbox, "header_read_timeout = \"60s\"");
    let daemon = sandbox.start().await;
    let address = daemon.address();
    let mut client = connect(address).await;
    let cap = metric(&mut client, "training_worker_http_connections_max").await;
    assert!(
        cap >= 1.0 && cap < NOFILE as f64,
        "cap {cap} under a limit of {NOFILE}"
    );
    assert!(
        daemon.stderr().contains("api.max_connections lowered"),
        "{}",
        daemon.stderr()
    );

    // This client, and the sandbox's own if it keeps one open.
    let before = metric(&mut client, "training_worker_http_connections_open").await;
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(connect(address).await);
    }
    // Every idle client is either held or turned away. Without a cap, this never holds:
    // the accepts stop at the descriptor limit; the submission below tells what that costs.
    let all = before + IDLE as f64;
    let settled = wait_until_or_timeout(HANG, async || {
        let open = metric(&mut client, "training_worker_http_connections_open").await;
        let refused = metric(
            &mut client,
            "training_worker_http_connections_refused_total",
        )
        .await;
        (open + refused == all).then_some((open, refused))
    })
    .await;

    let answer = ask(&mut client, "POST", "/v1/jobs", Some(&diffusion_job("ok"))).await;
    assert_eq!(answer.status, 201, "{}: {}", answer.head, answer.body);
    let job: Value = serde_json::from_str(&answer.body).expect("a job");
    let id = job["job_id"].as_str().expect("an id").to_string();
    sandbox.trainer_started(&id, 1).await;
    wait_until("the job completes", HANG, async || {
        let answer = ask(&mut client, "GET", &format!("/v1/jobs/{id}"), None).await;
        let job: Value = serde_json::from_str(&answer.body).expect("a job");
        (job["status"] == "Completed").then_some(())
    })
    .await;

    let (open, refused) = settled.expect("the daemon held or refused every idle client");
    assert_eq!(open, cap, "the cap is full");
    assert_eq!(refused, all - cap);
    // A client turned away was told so, or closed; none is left hanging.
    let last = idle.last_mut().expect("idle clients");
    let told = String::from_utf8_lossy(&read_to_close(last, HANG).await).to_string();
    assert!(
        told.is_empty() || told.starts_with("HTTP/1.1 503 "),
        "{told}"
    );
}
