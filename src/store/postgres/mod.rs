//! The PostgreSQL store: job records and the queue order in a database.
//!
//! [`open`] connects, takes the store's lock (a session advisory lock held on a connection
//! of its own for the daemon's whole life, so one daemon writes a database at a time),
//! migrates the schema (`migrations/`, embedded in the binary and applied under that lock),
//! reads every row back as the file store reads its job files, and starts the persister
//! task. The worker reaches it through the store's boundary, [`super::StoreHandle`].
//!
//! Group commit: the persister takes every request waiting in its inbox and makes them
//! durable in one transaction (PostgreSQL flushes its WAL once per commit), then answers
//! each. Up to `pool_size` such transactions run at once, each on a connection of the pool,
//! so that the next group is written while the last one's commit waits for the flush (the
//! server then flushes their commits together). They never touch the same row: the worker
//! sends a job's next change only once its last one is answered. Every row carries a `version`, the count of its writes; a write names the version
//! it replaces, so a row changed by anyone else is never overwritten: the store then stops
//! as after a failed fsync, and the restart reads what the database holds.
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

use super::order::requeue_order;
use super::{
    Change, Ended, FIRST_QUEUED_RANK, OpenError, Opened, Placement, Recovered, StoreError,
    StoreHandle,
};
use crate::config::PostgresConfig;
use crate::job::{Job, JobId};
use crate::metrics::METRICS;

mod migrations {
    refinery::embed_migrations!("src/store/postgres/migrations");
}

/// The advisory lock that makes one daemon the writer of a database (advisory locks are
/// per database): the text "tw_s" as a number, below 2^32 so that `pg_locks` shows it
/// whole in `objid`.
const LOCK_KEY: i64 = 0x7477_5f73;

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

struct Request {
    changes: Vec<Change>,
    ranks: Vec<(JobId, u64)>,
    respond_to: oneshot::Sender<Result<(), StoreError>>,
}

/// The cloneable way to the persister task, behind a [`StoreHandle`]. The task ends once
/// every handle is gone, after it has answered everything sent to it.
#[derive(Clone, Debug)]
pub(crate) struct Handle {
    inbox: mpsc::Sender<Request>,
}

impl Handle {
    pub async fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        self.send(changes, Vec::new()).await
    }

    pub async fn rerank(&self, ranks: Vec<(JobId, u64)>) -> Result<(), StoreError> {
        self.send(Vec::new(), ranks).await
    }

    async fn send(&self, changes: Vec<Change>, ranks: Vec<(JobId, u64)>) -> Result<(), StoreError> {
        if changes.is_empty() && ranks.is_empty() {
            return Ok(());
        }
        let (respond_to, answer) = oneshot::channel();
        self.inbox
            .send(Request {
                changes,
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
fn rank_to_db(rank: u64) -> i64 {
    (rank ^ (1 << 63)) as i64
}

fn rank_from_db(rank: i64) -> u64 {
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

/// The connection that holds the store's lock, and the signal that it is gone.
struct LockConnection {
    client: Client,
    /// Resolves when the connection has ended (the server went away, a network fault).
    closed: oneshot::Receiver<()>,
}

/// Connects and takes the store's lock. `Ok(None)`: another daemon holds it; its holder is
/// described in the error text of the caller.
async fn connect_locked(
    pg: &tokio_postgres::Config,
) -> Result<Result<LockConnection, String>, tokio_postgres::Error> {
    let (client, connection) = pg.connect(NoTls).await?;
    let (closed_tx, closed) = oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %e, "the store's lock connection to the database ended");
        }
        let _ = closed_tx.send(());
    });
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
        .await?
        .get(0);
    if locked {
        return Ok(Ok(LockConnection { client, closed }));
    }
    let holder = client
        .query_opt(
            "SELECT coalesce(a.application_name, ''), coalesce(a.client_addr::text, 'a local socket'), \
                    a.backend_start::text \
               FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
              WHERE l.locktype = 'advisory' AND l.classid = 0 AND l.objid = $1::bigint::oid \
                AND l.granted \
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&LOCK_KEY],
        )
        .await
        .map_err(|e| warn!(error = %describe(&e), "cannot ask the database who holds the store's lock"))
        .ok()
        .flatten()
        .map(|row| {
            let name: String = row.get(0);
            let address: String = row.get(1);
            let since: String = row.get(2);
            format!("{name}, connected from {address} since {since}")
        })
        .unwrap_or_else(|| "a holder the server does not name".to_string());
    Ok(Err(holder))
}

/// Opens the database: connect, lock, migrate, read back, start the persister.
pub async fn open(config: &PostgresConfig, fatal: CancellationToken) -> Result<Opened, OpenError> {
    let shown = config.display_url();
    let pg = connection_config(config)?;
    let mut lock = match connect_locked(&pg).await {
        Ok(Ok(lock)) => lock,
        Ok(Err(holder)) => {
            return Err(OpenError::Held(format!(
                "the database {shown} is in use by another training-worker ({holder})"
            )));
        }
        Err(e) => {
            return Err(OpenError::Unreachable(format!(
                "cannot reach the database {shown}: {}",
                describe(&e)
            )));
        }
    };
    migrations::migrations::runner()
        .run_async(&mut lock.client)
        .await
        .map_err(|e| OpenError::Storage(format!("cannot migrate the database {shown}: {e}")))?;

    let (recovered, versions) = replay(&mut lock.client).await.map_err(|e| {
        OpenError::Storage(format!(
            "cannot read the database {shown}: {}",
            describe(&e)
        ))
    })?;

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
    let persister = Persister {
        pool,
        pg,
        shown,
        inbox,
        versions,
        trouble: trouble_tx,
        fatal,
        broken: None,
        lock: Some(lock),
        backoff: RECONNECT_FIRST,
        reconnect_at: None,
        max_in_flight: config.pool_size,
    };
    let task = tokio::spawn(persister.run());
    Ok(Opened {
        handle: StoreHandle::postgres(Handle { inbox: inbox_tx }, trouble),
        recovered,
        ended: Ended::Task(task),
    })
}

/// Reads every row, sets aside the ones that cannot be read, and gives the queue back in
/// the recovery order both stores share; the unfinished jobs are placed with the ranks of
/// that order, as the file store rewrites `queue.json` at boot.
async fn replay(
    client: &mut Client,
) -> Result<(Recovered, HashMap<JobId, i64>), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id, body::text, placement, rank, version FROM tw_jobs",
            &[],
        )
        .await?;
    let mut jobs = HashMap::with_capacity(rows.len());
    let mut versions = HashMap::with_capacity(rows.len());
    let mut running: Vec<(u64, JobId)> = Vec::new();
    let mut queued: Vec<(u64, JobId)> = Vec::new();
    let mut damaged: Vec<(Uuid, String, String)> = Vec::new();
    for row in rows {
        let id: Uuid = row.get(0);
        let body: String = row.get(1);
        let placement: String = row.get(2);
        let rank: Option<i64> = row.get(3);
        let version: i64 = row.get(4);
        let job = serde_json::from_str(&body)
            .map_err(|e| format!("invalid JSON: {e}"))
            .and_then(|value| Job::from_stored(value).map_err(|e| format!("invalid job: {e}")))
            .and_then(|job| {
                if job.id == JobId::from_uuid(id) {
                    Ok(job)
                } else {
                    Err(format!("the row of job {id} holds job {}", job.id))
                }
            });
        let job = match job {
            Ok(job) => job,
            Err(reason) => {
                warn!(job_id = %id, %reason, "unreadable job row; moved to tw_quarantine");
                damaged.push((id, body, reason));
                continue;
            }
        };
        let id = job.id;
        match (placement.as_str(), rank) {
            ("running", Some(rank)) => running.push((rank_from_db(rank), id)),
            ("queued", Some(rank)) => queued.push((rank_from_db(rank), id)),
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
    let order = requeue_order(&jobs, &listed(&running), &listed(&queued), &mut Vec::new());

    let ids: Vec<Uuid> = order.iter().map(|id| id.as_uuid()).collect();
    let ranks: Vec<i64> = (0..order.len())
        .map(|i| rank_to_db(FIRST_QUEUED_RANK + i as u64))
        .collect();
    client
        .execute(
            "UPDATE tw_jobs AS j SET placement = 'queued', rank = u.rank \
               FROM unnest($1::uuid[], $2::int8[]) AS u(id, rank) WHERE j.id = u.id",
            &[&ids, &ranks],
        )
        .await?;

    let mut all: Vec<Job> = jobs.into_values().collect();
    all.sort_by_key(|j| (j.created_at, j.id));
    Ok((
        Recovered {
            jobs: all,
            order,
            quarantined: damaged.len(),
        },
        versions,
    ))
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
    Committed,
    /// Nothing was stored; the database may be out of reach.
    NotStored {
        reason: String,
        connection: bool,
    },
    /// The connection broke while the commit was under way.
    Unknown(String),
    /// A row was not at the version this daemon last wrote.
    Conflict(String),
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
                .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
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
        match connect_locked(&self.pg).await {
            Ok(Ok(lock)) => {
                info!(database = %self.shown, "the database is back; writes are accepted again");
                self.lock = Some(lock);
                self.reconnect_at = None;
                self.trouble.send_replace(None);
            }
            Ok(Err(holder)) => self.fail(format!(
                "another training-worker took the database {} while it was out of reach ({holder})",
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
    fn begin_group(&mut self, mut group: Vec<Request>) -> Option<InFlight> {
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
        // The last record of each job in the group wins; each names the version it replaces.
        // A job is in at most one group in flight (the worker sends a job's next change only
        // once its last one is answered), so the versions known now are the rows' versions.
        let mut last: HashMap<JobId, usize> = HashMap::new();
        let mut changes: Vec<Change> = Vec::new();
        let mut ranks: Vec<(JobId, u64)> = Vec::new();
        for request in &mut group {
            for change in std::mem::take(&mut request.changes) {
                match last.get(&change.job.id) {
                    Some(&at) => changes[at] = change,
                    None => {
                        last.insert(change.job.id, changes.len());
                        changes.push(change);
                    }
                }
            }
            ranks.append(&mut request.ranks);
        }
        let written: Vec<(JobId, i64)> = changes
            .iter()
            .map(|c| {
                (
                    c.job.id,
                    self.versions.get(&c.job.id).copied().unwrap_or(0) + 1,
                )
            })
            .collect();
        let (pool, shown) = (self.pool.clone(), self.shown.clone());
        Some(Box::pin(async move {
            let began = std::time::Instant::now();
            let outcome = transaction(&pool, &shown, &changes, &written, &ranks).await;
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
        let answer = match outcome {
            Outcome::Committed => {
                self.versions.extend(written.iter().copied());
                if !written.is_empty() {
                    METRICS.batch_jobs.observe(written.len() as f64);
                    METRICS.flush.observe_duration(began.elapsed());
                }
                Ok(())
            }
            Outcome::NotStored { reason, connection } => {
                METRICS.store_refusals.inc();
                if connection {
                    self.lost(reason.clone());
                }
                Err(StoreError::Unavailable(reason))
            }
            Outcome::Unknown(reason) => {
                self.fail(format!("the outcome of a commit is unknown: {reason}"));
                Err(StoreError::OutcomeUnknown(reason))
            }
            Outcome::Conflict(reason) => {
                self.fail(reason.clone());
                Err(StoreError::Fatal(reason))
            }
        };
        for request in group {
            let _ = request.respond_to.send(answer.clone());
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
                Outcome::Committed
            } else if landed == 0 {
                info!("the commit had not landed");
                Outcome::NotStored {
                    reason,
                    connection: true,
                }
            } else {
                Outcome::Conflict(format!(
                    "after a broken commit, the database {} holds only part of it",
                    self.shown
                ))
            };
        }
        Outcome::Unknown(reason)
    }
}

/// One group's transaction on a connection of the pool: the rows, each at the version it
/// replaces, and the reranks.
async fn transaction(
    pool: &Pool,
    shown: &str,
    changes: &[Change],
    written: &[(JobId, i64)],
    ranks: &[(JobId, u64)],
) -> Outcome {
    let not_stored = |e: tokio_postgres::Error| Outcome::NotStored {
        connection: e.as_db_error().is_none(),
        reason: format!("the database {} refused the write: {}", shown, describe(&e)),
    };
    let mut client = match pool.get().await {
        Ok(client) => client,
        Err(e) => {
            return Outcome::NotStored {
                reason: format!("cannot reach the database {}: {e}", shown),
                connection: true,
            };
        }
    };
    let transaction = match client.transaction().await {
        Ok(transaction) => transaction,
        Err(e) => return not_stored(e),
    };
    if !changes.is_empty() {
        let mut ids = Vec::with_capacity(changes.len());
        let mut bodies = Vec::with_capacity(changes.len());
        let mut statuses = Vec::with_capacity(changes.len());
        let mut placements = Vec::with_capacity(changes.len());
        let mut rank_column = Vec::with_capacity(changes.len());
        let mut versions = Vec::with_capacity(changes.len());
        for (change, (_, version)) in changes.iter().zip(written) {
            let (placement, rank) = placement_to_db(change.placement);
            ids.push(change.job.id.as_uuid());
            bodies.push(
                String::from_utf8(change.job.to_file_bytes()).expect("a job's JSON is UTF-8"),
            );
            statuses.push(change.job.status.as_str().to_string());
            placements.push(placement);
            rank_column.push(rank);
            versions.push(*version);
        }
        let stored = transaction
            .query(
                "INSERT INTO tw_jobs AS j (id, body, status, placement, rank, version) \
                 SELECT id, body::json, status, placement, rank, version \
                   FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[]) \
                     AS u(id, body, status, placement, rank, version) \
                 ON CONFLICT (id) DO UPDATE \
                    SET body = EXCLUDED.body, status = EXCLUDED.status, \
                        placement = EXCLUDED.placement, rank = EXCLUDED.rank, \
                        version = EXCLUDED.version, updated_at = now() \
                  WHERE j.version = EXCLUDED.version - 1 \
                 RETURNING j.id",
                &[&ids, &bodies, &statuses, &placements, &rank_column, &versions],
            )
            .await;
        match stored {
            Ok(rows) if rows.len() == changes.len() => {}
            Ok(rows) => {
                let stored: std::collections::HashSet<Uuid> =
                    rows.iter().map(|r| r.get(0)).collect();
                let stale: Vec<String> = ids
                    .iter()
                    .filter(|id| !stored.contains(id))
                    .map(|id| id.to_string())
                    .collect();
                return Outcome::Conflict(format!(
                    "the database {} holds changes this daemon did not make, to job {}",
                    shown,
                    stale.join(", ")
                ));
            }
            Err(e) => return not_stored(e),
        }
    }
    if !ranks.is_empty() {
        let ids: Vec<Uuid> = ranks.iter().map(|(id, _)| id.as_uuid()).collect();
        let values: Vec<i64> = ranks.iter().map(|(_, rank)| rank_to_db(*rank)).collect();
        if let Err(e) = transaction
            .execute(
                "UPDATE tw_jobs AS j SET rank = u.rank \
                   FROM unnest($1::uuid[], $2::int8[]) AS u(id, rank) \
                  WHERE j.id = u.id AND j.placement = 'queued'",
                &[&ids, &values],
            )
            .await
        {
            return not_stored(e);
        }
    }
    match transaction.commit().await {
        Ok(()) => Outcome::Committed,
        // The server answered: it did not commit.
        Err(e) if e.as_db_error().is_some() => not_stored(e),
        Err(e) => Outcome::Unknown(format!(
            "the connection to the database {} broke during a commit: {}",
            shown,
            describe(&e)
        )),
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
