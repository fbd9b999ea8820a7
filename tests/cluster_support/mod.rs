//! Several daemons ("nodes") on one PostgreSQL database, for tests/cluster.rs, on top of
//! tests/e2e_support (included as `support`).
//!
//! A [`Cluster`] is one sandbox: one config file, one database, and a data dir per node
//! directly inside the sandbox (`data-<node id>`), so that every node's stub trainers write
//! to the same records (`trainer-records/events`) and read the same hold files. Which node
//! runs a trainer is told by the trainer's own environment (`TW_DATA_DIR`, the data dir of
//! the daemon that started it). The stub holds a lock per job while it runs and records
//! `overlap` when another trainer of the same job still holds it, on whatever node:
//! [`Cluster::assert_no_overlap`] reads that, and the order of the records.

use std::collections::HashMap;
use std::fs;
use std::ops::Deref;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::pg::Postgres;
use crate::support::{
    Daemon, Record, Sandbox, Settings, pid_alive, wait_until, wait_until_or_timeout,
};

/// The cluster tests share two cores with everything else; one at a time, so that a short
/// lease is not missed for want of CPU.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Holds the machine for one cluster test.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

/// Nodes sharing one database and one sandbox.
pub struct Cluster {
    pub sandbox: Sandbox,
    pub url: String,
    /// `TRAINING_WORKER_CLUSTER_LEASE`, when the test shortens the lease.
    lease: Option<&'static str>,
}

/// One running node: its id and its daemon.
pub struct Node {
    pub id: String,
    pub daemon: Daemon,
}

impl Deref for Node {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

impl Node {
    /// SIGKILL, as a crash of the box would, and reap it.
    pub fn kill(self) {
        self.daemon.kill();
    }

    /// Every job this node lists, as (id, job).
    pub async fn jobs(&self) -> Vec<(String, Value)> {
        let reply = self.get("/v1/jobs").await;
        assert_eq!(reply.status, StatusCode::OK, "{}: list: {reply:?}", self.id);
        reply
            .json()
            .as_array()
            .expect("a list of jobs")
            .iter()
            .map(|job| {
                let id = job["job_id"].as_str().expect("job_id").to_string();
                (id, job.clone())
            })
            .collect()
    }

    /// The job as this node shows it, or `None` while it does not know it (404).
    pub async fn job_if_known(&self, id: &str) -> Option<Value> {
        let reply = self.get(&format!("/v1/jobs/{id}")).await;
        match reply.status {
            StatusCode::OK => Some(reply.json()),
            StatusCode::NOT_FOUND => None,
            _ => panic!("{}: job {id}: {reply:?}", self.id),
        }
    }

    /// Waits until this node shows job `id` with `status`.
    pub async fn wait_status_on(&self, id: &str, status: &str, timeout: Duration) -> Value {
        let node = &self.id;
        wait_until(
            format_args!("node {node} shows job {id} {status}"),
            timeout,
            async || {
                self.job_if_known(id)
                    .await
                    .filter(|job| job["status"] == status)
            },
        )
        .await
    }
}

impl Cluster {
    /// A sandbox whose nodes keep their records in `url`, configured with `settings`.
    pub fn new(url: String, settings: &Settings, lease: Option<&'static str>) -> Cluster {
        let sandbox = Sandbox::new();
        sandbox.configure(settings);
        sandbox.set_env("TRAINING_WORKER_STORE_KIND", "postgres");
        sandbox.set_env("TRAINING_WORKER_DATABASE_URL", url.as_str());
        Cluster {
            sandbox,
            url,
            lease,
        }
    }

    /// The data dir of the node named `dir` (a node's id, unless a test gives two daemons
    /// one id).
    pub fn data_dir(&self, dir: &str) -> PathBuf {
        self.sandbox.path().join(format!("data-{dir}"))
    }

    fn env<'a>(&self, id: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut env = vec![("TRAINING_WORKER_NODE_ID", id)];
        if let Some(lease) = self.lease {
            env.push(("TRAINING_WORKER_CLUSTER_LEASE", lease));
        }
        env
    }

    /// Starts node `id` on its own data dir and port, and waits until it is ready.
    pub async fn start(&self, id: &str) -> Node {
        let daemon = self
            .sandbox
            .start_node(&self.data_dir(id), &self.env(id))
            .await;
        Node {
            id: id.to_string(),
            daemon,
        }
    }

    /// Spawns a daemon as node `id` on the data dir of `dir`, without waiting.
    pub fn spawn(&self, id: &str, dir: &str) -> Daemon {
        self.sandbox.spawn_node(&self.data_dir(dir), &self.env(id))
    }

    /// The node whose daemon started process `pid` (a trainer), while it lives.
    pub fn node_of(&self, pid: i32) -> Option<String> {
        let environ = fs::read(format!("/proc/{pid}/environ")).ok()?;
        let prefix = format!("TW_DATA_DIR={}/data-", self.sandbox.path().display());
        environ
            .split(|&b| b == 0)
            .find_map(|var| var.strip_prefix(prefix.as_bytes()))
            .map(|dir| String::from_utf8_lossy(dir).into_owned())
    }

    /// Waits for `job`'s run number `attempt` to start; its trainer's pid and its node.
    pub async fn started(&self, job: &str, attempt: u32, timeout: Duration) -> (i32, String) {
        let pid = wait_until(
            format_args!("the trainer of job {job} starts (attempt {attempt})"),
            timeout,
            async || self.sandbox.record_pid("start", job, attempt),
        )
        .await;
        let node = self
            .node_of(pid)
            .unwrap_or_else(|| panic!("the trainer {pid} of job {job} is gone already"));
        (pid, node)
    }

    /// Waits until process `pid` is gone.
    pub async fn gone(&self, what: &str, pid: i32, timeout: Duration) {
        wait_until(
            format_args!("{what} (pid {pid}) is gone"),
            timeout,
            async || (!pid_alive(pid)).then_some(()),
        )
        .await;
    }

    /// Makes `id`'s trainer wait after its start until released; `id` is a fresh v4 id.
    pub fn held_id(&self) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.sandbox.hold(&id);
        id
    }

    /// Waits until `node` shows no job queued and none running on it (jobs running on other
    /// nodes are not in its queue); if that does not come, fails with what the database
    /// holds of the unfinished jobs.
    pub async fn wait_settled(&self, server: &Postgres, node: &Node, timeout: Duration) {
        let settled = wait_until_or_timeout(timeout, async || {
            let (running, queued) = node.queue().await;
            (running.is_empty() && queued.is_empty()).then_some(())
        })
        .await;
        if settled.is_none() {
            let (running, queued) = node.queue().await;
            let rows = server.psql(
                self.url.rsplit('/').next().expect("a database"),
                "SELECT id, status, placement, owner, lease_until, now(), generation, version \
                 FROM tw_jobs WHERE placement <> 'off' ORDER BY placement, rank LIMIT 40",
            );
            panic!(
                "node {} still shows running {running:?} and queued {queued:?} after \
                 {timeout:?}; the database's unfinished rows (id|status|placement|owner|\
                 lease_until|now|generation|version):\n{}",
                node.id,
                rows.unwrap_or_else(|e| e)
            );
        }
    }

    /// Waits until `node` lists `count` jobs Completed; if that does not come, fails with
    /// the other jobs as the node and the database show them.
    pub async fn wait_completed(
        &self,
        server: &Postgres,
        node: &Node,
        count: usize,
        timeout: Duration,
    ) {
        let done = wait_until_or_timeout(timeout, async || {
            (node.list_ids("Completed").await.len() == count).then_some(())
        })
        .await;
        if done.is_none() {
            let others: Vec<(String, Value)> = node
                .jobs()
                .await
                .into_iter()
                .filter(|(_, job)| job["status"] != "Completed")
                .collect();
            let ids: Vec<String> = others.iter().map(|(id, _)| format!("'{id}'")).collect();
            let rows = server.psql(
                self.url.rsplit('/').next().expect("a database"),
                &format!(
                    "SELECT id, status, placement, owner, lease_until, now(), generation, \
                     version FROM tw_jobs WHERE id IN ({}) LIMIT 40",
                    if ids.is_empty() {
                        "NULL".to_string()
                    } else {
                        ids.join(",")
                    }
                ),
            );
            let shown: Vec<String> = others
                .iter()
                .take(40)
                .map(|(id, job)| format!("{id} {} attempts {}", job["status"], job["attempts"]))
                .collect();
            panic!(
                "node {} lists {} jobs that are not Completed after {timeout:?} (of {count}): \
                 {shown:#?}\nthe database's rows (id|status|placement|owner|lease_until|now|\
                 generation|version):\n{}",
                node.id,
                others.len(),
                rows.unwrap_or_else(|e| e)
            );
        }
    }

    /// Checks that no two trainers of one job ever ran at once: no trainer found the job's
    /// lock taken, and no run of a job ended after the next run of it started.
    pub fn assert_no_overlap(&self) {
        let records = self.sandbox.records();
        let overlaps: Vec<&Record> = records.iter().filter(|r| r.kind == "overlap").collect();
        assert!(
            overlaps.is_empty(),
            "trainers of one job ran at once: {overlaps:?}"
        );
        // Per job: the attempt of the latest start, and where it was.
        let mut latest: HashMap<&str, (u32, usize)> = HashMap::new();
        for (at, r) in records.iter().enumerate() {
            match r.kind.as_str() {
                "start" => {
                    if let Some((attempt, _)) = latest.get(r.job.as_str()) {
                        assert!(
                            r.attempt > *attempt,
                            "job {} started attempt {} after attempt {attempt}: {records:#?}",
                            r.job,
                            r.attempt
                        );
                    }
                    latest.insert(r.job.as_str(), (r.attempt, at));
                }
                "end" | "term" => {
                    let (attempt, started) = latest[r.job.as_str()];
                    assert!(
                        r.attempt == attempt,
                        "job {}: run {} ended (record {at}) after run {attempt} started \
                         (record {started}): {records:#?}",
                        r.job,
                        r.attempt
                    );
                }
                _ => {}
            }
        }
    }

    /// Every trainer start so far: job id → attempts, in order.
    pub fn starts_by_job(&self) -> HashMap<String, Vec<u32>> {
        let mut starts: HashMap<String, Vec<u32>> = HashMap::new();
        for (job, attempt) in self.sandbox.starts() {
            starts.entry(job).or_default().push(attempt);
        }
        starts
    }

    /// How many jobs' logs each node's data dir holds (where each job ran), by node; and
    /// the jobs whose logs are in more than one.
    pub fn logs_by_node(&self, nodes: &[&str]) -> (Vec<(String, usize)>, Vec<String>) {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut counts = Vec::new();
        for node in nodes {
            let logs = fs::read_dir(self.data_dir(node).join("logs"))
                .map(|entries| {
                    entries
                        .flatten()
                        .filter_map(|e| {
                            let name = e.file_name().to_string_lossy().into_owned();
                            name.strip_suffix(".log").map(str::to_string)
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            counts.push((node.to_string(), logs.len()));
            for id in logs {
                *seen.entry(id).or_default() += 1;
            }
        }
        let twice = seen.into_iter().filter(|(_, n)| *n > 1).map(|(id, _)| id);
        (counts, twice.collect())
    }
}

/// What a submission was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// 201, or 200 for a resubmission of the same job: it must exist from now on.
    Acked,
    /// A status other than 2xx: nothing may have been stored.
    Refused(u16),
    /// The connection could not be made: the request never left the client.
    NotSent,
    /// The connection broke or timed out after the request may have arrived.
    Unknown,
}

/// POSTs `job` to `base` with `client`; what became of it.
pub async fn submit(client: &reqwest::Client, base: &str, job: &Value) -> Fate {
    let response = client
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "application/json")
        .body(job.to_string())
        .send()
        .await;
    match response {
        // The answer was a success, whatever becomes of its body.
        Ok(response) if response.status().is_success() => Fate::Acked,
        Ok(response) => Fate::Refused(response.status().as_u16()),
        Err(e) if e.is_connect() => Fate::NotSent,
        Err(_) => Fate::Unknown,
    }
}
