//! Exhaustive crash-point sweep: the real daemon runs a fixed, sequential workload while
//! strace kills it (SIGKILL, injected on entry to the K-th call of one system call) for K = 1,
//! 2, 3, ... until runs get through the whole workload without being killed (three in a row:
//! the number of calls varies a little with timing). After every crash the data dir is
//! checked as the crash left it (`training-worker check` may only object to temporary files),
//! then a paused daemon (`max_concurrent = 0`) replays it and must show every acknowledged
//! request (an acknowledged cancel stays Cancelled) and every state the job files were seen in,
//! nothing that was never asked for (only a request whose answer the crash cut off may go
//! either way), no job running twice, and the queue order of CONTRACT.md 6 (interrupted jobs
//! first by start, then by arrival); it must then stop gracefully (exit 0) and leave exactly
//! the jobs' files, a matching queue.json, nothing temporary, empty or quarantined, and a data
//! dir that passes `check`. No trainer may outlive the killed daemon.
//!
//! The workload (one request at a time, so that each store batch holds one job file and the
//! calls come in the same order every run; `max_concurrent = 1`): submit A (trainer exits 0),
//! wait until A's file says Completed; submit B (runs 30 s), wait until it says Running;
//! submit C (exits 3), which queues behind B; cancel B, then C runs: wait until C's file says
//! Failed; submit D (runs 30 s), wait until Running; submit E, which queues behind D; SIGTERM,
//! which must end in exit 0 with D written back as interrupted. Waits watch the job files, not
//! the API, so that polling adds no calls to the daemon. The trainer is a quiet `sh -c` (exec
//! sleep, or exit) rather than tests/trainers/stub.sh: strace follows the daemon's children
//! too, and a trainer that writes would be killed at its own K-th write instead of the daemon.
//!
//! How strace is used, and why (`syscall_census` fails if these stop holding):
//! - `-e inject=SYSCALL:signal=KILL:when=K` acts only on traced calls (`-e trace=none` turns
//!   injection off without a word), so each sweep traces exactly the call it injects into, to
//!   /dev/null. SIGKILL on entry means the call never runs: K = 1 is "just before the first".
//! - strace counts `when=K` per thread. So strace is attached (`-f -p`) once the daemon is
//!   ready, and every fsync, rename and job-file write of the workload is on the store thread:
//!   K enumerates all of them, in order. Writes on other threads (log lines to stderr, which
//!   goes to a file, the runtime's eventfd wake-ups, trainer log headers) are crash points
//!   too, but there "the K-th write" is the K-th of whichever thread gets there first.
//! - fdatasync, renameat, renameat2, pwrite64 and the like are not called by the daemon.
//!
//! The tests (cargo runs two at a time here; each prints its figures past the capture):
//! - `crash_at_every_fsync`, `crash_at_every_rename`: every point of the workload;
//! - `crash_at_every_write_of_a_data_file`: every write to a job or queue.json temp file (`-P`);
//! - `crash_at_every_write_on_any_descriptor`: every K of `write` on any descriptor;
//! - `crash_before_every_http_answer`: strace attaches before request K and kills at the next
//!   `writev`, its answer: the work is done, the client never hears;
//! - `crash_during_the_recovery_boot`: the replay of a crashed data dir, killed at every point
//!   of its own writes (see that test);
//! - `syscall_census`: the calls and threads above, and the durability order that a process
//!   crash cannot show (the page cache survives it): fsync before rename, fsync of the
//!   directory after it, and that before any 2xx about the job (see `check_durability_order`).
//!
//! Every point is swept by default: the whole file takes about 15 s here (a run is a daemon
//! start, the workload or part of it, a paused restart and two `check`s), so no subset is needed.

#[path = "e2e_support/mod.rs"]
#[allow(dead_code)]
mod support;

#[path = "fault_support/mod.rs"]
#[allow(dead_code)]
mod fault_support;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use fault_support::{
    Config, Strace, TestDaemon, check_problems, describe_data_dir, job_file_names,
    killed_by_sigkill, leftovers, read_job_file, read_queue_file, report, run_check, write_config,
};
use support::{Sandbox, secs, wait_until_or_timeout};

/// The jobs of the workload, in submission order, and what their trainers do.
const IDS: [&str; 5] = [
    "0c0ffee0-0000-4000-8000-00000000000a",
    "0c0ffee0-0000-4000-8000-00000000000b",
    "0c0ffee0-0000-4000-8000-00000000000c",
    "0c0ffee0-0000-4000-8000-00000000000d",
    "0c0ffee0-0000-4000-8000-00000000000e",
];
const MODELS: [&str; 5] = ["ok", "sleep:30", "fail:3", "sleep:30", "ok"];
const NAMES: [&str; 5] = ["A", "B", "C", "D", "E"];
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const D: usize = 3;
const E: usize = 4;

/// The final status each job may reach in the workload (B only by its cancel).
const FINAL: [Option<&str>; 5] = [
    Some("Completed"),
    Some("Cancelled"),
    Some("Failed"),
    None,
    None,
];

/// A trainer that makes no write, fsync or rename of its own: `sleep:N` runs N seconds,
/// `fail:N` exits N, anything else exits 0. A command's arguments are templates, so the
/// shell's braces are doubled.
const QUIET_TRAINER: &str = r#"case "$MODEL" in
  sleep:*) exec sleep "${{MODEL#sleep:}}" ;;
  fail:*) exit "${{MODEL#fail:}}" ;;
esac
exit 0"#;

/// A bound on K, far above any sweep's length, so that a daemon that never stops calling
/// fails the test rather than hanging it.
const MAX_K: u32 = 500;

fn job_body(i: usize) -> Value {
    json!({
        "type": "DiffusionJob",
        "job_id": IDS[i],
        "model": MODELS[i],
        "dataset_zip": "images.zip",
    })
}

fn quiet(max_concurrent: usize) -> Config {
    Config {
        max_concurrent,
        trainer: vec!["/bin/sh".into(), "-c".into(), QUIET_TRAINER.into()],
        kill_grace: "2s",
        shutdown_grace: "10s",
    }
}

/// What became of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    NotSent,
    /// Sent, and the connection broke before an answer: it may or may not have happened.
    Unknown,
    /// Answered 2xx.
    Acked,
}

/// What the workload did and saw before the daemon died (or finished).
#[derive(Debug)]
struct Ledger {
    submit: [Fate; 5],
    cancel_b: Fate,
    /// The last status each job's file was seen in.
    seen: [Option<&'static str>; 5],
    sigterm_sent: bool,
    steps: Vec<String>,
}

impl Default for Ledger {
    fn default() -> Ledger {
        Ledger {
            submit: [Fate::NotSent; 5],
            cancel_b: Fate::NotSent,
            seen: [None; 5],
            sigterm_sent: false,
            steps: Vec::new(),
        }
    }
}

/// The daemon died (of SIGKILL) during the workload.
#[derive(Debug)]
struct Died;

/// After a request failed: the daemon must be dying of the injected SIGKILL.
async fn died(d: &mut TestDaemon, l: &mut Ledger, error: &str) -> Died {
    let status = wait_until_or_timeout(secs(20), async || d.exit_status()).await;
    let Some(status) = status else {
        panic!(
            "a request failed ({error}) but the daemon is still alive; steps: {:?}; stderr:\n{}",
            l.steps,
            d.stderr()
        );
    };
    assert!(
        killed_by_sigkill(status),
        "the daemon ended with {status}, not the injected SIGKILL; steps: {:?}; stderr:\n{}",
        l.steps,
        d.stderr()
    );
    l.steps.push(format!("died: {error}"));
    Died
}

async fn submit(
    d: &mut TestDaemon,
    l: &mut Ledger,
    inj: &mut Injector,
    i: usize,
) -> Result<(), Died> {
    inj.before_request(d.pid()).await;
    l.submit[i] = Fate::Unknown;
    l.steps.push(format!("submit {}", NAMES[i]));
    match d.send(Method::POST, "/v1/jobs", Some(&job_body(i))).await {
        Ok(reply) => {
            assert_eq!(
                reply.status,
                StatusCode::CREATED,
                "submit {}: {reply:?}",
                NAMES[i]
            );
            let job = reply.json();
            assert_eq!(job["status"], "Queued", "{job}");
            assert_eq!(job["job_id"], IDS[i], "{job}");
            l.submit[i] = Fate::Acked;
            Ok(())
        }
        Err(e) => Err(died(d, l, &e).await),
    }
}

async fn cancel_b(d: &mut TestDaemon, l: &mut Ledger, inj: &mut Injector) -> Result<(), Died> {
    inj.before_request(d.pid()).await;
    l.cancel_b = Fate::Unknown;
    l.steps.push("cancel B".into());
    let path = format!("/v1/jobs/{}/cancel", IDS[B]);
    match d.send(Method::POST, &path, None).await {
        Ok(reply) => {
            assert_eq!(reply.status, StatusCode::OK, "cancel B: {reply:?}");
            assert_eq!(reply.json()["status"], "Cancelled", "{reply:?}");
            l.cancel_b = Fate::Acked;
            Ok(())
        }
        Err(e) => Err(died(d, l, &e).await),
    }
}

/// Waits until job `i`'s file says `status`, watching the disk rather than asking the
/// daemon (a poll over HTTP would add system calls that vary from run to run).
async fn wait_file(
    d: &mut TestDaemon,
    data: &Path,
    l: &mut Ledger,
    i: usize,
    status: &'static str,
) -> Result<(), Died> {
    l.steps.push(format!("wait until {} is {status}", NAMES[i]));
    let deadline = Instant::now() + secs(30);
    loop {
        let now = read_job_file(data, IDS[i]).and_then(|j| j["status"].as_str().map(String::from));
        if let Some(now) = &now {
            if now == status {
                l.seen[i] = Some(status);
                return Ok(());
            }
            if now == "Running" {
                l.seen[i] = Some("Running");
            }
        }
        if !d.alive() {
            return Err(died(
                d,
                l,
                &format!("while waiting until {} is {status}", NAMES[i]),
            )
            .await);
        }
        assert!(
            Instant::now() < deadline,
            "job {} never became {status} (its file says {now:?}); steps: {:?}; stderr:\n{}",
            NAMES[i],
            l.steps,
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The workload of the module doc up to the submission of E (D running, E queued behind it).
async fn workload_until_e(
    d: &mut TestDaemon,
    data: &Path,
    l: &mut Ledger,
    inj: &mut Injector,
) -> Result<(), Died> {
    submit(d, l, inj, A).await?;
    wait_file(d, data, l, A, "Completed").await?;
    submit(d, l, inj, B).await?;
    wait_file(d, data, l, B, "Running").await?;
    submit(d, l, inj, C).await?;
    cancel_b(d, l, inj).await?;
    l.seen[B] = Some("Cancelled");
    wait_file(d, data, l, C, "Failed").await?;
    submit(d, l, inj, D).await?;
    wait_file(d, data, l, D, "Running").await?;
    submit(d, l, inj, E).await
}

/// The whole workload. `Ok` once the daemon stopped gracefully (exit 0).
async fn workload(
    d: &mut TestDaemon,
    data: &Path,
    l: &mut Ledger,
    inj: &mut Injector,
) -> Result<(), Died> {
    workload_until_e(d, data, l, inj).await?;
    l.steps.push("SIGTERM".into());
    l.sigterm_sent = true;
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(secs(30)).await;
    if status.code() == Some(0) {
        l.steps.push("stopped gracefully".into());
        return Ok(());
    }
    assert!(
        killed_by_sigkill(status),
        "the daemon ended with {status} after SIGTERM; steps: {:?}; stderr:\n{}",
        l.steps,
        d.stderr()
    );
    l.steps.push("died during the graceful stop".into());
    Err(Died)
}

/// What one recovery found, for the summary.
#[derive(Default, Debug)]
struct Recovery {
    /// Requests whose answer the crash cut off, and whether their effect was there.
    unknown_present: usize,
    unknown_absent: usize,
    /// Temporary files the crash left (removed by the recovery boot).
    temp_files: usize,
    /// Jobs the recovery requeued as interrupted (started, then cut short).
    interrupted: usize,
}

fn text(job: &Value, key: &str) -> Option<String> {
    job[key].as_str().map(String::from)
}

/// Checks the data dir a run left (crashed or not) against its ledger, through a paused
/// restart; see the module doc.
async fn verify(sandbox: &Sandbox, recover_config: &Path, l: &Ledger, crashed: bool) -> Recovery {
    let data = sandbox.data_dir();
    let context = format!("steps {:?}", l.steps);
    let mut found = Recovery::default();

    // The data dir as the crash left it: the only thing `check` may object to is a temporary
    // file of an interrupted write (no torn or empty job file, no queue.json naming a job
    // without a file, no contradictory record, no order that the job files would not give).
    let (clean, report_text) = run_check(&data);
    let problems = check_problems(&report_text);
    found.temp_files = problems.len();
    for problem in &problems {
        assert!(
            crashed && problem.contains("temporary file left by an interrupted write"),
            "{context}: the data dir after the {} has a problem: {problem}\n{report_text}\n{}",
            if crashed { "crash" } else { "graceful stop" },
            describe_data_dir(&data)
        );
    }
    assert!(crashed || clean, "{context}: {report_text}");
    let files_before = describe_data_dir(&data);
    let context = format!("{context}\ndata dir after the crash:\n{files_before}");

    let mut d = TestDaemon::start(sandbox, recover_config, "recovery").await;
    let mut jobs: Vec<Option<Value>> = Vec::new();
    for id in IDS {
        jobs.push(d.job(id).await);
    }
    for i in 0..5 {
        let name = NAMES[i];
        let job = &jobs[i];
        match (l.submit[i], job) {
            (Fate::NotSent, Some(job)) => {
                panic!("{context}: job {name} was never submitted, yet it exists: {job}")
            }
            (Fate::Acked, None) => {
                panic!("{context}: job {name} was acknowledged (201), and it is gone")
            }
            (Fate::Unknown, Some(_)) => found.unknown_present += 1,
            (Fate::Unknown, None) => found.unknown_absent += 1,
            _ => {}
        }
        let Some(job) = job else { continue };
        assert_eq!(job["job_id"], IDS[i], "{context}: {job}");
        assert_eq!(job["model"], MODELS[i], "{context}: {job}");
        let status = text(job, "status").expect("a status");
        let attempts = job["attempts"].as_u64().expect("attempts");
        let started = job["started_at"].is_string();
        let finished = job["finished_at"].is_string();
        match status.as_str() {
            "Queued" => {
                assert!(!finished, "{context}: Queued with finished_at: {job}");
                assert!(
                    l.seen[i].is_none_or(|s| s == "Running"),
                    "{context}: job {name}'s file said {:?}, and it is Queued again: {job}",
                    l.seen[i]
                );
                if started {
                    found.interrupted += 1;
                }
            }
            "Running" => panic!("{context}: job {name} runs in a paused daemon: {job}"),
            final_status => {
                assert_eq!(
                    FINAL[i],
                    Some(final_status),
                    "{context}: job {name} cannot end {final_status} in this workload: {job}"
                );
                assert!(
                    finished,
                    "{context}: {final_status} without finished_at: {job}"
                );
                if i == B {
                    assert_ne!(
                        l.cancel_b,
                        Fate::NotSent,
                        "{context}: B is Cancelled, but no cancel was sent: {job}"
                    );
                    assert_eq!(job["error_message"], "cancelled by request", "{job}");
                } else {
                    assert_eq!(attempts, 1, "{context}: {job}");
                }
            }
        }
        assert!(attempts <= 1, "{context}: job {name} started twice: {job}");
        if l.seen[i] == Some("Running") {
            assert!(
                started,
                "{context}: job {name} was seen Running; no started_at now: {job}"
            );
        }
        if let Some(seen) = l.seen[i].filter(|s| *s != "Running") {
            assert_eq!(
                status, seen,
                "{context}: job {name}'s file said {seen}; after the restart it is {status}"
            );
        }
    }
    if l.cancel_b == Fate::Acked {
        let b = jobs[B]
            .as_ref()
            .expect("B exists: its cancel was acknowledged");
        assert_eq!(
            b["status"], "Cancelled",
            "{context}: an acknowledged cancel: {b}"
        );
    }

    // Creation order is submission order.
    let created: Vec<(usize, String)> = (0..5)
        .filter_map(|i| Some((i, text(jobs[i].as_ref()?, "created_at")?)))
        .collect();
    for pair in created.windows(2) {
        assert!(
            pair[0].1 < pair[1].1,
            "{context}: {} was created at {}, not before {} at {}",
            NAMES[pair[0].0],
            pair[0].1,
            NAMES[pair[1].0],
            pair[1].1
        );
    }

    // The queue: interrupted jobs first by start, then the rest by arrival.
    let mut queued: Vec<(bool, String, usize)> = (0..5)
        .filter_map(|i| {
            let job = jobs[i].as_ref()?;
            (job["status"] == "Queued").then(|| {
                let started = text(job, "started_at");
                (started.is_none(), started.unwrap_or_default(), i)
            })
        })
        .collect();
    queued.sort();
    let expected: Vec<String> = queued.iter().map(|(_, _, i)| IDS[*i].to_string()).collect();
    let queue = d.queue().await;
    assert_eq!(
        queue,
        (vec![], expected.clone()),
        "{context}: /v1/queue after the restart"
    );
    assert_eq!(
        d.list_ids("Queued").await,
        expected,
        "{context}: GET /v1/jobs?status=Queued"
    );
    d.stop_gracefully().await;

    // What the graceful stop left: exactly the jobs' files, nothing temporary, empty or
    // quarantined, a queue.json that says the same, and a clean `check`.
    let left = leftovers(&data);
    assert!(
        left.is_empty(),
        "{context}: left after the restart: {left:?}"
    );
    let mut names = job_file_names(&data);
    names.sort();
    let mut expected_names: Vec<String> = (0..5)
        .filter(|i| jobs[*i].is_some())
        .map(|i| format!("{}.json", IDS[i]))
        .collect();
    expected_names.sort();
    assert_eq!(names, expected_names, "{context}: files in jobs/");
    assert_eq!(
        read_queue_file(&data),
        Some((vec![], expected)),
        "{context}: queue.json after the graceful stop"
    );
    let (clean, report_text) = run_check(&data);
    assert!(clean, "{context}: check after the recovery:\n{report_text}");
    found
}

/// Which files an injection is limited to (strace `-P`; only calls on them count for K).
#[derive(Clone, Copy, Debug)]
enum Paths {
    /// Every call.
    All,
    /// The temporary files of the workload's job files and of queue.json.
    DataTemps,
    /// The temporary files of the workload's job files.
    JobTemps,
    /// Those, and the `jobs/` directory (its fsync).
    JobTempsAndJobsDir,
}

impl Paths {
    fn list(self, data: &Path) -> Vec<PathBuf> {
        let jobs: Vec<PathBuf> = IDS
            .iter()
            .map(|id| data.join("jobs").join(format!(".{id}.json.tmp")))
            .collect();
        match self {
            Paths::All => Vec::new(),
            Paths::JobTemps => jobs,
            Paths::DataTemps => [jobs, vec![data.join(".queue.json.tmp")]].concat(),
            Paths::JobTempsAndJobsDir => [jobs, vec![data.join("jobs")]].concat(),
        }
    }
}

/// strace options that SIGKILL on entry to the `when`-th call of `syscall` (per thread).
fn kill_filter(syscall: &str, paths: Paths, when: u32, data: &Path) -> Vec<String> {
    let mut filter = vec![
        "-e".to_string(),
        format!("trace={syscall}"),
        "-e".to_string(),
        format!("inject={syscall}:signal=KILL:when={when}"),
    ];
    for path in paths.list(data) {
        filter.push("-P".into());
        filter.push(path.display().to_string());
    }
    filter
}

/// When strace attaches to a workload's daemon.
#[derive(Clone, Copy, Debug)]
enum AttachAt {
    /// Once the daemon is ready, before the first request.
    Ready,
    /// Just before the n-th request (1-based); never if there are fewer.
    Request(usize),
}

/// Attaches strace to the workload's daemon at the chosen moment.
struct Injector {
    filter: Vec<String>,
    at: AttachAt,
    output: PathBuf,
    log: PathBuf,
    requests: usize,
    strace: Option<Strace>,
}

impl Injector {
    fn new(sandbox: &Sandbox, filter: Vec<String>, at: AttachAt, output: PathBuf) -> Injector {
        Injector {
            filter,
            at,
            output,
            log: sandbox.path().join("strace.log"),
            requests: 0,
            strace: None,
        }
    }

    async fn attach(&mut self, pid: i32) {
        self.strace = Some(Strace::attach(pid, &self.filter, &self.output, &self.log).await);
    }

    async fn before_request(&mut self, pid: i32) {
        self.requests += 1;
        if matches!(self.at, AttachAt::Request(n) if n == self.requests) {
            self.attach(pid).await;
        }
    }

    /// strace ends by itself once its tracees are gone.
    async fn finish(&mut self) {
        if let Some(strace) = &mut self.strace
            && strace.wait_exit(secs(20)).await.is_none()
        {
            panic!("strace outlived its tracee: {}", strace.stderr());
        }
    }
}

/// Runs of a sweep that must get through the workload in a row before it ends: the number of
/// calls varies a little from run to run (queue.json rewrites are coalesced by timing; the
/// runtime's wake-ups vary more), so one clean run does not prove that K is past the last.
const CLEAN_RUNS_TO_STOP: u32 = 3;

/// Totals over a sweep, for its report line.
#[derive(Default)]
struct Totals {
    crashes: u32,
    /// The first K of the final run of clean runs.
    clean_from: u32,
    unknown_present: usize,
    unknown_absent: usize,
    temp_files: usize,
    interrupted: usize,
}

impl Totals {
    fn add(&mut self, found: &Recovery) {
        self.crashes += 1;
        self.unknown_present += found.unknown_present;
        self.unknown_absent += found.unknown_absent;
        self.temp_files += found.temp_files;
        self.interrupted += found.interrupted;
    }

    fn report(&self, name: &str, started: Instant) {
        report(&format!(
            "crash points: {name:<40} {:>3} crashes (clean from K = {}), {:.1}s; \
             cut-off requests found done {} / not done {}; temp files left {}; \
             requeued as interrupted {}",
            self.crashes,
            self.clean_from,
            started.elapsed().as_secs_f64(),
            self.unknown_present,
            self.unknown_absent,
            self.temp_files,
            self.interrupted
        ));
        assert!(
            self.crashes > 0,
            "{name}: no run was killed: the injection never fired, so nothing was tested"
        );
    }
}

/// Runs `one(K)` for K = 1, 2, ... until [`CLEAN_RUNS_TO_STOP`] runs in a row did not crash,
/// and reports the totals of the runs that did. `one` says whether its run crashed and what
/// the recovery after it found.
async fn sweep(name: &str, mut one: impl AsyncFnMut(u32) -> (bool, Recovery)) -> Totals {
    let started = Instant::now();
    let mut totals = Totals::default();
    let mut clean_runs = 0;
    let mut k = 1;
    while clean_runs < CLEAN_RUNS_TO_STOP {
        assert!(k <= MAX_K, "{name}: still crashing at K = {k}");
        let (crashed, found) = one(k).await;
        if crashed {
            clean_runs = 0;
            totals.add(&found);
        } else {
            if clean_runs == 0 {
                totals.clean_from = k;
            }
            clean_runs += 1;
        }
        k += 1;
    }
    totals.report(name, started);
    totals
}

/// Sweeps K = 1, 2, ... for one system call during the workload, until it completes
/// [`CLEAN_RUNS_TO_STOP`] times in a row. With [`AttachAt::Ready`], K is strace's `when`;
/// with `AttachAt::Request`, K is the request before which strace attaches (`when=1`).
async fn sweep_workload(name: &str, syscall: &str, paths: Paths, per_request: bool) -> u32 {
    let totals = sweep(name, async |k| {
        let sandbox = Sandbox::new();
        let work_config = sandbox.path().join("workload.toml");
        let recover_config = sandbox.path().join("recover.toml");
        write_config(&work_config, &quiet(1));
        write_config(&recover_config, &quiet(0));
        let mut d = TestDaemon::start(&sandbox, &work_config, "workload").await;
        let data = fs::canonicalize(sandbox.data_dir()).expect("the data dir exists");
        let (when, at) = if per_request {
            (1, AttachAt::Request(k as usize))
        } else {
            (k, AttachAt::Ready)
        };
        let filter = kill_filter(syscall, paths, when, &data);
        let mut inj = Injector::new(&sandbox, filter, at, PathBuf::from("/dev/null"));
        if matches!(at, AttachAt::Ready) {
            inj.attach(d.pid()).await;
        }
        let mut ledger = Ledger::default();
        ledger.steps.push(format!("{name}: K = {k}"));
        let crashed = workload(&mut d, &data, &mut ledger, &mut inj)
            .await
            .is_err();
        inj.finish().await;
        // No trainer outlives the daemon that started it, killed this way or not.
        sandbox.assert_no_trainers_left().await;
        let found = verify(&sandbox, &recover_config, &ledger, crashed).await;
        (crashed, found)
    })
    .await;
    totals.crashes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_fsync() {
    sweep_workload("fsync", "fsync", Paths::All, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_rename() {
    sweep_workload("rename", "rename", Paths::All, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_write_of_a_data_file() {
    sweep_workload(
        "write (job and queue temp files)",
        "write",
        Paths::DataTemps,
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_write_on_any_descriptor() {
    sweep_workload("write (any fd, per thread)", "write", Paths::All, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_every_http_answer() {
    sweep_workload(
        "writev (the answer to request K)",
        "writev",
        Paths::All,
        true,
    )
    .await;
}

/// Crashes during the recovery boot itself. A data dir as a crash leaves it (A Completed,
/// B Cancelled, C Failed, D Running, E Queued, and a half-written temporary file) is replayed
/// by a paused daemon started under strace, killed at the K-th call of one "channel" (a
/// system call, limited to some paths), for K = 1, 2, ... until the boot completes; then the
/// usual recovery checks run. Boot writes on two threads: the clean-up (temporary files,
/// queue.json, fsync of the directories) and then the store thread (D written back as
/// interrupted). strace counts per thread, so channels limited to job files reach the store
/// thread's calls that an unlimited channel would leave behind the clean-up thread's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_the_recovery_boot() {
    let template = Sandbox::new();
    let config = template.path().join("workload.toml");
    write_config(&config, &quiet(1));
    let mut d = TestDaemon::start(&template, &config, "template").await;
    let data = fs::canonicalize(template.data_dir()).expect("the data dir exists");
    let mut ledger = Ledger::default();
    let mut no_injection = Injector::new(&template, Vec::new(), AttachAt::Request(0), "-".into());
    workload_until_e(&mut d, &data, &mut ledger, &mut no_injection)
        .await
        .expect("the workload runs");
    d.signal(libc::SIGKILL);
    d.wait_exit(secs(10)).await;
    template.assert_no_trainers_left().await;
    let e_record = fs::read(data.join("jobs").join(format!("{}.json", IDS[E]))).expect("E");
    fs::write(
        data.join("jobs").join(format!(".{}.json.tmp", IDS[E])),
        &e_record[..e_record.len() / 2],
    )
    .expect("write a half temporary file");
    ledger
        .steps
        .push("killed; a half-written temp file of E added".into());

    let channels = [
        ("fsync", Paths::All),
        ("fsync", Paths::JobTemps),
        ("fsync", Paths::JobTempsAndJobsDir),
        ("rename", Paths::All),
        ("rename", Paths::JobTemps),
        ("write", Paths::DataTemps),
        ("write", Paths::JobTemps),
    ];
    let all_started = Instant::now();
    let mut crashes = 0;
    for (syscall, paths) in channels {
        let name = format!("boot: {syscall} ({paths:?})");
        let totals = sweep(&name, async |k| {
            let sandbox = Sandbox::new();
            let recover_config = sandbox.path().join("recover.toml");
            write_config(&recover_config, &quiet(0));
            copy_dir(&data, &sandbox.data_dir());
            let _ = fs::remove_file(sandbox.data_dir().join("lock"));
            let target = fs::canonicalize(sandbox.data_dir()).expect("the data dir exists");
            let mut wrapper = vec![
                fault_support::strace_binary().display().to_string(),
                "-f".into(),
                "-qq".into(),
                "-o".into(),
                "/dev/null".into(),
            ];
            wrapper.extend(kill_filter(syscall, paths, k, &target));
            wrapper.push("--".into());
            let mut d = TestDaemon::spawn_under(&sandbox, &recover_config, "boot", &wrapper);
            let mut run = Ledger {
                submit: ledger.submit,
                cancel_b: ledger.cancel_b,
                seen: ledger.seen,
                sigterm_sent: false,
                steps: [ledger.steps.clone(), vec![format!("{name}: K = {k}")]].concat(),
            };
            let crashed = match d.ready_or_exit(secs(30)).await {
                Some(status) => {
                    assert!(
                        killed_by_sigkill(status),
                        "{name}: K = {k}: the boot ended with {status}; stderr:\n{}",
                        d.stderr()
                    );
                    true
                }
                None => {
                    // Booted; a graceful stop may still meet the K-th call.
                    let status = d.terminate().await;
                    run.steps.push(format!("booted, then SIGTERM: {status}"));
                    assert!(
                        status.code() == Some(0) || killed_by_sigkill(status),
                        "{name}: K = {k}: the stop ended with {status}; stderr:\n{}",
                        d.stderr()
                    );
                    status.code() != Some(0)
                }
            };
            drop(d);
            let found = verify(&sandbox, &recover_config, &run, crashed).await;
            (crashed, found)
        })
        .await;
        crashes += totals.crashes;
    }
    report(&format!(
        "crash points: boot, all channels: {crashes} crashes, {:.1}s",
        all_started.elapsed().as_secs_f64()
    ));
}

/// Copies a directory tree (files and directories only).
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create a directory");
    for entry in fs::read_dir(from).expect("read a directory").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// One system call in a trace: its name, arguments (as strace printed them), and the
/// trace lines where it started and where it returned.
#[derive(Debug)]
struct Call {
    name: String,
    args: String,
    start: usize,
    end: usize,
}

/// The calls of an `strace -f` trace, joining "<unfinished ...>" and "<... resumed>" lines.
fn parse_trace(trace: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut pending: HashMap<String, Call> = HashMap::new();
    for (i, line) in trace.lines().enumerate() {
        let Some((tid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(resumed) = rest.strip_prefix("<... ") {
            if let Some(mut call) = pending.remove(tid) {
                call.end = i;
                call.args.push_str(resumed);
                calls.push(call);
            }
            continue;
        }
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let call = Call {
            name: name.to_string(),
            args: args.to_string(),
            start: i,
            end: i,
        };
        if rest.ends_with("<unfinished ...>") {
            pending.insert(tid.to_string(), call);
        } else {
            calls.push(call);
        }
    }
    calls.sort_by_key(|c| c.end);
    calls
}

/// What SIGKILL cannot show (the page cache survives a process crash), checked on the trace
/// instead: every file is replaced the durable way, and every 2xx about a job is sent only
/// once its record is durable. For each rename of a temporary file: the last write to it
/// returned, then an fsync of it returned, before the rename began; after the rename, an
/// fsync of its directory returned. For each 2xx answer naming a job: the last rename of that
/// job's file before it was followed by an fsync of `jobs/` that returned before the answer
/// was written. Returns how many renames and answers were checked.
fn check_durability_order(calls: &[Call], data: &Path) -> (usize, usize) {
    let data_text = data.display().to_string();
    let on = |call: &Call, path: &str| {
        call.args.starts_with(|c: char| c.is_ascii_digit())
            && call.args.contains(&format!("<{path}>"))
    };
    let mut renames = 0;
    // The executor's copies in run/ are not records: nothing reads them back after a crash.
    let executor_copy = format!("\"{data_text}/run/");
    for rename in calls
        .iter()
        .filter(|c| c.name == "rename" && !c.args.starts_with(&executor_copy))
    {
        let temp = rename
            .args
            .trim_start_matches('"')
            .split('"')
            .next()
            .expect("a rename names its source")
            .to_string();
        let dir = Path::new(&temp)
            .parent()
            .expect("a parent")
            .display()
            .to_string();
        let last_write = calls
            .iter()
            .filter(|c| c.name == "write" && on(c, &temp) && c.end < rename.start)
            .map(|c| c.end)
            .max()
            .unwrap_or_else(|| panic!("{temp} renamed without a write: {rename:?}"));
        assert!(
            calls.iter().any(|c| c.name == "fsync"
                && on(c, &temp)
                && c.start > last_write
                && c.end < rename.start),
            "{temp} was renamed into place without an fsync after its last write: {rename:?}"
        );
        assert!(
            calls
                .iter()
                .any(|c| c.name == "fsync" && on(c, &dir) && c.start > rename.end),
            "the rename of {temp} was never followed by an fsync of {dir}"
        );
        renames += 1;
    }
    let mut answers = 0;
    let jobs_dir = format!("{data_text}/jobs");
    for answer in calls
        .iter()
        .filter(|c| c.name == "writev" && c.args.contains("HTTP/1.1 2"))
    {
        let Some(id) = IDS.iter().find(|id| answer.args.contains(*id)) else {
            continue;
        };
        let temp = format!("{jobs_dir}/.{id}.json.tmp");
        let rename = calls
            .iter()
            .filter(|c| c.name == "rename" && c.args.contains(&format!("\"{temp}\"")))
            .filter(|c| c.end < answer.start)
            .map(|c| c.end)
            .max()
            .unwrap_or_else(|| panic!("a 2xx about {id} before any record of it: {answer:?}"));
        assert!(
            calls.iter().any(|c| c.name == "fsync"
                && on(c, &jobs_dir)
                && c.start > rename
                && c.end < answer.start),
            "a 2xx about {id} was sent before the fsync of jobs/ that makes its record durable: \
             {answer:?}"
        );
        answers += 1;
    }
    (renames, answers)
}

/// One run of the workload with strace logging (no injection): which calls the daemon makes,
/// from which threads, and in which order. Fails if the assumptions of the sweeps stop
/// holding (a durability call they do not sweep: fdatasync, renameat, renameat2, pwrite64,
/// ...; or fsync, rename and job-file writes spread over several threads, so that per-thread
/// counting would skip points), or if the order of the calls breaks a durability rule that a
/// process crash cannot reveal (see [`check_durability_order`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syscall_census() {
    const TRACED: &str = "fsync,fdatasync,sync_file_range,syncfs,rename,renameat,renameat2,\
                          write,pwrite64,writev,pwritev,pwritev2";
    const UNSWEPT: [&str; 8] = [
        "fdatasync",
        "sync_file_range",
        "syncfs",
        "renameat",
        "renameat2",
        "pwrite64",
        "pwritev",
        "pwritev2",
    ];
    let sandbox = Sandbox::new();
    let work_config = sandbox.path().join("workload.toml");
    let recover_config = sandbox.path().join("recover.toml");
    write_config(&work_config, &quiet(1));
    write_config(&recover_config, &quiet(0));
    let mut d = TestDaemon::start(&sandbox, &work_config, "workload").await;
    let data = fs::canonicalize(sandbox.data_dir()).expect("the data dir exists");
    let log = sandbox.path().join("census.trace");
    // -y: paths of descriptors; -s: enough of an HTTP answer to see which job it is about.
    let filter = vec![
        "-y".to_string(),
        "-s".to_string(),
        "200".to_string(),
        "-e".to_string(),
        format!("trace={TRACED}"),
    ];
    let mut inj = Injector::new(&sandbox, filter, AttachAt::Ready, log.clone());
    inj.attach(d.pid()).await;
    let mut ledger = Ledger::default();
    let result = workload(&mut d, &data, &mut ledger, &mut inj).await;
    assert!(result.is_ok(), "the workload under strace: {ledger:?}");
    inj.finish().await;
    verify(&sandbox, &recover_config, &ledger, false).await;

    let trace = fs::read_to_string(&log).expect("read the trace");
    // "<tid> <name>(<args>" starts a call; "<tid> <... name resumed>" continues one.
    let mut calls: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_thread: HashMap<(String, String), usize> = HashMap::new();
    let mut durable_threads: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let data_text = data.display().to_string();
    for line in trace.lines() {
        let Some((tid, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some((name, args)) = rest.trim_start().split_once('(') else {
            continue;
        };
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        *calls.entry(name.to_string()).or_default() += 1;
        *by_thread
            .entry((tid.to_string(), name.to_string()))
            .or_default() += 1;
        let on_data_file = args.contains(&format!("<{data_text}/jobs/."))
            || args.contains(&format!("<{data_text}/.queue.json.tmp>"));
        // The executor's copy of a running job's record for its trainer (run/) is not the
        // store's: it is replaced by a rename of its own, from another thread, and never
        // read back, so it is no durability point.
        let executor_copy = args.contains(&format!("\"{data_text}/run/"));
        let kind = match name {
            "rename" if executor_copy => continue,
            "fsync" | "rename" => name,
            "write" if on_data_file => "write to job and queue temp files",
            _ => continue,
        };
        *durable_threads
            .entry(kind.to_string())
            .or_default()
            .entry(tid.to_string())
            .or_default() += 1;
    }
    let count = |name: &str| calls.get(name).copied().unwrap_or(0);
    let most_per_thread = |name: &str| {
        by_thread
            .iter()
            .filter(|((_, n), _)| n == name)
            .map(|(_, c)| *c)
            .max()
            .unwrap_or(0)
    };
    let data_writes: usize = durable_threads
        .get("write to job and queue temp files")
        .map(|t| t.values().sum())
        .unwrap_or(0);
    report(&format!(
        "crash points census (the workload once, strace attached after boot): fsync {}, \
         rename {}, write {} ({data_writes} to job/queue temp files; at most {} on one \
         thread), writev {}; not called: {}",
        count("fsync"),
        count("rename"),
        count("write"),
        most_per_thread("write"),
        count("writev"),
        UNSWEPT
            .iter()
            .filter(|n| count(n) == 0)
            .copied()
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for name in UNSWEPT {
        assert_eq!(
            count(name),
            0,
            "the daemon now calls {name}, which the crash sweeps do not inject into: add a \
             sweep for it; trace: {}",
            log.display()
        );
    }
    assert!(
        count("fsync") > 0 && count("rename") > 0 && data_writes > 0 && count("writev") > 0,
        "the census saw too little: {calls:?}"
    );
    for (kind, threads) in &durable_threads {
        assert_eq!(
            threads.len(),
            1,
            "{kind} calls come from several threads {threads:?}: strace counts `when=K` per \
             thread, so the sweep would no longer reach every point"
        );
    }
    let (renames, answers) = check_durability_order(&parse_trace(&trace), &data);
    report(&format!(
        "crash points census: durability order holds for {renames} renames and {answers} 2xx \
         answers"
    ));
    assert!(
        renames >= 10 && answers == 6,
        "the order check saw too little: {renames} renames, {answers} answers"
    );
}
