//! Power cuts: what survives when the machine loses power, not just the process.
//!
//! The real daemon runs under load (concurrent clients submitting jobs with their own ids and
//! cancelling some, short trainers running) with an LD_PRELOAD recorder
//! (`powercut_support/shim.c`, compiled here with the system `cc`) that notes, for every
//! `fsync`, `fdatasync` and `syncfs` under the data dir, what the call made durable: a copy of
//! the file's content, or the directory's entries, stamped with CLOCK_MONOTONIC. Then, for
//! many moments T of the run, `powercut_support` rebuilds the data dir a power cut at T would
//! leave (the model is described there: only what was synced survives, renames only with
//! their directory's fsync, unsynced data lost or zeroed), a paused daemon
//! (`max_concurrent = 0`) boots on it, and:
//! - every job whose 2xx a client had received by T is there exactly once, with the status it
//!   was acknowledged with or a later one (an acknowledged cancel stays Cancelled, and a final
//!   status a client was shown by T stays);
//! - nothing is there that no client had sent by T, no job is Cancelled whose cancel was not
//!   sent by T, and none is Completed or Failed whose trainer never started;
//! - `training-worker check` on the rebuilt dir reports nothing but temporary files (and "not
//!   a data dir" before anything was acknowledged), and passes after the restart's graceful
//!   stop.
//!
//! Cut moments are drawn among the clients' acknowledgements (the most demanding moment for a
//! job), the recorded syncs and renames (at the stamp and just before it), random moments of
//! the run, and its end. `TW_POWERCUT_CUTS` sets their number (default 60), `TW_POWERCUT_SEED`
//! replays a run's choices, `TW_POWERCUT_JOBS` the submissions per client (default 10, with 8
//! clients).
//!
//! `mutations_are_caught` proves that the check can fail: the recorder forgets some
//! durability points (`TW_PC_MUTATE`: every directory fsync; every sync of a job file; every
//! sync of a file under `journal/`), as if the store had not made them, or stamps every sync
//! 50 ms late (as if the daemon answered before its syncs returned), and the check must find
//! an acknowledged job lost. A mutation whose files the store does not have (no
//! `journal/` in the current file store) says so in one line.
//!
//! `the_recorder_sees_every_sync` runs a smaller workload under `strace -f` and holds the
//! record against what the kernel saw: every fsync, fdatasync and syncfs on a descriptor
//! under the data dir, and every rename there, is in the record, and the daemon makes none of
//! the durability calls the recorder does not follow (sync_file_range, sync, msync,
//! io_uring_setup). Writes through O_SYNC/O_DSYNC descriptors it does follow.
//!
//! Without `cc` the tests print one line and pass, except under `CI=true`, where `cc` is
//! always present and its absence fails them.

#[path = "e2e_support/mod.rs"]
#[allow(dead_code)]
mod support;

#[path = "reliability_support/mod.rs"]
#[allow(dead_code)]
mod reliability;

#[path = "powercut_support/mod.rs"]
#[allow(dead_code)]
mod powercut;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use powercut::{Record, Tail, now_ns};
use reliability::{Proc, Rng, http_client, run_check};
use support::{Sandbox, Settings, diffusion_job, text_job};

const DEFAULT_CUTS: usize = 60;
const DEFAULT_JOBS_PER_CLIENT: usize = 10;
const CLIENTS: usize = 8;
const MODELS: &[&str] = &["ok", "ok", "ok", "sleep:0.05", "fail:3"];
const READY_WITHIN: Duration = Duration::from_secs(20);
const EXIT_WITHIN: Duration = Duration::from_secs(15);

/// What the clients know of one job, stamped with CLOCK_MONOTONIC (ns).
#[derive(Clone, Debug)]
struct Ledger {
    id: String,
    /// When its submission was sent: it cannot exist before.
    sent: u64,
    /// When its 2xx came back: it must exist from then on.
    acked: Option<u64>,
    /// When a cancel of it was sent / answered 2xx.
    cancel_sent: Option<u64>,
    cancel_acked: Option<u64>,
    /// A final status a GET answered, and when: the daemon shows a status only once it is
    /// durable, so it must stay.
    seen_final: Option<(String, u64)>,
}

/// One recorded run of the daemon.
struct Recording {
    /// Holds the record's files and the trainers' records.
    _sandbox: Sandbox,
    record: Record,
    jobs: Vec<Ledger>,
    /// Jobs whose trainer started at least once.
    started: HashSet<String>,
    began: u64,
    ended: u64,
}

/// What a cut found wrong, by kind.
#[derive(Debug, Default)]
struct Findings {
    lost: Vec<String>,
    duplicated: Vec<String>,
    regressed: Vec<String>,
    unexpected: Vec<String>,
    other: Vec<String>,
    /// Acknowledged jobs that were checked.
    acked_checked: usize,
}

impl Findings {
    fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.regressed.is_empty()
            && self.unexpected.is_empty()
            && self.other.is_empty()
    }
}

/// Builds the recorder into `dir`, or says in one line why the suite cannot run (a failure
/// under `CI=true`, where `cc` is always present).
fn shim_or_skip(dir: &Path, test: &str) -> Option<PathBuf> {
    match powercut::build_shim(dir) {
        Ok(library) => Some(library),
        Err(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: the recorder could not be built under CI=true: {why}"
            );
            eprintln!("{test}: skipped, the recorder could not be built: {why}");
            None
        }
    }
}

/// How a recorded run's daemon is started.
enum Launch<'a> {
    /// Directly, by the sandbox.
    Direct,
    /// Under `strace -f -ff -y`, its trace going to `<prefix>.<pid>`.
    Traced(&'a Path),
}

/// Runs the daemon with the recorder under `clients` clients of `per_client` submissions
/// each, then kills it. `mutate` goes to the recorder; `sync` is `[store] sync`.
async fn record_run(
    shim: &Path,
    seed: u64,
    (clients, per_client): (usize, usize),
    mutate: Option<&str>,
    sync: &str,
    launch: Launch<'_>,
) -> Recording {
    let sandbox = Sandbox::new();
    let log_dir = sandbox.path().join("record");
    std::fs::create_dir_all(log_dir.join("snap")).expect("create the record dir");
    let mut env = vec![
        ("LD_PRELOAD", shim.display().to_string()),
        ("TW_PC_DATA_DIR", sandbox.data_dir().display().to_string()),
        ("TW_PC_LOG_DIR", log_dir.display().to_string()),
        ("TRAINING_WORKER_STORE_SYNC", sync.to_string()),
    ];
    if let Some(mutate) = mutate {
        env.push(("TW_PC_MUTATE", mutate.to_string()));
    }
    sandbox.configure(&Settings {
        max_concurrent: 1,
        ..Settings::default()
    });
    let began = now_ns();
    let (base, stop): (String, Box<dyn FnOnce()>) = match launch {
        Launch::Direct => {
            for (name, value) in env {
                sandbox.set_env(name, value);
            }
            let daemon = sandbox.start().await;
            (daemon.base().to_string(), Box::new(move || daemon.kill()))
        }
        Launch::Traced(prefix) => {
            let mut traced = traced_daemon(&sandbox, &env, prefix).await;
            let base = traced.base().expect("a ready daemon has an address");
            let pid = lock_holder(&sandbox.data_dir());
            (
                base,
                Box::new(move || {
                    // SAFETY: kill only sends a signal; the daemon is strace's child, which
                    // is not reaped until strace is.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                    traced.reap();
                }),
            )
        }
    };
    let mut tasks = Vec::new();
    for c in 0..clients {
        let rng = Rng::derive(seed, c as u64, 7);
        tasks.push(tokio::spawn(client(base.clone(), rng, per_client)));
    }
    let mut jobs = Vec::new();
    for task in tasks {
        jobs.extend(task.await.expect("a client task"));
    }
    let ended = now_ns();
    stop();
    let started = sandbox
        .records()
        .into_iter()
        .filter(|r| r.kind == "start")
        .map(|r| r.job)
        .collect();
    let record = Record::load(&log_dir);
    Recording {
        _sandbox: sandbox,
        record,
        jobs,
        started,
        began,
        ended,
    }
}

/// The daemon, with `env`, under `strace -f -ff -y` (syncs, renames and the durability calls
/// the recorder does not follow), once ready.
async fn traced_daemon(sandbox: &Sandbox, env: &[(&str, String)], prefix: &Path) -> Proc {
    let mut command = vec![
        "strace".to_string(),
        "-f".into(),
        "-ff".into(),
        "-qq".into(),
        "-y".into(),
        "-s".into(),
        "4096".into(),
        "-o".into(),
        prefix.display().to_string(),
        "-e".into(),
        format!("trace={TRACED}"),
    ];
    for (name, value) in env {
        command.push("-E".into());
        command.push(format!("{name}={value}"));
    }
    command.push("--".into());
    command.push(reliability::BIN.into());
    let mut daemon = Proc::spawn_wrapped(
        &command,
        &sandbox.config_file(),
        &sandbox.data_dir(),
        sandbox.path(),
        sandbox.path().join("traced.err"),
    );
    let http = http_client(Duration::from_secs(5));
    if let Err(e) = daemon.wait_ready(&http, READY_WITHIN).await {
        panic!("the traced daemon: {e}");
    }
    daemon
}

/// The calls the traced run follows.
const TRACED: &str = "fsync,fdatasync,syncfs,sync_file_range,sync,msync,io_uring_setup,\
                      rename,renameat,renameat2";

/// The pid in the data dir's lock file ("pid N on HOST, since ...").
fn lock_holder(data_dir: &Path) -> i32 {
    let text = std::fs::read_to_string(data_dir.join("lock")).expect("read the lock file");
    text.split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in the lock file: {text:?}"))
}

/// One client: submits `count` jobs one after another with its own ids; after each it looks
/// at one of its jobs, and after about a third of them it cancels one of its earlier jobs.
/// Every request is stamped.
async fn client(base: String, mut rng: Rng, count: usize) -> Vec<Ledger> {
    let http = http_client(Duration::from_secs(20));
    let mut mine: Vec<Ledger> = Vec::new();
    for _ in 0..count {
        let model = *rng.pick(MODELS);
        let mut body = if rng.chance(0.5) {
            text_job(model)
        } else {
            diffusion_job(model)
        };
        let id = uuid::Uuid::new_v4().to_string();
        body["job_id"] = Value::from(id.clone());
        let sent = now_ns();
        let reply = http
            .post(format!("{base}/v1/jobs"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        let acked = match reply {
            Ok(reply) if reply.status().is_success() => Some(now_ns()),
            _ => None,
        };
        mine.push(Ledger {
            id,
            sent,
            acked,
            cancel_sent: None,
            cancel_acked: None,
            seen_final: None,
        });
        // Look at one earlier job: a final status seen is one more thing to keep.
        let index = rng.below(mine.len() as u64) as usize;
        let target = &mut mine[index];
        if target.acked.is_some() && target.seen_final.is_none() {
            let reply = http
                .get(format!("{base}/v1/jobs/{}", target.id))
                .send()
                .await;
            if let Ok(reply) = reply
                && reply.status() == StatusCode::OK
                && let Ok(job) = reply.json::<Value>().await
            {
                let at = now_ns();
                let status = job["status"].as_str().unwrap_or("?");
                if matches!(status, "Completed" | "Failed" | "Cancelled") {
                    target.seen_final = Some((status.to_string(), at));
                }
            }
        }
        if mine.len() > 1 && rng.chance(0.3) {
            let index = rng.below(mine.len() as u64 - 1) as usize;
            let target = &mut mine[index];
            if target.acked.is_some() && target.cancel_sent.is_none() {
                target.cancel_sent = Some(now_ns());
                let reply = http
                    .post(format!("{base}/v1/jobs/{}/cancel", target.id))
                    .send()
                    .await;
                if let Ok(reply) = reply
                    && reply.status().is_success()
                {
                    target.cancel_acked = Some(now_ns());
                }
            }
        }
    }
    mine
}

impl Recording {
    /// The moments to cut at: acknowledgements, syncs and renames (at and just before their
    /// stamps), random moments, and the end of the run.
    fn cut_moments(&self, rng: &mut Rng, count: usize) -> Vec<u64> {
        let acks: Vec<u64> = self
            .jobs
            .iter()
            .flat_map(|j| [j.acked, j.cancel_acked])
            .flatten()
            .collect();
        let events: Vec<u64> = self
            .record
            .events
            .iter()
            .flat_map(|e| [e.t - 1, e.t])
            .collect();
        let mut cuts = vec![self.ended];
        while cuts.len() < count {
            let cut = match rng.below(3) {
                0 if !acks.is_empty() => *rng.pick(&acks),
                1 if !events.is_empty() => *rng.pick(&events),
                _ => rng.range(self.began, self.ended),
            };
            cuts.push(cut);
        }
        cuts.sort_unstable();
        cuts.dedup();
        cuts
    }

    /// Rebuilds the data dir of a cut at `cut`, boots a paused daemon on it and checks it.
    async fn check_cut(&self, cut: u64, tail: Tail, http: &reqwest::Client) -> Findings {
        let mut f = Findings::default();
        let at = Sandbox::new();
        at.configure(&Settings {
            max_concurrent: 0,
            ..Settings::default()
        });
        let data_dir = at.data_dir();
        self.record.rebuild(cut, tail, &data_dir);
        let anything_acked = self.jobs.iter().any(|j| j.acked.is_some_and(|a| a <= cut));

        // check, as the cut left it.
        let (_, report) = run_check(&data_dir);
        for problem in report.lines().filter(|l| l.starts_with("problem:")) {
            let allowed = problem.contains("temporary file left by an interrupted write")
                || (!anything_acked && problem.contains("not a data dir"));
            if !allowed {
                f.other.push(format!("check before the restart: {problem}"));
            }
        }

        let mut daemon = Proc::spawn(
            &at.config_file(),
            &data_dir,
            at.path(),
            at.path().join("paused.err"),
        );
        if let Err(e) = daemon.wait_ready(http, READY_WITHIN).await {
            f.other.push(format!("the paused restart: {e}"));
            return f;
        }
        let base = daemon.base().expect("a ready daemon has an address");
        let listed: Vec<Value> = match http.get(format!("{base}/v1/jobs")).send().await {
            Ok(reply) if reply.status() == StatusCode::OK => {
                reply.json().await.expect("a list of jobs")
            }
            other => {
                f.other.push(format!("GET /v1/jobs: {other:?}"));
                return f;
            }
        };
        let mut found: HashMap<String, (String, usize)> = HashMap::new();
        for job in &listed {
            let id = job["job_id"].as_str().unwrap_or("?").to_string();
            let status = job["status"].as_str().unwrap_or("?").to_string();
            found.entry(id).or_insert((status, 0)).1 += 1;
        }
        let by_id: HashMap<&str, &Ledger> = self.jobs.iter().map(|j| (j.id.as_str(), j)).collect();
        for j in &self.jobs {
            if j.acked.is_some_and(|a| a <= cut) {
                f.acked_checked += 1;
                match found.get(&j.id) {
                    None => f.lost.push(format!("{} (acknowledged)", j.id)),
                    Some((_, n)) if *n > 1 => f.duplicated.push(format!("{} ({n} times)", j.id)),
                    Some((status, _)) => {
                        if j.cancel_acked.is_some_and(|a| a <= cut) && status != "Cancelled" {
                            f.regressed
                                .push(format!("{}: cancel acknowledged, {status}", j.id));
                        }
                        if let Some((seen, at)) = &j.seen_final
                            && *at <= cut
                            && seen != status
                        {
                            f.regressed
                                .push(format!("{}: {seen} was shown, {status}", j.id));
                        }
                    }
                }
            }
        }
        for (id, (status, _)) in &found {
            let Some(j) = by_id.get(id.as_str()) else {
                f.unexpected.push(format!("{id}: never submitted"));
                continue;
            };
            if j.sent > cut {
                f.unexpected
                    .push(format!("{id}: {status}, but sent only after the cut"));
            }
            let ok = match status.as_str() {
                "Queued" => true,
                "Cancelled" => j.cancel_sent.is_some_and(|s| s <= cut),
                "Completed" | "Failed" => self.started.contains(id),
                _ => false,
            };
            if !ok {
                f.unexpected.push(format!("{id}: {status} ({j:?})"));
            }
        }

        daemon.signal(libc::SIGTERM);
        match daemon.wait_exit(EXIT_WITHIN).await {
            Some(status) if status.code() == Some(0) => {
                let (code, report) = run_check(&data_dir);
                if code != Some(0) {
                    f.other
                        .push(format!("check after the restart: {code:?}\n{report}"));
                }
            }
            other => f.other.push(format!(
                "the paused daemon's SIGTERM: {other:?}; stderr:\n{}",
                daemon.stderr()
            )),
        }
        f
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_jobs_survive_power_cuts() {
    let scratch = tempfile::tempdir().expect("a temp dir");
    let Some(shim) = shim_or_skip(scratch.path(), "powercut") else {
        return;
    };
    let seed = reliability::seed_from_env("TW_POWERCUT_SEED");
    let cuts = reliability::count_from_env("TW_POWERCUT_CUTS", DEFAULT_CUTS);
    let per_client = reliability::count_from_env("TW_POWERCUT_JOBS", DEFAULT_JOBS_PER_CLIENT);
    eprintln!("powercut: seed={seed} cuts={cuts} (replay with TW_POWERCUT_SEED={seed})");
    survive(&shim, seed, cuts, per_client, "fsync").await;
}

/// The same with `[store] sync = "syncfs"`: one syncfs makes a group's files durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_jobs_survive_power_cuts_with_syncfs() {
    let scratch = tempfile::tempdir().expect("a temp dir");
    let Some(shim) = shim_or_skip(scratch.path(), "powercut syncfs") else {
        return;
    };
    let seed = reliability::seed_from_env("TW_POWERCUT_SEED");
    let cuts = reliability::count_from_env("TW_POWERCUT_CUTS", DEFAULT_CUTS) / 3;
    let per_client = reliability::count_from_env("TW_POWERCUT_JOBS", DEFAULT_JOBS_PER_CLIENT) / 2;
    eprintln!("powercut syncfs: seed={seed} cuts={cuts} (replay with TW_POWERCUT_SEED={seed})");
    survive(&shim, seed, cuts.max(1), per_client.max(1), "syncfs").await;
}

async fn survive(shim: &Path, seed: u64, cuts: usize, per_client: usize, sync: &str) {
    let began = std::time::Instant::now();
    let run = record_run(
        shim,
        seed,
        (CLIENTS, per_client),
        None,
        sync,
        Launch::Direct,
    )
    .await;
    let (files, dirs, syncfs, renames, _) = run.record.counts();
    let acked = run.jobs.iter().filter(|j| j.acked.is_some()).count();
    assert!(acked > 0, "no submission was acknowledged");
    assert!(
        files + syncfs > 0 && dirs + syncfs > 0,
        "the recorder saw no sync: is it loaded? ({} events)",
        run.record.events.len()
    );
    let mut rng = Rng::derive(seed, 0xC07, 0);
    let moments = run.cut_moments(&mut rng, cuts);
    let http = http_client(Duration::from_secs(10));
    let mut checked = 0;
    let mut failures = Vec::new();
    for (n, &cut) in moments.iter().enumerate() {
        let tail = if n % 2 == 0 { Tail::Lost } else { Tail::Zeroed };
        let f = run.check_cut(cut, tail, &http).await;
        checked += f.acked_checked;
        if !f.is_clean() {
            failures.push(format!(
                "cut {n} at +{:.3} ms ({tail:?}): {f:#?}",
                (cut.saturating_sub(run.began)) as f64 / 1e6
            ));
        }
    }
    let summary = format!(
        "powercut summary ({sync}): seed={seed} jobs={} acknowledged={acked} cancels_acknowledged={} \
         final_statuses_seen={} trainer_starts={} record: file_syncs={files} dir_syncs={dirs} syncfs={syncfs} \
         renames={renames}; cuts={} acknowledged_jobs_checked={checked} failed_cuts={} \
         elapsed={:.1}s",
        run.jobs.len(),
        run.jobs.iter().filter(|j| j.cancel_acked.is_some()).count(),
        run.jobs.iter().filter(|j| j.seen_final.is_some()).count(),
        run.started.len(),
        moments.len(),
        failures.len(),
        began.elapsed().as_secs_f64()
    );
    eprintln!("{summary}");
    assert!(
        failures.is_empty(),
        "{summary}\n{}\n(replay with TW_POWERCUT_SEED={seed})",
        failures.join("\n")
    );
}

/// Each mutation makes the record forget durability points the store asks for; a cut must
/// then lose an acknowledged job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_are_caught() {
    let scratch = tempfile::tempdir().expect("a temp dir");
    let Some(shim) = shim_or_skip(scratch.path(), "powercut mutations") else {
        return;
    };
    let seed = reliability::seed_from_env("TW_POWERCUT_SEED");
    let http = http_client(Duration::from_secs(10));
    let mutations = [
        ("dirsync", "every directory fsync forgotten"),
        ("filesync:jobs/", "every sync of a job file forgotten"),
        (
            "filesync:journal/",
            "every sync of a journal file forgotten",
        ),
        (
            "late:50000000",
            "every sync stamped 50 ms late, as if answered before it was durable",
        ),
    ];
    let mut caught = Vec::new();
    for (mutation, what) in mutations {
        let run = record_run(&shim, seed, (4, 4), Some(mutation), "fsync", Launch::Direct).await;
        if !mutation.starts_with("late:") && run.record.forgotten().is_empty() {
            eprintln!("powercut mutation {mutation}: not applicable, no such call seen ({what})");
            continue;
        }
        // The end of the run first (every acknowledged job must be there), then each
        // acknowledgement.
        let mut moments = vec![run.ended];
        let mut acks: Vec<u64> = run.jobs.iter().filter_map(|j| j.acked).collect();
        acks.sort_unstable();
        moments.extend(acks);
        let mut found = None;
        for (n, &cut) in moments.iter().enumerate() {
            let f = run.check_cut(cut, Tail::Lost, &http).await;
            if !f.lost.is_empty() {
                found = Some((n + 1, f.lost.len(), f.acked_checked));
                break;
            }
        }
        let Some((cuts, lost, checked)) = found else {
            panic!(
                "mutation {mutation} ({what}; {} calls forgotten) was not caught: no cut lost \
                 an acknowledged job",
                run.record.forgotten().len()
            );
        };
        let forgotten = match run.record.forgotten().len() {
            0 => String::new(),
            n => format!(", {n} calls forgotten"),
        };
        eprintln!(
            "powercut mutation {mutation}: caught after {cuts} cut(s): {lost} of {checked} \
             acknowledged jobs lost ({what}{forgotten})"
        );
        caught.push(mutation);
    }
    // The journal's mutation applies only to a store that keeps one; the others always do.
    assert!(caught.len() >= 3, "caught only {caught:?}");
}

/// The record against what the kernel saw, in both sync modes: every successful fsync,
/// fdatasync and syncfs on a descriptor under the data dir, and every rename there, is in
/// the record; and the daemon makes none of the durability calls the recorder does not follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recorder_sees_every_sync() {
    let scratch = tempfile::tempdir().expect("a temp dir");
    let Some(shim) = shim_or_skip(scratch.path(), "powercut coverage") else {
        return;
    };
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "strace is missing under CI=true"
        );
        eprintln!("powercut coverage: skipped, strace is not installed");
        return;
    }
    let seed = reliability::seed_from_env("TW_POWERCUT_SEED");
    for sync in ["fsync", "syncfs"] {
        let prefix = scratch.path().join(format!("trace-{sync}"));
        let run = record_run(&shim, seed, (4, 4), None, sync, Launch::Traced(&prefix)).await;
        let data_dir = run._sandbox.data_dir().display().to_string();
        let mut kernel = Census::default();
        for entry in std::fs::read_dir(scratch.path()).expect("list the traces") {
            let path = entry.expect("an entry").path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if name.starts_with(&format!("trace-{sync}.")) {
                let text = std::fs::read_to_string(&path).expect("read a trace");
                kernel.add(&text, &data_dir);
            }
        }
        let (files, dirs, syncfs, renames, _) = run.record.counts();
        let recorded_syncs = run
            .record
            .events
            .iter()
            .filter(|e| {
                matches!(
                    e.kind,
                    powercut::Kind::File { .. } | powercut::Kind::Dir { .. }
                )
            })
            .filter(|e| !run.record.in_syncfs(e))
            .count();
        eprintln!(
            "powercut coverage ({sync}): kernel: {} fsync/fdatasync, {} syncfs, {} renames \
             under the data dir; record: {files} file and {dirs} directory snapshots, {syncfs} \
             syncfs, {renames} renames; other durability calls: {:?}",
            kernel.syncs, kernel.syncfs, kernel.renames, kernel.other
        );
        assert!(kernel.syncs > 0, "strace saw no sync under {data_dir}");
        assert_eq!(
            kernel.syncs, recorded_syncs,
            "fsync/fdatasync under the data dir"
        );
        assert_eq!(kernel.syncfs, syncfs, "syncfs calls");
        assert_eq!(kernel.renames, renames, "renames under the data dir");
        assert!(
            kernel.other.is_empty(),
            "durability calls the recorder does not follow: {:?}",
            kernel.other
        );
    }
}

/// What strace saw: successful syncs on descriptors under the data dir, renames there, and
/// any other durability call.
#[derive(Default)]
struct Census {
    syncs: usize,
    syncfs: usize,
    renames: usize,
    other: Vec<String>,
}

impl Census {
    fn add(&mut self, trace: &str, data_dir: &str) {
        for line in trace.lines() {
            let ok = line.trim_end().ends_with("= 0");
            let call = line.split('(').next().unwrap_or("");
            let under = |text: &str| {
                text.contains(&format!("<{data_dir}>")) || text.contains(&format!("<{data_dir}/"))
            };
            match call {
                "fsync" | "fdatasync" if ok && under(line) => self.syncs += 1,
                "syncfs" if ok => self.syncfs += 1,
                "rename" | "renameat" | "renameat2" if ok && line.contains(data_dir) => {
                    self.renames += 1
                }
                "fsync" | "fdatasync" | "syncfs" | "rename" | "renameat" | "renameat2" => {}
                _ if line.starts_with("+++") || line.starts_with("---") => {}
                _ => self.other.push(line.to_string()),
            }
        }
    }
}
