//! Random node kills over many rounds (tests/cluster.rs): three nodes on one database with a
//! short lease (3 s); each round, clients submit jobs with ids of their own to random live
//! nodes while one to three random nodes are SIGKILLed at a random moment and started
//! again under their own ids after a random pause (long enough, at times, for another node
//! to take their jobs over first). At the end every acknowledged job is listed exactly once
//! by every node and ran to completion, no two trainers of one job ever ran at once, and
//! nothing that was refused or never sent exists.
//!
//! `TW_CLUSTER_ROUNDS` sets the rounds (default 8, about a minute and a half here);
//! `TW_CLUSTER_SEED` replays a run's choices (each round and client draws from its own
//! generator, so round N's plan does not depend on how earlier rounds went).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, Fate, Node, submit};
use crate::reliability::{self, Rng};
use crate::support::pg::Postgres;
use crate::support::{Settings, secs, text_job};

const DEFAULT_ROUNDS: usize = 8;
const NODES: [&str; 3] = ["a", "b", "c"];
/// Stub trainer commands: instant to a couple of seconds.
const MODELS: &[&str] = &["ok", "ok", "sleep:0.2", "sleep:1", "sleep:2"];
/// High enough that no job runs out of attempts however often it is cut.
const MAX_ATTEMPTS: u32 = 100;
/// Tries of one submission on other nodes after no answer or a 503.
const TRIES: usize = 10;

#[derive(Debug)]
struct Plan {
    clients: usize,
    per_client: usize,
    /// When the kill comes after the round's start.
    kill_after: Duration,
    /// Which nodes (indices into [`NODES`]).
    victims: Vec<usize>,
    /// How long they stay down.
    down_for: Duration,
}

impl Plan {
    fn draw(rng: &mut Rng) -> Plan {
        let count = match rng.below(10) {
            0..6 => 1,
            6..9 => 2,
            _ => 3,
        };
        let mut victims: Vec<usize> = (0..NODES.len()).collect();
        while victims.len() > count {
            victims.remove(rng.below(victims.len() as u64) as usize);
        }
        Plan {
            clients: rng.range(3, 6) as usize,
            per_client: rng.range(3, 15) as usize,
            kill_after: rng.duration_up_to(Duration::from_millis(1500)),
            victims,
            // Up to past the lease, so that sometimes another node takes over first.
            down_for: rng.duration_up_to(Duration::from_secs(5)),
        }
    }
}

/// Says the seed again if the run fails.
struct SeedOnPanic(u64);

impl Drop for SeedOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "cluster kills failed: replay with TW_CLUSTER_SEED={}",
                self.0
            );
        }
    }
}

/// What became of an id over all its tries: acknowledged once is acknowledged for good; no
/// answer once means either.
fn combine(before: Option<Fate>, now: Fate) -> Fate {
    match (before, now) {
        (Some(Fate::Acked), _) | (_, Fate::Acked) => Fate::Acked,
        (Some(Fate::Unknown), _) | (_, Fate::Unknown) => Fate::Unknown,
        (_, now) => now,
    }
}

pub async fn run(server: &Postgres) {
    let seed = reliability::seed_from_env("TW_CLUSTER_SEED");
    let rounds = reliability::count_from_env("TW_CLUSTER_ROUNDS", DEFAULT_ROUNDS);
    eprintln!("cluster kills: seed={seed} rounds={rounds} (replay with TW_CLUSTER_SEED={seed})");
    let _seed = SeedOnPanic(seed);
    let settings = Settings {
        max_concurrent: 2,
        max_attempts: MAX_ATTEMPTS,
        kill_grace: "1s",
        ..Settings::default()
    };
    let cluster = Cluster::new(server.database(), &settings, Some("3s"));
    let mut nodes: Vec<Option<Node>> = Vec::new();
    for id in NODES {
        nodes.push(Some(cluster.start(id).await));
    }
    // Where the clients reach each node; `None` while it is down.
    let bases: Mutex<Vec<Option<String>>> = Mutex::new(
        nodes
            .iter()
            .map(|n| n.as_ref().map(|n| n.base().to_string()))
            .collect(),
    );
    let fates: Mutex<HashMap<String, Fate>> = Mutex::new(HashMap::new());
    let http = reliability::http_client(secs(10));
    let began = Instant::now();

    for round in 0..rounds {
        let mut rng = Rng::derive(seed, round as u64, 0);
        let plan = Plan::draw(&mut rng);
        eprintln!("round {round}: {plan:?}");
        let clients = (0..plan.clients).map(|c| {
            let mut rng = Rng::derive(seed, round as u64, 1 + c as u64);
            let (bases, fates, http) = (&bases, &fates, &http);
            let per_client = plan.per_client;
            async move {
                for _ in 0..per_client {
                    let id = uuid::Uuid::new_v4().to_string();
                    let model = *rng.pick(MODELS);
                    let mut job = text_job(model);
                    job["job_id"] = id.as_str().into();
                    let mut tries = 0;
                    while tries < TRIES {
                        let live: Vec<String> = bases
                            .lock()
                            .expect("bases")
                            .iter()
                            .flatten()
                            .cloned()
                            .collect();
                        if live.is_empty() {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        tries += 1;
                        let fate = submit(http, rng.pick(&live).as_str(), &job).await;
                        let mut fates = fates.lock().expect("fates");
                        let combined = combine(fates.get(&id).copied(), fate);
                        fates.insert(id.clone(), combined);
                        match fate {
                            Fate::Acked => break,
                            Fate::Refused(503) | Fate::NotSent | Fate::Unknown => {}
                            Fate::Refused(other) => panic!("submission {id}: {other}"),
                        }
                    }
                }
            }
        });
        let killer = async {
            tokio::time::sleep(plan.kill_after).await;
            for &v in &plan.victims {
                bases.lock().expect("bases")[v] = None;
                nodes[v].take().expect("a live node").kill();
            }
            tokio::time::sleep(plan.down_for).await;
            for &v in &plan.victims {
                let node = cluster.start(NODES[v]).await;
                bases.lock().expect("bases")[v] = Some(node.base().to_string());
                nodes[v] = Some(node);
            }
        };
        futures_util::future::join(futures_util::future::join_all(clients), killer).await;
    }
    eprintln!("rounds done after {:?}", began.elapsed());

    let nodes: Vec<Node> = nodes.into_iter().map(|n| n.expect("all up")).collect();
    let fates = fates.into_inner().expect("fates");
    let count = |which: fn(&Fate) -> bool| fates.values().filter(|f| which(f)).count();
    eprintln!(
        "acknowledged {}, unknown {}, refused or not sent {}",
        count(|f| *f == Fate::Acked),
        count(|f| *f == Fate::Unknown),
        count(|f| matches!(f, Fate::Refused(_) | Fate::NotSent)),
    );
    check(server, &cluster, &nodes, &fates).await;
    eprintln!("checked after {:?}", began.elapsed());
}

/// Every acknowledged job listed once by every node, Completed, its last run ended by
/// itself; nothing refused or never sent anywhere; no overlapping trainers.
async fn check(
    server: &Postgres,
    cluster: &Cluster,
    nodes: &[Node],
    fates: &HashMap<String, Fate>,
) {
    // A job whose fate is unknown may exist; if it does, it is like an acknowledged one.
    let mut expected: HashSet<String> = HashSet::new();
    for (id, fate) in fates {
        match fate {
            Fate::Acked => {
                expected.insert(id.clone());
            }
            Fate::Unknown if nodes[0].job_if_known(id).await.is_some() => {
                expected.insert(id.clone());
            }
            _ => {}
        }
    }
    for node in nodes {
        // Its own queue first (cheap to ask for), then every job, wherever it runs.
        cluster.wait_settled(server, node, secs(180)).await;
        cluster
            .wait_completed(server, node, expected.len(), secs(180))
            .await;
        let jobs = node.jobs().await;
        let mut seen = HashSet::new();
        for (id, job) in &jobs {
            assert!(seen.insert(id.clone()), "node {} lists {id} twice", node.id);
            assert!(
                expected.contains(id),
                "node {} lists {id}, which was {:?}",
                node.id,
                fates.get(id)
            );
            assert_eq!(job["status"], "Completed", "on node {}: {job}", node.id);
        }
        let missing: Vec<&String> = expected.difference(&seen).collect();
        assert!(missing.is_empty(), "node {} lost {missing:?}", node.id);
    }

    let starts = cluster.starts_by_job();
    let ended: HashSet<(String, u32)> = cluster
        .sandbox
        .records()
        .into_iter()
        .filter(|r| r.kind == "end")
        .map(|r| (r.job, r.attempt))
        .collect();
    let mut cut = 0;
    for (id, job) in nodes[0].jobs().await {
        let attempts = job["attempts"].as_u64().expect("attempts") as u32;
        let runs = starts
            .get(&id)
            .unwrap_or_else(|| panic!("{id} Completed without a trainer start: {job}"));
        assert_eq!(
            runs.last(),
            Some(&attempts),
            "{id}: the last run is the counted one: {job}"
        );
        assert!(
            ended.contains(&(id.clone(), attempts)),
            "{id}: its last run ended by itself: {job}"
        );
        cut += runs.len() - 1;
    }
    for (id, fate) in fates {
        if !expected.contains(id) {
            assert!(!starts.contains_key(id), "{id} ran but was {fate:?}");
        }
    }
    eprintln!("runs cut by a kill and run again: {cut}");
    cluster.assert_no_overlap();
}
