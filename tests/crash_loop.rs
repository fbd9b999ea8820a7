//! Randomized crash loop: the real daemon, concurrent clients, and a SIGKILL (or SIGTERM) at
//! a random moment, round after round on one data dir; after each stop a paused restart must
//! hold every acknowledged job exactly once, nothing that was refused, the interrupted jobs
//! first in start order and the rest in the order they were acknowledged, and the data dir
//! must pass `training-worker check`.
//!
//! Each round:
//! 1. start the daemon with `max_concurrent` 0 or 1 (then short stub jobs run and finish);
//! 2. 4 to 8 clients submit jobs with their own v4 ids, some of them retrying ids whose fate
//!    an earlier crash left unknown; each answer is recorded as acknowledged (2xx), refused
//!    (4xx/5xx, or a connection that was never made) or unknown (the connection broke);
//! 3. stop it: SIGKILL during boot, just after the first 2xx, or somewhere in the burst; or
//!    SIGTERM in the burst, which must exit 0;
//! 4. read the job files as the crash left them, restart paused (`max_concurrent = 0`, boot
//!    time measured), and check the queue against the clients' records, the job files read
//!    before the restart and the stub trainer's records; then SIGTERM (exit 0), scan the data
//!    dir for temporary and empty files, and run `check` (exit 0).
//!
//! The data dir carries over from round to round (the queue grows) and is replaced by a fresh
//! one every `TW_CRASH_RESET_EVERY` rounds (default 20; 0: never). The seed is printed first;
//! `TW_CRASH_SEED` replays a run's choices (each round draws from its own generator, so round
//! N's plan does not depend on how earlier rounds went). `TW_CRASH_ROUNDS` sets the number of
//! rounds (default 100). A failed round prints what was wrong, the seed and the round, the
//! daemons' stderr, and keeps a copy of the data dir.

#[path = "e2e_support/mod.rs"]
#[allow(dead_code)]
mod support;

#[path = "reliability_support/mod.rs"]
#[allow(dead_code)]
mod reliability;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use reliability::{Leftover, Proc, Rng, http_client, leftovers, ms, percentile, run_check};
use support::{Sandbox, Settings, diffusion_job, text_job};

const DEFAULT_ROUNDS: usize = 100;
const DEFAULT_RESET_EVERY: usize = 20;
/// The daemons' `max_attempts`: a job whose every start is cut by a crash fails after this.
const MAX_ATTEMPTS: u64 = 3;
/// Trainer commands for the stub (tests/trainers/stub.sh): all short.
const MODELS: &[&str] = &["ok", "ok", "sleep:0.2", "sleep:1"];
/// Bounds on waits that should take milliseconds.
const READY_WITHIN: Duration = Duration::from_secs(20);
const EXIT_WITHIN: Duration = Duration::from_secs(15);
const FIRST_ACK_WITHIN: Duration = Duration::from_secs(20);
/// A client's bound on requests in one round, 503s included.
const MAX_REQUESTS_PER_CLIENT: usize = 400;

/// How a round's daemon is stopped.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// SIGKILL this long after the spawn, aiming before `/readyz` says 200.
    BootKill(Duration),
    /// SIGKILL sent by the client that gets the first 2xx, right when it gets it.
    FirstAck,
    /// SIGKILL this long after the first 2xx.
    MidBurst(Duration),
    /// SIGTERM this long after the first 2xx; the daemon must exit 0.
    Term(Duration),
}

impl Stop {
    fn is_crash(self) -> bool {
        !matches!(self, Stop::Term(_))
    }
}

#[derive(Clone, Debug)]
struct Plan {
    max_concurrent: usize,
    stop: Stop,
    clients: usize,
    /// Fresh submissions per client (a client stops earlier when the daemon is gone).
    per_client: usize,
}

impl Plan {
    fn draw(rng: &mut Rng, boot_estimate: Duration) -> Plan {
        let stop = match rng.below(100) {
            0..15 => Stop::BootKill(rng.duration_up_to(boot_estimate)),
            15..35 => Stop::FirstAck,
            35..80 => Stop::MidBurst(rng.duration_up_to(Duration::from_millis(300))),
            _ => Stop::Term(rng.duration_up_to(Duration::from_millis(200))),
        };
        Plan {
            max_concurrent: rng.below(2) as usize,
            stop,
            clients: rng.range(4, 8) as usize,
            per_client: rng.range(3, 20) as usize,
        }
    }
}

/// What became of a submitted id, as far as the clients know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// A 2xx came back: the job must exist from now on.
    Acked,
    /// A 4xx or 5xx came back: nothing may have been stored.
    Refused(u16),
    /// The connection could not be made: the request never left the client.
    NotSent,
    /// The connection broke after the request may have arrived: either way is right.
    Unknown,
}

/// One id the clients submitted, with what they know of it.
#[derive(Clone, Debug)]
struct Submission {
    body: Value,
    /// `r<round>c<client>s<seq>`, also sent in the body as an unknown field.
    tag: String,
    round: usize,
    /// When its first request was sent: the job cannot have arrived earlier.
    first_sent: Instant,
    /// When its first 2xx came back: the job had arrived by then.
    acked_at: Option<Instant>,
    fate: Fate,
    /// Seen stored at a check: it must stay stored.
    seen_stored: bool,
}

/// One request a client made.
#[derive(Debug)]
struct Attempt {
    id: String,
    body: Value,
    tag: String,
    retry: bool,
    sent: Instant,
    answered: Instant,
    outcome: Outcome,
}

#[derive(Debug)]
enum Outcome {
    Status(StatusCode, String),
    NotSent,
    Broken,
}

/// What the clients of a round share with the round's driver.
struct Shared {
    stop: CancellationToken,
    first_ack: OnceLock<Instant>,
    /// Set for [`Stop::FirstAck`]: the client that gets the first 2xx kills the daemon.
    kill_on_first_ack: Option<i32>,
    killed: AtomicBool,
}

/// A job file as found on disk.
#[derive(Clone, Debug)]
struct OnDisk {
    status: String,
    attempts: u64,
    started_at: Option<String>,
}

#[derive(Default)]
struct Totals {
    rounds: usize,
    acked: usize,
    refused: usize,
    not_sent: usize,
    unknown_left: usize,
    retry_requests: usize,
    lost: usize,
    duplicated: usize,
    unexpected: usize,
    crash_boots: Vec<Duration>,
    other_boots: Vec<Duration>,
    kills_before_ready: usize,
    boot_kill_rounds: usize,
    term_rounds: usize,
    trainer_starts: usize,
    interrupted_seen: usize,
    /// Empty trainer logs left by a crash before the trainer started (allowed, counted).
    empty_logs: HashSet<String>,
}

/// The run: the seed, the current sandbox and everything the clients ever submitted to it.
struct Run {
    seed: u64,
    sandbox: Sandbox,
    model: HashMap<String, Submission>,
    /// Trainer records already examined (they accumulate in one file per sandbox).
    records_seen: usize,
    client: reqwest::Client,
    totals: Totals,
    boot_times: Vec<Duration>,
    began: Instant,
    /// What the paused daemon said at the last check: its queue and every job by id.
    last_view: Option<(Vec<String>, HashMap<String, Value>)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_jobs_survive_random_crashes() {
    let seed = reliability::seed_from_env("TW_CRASH_SEED");
    let rounds = reliability::count_from_env("TW_CRASH_ROUNDS", DEFAULT_ROUNDS);
    let reset_every = reliability::count_from_env("TW_CRASH_RESET_EVERY", DEFAULT_RESET_EVERY);
    eprintln!(
        "crash_loop: seed={seed} rounds={rounds} reset_every={reset_every} \
         (replay with TW_CRASH_SEED={seed})"
    );
    let began = Instant::now();
    let mut run = Run {
        seed,
        sandbox: Sandbox::new(),
        model: HashMap::new(),
        records_seen: 0,
        client: http_client(Duration::from_secs(10)),
        totals: Totals::default(),
        boot_times: Vec::new(),
        last_view: None,
        began,
    };
    for round in 1..=rounds {
        if reset_every > 0 && round > 1 && (round - 1) % reset_every == 0 {
            run.reset();
        }
        run.round(round).await;
    }
    let summary = run.summary(began.elapsed());
    let t = &run.totals;
    eprintln!("{summary}");
    assert_eq!((t.lost, t.duplicated, t.unexpected), (0, 0, 0), "{summary}");
    assert!(t.acked > 0, "no job was ever acknowledged: {summary}");
    if t.boot_kill_rounds >= 5 {
        assert!(
            t.kills_before_ready > 0,
            "no boot-time kill landed before /readyz said 200: {summary}"
        );
    }
}

/// What the loop above cannot reach by chance: a crash inside boot's own write, the batch
/// that puts the jobs interrupted by the previous crash back in the queue. With two of them
/// (it takes `max_concurrent` 2), a kill between the batch's two renames leaves the first
/// one Queued (with its start time) and the second still Running. The next boot must still
/// put them first in the order they had started (CONTRACT.md 6), and `check` must be clean
/// after its graceful stop. Built from a real run: two trainers started, SIGKILL, then the
/// first job's file as boot rewrites it (status Queued, start time kept), which is the one
/// rename that landed. (strace -e inject=rename:delay_exit=1s on the boot reproduces the
/// same state with the daemon's own writes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_renames_of_the_boot_requeue_keeps_the_start_order() {
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings {
        max_concurrent: 2,
        ..Settings::default()
    });
    let daemon = sandbox.start().await;
    let first = daemon.submit(diffusion_job("sleep:60")).await;
    sandbox.trainer_started(&first, 1).await;
    let second = daemon.submit(diffusion_job("sleep:60")).await;
    sandbox.trainer_started(&second, 1).await;
    assert_eq!(
        daemon.queue().await,
        (vec![first.clone(), second.clone()], vec![])
    );
    daemon.kill();

    // Boot's requeue batch renamed the first job's new record, then died.
    let mut rewritten = sandbox.job_file(&first);
    assert_eq!(rewritten["status"], "Running", "{rewritten}");
    assert!(sandbox.job_file(&second)["started_at"].as_str() > rewritten["started_at"].as_str());
    rewritten["status"] = "Queued".into();
    rewritten["updated_at"] = chrono::Utc::now()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        .into();
    sandbox.write_data_file(
        &format!("jobs/{first}.json"),
        &serde_json::to_vec_pretty(&rewritten).expect("JSON"),
    );

    sandbox.configure(&Settings {
        max_concurrent: 0,
        ..Settings::default()
    });
    let daemon = sandbox.start().await;
    let queue = daemon.queue().await;
    let (status, _) = daemon.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    let (code, report) = run_check(&sandbox.data_dir());
    assert_eq!(
        queue,
        (vec![], vec![first.clone(), second.clone()]),
        "both jobs were running at the crash, {first} started first; the restart must queue \
         them in start order, not the one whose file still said Running first \
         (src/store/replay.rs requeue_order sorts Running and interrupted Queued jobs as two \
         groups). check after the stop exited {code:?}:\n{report}"
    );
    assert_eq!(code, Some(0), "check after the stop:\n{report}");
}

impl Run {
    /// The summary line: counts, and boot times after crashes.
    fn summary(&self, elapsed: Duration) -> String {
        let t = &self.totals;
        format!(
            "crash_loop summary: seed={} rounds={} acknowledged={} lost={} duplicated={} \
             unexpected={} refused={} not_sent={} unknown_unresolved={} retry_requests={} \
             boot_kills={} (before ready: {}) sigterm_rounds={} trainer_starts={} \
             interrupted_requeued={} empty_logs={} boot_after_crash p50={} p95={} max={} \
             (n={}) boot_after_sigterm p50={} max={} elapsed={:.1}s",
            self.seed,
            t.rounds,
            t.acked,
            t.lost,
            t.duplicated,
            t.unexpected,
            t.refused,
            t.not_sent,
            t.unknown_left + self.unknown_count(),
            t.retry_requests,
            t.boot_kill_rounds,
            t.kills_before_ready,
            t.term_rounds,
            t.trainer_starts,
            t.interrupted_seen,
            t.empty_logs.len(),
            ms(percentile(&t.crash_boots, 50.0)),
            ms(percentile(&t.crash_boots, 95.0)),
            ms(percentile(&t.crash_boots, 100.0)),
            t.crash_boots.len(),
            ms(percentile(&t.other_boots, 50.0)),
            ms(percentile(&t.other_boots, 100.0)),
            elapsed.as_secs_f64(),
        )
    }

    fn reset(&mut self) {
        self.totals.unknown_left += self.unknown_count();
        self.sandbox = Sandbox::new();
        self.model.clear();
        self.records_seen = 0;
    }

    fn unknown_count(&self) -> usize {
        self.model
            .values()
            .filter(|s| s.fate == Fate::Unknown)
            .count()
    }

    fn boot_estimate(&self) -> Duration {
        if self.boot_times.is_empty() {
            Duration::from_millis(30)
        } else {
            percentile(&self.boot_times, 50.0)
        }
    }

    fn spawn(&self, round: usize, tag: &str) -> Proc {
        let sandbox = &self.sandbox;
        Proc::spawn(
            &sandbox.config_file(),
            &sandbox.data_dir(),
            sandbox.path(),
            sandbox.path().join(format!("r{round:04}-{tag}.err")),
        )
    }

    async fn round(&mut self, round: usize) {
        let mut rng = Rng::derive(self.seed, round as u64, 0);
        let plan = Plan::draw(&mut rng, self.boot_estimate());
        let mut failures: Vec<String> = Vec::new();
        self.totals.rounds += 1;
        match plan.stop {
            Stop::BootKill(_) => self.totals.boot_kill_rounds += 1,
            Stop::Term(_) => self.totals.term_rounds += 1,
            _ => {}
        }

        // Ids whose fate an earlier crash left unknown: about half are retried now.
        let mut unknown: Vec<String> = self
            .model
            .iter()
            .filter(|(_, s)| s.fate == Fate::Unknown)
            .map(|(id, _)| id.clone())
            .collect();
        unknown.sort();
        let retries: Vec<String> = unknown.into_iter().filter(|_| rng.chance(0.5)).collect();

        // 1. Start the daemon.
        self.sandbox.configure(&Settings {
            max_concurrent: plan.max_concurrent,
            max_attempts: MAX_ATTEMPTS as u32,
            ..Settings::default()
        });
        let mut daemon = self.spawn(round, "run");
        let pid = daemon.pid();
        let shared = Arc::new(Shared {
            stop: CancellationToken::new(),
            first_ack: OnceLock::new(),
            kill_on_first_ack: matches!(plan.stop, Stop::FirstAck).then_some(pid),
            killed: AtomicBool::new(false),
        });
        let (base_tx, base_rx) = watch::channel(None::<String>);

        // 2. The clients, and (when jobs run) an observer of /v1/queue.
        let mut clients = Vec::new();
        for c in 0..plan.clients {
            let mine: Vec<(String, Value)> = retries
                .iter()
                .skip(c)
                .step_by(plan.clients)
                .map(|id| (id.clone(), self.model[id].body.clone()))
                .collect();
            clients.push(tokio::spawn(client(
                ClientPlan {
                    round,
                    index: c,
                    rng: Rng::derive(self.seed, round as u64, 1 + c as u64),
                    retries: mine,
                    fresh: plan.per_client,
                },
                shared.clone(),
                base_rx.clone(),
            )));
        }
        let seen_running = Arc::new(Mutex::new(HashSet::<String>::new()));
        let observer = (plan.max_concurrent > 0).then(|| {
            tokio::spawn(observe_queue(
                shared.clone(),
                base_rx.clone(),
                seen_running.clone(),
            ))
        });

        // 3. Stop it at the planned moment.
        let deadline = Instant::now() + FIRST_ACK_WITHIN;
        loop {
            if base_tx.borrow().is_none()
                && let Some(base) = daemon.base()
            {
                base_tx.send_replace(Some(base));
            }
            if !daemon.alive() && !shared.killed.swap(true, Ordering::SeqCst) {
                // `killed` also keeps the clients from signalling a pid about to be reaped.
                failures.push("the daemon died by itself before the planned stop".into());
                break;
            }
            let now = Instant::now();
            let fire = match plan.stop {
                Stop::BootKill(after) => now >= daemon.spawned_at + after,
                Stop::FirstAck => shared.killed.load(Ordering::SeqCst),
                Stop::MidBurst(after) | Stop::Term(after) => {
                    shared.first_ack.get().is_some_and(|at| now >= *at + after)
                }
            };
            if fire {
                match plan.stop {
                    Stop::FirstAck => {}
                    Stop::Term(_) => daemon.signal(libc::SIGTERM),
                    _ => {
                        shared.killed.store(true, Ordering::SeqCst);
                        daemon.signal(libc::SIGKILL);
                    }
                }
                break;
            }
            let clients_done = clients.iter().all(|c| c.is_finished());
            let needs_ack = !matches!(plan.stop, Stop::BootKill(_));
            if now >= deadline || (needs_ack && clients_done && shared.first_ack.get().is_none()) {
                failures.push(format!(
                    "no 2xx within {FIRST_ACK_WITHIN:?} of the spawn, or the clients gave up \
                     without one (clients done: {clients_done}; plan {plan:?})"
                ));
                shared.killed.store(true, Ordering::SeqCst);
                daemon.signal(libc::SIGKILL);
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let status = if plan.stop.is_crash() {
            daemon.reap()
        } else {
            match daemon.wait_exit(EXIT_WITHIN).await {
                Some(status) => status,
                None => {
                    failures.push(format!("SIGTERM: no exit within {EXIT_WITHIN:?}"));
                    daemon.kill()
                }
            }
        };
        shared.stop.cancel();
        let stderr = daemon.stderr();
        let was_ready = stderr.contains(reliability::READY_LINE);
        if matches!(plan.stop, Stop::BootKill(_)) && !was_ready {
            self.totals.kills_before_ready += 1;
        }
        if !plan.stop.is_crash() && status.code() != Some(0) {
            failures.push(format!("SIGTERM: exit {status}, expected 0"));
        }
        if plan.stop.is_crash() && status.code().is_some() {
            failures.push(format!(
                "the daemon exited by itself before the kill: {status}"
            ));
        }
        if stderr.contains("panicked") {
            failures.push("the daemon panicked".into());
        }

        // Every client's record, then the model.
        let mut attempts = Vec::new();
        for handle in clients {
            match tokio::time::timeout(EXIT_WITHIN, handle).await {
                Ok(Ok(mine)) => attempts.extend(mine),
                Ok(Err(e)) => failures.push(format!("a client task failed: {e}")),
                Err(_) => failures.push("a client did not finish".into()),
            }
        }
        if let Some(observer) = observer {
            let _ = tokio::time::timeout(EXIT_WITHIN, observer).await;
        }
        self.absorb(round, attempts, &mut failures);
        let seen_running: HashSet<String> = seen_running.lock().unwrap().clone();

        // 4. The data dir as the stop left it, then a paused restart.
        let before = self.read_job_files(&mut failures);
        let new_records = self.new_records();
        self.check_trainer_records(&plan, &new_records, &before, &mut failures);

        self.sandbox.configure(&Settings {
            max_concurrent: 0,
            max_attempts: MAX_ATTEMPTS as u32,
            ..Settings::default()
        });
        let mut paused = self.spawn(round, "paused");
        match paused.wait_ready(&self.client, READY_WITHIN).await {
            Ok(took) => {
                self.boot_times.push(took);
                if plan.stop.is_crash() {
                    self.totals.crash_boots.push(took);
                } else {
                    self.totals.other_boots.push(took);
                }
            }
            Err(e) => {
                failures.push(format!("the paused restart: {e}"));
                self.fail(round, &plan, &failures);
            }
        }
        let base = paused
            .base()
            .expect("a ready daemon has logged its address");
        self.check_restart(round, &base, &before, &seen_running, &mut failures)
            .await;
        // No trainer of a killed daemon survives the restart (the boot kills leftovers).
        let sandbox = &self.sandbox;
        let left = support::wait_until_or_timeout(Duration::from_secs(5), async || {
            sandbox.trainer_processes().is_empty().then_some(())
        })
        .await;
        if left.is_none() {
            failures.push(format!(
                "trainer processes outlived their daemon: {:?}",
                self.sandbox.trainer_processes()
            ));
        }

        paused.signal(libc::SIGTERM);
        match paused.wait_exit(EXIT_WITHIN).await {
            Some(status) if status.code() == Some(0) => {}
            Some(status) => failures.push(format!("the paused daemon's SIGTERM: exit {status}")),
            None => failures.push(format!(
                "the paused daemon did not exit within {EXIT_WITHIN:?} of SIGTERM"
            )),
        }
        self.check_stopped(&mut failures);

        if !failures.is_empty() {
            self.fail(round, &plan, &failures);
        }
    }

    /// Takes the clients' records into the model; counts what was lost to the clients.
    fn absorb(&mut self, round: usize, attempts: Vec<Attempt>, failures: &mut Vec<String>) {
        for a in attempts {
            assert!(
                a.retry || !self.model.contains_key(&a.id),
                "test bug: fresh id {} ({}) was used before",
                a.id,
                a.tag
            );
            let entry = self
                .model
                .entry(a.id.clone())
                .or_insert_with(|| Submission {
                    body: a.body.clone(),
                    tag: a.tag.clone(),
                    round,
                    first_sent: a.sent,
                    acked_at: None,
                    fate: Fate::NotSent,
                    seen_stored: false,
                });
            if a.retry {
                self.totals.retry_requests += 1;
            }
            match a.outcome {
                Outcome::Status(status, text) if status.is_success() => {
                    if status == StatusCode::OK && !a.retry {
                        failures.push(format!(
                            "{} ({}): a fresh id was answered 200 (already exists): {text}",
                            a.id, a.tag
                        ));
                        self.totals.unexpected += 1;
                    }
                    if status == StatusCode::CREATED && a.retry && entry.seen_stored {
                        failures.push(format!(
                            "{} ({}): a retry created anew a job seen stored before: {text}",
                            a.id, a.tag
                        ));
                        self.totals.duplicated += 1;
                    }
                    if entry.fate != Fate::Acked {
                        entry.fate = Fate::Acked;
                        entry.acked_at = Some(a.answered);
                        self.totals.acked += 1;
                    }
                }
                Outcome::Status(status, text) => {
                    if a.retry {
                        // A refusal of a retry says nothing about the first request.
                        if status == StatusCode::CONFLICT {
                            failures.push(format!(
                                "{} ({}): a retry with the same content got 409: {text}",
                                a.id, a.tag
                            ));
                        }
                    } else {
                        entry.fate = Fate::Refused(status.as_u16());
                        self.totals.refused += 1;
                    }
                }
                Outcome::NotSent => {
                    if !a.retry {
                        entry.fate = Fate::NotSent;
                        self.totals.not_sent += 1;
                    }
                }
                Outcome::Broken => {
                    if !a.retry {
                        entry.fate = Fate::Unknown;
                    }
                }
            }
        }
    }

    /// Every job file, parsed; an unreadable one is a failure (writes are atomic).
    fn read_job_files(&self, failures: &mut Vec<String>) -> HashMap<String, OnDisk> {
        let mut found = HashMap::new();
        let Ok(entries) = fs::read_dir(self.sandbox.jobs_dir()) else {
            return found;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                continue;
            }
            let Some(id) = name.strip_suffix(".json") else {
                failures.push(format!("jobs/{name}: not a job file name"));
                continue;
            };
            let bytes = fs::read(entry.path()).unwrap_or_default();
            let value: Value = match serde_json::from_slice(&bytes) {
                Ok(value) => value,
                Err(e) => {
                    failures.push(format!(
                        "jobs/{name}: unreadable after the stop ({e}; {} bytes)",
                        bytes.len()
                    ));
                    continue;
                }
            };
            if value["job_id"] != id {
                failures.push(format!("jobs/{name} holds job {}", value["job_id"]));
            }
            found.insert(
                id.to_string(),
                OnDisk {
                    status: value["status"].as_str().unwrap_or("?").to_string(),
                    attempts: value["attempts"].as_u64().unwrap_or(0),
                    started_at: value["started_at"].as_str().map(str::to_string),
                },
            );
        }
        found
    }

    /// The trainer records written since the last round: (kind, job, attempt).
    fn new_records(&mut self) -> Vec<(String, String, u32)> {
        let all = self.sandbox.records();
        let new: Vec<_> = all[self.records_seen.min(all.len())..]
            .iter()
            .map(|r| (r.kind.clone(), r.job.clone(), r.attempt))
            .collect();
        self.records_seen = all.len();
        new
    }

    /// The round's trainer runs: none when paused; one at a time otherwise; a trainer that
    /// was running at the stop had its Running record on disk (durable before the start).
    fn check_trainer_records(
        &mut self,
        plan: &Plan,
        records: &[(String, String, u32)],
        before: &HashMap<String, OnDisk>,
        failures: &mut Vec<String>,
    ) {
        let starts = records.iter().filter(|r| r.0 == "start").count();
        self.totals.trainer_starts += starts;
        if plan.max_concurrent == 0 && starts > 0 {
            failures.push(format!(
                "max_concurrent = 0, yet trainers started: {records:?}"
            ));
        }
        let mut running: Option<&(String, String, u32)> = None;
        for r in records {
            match r.0.as_str() {
                "start" => {
                    if let Some(other) = running {
                        failures.push(format!(
                            "with max_concurrent = 1, {r:?} started while {other:?} ran"
                        ));
                    }
                    running = Some(r);
                }
                "end" | "term" if running.is_some_and(|s| s.1 == r.1 && s.2 == r.2) => {
                    running = None;
                }
                _ => {}
            }
        }
        if plan.stop.is_crash()
            && let Some((_, job, attempt)) = running
        {
            // Its trainer died with the daemon: the job's last record is this start.
            let disk = before.get(job);
            if !disk.is_some_and(|d| d.status == "Running" && d.attempts == u64::from(*attempt)) {
                failures.push(format!(
                    "job {job}'s trainer (attempt {attempt}) ran at the crash, but its file \
                     says {disk:?}"
                ));
            }
        }
        if !plan.stop.is_crash() {
            // A graceful stop ends every trainer and writes its job back.
            for (kind, job, attempt) in records.iter().filter(|r| r.0 == "term") {
                let disk = before.get(job);
                let ok = disk.is_some_and(|d| {
                    d.status == "Queued"
                        && d.started_at.is_some()
                        && d.attempts + 1 == u64::from(*attempt)
                });
                if !ok {
                    failures.push(format!(
                        "job {job}'s trainer got {kind} (attempt {attempt}) at the SIGTERM, \
                         but its file says {disk:?} (expected Queued, started, attempt taken back)"
                    ));
                }
            }
            for (id, d) in before {
                if d.status == "Running" {
                    failures.push(format!("after exit 0, job {id}'s file still says Running"));
                }
            }
        }
    }

    /// The paused restart against everything known before it.
    async fn check_restart(
        &mut self,
        round: usize,
        base: &str,
        before: &HashMap<String, OnDisk>,
        seen_running: &HashSet<String>,
        failures: &mut Vec<String>,
    ) {
        let client = self.client.clone();
        let get = async |path: &str| -> Result<(StatusCode, String), String> {
            let reply = client
                .get(format!("{base}{path}"))
                .send()
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            let status = reply.status();
            let text = reply
                .text()
                .await
                .map_err(|e| format!("GET {path}: body: {e}"))?;
            Ok((status, text))
        };
        let json = |path: &str, reply: Result<(StatusCode, String), String>| -> Option<Value> {
            match reply {
                Ok((StatusCode::OK, text)) => serde_json::from_str(&text).ok(),
                other => {
                    eprintln!("GET {path}: {other:?}");
                    None
                }
            }
        };
        let Some(queue) = json("/v1/queue", get("/v1/queue").await) else {
            failures.push("GET /v1/queue failed".into());
            return;
        };
        let Some(list) = json("/v1/jobs", get("/v1/jobs").await) else {
            failures.push("GET /v1/jobs failed".into());
            return;
        };
        let ids_of = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let running = ids_of(&queue["running"]);
        let queued = ids_of(&queue["queued"]);
        if !running.is_empty() {
            failures.push(format!("paused, yet running: {running:?}"));
        }

        // Duplicates: in the queue, in the list.
        let mut jobs: HashMap<String, Value> = HashMap::new();
        for job in list.as_array().into_iter().flatten() {
            let id = job["job_id"].as_str().unwrap_or("?").to_string();
            if jobs.insert(id.clone(), job.clone()).is_some() {
                failures.push(format!("{id} is listed twice by GET /v1/jobs"));
                self.totals.duplicated += 1;
            }
        }
        let mut in_queue = HashSet::new();
        for id in running.iter().chain(&queued) {
            if !in_queue.insert(id.clone()) {
                failures.push(format!("{id} is in /v1/queue twice"));
                self.totals.duplicated += 1;
            }
        }

        // Every id the clients ever sent: acknowledged ones exist, refused ones do not.
        let jobs_dir = self.sandbox.jobs_dir();
        let mut ids: Vec<&String> = self.model.keys().collect();
        ids.sort();
        for id in ids {
            let s = &self.model[id];
            let listed = jobs.contains_key(id);
            let file = jobs_dir.join(format!("{id}.json")).exists();
            match s.fate {
                Fate::Acked if !listed || !file => {
                    failures.push(format!(
                        "LOST: {id} ({}) was acknowledged; listed={listed} file={file}",
                        s.tag
                    ));
                    self.totals.lost += 1;
                }
                Fate::Refused(_) | Fate::NotSent if listed || file => {
                    failures.push(format!(
                        "UNEXPECTED: {id} ({}) was {:?}, yet listed={listed} file={file}",
                        s.tag, s.fate
                    ));
                    self.totals.unexpected += 1;
                }
                Fate::Unknown if s.seen_stored && (!listed || !file) => {
                    failures.push(format!(
                        "LOST: {id} ({}) was stored at an earlier check; listed={listed} file={file}",
                        s.tag
                    ));
                    self.totals.lost += 1;
                }
                _ => {}
            }
        }
        for id in jobs.keys().chain(&in_queue) {
            if !self.model.contains_key(id) {
                failures.push(format!("UNEXPECTED: {id} was never submitted"));
                self.totals.unexpected += 1;
            }
        }
        for id in jobs.keys() {
            if let Some(s) = self.model.get_mut(id) {
                s.seen_stored = true;
            }
        }

        // This round's ids (and a sample of older ones) one by one.
        let mut rng = Rng::derive(self.seed, round as u64, 99);
        let mut probe: Vec<String> = self
            .model
            .iter()
            .filter(|(_, s)| s.round + 1 >= round || rng.chance(0.02))
            .map(|(id, _)| id.clone())
            .collect();
        probe.sort();
        for id in probe {
            let reply = get(&format!("/v1/jobs/{id}")).await;
            let s = &self.model[&id];
            match (&reply, s.fate, jobs.get(&id)) {
                (Ok((StatusCode::OK, text)), _, Some(listed)) => {
                    let one: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                    if &one != listed {
                        failures.push(format!(
                            "GET {id} differs from its listing: {one} vs {listed}"
                        ));
                    }
                }
                (Ok((StatusCode::NOT_FOUND, _)), fate, None) if fate != Fate::Acked => {}
                _ => failures.push(format!(
                    "GET /v1/jobs/{id} ({:?}, listed: {}): {reply:?}",
                    s.fate,
                    jobs.contains_key(&id)
                )),
            }
        }

        // Each job's state is one this test can produce, and its fields are what was sent.
        let all_records: Vec<(String, String, u32)> = self
            .sandbox
            .records()
            .into_iter()
            .map(|r| (r.kind, r.job, r.attempt))
            .collect();
        let ended: HashSet<(&str, u32)> = records_ended(&all_records);
        for (id, job) in &jobs {
            let Some(s) = self.model.get(id) else {
                continue;
            };
            for key in ["type", "model", "tw_test"] {
                if job[key] != s.body[key] {
                    failures.push(format!(
                        "{id}: {key} is {} but {} was sent",
                        job[key], s.body[key]
                    ));
                }
            }
            let status = job["status"].as_str().unwrap_or("?");
            let attempts = job["attempts"].as_u64().unwrap_or(0);
            let message = job["error_message"].as_str().unwrap_or("");
            match status {
                "Queued" => {
                    if !in_queue.contains(id) {
                        failures.push(format!("{id} is Queued but not in /v1/queue"));
                    }
                }
                "Completed" => {
                    if !ended.contains(&(id.as_str(), attempts as u32)) {
                        failures.push(format!(
                            "{id} is Completed (attempt {attempts}) but its trainer never ended that run"
                        ));
                    }
                }
                "Failed" if message.contains("max_attempts") && attempts >= MAX_ATTEMPTS => {}
                _ => failures.push(format!("{id}: unexpected state {job}")),
            }
            if status != "Queued" && in_queue.contains(id) {
                failures.push(format!("{id} is {status} but in /v1/queue"));
            }
        }

        // Boot against the files the stop left: attempts kept; Running requeued, or failed
        // once out of attempts; nothing else changed its status.
        for (id, d) in before {
            let Some(job) = jobs.get(id) else {
                failures.push(format!(
                    "LOST: {id} had a job file before the restart ({d:?})"
                ));
                self.totals.lost += 1;
                continue;
            };
            let now = job["status"].as_str().unwrap_or("?");
            let attempts = job["attempts"].as_u64().unwrap_or(0);
            let fine = match d.status.as_str() {
                "Running" if d.attempts >= MAX_ATTEMPTS => now == "Failed",
                "Running" => now == "Queued",
                other => now == other,
            };
            if !fine || attempts != d.attempts {
                failures.push(format!(
                    "{id}: before the restart {d:?}, after it {now} with {attempts} attempts"
                ));
            }
            if d.status == "Running" {
                self.totals.interrupted_seen += 1;
            }
        }

        // The order: interrupted jobs first by start, then the rest in arrival order.
        let started = |id: &String| {
            jobs.get(id)
                .and_then(|j| j["started_at"].as_str().map(str::to_string))
        };
        let split = queued
            .iter()
            .position(|id| started(id).is_none())
            .unwrap_or(queued.len());
        let (head, rest) = queued.split_at(split);
        if let Some(late) = rest.iter().find(|id| started(id).is_some()) {
            failures.push(format!(
                "{late} was started before (interrupted) but queues behind a job that never started: {queued:?}"
            ));
        }
        let mut expected_head: Vec<(chrono::DateTime<chrono::FixedOffset>, String)> = before
            .iter()
            .filter(|(_, d)| {
                (d.status == "Running" && d.attempts < MAX_ATTEMPTS)
                    || (d.status == "Queued" && d.started_at.is_some())
            })
            .map(|(id, d)| (parse_time(d.started_at.as_deref()), id.clone()))
            .collect();
        expected_head.sort();
        let expected_head: Vec<String> = expected_head.into_iter().map(|(_, id)| id).collect();
        if head != expected_head.as_slice() {
            failures.push(format!(
                "the interrupted jobs lead the queue in start order: expected {expected_head:?} \
                 (from the job files before the restart), found {head:?}"
            ));
        }
        for id in seen_running {
            if rest.contains(id) {
                failures.push(format!(
                    "{id} was seen running before the stop, yet queues among the never-started jobs"
                ));
            }
        }
        // Arrival order: a job acknowledged before another was sent queues ahead of it.
        let mut latest_sent: Option<(Instant, &String)> = None;
        for id in rest {
            let Some(s) = self.model.get(id) else {
                continue;
            };
            if let (Some(acked), Some((sent, other))) = (s.acked_at, latest_sent)
                && acked < sent
            {
                failures.push(format!(
                    "FIFO: {id} ({}) was acknowledged before {other} ({}) was sent, yet queues behind it",
                    s.tag, self.model[other].tag
                ));
            }
            if latest_sent.is_none_or(|(sent, _)| s.first_sent > sent) {
                latest_sent = Some((s.first_sent, id));
            }
        }
        let created: Vec<chrono::DateTime<chrono::FixedOffset>> = rest
            .iter()
            .map(|id| parse_time(jobs.get(id).and_then(|j| j["created_at"].as_str())))
            .collect();
        if created.windows(2).any(|w| w[0] >= w[1]) {
            failures.push("the never-started jobs do not queue by increasing created_at".into());
        }
        let expected_rest: HashSet<&String> = before
            .iter()
            .filter(|(_, d)| d.status == "Queued" && d.started_at.is_none())
            .map(|(id, _)| id)
            .collect();
        let found_rest: HashSet<&String> = rest.iter().collect();
        if expected_rest != found_rest {
            failures.push(format!(
                "the never-started jobs differ from the Queued files before the restart: \
                 missing {:?}, extra {:?}",
                expected_rest.difference(&found_rest).collect::<Vec<_>>(),
                found_rest.difference(&expected_rest).collect::<Vec<_>>()
            ));
        }
        self.last_view = Some((queued, jobs));
    }

    /// After the paused daemon's exit: no leftovers, one file per job matching what the API
    /// said, `queue.json` current, and `check` clean.
    fn check_stopped(&mut self, failures: &mut Vec<String>) {
        let data_dir = self.sandbox.data_dir();
        let started: HashSet<String> = self
            .sandbox
            .records()
            .into_iter()
            .filter(|r| r.kind == "start")
            .map(|r| r.job)
            .collect();
        for finding in leftovers(&data_dir) {
            // A trainer's log is opened (created) and then gets its attempt's header line,
            // both before the trainer is spawned; a crash in between leaves it empty. That
            // is a log, not state; it is allowed only while no trainer of the job ever ran.
            if let Leftover::Empty(path) = &finding
                && let Some(id) = path
                    .strip_prefix("logs")
                    .ok()
                    .and_then(|p| p.to_str())
                    .and_then(|name| name.strip_suffix(".log"))
                && !started.contains(id)
            {
                self.totals.empty_logs.insert(id.to_string());
                continue;
            }
            failures.push(format!("after the stop: {finding}"));
        }
        let Some((queued, jobs)) = self.last_view.take() else {
            return;
        };
        let files = self.read_job_files(failures);
        let mut names: Vec<&String> = files.keys().collect();
        names.sort();
        for id in names {
            match jobs.get(id) {
                None => failures.push(format!(
                    "jobs/{id}.json exists but the daemon did not list it"
                )),
                Some(job) => {
                    let d = &files[id];
                    if job["status"] != d.status.as_str() || job["attempts"] != d.attempts {
                        failures.push(format!("jobs/{id}.json says {d:?}, the daemon said {job}"));
                    }
                }
            }
        }
        for id in jobs.keys() {
            if !files.contains_key(id) {
                failures.push(format!("{id} was listed but has no job file"));
            }
        }
        let queue_file = fs::read(data_dir.join("queue.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        let expected = serde_json::json!({"running": [], "queued": queued});
        if queue_file.as_ref() != Some(&expected) {
            failures.push(format!(
                "queue.json after the stop: {queue_file:?}, expected {expected}"
            ));
        }
        let (code, report) = run_check(&data_dir);
        if code != Some(0) {
            failures.push(format!("check exited {code:?}:\n{report}"));
        }
    }

    /// Reports a failed round with everything needed to look into it, and panics.
    fn fail(&self, round: usize, plan: &Plan, failures: &[String]) -> ! {
        let keep = std::env::temp_dir().join(format!("tw-crash-loop-{}-round-{round}", self.seed));
        let _ = fs::remove_dir_all(&keep);
        reliability::copy_tree(self.sandbox.path(), &keep);
        let mut text = String::new();
        let _ = writeln!(
            text,
            "crash_loop failed: seed={} round={round} plan={plan:?} (replay: TW_CRASH_SEED={} \
             TW_CRASH_ROUNDS={round}); sandbox copied to {}",
            self.seed,
            self.seed,
            keep.display()
        );
        for f in failures {
            let _ = writeln!(text, "  - {f}");
        }
        let _ = writeln!(text, "so far: {}", self.summary(self.began.elapsed()));
        for tag in ["run", "paused"] {
            let path = self.sandbox.path().join(format!("r{round:04}-{tag}.err"));
            let _ = writeln!(text, "----- {} -----\n{}", path.display(), tail(&path, 60));
        }
        panic!("{text}");
    }
}

/// The (job, attempt) runs whose end the records show.
fn records_ended(records: &[(String, String, u32)]) -> HashSet<(&str, u32)> {
    records
        .iter()
        .filter(|r| r.0 == "end")
        .map(|r| (r.1.as_str(), r.2))
        .collect()
}

fn parse_time(text: Option<&str>) -> chrono::DateTime<chrono::FixedOffset> {
    text.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .unwrap_or_else(|| chrono::DateTime::UNIX_EPOCH.fixed_offset())
}

/// The last `lines` lines of a file.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

struct ClientPlan {
    round: usize,
    index: usize,
    rng: Rng,
    /// Ids to submit again with the same body, first.
    retries: Vec<(String, Value)>,
    /// New ids to submit after them.
    fresh: usize,
}

/// One client: waits until the daemon listens, then submits one job after another until its
/// plan is done or the daemon is gone. Never panics; records every request.
async fn client(
    mut plan: ClientPlan,
    shared: Arc<Shared>,
    mut base: watch::Receiver<Option<String>>,
) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    let base = tokio::select! {
        known = base.wait_for(|b| b.is_some()) => match known {
            Ok(b) => b.clone().expect("checked"),
            Err(_) => return attempts,
        },
        _ = shared.stop.cancelled() => return attempts,
    };
    let http = http_client(Duration::from_secs(10));
    let url = format!("{base}/v1/jobs");
    let mut retries: VecDeque<(String, Value, String)> = plan
        .retries
        .drain(..)
        .map(|(id, body)| {
            let tag = body["tw_test"].as_str().unwrap_or("?").to_string();
            (id, body, tag)
        })
        .collect();
    // Fresh submissions that got an answer other than 503 (not ready, or stopping); a 503
    // does not use up the budget, so a long replay does not leave a client with nothing.
    let mut answered_fresh = 0;
    let mut seq = 0;
    for _ in 0..MAX_REQUESTS_PER_CLIENT {
        if shared.stop.is_cancelled() || (retries.is_empty() && answered_fresh >= plan.fresh) {
            break;
        }
        let (id, body, tag, retry) = match retries.pop_front() {
            Some((id, body, tag)) => (id, body, tag, true),
            None => {
                let model = *plan.rng.pick(MODELS);
                let mut body = if plan.rng.chance(0.5) {
                    text_job(model)
                } else {
                    diffusion_job(model)
                };
                // Ids come from the OS, not the seed: they must never repeat, and nothing
                // depends on their value.
                let id = uuid::Uuid::new_v4().to_string();
                let tag = format!("r{}c{}s{seq}", plan.round, plan.index);
                seq += 1;
                body["job_id"] = Value::from(id.clone());
                body["tw_test"] = Value::from(tag.clone());
                (id, body, tag, false)
            }
        };
        let sent = Instant::now();
        let result = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        let outcome = match result {
            // The status line is the answer: a 2xx is sent only once the job is durable.
            Ok(reply) => {
                let status = reply.status();
                let text = reply.text().await.unwrap_or_default();
                Outcome::Status(status, text)
            }
            Err(e) if e.is_connect() => Outcome::NotSent,
            Err(_) => Outcome::Broken,
        };
        let answered = Instant::now();
        let mut gone = false;
        let mut backoff = false;
        match &outcome {
            Outcome::Status(status, _) if status.is_success() => {
                if shared.first_ack.set(answered).is_ok()
                    && let Some(pid) = shared.kill_on_first_ack
                    && !shared.killed.swap(true, Ordering::SeqCst)
                {
                    // SAFETY: kill only sends a signal; the driver reaps the daemon only
                    // after `killed` is set, so the pid is still the daemon's.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            Outcome::Status(StatusCode::SERVICE_UNAVAILABLE, _) => backoff = true,
            Outcome::Status(..) => {}
            Outcome::NotSent | Outcome::Broken => gone = true,
        }
        if retry && backoff {
            // Not ready yet: that says nothing about the id; ask again after the others.
            retries.push_back((id.clone(), body.clone(), tag.clone()));
        }
        if !retry && !backoff && !gone {
            answered_fresh += 1;
        }
        attempts.push(Attempt {
            id,
            body,
            tag,
            retry,
            sent,
            answered,
            outcome,
        });
        if gone {
            break;
        }
        if backoff {
            // Not ready yet (replaying) or stopping: a client backs off a little.
            let pause = Duration::from_millis(plan.rng.range(2, 8));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shared.stop.cancelled() => break,
            }
        }
    }
    attempts
}

/// Polls `/v1/queue` while the daemon lives and notes every job it saw running.
async fn observe_queue(
    shared: Arc<Shared>,
    mut base: watch::Receiver<Option<String>>,
    seen: Arc<Mutex<HashSet<String>>>,
) {
    let base = tokio::select! {
        known = base.wait_for(|b| b.is_some()) => match known {
            Ok(b) => b.clone().expect("checked"),
            Err(_) => return,
        },
        _ = shared.stop.cancelled() => return,
    };
    let http = http_client(Duration::from_secs(5));
    let url = format!("{base}/v1/queue");
    while !shared.stop.is_cancelled() {
        match http.get(&url).send().await {
            Ok(reply) if reply.status() == StatusCode::OK => {
                if let Ok(view) = reply.json::<Value>().await {
                    let mut seen = seen.lock().unwrap();
                    for id in view["running"].as_array().into_iter().flatten() {
                        if let Some(id) = id.as_str() {
                            seen.insert(id.to_string());
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}
