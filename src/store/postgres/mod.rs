//! The PostgreSQL store: job records and the queue order in a database that several
//! daemons (nodes) share.
//!
//! [`open`] connects, takes its node's lock (a session advisory lock on the node's id, held
//! on a connection of its own for the daemon's whole life, so two live nodes never share a
//! name), migrates the schema (`migrations/`, embedded in the binary and applied under a
//! lock of their own), reads every row back as the file store reads its job files, and
//! starts the persister task and the cluster task ([`cluster`]: leases, notifications,
//! takeover). The worker reaches it through the store's boundary, [`super::StoreHandle`].
//!
//! Group commit: the persister takes every request waiting in its inbox and makes them
//! durable in one transaction (PostgreSQL flushes its WAL once per commit), then answers
//! each. Up to `pool_size` such transactions run at once, each on a connection of the pool,
//! so that the next group is written while the last one's commit waits for the flush (the
//! server then flushes their commits together). They never touch the same row: the worker
//! sends a job's next change only once its last one is answered. Every row carries a
//! `version`, the count of its writes; a write names the version it replaces and the claim
//! it needs ([`super::Fence`]), so a row changed by another node, or a job whose lease this
//! node lost, is never overwritten: that write is answered [`StoreError::Conflict`] with the
//! row as it is, and the rest of the group commits.
//!
//! A database that cannot be reached makes writes fail fast with
//! [`StoreError::Unavailable`] (nothing stored), sets [`super::StoreHandle::trouble_watch`] (so
//! `/readyz` answers 503), and the persister reconnects with a backoff, taking its lock
//! again. A commit whose answer was lost with the connection is settled after the
//! reconnection by reading back the versions it wrote: either all of them are there (it
//! committed) or none (it did not).

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use uuid::Uuid;

use std::sync::Arc;

use super::order::requeue_order;
use super::{
    Change, Ended, FIRST_QUEUED_RANK, Fence, NodeView, OpenError, Opened, Placement, Recovered,
    Remote, StoreError, StoreHandle, Write,
};
use crate::config::PostgresConfig;
use crate::job::{Job, JobId};
use crate::metrics::METRICS;

pub mod cluster;

mod migrations {
    refinery::embed_migrations!("src/store/postgres/migrations");
}

/// The first key of every node's advisory lock (advisory locks are per database): the
/// text "tw" as a number; the second is a hash of the node's id. `pg_locks` shows them as
/// `classid` and `objid` (with `objsubid` 2).
const NODE_LOCK_CLASS: i32 = 0x7477;

/// The advisory lock under which migrations run, so that nodes starting together migrate
/// once: the text "tw_m".
const MIGRATION_LOCK: i64 = 0x7477_5f6d;

/// The second key of a node's lock: FNV-1a of its id.
fn node_lock_key(node_id: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in node_id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash as i32
}

/// Requests that may wait for the persister; further commits wait for room, which is how a
/// slow database pushes back on clients.
const INBOX_SLOTS: usize = 4096;

/// Requests the persister takes into one transaction at most.
const MAX_GROUP: usize = 1024;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Reconnection backoff: from the first, doubling up to the last.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// A write as the persister takes it: `base` `None` is "the version this node last wrote
/// or read" (the boundary's plain `commit`).
struct Pending {
    change: Change,
    base: Option<u64>,
    fence: Fence,
}

struct Request {
    writes: Vec<Pending>,
    ranks: Vec<(JobId, u64)>,
    respond_to: oneshot::Sender<Result<(), StoreError>>,
}

/// This daemon as a node of the database.
#[derive(Debug)]
pub(crate) struct Node {
    pub id: String,
    pub lease: Duration,
    pub address: String,
    /// Alone on the database (`migrate`): every running job is this node's to recover.
    pub exclusive: bool,
}

/// What the node's heartbeat reports, from the worker.
#[derive(Clone, Debug, Default)]
pub(crate) struct NodeReport {
    pub gpus: Vec<u32>,
    pub free_gpus: Vec<u32>,
    pub running: usize,
}

/// The cloneable way to the persister task, behind a [`StoreHandle`]. The task ends once
/// every handle is gone, after it has answered everything sent to it.
#[derive(Clone, Debug)]
pub(crate) struct Handle {
    inbox: mpsc::Sender<Request>,
    pool: Pool,
    report: Arc<watch::Sender<NodeReport>>,
}

impl Handle {
    pub async fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        let writes = changes
            .into_iter()
            .map(|change| Pending {
                change,
                base: None,
                fence: Fence::Owner,
            })
            .collect();
        self.send(writes, Vec::new()).await
    }

    pub async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let writes = writes
            .into_iter()
            .map(|w| Pending {
                change: w.change,
                base: Some(w.base),
                fence: w.fence,
            })
            .collect();
        self.send(writes, Vec::new()).await
    }

    pub async fn rerank(&self, ranks: Vec<(JobId, u64)>) -> Result<(), StoreError> {
        self.send(Vec::new(), ranks).await
    }

    pub async fn nodes(&self) -> Result<Vec<NodeView>, StoreError> {
        cluster::nodes(&self.pool).await
    }

    pub async fn reload(&self, ids: Vec<JobId>) -> Result<Vec<Remote>, StoreError> {
        cluster::read_rows(&self.pool, &ids).await
    }

    pub fn report(&self, gpus: Vec<u32>, free_gpus: Vec<u32>, running: usize) {
        self.report.send_replace(NodeReport {
            gpus,
            free_gpus,
            running,
        });
    }

    async fn send(&self, writes: Vec<Pending>, ranks: Vec<(JobId, u64)>) -> Result<(), StoreError> {
        if writes.is_empty() && ranks.is_empty() {
            return Ok(());
        }
        let (respond_to, answer) = oneshot::channel();
        self.inbox
            .send(Request {
                writes,
                ranks,
                respond_to,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.unwrap_or(Err(StoreError::Closed))
    }
}

/// A rank as stored: the unsigned rank with its top bit flipped, so that bigint order is
/// rank order.
pub(crate) fn rank_to_db(rank: u64) -> i64 {
    (rank ^ (1 << 63)) as i64
}

pub(crate) fn rank_from_db(rank: i64) -> u64 {
    (rank as u64) ^ (1 << 63)
}

fn placement_to_db(placement: Placement) -> (&'static str, Option<i64>) {
    match placement {
        Placement::Running(rank) => ("running", Some(rank_to_db(rank))),
        Placement::Queued(rank) => ("queued", Some(rank_to_db(rank))),
        Placement::Off => ("off", None),
    }
}

/// The connection settings, as this daemon names itself to the server (so that another
/// daemon refused the lock can say who holds it).
fn connection_config(config: &PostgresConfig) -> Result<tokio_postgres::Config, OpenError> {
    let mut pg: tokio_postgres::Config = config.url.parse().map_err(|e| {
        OpenError::Storage(format!(
            "store.url: {:?} is not a PostgreSQL connection string: {e}",
            config.display_url()
        ))
    })?;
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(CONNECT_TIMEOUT);
    }
    // A server that vanished without closing the connection is noticed within a minute.
    pg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    let host = crate::store::lock::host_name();
    pg.application_name(format!(
        "training-worker pid {} on {host}",
        std::process::id()
    ));
    Ok(pg)
}

/// The connection that holds the node's lock, and the signal that it is gone.
struct LockConnection {
    client: Client,
    /// Resolves when the connection has ended (the server went away, a network fault).
    closed: oneshot::Receiver<()>,
}

/// Connects, and drives the connection in a task of its own that hands every notification's
/// payload to `notices` and says when the connection has ended.
pub(crate) async fn connect(
    pg: &tokio_postgres::Config,
    notices: Option<mpsc::UnboundedSender<String>>,
) -> Result<(Client, oneshot::Receiver<()>), tokio_postgres::Error> {
    let (client, mut connection) = pg.connect(NoTls).await?;
    let (closed_tx, closed) = oneshot::channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if let Some(notices) = &notices {
                        let _ = notices.send(n.payload().to_string());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %describe(&e), "a connection to the database ended");
                    break;
                }
            }
        }
        let _ = closed_tx.send(());
    });
    Ok((client, closed))
}

/// Who holds the advisory lock `(class, key)`, as the server names them.
async fn lock_holder(client: &Client, class: i32, key: i32) -> String {
    client
        .query_opt(
            "SELECT coalesce(a.application_name, ''), coalesce(a.client_addr::text, 'a local socket'), \
                    a.backend_start::text \
               FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
              WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted \
                AND l.classid::bigint = ($1::int4::bigint & 4294967295) \
                AND l.objid::bigint = ($2::int4::bigint & 4294967295) \
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
              LIMIT 1",
            &[&class, &key],
        )
        .await
        .map_err(|e| warn!(error = %describe(&e), "cannot ask the database who holds a lock"))
        .ok()
        .flatten()
        .map(|row| {
            let name: String = row.get(0);
            let address: String = row.get(1);
            let since: String = row.get(2);
            format!("{name}, connected from {address} since {since}")
        })
        .unwrap_or_else(|| "a holder the server does not name".to_string())
}

/// Connects and takes the node's lock. `Ok(Err(why))`: a live node has this node's name
/// (or, for an exclusive node, any node is live).
async fn connect_locked(
    pg: &tokio_postgres::Config,
    node: &Node,
) -> Result<Result<LockConnection, String>, tokio_postgres::Error> {
    let (client, closed) = connect(pg, None).await?;
    let key = node_lock_key(&node.id);
    let locked: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock($1::int4, $2::int4)",
            &[&NODE_LOCK_CLASS, &key],
        )
        .await?
        .get(0);
    if !locked {
        let holder = lock_holder(&client, NODE_LOCK_CLASS, key).await;
        return Ok(Err(format!(
            "a live node named {:?} already uses it ({holder})",
            node.id
        )));
    }
    if node.exclusive {
        let others = client
            .query_opt(
                "SELECT l.objid::bigint FROM pg_locks l \
                  WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted \
                    AND l.classid::bigint = $1::int4::bigint AND l.pid <> pg_backend_pid() \
                    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                  LIMIT 1",
                &[&NODE_LOCK_CLASS],
            )
            .await?;
        if let Some(row) = others {
            let other: i64 = row.get(0);
            let holder = lock_holder(&client, NODE_LOCK_CLASS, other as u32 as i32).await;
            return Ok(Err(format!("a training-worker node runs on it ({holder})")));
        }
    }
    Ok(Ok(LockConnection { client, closed }))
}

/// Opens the database: connect, lock, migrate, read back, start the persister and the
/// cluster task.
pub async fn open(config: &PostgresConfig, fatal: CancellationToken) -> Result<Opened, OpenError> {
    let shown = config.display_url();
    let pg = connection_config(config)?;
    let node = Arc::new(Node {
        id: config.cluster.node_id.clone(),
        lease: config.cluster.lease,
        address: config.cluster.address.clone(),
        exclusive: config.cluster.exclusive,
    });
    let mut lock = match connect_locked(&pg, &node).await {
        Ok(Ok(lock)) => lock,
        Ok(Err(holder)) => {
            return Err(OpenError::Held(format!(
                "the database {shown} is in use: {holder}"
            )));
        }
        Err(e) => {
            return Err(OpenError::Unreachable(format!(
                "cannot reach the database {shown}: {}",
                describe(&e)
            )));
        }
    };
    let migrated = async {
        lock.client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| describe(&e))?;
        let ran = migrations::migrations::runner()
            .run_async(&mut lock.client)
            .await
            .map_err(|e| e.to_string());
        lock.client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| describe(&e))?;
        ran.map(|_| ())
    };
    migrated
        .await
        .map_err(|e| OpenError::Storage(format!("cannot migrate the database {shown}: {e}")))?;

    // Rows changed from here on may be missed by the notifications (nobody listens yet):
    // the cluster task's first poll reads them.
    let replayed_at: chrono::DateTime<chrono::Utc> = lock
        .client
        .query_one("SELECT now()", &[])
        .await
        .map_err(|e| {
            OpenError::Storage(format!(
                "cannot read the database {shown}: {}",
                describe(&e)
            ))
        })?
        .get(0);
    let (recovered, versions) = replay(&mut lock.client, &node).await.map_err(|e| {
        OpenError::Storage(format!(
            "cannot read the database {shown}: {}",
            describe(&e)
        ))
    })?;

    // The node is listed from the moment it is open (its GPUs follow with the worker's
    // first report, at the cluster task's first turn).
    if !node.exclusive {
        cluster::register(&lock.client, &node).await.map_err(|e| {
            OpenError::Storage(format!(
                "cannot register this node in the database {shown}: {}",
                describe(&e)
            ))
        })?;
    }

    let manager = Manager::from_config(
        pg.clone(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| OpenError::Storage(format!("cannot make a connection pool: {e}")))?;

    let (inbox_tx, inbox) = mpsc::channel(INBOX_SLOTS);
    let (trouble_tx, trouble) = watch::channel(None);
    let (report, report_rx) = watch::channel(NodeReport::default());
    let persister = Persister {
        pool: pool.clone(),
        pg: pg.clone(),
        shown: shown.clone(),
        inbox,
        versions,
        trouble: trouble_tx,
        fatal,
        broken: None,
        lock: Some(lock),
        backoff: RECONNECT_FIRST,
        reconnect_at: None,
        max_in_flight: config.pool_size,
        node: node.clone(),
    };
    let task = tokio::spawn(persister.run());
    let (events_tx, events) = mpsc::channel(64);
    let stop = CancellationToken::new();
    let cluster = cluster::Cluster::new(
        pg,
        pool.clone(),
        node.clone(),
        shown,
        report_rx,
        events_tx,
        replayed_at,
    );
    let exclusive = node.exclusive;
    let cluster_task = if exclusive {
        None
    } else {
        Some(tokio::spawn(cluster.run(stop.clone())))
    };
    let task = tokio::spawn(async move {
        let _ = task.await;
        stop.cancel();
        if let Some(cluster) = cluster_task {
            let _ = cluster.await;
        }
    });
    Ok(Opened {
        handle: StoreHandle::postgres(
            Handle {
                inbox: inbox_tx,
                pool,
                report: Arc::new(report),
            },
            trouble,
        ),
        recovered,
        ended: Ended::Task(task),
        // Alone on the database, the worker has nobody else's changes to hear of.
        cluster: (!exclusive).then_some(events),
    })
}

/// Reads every row, sets aside the ones that cannot be read, and gives the queue back in
/// the recovery order both stores share. The jobs other nodes run stay theirs: they are
/// read, not requeued. An exclusive node (alone on the database) places the unfinished
/// jobs with the ranks of that order, as the file store rewrites `queue.json` at boot; a
/// node among others keeps the shared ranks.
async fn replay(
    client: &mut Client,
    node: &Node,
) -> Result<(Recovered, HashMap<JobId, i64>), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id, body::text, placement, rank, version, owner FROM tw_jobs",
            &[],
        )
        .await?;
    let mut jobs = HashMap::with_capacity(rows.len());
    let mut versions = HashMap::with_capacity(rows.len());
    let mut running: Vec<(u64, JobId)> = Vec::new();
    let mut queued: Vec<(u64, JobId)> = Vec::new();
    let mut damaged: Vec<(Uuid, String, String)> = Vec::new();
    let mut ranks = HashMap::new();
    let mut elsewhere = HashMap::new();
    for row in rows {
        let id: Uuid = row.get(0);
        let body: String = row.get(1);
        let placement: String = row.get(2);
        let rank: Option<i64> = row.get(3);
        let version: i64 = row.get(4);
        let owner: Option<String> = row.get(5);
        let job = match parse_row(id, &body) {
            Ok(job) => job,
            Err(reason) => {
                warn!(job_id = %id, %reason, "unreadable job row; moved to tw_quarantine");
                damaged.push((id, body, reason));
                continue;
            }
        };
        let id = job.id;
        match (placement.as_str(), rank) {
            ("running", Some(rank)) => match owner {
                Some(owner) if !node.exclusive && owner != node.id => {
                    elsewhere.insert(id, owner);
                }
                _ => {
                    running.push((rank_from_db(rank), id));
                    ranks.insert(id, rank_from_db(rank));
                }
            },
            ("queued", Some(rank)) => {
                queued.push((rank_from_db(rank), id));
                ranks.insert(id, rank_from_db(rank));
            }
            _ => {}
        }
        versions.insert(id, version);
        jobs.insert(id, job);
    }
    if !damaged.is_empty() {
        let transaction = client.transaction().await?;
        for (id, body, reason) in &damaged {
            transaction
                .execute(
                    "INSERT INTO tw_quarantine (job_id, body, reason) VALUES ($1, $2, $3)",
                    &[id, body, reason],
                )
                .await?;
            transaction
                .execute("DELETE FROM tw_jobs WHERE id = $1", &[id])
                .await?;
        }
        transaction.commit().await?;
    }
    running.sort_unstable();
    queued.sort_unstable();
    let listed = |list: &[(u64, JobId)]| -> Vec<String> {
        list.iter().map(|(_, id)| id.to_string()).collect()
    };
    // Jobs of other nodes are not this boot's to order: leave them out of the lists'
    // completion of missing unfinished jobs.
    let mine: HashMap<JobId, Job> = jobs
        .iter()
        .filter(|(id, _)| !elsewhere.contains_key(id))
        .map(|(id, job)| (*id, job.clone()))
        .collect();
    let order = requeue_order(&mine, &listed(&running), &listed(&queued), &mut Vec::new());

    if node.exclusive {
        ranks.clear();
        let ids: Vec<Uuid> = order.iter().map(|id| id.as_uuid()).collect();
        let new_ranks: Vec<i64> = (0..order.len())
            .map(|i| rank_to_db(FIRST_QUEUED_RANK + i as u64))
            .collect();
        client
            .execute(
                "UPDATE tw_jobs AS j SET placement = 'queued', rank = u.rank, owner = NULL, lease_until = NULL \
                   FROM unnest($1::uuid[], $2::int8[]) AS u(id, rank) WHERE j.id = u.id",
                &[&ids, &new_ranks],
            )
            .await?;
    }

    let mut all: Vec<Job> = jobs.into_values().collect();
    all.sort_by_key(|j| (j.created_at, j.id));
    Ok((
        Recovered {
            jobs: all,
            order,
            quarantined: damaged.len(),
            versions: versions.iter().map(|(id, v)| (*id, *v as u64)).collect(),
            ranks,
            elsewhere,
        },
        versions,
    ))
}

/// A row's body as a job, or why it cannot be one.
pub(crate) fn parse_row(id: Uuid, body: &str) -> Result<Job, String> {
    serde_json::from_str(body)
        .map_err(|e| format!("invalid JSON: {e}"))
        .and_then(|value| Job::from_stored(value).map_err(|e| format!("invalid job: {e}")))
        .and_then(|job| {
            if job.id == JobId::from_uuid(id) {
                Ok(job)
            } else {
                Err(format!("the row of job {id} holds job {}", job.id))
            }
        })
}

/// The persister task's state.
struct Persister {
    pool: Pool,
    pg: tokio_postgres::Config,
    /// The database as messages name it (no password).
    shown: String,
    inbox: mpsc::Receiver<Request>,
    /// The version of each row as this daemon last wrote or read it.
    versions: HashMap<JobId, i64>,
    trouble: watch::Sender<Option<String>>,
    fatal: CancellationToken,
    /// Set by a fatal error: every later write is refused with it.
    broken: Option<String>,
    /// `None` while the database is out of reach.
    lock: Option<LockConnection>,
    backoff: Duration,
    /// When to try to reconnect, while the database is out of reach. A deadline, not a
    /// sleep begun on each turn of the loop: requests refused meanwhile turn it often.
    reconnect_at: Option<tokio::time::Instant>,
    /// Groups whose transactions may run at once, each on a connection of the pool.
    max_in_flight: usize,
    node: Arc<Node>,
}

/// A group's transaction under way.
type InFlight = std::pin::Pin<Box<dyn std::future::Future<Output = Done> + Send>>;

/// A group whose transaction has ended, to be answered.
struct Done {
    group: Vec<Request>,
    written: Vec<(JobId, i64)>,
    began: std::time::Instant,
    outcome: Outcome,
}

/// How a group's transaction went.
enum Outcome {
    /// Committed, but for the requests refused by a conflict: each with the row it met.
    Committed(HashMap<usize, Option<Box<Remote>>>),
    /// Nothing was stored; the database may be out of reach.
    NotStored { reason: String, connection: bool },
    /// The connection broke while the commit was under way.
    Unknown(String),
    /// The database holds what cannot be: the daemon must stop.
    Broken(String),
}

impl Persister {
    async fn run(mut self) {
        let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
        let mut closed = false;
        loop {
            if closed && in_flight.is_empty() {
                break;
            }
            let reconnect = self.reconnect_at.filter(|_| self.broken.is_none());
            let room = !closed && in_flight.len() < self.max_in_flight;
            tokio::select! {
                biased;
                Some(done) = in_flight.next() => self.finish_group(done).await,
                _ = async { (&mut self.lock.as_mut().expect("guarded").closed).await },
                    if self.lock.is_some() => {
                    self.lost(format!("lost the connection to the database {}", self.shown));
                }
                _ = tokio::time::sleep_until(reconnect.unwrap_or_else(tokio::time::Instant::now)),
                    if reconnect.is_some() => self.reconnect().await,
                request = self.inbox.recv(), if room => {
                    let Some(first) = request else {
                        closed = true;
                        continue;
                    };
                    let mut group = vec![first];
                    while group.len() < MAX_GROUP {
                        match self.inbox.try_recv() {
                            Ok(request) => group.push(request),
                            Err(_) => break,
                        }
                    }
                    if let Some(transaction) = self.begin_group(group) {
                        in_flight.push(transaction);
                    }
                }
            }
        }
        // Released at once, so that the next daemon (or a migration's check) can take it
        // now; a connection closed without it releases it too, a moment later.
        if let Some(lock) = self.lock.take() {
            let _ = lock
                .client
                .execute(
                    "SELECT pg_advisory_unlock($1::int4, $2::int4)",
                    &[&NODE_LOCK_CLASS, &node_lock_key(&self.node.id)],
                )
                .await;
        }
        info!("the database store has stopped");
    }

    /// The database went out of reach: the lock connection is let go (a reconnection takes
    /// the lock again), and writes are refused until it is back.
    fn lost(&mut self, reason: String) {
        self.lock = None;
        if self.trouble.borrow().is_none() {
            error!(%reason, "database out of reach; writes are refused until it is back");
        }
        self.trouble.send_replace(Some(reason));
        if self.reconnect_at.is_none() {
            self.backoff = RECONNECT_FIRST;
            self.reconnect_at = Some(tokio::time::Instant::now() + self.backoff);
        }
    }

    async fn reconnect(&mut self) {
        match connect_locked(&self.pg, &self.node).await {
            Ok(Ok(lock)) => {
                info!(database = %self.shown, "the database is back; writes are accepted again");
                self.lock = Some(lock);
                self.reconnect_at = None;
                self.trouble.send_replace(None);
            }
            Ok(Err(holder)) => self.fail(format!(
                "while the database {} was out of reach, {holder}",
                self.shown
            )),
            Err(e) => {
                let reason = format!("cannot reach the database {}: {}", self.shown, describe(&e));
                self.trouble.send_replace(Some(reason));
                self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
                self.reconnect_at = Some(tokio::time::Instant::now() + self.backoff);
            }
        }
    }

    /// A fatal error: the daemon stops, and the restart reads what the database holds.
    fn fail(&mut self, reason: String) {
        error!(%reason, "fatal storage error; the daemon stops");
        self.broken = Some(reason);
        self.fatal.cancel();
    }

    /// Starts a group's transaction, or answers the group at once when the store refuses
    /// writes (a fatal error, the database out of reach).
    fn begin_group(&mut self, group: Vec<Request>) -> Option<InFlight> {
        let refusal = match (&self.broken, self.trouble.borrow().clone()) {
            (Some(reason), _) => Some(StoreError::Fatal(reason.clone())),
            (None, Some(reason)) => Some(StoreError::Unavailable(reason)),
            (None, None) => None,
        };
        if let Some(error) = refusal {
            METRICS.store_refusals.inc();
            for request in group {
                let _ = request.respond_to.send(Err(error.clone()));
            }
            return None;
        }
        // Each write names the version it replaces: the worker's, or the one this node last
        // wrote or read. A job is in at most one group in flight (the worker sends a job's
        // next change only once its last one is answered).
        let mut rows: Vec<Row> = Vec::new();
        let mut ranks: Vec<(usize, JobId, u64)> = Vec::new();
        let mut group = group;
        for (at, request) in group.iter_mut().enumerate() {
            for pending in std::mem::take(&mut request.writes) {
                let id = pending.change.job.id;
                let base = pending
                    .base
                    .map(|b| b as i64)
                    .unwrap_or_else(|| self.versions.get(&id).copied().unwrap_or(0));
                let fence = if self.node.exclusive {
                    Fence::Any
                } else {
                    pending.fence
                };
                rows.push(Row {
                    request: at,
                    change: pending.change,
                    base,
                    fence,
                });
            }
            for (id, rank) in std::mem::take(&mut request.ranks) {
                ranks.push((at, id, rank));
            }
        }
        let (pool, shown, node) = (self.pool.clone(), self.shown.clone(), self.node.clone());
        Some(Box::pin(async move {
            let began = std::time::Instant::now();
            let (outcome, written) = transaction(&pool, &shown, &node, rows, ranks).await;
            Done {
                group,
                written,
                began,
                outcome,
            }
        }))
    }

    /// Answers a group whose transaction has ended.
    async fn finish_group(&mut self, done: Done) {
        let Done {
            group,
            written,
            began,
            outcome,
        } = done;
        let outcome = match outcome {
            Outcome::Unknown(reason) => self.settle(&written, reason).await,
            other => other,
        };
        let (answer, mut refused) = match outcome {
            Outcome::Committed(refused) => {
                self.versions.extend(written.iter().copied());
                if !written.is_empty() {
                    METRICS.batch_jobs.observe(written.len() as f64);
                    METRICS.flush.observe_duration(began.elapsed());
                }
                (Ok(()), refused)
            }
            Outcome::NotStored { reason, connection } => {
                METRICS.store_refusals.inc();
                if connection {
                    self.lost(reason.clone());
                }
                (Err(StoreError::Unavailable(reason)), HashMap::new())
            }
            Outcome::Unknown(reason) => {
                self.fail(format!("the outcome of a commit is unknown: {reason}"));
                (Err(StoreError::OutcomeUnknown(reason)), HashMap::new())
            }
            Outcome::Broken(reason) => {
                self.fail(reason.clone());
                (Err(StoreError::Fatal(reason)), HashMap::new())
            }
        };
        for (at, request) in group.into_iter().enumerate() {
            let answer = match refused.remove(&at) {
                Some(current) => {
                    if let Some(remote) = &current {
                        self.versions.insert(remote.job.id, remote.version as i64);
                    }
                    Err(StoreError::Conflict { current })
                }
                None => answer.clone(),
            };
            let _ = request.respond_to.send(answer);
        }
    }

    /// A commit whose answer was lost: once the database answers again, the versions it
    /// wrote say whether it landed (a transaction lands whole or not at all). Until the
    /// database answers, the daemon cannot go on with a state it does not know.
    async fn settle(&mut self, written: &[(JobId, i64)], reason: String) -> Outcome {
        warn!(%reason, "the connection broke during a commit; asking the database whether it landed");
        self.lost(reason.clone());
        let ids: Vec<Uuid> = written.iter().map(|(id, _)| id.as_uuid()).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut backoff = RECONNECT_FIRST;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RECONNECT_MAX);
            let Ok(client) = self.pool.get().await else {
                continue;
            };
            let Ok(rows) = client
                .query(
                    "SELECT id, version FROM tw_jobs WHERE id = ANY($1::uuid[])",
                    &[&ids],
                )
                .await
            else {
                continue;
            };
            let now: HashMap<Uuid, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            let landed = written
                .iter()
                .filter(|(id, version)| now.get(&id.as_uuid()) == Some(version))
                .count();
            return if landed == written.len() {
                info!("the commit had landed");
                Outcome::Committed(HashMap::new())
            } else if landed == 0 {
                info!("the commit had not landed");
                Outcome::NotStored {
                    reason,
                    connection: true,
                }
            } else {
                Outcome::Broken(format!(
                    "after a broken commit, the database {} holds only part of it",
                    self.shown
                ))
            };
        }
        Outcome::Unknown(reason)
    }
}

/// One write of a group, with the request it came in.
struct Row {
    request: usize,
    change: Change,
    base: i64,
    fence: Fence,
}

fn fence_code(fence: Fence) -> i16 {
    match fence {
        Fence::Owner => 0,
        Fence::Recover => 1,
        Fence::Any => 2,
        Fence::Claim => 3,
    }
}

/// The channel every node listens on; a payload is the writer's node id and the ids of the
/// jobs it changed, separated by spaces.
pub(crate) const CHANNEL: &str = "tw_jobs";

/// Payloads must stay under PostgreSQL's 8000 bytes.
const PAYLOAD_IDS: usize = 200;

/// Writes the rows that hold (each at the version it replaces, under the claim it needs);
/// a start skips a row another transaction holds (`FOR UPDATE SKIP LOCKED`: a claim never
/// waits for another node's), every other write waits for it. A request with a row that does not hold is left out whole and the
/// rest written again, so that every request lands whole or not at all; the refused ones
/// are answered with the row as it is now. Then the reranks, the notification to the other
/// nodes, and the commit.
async fn transaction(
    pool: &Pool,
    shown: &str,
    node: &Node,
    rows: Vec<Row>,
    ranks: Vec<(usize, JobId, u64)>,
) -> (Outcome, Vec<(JobId, i64)>) {
    let not_stored = |e: tokio_postgres::Error| Outcome::NotStored {
        connection: e.as_db_error().is_none(),
        reason: format!("the database {} refused the write: {}", shown, describe(&e)),
    };
    let mut client = match pool.get().await {
        Ok(client) => client,
        Err(e) => {
            return (
                Outcome::NotStored {
                    reason: format!("cannot reach the database {}: {e}", shown),
                    connection: true,
                },
                Vec::new(),
            );
        }
    };
    let lease_ms = node.lease.as_millis() as f64;
    // Requests left out, and the jobs that made them so.
    let mut refused: HashMap<usize, Option<JobId>> = HashMap::new();
    loop {
        let live: Vec<&Row> = rows
            .iter()
            .filter(|r| !refused.contains_key(&r.request))
            .collect();
        let written: Vec<(JobId, i64)> =
            live.iter().map(|r| (r.change.job.id, r.base + 1)).collect();
        let transaction = match client.transaction().await {
            Ok(transaction) => transaction,
            Err(e) => return (not_stored(e), written),
        };
        let mut conflicts: Vec<JobId> = Vec::new();
        if !live.is_empty() {
            let mut ids = Vec::with_capacity(live.len());
            let mut bodies = Vec::with_capacity(live.len());
            let mut statuses = Vec::with_capacity(live.len());
            let mut placements = Vec::with_capacity(live.len());
            let mut rank_column = Vec::with_capacity(live.len());
            let mut bases = Vec::with_capacity(live.len());
            let mut fences = Vec::with_capacity(live.len());
            for row in &live {
                let (placement, rank) = placement_to_db(row.change.placement);
                ids.push(row.change.job.id.as_uuid());
                bodies.push(
                    String::from_utf8(row.change.job.to_file_bytes())
                        .expect("a job's JSON is UTF-8"),
                );
                statuses.push(row.change.job.status.as_str().to_string());
                placements.push(placement);
                rank_column.push(rank);
                bases.push(row.base);
                fences.push(fence_code(row.fence));
            }
            let stored = transaction
                .query(
                    "WITH u AS ( \
                        SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int2[]) \
                          AS u(id, body, status, placement, rank, base, fence)), \
                     upd AS ( \
                        UPDATE tw_jobs AS j \
                           SET body = u.body::json, status = u.status, placement = u.placement, \
                               rank = u.rank, version = u.base + 1, updated_at = now(), \
                               owner = CASE WHEN u.placement = 'running' THEN $8 END, \
                               lease_until = CASE WHEN u.placement = 'running' \
                                   THEN now() + $9::float8 * interval '1 millisecond' END, \
                               generation = j.generation + CASE WHEN u.placement = 'running' \
                                   AND (j.placement <> 'running' OR j.owner IS DISTINCT FROM $8) THEN 1 ELSE 0 END \
                          FROM u \
                         WHERE j.id = u.id AND u.base > 0 AND j.version = u.base \
                           AND (u.fence = 2 \
                                OR (u.fence = 0 AND (j.owner IS NULL OR (j.owner = $8 AND j.lease_until > now()))) \
                                OR (u.fence = 1 AND (j.owner IS NULL OR j.owner = $8 OR j.lease_until <= now())) \
                                OR (u.fence = 3 AND (j.owner IS NULL OR (j.owner = $8 AND j.lease_until > now())) \
                                    AND j.id IN (SELECT id FROM tw_jobs WHERE id = ANY($1::uuid[]) \
                                                  FOR UPDATE SKIP LOCKED))) \
                        RETURNING j.id), \
                     ins AS ( \
                        INSERT INTO tw_jobs (id, body, status, placement, rank, version, owner, lease_until, generation) \
                        SELECT id, body::json, status, placement, rank, 1, \
                               CASE WHEN placement = 'running' THEN $8 END, \
                               CASE WHEN placement = 'running' THEN now() + $9::float8 * interval '1 millisecond' END, \
                               CASE WHEN placement = 'running' THEN 1 ELSE 0 END \
                          FROM u WHERE u.base = 0 \
                        ON CONFLICT (id) DO NOTHING \
                        RETURNING id) \
                     SELECT id FROM upd UNION ALL SELECT id FROM ins",
                    &[
                        &ids,
                        &bodies,
                        &statuses,
                        &placements,
                        &rank_column,
                        &bases,
                        &fences,
                        &node.id,
                        &lease_ms,
                    ],
                )
                .await;
            match stored {
                Ok(stored) if stored.len() == live.len() => {}
                Ok(stored) => {
                    let stored: std::collections::HashSet<Uuid> =
                        stored.iter().map(|r| r.get(0)).collect();
                    conflicts = live
                        .iter()
                        .filter(|r| !stored.contains(&r.change.job.id.as_uuid()))
                        .map(|r| r.change.job.id)
                        .collect();
                }
                Err(e) => return (not_stored(e), written),
            }
        }
        if !conflicts.is_empty() {
            // Nothing of this try stays: the requests of the refused rows are left out, and
            // the rest is written again.
            drop(transaction);
            for row in &live {
                if conflicts.contains(&row.change.job.id) {
                    refused.insert(row.request, Some(row.change.job.id));
                }
            }
            continue;
        }
        let live_ranks: Vec<&(usize, JobId, u64)> = ranks
            .iter()
            .filter(|(at, _, _)| !refused.contains_key(at))
            .collect();
        if !live_ranks.is_empty() {
            let ids: Vec<Uuid> = live_ranks.iter().map(|(_, id, _)| id.as_uuid()).collect();
            let values: Vec<i64> = live_ranks
                .iter()
                .map(|(_, _, rank)| rank_to_db(*rank))
                .collect();
            if let Err(e) = transaction
                .execute(
                    "UPDATE tw_jobs AS j SET rank = u.rank \
                       FROM unnest($1::uuid[], $2::int8[]) AS u(id, rank) \
                      WHERE j.id = u.id AND j.placement = 'queued'",
                    &[&ids, &values],
                )
                .await
            {
                return (not_stored(e), written);
            }
        }
        if !node.exclusive && !written.is_empty() {
            let payloads: Vec<String> = written
                .chunks(PAYLOAD_IDS)
                .map(|chunk| {
                    let ids: Vec<String> = chunk.iter().map(|(id, _)| id.to_string()).collect();
                    format!("{} {}", node.id, ids.join(" "))
                })
                .collect();
            if let Err(e) = transaction
                .execute(
                    "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
                    &[&CHANNEL, &payloads],
                )
                .await
            {
                return (not_stored(e), written);
            }
        }
        let outcome = match transaction.commit().await {
            Ok(()) => Outcome::Committed(HashMap::new()),
            // The server answered: it did not commit.
            Err(e) if e.as_db_error().is_some() => not_stored(e),
            Err(e) => Outcome::Unknown(format!(
                "the connection to the database {} broke during a commit: {}",
                shown,
                describe(&e)
            )),
        };
        let Outcome::Committed(_) = outcome else {
            return (outcome, written);
        };
        // What the refused rows hold now, for the worker to go on from.
        let mut answers: HashMap<usize, Option<Box<Remote>>> = HashMap::new();
        if !refused.is_empty() {
            let ids: Vec<JobId> = refused.values().flatten().copied().collect();
            let now = cluster::read_rows_on(&client, &ids)
                .await
                .unwrap_or_default();
            for (at, id) in refused {
                let current = id.and_then(|id| now.iter().find(|r| r.job.id == id).cloned());
                answers.insert(at, current.map(Box::new));
            }
        }
        return (Outcome::Committed(answers), written);
    }
}

/// A database error with its cause: tokio-postgres's own text alone says only "db error".
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lock_keys_are_fixed_by_the_name() {
        // FNV-1a of the bytes: the same key on every build and box, different for
        // different names, so the lock of a name is the same across nodes.
        assert_eq!(node_lock_key(""), 0x811c_9dc5_u32 as i32);
        assert_eq!(node_lock_key("a"), 0xe40c_292c_u32 as i32);
        assert_ne!(node_lock_key("gpu-box-1"), node_lock_key("gpu-box-2"));
    }

    #[test]
    fn ranks_keep_their_order_as_bigints() {
        let ranks = [
            0,
            1,
            FIRST_QUEUED_RANK,
            1 << 63,
            (1 << 63) + (1 << 62),
            u64::MAX,
        ];
        for pair in ranks.windows(2) {
            assert!(rank_to_db(pair[0]) < rank_to_db(pair[1]), "{pair:?}");
        }
        for rank in ranks {
            assert_eq!(rank_from_db(rank_to_db(rank)), rank);
        }
    }
}
