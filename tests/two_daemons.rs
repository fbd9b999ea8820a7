//! One daemon per data dir, under a crowd: 50 daemons started at once on one data dir, each
//! with its own listen port (port 0, read back from its log). Exactly one may win (become
//! ready); every other one must exit 75 quickly, with one line that names the lock holder's
//! pid, and must leave the data dir exactly as it was.
//!
//! - Races on a data dir path that does not exist yet (three nested levels).
//! - ONE daemon on a used data dir, its state settled; then 49 more at once against it: all
//!   exit 75 naming it, and the data dir (names, contents, modification times) is unchanged.
//! - Races on a used data dir whose lock file still names the previous, stopped daemon: the
//!   losers must name the live winner, not the stale holder.

#[path = "e2e_support/mod.rs"]
#[allow(dead_code)]
mod support;

#[path = "reliability_support/mod.rs"]
#[allow(dead_code)]
mod reliability;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use reliability::{Proc, http_client, ms, percentile, run_check, snapshot, snapshot_diff};
use support::{Sandbox, Settings, diffusion_job, secs, text_job, wait_until};

const RACERS: usize = 50;
/// How long a loser may take to exit (they take milliseconds; this is a generous bound).
const LOSER_EXIT_WITHIN: Duration = Duration::from_secs(10);
/// How long a whole race may take to settle.
const RACE_SETTLES_WITHIN: Duration = Duration::from_secs(30);
/// Races on a new data dir path, and on a used one. The holder is written into the lock file
/// just after the lock is taken, so a loser can misname it only in a narrow window; several
/// races make such a miss likely to show.
const FRESH_RACES: usize = 5;
const USED_RACES: usize = 3;

/// How a race ended.
struct Race {
    /// Daemons that became ready (and still run).
    winners: Vec<Proc>,
    /// Daemons that exited, with how long after their spawn.
    losers: Vec<(Proc, Duration)>,
}

impl Race {
    /// Everything about the race, for a failure message.
    fn describe(&self) -> String {
        let mut text = String::new();
        for w in &self.winners {
            let _ = writeln!(text, "winner pid {}: {}", w.pid(), w.stderr().trim());
        }
        for (l, took) in &self.losers {
            let _ = writeln!(
                text,
                "loser pid {} exited {:?} after {}: {}",
                l.pid(),
                l.exit_status().and_then(|s| s.code()),
                ms(*took),
                l.stderr().trim()
            );
        }
        text
    }

    fn exit_times(&self) -> Vec<Duration> {
        self.losers.iter().map(|(_, took)| *took).collect()
    }
}

/// Spawns `n` daemons on `data_dir` at once and waits until each one has either exited or
/// become ready (its "ready" log line, then `/readyz` 200 on its own port).
async fn run_race(sandbox: &Sandbox, data_dir: &Path, n: usize, tag: &str) -> Race {
    let mut racing: Vec<Proc> = (0..n)
        .map(|i| {
            Proc::spawn(
                &sandbox.config_file(),
                data_dir,
                sandbox.path(),
                sandbox.path().join(format!("{tag}-{i:02}.err")),
            )
        })
        .collect();
    let client = http_client(secs(2));
    let deadline = Instant::now() + RACE_SETTLES_WITHIN;
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    while !racing.is_empty() {
        let mut still = Vec::new();
        for mut p in racing {
            if p.poll_exit().is_some() {
                let took = p.exited_after().expect("reaped");
                losers.push((p, took));
                continue;
            }
            let ready = match p.base() {
                Some(base) if p.stderr().contains(reliability::READY_LINE) => client
                    .get(format!("{base}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == StatusCode::OK),
                _ => false,
            };
            if ready {
                winners.push(p);
            } else {
                still.push(p);
            }
        }
        racing = still;
        if racing.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let mut text = String::new();
            for p in &racing {
                let _ = writeln!(
                    text,
                    "pid {} neither exited nor became ready: {}",
                    p.pid(),
                    p.stderr().trim()
                );
            }
            panic!("the race did not settle within {RACE_SETTLES_WITHIN:?}:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Race { winners, losers }
}

/// Checks every loser: exit 75 within the bound, one line, no panic (asserted at once).
/// Returns the losers whose line does not name `holder`, the daemon that held the lock.
fn check_losers(race: &Race, holder: i32) -> Vec<String> {
    // The holder's own line ("pid N on HOST, since T") once it has written it; before that,
    // the pid the kernel's lock table gives ("pid N").
    let names_fully = format!("in use by another training-worker (pid {holder} on ");
    let names_by_pid = format!("in use by another training-worker (pid {holder})");
    let mut misnamed = Vec::new();
    for (p, took) in &race.losers {
        let stderr = p.stderr();
        let context = || {
            format!(
                "loser pid {}: {stderr}\nrace:\n{}",
                p.pid(),
                race.describe()
            )
        };
        assert_eq!(
            p.exit_status().and_then(|s| s.code()),
            Some(75),
            "{}",
            context()
        );
        assert!(
            *took <= LOSER_EXIT_WITHIN,
            "exited after {took:?}; {}",
            context()
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one line; {}", context());
        for noise in ["panicked", "backtrace"] {
            assert!(!stderr.contains(noise), "{noise}; {}", context());
        }
        if !stderr.contains(&names_fully) && !stderr.contains(&names_by_pid) {
            let said = stderr
                .split("in use by another training-worker")
                .nth(1)
                .unwrap_or(&stderr)
                .trim()
                .to_string();
            misnamed.push(format!(
                "loser pid {} (exited after {}) said {said:?}; the holder was pid {holder}",
                p.pid(),
                ms(*took)
            ));
        }
    }
    let times = race.exit_times();
    eprintln!(
        "  {} losers exited 75 in: median {}, max {}; {} did not name the holder",
        race.losers.len(),
        ms(percentile(&times, 50.0)),
        ms(percentile(&times, 100.0)),
        misnamed.len()
    );
    misnamed
}

/// Fails with every misnamed loser, if there is one; `hint` says what is suspected.
fn assert_all_named(misnamed: &[String], losers: usize, lock_file_before: &str, hint: &str) {
    assert!(
        misnamed.is_empty(),
        "{} of {losers} losers did not name the daemon that held the lock ({lock_file_before}); \
         CONTRACT.md 2 wants exit 75 with a message that names the lock holder.{hint}\n{}",
        misnamed.len(),
        misnamed.join("\n")
    );
}

/// What a race's misnamed losers point to.
const RACE_HINT: &str = " A loser whose flock fails reads data/lock before the winner has \
    written itself into it (src/store/lock.rs: try_lock, then set_len(0) and write), so it \
    names no holder, or the previous, dead one.";

/// The single winner of a race, checked to hold the lock and to be named in the lock file.
fn sole_winner(mut race: Race, data_dir: &Path) -> (Proc, Race) {
    assert_eq!(
        race.winners.len(),
        1,
        "exactly one daemon wins the data dir; race:\n{}",
        race.describe()
    );
    let winner = race.winners.pop().expect("one winner");
    let lock = std::fs::read_to_string(data_dir.join("lock")).unwrap_or_default();
    assert!(
        lock.starts_with(&format!("pid {} on ", winner.pid())),
        "the lock file names the winner {}: {lock:?}",
        winner.pid()
    );
    (winner, race)
}

/// SIGTERM: exit 0; then `check` is clean.
async fn stop_and_check(mut winner: Proc, data_dir: &Path) {
    winner.signal(libc::SIGTERM);
    let status = winner.wait_exit(secs(15)).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "the winner stops gracefully: {status:?}; stderr:\n{}",
        winner.stderr()
    );
    let (code, report) = run_check(data_dir);
    assert_eq!(code, Some(0), "check after the race:\n{report}");
}

async fn get_json(client: &reqwest::Client, base: &str, path: &str) -> Value {
    let reply = client
        .get(format!("{base}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(reply.status(), StatusCode::OK, "GET {path}");
    reply.json().await.expect("JSON")
}

async fn post_job(client: &reqwest::Client, base: &str, body: &Value) -> String {
    let reply = client
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("POST /v1/jobs");
    assert_eq!(reply.status(), StatusCode::CREATED, "POST {body}");
    let job: Value = reply.json().await.expect("JSON");
    job["job_id"].as_str().expect("job_id").to_string()
}

/// Makes the sandbox's data dir a used one: finished, failed and cancelled jobs, logs, and a
/// lock file that names a daemon that has stopped. Configures the next daemons paused.
/// Returns the jobs with their statuses.
async fn used_data_dir(sandbox: &Sandbox) -> [(String, &'static str); 3] {
    let first = sandbox.start().await;
    let done = first.submit(diffusion_job("ok")).await;
    let failed = first.submit(text_job("fail:3")).await;
    first.wait_status(&failed, "Failed", secs(20)).await;
    first.wait_status(&done, "Completed", secs(20)).await;
    let cancelled = first.submit(diffusion_job("sleep:60")).await;
    sandbox.trainer_started(&cancelled, 1).await;
    assert_eq!(first.cancel(&cancelled).await.status, StatusCode::OK);
    let (status, _) = first.terminate(secs(15)).await;
    assert_eq!(status.code(), Some(0));
    sandbox.configure(&Settings {
        max_concurrent: 0,
        ..Settings::default()
    });
    [
        (done, "Completed"),
        (failed, "Failed"),
        (cancelled, "Cancelled"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_daemons_racing_for_a_data_dir_that_does_not_exist_yet_one_wins() {
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings {
        max_concurrent: 0,
        ..Settings::default()
    });
    let client = http_client(secs(10));
    let mut misnamed = Vec::new();
    let mut losers = 0;
    for round in 1..=FRESH_RACES {
        let data_dir: PathBuf = sandbox.path().join(format!("fresh-{round}/a/b/data"));
        assert!(!data_dir.exists() && !data_dir.parent().unwrap().exists());
        eprintln!("race {round}: {RACERS} daemons on {}", data_dir.display());
        let race = run_race(&sandbox, &data_dir, RACERS, &format!("fresh{round}")).await;
        let (mut winner, race) = sole_winner(race, &data_dir);
        assert_eq!(race.losers.len(), RACERS - 1);
        misnamed.extend(check_losers(&race, winner.pid()));
        losers += race.losers.len();

        // The winner owns a working data dir.
        let base = winner.base().expect("a ready daemon has an address");
        let id = post_job(&client, &base, &diffusion_job("ok")).await;
        let job = get_json(&client, &base, &format!("/v1/jobs/{id}")).await;
        assert_eq!(job["status"], "Queued", "{job}");
        stop_and_check(winner, &data_dir).await;
        assert!(data_dir.join(format!("jobs/{id}.json")).exists());
    }
    assert_all_named(&misnamed, losers, "the lock file was new", RACE_HINT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_nine_daemons_against_a_running_one_exit_75_and_leave_the_data_dir_untouched() {
    let sandbox = Sandbox::new();
    let data_dir = sandbox.data_dir();
    let jobs = used_data_dir(&sandbox).await;

    // ONE daemon first (paused), with queued jobs, its state settled on disk.
    let client = http_client(secs(10));
    let mut holder = Proc::spawn(
        &sandbox.config_file(),
        &data_dir,
        sandbox.path(),
        sandbox.path().join("holder.err"),
    );
    holder
        .wait_ready(&client, secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let base = holder.base().expect("a ready daemon has an address");
    let mut queued = Vec::new();
    for model in ["ok", "sleep:1", "ok"] {
        queued.push(post_job(&client, &base, &diffusion_job(model)).await);
    }
    // queue.json's two lists; the API adds why the jobs wait (here: max_concurrent = 0).
    let expected = serde_json::json!({"running": [], "queued": queued});
    let lists =
        |view: Value| serde_json::json!({"running": view["running"], "queued": view["queued"]});
    assert_eq!(lists(get_json(&client, &base, "/v1/queue").await), expected);
    wait_until("queue.json lists the queued jobs", secs(5), async || {
        let text = std::fs::read(data_dir.join("queue.json")).ok()?;
        let value: Value = serde_json::from_slice(&text).ok()?;
        (value == expected).then_some(())
    })
    .await;
    let before = snapshot(&data_dir);

    // 49 more at once against it: all lose, name it, and change nothing.
    eprintln!(
        "race against a running daemon (pid {}): {} daemons",
        holder.pid(),
        RACERS - 1
    );
    let crowd = run_race(&sandbox, &data_dir, RACERS - 1, "crowd").await;
    assert!(
        crowd.winners.is_empty(),
        "nobody wins a data dir that a live daemon holds; race:\n{}",
        crowd.describe()
    );
    assert_eq!(crowd.losers.len(), RACERS - 1);
    let after = snapshot(&data_dir);
    let diff = snapshot_diff(&before, &after);
    assert!(
        diff.is_empty(),
        "the losers changed the data dir:\n{}",
        diff.join("\n")
    );
    let misnamed = check_losers(&crowd, holder.pid());
    assert_all_named(
        &misnamed,
        crowd.losers.len(),
        "a live daemon that had long written itself into the lock file",
        "",
    );

    // The running daemon never noticed: same queue, same jobs.
    assert!(
        holder.poll_exit().is_none(),
        "the running daemon still runs"
    );
    assert_eq!(lists(get_json(&client, &base, "/v1/queue").await), expected);
    for (id, status) in &jobs {
        let job = get_json(&client, &base, &format!("/v1/jobs/{id}")).await;
        assert_eq!(job["status"], *status, "{job}");
    }
    stop_and_check(holder, &data_dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_daemons_racing_for_a_used_data_dir_name_the_winner_not_the_previous_holder() {
    let sandbox = Sandbox::new();
    let data_dir = sandbox.data_dir();
    let jobs = used_data_dir(&sandbox).await;
    let client = http_client(secs(10));
    let mut misnamed = Vec::new();
    let mut losers = 0;
    for round in 1..=USED_RACES {
        // The lock file names the previous daemon, which has stopped.
        let stale = std::fs::read_to_string(data_dir.join("lock")).expect("the lock file stays");
        eprintln!(
            "race {round} on a used data dir (lock file: {}): {RACERS} daemons",
            stale.trim()
        );
        let race = run_race(&sandbox, &data_dir, RACERS, &format!("used{round}")).await;
        let (mut winner, race) = sole_winner(race, &data_dir);
        misnamed.extend(check_losers(&race, winner.pid()));
        losers += race.losers.len();
        let base = winner.base().expect("a ready daemon has an address");
        for (id, status) in &jobs {
            let job = get_json(&client, &base, &format!("/v1/jobs/{id}")).await;
            assert_eq!(job["status"], *status, "{job}");
        }
        stop_and_check(winner, &data_dir).await;
    }
    assert_all_named(
        &misnamed,
        losers,
        "the lock file named the previous daemon, which had stopped",
        RACE_HINT,
    );
}
