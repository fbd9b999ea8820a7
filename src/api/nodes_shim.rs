//! The cluster's view of its nodes as the worker will give it (`WorkerHandle::nodes`,
//! `store::NodeView`), answered here from this daemon alone until the worker does: with the
//! file store, the only node is this daemon, live.

use crate::job::JobId;
use crate::worker::{WorkerError, WorkerHandle};

/// A node of the cluster, as `GET /v1/nodes` shows it.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct NodeView {
    /// The node's name (`cluster.node_id`).
    pub id: String,
    /// Where its API is reached (`cluster.address`).
    pub address: String,
    /// Whether the node is up now: it holds its lock on the database.
    pub live: bool,
    /// When it started, RFC 3339.
    pub started_at: String,
    /// Its last heartbeat, RFC 3339.
    pub heartbeat_at: String,
    /// The jobs it runs.
    pub running: Vec<JobId>,
    /// Its GPUs, and those free at its last heartbeat.
    pub gpus: Vec<u32>,
    pub free_gpus: Vec<u32>,
}

/// Every node, sorted by id: this daemon.
pub async fn nodes(worker: &WorkerHandle) -> Result<Vec<NodeView>, WorkerError> {
    static STARTED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let now = crate::job::format_timestamp(&chrono::Utc::now());
    let queue = worker.queue().await?;
    let gpus = worker.gpus().await?;
    Ok(vec![NodeView {
        id: crate::store::lock::host_name(),
        address: String::new(),
        live: true,
        started_at: STARTED.get_or_init(|| now.clone()).clone(),
        heartbeat_at: now,
        running: queue.running,
        free_gpus: gpus
            .iter()
            .filter(|g| g.job.is_none())
            .map(|g| g.id)
            .collect(),
        gpus: gpus.iter().map(|g| g.id).collect(),
    }])
}
