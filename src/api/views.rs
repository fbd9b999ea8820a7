//! The worker's views that `GET /v1/queue`, `GET /v1/gpus` and `GET /v1/nodes` show: the
//! queue order and why each queued job waits, the GPUs with the jobs that hold them, and the
//! nodes that share the queue.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::openapi::{Internal, Unauthorized, Unavailable};
use super::{ApiError, AppState};
use crate::job::JobId;
use crate::store::NodeView;

/// One GPU as `GET /v1/gpus` lists it.
#[derive(Serialize, ToSchema)]
#[schema(as = Gpu)]
pub(super) struct GpuEntry {
    /// The index nvidia-smi gives; what CUDA_VISIBLE_DEVICES and a job's gpu_ids hold.
    id: u32,
    /// The product name nvidia-smi gave at start; null when it could not be asked or did
    /// not report this id.
    #[schema(example = "NVIDIA H100 80GB HBM3", required = true)]
    name: Option<String>,
    /// Total memory in MiB as nvidia-smi gave it; null when unknown.
    #[schema(minimum = 1, required = true)]
    memory_mib: Option<u64>,
    /// The job whose trainer holds the GPU; null when it is free.
    #[schema(required = true)]
    job: Option<JobId>,
    /// Free, and held for an accepted offer (POST /v1/offers) whose job has not come yet:
    /// the lowest free GPUs, as many as the held offers take. A start of the trainer API
    /// cannot have it; the trainer API reports it unavailable.
    reserved: bool,
}

/// The configured GPUs, what nvidia-smi says they are, and the job holding each.
#[utoipa::path(
    get,
    path = "/v1/gpus",
    operation_id = "listGpus",
    tag = "jobs",
    summary = "The GPUs and who holds them",
    description = "Every GPU of [worker] gpus (the ids nvidia-smi reported at start, with gpus = \"auto\"), in configured order: what nvidia-smi said it is, and the job whose trainer holds it. A trainer still stopping after its job ended holds its GPUs until it has exited. Empty without GPU accounting.",
    responses(
        (status = 200, description = "The GPUs.", body = Vec<GpuEntry>),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn gpus(State(state): State<AppState>) -> Result<Json<Vec<GpuEntry>>, ApiError> {
    let views = state.worker()?.gpus().await?;
    Ok(Json(
        views
            .into_iter()
            .map(|view| GpuEntry {
                id: view.id,
                name: view.gpu.as_ref().map(|g| g.name.clone()),
                // 0 is nvidia-smi's `[N/A]`: unknown, like a GPU it did not report.
                memory_mib: view.gpu.as_ref().map(|g| g.memory_mib).filter(|m| *m > 0),
                job: view.job,
                reserved: view.reserved,
            })
            .collect(),
    ))
}

/// The queue as `GET /v1/queue` shows it. running and queued have the same meaning as
/// data/queue.json.
#[derive(Serialize, ToSchema)]
#[schema(as = Queue)]
pub(super) struct QueueView {
    /// Running jobs, in the order they started.
    running: Vec<JobId>,
    /// Queued jobs, in the order they will start.
    queued: Vec<JobId>,
    /// Why no job starts at all now (trainers cannot be started, the storage refused a
    /// write, max_concurrent = 0, the daemon is stopping); null when starts go on.
    #[schema(required = true)]
    paused: Option<String>,
    /// Why each queued job has not started yet, by job id: all slots busy, a slot held by
    /// a cancelled trainer in its grace, GPUs busy, places held for offers, a deadline that
    /// cannot be met, or the job ahead of it.
    #[schema(value_type = std::collections::HashMap<String, String>)]
    waiting: serde_json::Map<String, Value>,
}

#[utoipa::path(
    get,
    path = "/v1/queue",
    operation_id = "getQueue",
    tag = "jobs",
    summary = "The queue order",
    responses(
        (status = 200, description = "Running and queued job ids.", body = QueueView),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn queue(State(state): State<AppState>) -> Result<Json<QueueView>, ApiError> {
    let view = state.worker()?.queue().await?;
    // In queue order, which a map keyed by id would lose.
    let waiting = view
        .waiting
        .into_iter()
        .map(|(id, reason)| (id.to_string(), Value::String(reason)))
        .collect();
    Ok(Json(QueueView {
        running: view.running,
        queued: view.queued,
        paused: view.paused,
        waiting,
    }))
}

/// The nodes as `GET /v1/nodes` lists them.
#[derive(Serialize, ToSchema)]
#[schema(as = Nodes)]
pub(super) struct NodesView {
    /// Every node, live or gone, sorted by id.
    nodes: Vec<NodeView>,
}

/// The daemons that share the queue.
#[utoipa::path(
    get,
    path = "/v1/nodes",
    operation_id = "listNodes",
    tag = "nodes",
    summary = "The nodes sharing the queue",
    description = "Every daemon ([cluster] node_id) the store has known, sorted by id: where its API is reached, whether it is live (up now, holding its place in the database) or gone, when it started and last renewed its leases (its heartbeat), the jobs it runs, and its GPUs with those free at its last heartbeat. With the file store ([store] kind = \"files\"), the only node is this daemon, live.",
    responses(
        (status = 200, description = "The nodes.", body = NodesView,
            example = json!({"nodes": [{
                "id": "gpu-box-1",
                "address": "http://10.0.0.11:8787",
                "live": true,
                "started_at": "2026-11-28T21:00:00.000000Z",
                "heartbeat_at": "2026-11-28T21:15:25.000000Z",
                "running": ["123e4567-e89b-12d3-a456-426614174000"],
                "gpus": [0, 1, 2, 3],
                "free_gpus": [1, 3]
            }]})),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn nodes(State(state): State<AppState>) -> Result<Json<NodesView>, ApiError> {
    let nodes = state.worker()?.nodes().await?;
    Ok(Json(NodesView { nodes }))
}
