//! Storage faults (CONTRACT.md 6): the real daemon on a data dir that runs out of space,
//! returns I/O errors, fails an fsync, or turns read-only, with real HTTP on loopback.
//!
//! What must hold: a write that fails is never acknowledged (503 with `{"error": ...}`), leaves
//! no trace of the job (no job, no file, no temporary file), reads keep working, the daemon
//! stays up and accepts writes again once the fault clears; a trainer's outcome that cannot be
//! recorded leaves the job Running until it can be (retried every second); a failed fsync is
//! not retried: the daemon exits 74 and a restart replays everything acknowledged before; a
//! data dir that cannot be written at boot makes the daemon exit 74 with a one-line error.
//!
//! Faults come from a small tmpfs (`size=512k`) filled up by a filler file, a read-only bind
//! mount of the data dir over itself, and strace attached to the running daemon injecting an
//! error into the system calls on one file (`-P`; strace injects only into traced calls, so
//! each filter traces the call it injects into). Mounts need root: those tests print why they
//! skip when not root or when mount fails (they run as root in CI). strace must be installed
//! (.ci/run installs it); without it the strace tests fail and say so. Every mount is undone
//! when its guard drops, also when a test fails.

#[path = "e2e_support/mod.rs"]
#[allow(dead_code)]
mod support;

#[path = "fault_support/mod.rs"]
#[allow(dead_code)]
mod fault_support;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use fault_support::{
    Config, EXIT_STORAGE, Mount, Strace, TestDaemon, assert_check_passes, describe_data_dir,
    is_root, job_file_names, leftovers, read_job_file, read_queue_file, report, write_config,
};
use support::{Reply, Sandbox, secs, wait_until};

/// Ids the tests submit under, so that they can name a job's files before it exists.
fn id(n: u32) -> String {
    format!("5709a9e0-0000-4000-8000-{n:012x}")
}

fn job_body(id: &str, model: &str) -> Value {
    json!({"type": "DiffusionJob", "job_id": id, "model": model, "dataset_zip": "images.zip"})
}

/// Prints why a test does not run here (past the harness's capture, so that it shows).
fn skip(test: &str, why: &str) {
    report(&format!("SKIPPED {test}: {why}"));
}

/// Root, or a printed reason to skip.
fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    skip(test, "needs root to mount (it runs as root in CI)");
    false
}

/// A sandbox whose config runs the stub trainer, `max_concurrent` at once.
fn sandbox_with(max_concurrent: usize) -> (Sandbox, PathBuf) {
    let sandbox = Sandbox::new();
    let config = sandbox.path().join("daemon.toml");
    write_config(&config, &Config::stub(max_concurrent));
    (sandbox, config)
}

/// Like [`sandbox_with`], with the data dir made and named as the daemon resolves it (strace
/// matches the paths it is given to the daemon's).
fn sandbox_with_data_dir(max_concurrent: usize) -> (Sandbox, PathBuf, PathBuf) {
    let (sandbox, config) = sandbox_with(max_concurrent);
    fs::create_dir_all(sandbox.data_dir()).expect("create the data dir");
    let data = fs::canonicalize(sandbox.data_dir()).expect("the data dir");
    (sandbox, config, data)
}

/// A tmpfs of `size` mounted on `target`, or `None` once the test is reported skipped.
fn tmpfs_or_skip(test: &str, target: &Path, size: &str) -> Option<Mount> {
    Mount::tmpfs(target, size)
        .map_err(|e| skip(test, &format!("cannot mount a tmpfs: {e}")))
        .ok()
}

/// A sandbox as [`sandbox_with`] makes it, its data dir a 512 KiB tmpfs (the mount is last,
/// so that it is undone first); `None` once the test is reported skipped.
fn small_disk_sandbox(
    test: &str,
    max_concurrent: usize,
) -> Option<(Sandbox, PathBuf, PathBuf, Mount)> {
    if !root_or_skip(test) {
        return None;
    }
    let (sandbox, config) = sandbox_with(max_concurrent);
    let data = sandbox.data_dir();
    let mount = tmpfs_or_skip(test, &data, "512k")?;
    Some((sandbox, config, data, mount))
}

/// `dir` bind-mounted read-only over itself, or `None` once the test is reported skipped.
fn read_only_or_skip(test: &str, dir: &Path) -> Option<Mount> {
    Mount::bind_read_only(dir)
        .map_err(|e| skip(test, &format!("cannot make a read-only bind mount: {e}")))
        .ok()
}

async fn submit(d: &TestDaemon, id: &str, model: &str) {
    let reply = d.post_job(&job_body(id, model)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "submit {id}: {reply:?}");
    assert_eq!(reply.json()["status"], "Queued", "{reply:?}");
}

/// A refusal as the contract has it: 503 and a JSON `error` that says what went wrong.
fn assert_refused(reply: &Reply, what: &str) {
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{what}: expected 503, got {reply:?}"
    );
    let body = reply.json();
    let error = body["error"].as_str().unwrap_or_else(|| {
        panic!("{what}: a refusal is {{\"error\": ...}}, got {body}");
    });
    assert!(
        error.contains("storage"),
        "{what}: the error should say that storage failed: {error:?}"
    );
}

/// Job `id` is nowhere: not known to the daemon, no job file, no temporary file.
async fn assert_no_trace(d: &TestDaemon, data: &Path, id: &str) {
    assert!(d.job(id).await.is_none(), "refused job {id} exists");
    let names = job_file_names(data);
    assert!(
        !names.iter().any(|n| n.contains(id)),
        "refused job {id} left files: {names:?}"
    );
    let (running, queued) = d.queue().await;
    assert!(
        !running.iter().chain(&queued).any(|q| q == id),
        "refused job {id} is in the queue"
    );
}

/// Three rounds of submitting each of `ids`: every one refused, with no trace of the job
/// after it. `what(id, round)` names a submission in a failure.
async fn assert_submissions_refused(
    d: &TestDaemon,
    data: &Path,
    ids: &[&str],
    what: impl Fn(&str, u32) -> String,
) {
    for attempt in 0..3 {
        for x in ids {
            let reply = d.post_job(&job_body(x, "ok")).await;
            assert_refused(&reply, &what(x, attempt));
            assert_no_trace(d, data, x).await;
        }
    }
}

/// No temporary or empty file in jobs/ or the data dir, nothing quarantined.
fn assert_no_leftovers(data: &Path, context: &str) {
    let left = leftovers(data);
    assert!(
        left.is_empty(),
        "{context}: {left:?}\n{}",
        describe_data_dir(data)
    );
}

/// Reads answer while writes fail: the job, the list, the queue, health and readiness.
async fn assert_reads_work(d: &TestDaemon, queued: &[String]) {
    for id in queued {
        let job = d
            .job(id)
            .await
            .unwrap_or_else(|| panic!("job {id} is gone"));
        assert_eq!(job["status"], "Queued", "{job}");
    }
    assert_eq!(d.queue().await, (vec![], queued.to_vec()));
    assert_eq!(d.list_ids("Queued").await, queued.to_vec());
    for path in ["/healthz", "/readyz"] {
        let reply = d.call(Method::GET, path, None).await;
        assert_eq!(reply.status, StatusCode::OK, "GET {path}: {reply:?}");
    }
}

/// A file that takes every free byte of the filesystem it is on; removed when dropped.
struct Filler {
    path: PathBuf,
}

impl Filler {
    fn fill(path: &Path) -> Filler {
        let mut file = fs::File::create(path).expect("create the filler");
        let chunk = vec![0x5a_u8; 64 * 1024];
        let mut size = chunk.len();
        let mut written = 0;
        // Halve the chunk at every refusal, down to one byte: then not a byte more fits.
        while size > 0 {
            match file.write(&chunk[..size]) {
                Ok(0) => size /= 2,
                Ok(n) => written += n,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => size /= 2,
                Err(e) => panic!("fill {}: {e}", path.display()),
            }
        }
        assert!(written > 0, "the filesystem was full before the filler");
        Filler {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The data dir on a 512 KiB tmpfs that fills up: submissions and cancels are refused with
/// 503 and leave nothing behind, reads and the daemon carry on, and once space is back the
/// same requests succeed (a refused id is new then: 201, not 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_keeps_reads_and_recovers() {
    const TEST: &str = "a_full_disk_refuses_writes_keeps_reads_and_recovers";
    let Some((sandbox, config, data, _mount)) = small_disk_sandbox(TEST, 0) else {
        return;
    };
    let mut d = TestDaemon::start(&sandbox, &config, "daemon").await;
    let kept = vec![id(1), id(2)];
    for j in &kept {
        submit(&d, j, "ok").await;
    }
    // queue.json follows the job files a moment later; its rename after the disk is filled
    // would free the old file's page and let a job in.
    sandbox.wait_queue_file(&[], &[&kept[0], &kept[1]]).await;

    let filler = Filler::fill(&data.join("filler"));
    let (refused, never) = (id(3), id(4));
    assert_submissions_refused(&d, &data, &[&refused, &never], |x, attempt| {
        format!("submit {x} on a full disk (try {attempt})")
    })
    .await;
    let reply = d.cancel(&kept[0]).await;
    assert_refused(&reply, "cancel on a full disk");
    // A resubmission of a stored job needs no write: the safe client retry still answers.
    let again = d.post_job(&job_body(&kept[1], "ok")).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_reads_work(&d, &kept).await;
    assert_no_leftovers(&data, "while the disk is full");
    assert!(
        d.alive(),
        "the daemon exited on a full disk:\n{}",
        d.stderr()
    );
    assert!(
        d.stderr().contains("No space left on device"),
        "the log should say why writes fail:\n{}",
        d.stderr()
    );

    drop(filler);
    submit(&d, &refused, "ok").await;
    let reply = d.cancel(&kept[0]).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "cancel once space is back: {reply:?}"
    );
    assert_eq!(reply.json()["status"], "Cancelled");
    assert!(d.job(&never).await.is_none(), "a refused job appeared");
    d.stop_gracefully().await;
    assert_no_leftovers(&data, "after the stop");
    assert_check_passes(&data, "after a full disk");

    // The restart replays exactly what was acknowledged.
    let mut d = TestDaemon::start(&sandbox, &config, "restart").await;
    assert_eq!(
        d.queue().await,
        (vec![], vec![kept[1].clone(), refused.clone()])
    );
    assert_eq!(d.job(&kept[0]).await.expect("kept")["status"], "Cancelled");
    assert!(d.job(&never).await.is_none());
    d.stop_gracefully().await;
}

/// A disk with room for a few job files, and 16 submissions at once (batched, their files
/// staged in parallel): each answer is 201 or 503, and afterwards exactly the 201s exist, on
/// disk and after a restart; no temporary file of a refused batch is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_disk_stores_exactly_the_acknowledged_jobs() {
    const TEST: &str = "a_nearly_full_disk_stores_exactly_the_acknowledged_jobs";
    let Some((sandbox, config, data, _mount)) = small_disk_sandbox(TEST, 0) else {
        return;
    };
    let mut d = TestDaemon::start(&sandbox, &config, "daemon").await;
    let kept = id(1);
    submit(&d, &kept, "ok").await;
    sandbox.wait_queue_file(&[], &[&kept]).await;
    let filler = Filler::fill(&data.join("filler"));
    // Room for three pages: a few job files, not sixteen.
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&filler.path)
        .expect("open the filler");
    let len = file.metadata().expect("filler size").len();
    file.set_len(len - 3 * 4096).expect("shrink the filler");
    drop(file);

    let ids: Vec<String> = (10..26).map(id).collect();
    let bodies: Vec<Value> = ids.iter().map(|x| job_body(x, "ok")).collect();
    let replies = futures_util::future::join_all(bodies.iter().map(|b| d.post_job(b))).await;
    let mut acked = Vec::new();
    for (x, reply) in ids.iter().zip(&replies) {
        if reply.status == StatusCode::CREATED {
            acked.push(x.clone());
        } else {
            assert_refused(reply, &format!("submit {x} on a nearly full disk"));
        }
    }
    report(&format!(
        "storage faults: 16 submissions at once with room for 3 pages: {} stored, {} refused",
        acked.len(),
        ids.len() - acked.len()
    ));
    assert!(d.alive(), "the daemon exited:\n{}", d.stderr());
    for x in &ids {
        if acked.contains(x) {
            assert!(d.job(x).await.is_some(), "acknowledged {x} is missing");
        } else {
            assert_no_trace(&d, &data, x).await;
        }
    }
    assert_no_leftovers(&data, "after the refused batch");
    drop(filler);
    d.stop_gracefully().await;
    assert_check_passes(&data, "after a nearly full disk");

    let mut d = TestDaemon::start(&sandbox, &config, "restart").await;
    let (_, queued) = d.queue().await;
    assert_eq!(queued[0], kept);
    let mut replayed = queued[1..].to_vec();
    replayed.sort();
    acked.sort();
    assert_eq!(replayed, acked, "exactly the acknowledged jobs replay");
    d.stop_gracefully().await;
}

/// Space runs out while a trainer's outcome must be recorded: the job stays Running (in the
/// daemon and on disk), no other trainer starts, and the outcome is recorded once space is
/// back (the worker retries every second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_is_recorded_once_space_returns() {
    const TEST: &str = "an_outcome_is_recorded_once_space_returns";
    let Some((sandbox, config, data, _mount)) = small_disk_sandbox(TEST, 1) else {
        return;
    };
    let mut d = TestDaemon::start(&sandbox, &config, "daemon").await;
    let (job, next) = (id(1), id(2));
    sandbox.hold(&job);
    submit(&d, &job, "ok").await;
    sandbox.trainer_started(&job, 1).await;
    submit(&d, &next, "ok").await;
    // The last rewrite of queue.json lands before the disk is filled: its rename would free
    // the old file's page and let a job in.
    sandbox.wait_queue_file(&[&job], &[&next]).await;

    let filler = Filler::fill(&data.join("filler"));
    let reply = d.post_job(&job_body(&id(3), "ok")).await;
    assert_refused(&reply, "submit while full");
    sandbox.release(&job);
    wait_until("the held trainer ends", secs(15), async || {
        sandbox.record_pid("end", &job, 1)
    })
    .await;
    // The worker tries to record the outcome, is refused, and retries every second. Until it
    // succeeds, the job is Running everywhere and nothing else starts.
    const RETRY_WARNING: &str = "cannot record how the job ended; will retry";
    wait_until(
        "the outcome's write was refused three times",
        secs(15),
        async || {
            let status = d.job(&job).await.expect("the job")["status"].clone();
            assert_eq!(
                status, "Running",
                "the job left Running while the disk is full"
            );
            let on_disk = read_job_file(&data, &job).expect("its file")["status"].clone();
            assert_eq!(
                on_disk, "Running",
                "the job file changed while the disk is full"
            );
            assert!(d.alive(), "the daemon exited:\n{}", d.stderr());
            (d.stderr().matches(RETRY_WARNING).count() >= 3).then_some(())
        },
    )
    .await;
    assert_eq!(
        sandbox.starts(),
        vec![(job.clone(), 1)],
        "only the first job ran"
    );
    assert_eq!(d.queue().await, (vec![job.clone()], vec![next.clone()]));

    let freed = Instant::now();
    drop(filler);
    let done = d.wait_status(&job, "Completed", secs(10)).await;
    let took = freed.elapsed();
    assert_eq!(done["attempts"], 1, "{done}");
    assert!(
        took < secs(5),
        "recorded {took:?} after space came back; retries are every second"
    );
    assert_eq!(
        read_job_file(&data, &job).expect("its file")["status"],
        "Completed"
    );
    // The next job runs now, once.
    d.wait_status(&next, "Completed", secs(15)).await;
    assert_eq!(sandbox.starts(), vec![(job.clone(), 1), (next.clone(), 1)]);
    d.stop_gracefully().await;
    assert_no_leftovers(&data, "after the stop");
    assert_check_passes(&data, "after an outcome recorded late");
}

/// A daemon (paused or not, as `config` says) with `acked` submitted and written to
/// queue.json, and strace attached with `filter`.
async fn daemon_under_strace(
    sandbox: &Sandbox,
    config: &Path,
    acked: &[String],
    filter: Vec<String>,
) -> (TestDaemon, Strace) {
    let d = TestDaemon::start(sandbox, config, "daemon").await;
    for j in acked {
        submit(&d, j, "ok").await;
    }
    // Quiet before strace comes: queue.json follows the last submission a moment later.
    if !acked.is_empty() {
        let ids: Vec<&str> = acked.iter().map(String::as_str).collect();
        sandbox.wait_queue_file(&[], &ids).await;
    }
    let strace = attach_strace(sandbox, &d, &filter).await;
    (d, strace)
}

/// strace attached to the daemon with `filter`, its log in the sandbox.
async fn attach_strace(sandbox: &Sandbox, d: &TestDaemon, filter: &[String]) -> Strace {
    Strace::attach(
        d.pid(),
        filter,
        Path::new("/dev/null"),
        &sandbox.path().join("strace.log"),
    )
    .await
}

/// strace options that make `syscall` fail with `error` on `paths` (every time, or from the
/// `when`-th call on).
fn fail_filter(syscall: &str, error: &str, when: &str, paths: &[PathBuf]) -> Vec<String> {
    let mut filter = vec![
        "-e".to_string(),
        format!("trace={syscall}"),
        "-e".to_string(),
        format!("inject={syscall}:error={error}:when={when}"),
    ];
    for path in paths {
        filter.push("-P".into());
        filter.push(path.display().to_string());
    }
    filter
}

fn temp_of(data: &Path, id: &str) -> PathBuf {
    data.join("jobs").join(format!(".{id}.json.tmp"))
}

/// ENOSPC and EIO injected into the write of a job's temporary file, and EIO / ENOSPC / EACCES
/// into its creation: refused with 503 every time, nothing stored, reads fine, and once strace
/// lets go the same submission is stored (201).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_write_errors_are_refused_and_leave_nothing() {
    let cases = [
        ("write", "ENOSPC"),
        ("write", "EIO"),
        ("openat", "EIO"),
        ("openat", "ENOSPC"),
        ("openat", "EACCES"),
    ];
    for (syscall, error) in cases {
        let what = format!("{syscall} fails with {error}");
        let (sandbox, config, data) = sandbox_with_data_dir(0);
        let acked = vec![id(1), id(2)];
        let x = id(3);
        let filter = fail_filter(syscall, error, "1+", &[temp_of(&data, &x)]);
        let (mut d, strace) = daemon_under_strace(&sandbox, &config, &acked, filter).await;
        assert_submissions_refused(&d, &data, &[&x], |_, attempt| {
            format!("{what}: submit (try {attempt})")
        })
        .await;
        assert_reads_work(&d, &acked).await;
        assert_no_leftovers(&data, &what);
        assert!(d.alive(), "{what}: the daemon exited:\n{}", d.stderr());
        strace.detach().await;
        submit(&d, &x, "ok").await;
        let expected = [acked.clone(), vec![x.clone()]].concat();
        assert_eq!(d.queue().await, (vec![], expected.clone()), "{what}");
        d.stop_gracefully().await;
        assert_no_leftovers(&data, &what);
        assert_check_passes(&data, &what);
        assert_eq!(read_queue_file(&data), Some((vec![], expected)), "{what}");
    }
}

/// queue.json is not on the acknowledgement path: when its write is refused (ENOSPC on its
/// temporary file) a submission is still acknowledged, because the job file is durable, and
/// queue.json catches up once writes work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_queue_file_write_is_retried_and_catches_up() {
    let (sandbox, config, data) = sandbox_with_data_dir(0);
    let acked = vec![id(1)];
    let mut d = TestDaemon::start(&sandbox, &config, "daemon").await;
    submit(&d, &acked[0], "ok").await;
    sandbox.wait_queue_file(&[], &[&acked[0]]).await;
    let filter = fail_filter("write", "ENOSPC", "1+", &[data.join(".queue.json.tmp")]);
    let strace = attach_strace(&sandbox, &d, &filter).await;
    let x = id(2);
    submit(&d, &x, "ok").await;
    // Refused, and tried again (not given up on): wait for a few refusals.
    let refused_from = Instant::now();
    wait_until(
        "queue.json's write is refused 5 times",
        secs(15),
        async || {
            assert!(d.alive(), "the daemon exited:\n{}", d.stderr());
            (d.stderr().matches(".queue.json.tmp").count() >= 5).then_some(())
        },
    )
    .await;
    let five_refusals = refused_from.elapsed();
    assert_eq!(read_queue_file(&data), Some((vec![], acked.clone())));
    assert_eq!(d.queue().await, (vec![], vec![acked[0].clone(), x.clone()]));
    strace.detach().await;
    sandbox.wait_queue_file(&[], &[&acked[0], &x]).await;
    report(&format!(
        "storage faults: a refused queue.json write is retried (5 refusals, each a WARN line, \
         in {five_refusals:?}) and catches up once writes work"
    ));
    d.stop_gracefully().await;
    assert_no_leftovers(&data, "after queue.json caught up");
    assert_check_passes(&data, "after queue.json caught up");
}

/// The Running record of a start is refused (ENOSPC from its second write on): the trainer
/// must not start, the job stays Queued, and once writes work it starts, once, as attempt 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_start_record_does_not_start_the_trainer() {
    let (sandbox, config, data) = sandbox_with_data_dir(1);
    let x = id(1);
    // Write 1 is the submission's record; the starts come after.
    let filter = fail_filter("write", "ENOSPC", "2+", &[temp_of(&data, &x)]);
    let (mut d, strace) = daemon_under_strace(&sandbox, &config, &[], filter).await;
    submit(&d, &x, "ok").await;
    const WARNING: &str = "cannot record the start; the job stays queued";
    wait_until("the start was refused twice", secs(15), async || {
        assert!(
            sandbox.starts().is_empty(),
            "a trainer started without a durable start"
        );
        let job = d.job(&x).await.expect("the job");
        assert_eq!(job["status"], "Queued", "{job}");
        assert_eq!(job["attempts"], 0, "{job}");
        assert_eq!(
            read_job_file(&data, &x).expect("its file")["status"],
            "Queued"
        );
        (d.stderr().matches(WARNING).count() >= 2).then_some(())
    })
    .await;
    assert!(d.alive(), "the daemon exited:\n{}", d.stderr());
    strace.detach().await;
    let job = d.wait_status(&x, "Completed", secs(15)).await;
    assert_eq!(job["attempts"], 1, "{job}");
    assert_eq!(sandbox.starts(), vec![(x.clone(), 1)]);
    d.stop_gracefully().await;
    assert_no_leftovers(&data, "after a refused start");
    assert_check_passes(&data, "after a refused start");
}

/// How a fatal storage fault went, for the report.
struct FatalCase {
    name: &'static str,
    answer: String,
    present_after_restart: bool,
}

/// EIO from one call of `syscall` on the file `target` names (an fsync or a rename, which
/// are fatal): the daemon exits 74 (never 2xx for the request in flight), and a restart
/// replays every job acknowledged before, in order, and passes `check`.
async fn fatal_fault(
    name: &'static str,
    syscall: &str,
    target: fn(&Path, &str) -> PathBuf,
) -> FatalCase {
    let (sandbox, config, data) = sandbox_with_data_dir(0);
    let acked = vec![id(1), id(2), id(3)];
    let x = id(4);
    let filter = fail_filter(syscall, "EIO", "1", &[target(&data, &x)]);
    let (mut d, mut strace) = daemon_under_strace(&sandbox, &config, &acked, filter).await;
    let answer = d
        .send(Method::POST, "/v1/jobs", Some(&job_body(&x, "ok")))
        .await;
    let answer_text = match &answer {
        Ok(reply) => {
            assert!(
                !reply.status.is_success(),
                "{name}: a failed {syscall} was acknowledged: {reply:?}"
            );
            assert_refused(reply, name);
            format!("{} {}", reply.status.as_u16(), reply.text)
        }
        Err(e) => format!("no answer ({e})"),
    };
    let status = d.wait_exit(secs(30)).await;
    assert_eq!(
        status.code(),
        Some(EXIT_STORAGE),
        "{name}: a failed {syscall} must stop the daemon with 74, not {status}; stderr:\n{}",
        d.stderr()
    );
    let logged = if syscall == "fsync" {
        "fsync"
    } else {
        "cannot rename"
    };
    assert!(
        d.stderr().contains(logged),
        "{name}: the log should name the failed {syscall}:\n{}",
        d.stderr()
    );
    strace
        .wait_exit(secs(20))
        .await
        .expect("strace ends with the daemon");

    let mut d = TestDaemon::start(&sandbox, &config, "restart").await;
    let (running, queued) = d.queue().await;
    assert!(running.is_empty());
    assert_eq!(
        &queued[..acked.len()],
        &acked[..],
        "{name}: the acknowledged jobs replay in order"
    );
    let present = d.job(&x).await.is_some();
    assert_eq!(
        queued.len(),
        acked.len() + usize::from(present),
        "{queued:?}"
    );
    d.stop_gracefully().await;
    assert_no_leftovers(&data, name);
    assert_check_passes(&data, name);
    FatalCase {
        name,
        answer: answer_text,
        present_after_restart: present,
    }
}

fn report_fatal(case: &FatalCase) {
    report(&format!(
        "storage faults: {}: answer {}; job present after restart: {}",
        case.name, case.answer, case.present_after_restart
    ));
}

/// A failed fsync of the job's temporary file: exit 74, no 2xx; the rename never happened,
/// so the job is not there after the restart, and everything acknowledged before is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_of_a_job_file_exits_74_and_the_restart_replays() {
    let case = fatal_fault("fsync of the job's temp file fails", "fsync", temp_of).await;
    report_fatal(&case);
    assert!(
        !case.present_after_restart,
        "{}: the job was never renamed into place, yet it replays",
        case.name
    );
}

/// A failed rename of the job's temporary file: exit 74, no 2xx, the job is not there after
/// the restart (its temporary file is cleaned up), everything acknowledged before is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rename_exits_74_and_the_restart_replays() {
    let case = fatal_fault("rename of the job's temp file fails", "rename", temp_of).await;
    report_fatal(&case);
    assert!(
        !case.present_after_restart,
        "{}: the rename failed, yet the job replays",
        case.name
    );
}

/// A failed fsync of `jobs/` after the rename: exit 74, no 2xx, everything acknowledged before
/// replays. (What becomes of the job in flight: see the next test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_of_the_jobs_dir_exits_74_and_the_restart_replays() {
    let case = fatal_fault("fsync of jobs/ fails", "fsync", |data, _| data.join("jobs")).await;
    report_fatal(&case);
}

/// Found by this suite: when the fsync of `jobs/` fails after the job's file was renamed into
/// place, the daemon answered 503 "nothing was stored", exited 74, and the restart replayed
/// the job (it would run): a client that believed the answer and resubmitted without its id
/// would get the training twice. Once a record is visible its fate is unknown, and the answer
/// must say so, with the job's id, so the client can ask after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_after_a_failed_fsync_of_the_jobs_dir_is_not_followed_by_the_job() {
    let case = fatal_fault("fsync of jobs/ fails", "fsync", |data, _| data.join("jobs")).await;
    report_fatal(&case);
    if case.present_after_restart {
        assert!(
            !case.answer.contains("nothing was stored"),
            "{}: the client was told {:?}, yet the job replays after the restart (and would \
             run): a 503 must mean nothing was stored (CONTRACT.md 4), or the answer must say \
             that the outcome is unknown",
            case.name,
            case.answer
        );
        assert!(
            case.answer.contains("may or may not have been stored"),
            "{}: the answer does not say the outcome is unknown: {:?}",
            case.name,
            case.answer
        );
    }
}

/// A failed fsync of queue.json, with no request waiting on it: the submission was
/// acknowledged (its job file is durable); the daemon still exits 74, and the job replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_of_the_queue_file_exits_74_and_keeps_acknowledged_jobs() {
    let (sandbox, config, data) = sandbox_with_data_dir(0);
    let acked = vec![id(1)];
    let filter = fail_filter("fsync", "EIO", "1", &[data.join(".queue.json.tmp")]);
    let (mut d, mut strace) = daemon_under_strace(&sandbox, &config, &acked, filter).await;
    let x = id(2);
    // The job file is durable before the answer; queue.json follows and fails.
    let answer = d
        .send(Method::POST, "/v1/jobs", Some(&job_body(&x, "ok")))
        .await;
    let acknowledged = matches!(&answer, Ok(r) if r.status == StatusCode::CREATED);
    report(&format!(
        "storage faults: fsync of queue.json fails: the submission was {}",
        if acknowledged {
            "acknowledged (201)"
        } else {
            "not acknowledged"
        }
    ));
    if let Ok(reply) = &answer {
        assert!(acknowledged || !reply.status.is_success(), "{reply:?}");
    }
    let status = d.wait_exit(secs(30)).await;
    assert_eq!(
        status.code(),
        Some(EXIT_STORAGE),
        "exit 74 after queue.json's fsync failed, not {status}; stderr:\n{}",
        d.stderr()
    );
    strace
        .wait_exit(secs(20))
        .await
        .expect("strace ends with the daemon");
    let mut d = TestDaemon::start(&sandbox, &config, "restart").await;
    let (_, queued) = d.queue().await;
    assert_eq!(queued[0], acked[0]);
    if acknowledged {
        assert_eq!(
            queued,
            vec![acked[0].clone(), x.clone()],
            "an acknowledged job is lost"
        );
    }
    d.stop_gracefully().await;
    assert_no_leftovers(&data, "after a failed fsync of queue.json");
    assert_check_passes(&data, "after a failed fsync of queue.json");
}

/// The data dir turns read-only under a running daemon (a read-only bind mount over it):
/// writes are refused with 503, reads work, nothing is left behind; remounted read-write,
/// the same requests succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_data_dir_refuses_writes_until_it_is_writable_again() {
    const TEST: &str = "a_read_only_data_dir_refuses_writes_until_it_is_writable_again";
    if !root_or_skip(TEST) {
        return;
    }
    let (sandbox, config) = sandbox_with(0);
    let data = sandbox.data_dir();
    let mut d = TestDaemon::start(&sandbox, &config, "daemon").await;
    let kept = vec![id(1), id(2)];
    for j in &kept {
        submit(&d, j, "ok").await;
    }
    let Some(mount) = read_only_or_skip(TEST, &data) else {
        return;
    };
    let x = id(3);
    assert_submissions_refused(&d, &data, &[&x], |_, attempt| {
        format!("submit on a read-only data dir (try {attempt})")
    })
    .await;
    let reply = d.cancel(&kept[0]).await;
    assert_refused(&reply, "cancel on a read-only data dir");
    assert_reads_work(&d, &kept).await;
    assert!(
        d.stderr().contains("Read-only file system"),
        "the log should say why writes fail:\n{}",
        d.stderr()
    );
    assert!(d.alive(), "the daemon exited:\n{}", d.stderr());

    mount.set_read_only(false).expect("remount read-write");
    submit(&d, &x, "ok").await;
    let reply = d.cancel(&kept[0]).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "cancel once writable: {reply:?}"
    );
    // queue.json follows the last change a moment later, through the bind mount.
    sandbox.wait_queue_file(&[], &[&kept[1], &x]).await;
    if let Err(e) = mount.unmount() {
        let open: Vec<String> = fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .map(|fds| {
                fds.flatten()
                    .filter_map(|fd| fs::read_link(fd.path()).ok())
                    .map(|p| p.display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        panic!("{e}; the daemon has open: {open:?}");
    }
    d.stop_gracefully().await;
    assert_no_leftovers(&data, "after the read-only spell");
    assert_check_passes(&data, "after the read-only spell");
    assert_eq!(
        read_queue_file(&data),
        Some((vec![], vec![kept[1].clone(), x.clone()]))
    );
}

/// A daemon started on a read-only data dir (with jobs in it, and empty) exits 74 with one
/// line on stderr that says why, and no panic; made writable, it boots with the jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_data_dir_at_boot_exits_74_with_one_line() {
    const TEST: &str = "a_read_only_data_dir_at_boot_exits_74_with_one_line";
    if !root_or_skip(TEST) {
        return;
    }
    for with_jobs in [true, false] {
        let (sandbox, config) = sandbox_with(0);
        let data = sandbox.data_dir();
        fs::create_dir_all(&data).expect("create the data dir");
        let kept = id(1);
        if with_jobs {
            let mut d = TestDaemon::start(&sandbox, &config, "before").await;
            submit(&d, &kept, "ok").await;
            d.stop_gracefully().await;
        }
        let Some(mount) = read_only_or_skip(TEST, &data) else {
            return;
        };
        let mut d = TestDaemon::spawn(&sandbox, &config, "read-only");
        let status = d.wait_exit(secs(20)).await;
        let stderr = d.stderr();
        assert_eq!(
            status.code(),
            Some(EXIT_STORAGE),
            "boot on a read-only data dir (with jobs: {with_jobs}): {status}; stderr:\n{stderr}"
        );
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line, not:\n{stderr}");
        assert!(
            lines[0].contains("ERROR") && lines[0].contains("Read-only file system"),
            "the line should be an error that says why: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        mount.unmount().expect("unmount");
        let mut d = TestDaemon::start(&sandbox, &config, "writable").await;
        assert_eq!(d.job(&kept).await.is_some(), with_jobs);
        d.stop_gracefully().await;
        assert_check_passes(&data, "after a read-only boot");
    }
}

/// The filler really fills: a write after it fails with ENOSPC (guards the disk-full tests
/// against a tmpfs that silently grew).
#[test]
fn the_filler_leaves_no_space() {
    const TEST: &str = "the_filler_leaves_no_space";
    if !root_or_skip(TEST) {
        return;
    }
    let dir = tempfile::tempdir().expect("a temp dir");
    let target = dir.path().join("mnt");
    let Some(_mount) = tmpfs_or_skip(TEST, &target, "512k") else {
        return;
    };
    let filler = Filler::fill(&target.join("filler"));
    let err = fs::write(target.join("more"), vec![1u8; 100]).expect_err("no space left");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(filler);
    fs::write(target.join("more"), vec![1u8; 100]).expect("space is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_that_cannot_write_the_job_back_exits_74() {
    const TEST: &str = "a_graceful_stop_that_cannot_write_the_job_back_exits_74";
    if !root_or_skip(TEST) {
        return;
    }
    let (sandbox, config, data) = sandbox_with_data_dir(1);
    let mut d = TestDaemon::start(&sandbox, &config, "daemon").await;
    let x = id(1);
    submit(&d, &x, "sleep:300").await;
    d.wait_status(&x, "Running", secs(10)).await;
    let Some(_mount) = read_only_or_skip(TEST, &data.join("jobs")) else {
        return;
    };
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(secs(20)).await;
    assert_eq!(status.code(), Some(74), "{}", d.stderr());
    assert!(
        d.stderr().contains("cannot write the interrupted job back"),
        "{}",
        d.stderr()
    );
    // Nothing was lost: the record still says Running, which the next boot replays as an
    // interrupted start.
    assert_eq!(
        read_job_file(&data, &x).expect("its file")["status"],
        "Running"
    );
}
