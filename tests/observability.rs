//! What an operator sees of a running daemon: `GET /metrics` scraped as Prometheus would,
//! and the daemon's own log lines (`log_format = "json"`, `RUST_LOG`), including the boot
//! summary and the progress of a long replay.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

use std::collections::HashMap;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Sandbox, Settings, diffusion_job, secs, text_job, wait_until};

/// A sample's `name{labels}` without its first label, the node's: `(key, node)`.
fn without_node(key: &str) -> (String, String) {
    let (name, labels) = key
        .split_once("{node=\"")
        .unwrap_or_else(|| panic!("no node label first: {key}"));
    let (node, rest) = labels.split_once('"').expect("a quoted node");
    let key = match rest.strip_prefix(',') {
        Some(rest) => format!("{name}{{{rest}"),
        None => name.to_string(),
    };
    (key, node.to_string())
}

/// Parses the Prometheus text format into `name{labels}` -> value, and checks that every
/// sample belongs to a family announced with `# TYPE` (and `# HELP`), and names the node
/// first, one node for the whole scrape. The keys leave the node out.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    parse_metrics_of_node(text).0
}

/// [`parse_metrics`], and the node every sample names.
fn parse_metrics_of_node(text: &str) -> (HashMap<String, f64>, String) {
    let mut nodes = std::collections::BTreeSet::new();
    let mut families: Vec<(String, String)> = Vec::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().expect("a family name").to_string();
            let kind = parts.next().expect("a family type").to_string();
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind.as_str()),
                "{line}"
            );
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}"
            );
            families.push((name, kind));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect("a sample is `name value`");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let base = key.split('{').next().expect("a name");
        let known = families.iter().any(|(name, kind)| {
            base == name
                || (kind == "histogram"
                    && [
                        format!("{name}_bucket"),
                        format!("{name}_sum"),
                        format!("{name}_count"),
                    ]
                    .contains(&base.to_string()))
        });
        assert!(known, "sample of an unannounced family: {line}");
        assert!(base.starts_with("training_worker_"), "{line}");
        let (key, node) = without_node(key);
        nodes.insert(node);
        samples.insert(key, value);
    }
    assert_eq!(nodes.len(), 1, "one node names every sample: {nodes:?}");
    (samples, nodes.pop_first().expect("one node"))
}

/// The families of an exposition as Prometheus stores them: `name type labels [bounds]` per
/// family, sorted, the way `tests/fixtures/metrics-families.txt` lists them. A counter's name
/// is its samples' name (with `_total`, which OpenMetrics leaves out of the `# TYPE` line); a
/// histogram's `le` values are its bounds, in order, as written.
fn families(text: &str) -> Vec<String> {
    let mut kinds: Vec<(String, String)> = Vec::new();
    let mut labels: HashMap<String, Vec<String>> = HashMap::new();
    let mut bounds: HashMap<String, Vec<String>> = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("`# TYPE name type`");
            let name = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            kinds.push((name, kind.to_string()));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let key = line.rsplit_once(' ').expect("a sample is `name value`").0;
        let (base, label_text) = key.split_once('{').unwrap_or((key, ""));
        let family = kinds
            .iter()
            .rev()
            .find(|(name, kind)| {
                base == name
                    || (kind == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|suffix| base == format!("{name}{suffix}")))
            })
            .unwrap_or_else(|| panic!("sample of an unannounced family: {line}"));
        let names = labels.entry(family.0.clone()).or_default();
        for pair in label_text.trim_end_matches('}').split(',') {
            let Some((label, value)) = pair.split_once('=') else {
                continue;
            };
            if label == "le" {
                let bound = value.trim_matches('"').to_string();
                bounds.entry(family.0.clone()).or_default().push(bound);
            } else if !names.iter().any(|n| n == label) {
                names.push(label.to_string());
            }
        }
    }
    let mut lines: Vec<String> = kinds
        .iter()
        .map(|(name, kind)| {
            let mut names = labels.get(name).cloned().unwrap_or_default();
            names.sort();
            let names = if names.is_empty() {
                "-".to_string()
            } else {
                names.join(",")
            };
            match bounds.get(name) {
                Some(bounds) => format!("{name} {kind} {names} {}", bounds.join(",")),
                None => format!("{name} {kind} {names}"),
            }
        })
        .collect();
    lines.sort();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_names_types_and_labels_stay_those_dashboards_read() {
    let expected = include_str!("fixtures/metrics-families.txt");
    let mut expected: Vec<String> = expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    expected.sort();
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings::default());
    let daemon = sandbox.start().await;
    let reply = daemon.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(families(&reply.text), expected, "{}", reply.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sample_names_the_node_that_counted_it() {
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings::default());
    sandbox.set_env("TRAINING_WORKER_NODE_ID", "gpu-box-7");
    let daemon = sandbox.start().await;
    let reply = daemon.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let (samples, node) = parse_metrics_of_node(&reply.text);
    assert_eq!(node, "gpu-box-7", "{}", reply.text);
    assert_eq!(samples["training_worker_jobs{status=\"queued\"}"], 0.0);
    // The same name as the node's in GET /v1/nodes (with the database, once its first
    // heartbeat has written its row).
    wait_until("the node is listed", secs(10), async || {
        let nodes = daemon.get("/v1/nodes").await.json();
        (nodes["nodes"][0]["id"] == "gpu-box-7").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings::default());
    let daemon = sandbox.start().await;

    // The first job holds the only slot until released, so that the last one can be
    // cancelled while it is surely still queued.
    let first = uuid::Uuid::new_v4().to_string();
    sandbox.hold(&first);
    let mut body = diffusion_job("ok");
    body["job_id"] = first.clone().into();
    daemon.submit(body).await;
    let ok = daemon.submit(diffusion_job("ok")).await;
    let failing = daemon.submit(diffusion_job("fail:3")).await;
    let never = daemon.submit(diffusion_job("ok")).await;
    let cancelled = daemon.cancel(&never).await;
    assert_eq!(cancelled.status, StatusCode::OK, "{cancelled:?}");
    sandbox.release(&first);
    for id in [&first, &ok, &failing] {
        wait_until(format!("{id} finishes"), secs(20), async || {
            let job = daemon.job(id).await;
            let status = job["status"].as_str().unwrap_or("").to_string();
            (status == "Completed" || status == "Failed").then_some(())
        })
        .await;
    }

    let reply = daemon.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let m = parse_metrics(&reply.text);
    let get = |key: &str| {
        *m.get(key)
            .unwrap_or_else(|| panic!("no sample {key}:\n{}", reply.text))
    };
    assert_eq!(get("training_worker_jobs_enqueued_total"), 4.0);
    assert_eq!(get("training_worker_jobs_started_total"), 3.0);
    assert_eq!(get("training_worker_jobs_completed_total"), 2.0);
    assert_eq!(get("training_worker_jobs_failed_total"), 1.0);
    assert_eq!(get("training_worker_jobs_cancelled_total"), 1.0);
    assert_eq!(get("training_worker_jobs{status=\"completed\"}"), 2.0);
    assert_eq!(get("training_worker_jobs{status=\"failed\"}"), 1.0);
    assert_eq!(get("training_worker_jobs{status=\"cancelled\"}"), 1.0);
    assert_eq!(get("training_worker_jobs{status=\"queued\"}"), 0.0);
    assert_eq!(get("training_worker_jobs{status=\"running\"}"), 0.0);
    assert_eq!(get("training_worker_queue_wait_seconds_count"), 3.0);
    assert_eq!(get("training_worker_run_seconds_count"), 3.0);
    assert_eq!(
        get("training_worker_run_seconds_bucket{le=\"+Inf\"}"),
        get("training_worker_run_seconds_count")
    );
    // Every record written went through a batch: 4 arrivals, 3 starts, 3 ends, 1 cancel.
    assert!(
        get("training_worker_store_batch_jobs_sum") >= 11.0,
        "{}",
        reply.text
    );
    assert!(get("training_worker_store_flush_seconds_count") >= 1.0);
    assert!(get("training_worker_replay_seconds") >= 0.0);
    assert_eq!(get("training_worker_jobs_recovered_total"), 0.0);
    assert_eq!(get("training_worker_quarantined_files_total"), 0.0);
    let content_type = reqwest::get(format!("{}/metrics", daemon_base(&daemon)))
        .await
        .expect("scrape")
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );

    // After a crash: the boot's recovery shows, and the gauges start from the files.
    daemon.kill();
    // A damaged job file is the file store's own kind of damage.
    let damaged = !support::postgres_store();
    if damaged {
        sandbox.write_data_file("jobs/not-a-job.json", b"{");
    }
    sandbox.configure(&Settings {
        max_concurrent: 0,
        ..Settings::default()
    });
    let daemon = sandbox.start().await;
    let queued = daemon.submit(diffusion_job("ok")).await;
    let m = parse_metrics(&daemon.get("/metrics").await.text);
    assert_eq!(
        m["training_worker_quarantined_files_total"],
        f64::from(u8::from(damaged))
    );
    assert_eq!(m["training_worker_jobs{status=\"completed\"}"], 2.0);
    assert_eq!(m["training_worker_jobs{status=\"failed\"}"], 1.0);
    assert_eq!(m["training_worker_jobs{status=\"cancelled\"}"], 1.0);
    assert_eq!(
        m["training_worker_jobs{status=\"queued\"}"], 1.0,
        "{queued}"
    );
    assert_eq!(m["training_worker_jobs_enqueued_total"], 1.0);
}

fn daemon_base(daemon: &support::Daemon) -> String {
    // The stderr names the address it listens on.
    let stderr = daemon.stderr();
    let address = stderr
        .lines()
        .find(|l| l.contains("listening"))
        .and_then(|l| l.split("address=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the listening line names the address");
    format!("http://{address}")
}

/// The JSON log lines of a daemon's stderr.
fn json_lines(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_misses_offers_and_reservations_are_counted() {
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings::default());
    let daemon = sandbox.start().await;

    // The only slot is taken by a job without a budget, taken to run for an hour.
    let first = uuid::Uuid::new_v4().to_string();
    sandbox.hold(&first);
    let mut body = diffusion_job("ok");
    body["job_id"] = first.clone().into();
    daemon.submit(body).await;
    daemon.wait_status(&first, "Running", secs(15)).await;

    // Refused: a third of a second cannot wait an hour. Accepted: two hours can, and its
    // place is reserved until the job comes and claims it.
    let offer =
        |hours: f64| json!({"type": "TextJob", "model": "org/model", "hours_to_complete": hours});
    let refused = daemon.post("/v1/offers", &offer(0.0001)).await.json();
    assert_eq!(refused["accepted"], false, "{refused}");
    let accepted = daemon.post("/v1/offers", &offer(2.0)).await.json();
    assert_eq!(accepted["accepted"], true, "{accepted}");
    let mut claiming = text_job("ok");
    claiming["model"] = json!("org/model");
    claiming["hours_to_complete"] = json!(2.0);
    let claimed = daemon.submit(claiming).await;

    // One second of budget, spent in the queue.
    let mut late = diffusion_job("ok");
    late["hours_to_complete"] = json!(1.0 / 3600.0);
    let late = daemon.submit(late).await;
    let deadline = daemon.job(&late).await["deadline"]
        .as_str()
        .expect("a deadline")
        .to_string();
    wait_until("the late job's deadline has passed", secs(10), async || {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        (now > deadline).then_some(())
    })
    .await;
    sandbox.release(&first);
    daemon.wait_status(&claimed, "Completed", secs(20)).await;
    daemon.wait_status(&late, "Failed", secs(20)).await;

    let m = parse_metrics(&daemon.get("/metrics").await.text);
    assert_eq!(
        m["training_worker_deadline_misses_total{phase=\"queued\"}"],
        1.0
    );
    assert_eq!(
        m["training_worker_deadline_misses_total{phase=\"running\"}"],
        0.0
    );
    assert_eq!(m["training_worker_offers_total{accepted=\"true\"}"], 1.0);
    assert_eq!(m["training_worker_offers_total{accepted=\"false\"}"], 1.0);
    assert_eq!(
        m["training_worker_reservations_total{outcome=\"claimed\"}"],
        1.0
    );
    assert_eq!(
        m["training_worker_reservations_total{outcome=\"expired\"}"],
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_the_job_on_every_line_of_its_life() {
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings::default());
    let config = std::fs::read_to_string(sandbox.config_file()).expect("config");
    sandbox.write_config(&format!("log_format = \"json\"\n{config}"));
    let daemon = sandbox.start().await;
    let id = daemon.submit(diffusion_job("fail:2")).await;
    wait_until("the job fails", secs(20), async || {
        (daemon.job(&id).await["status"] == "Failed").then_some(())
    })
    .await;
    let stderr = daemon.stderr();
    let (status, _) = daemon.terminate(secs(15)).await;
    assert_eq!(status.code(), Some(0));
    let lines = json_lines(&stderr);
    let ready = lines
        .iter()
        .find(|l| l["message"] == "ready")
        .unwrap_or_else(|| panic!("no boot summary in\n{stderr}"));
    for field in ["jobs", "requeued", "interrupted", "quarantined", "took_ms"] {
        assert!(
            ready.get(field).is_some(),
            "boot summary lacks {field}: {ready}"
        );
    }
    // Every line about the job's life carries its id as a field.
    let about_job: Vec<&Value> = lines
        .iter()
        .filter(|l| l.to_string().contains(&id))
        .collect();
    let messages: Vec<&str> = about_job
        .iter()
        .filter_map(|l| l["message"].as_str())
        .collect();
    for expected in [
        "job queued",
        "job started",
        "trainer started",
        "trainer ended",
        "job failed",
    ] {
        assert!(
            messages.contains(&expected),
            "{expected:?} not among {messages:?}"
        );
    }
    for line in &about_job {
        assert_eq!(line["job_id"], id.as_str(), "{line}");
        assert!(
            line["level"].is_string() && line["timestamp"].is_string(),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_sets_the_level_and_a_long_replay_reports_progress() {
    if support::not_for_this_store("rust_log_sets_the_level_and_a_long_replay_reports_progress") {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings {
        max_concurrent: 0,
        ..Settings::default()
    });
    // 25,000 finished jobs: enough for the replay to report its progress.
    let template = support::SEED_JOB.replace("\"Running\"", "\"Completed\"");
    for n in 0..25_000u128 {
        let id = uuid::Uuid::from_u128(0xabc0_0000 + n).to_string();
        let body = template.replace(support::SEED_ID, &id);
        sandbox.write_data_file(&format!("jobs/{id}.json"), body.as_bytes());
    }
    let daemon = sandbox.start().await;
    let stderr = daemon.stderr();
    let progress = stderr
        .lines()
        .filter(|l| l.contains("replaying job files"))
        .count();
    assert!(progress >= 2, "no replay progress in\n{stderr}");
    assert!(
        stderr.contains("read=10000") && stderr.contains("total=25000"),
        "{stderr}"
    );
    let summary = stderr
        .lines()
        .find(|l| l.contains(" ready "))
        .expect("summary");
    assert!(summary.contains("jobs=25000"), "{summary}");
    daemon.kill();

    // RUST_LOG=warn: a normal boot says nothing at all.
    let config = std::fs::read_to_string(sandbox.config_file()).expect("config");
    sandbox.write_config(&config);
    let quiet = std::process::Command::new(env!("CARGO_BIN_EXE_training-worker"))
        .args(["serve", "--config"])
        .arg(sandbox.config_file())
        .arg("--data-dir")
        .arg(sandbox.path().join("other-data"))
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the daemon");
    let pid = quiet.id() as i32;
    // Ready is announced at info; give it until the data dir's queue.json exists, then stop.
    let queue_file = sandbox.path().join("other-data").join("queue.json");
    wait_until("the quiet daemon boots", secs(20), async || {
        queue_file.exists().then_some(())
    })
    .await;
    // SAFETY: kill only sends a signal to our own child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let output = quiet.wait_with_output().expect("wait for the daemon");
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        !text.contains("INFO"),
        "RUST_LOG=warn still logged info:\n{text}"
    );
}

/// Colour codes belong on a terminal only: in a file (a journal, `2> log`, a pipe) they are
/// escape bytes that break grep and log shippers. The test's stderr is a file, and NO_COLOR
/// is not set, so only the daemon's own choice keeps them out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_text_log_has_no_colour_codes_when_stderr_is_not_a_terminal() {
    let sandbox = Sandbox::new();
    sandbox.remove_env_prefix("NO_COLOR");
    let daemon = sandbox.start().await;
    // Lines at several levels, with fields: what the formatter would colour.
    let id = daemon.submit(diffusion_job("fail:2")).await;
    daemon.wait_status(&id, "Failed", secs(20)).await;
    let (status, _) = daemon.terminate(secs(15)).await;
    assert_eq!(status.code(), Some(0));
    let log = std::fs::read(sandbox.path().join("daemon-1.stderr")).expect("the daemon's stderr");
    let text = String::from_utf8_lossy(&log);
    assert!(text.contains("job failed"), "{text}");
    assert!(
        !log.contains(&0x1b),
        "an ESC byte in a log written to a file:\n{text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_whose_stderr_was_closed_still_stops_gracefully_on_sigterm() {
    let sandbox = Sandbox::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_training-worker"))
        .arg("serve")
        .arg("--config")
        .arg(sandbox.config_file())
        .arg("--data-dir")
        .arg(sandbox.data_dir())
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the daemon");
    let client = reqwest::Client::new();
    wait_until("the daemon is ready", secs(20), async || {
        let reply = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .ok()?;
        (reply.status() == StatusCode::OK).then_some(())
    })
    .await;
    // The reader goes away, as when `serve 2>&1 | head` has printed its lines.
    drop(daemon.stderr.take());
    let pid = daemon.id().expect("a pid") as i32;
    // SAFETY: kill only sends a signal to our own child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = tokio::time::timeout(secs(20), daemon.wait())
        .await
        .expect("the daemon stops within its shutdown grace")
        .expect("its status");
    assert_eq!(status.code(), Some(0), "{status:?}");
}
