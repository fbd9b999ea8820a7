//! The HTTP API (CONTRACT.md 4): a router over a [`WorkerHandle`], nothing else.
//!
//! Handlers parse and check what they are sent, ask the worker, and turn the answer into
//! JSON. They never touch the store or the executor; the one file they read is a trainer log,
//! at the path the worker names.

mod error;
pub mod god;
mod logs;
mod openapi;
mod probes;
mod schemas;
pub mod serve;
pub mod ui;
mod views;

use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, OriginalUri, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::trace::TraceLayer;
use tracing::{Span, debug, error};
use utoipa::IntoParams;

pub use error::ApiError;

use crate::job::{Job, JobId, Status, format_timestamp};
use crate::worker::{Estimate, Offer, OfferAnswer, Submitted, WorkerHandle};
use logs::{LogParams, read_rotated_log};
use openapi::{BadRequest, Internal, JobNotFound, Unauthorized, Unavailable, examples};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Set once replay is done and the worker runs; until then `/v1/` answers 503.
    worker: Arc<OnceLock<WorkerHandle>>,
    /// Required as `Authorization: Bearer <token>` on `/v1/` when set.
    api_token: Option<Arc<str>>,
    max_body_bytes: usize,
    /// Cancelled when the daemon begins to stop; `/readyz` then answers 503, and so do
    /// submissions, cancels, retries and offers.
    shutdown: CancellationToken,
    /// Bounds how many bodies are parsed at once. A 1 MiB body of tiny JSON values takes
    /// some 30 MiB as a parsed tree, so without a bound, many such requests at once could
    /// take the daemon's memory; a valid job parses in microseconds, so the wait is short.
    parse_slots: Arc<Semaphore>,
    /// Shown by the dashboard; `None` where the app is assembled without one.
    data_dir: Option<Arc<std::path::Path>>,
    /// What the boot recovered, when, and how many files it quarantined: the dashboard's
    /// "recoveries". Set once by the daemon.
    boot: Arc<OnceLock<(crate::worker::BootReport, usize, crate::job::Timestamp)>>,
}

/// Bodies parsed at once; see [`AppState::parse_slots`].
const PARSE_SLOTS: usize = 4;

impl AppState {
    pub fn new(
        api_token: Option<String>,
        max_body_bytes: usize,
        shutdown: CancellationToken,
    ) -> AppState {
        AppState {
            worker: Arc::new(OnceLock::new()),
            api_token: api_token.map(Arc::from),
            max_body_bytes,
            shutdown,
            parse_slots: Arc::new(Semaphore::new(PARSE_SLOTS)),
            data_dir: None,
            boot: Arc::new(OnceLock::new()),
        }
    }

    /// What the boot recovered (and how many files it quarantined), for the dashboard.
    pub fn set_boot_report(&self, report: crate::worker::BootReport, quarantined: usize) {
        // Set once by the daemon; a second call would be a bug with no effect.
        let _ = self.boot.set((report, quarantined, chrono::Utc::now()));
    }

    /// The data dir the dashboard shows.
    pub fn with_data_dir(mut self, data_dir: &std::path::Path) -> AppState {
        self.data_dir = Some(Arc::from(data_dir));
        self
    }

    /// Opens `/v1/` once the worker runs.
    pub fn set_worker(&self, worker: WorkerHandle) {
        // Set once by the daemon; a second call would be a bug with no effect.
        let _ = self.worker.set(worker);
    }

    fn worker(&self) -> Result<&WorkerHandle, ApiError> {
        self.worker.get().ok_or(ApiError::Unavailable(
            "not ready: the data dir is being replayed",
        ))
    }

    /// The worker, for a request that would change something (a submission, a cancel, a
    /// retry, an offer). Refused once the daemon is stopping: the listener stays open while the
    /// worker writes the interrupted jobs back, and what is taken now would only be
    /// stopped again, or queued behind a stop the client does not know about. Reads go on.
    fn worker_for_change(&self) -> Result<&WorkerHandle, ApiError> {
        if self.shutdown.is_cancelled() {
            return Err(ApiError::Unavailable("the daemon is shutting down"));
        }
        self.worker()
    }
}

/// One route of the API.
pub struct Route {
    pub method: &'static str,
    /// In axum's syntax, which is also OpenAPI's: `/v1/jobs/{id}`.
    pub path: &'static str,
    handler: fn() -> MethodRouter<AppState>,
}

impl Route {
    const fn new(
        method: &'static str,
        path: &'static str,
        handler: fn() -> MethodRouter<AppState>,
    ) -> Route {
        Route {
            method,
            path,
            handler,
        }
    }
}

/// Every route the API serves; the router is built from this list alone. Paths under `/v1/`
/// need the API token, the others (probes, metrics, the API's description) never do.
/// tests/openapi.rs holds it against the description ([`openapi_json`]), so no route goes
/// undocumented.
pub const ROUTES: &[Route] = &[
    Route::new("POST", "/v1/jobs", || post(submit)),
    Route::new("GET", "/v1/jobs", || get(list)),
    Route::new("GET", "/v1/jobs/{id}", || get(job)),
    Route::new("POST", "/v1/jobs/{id}/cancel", || post(cancel)),
    Route::new("POST", "/v1/jobs/{id}/retry", || post(retry)),
    Route::new("GET", "/v1/jobs/{id}/logs", || get(logs)),
    Route::new("GET", "/v1/queue", || get(views::queue)),
    Route::new("GET", "/v1/gpus", || get(views::gpus)),
    Route::new("GET", "/v1/nodes", || get(views::nodes)),
    Route::new("POST", "/v1/offers", || post(offer)),
    Route::new("GET", "/healthz", || get(probes::healthz)),
    Route::new("GET", "/readyz", || get(probes::readyz)),
    Route::new("GET", "/metrics", || get(probes::metrics)),
    Route::new("GET", "/openapi.json", || get(probes::openapi)),
];

/// The OpenAPI 3.1 description of the API, derived from the handlers (see `openapi.rs`).
pub fn openapi_json() -> &'static str {
    openapi::document()
}

/// The whole API. `state` decides readiness and authentication.
pub fn router(state: AppState) -> Router {
    let (mut v1, mut open) = (Router::new(), Router::new());
    for route in ROUTES {
        // Two methods on one path are merged into one method router by axum.
        if route.path.starts_with("/v1/") {
            v1 = v1.route(route.path, (route.handler)());
        } else {
            open = open.route(route.path, (route.handler)());
        }
    }
    let v1 = v1.route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(v1)
        .merge(open)
        .merge(ui::router(state.clone()))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(CatchPanicLayer::custom(|_panic| {
            ApiError::Internal("a handler panicked".into()).into_response()
        }))
        .layer(TraceLayer::new_for_http().on_failure(log_failure))
        .with_state(state)
}

/// The trace layer's word on a failed response. It counts every 5xx as a failure, and by
/// default logs each at ERROR, which means "an operator must act". A 503 is the API saying
/// by design that it cannot take the request now (booting, stopping, storage refusing
/// writes): where that needs an operator, the code that decided it has already logged why,
/// once (a refused write at WARN, a fatal storage error at ERROR). Everything else, a 500
/// above all, is a bug or an unexpected failure and stays at ERROR.
fn log_failure(class: ServerErrorsFailureClass, latency: std::time::Duration, _span: &Span) {
    let latency_ms = latency.as_millis() as u64;
    match class {
        ServerErrorsFailureClass::StatusCode(StatusCode::SERVICE_UNAVAILABLE) => {
            debug!(classification = %class, latency_ms, "response refused (503)");
        }
        _ => error!(classification = %class, latency_ms, "response failed"),
    }
}

async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(expected) = &state.api_token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}

/// The token of an `Authorization: Bearer <token>` value. The scheme's name is
/// case-insensitive (RFC 7235 2.1), so `bearer` and `BEARER` are the same scheme.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

/// Compares without an early exit, so the time taken does not reveal the matching prefix.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses a body that is not JSON. Requiring JSON also keeps browsers from posting
/// cross-site with a plain form.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        })
        .unwrap_or(false);
    if is_json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// The body as JSON, parsed under a parse slot (see [`AppState::parse_slots`]).
async fn json_body(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(state.max_body_bytes)
        } else {
            ApiError::BadRequest(format!("body: {}", rejection.body_text()))
        }
    })?;
    let _slot = state
        .parse_slots
        .acquire()
        .await
        .map_err(|_| ApiError::Unavailable("the daemon is shutting down"))?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("body: invalid JSON: {e}")))
}

#[utoipa::path(
    post,
    path = "/v1/jobs",
    operation_id = "submitJob",
    tag = "jobs",
    summary = "Submit a job",
    description = "Validates the job and stores it. The answer is sent only once the job is durable: a crash at any later instant replays it in its place in the queue.",
    request_body(
        content = Job,
        description = "A job. Server-owned fields (error_message, attempts, the timestamps) are ignored; status may be omitted or \"Queued\".",
        examples(
            ("instruct" = (summary = "TextJob, instruct dataset (the seed's job)", value = json!(examples::instruct()))),
            ("dpo" = (summary = "TextJob, DPO dataset", value = json!(examples::dpo()))),
            ("grpo" = (summary = "TextJob, GRPO dataset", value = json!(examples::grpo()))),
            ("chat" = (summary = "TextJob, chat-template dataset", value = json!(examples::chat()))),
            ("diffusion" = (summary = "DiffusionJob", value = json!(examples::diffusion()))),
        ),
    ),
    responses(
        (status = 201, description = "Stored, with status Queued.", body = Job,
            headers(("Location" = String, description = "/v1/jobs/{id} of the new job."))),
        (status = 200, description = "A job with this job_id and the same content exists already (a retried submit): the stored job.", body = Job,
            headers(("Location" = String, description = "/v1/jobs/{id} of the job."))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 409, description = "A job with this job_id exists with different content.", body = ApiError,
            example = json!({"error": "job 123e4567-e89b-12d3-a456-426614174000 exists with different content"})),
        (status = 413, description = "The body is larger than max_body_bytes (default 1 MiB).", body = ApiError,
            example = json!({"error": "body: larger than the limit of 1048576 bytes"})),
        (status = 415, description = "The body is not declared as JSON.", body = ApiError,
            example = json!({"error": "content-type: must be application/json"})),
        (status = 500, response = Internal),
        (status = 503, description = "Nothing was stored (not ready, stopping, or storage unavailable); or storage failed mid-write and the outcome is unknown, in which case job_id says which job to look up once the daemon is back.", body = ApiError),
    ),
)]
async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let job = Job::from_submission(json_body(&state, body).await?, chrono::Utc::now())?;
    let worker = state.worker_for_change()?;
    let id = job.id;
    let submitted = worker
        .submit(job)
        .await
        .map_err(|e| match ApiError::from(e) {
            // The client needs the id to find out, also when the server chose it.
            ApiError::OutcomeUnknown(None) => ApiError::OutcomeUnknown(Some(id)),
            other => other,
        })?;
    let (status, job) = match submitted {
        Submitted::Created(job) => (StatusCode::CREATED, job),
        Submitted::Existing(job) => (StatusCode::OK, job),
    };
    let location = format!("/v1/jobs/{}", job.id);
    Ok((status, [(header::LOCATION, location)], Json(job)).into_response())
}

/// Whether this box would take a job, and when it would start and end.
#[utoipa::path(
    post,
    path = "/v1/offers",
    operation_id = "answerOffer",
    tag = "offers",
    summary = "Offer a job",
    description = "Answers whether this worker would take the job and when it would start and end, from the queued and running jobs' budgets, elapsed times and GPU slots; nothing is stored. An accepted offer may reserve the job's place for [offers] reserve_for.",
    request_body(
        content = Offer,
        examples(("text" = (summary = "A text job on one GPU with a 3-hour budget", value = json!(examples::offer())))),
    ),
    responses(
        (status = 200, description = "The answer, accepted or not.", body = OfferAnswer,
            example = json!(examples::offer_answer())),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 413, description = "The body is larger than max_body_bytes (default 1 MiB).", body = ApiError,
            example = json!({"error": "body: larger than the limit of 1048576 bytes"})),
        (status = 415, description = "The body is not declared as JSON.", body = ApiError,
            example = json!({"error": "content-type: must be application/json"})),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn offer(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    require_json(&headers)?;
    let offer = Offer::from_json(json_body(&state, body).await?)?;
    let answer = state.worker_for_change()?.offer(offer).await?;
    Ok(Json(answer.to_json()))
}

/// A job with its estimates, as `GET /v1/jobs?estimates=true` lists it: the stored job,
/// and for a queued or running one when it is expected to start and end (computed at each
/// request, never stored).
fn with_estimate(job: &Job, estimate: Option<&Estimate>) -> Value {
    let mut value = job.to_json();
    let time = |t: Option<crate::job::Timestamp>| t.as_ref().map(format_timestamp);
    let estimate = estimate.copied().unwrap_or_default();
    match job.status {
        Status::Queued => {
            value["estimated_start"] = json!(time(estimate.start));
            value["estimated_finish"] = json!(time(estimate.finish));
        }
        Status::Running => value["estimated_finish"] = json!(time(estimate.finish)),
        _ => {}
    }
    value
}

fn parse_id(path: Result<Path<String>, PathRejection>) -> Result<JobId, ApiError> {
    let Path(text) = path.map_err(|e| ApiError::BadRequest(format!("id: {}", e.body_text())))?;
    text.parse()
        .map_err(|e| ApiError::BadRequest(format!("id: {e}")))
}

/// The header with a queued job's estimated start (RFC 3339), or `none`.
pub const ESTIMATED_START_HEADER: &str = "x-estimated-start";
/// The header with a queued or running job's estimated end (RFC 3339), or `none`.
pub const ESTIMATED_FINISH_HEADER: &str = "x-estimated-finish";

/// The job as stored; its estimates go in headers, so that the body stays the job itself,
/// equal to what its submission answered and to its file.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    operation_id = "getJob",
    tag = "jobs",
    summary = "Get a job",
    params(("id" = JobId, Path, description = "The job's id.", example = "123e4567-e89b-12d3-a456-426614174000")),
    responses(
        (status = 200, description = "The job as stored; when it is expected to start and end comes in headers, so that the body stays the job itself.", body = Job,
            headers(
                ("x-estimated-start" = String, description = "For a queued job: when it is expected to start (RFC 3339 UTC), from the budgets and elapsed times of the jobs ahead and the GPU slots; `none` when it is not queued or not expected to start (the queue is paused, or its deadline passes before its turn)."),
                ("x-estimated-finish" = String, description = "For a queued or running job: when it is expected to end at the latest (RFC 3339 UTC): its deadline, or for a job without a budget its start plus [worker] assumed_duration; `none` otherwise."),
            )),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = JobNotFound),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn job(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(path)?;
    let worker = state.worker()?;
    let Some(job) = worker.job(id).await? else {
        return Err(ApiError::JobNotFound(id));
    };
    let estimate = if job.status.is_finished() {
        None
    } else {
        worker.estimates(Some(id)).await?.remove(&id)
    };
    let estimate = estimate.unwrap_or_default();
    let text =
        |t: Option<crate::job::Timestamp>| t.as_ref().map_or("none".into(), format_timestamp);
    let start = match job.status {
        Status::Queued => estimate.start,
        _ => None,
    };
    Ok((
        [
            (
                header::HeaderName::from_static(ESTIMATED_START_HEADER),
                text(start),
            ),
            (
                header::HeaderName::from_static(ESTIMATED_FINISH_HEADER),
                text(estimate.finish),
            ),
        ],
        Json(job),
    )
        .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// Only jobs with this status (case-insensitive). Queued jobs come in queue order,
    /// others newest first.
    #[param(value_type = Option<Status>, example = "Queued")]
    status: Option<String>,
    /// At most this many jobs.
    #[param(example = 10)]
    limit: Option<usize>,
    /// true: queued and running jobs carry estimated_start and estimated_finish.
    #[param(default = false, example = true)]
    estimates: Option<bool>,
}

#[utoipa::path(
    get,
    path = "/v1/jobs",
    operation_id = "listJobs",
    tag = "jobs",
    summary = "List jobs",
    params(ListParams),
    responses(
        (status = 200, description = "Jobs: queued ones in queue order, others newest first.", body = Vec<Job>),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn list(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    let status = match params.status.as_deref() {
        None => None,
        Some(text) => Some(Status::parse_loose(text).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "status: unknown status {text:?}; one of Queued, Running, Completed, Failed, Cancelled"
            ))
        })?),
    };
    let worker = state.worker()?;
    let jobs = worker.list(status, params.limit).await?;
    if params.estimates != Some(true) {
        return Ok(Json(jobs.iter().map(Job::to_json).collect()));
    }
    let estimates = if jobs.iter().any(|j| !j.status.is_finished()) {
        worker.estimates(None).await?
    } else {
        Default::default()
    };
    Ok(Json(
        jobs.iter()
            .map(|job| with_estimate(job, estimates.get(&job.id)))
            .collect(),
    ))
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    operation_id = "cancelJob",
    tag = "jobs",
    summary = "Cancel a job",
    description = "Cancelled is durable before the answer; a running trainer is then stopped (SIGTERM, then SIGKILL after kill_grace). A cancelled job never runs again, crash or not. No body.",
    params(("id" = JobId, Path, description = "The job's id.", example = "123e4567-e89b-12d3-a456-426614174000")),
    responses(
        (status = 200, description = "The job, now Cancelled.", body = Job),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = JobNotFound),
        (status = 409, description = "The job has already finished.", body = ApiError,
            example = json!({"error": "job 123e4567-e89b-12d3-a456-426614174000 has already finished (Completed)"})),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn cancel(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_id(path)?;
    let job = state.worker_for_change()?.cancel(id).await?;
    Ok(Json(job))
}

/// A finished job starts a fresh run: Queued again at the end of the queue.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/retry",
    operation_id = "retryJob",
    tag = "jobs",
    summary = "Start a finished job over",
    description = "A Completed, Failed or Cancelled job starts a fresh run: Queued again at the end of the queue like a new arrival (a new created_at; with hours_to_complete, a new deadline from now), attempts 0, error_message, started_at, finished_at, stages_done, stages_started, wandb_url and gpu_ids cleared. Durable before the answer, so a crash at any later instant replays it at that place. Its log is kept: a line says it was retried, and the fresh run's output follows the earlier attempts. No body.",
    params(("id" = JobId, Path, description = "The job's id.", example = "123e4567-e89b-12d3-a456-426614174000")),
    responses(
        (status = 200, description = "The job as stored, Queued again.", body = Job),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = JobNotFound),
        (status = 409, description = "The job is not finished (Queued or Running), or it was cancelled and its trainer is still stopping.", body = ApiError,
            example = json!({"error": "job 123e4567-e89b-12d3-a456-426614174000 is not finished (Running)"})),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn retry(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_id(path)?;
    let job = state.worker_for_change()?.retry(id).await?;
    Ok(Json(job))
}

/// The header with the log's size in bytes when it was read: the offset to ask from next.
pub const LOG_SIZE_HEADER: &str = "x-log-size";
/// The header with the job's status when its log was read: a follower stops once it is final.
pub const JOB_STATUS_HEADER: &str = "x-job-status";

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/logs",
    operation_id = "getJobLogs",
    tag = "jobs",
    summary = "Read a job's trainer output",
    params(("id" = JobId, Path, description = "The job's id.", example = "123e4567-e89b-12d3-a456-426614174000"), LogParams),
    responses(
        (status = 200, description = "The trainer's stdout and stderr so far (empty before its first start).",
            content_type = "text/plain", body = String,
            headers(
                ("x-log-size" = u64, description = "The log's size in bytes when it was read: the offset to ask from next."),
                ("x-job-status" = Status, description = "The job's status when its log was read: a follower stops once it is final."),
            )),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = JobNotFound),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn logs(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<LogParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(path)?;
    let Query(params) =
        params.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    if params.tail.is_some() && params.offset.is_some() {
        return Err(ApiError::BadRequest(
            "query: tail and offset cannot be combined".into(),
        ));
    }
    let Some((path, status)) = state.worker()?.log_path(id).await? else {
        return Err(ApiError::JobNotFound(id));
    };
    let (body, size) = read_rotated_log(&path, &params).await?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                header::HeaderName::from_static(LOG_SIZE_HEADER),
                size.to_string(),
            ),
            (
                header::HeaderName::from_static(JOB_STATUS_HEADER),
                status.as_str().to_string(),
            ),
        ],
        body,
    )
        .into_response())
}

async fn no_route(OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::NoRoute(uri.path().to_string())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use std::sync::Mutex;
    use tower::ServiceExt;

    /// A log sink: what the subscriber of [`capture_logs`] writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    /// Logs everything down to DEBUG into the returned sink, on this thread, while the
    /// guard lives (a `#[tokio::test]` runs on one thread).
    fn capture_logs() -> (tracing::subscriber::DefaultGuard, Captured) {
        let sink = Captured::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (tracing::subscriber::set_default(subscriber), sink)
    }

    async fn status_of(router: &Router, uri: &str) -> StatusCode {
        let request = Request::builder().uri(uri).body(Body::empty()).unwrap();
        router.clone().oneshot(request).await.unwrap().status()
    }

    #[tokio::test]
    async fn the_trace_layer_logs_designed_503s_below_error() {
        let (_guard, logs) = capture_logs();
        let shutdown = CancellationToken::new();
        let router = router(AppState::new(None, 1024, shutdown.clone()));
        // Not ready yet: /readyz and /v1/ say 503 by design.
        assert_eq!(
            status_of(&router, "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status_of(&router, "/v1/queue").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Stopping: the same.
        shutdown.cancel();
        assert_eq!(
            status_of(&router, "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let text = logs.text();
        assert_eq!(text.matches("response refused (503)").count(), 3, "{text}");
        assert!(
            !text.contains("ERROR"),
            "a designed 503 logged as an error:\n{text}"
        );
    }

    #[tokio::test]
    async fn the_trace_layer_logs_other_5xx_at_error() {
        let (_guard, logs) = capture_logs();
        // A fallback, not a route: every route of the API is in ROUTES (tests/openapi.rs).
        for status in [StatusCode::INTERNAL_SERVER_ERROR, StatusCode::BAD_GATEWAY] {
            let router = Router::new()
                .fallback(move || async move { status })
                .layer(TraceLayer::new_for_http().on_failure(log_failure));
            assert_eq!(status_of(&router, "/anything").await, status);
        }
        let text = logs.text();
        let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 2, "{text}");
        assert!(
            errors.iter().all(|l| l.contains("response failed")),
            "{text}"
        );
    }
}
