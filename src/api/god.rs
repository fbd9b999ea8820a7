//! The G.O.D trainer API (`../shared/GOD-TRAINER.md` in the project's contract): what the
//! validator's tournament orchestrator calls on a trainer box, on a listener of its own.
//!
//! A start names a (task, miner hotkey) pair and the GPUs to train on; it becomes a job of
//! the main API whose id is derived from the pair, started at once on exactly those GPUs
//! ([`WorkerHandle::start_now`]) or refused with nothing stored. The task's answers are
//! that job seen through this API's wire format. Errors are FastAPI-shaped
//! (`{"detail": "..."}`), as the client expects; the listener has no token, so it admits
//! loopback and the configured addresses only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use crate::config::{Stage, StageRun};
use crate::gpu::Availability;
use crate::job::{Job, JobId, Status, TrainerTask, format_timestamp};
use crate::worker::{StartedNow, WorkerError, WorkerHandle};
use openapi::{AccessForbidden, Invalid};

mod openapi;

pub use openapi::openapi_json;

/// The message a started task is answered with; the client compares it exactly.
pub const STARTED: &str = "Started Training!";

/// The namespace of the job ids derived from (task_id, hotkey) pairs, so that a pair
/// always names the same job.
const PAIR_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f1c_2a7e_93b4_4d1f_8a0e_5c3b_72d9_e401);

/// What this API's handlers share.
#[derive(Clone)]
pub struct TrainerState {
    app: AppState,
    /// Admitted besides loopback's 127.0.0.1 and ::1.
    allow: Arc<[IpAddr]>,
    /// The pipeline, to name a task's container.
    stages: Arc<[Stage]>,
    /// How GPU names map to the three types the client accepts.
    gpu_types: Arc<crate::gpu::GpuTypes>,
}

impl TrainerState {
    pub fn new(
        app: AppState,
        allow: Vec<IpAddr>,
        stages: Vec<Stage>,
        gpu_types: crate::gpu::GpuTypes,
    ) -> TrainerState {
        TrainerState {
            app,
            allow: allow.into(),
            stages: stages.into(),
            gpu_types: Arc::new(gpu_types),
        }
    }

    fn worker(&self) -> Result<&WorkerHandle, Detail> {
        self.app
            .worker()
            .map_err(|_| Detail::unavailable("not ready: the data dir is being replayed"))
    }
}

/// The job id of a (task_id, hotkey) pair.
pub fn job_id_of(task_id: &str, hotkey: &str) -> JobId {
    // Length-prefixed, so that no two pairs make the same name.
    let name = format!("{}:{task_id}{hotkey}", task_id.len());
    let id = uuid::Uuid::new_v5(&PAIR_NAMESPACE, name.as_bytes());
    id.to_string().parse().expect("a v5 UUID is a valid job id")
}

/// The routes, on their own listener; `/openapi.json` is this API's description.
pub fn router(state: TrainerState) -> Router {
    Router::new()
        .route("/v1/trainer/start_training", post(start_training))
        .route("/v1/trainer/get_recent_tasks", get(recent_tasks))
        .route("/v1/trainer/get_gpu_availability", get(gpu_availability))
        .route("/v1/trainer/{task_id}", get(task))
        .route("/openapi.json", get(openapi::serve))
        .fallback(|| async { Detail::new(StatusCode::NOT_FOUND, "Not Found") })
        .layer(middleware::from_fn_with_state(state.clone(), admit))
        .with_state(state)
}

/// A FastAPI-shaped error: `{"detail": "..."}`.
#[derive(Debug)]
pub struct Detail {
    status: StatusCode,
    detail: String,
}

impl Detail {
    fn new(status: StatusCode, detail: impl Into<String>) -> Detail {
        Detail {
            status,
            detail: detail.into(),
        }
    }

    fn invalid(detail: impl Into<String>) -> Detail {
        Detail::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }

    fn unavailable(detail: impl Into<String>) -> Detail {
        Detail::new(StatusCode::SERVICE_UNAVAILABLE, detail)
    }
}

impl IntoResponse for Detail {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({"detail": self.detail}))).into_response()
    }
}

impl From<WorkerError> for Detail {
    fn from(e: WorkerError) -> Detail {
        match e {
            WorkerError::Busy(_)
            | WorkerError::Conflict { .. }
            | WorkerError::TrainerStopping { .. } => {
                Detail::new(StatusCode::CONFLICT, e.to_string())
            }
            WorkerError::Invalid(field) => Detail::invalid(field.to_string()),
            WorkerError::Store(crate::store::StoreError::Unavailable(_)) => {
                Detail::unavailable("the storage refused the write; nothing was stored")
            }
            WorkerError::Stopped => Detail::unavailable("the daemon is shutting down"),
            other => {
                tracing::error!(error = %other, "trainer API request failed");
                Detail::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
            }
        }
    }
}

/// Loopback's two addresses and the configured ones; everyone else, other loopback
/// addresses included, gets 403.
async fn admit(State(state): State<TrainerState>, request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip());
    let allowed = peer.is_some_and(|ip| {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip == IpAddr::from([127, 0, 0, 1])
            || ip == IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
            || state.allow.contains(&ip)
    });
    if !allowed {
        return Detail::new(StatusCode::FORBIDDEN, "Access forbidden").into_response();
    }
    next.run(request).await
}

/// The answer to a start, new or repeated.
#[derive(Serialize, ToSchema)]
#[schema(as = StartAnswer)]
struct Started {
    /// The client compares it exactly.
    #[schema(value_type = String, pattern = "^Started Training!$")]
    message: &'static str,
    task_id: String,
}

#[utoipa::path(
    post,
    path = "/v1/trainer/start_training",
    operation_id = "startTraining",
    summary = "Start a task on the GPUs named",
    description = "Starts the (task_id, hotkey) pair at once, ahead of the main queue, on exactly the GPUs named, or refuses it and stores nothing. The answer is sent once the job is durable as Running. The same pair unfinished with the same body answers the same (a retried start); a finished pair starts a fresh run.",
    request_body(content = openapi::StartRequest),
    responses(
        (status = 200, description = "Started, or already running with this same body.", body = Started,
            example = json!({"message": STARTED, "task_id": "0a1b2c3d-task"})),
        (status = 403, response = AccessForbidden),
        (status = 409, description = "A GPU named is held by an unfinished job or not in the inventory, all slots are taken, or the pair is unfinished with another body.", body = Detail),
        (status = 422, response = Invalid),
        (status = 500, description = "A bug; the detail is in the daemon's log.", body = Detail),
        (status = 503, description = "Not ready, stopping, or the storage refused the write: nothing was stored.", body = Detail),
    ),
)]
async fn start_training(
    State(state): State<TrainerState>,
    body: Result<axum::Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Detail> {
    let axum::Json(body) = body.map_err(|e| Detail::invalid(format!("body: {}", e.body_text())))?;
    let (job, gpus) = job_of(&body, chrono::Utc::now())?;
    if state.app.shutdown.is_cancelled() {
        return Err(Detail::unavailable("the daemon is shutting down"));
    }
    let task_id = job
        .trainer_task
        .as_ref()
        .map(|t| t.task_id.clone())
        .unwrap_or_default();
    // The token goes to the worker alone, which keeps it in a file of mode 0600 while the
    // job is unfinished; it is in no job file, log or answer.
    let secret = body
        .get("github_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(String::from);
    match state.worker()?.start_now(job, gpus, secret).await? {
        StartedNow::Started(_) | StartedNow::AlreadyStarted(_) => Ok(axum::Json(Started {
            message: STARTED,
            task_id,
        })
        .into_response()),
    }
}

/// The job a start request asks for, and its GPUs; a 422 naming the field otherwise.
pub fn job_of(body: &Value, now: chrono::DateTime<chrono::Utc>) -> Result<(Job, Vec<u32>), Detail> {
    let Value::Object(request) = body else {
        return Err(Detail::invalid("body: must be a JSON object"));
    };
    let text = |key: &str| -> Result<String, Detail> {
        match request.get(key) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(Detail::invalid(format!("{key}: must not be empty"))),
            None | Some(Value::Null) => Err(Detail::invalid(format!("{key}: field required"))),
            Some(_) => Err(Detail::invalid(format!("{key}: must be a string"))),
        }
    };
    let optional = |key: &str| -> Result<Option<String>, Detail> {
        match request.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Detail::invalid(format!("{key}: must be a string or null"))),
        }
    };
    let Some(Value::Object(data)) = request.get("training_data") else {
        return Err(Detail::invalid("training_data: field required (an object)"));
    };
    let task_id = match data.get("task_id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => {
            return Err(Detail::invalid(
                "training_data.task_id: field required (a string)",
            ));
        }
    };
    let github_repo = text("github_repo")?;
    let hotkey = text("hotkey")?;
    let gpus: Vec<u32> = match request.get("gpu_ids") {
        Some(Value::Array(ids)) if !ids.is_empty() => ids
            .iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| Detail::invalid("gpu_ids: must be GPU ids (whole numbers)"))?,
        Some(Value::Array(_)) => return Err(Detail::invalid("gpu_ids: must name a GPU")),
        _ => {
            return Err(Detail::invalid(
                "gpu_ids: field required (an array of GPU ids)",
            ));
        }
    };
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = gpus.iter().find(|g| !seen.insert(**g)) {
        return Err(Detail::invalid(format!(
            "gpu_ids: GPU {twice} is named twice"
        )));
    }
    match data.get("hours_to_complete") {
        Some(Value::Number(n)) if n.as_f64().is_some_and(|h| h > 0.0) => {}
        _ => {
            return Err(Detail::invalid(
                "training_data.hours_to_complete: must be a number above 0",
            ));
        }
    }
    // The job of the main API it is: a DiffusionJob when it has a dataset_zip.
    let image = data.get("dataset_zip").is_some_and(|z| !z.is_null());
    let mut submission = serde_json::Map::new();
    submission.insert(
        "type".into(),
        Value::String(if image { "DiffusionJob" } else { "TextJob" }.into()),
    );
    submission.insert(
        "job_id".into(),
        Value::String(job_id_of(&task_id, &hotkey).to_string()),
    );
    let fields: &[&str] = if image {
        &[
            "model",
            "dataset_zip",
            "model_type",
            "expected_repo_name",
            "hours_to_complete",
        ]
    } else {
        &[
            "model",
            "dataset",
            "dataset_type",
            "file_format",
            "expected_repo_name",
            "hours_to_complete",
        ]
    };
    for key in fields {
        if let Some(value) = data.get(*key) {
            submission.insert((*key).to_string(), value.clone());
        }
    }
    let mut job = Job::from_submission(Value::Object(submission), now)
        .map_err(|e| Detail::invalid(format!("training_data.{}: {}", e.field, e.reason)))?;
    // Kept as sent, for the answers and an identical retry; the token never is.
    let mut kept = request.clone();
    kept.remove("github_token");
    job.trainer_task = Some(TrainerTask {
        task_id,
        hotkey,
        github_repo,
        github_branch: optional("github_branch")?,
        github_commit_hash: optional("github_commit_hash")?,
        request: Value::Object(kept),
    });
    Ok((job, gpus))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct TaskParams {
    /// The miner's hotkey: with the task id, it names the task. Required (422 without).
    #[param(required = true, value_type = String)]
    hotkey: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/trainer/{task_id}",
    operation_id = "getTask",
    summary = "A task",
    params(("task_id" = String, Path, description = "The task's id, as its start sent it."), TaskParams),
    responses(
        (status = 200, description = "The task.", body = TaskView),
        (status = 403, response = AccessForbidden),
        (status = 404, description = "No start of this pair was ever accepted.", body = Detail,
            example = json!({"detail": "Task with ID 'abc' and hotkey 'hk' not found."})),
        (status = 422, response = Invalid),
        (status = 500, description = "A bug; the detail is in the daemon's log.", body = Detail),
        (status = 503, description = "Not ready: the data dir is being replayed.", body = Detail),
    ),
)]
async fn task(
    State(state): State<TrainerState>,
    Path(task_id): Path<String>,
    Query(params): Query<TaskParams>,
) -> Result<axum::Json<TaskView>, Detail> {
    let Some(hotkey) = params.hotkey else {
        return Err(Detail::invalid("hotkey: field required"));
    };
    let worker = state.worker()?;
    let id = job_id_of(&task_id, &hotkey);
    let job = worker.job(id).await?.filter(|j| j.trainer_task.is_some());
    let Some(job) = job else {
        return Err(Detail::new(
            StatusCode::NOT_FOUND,
            format!("Task with ID '{task_id}' and hotkey '{hotkey}' not found."),
        ));
    };
    Ok(axum::Json(task_view(&state, worker, &job).await))
}

/// One entry per GPU of a type the client accepts, in id order; `available` while no
/// trainer of an unfinished job (either API, or one still stopping) holds it.
#[utoipa::path(
    get,
    path = "/v1/trainer/get_gpu_availability",
    operation_id = "getGpuAvailability",
    summary = "The GPUs and whether each is free",
    description = "One entry per GPU of a type the client accepts (H100, A100, A6000, or mapped to one by [god_trainer] gpu_types), in id order.",
    responses(
        (status = 200, description = "The GPUs.", body = Vec<Availability>),
        (status = 403, response = AccessForbidden),
        (status = 500, description = "A bug; the detail is in the daemon's log.", body = Detail),
        (status = 503, description = "Not ready: the data dir is being replayed.", body = Detail),
    ),
)]
async fn gpu_availability(
    State(state): State<TrainerState>,
) -> Result<axum::Json<Vec<Availability>>, Detail> {
    let gpus = state.worker()?.gpus().await?;
    let mut answer: Vec<Availability> = gpus
        .iter()
        .filter_map(|view| {
            let gpu = view.gpu.as_ref()?;
            crate::gpu::availability(gpu, &state.gpu_types, view.job.is_none() && !view.reserved)
        })
        .collect();
    answer.sort_by_key(|e| e.gpu_id);
    Ok(axum::Json(answer))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct RecentParams {
    /// How far back, in hours: the tasks accepted or finished since then. Required (422
    /// without).
    #[param(required = true, value_type = f64, minimum = 0, example = 24)]
    hours: Option<f64>,
}

#[utoipa::path(
    get,
    path = "/v1/trainer/get_recent_tasks",
    operation_id = "getRecentTasks",
    summary = "The recent tasks",
    params(RecentParams),
    responses(
        (status = 200, description = "The tasks accepted or finished in the last hours, newest first.", body = Vec<TaskView>),
        (status = 403, response = AccessForbidden),
        (status = 404, description = "No task in that time (as upstream).", body = Detail,
            example = json!({"detail": "No tasks found in the last 24 hours."})),
        (status = 422, response = Invalid),
        (status = 500, description = "A bug; the detail is in the daemon's log.", body = Detail),
        (status = 503, description = "Not ready: the data dir is being replayed.", body = Detail),
    ),
)]
async fn recent_tasks(
    State(state): State<TrainerState>,
    Query(params): Query<RecentParams>,
) -> Result<axum::Json<Vec<TaskView>>, Detail> {
    let Some(hours) = params.hours.filter(|h| h.is_finite() && *h >= 0.0) else {
        return Err(Detail::invalid("hours: field required (a number)"));
    };
    let worker = state.worker()?;
    let since = chrono::Utc::now() - chrono::Duration::milliseconds((hours * 3_600_000.0) as i64);
    // Newest first, as the list of all jobs comes.
    let jobs: Vec<Job> = worker
        .list(None, None)
        .await?
        .into_iter()
        .filter(|j| j.trainer_task.is_some())
        .filter(|j| {
            j.created_at.is_some_and(|t| t >= since) || j.finished_at.is_some_and(|t| t >= since)
        })
        .collect();
    if jobs.is_empty() {
        return Err(Detail::new(
            StatusCode::NOT_FOUND,
            format!("No tasks found in the last {hours} hours."),
        ));
    }
    let mut tasks = Vec::with_capacity(jobs.len());
    for job in &jobs {
        tasks.push(task_view(&state, worker, job).await);
    }
    Ok(axum::Json(tasks))
}

/// Where a task is: `training` until the last stage has ended; `success` only when every
/// stage ended well; `failure` otherwise, with the reason as the last line of its logs.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum TaskStatus {
    Training,
    Success,
    Failure,
}

fn task_status(status: Status) -> TaskStatus {
    match status {
        Status::Queued | Status::Running => TaskStatus::Training,
        Status::Completed => TaskStatus::Success,
        Status::Failed | Status::Cancelled => TaskStatus::Failure,
    }
}

/// A task as this API shows it, in the client's field order.
#[derive(Serialize, ToSchema)]
#[schema(as = Task)]
struct TaskView {
    /// As the start sent it.
    #[schema(value_type = Object)]
    training_data: Value,
    github_repo: String,
    /// As the start sent them.
    #[schema(value_type = Vec<u32>)]
    gpu_ids: Value,
    hotkey: String,
    #[schema(required = true)]
    github_branch: Option<String>,
    #[schema(required = true)]
    github_commit_hash: Option<String>,
    /// Never echoed: always null.
    #[schema(value_type = Option<String>, required = true)]
    github_token: Option<String>,
    /// As the start sent them; null when it sent none.
    #[schema(value_type = serde_json::Value, required = true)]
    requested_datasets: Value,
    status: TaskStatus,
    /// When the current run was accepted (RFC 3339 UTC).
    #[schema(format = DateTime, required = true)]
    started_at: Option<String>,
    /// When it ended (RFC 3339 UTC); null while it trains.
    #[schema(format = DateTime, required = true)]
    finished_at: Option<String>,
    /// The first https://wandb.ai/... address a stage printed.
    #[schema(required = true)]
    wandb_url: Option<String>,
    /// The daemon's own lines about this run, each `[<UTC time>] <line>`; the trainers'
    /// output stays in the job's log.
    logs: Vec<String>,
    #[schema(value_type = String, pattern = "^training$")]
    job_type: &'static str,
    /// The container of the docker stage that runs now, or ran last.
    #[schema(required = true)]
    container_name: Option<String>,
}

/// The task as this API shows it: the request as sent (without its token), the job's
/// status and times, and the daemon's own lines about this run.
async fn task_view(state: &TrainerState, worker: &WorkerHandle, job: &Job) -> TaskView {
    let task = job
        .trainer_task
        .as_ref()
        .expect("only jobs of this API are shown as tasks");
    let request = &task.request;
    let field = |key: &str| request.get(key).cloned().unwrap_or(Value::Null);
    let logs = match worker.log_path(job.id).await {
        Ok(Some((path, _))) => run_lines(&path, job).await,
        _ => Vec::new(),
    };
    TaskView {
        training_data: field("training_data"),
        github_repo: task.github_repo.clone(),
        gpu_ids: field("gpu_ids"),
        hotkey: task.hotkey.clone(),
        github_branch: task.github_branch.clone(),
        github_commit_hash: task.github_commit_hash.clone(),
        github_token: None,
        requested_datasets: field("requested_datasets"),
        status: task_status(job.status),
        started_at: job.created_at.map(|t| format_timestamp(&t)),
        finished_at: job.finished_at.map(|t| format_timestamp(&t)),
        wandb_url: job.wandb_url.clone(),
        logs,
        job_type: "training",
        container_name: container_name(&state.stages, job),
    }
}

/// The container of the docker stage that runs now, or ran last.
fn container_name(stages: &[Stage], job: &Job) -> Option<String> {
    let docker =
        |s: &&Stage| matches!(s.run, StageRun::Docker(_)) && s.runs_for(job.kind.type_name());
    let current = stages
        .iter()
        .filter(docker)
        .find(|s| !job.stages_done.contains(&s.name));
    let shown = match (job.status.is_finished(), current) {
        (false, Some(stage)) => Some(stage),
        _ => stages
            .iter()
            .filter(docker)
            .rfind(|s| job.stages_done.contains(&s.name))
            .or(current),
    };
    shown.map(|s| crate::executor::docker::container_name(job.id, &s.name))
}

/// The daemon's own lines about the current run: where it was accepted, each `==>` line
/// the executor wrote into the job's log since the run began, and how it failed.
async fn run_lines(path: &std::path::Path, job: &Job) -> Vec<String> {
    let stamp = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| format_timestamp(&t)).unwrap_or_default()
    };
    let gpus = job
        .gpu_ids
        .iter()
        .flatten()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut lines = vec![format!(
        "[{}] accepted on GPUs {gpus}",
        stamp(job.created_at)
    )];
    // The log's tail is enough: the run's lines are its last ones, and a log can be large.
    let text = read_tail(path, 256 * 1024).await;
    let run: Vec<&str> = text.lines().filter(|l| l.starts_with("==> ")).collect();
    // This run began at its latest first attempt's header.
    let begin = run
        .iter()
        .rposition(|l| l.starts_with("==> attempt 1 started"))
        .unwrap_or(0);
    // A line without a time of its own gets one from the lines before it: a stage's end
    // is its start plus the duration it gives; the others happened at the latest time known.
    let mut latest = job.created_at;
    let mut stage_started = None;
    for line in &run[begin..] {
        let line = &line[4..];
        let own = line
            .split_whitespace()
            .find_map(|w| {
                chrono::DateTime::parse_from_rfc3339(w.trim_end_matches([':', ',', ')'])).ok()
            })
            .map(|t| t.with_timezone(&chrono::Utc));
        let at = match (own, ended_after(line)) {
            (Some(t), _) => t,
            (None, Some(took)) => stage_started
                .map_or(latest, |s| Some(s + took))
                .unwrap_or_default(),
            (None, None) => latest.unwrap_or_default(),
        };
        if own.is_some() && line.contains(" started at ") {
            stage_started = Some(at);
        }
        latest = latest.max(Some(at));
        lines.push(format!("[{}] {line}", stamp(Some(at))));
    }
    if let (true, Some(error)) = (job.status.is_finished(), &job.error_message) {
        lines.push(format!("[{}] failed: {error}", stamp(job.finished_at)));
    }
    lines
}

/// How long a stage ran, from its end line (`stage train ended after 3m 12s: ...`).
fn ended_after(line: &str) -> Option<chrono::Duration> {
    let (_, rest) = line.split_once(" ended after ")?;
    let (took, _) = rest.split_once(": ")?;
    let took = humantime::parse_duration(took).ok()?;
    chrono::Duration::from_std(took).ok()
}

async fn read_tail(path: &std::path::Path, most: u64) -> String {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return String::new();
    };
    let len = file.metadata().await.map_or(0, |m| m.len());
    let start = len.saturating_sub(most);
    if file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.take(most).read_to_end(&mut bytes).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    // A tail cut inside a line starts at the next one.
    match (start > 0, text.find('\n')) {
        (true, Some(at)) => text[at + 1..].to_string(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/../shared/fixtures/god/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).expect("a fixture is JSON"),
            // The fixtures live beside the project, not in it.
            Err(_) => Value::Null,
        }
    }

    #[test]
    fn every_start_fixture_makes_a_job_with_its_pair_and_gpus() {
        for name in [
            "start-instruct.json",
            "start-instruct-2026.json",
            "start-dpo.json",
            "start-grpo.json",
            "start-chat.json",
            "start-image.json",
        ] {
            let body = fixture(name);
            if body.is_null() {
                eprintln!("skipped: the G.O.D fixtures are not beside the project");
                return;
            }
            let (job, gpus) =
                job_of(&body, chrono::Utc::now()).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            let task = job.trainer_task.as_ref().unwrap();
            assert_eq!(job.id, job_id_of(&task.task_id, &task.hotkey), "{name}");
            assert_eq!(Value::from(gpus.clone()), body["gpu_ids"], "{name}");
            assert!(task.request.get("github_token").is_none(), "{name}");
            assert_eq!(
                task.request["training_data"], body["training_data"],
                "{name}"
            );
            let image = body["training_data"].get("dataset_zip").is_some();
            assert_eq!(
                job.kind.type_name(),
                if image { "DiffusionJob" } else { "TextJob" }
            );
        }
    }

    #[tokio::test]
    async fn a_tasks_lines_are_its_runs_own_each_with_its_time() {
        let body = fixture("start-instruct.json");
        if body.is_null() {
            eprintln!("skipped: the G.O.D fixtures are not beside the project");
            return;
        }
        let at = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .with_timezone(&chrono::Utc)
        };
        let (mut job, _) = job_of(&body, at("2026-01-01T09:00:00Z")).unwrap();
        job.created_at = Some(at("2026-01-01T10:00:00Z"));
        job.start(at("2026-01-01T10:00:00Z"), Some(vec![0, 1]));
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("j.log");
        std::fs::write(
            &log,
            "==> attempt 1 started at 2026-01-01T08:00:00.000000Z\n\
             an earlier run's output\n\
             ==> retried at 2026-01-01T09:59:00.000000Z: a fresh run (the last run ended Failed)\n\
             ==> attempt 1 started at 2026-01-01T10:00:00.000000Z\n\
             ==> stage clone (1/3) started at 2026-01-01T10:00:01.000000Z\n\
             cloning\n\
             ==> stage clone ended after 1m 2s: exit status 0\n\
             ==> stage train (2/3) started at 2026-01-01T10:01:03.000000Z\n\
             ==> attempt 1 cut short: the daemon stopped while it ran; recovered at 2026-01-01T10:30:00.000000Z, to run again first\n\
             ==> attempt 2 started at 2026-01-01T10:30:01.000000Z\n\
             ==> stage clone (1/3): finished in an earlier attempt; skipped\n",
        )
        .unwrap();
        let lines = run_lines(&log, &job).await;
        assert_eq!(
            lines,
            [
                "[2026-01-01T10:00:00.000000Z] accepted on GPUs 0,1",
                "[2026-01-01T10:00:00.000000Z] attempt 1 started at 2026-01-01T10:00:00.000000Z",
                "[2026-01-01T10:00:01.000000Z] stage clone (1/3) started at 2026-01-01T10:00:01.000000Z",
                "[2026-01-01T10:01:03.000000Z] stage clone ended after 1m 2s: exit status 0",
                "[2026-01-01T10:01:03.000000Z] stage train (2/3) started at 2026-01-01T10:01:03.000000Z",
                "[2026-01-01T10:30:00.000000Z] attempt 1 cut short: the daemon stopped while it ran; recovered at 2026-01-01T10:30:00.000000Z, to run again first",
                "[2026-01-01T10:30:01.000000Z] attempt 2 started at 2026-01-01T10:30:01.000000Z",
                "[2026-01-01T10:30:01.000000Z] stage clone (1/3): finished in an earlier attempt; skipped",
            ]
        );
    }

    #[test]
    fn a_pair_always_names_the_same_job_and_only_that_pair_does() {
        assert_eq!(job_id_of("t", "h"), job_id_of("t", "h"));
        assert_ne!(job_id_of("t", "h"), job_id_of("t", "h2"));
        assert_ne!(job_id_of("t\nh", ""), job_id_of("t", "h\n"));
    }

    #[test]
    fn bad_bodies_name_the_field() {
        let now = chrono::Utc::now();
        let good = fixture("start-instruct.json");
        if good.is_null() {
            eprintln!("skipped: the G.O.D fixtures are not beside the project");
            return;
        }
        let mut cases: Vec<(Value, &str)> = Vec::new();
        let mut no_hotkey = good.clone();
        no_hotkey.as_object_mut().unwrap().remove("hotkey");
        cases.push((no_hotkey, "hotkey"));
        let mut gpus = good.clone();
        gpus["gpu_ids"] = json!([0, 0]);
        cases.push((gpus, "gpu_ids"));
        let mut hours = good.clone();
        hours["training_data"]["hours_to_complete"] = json!(0);
        cases.push((hours, "training_data.hours_to_complete"));
        let mut model = good.clone();
        model["training_data"]["model"] = json!(null);
        cases.push((model, "training_data.model"));
        for (body, field) in cases {
            let err = job_of(&body, now).unwrap_err();
            assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
            assert!(err.detail.starts_with(field), "{field}: {}", err.detail);
        }
    }
}
