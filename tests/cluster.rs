//! Several daemons ("nodes") sharing one PostgreSQL queue, with the real binary, real stub
//! trainers and real signals, against a throwaway PostgreSQL server of the test's own (see
//! `e2e_support/pg.rs`; without server binaries a test says SKIPPED in one line, and under
//! `CI` that is a failure):
//! - 2,000 jobs submitted through three nodes at once each run exactly once, and every node
//!   lists them all;
//! - a SIGKILLed node's running job runs first on another node within 30 s with the default
//!   lease, its attempt counted;
//! - a SIGSTOPped node's trainer is stopped before its lease lapses and another node starts
//!   the job, and after SIGCONT the paused node's late writes are refused;
//! - a cancel sent to one node stops the trainer on another;
//! - the database restarted under load loses nothing acknowledged;
//! - random node kills over many rounds lose nothing and duplicate nothing
//!   (`TW_CLUSTER_ROUNDS`, `TW_CLUSTER_SEED` replays a run);
//! - two live nodes with one id: the second exits 75.
//!
//! Every node has its own data dir and port; the stub trainers of all of them write to one
//! record file, and each trainer holds a lock on its job while it runs, so that two trainers
//! of one job at once are seen whichever nodes they run on (see `cluster_support`). The
//! tests run one at a time.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "reliability_support/mod.rs"]
mod reliability;

#[path = "cluster_support/mod.rs"]
mod cluster;

#[path = "cluster_support/kills.rs"]
mod kills;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use cluster::{Cluster, Fate, Node, one_at_a_time, submit};
use support::pg::{Postgres, skip};
use support::{Settings, pid_alive, secs, text_job, wait_until};

/// The bound on a takeover with the default lease (15 s).
const TAKEOVER_BOUND: Duration = Duration::from_secs(30);

/// A text job for the stub trainer `model` with the given id.
fn job_with_id(id: &str, model: &str) -> Value {
    let mut job = text_job(model);
    job["job_id"] = Value::from(id);
    job
}

/// Settings with `max_concurrent` slots per node.
fn slots(max_concurrent: usize) -> Settings {
    Settings {
        max_concurrent,
        ..Settings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_live_node_with_the_same_id_exits_75_naming_it() {
    const TEST: &str = "a_second_live_node_with_the_same_id_exits_75_naming_it";
    let Some(server) = Postgres::shared(TEST) else {
        return;
    };
    let _machine = one_at_a_time().await;
    let cluster = Cluster::new(server.database(), &slots(1), None);
    let first = cluster.start("gpu-box-1").await;
    // The same id from another data dir and port.
    let mut twin = cluster.spawn("gpu-box-1", "twin");
    let status = twin.wait_exit(secs(20)).await;
    let stderr = twin.stderr();
    assert_eq!(status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("gpu-box-1"), "names the node id: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Another id shares the queue, and the first node serves on.
    let second = cluster.start("gpu-box-2").await;
    let id = second.submit(text_job("ok")).await;
    first.wait_status_on(&id, "Completed", secs(30)).await;
    second.wait_status_on(&id, "Completed", secs(30)).await;
    assert_eq!(cluster.sandbox.starts(), [(id.clone(), 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_jobs_through_three_nodes_at_once_each_run_exactly_once() {
    const TEST: &str = "two_thousand_jobs_through_three_nodes_at_once_each_run_exactly_once";
    // `TW_CLUSTER_JOBS` makes it smaller or larger.
    let count = reliability::count_from_env("TW_CLUSTER_JOBS", 2_000);
    const CLIENTS: usize = 24;
    let Some(server) = Postgres::shared(TEST) else {
        return;
    };
    let _machine = one_at_a_time().await;
    let cluster = Cluster::new(server.database(), &slots(3), None);
    let ids = ["a", "b", "c"];
    let mut nodes = Vec::new();
    for id in ids {
        nodes.push(cluster.start(id).await);
    }

    // Many clients at once, each on one node, each job with an id of its own.
    let next = AtomicUsize::new(0);
    let submitted = Mutex::new(Vec::with_capacity(count));
    let http = reliability::http_client(secs(30));
    let clients = (0..CLIENTS).map(|c| {
        let (node, next, submitted, http) = (&nodes[c % nodes.len()], &next, &submitted, &http);
        async move {
            while next.fetch_add(1, Ordering::SeqCst) < count {
                let id = uuid::Uuid::new_v4().to_string();
                let fate = submit(http, node.base(), &job_with_id(&id, "ok")).await;
                assert_eq!(fate, Fate::Acked, "submission {id} to node {}", node.id);
                submitted.lock().expect("ids").push(id);
            }
        }
    });
    let began = Instant::now();
    futures_util::future::join_all(clients).await;
    let submitted: HashSet<String> = submitted.into_inner().expect("ids").into_iter().collect();
    assert_eq!(submitted.len(), count);
    eprintln!("{count} jobs acknowledged in {:?}", began.elapsed());

    // Every node sees every job end Completed (the queue first: it is cheap to ask for).
    for node in &nodes {
        cluster.wait_settled(server, node, secs(600)).await;
        cluster.wait_completed(server, node, count, secs(300)).await;
    }
    eprintln!("all Completed after {:?}", began.elapsed());

    // Each ran exactly once, on one node, never beside another trainer of itself.
    let starts = cluster.sandbox.starts();
    let mut once: HashMap<&str, u32> = HashMap::new();
    for (job, attempt) in &starts {
        assert_eq!(*attempt, 1, "job {job} started attempt {attempt}");
        *once.entry(job).or_default() += 1;
    }
    let twice: Vec<_> = once.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "jobs started more than once: {twice:?}");
    assert_eq!(
        once.keys().map(|k| k.to_string()).collect::<HashSet<_>>(),
        submitted,
        "the trainers started are the jobs submitted"
    );
    cluster.assert_no_overlap();
    let (per_node, in_two) = cluster.logs_by_node(&ids);
    eprintln!("jobs run per node: {per_node:?}");
    assert!(in_two.is_empty(), "jobs with logs on two nodes: {in_two:?}");

    // Every node lists every job once, Completed after one attempt.
    for node in &nodes {
        let jobs = node.jobs().await;
        let listed: HashSet<&str> = jobs.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(jobs.len(), count, "node {} lists each job once", node.id);
        assert_eq!(listed.len(), count, "node {} lists each job once", node.id);
        for (id, job) in &jobs {
            assert!(submitted.contains(id), "node {} lists {id}", node.id);
            assert_eq!(job["status"], "Completed", "{job}");
            assert_eq!(job["attempts"], 1, "{job}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_nodes_job_runs_first_on_another_node_within_30s_with_the_default_lease() {
    const TEST: &str =
        "a_sigkilled_nodes_job_runs_first_on_another_node_within_30s_with_the_default_lease";
    let Some(server) = Postgres::shared(TEST) else {
        return;
    };
    let _machine = one_at_a_time().await;
    // The default lease (15 s): no TRAINING_WORKER_CLUSTER_LEASE.
    let cluster = Cluster::new(server.database(), &slots(1), None);
    let mut nodes: HashMap<String, Node> = HashMap::new();
    for id in ["a", "b"] {
        nodes.insert(id.to_string(), cluster.start(id).await);
    }

    // The job runs on one node (the victim), a held blocker on the other, two more wait.
    let job = cluster.held_id();
    nodes["a"].submit(job_with_id(&job, "ok")).await;
    let (trainer, victim) = cluster.started(&job, 1, secs(30)).await;
    let other = if victim == "a" { "b" } else { "a" }.to_string();
    let victim_node = nodes.remove(&victim).expect("the victim");
    let survivor = nodes.remove(&other).expect("the other node");
    let blocker = cluster.held_id();
    victim_node.submit(job_with_id(&blocker, "ok")).await;
    let (_, blocker_node) = cluster.started(&blocker, 1, secs(30)).await;
    assert_eq!(blocker_node, other, "the victim's only slot is taken");
    let waiting = [
        victim_node.submit(text_job("ok")).await,
        survivor.submit(text_job("ok")).await,
    ];
    let mut last = None;
    let shown = support::wait_until_or_timeout(secs(30), async || {
        let queued = survivor.queue().await.1;
        let done = queued == waiting;
        last = Some(queued);
        done.then_some(())
    })
    .await;
    if shown.is_none() {
        panic!(
            "the survivor's queue never showed the two waiting jobs {waiting:?} in their \
             order; it last showed {last:?}; the rows (id|placement|rank|owner): {}",
            server.query(
                &cluster.url,
                "SELECT id, placement, rank, owner FROM tw_jobs ORDER BY placement, rank"
            )
        );
    }

    // SIGKILL the victim: its trainer goes with it (nothing outlives its daemon), and once
    // its lease has lapsed the job is back at the head of the queue.
    let killed_at = Instant::now();
    victim_node.kill();
    cluster
        .gone("the victim's trainer", trainer, secs(20))
        .await;
    wait_until(
        "the survivor's queue shows the job taken over at its head",
        TAKEOVER_BOUND,
        async || {
            let (_, queued) = survivor.queue().await;
            (queued.first() == Some(&job)).then_some(queued)
        },
    )
    .await;
    assert_eq!(
        survivor.queue().await.1,
        [job.clone(), waiting[0].clone(), waiting[1].clone()]
    );

    // A slot comes free: the job runs first, attempt counted.
    cluster.sandbox.release(&blocker);
    let (_, runner) = cluster.started(&job, 2, TAKEOVER_BOUND).await;
    let took = killed_at.elapsed();
    assert_eq!(runner, other, "the job runs on the surviving node");
    assert!(
        took <= TAKEOVER_BOUND,
        "the job of a SIGKILLed node ran again elsewhere {took:?} after the kill, more than \
         the {TAKEOVER_BOUND:?} allowed with the default lease"
    );
    eprintln!("the job ran again on node {runner} {took:?} after the SIGKILL");
    cluster.sandbox.release(&job);
    let done = survivor.wait_status_on(&job, "Completed", secs(30)).await;
    assert_eq!(done["attempts"], 2, "{done}");
    for id in &waiting {
        survivor.wait_status_on(id, "Completed", secs(30)).await;
    }
    assert_eq!(
        cluster.sandbox.starts(),
        [
            (job.clone(), 1),
            (blocker.clone(), 1),
            (job.clone(), 2),
            (waiting[0].clone(), 1),
            (waiting[1].clone(), 1),
        ],
        "the job taken over ran before the jobs that waited"
    );

    // The victim comes back under its own id: the job stays as its new run left it.
    let back = cluster.start(&victim).await;
    let job_there = back.wait_status_on(&job, "Completed", secs(30)).await;
    assert_eq!(job_there["attempts"], 2, "{job_there}");
    assert_eq!(cluster.starts_by_job()[&job], [1, 2]);
    cluster.assert_no_overlap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_nodes_trainer_stops_before_another_node_starts_the_job_and_its_late_writes_are_refused()
 {
    const TEST: &str = "a_paused_nodes_trainer_stops_before_another_node_starts_the_job_and_its_late_writes_are_refused";
    let Some(server) = Postgres::shared(TEST) else {
        return;
    };
    let _machine = one_at_a_time().await;
    let cluster = Cluster::new(server.database(), &slots(1), Some("3s"));
    let mut nodes: HashMap<String, Node> = HashMap::new();
    for id in ["a", "b"] {
        nodes.insert(id.to_string(), cluster.start(id).await);
    }
    let job = cluster.held_id();
    nodes["a"].submit(job_with_id(&job, "ok")).await;
    let (trainer, paused) = cluster.started(&job, 1, secs(30)).await;
    let other = if paused == "a" { "b" } else { "a" }.to_string();
    let mut resumed = nodes.remove(&paused).expect("the paused node");
    let survivor = nodes.remove(&other).expect("the other node");

    // SIGSTOP its node: nothing renews the lease, so the trainer is stopped before the
    // lease can lapse, and then the other node runs the job.
    resumed.signal(libc::SIGSTOP);
    cluster
        .gone("the paused node's trainer", trainer, secs(30))
        .await;
    let (second, runner) = cluster.started(&job, 2, secs(30)).await;
    assert_eq!(runner, other, "the other node runs the job");
    assert!(!pid_alive(trainer));
    // The records say so in order: the first trainer got its SIGTERM (or, failing that,
    // was killed) before the second started, and never held the job's lock beside it.
    let records = cluster.sandbox.records();
    let position = |kind: &str, attempt: u32| {
        records
            .iter()
            .position(|r| r.kind == kind && r.job == job && r.attempt == attempt)
    };
    if let Some(term) = position("term", 1) {
        assert!(
            term < position("start", 2).expect("the second start"),
            "{records:#?}"
        );
    }
    cluster.assert_no_overlap();
    let running = survivor.wait_status_on(&job, "Running", secs(10)).await;
    assert_eq!(running["attempts"], 2, "{running}");

    // SIGCONT: the paused node finds its trainer ended (SIGTERM) and would record it, but
    // its lease is gone: the job keeps the other node's run.
    resumed.signal(libc::SIGCONT);
    wait_until(
        "the resumed node shows the job as the other node's run (or has exited)",
        secs(30),
        async || {
            let Some(reply) = resumed.try_get(&format!("/v1/jobs/{job}")).await else {
                return Some(());
            };
            let shown: Value = reply.json();
            // Whatever the resumed node does, the job stays the other node's run.
            let now = survivor.job(&job).await;
            assert_eq!(now["status"], "Running", "{now}");
            assert_eq!(now["attempts"], 2, "{now}");
            (shown["status"] == "Running" && shown["attempts"] == 2).then_some(())
        },
    )
    .await;
    assert!(pid_alive(second), "the other node's trainer runs on");
    cluster.sandbox.release(&job);
    let done = survivor.wait_status_on(&job, "Completed", secs(30)).await;
    assert_eq!(done["attempts"], 2, "{done}");
    assert_eq!(cluster.starts_by_job()[&job], [1, 2]);

    // The paused node goes on working: it serves and runs jobs (restarted under its own id,
    // should it have stopped).
    let stderr = resumed.stderr();
    assert!(!stderr.contains("panicked"), "{stderr}");
    if resumed.try_get("/healthz").await.is_none() {
        let status = resumed.daemon.wait_exit(secs(20)).await;
        eprintln!("the resumed node exited ({status}); restarting it");
        drop(resumed);
        resumed = cluster.start(&paused).await;
    }
    let shown = resumed.wait_status_on(&job, "Completed", secs(30)).await;
    assert_eq!(shown["attempts"], 2, "{shown}");
    let next = resumed.submit(text_job("ok")).await;
    resumed.wait_status_on(&next, "Completed", secs(30)).await;
    survivor.wait_status_on(&next, "Completed", secs(30)).await;
    assert_eq!(cluster.starts_by_job()[&job], [1, 2]);
    cluster.assert_no_overlap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_one_node_stops_the_trainer_on_another() {
    const TEST: &str = "a_cancel_sent_to_one_node_stops_the_trainer_on_another";
    let Some(server) = Postgres::shared(TEST) else {
        return;
    };
    let _machine = one_at_a_time().await;
    let cluster = Cluster::new(server.database(), &slots(1), None);
    let mut nodes: HashMap<String, Node> = HashMap::new();
    for id in ["a", "b"] {
        nodes.insert(id.to_string(), cluster.start(id).await);
    }
    let job = cluster.held_id();
    nodes["b"].submit(job_with_id(&job, "ok")).await;
    let (trainer, owner) = cluster.started(&job, 1, secs(30)).await;
    let other = if owner == "a" { "b" } else { "a" }.to_string();
    let (owner, other) = (&nodes[&owner], &nodes[&other]);
    other.wait_status_on(&job, "Running", secs(10)).await;

    // Durable at once: the answer and then every read say Cancelled.
    let reply = other.cancel(&job).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["status"], "Cancelled", "{reply:?}");
    assert_eq!(other.job(&job).await["status"], "Cancelled");

    // The owner stops its trainer (by the notification, at worst at its next renewal).
    cluster
        .gone("the cancelled job's trainer", trainer, secs(20))
        .await;
    let cancelled = owner.wait_status_on(&job, "Cancelled", secs(10)).await;
    assert_eq!(cancelled["attempts"], 1, "{cancelled}");
    assert!(
        cluster.sandbox.record_pid("term", &job, 1).is_some(),
        "the trainer got SIGTERM: {:?}",
        cluster.sandbox.records()
    );

    // It never runs again: the next job runs, and the cancelled one stays as it is.
    let next = owner.submit(text_job("ok")).await;
    for node in [owner, other] {
        node.wait_status_on(&next, "Completed", secs(30)).await;
        assert_eq!(node.job(&job).await["status"], "Cancelled");
    }
    assert_eq!(cluster.starts_by_job()[&job], [1]);
    cluster.sandbox.assert_no_trainers_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_restarted_under_load_with_two_nodes_loses_nothing_acknowledged() {
    const TEST: &str =
        "the_database_restarted_under_load_with_two_nodes_loses_nothing_acknowledged";
    // A server of this test's own: it is stopped and started again.
    let Some(server) = Postgres::start() else {
        skip(TEST, "no PostgreSQL server binaries are installed");
        return;
    };
    let _machine = one_at_a_time().await;
    let cluster = Cluster::new(server.database(), &slots(2), None);
    let nodes = [cluster.start("a").await, cluster.start("b").await];
    let stop = AtomicBool::new(false);
    let answers = Mutex::new(Vec::<(String, Fate)>::new());
    let acked = || {
        let answers = answers.lock().expect("answers");
        answers.iter().filter(|(_, f)| *f == Fate::Acked).count()
    };
    let http = reliability::http_client(secs(10));
    let client = |c: usize| {
        let (node, stop, answers, http) = (&nodes[c % 2], &stop, &answers, &http);
        async move {
            while !stop.load(Ordering::SeqCst) {
                let id = uuid::Uuid::new_v4().to_string();
                let fate = submit(http, node.base(), &job_with_id(&id, "ok")).await;
                match fate {
                    Fate::Acked | Fate::Refused(503) | Fate::Unknown => {}
                    other => panic!("submission {id} to node {}: {other:?}", node.id),
                }
                answers.lock().expect("answers").push((id, fate));
                if fate != Fate::Acked {
                    // Not a busy loop while the database is away.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    };
    let ready_everywhere = async |want: StatusCode| {
        for node in &nodes {
            wait_until(
                format_args!("node {}'s /readyz answers {want}", node.id),
                secs(30),
                async || {
                    let reply = node.try_get("/readyz").await?;
                    (reply.status == want).then_some(())
                },
            )
            .await;
        }
    };
    let restarts = async {
        for round in 0..3 {
            let before = acked();
            wait_until(
                format_args!("round {round}: 50 more jobs are acknowledged"),
                secs(60),
                async || (acked() >= before + 50).then_some(()),
            )
            .await;
            server.stop();
            ready_everywhere(StatusCode::SERVICE_UNAVAILABLE).await;
            server.run();
            ready_everywhere(StatusCode::OK).await;
        }
        stop.store(true, Ordering::SeqCst);
    };
    futures_util::future::join(futures_util::future::join_all((0..8).map(client)), restarts).await;

    let answers = answers.into_inner().expect("answers");
    let count = |which: Fate| answers.iter().filter(|(_, f)| *f == which).count();
    eprintln!(
        "acknowledged {}, refused {}, unknown {}",
        count(Fate::Acked),
        count(Fate::Refused(503)),
        count(Fate::Unknown)
    );
    assert!(count(Fate::Refused(503)) > 0, "the restarts were seen");

    // Every acknowledged job ends Completed on both nodes, and no refused one exists.
    for node in &nodes {
        for (id, fate) in &answers {
            match fate {
                Fate::Acked => {
                    node.wait_status_on(id, "Completed", secs(120)).await;
                }
                Fate::Refused(_) => assert!(
                    node.job_if_known(id).await.is_none(),
                    "refused {id} was stored"
                ),
                _ => {
                    if node.job_if_known(id).await.is_some() {
                        node.wait_status_on(id, "Completed", secs(120)).await;
                    }
                }
            }
        }
    }
    // Each ran to its end, never two trainers of one job at once.
    let starts = cluster.starts_by_job();
    let ended: HashSet<(String, u32)> = cluster
        .sandbox
        .records()
        .into_iter()
        .filter(|r| r.kind == "end")
        .map(|r| (r.job, r.attempt))
        .collect();
    let mut again = 0;
    for (id, fate) in &answers {
        let job = nodes[0].job_if_known(id).await;
        match (fate, job) {
            (Fate::Acked | Fate::Unknown, Some(job)) => {
                assert_eq!(job["status"], "Completed", "{job}");
                let attempts = job["attempts"].as_u64().expect("attempts") as u32;
                assert!(
                    ended.contains(&(id.clone(), attempts)),
                    "{id} ran to its end"
                );
                again += starts[id].len() - 1;
            }
            (Fate::Acked, None) => panic!("acknowledged {id} lost"),
            _ => assert!(!starts.contains_key(id), "{id} ran but was not stored"),
        }
    }
    eprintln!("runs started again after an interruption: {again}");
    cluster.assert_no_overlap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_node_kills_over_many_rounds_lose_nothing_and_duplicate_nothing() {
    const TEST: &str = "random_node_kills_over_many_rounds_lose_nothing_and_duplicate_nothing";
    let Some(server) = Postgres::shared(TEST) else {
        return;
    };
    let _machine = one_at_a_time().await;
    kills::run(server).await;
}
