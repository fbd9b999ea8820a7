//! The nodes of one database: leases, notifications, takeover.
//!
//! Each node runs one cluster task beside its persister. Every third of the lease it:
//!
//! - renews the leases of its running jobs (`lease_until = now() + lease`, only where the
//!   lease still holds: a lapsed lease is never revived) and tells the worker which jobs it
//!   still holds and until when, by this process's clock, the leases surely hold;
//! - writes its heartbeat in `tw_nodes` (its address, GPUs, free GPUs, running jobs).
//!
//! Every second it looks for running jobs whose lease has lapsed, anyone's, and hands them
//! to the worker to take over as a boot recovers what a crash cut.
//!
//! Between those turns it listens on [`CHANNEL`]: every commit of another node names the
//! jobs it changed, and the worker gets their rows at once. The notifications of a lost
//! connection are gone, so the task also reads every row changed lately after it
//! reconnects, and once per lease in any case (the polling fallback).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use super::{CHANNEL, Node, NodeReport, connect, describe, node_lock_key, parse_row, rank_from_db};
use crate::job::JobId;
use crate::store::{ClusterEvent, NodeView, Placement, Remote, StoreError};

/// The columns [`remote`] reads.
const ROW: &str = "id, body::text, placement, rank, owner, \
                   (lease_until IS NOT NULL AND lease_until <= now()), version";

/// How far back a poll reads, beyond its last read: a transaction's rows appear at its
/// commit, with the `updated_at` of its start.
const POLL_OVERLAP: Duration = Duration::from_secs(10);

/// How often a node looks for lapsed leases.
const EXPIRY_SCAN: Duration = Duration::from_secs(1);

/// Takeovers handed to the worker per turn at most.
const EXPIRED_BATCH: i64 = 256;

/// A row of [`ROW`] as a [`Remote`]; `None` for a row that cannot be read (it stays as it
/// is; the next boot sets it aside).
fn remote(row: &tokio_postgres::Row) -> Option<Remote> {
    let id: Uuid = row.get(0);
    let body: String = row.get(1);
    let placement: String = row.get(2);
    let rank: Option<i64> = row.get(3);
    let owner: Option<String> = row.get(4);
    let expired: bool = row.get(5);
    let version: i64 = row.get(6);
    let job = match parse_row(id, &body) {
        Ok(job) => job,
        Err(reason) => {
            warn!(job_id = %id, %reason, "an unreadable job row; left as it is");
            return None;
        }
    };
    let placement = match (placement.as_str(), rank) {
        ("running", Some(rank)) => Placement::Running(rank_from_db(rank)),
        ("queued", Some(rank)) => Placement::Queued(rank_from_db(rank)),
        _ => Placement::Off,
    };
    Some(Remote {
        job,
        placement,
        owner,
        expired,
        version: version as u64,
    })
}

/// The rows of `ids` as they are now, on `client`.
pub(crate) async fn read_rows_on(
    client: &Client,
    ids: &[JobId],
) -> Result<Vec<Remote>, tokio_postgres::Error> {
    let ids: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
    let rows = client
        .query(
            &format!("SELECT {ROW} FROM tw_jobs WHERE id = ANY($1::uuid[])"),
            &[&ids],
        )
        .await?;
    Ok(rows.iter().filter_map(remote).collect())
}

/// The rows of `ids` as they are now.
pub(crate) async fn read_rows(pool: &Pool, ids: &[JobId]) -> Result<Vec<Remote>, StoreError> {
    let client = pool
        .get()
        .await
        .map_err(|e| StoreError::Unavailable(format!("cannot reach the database: {e}")))?;
    read_rows_on(&client, ids)
        .await
        .map_err(|e| StoreError::Unavailable(describe(&e)))
}

/// Every node the database has seen, sorted by id.
pub(crate) async fn nodes(pool: &Pool) -> Result<Vec<NodeView>, StoreError> {
    let unavailable = |e: tokio_postgres::Error| StoreError::Unavailable(describe(&e));
    let client = pool
        .get()
        .await
        .map_err(|e| StoreError::Unavailable(format!("cannot reach the database: {e}")))?;
    let rows = client
        .query(
            "SELECT id, address, to_json(started_at) #>> '{}', to_json(heartbeat_at) #>> '{}', \
                    gpus, free_gpus FROM tw_nodes ORDER BY id",
            &[],
        )
        .await
        .map_err(unavailable)?;
    let held: std::collections::HashSet<i64> = client
        .query(
            "SELECT objid::bigint FROM pg_locks \
              WHERE locktype = 'advisory' AND objsubid = 2 AND granted \
                AND classid::bigint = $1::int4::bigint \
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&super::NODE_LOCK_CLASS],
        )
        .await
        .map_err(unavailable)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut running: HashMap<String, Vec<String>> = HashMap::new();
    for row in client
        .query(
            "SELECT owner, id::text FROM tw_jobs WHERE placement = 'running' AND owner IS NOT NULL \
              ORDER BY rank",
            &[],
        )
        .await
        .map_err(unavailable)?
    {
        running.entry(row.get(0)).or_default().push(row.get(1));
    }
    let gpus = |list: Vec<i32>| list.into_iter().map(|g| g as u32).collect();
    Ok(rows
        .into_iter()
        .map(|row| {
            let id: String = row.get(0);
            let key = i64::from(node_lock_key(&id) as u32);
            NodeView {
                live: held.contains(&key),
                running: running.remove(&id).unwrap_or_default(),
                address: row.get(1),
                started_at: row.get(2),
                heartbeat_at: row.get(3),
                gpus: gpus(row.get(4)),
                free_gpus: gpus(row.get(5)),
                id,
            }
        })
        .collect())
}

/// Writes this node's row as it starts: its address and pid, `started_at` now.
pub(crate) async fn register(client: &Client, node: &Node) -> Result<(), tokio_postgres::Error> {
    let pid = std::process::id() as i32;
    let lease_ms = node.lease.as_millis() as i64;
    client
        .execute(
            "INSERT INTO tw_nodes (id, address, pid, started_at, heartbeat_at, lease_ms) \
             VALUES ($1, $2, $3, now(), now(), $4) \
             ON CONFLICT (id) DO UPDATE SET address = EXCLUDED.address, pid = EXCLUDED.pid, \
                started_at = now(), heartbeat_at = now(), lease_ms = EXCLUDED.lease_ms, \
                running = 0",
            &[&node.id, &node.address, &pid, &lease_ms],
        )
        .await?;
    Ok(())
}

/// The cluster task's state.
pub(crate) struct Cluster {
    pg: tokio_postgres::Config,
    pool: Pool,
    node: Arc<Node>,
    shown: String,
    report: watch::Receiver<NodeReport>,
    events: mpsc::Sender<ClusterEvent>,
    /// Whether this process has written its heartbeat yet.
    registered: bool,
    /// When the boot read the rows (the database's clock): the first poll reads from there.
    replayed_at: chrono::DateTime<chrono::Utc>,
}

impl Cluster {
    pub(crate) fn new(
        pg: tokio_postgres::Config,
        pool: Pool,
        node: Arc<Node>,
        shown: String,
        report: watch::Receiver<NodeReport>,
        events: mpsc::Sender<ClusterEvent>,
        replayed_at: chrono::DateTime<chrono::Utc>,
    ) -> Cluster {
        Cluster {
            pg,
            pool,
            node,
            shown,
            report,
            events,
            registered: false,
            replayed_at,
        }
    }

    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let turn = self.node.lease / 3;
        // The first heartbeat carries the GPUs: the worker reports them as it starts.
        let _ = tokio::time::timeout(turn, self.report.changed()).await;
        let mut ticker = tokio::time::interval(turn);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Lapsed leases are looked for more often than leases are renewed: a takeover
        // waits for the lease and at most this much more. The query reads the few running
        // rows through their index.
        let mut scan = tokio::time::interval(EXPIRY_SCAN.min(turn));
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listener: Option<(Client, tokio::sync::oneshot::Receiver<()>)> = None;
        let (notices_tx, mut notices) = mpsc::unbounded_channel::<String>();
        let mut listen_retry_at = tokio::time::Instant::now();
        // Rows changed since this moment (the database's clock) may not have been seen.
        let mut seen_until = Some(self.replayed_at);
        let mut last_poll = tokio::time::Instant::now();
        loop {
            if listener.is_none() && tokio::time::Instant::now() >= listen_retry_at {
                match self.listen(notices_tx.clone()).await {
                    Ok(connection) => {
                        listener = Some(connection);
                        // What was changed while nobody listened.
                        self.poll(&mut seen_until).await;
                        last_poll = tokio::time::Instant::now();
                    }
                    Err(e) => {
                        warn!(database = %self.shown, error = %e, "cannot listen for the other nodes' changes; polling until it can");
                        listen_retry_at = tokio::time::Instant::now() + turn;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticker.tick() => {
                    self.renew().await;
                    self.heartbeat().await;
                    if last_poll.elapsed() >= self.node.lease {
                        last_poll = tokio::time::Instant::now();
                        self.poll(&mut seen_until).await;
                    }
                }
                _ = scan.tick() => self.expired().await,
                Some(payload) = notices.recv() => {
                    let mut ids = Vec::new();
                    self.note(&payload, &mut ids);
                    while let Ok(payload) = notices.try_recv() {
                        self.note(&payload, &mut ids);
                    }
                    self.changed(ids).await;
                }
                _ = async { (&mut listener.as_mut().expect("guarded").1).await },
                    if listener.is_some() => {
                    warn!(database = %self.shown, "lost the connection that listens for the other nodes' changes; reconnecting");
                    listener = None;
                    listen_retry_at = tokio::time::Instant::now();
                }
            }
        }
    }

    /// A connection that listens on [`CHANNEL`].
    async fn listen(
        &self,
        notices: mpsc::UnboundedSender<String>,
    ) -> Result<(Client, tokio::sync::oneshot::Receiver<()>), String> {
        let (client, closed) = connect(&self.pg, Some(notices))
            .await
            .map_err(|e| describe(&e))?;
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(|e| describe(&e))?;
        Ok((client, closed))
    }

    /// The job ids of a notification, unless this node wrote them.
    fn note(&self, payload: &str, ids: &mut Vec<JobId>) {
        let mut words = payload.split(' ');
        if words.next() == Some(self.node.id.as_str()) {
            return;
        }
        ids.extend(words.filter_map(|w| w.parse::<Uuid>().ok().map(JobId::from_uuid)));
    }

    /// Hands the rows of `ids` to the worker.
    async fn changed(&self, ids: Vec<JobId>) {
        if ids.is_empty() {
            return;
        }
        match read_rows(&self.pool, &ids).await {
            Ok(rows) if !rows.is_empty() => {
                let _ = self.events.send(ClusterEvent::Changed(rows)).await;
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "cannot read the rows other nodes changed; the next poll will")
            }
        }
    }

    /// Renews this node's leases and tells the worker which jobs it still holds.
    async fn renew(&self) {
        let asked_at = Instant::now();
        let Ok(client) = self.pool.get().await else {
            return;
        };
        let lease_ms = self.node.lease.as_millis() as f64;
        match client
            .query(
                "UPDATE tw_jobs SET lease_until = now() + $2::float8 * interval '1 millisecond' \
                  WHERE owner = $1 AND placement = 'running' AND lease_until > now() \
                 RETURNING id",
                &[&self.node.id, &lease_ms],
            )
            .await
        {
            Ok(rows) => {
                let held = rows
                    .iter()
                    .map(|r| JobId::from_uuid(r.get::<_, Uuid>(0)))
                    .collect();
                let _ = self
                    .events
                    .send(ClusterEvent::Renewed {
                        held,
                        asked_at,
                        until: asked_at + self.node.lease,
                    })
                    .await;
            }
            Err(e) => {
                warn!(error = %describe(&e), "cannot renew this node's leases; its trainers stop before the leases lapse unless a renewal succeeds")
            }
        }
    }

    /// Writes this node's row: who it is, where, and what it has free.
    async fn heartbeat(&mut self) {
        let Ok(client) = self.pool.get().await else {
            return;
        };
        let report = self.report.borrow().clone();
        let gpus: Vec<i32> = report.gpus.iter().map(|g| *g as i32).collect();
        let free: Vec<i32> = report.free_gpus.iter().map(|g| *g as i32).collect();
        let lease_ms = self.node.lease.as_millis() as i64;
        let running = report.running as i32;
        let pid = std::process::id() as i32;
        let result = client
            .execute(
                "INSERT INTO tw_nodes (id, address, pid, started_at, heartbeat_at, lease_ms, gpus, free_gpus, running) \
                 VALUES ($1, $2, $3, now(), now(), $4, $5, $6, $7) \
                 ON CONFLICT (id) DO UPDATE SET address = EXCLUDED.address, pid = EXCLUDED.pid, \
                    heartbeat_at = now(), lease_ms = EXCLUDED.lease_ms, gpus = EXCLUDED.gpus, \
                    free_gpus = EXCLUDED.free_gpus, running = EXCLUDED.running",
                &[
                    &self.node.id,
                    &self.node.address,
                    &pid,
                    &lease_ms,
                    &gpus,
                    &free,
                    &running,
                ],
            )
            .await;
        match result {
            Ok(_) => {
                if !self.registered {
                    info!(node = %self.node.id, address = %self.node.address, "node registered");
                }
                self.registered = true;
            }
            Err(e) => warn!(error = %describe(&e), "cannot write this node's heartbeat"),
        }
    }

    /// Hands the running jobs whose lease has lapsed to the worker, to take over.
    async fn expired(&self) {
        let Ok(client) = self.pool.get().await else {
            return;
        };
        match client
            .query(
                &format!(
                    "SELECT {ROW} FROM tw_jobs WHERE placement = 'running' AND lease_until <= now() \
                      ORDER BY rank LIMIT $1"
                ),
                &[&EXPIRED_BATCH],
            )
            .await
        {
            Ok(rows) => {
                let rows: Vec<Remote> = rows.iter().filter_map(remote).collect();
                if !rows.is_empty() {
                    let _ = self.events.send(ClusterEvent::Expired(rows)).await;
                }
            }
            Err(e) => warn!(error = %describe(&e), "cannot look for lapsed leases"),
        }
    }

    /// Reads the rows changed since `seen_until` (with [`POLL_OVERLAP`] before it): whatever
    /// notifications were missed. Moves `seen_until` to the database's now.
    async fn poll(&self, seen_until: &mut Option<chrono::DateTime<chrono::Utc>>) {
        let Ok(client) = self.pool.get().await else {
            return;
        };
        let overlap = chrono::Duration::from_std(POLL_OVERLAP).expect("a small duration");
        let since = seen_until.unwrap_or(self.replayed_at) - overlap;
        let query = client
            .query(
                &format!(
                    "SELECT {ROW}, now() FROM tw_jobs WHERE updated_at >= $1 \
                     UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, now()"
                ),
                &[&since],
            )
            .await;
        match query {
            Ok(rows) => {
                let mut changed = Vec::new();
                for row in &rows {
                    if row.get::<_, Option<Uuid>>(0).is_none() {
                        *seen_until = Some(row.get(7));
                    } else if let Some(remote) = remote(row) {
                        changed.push(remote);
                    }
                }
                if !changed.is_empty() {
                    let _ = self.events.send(ClusterEvent::Changed(changed)).await;
                }
            }
            Err(e) => warn!(error = %describe(&e), "cannot poll for the other nodes' changes"),
        }
    }
}
