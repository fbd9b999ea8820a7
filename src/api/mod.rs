//! The HTTP API (CONTRACT.md 4): a router over a [`WorkerHandle`], nothing else.
//!
//! Handlers parse and check what they are sent, ask the worker, and turn the answer into
//! JSON. They never touch the store or the executor; the one file they read is a trainer log,
//! at the path the worker names.

mod error;
pub mod god;
pub mod serve;
pub mod ui;

use std::sync::{Arc, OnceLock};

use axum::body::{Body, Bytes};
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

pub use error::ApiError;

use crate::job::{Job, JobId, Status, format_timestamp};
use crate::worker::{Estimate, Offer, Submitted, WorkerHandle};

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
/// tests/openapi.rs holds it against [`OPENAPI_JSON`], so no route goes undocumented.
pub const ROUTES: &[Route] = &[
    Route::new("POST", "/v1/jobs", || post(submit)),
    Route::new("GET", "/v1/jobs", || get(list)),
    Route::new("GET", "/v1/jobs/{id}", || get(job)),
    Route::new("POST", "/v1/jobs/{id}/cancel", || post(cancel)),
    Route::new("POST", "/v1/jobs/{id}/retry", || post(retry)),
    Route::new("GET", "/v1/jobs/{id}/logs", || get(logs)),
    Route::new("GET", "/v1/queue", || get(queue)),
    Route::new("GET", "/v1/gpus", || get(gpus)),
    Route::new("POST", "/v1/offers", || post(offer)),
    Route::new("GET", "/healthz", || get(healthz)),
    Route::new("GET", "/readyz", || get(readyz)),
    Route::new("GET", "/metrics", || get(metrics)),
    Route::new("GET", "/openapi.json", || get(openapi)),
];

/// The OpenAPI 3.1 description of the API, written by hand in `src/api/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    status: Option<String>,
    limit: Option<usize>,
    /// Adds `estimated_start` and `estimated_finish` to the queued and running jobs.
    estimates: Option<bool>,
}

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

/// The configured GPUs, what nvidia-smi says they are, and the job holding each.
async fn gpus(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let views = state.worker()?.gpus().await?;
    Ok(Json(
        views
            .into_iter()
            .map(|view| {
                json!({
                    "id": view.id,
                    "name": view.gpu.as_ref().map(|g| g.name.clone()),
                    // 0 is nvidia-smi's `[N/A]`: unknown, like a GPU it did not report.
                    "memory_mib": view.gpu.as_ref().map(|g| g.memory_mib).filter(|m| *m > 0),
                    "job": view.job.map(|id| id.to_string()),
                    "reserved": view.reserved,
                })
            })
            .collect(),
    ))
}

async fn queue(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let view = state.worker()?.queue().await?;
    let ids = |ids: Vec<JobId>| ids.into_iter().map(|id| id.to_string()).collect::<Vec<_>>();
    let waiting: serde_json::Map<String, Value> = view
        .waiting
        .into_iter()
        .map(|(id, reason)| (id.to_string(), Value::String(reason)))
        .collect();
    Ok(Json(json!({
        "running": ids(view.running),
        "queued": ids(view.queued),
        "paused": view.paused,
        "waiting": waiting,
    })))
}

async fn cancel(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_id(path)?;
    let job = state.worker_for_change()?.cancel(id).await?;
    Ok(Json(job))
}

/// A finished job starts a fresh run: Queued again at the end of the queue.
async fn retry(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_id(path)?;
    let job = state.worker_for_change()?.retry(id).await?;
    Ok(Json(job))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogParams {
    /// Only the last N lines.
    tail: Option<usize>,
    /// Only the bytes from this offset on (what a follower has not seen yet).
    offset: Option<u64>,
}

/// The header with the log's size in bytes when it was read: the offset to ask from next.
pub const LOG_SIZE_HEADER: &str = "x-log-size";
/// The header with the job's status when its log was read: a follower stops once it is final.
pub const JOB_STATUS_HEADER: &str = "x-job-status";

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

/// A job's log across its rotations (see `executor::supervisor::LogWriter`): offsets count
/// the job's whole output, so a follower's next offset stays right when the log rotates
/// under it. A follower behind the current file gets the rest of the rotated part first;
/// what was rotated away twice is gone, and it goes on from what is left.
async fn read_rotated_log(
    path: &std::path::Path,
    params: &LogParams,
) -> Result<(Body, u64), ApiError> {
    let cannot = |e: std::io::Error, path: &std::path::Path| {
        ApiError::Internal(format!("cannot read {}: {e}", path.display()))
    };
    let offsets = crate::executor::supervisor::LogOffsets::new(path);
    let base = offsets.base();
    if let Some(offset) = params.offset.filter(|o| *o < base) {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let rotated = offsets.rotated();
        match tokio::fs::File::open(&rotated).await {
            Ok(mut old) => {
                let len = old.metadata().await.map_err(|e| cannot(e, &rotated))?.len();
                let start = offset.saturating_sub(base.saturating_sub(len)).min(len);
                old.seek(std::io::SeekFrom::Start(start))
                    .await
                    .map_err(|e| cannot(e, &rotated))?;
                // The rest of the rotated part, then the current log as far as it is now.
                let (current, size) = match tokio::fs::File::open(path).await {
                    Ok(file) => {
                        let size = file.metadata().await.map_err(|e| cannot(e, path))?.len();
                        (Some(file), size)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, 0),
                    Err(e) => return Err(cannot(e, path)),
                };
                let old = old.take(len - start);
                let body = match current {
                    Some(file) => Body::from_stream(tokio_util::io::ReaderStream::new(
                        old.chain(file.take(size)),
                    )),
                    None => Body::from_stream(tokio_util::io::ReaderStream::new(old)),
                };
                return Ok((body, base + size));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(cannot(e, &rotated)),
        }
    }
    let file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        // A job that has not started yet has no output yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Body::empty(), base)),
        Err(e) => {
            return Err(ApiError::Internal(format!(
                "cannot open {}: {e}",
                path.display()
            )));
        }
    };
    let within = LogParams {
        tail: params.tail,
        offset: params.offset.map(|o| o.saturating_sub(base)),
    };
    let (body, size) = read_log(file, &within).await.map_err(|e| cannot(e, path))?;
    Ok((body, base + size))
}

/// The part of a log the parameters ask for, streamed (a trainer's log can be far larger
/// than memory should hold), and the log's size when it was read. Only the bytes up to that
/// size are sent, so a follower that asks again from it sees every byte once.
async fn read_log(mut file: tokio::fs::File, params: &LogParams) -> std::io::Result<(Body, u64)> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let size = file.metadata().await?.len();
    let start = match (params.offset, params.tail) {
        (Some(offset), _) => offset.min(size),
        (None, Some(lines)) => tail_start(&mut file, size, lines).await?,
        (None, None) => 0,
    };
    file.seek(std::io::SeekFrom::Start(start)).await?;
    let stream = tokio_util::io::ReaderStream::new(file.take(size - start));
    Ok((Body::from_stream(stream), size))
}

/// Where the last `lines` lines of the first `size` bytes begin, read backwards in blocks.
async fn tail_start(file: &mut tokio::fs::File, size: u64, lines: usize) -> std::io::Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    const BLOCK: u64 = 64 * 1024;
    if lines == 0 {
        return Ok(size);
    }
    let mut end = size;
    // A final newline ends the last line; it does not start an empty one.
    let mut newlines_to_skip = lines + 1;
    let mut first_block = true;
    let mut buf = vec![0u8; BLOCK as usize];
    while end > 0 {
        let begin = end.saturating_sub(BLOCK);
        let len = (end - begin) as usize;
        file.seek(std::io::SeekFrom::Start(begin)).await?;
        file.read_exact(&mut buf[..len]).await?;
        let block = &buf[..len];
        let mut scan = block.len();
        if first_block {
            first_block = false;
            if block.last() != Some(&b'\n') {
                newlines_to_skip -= 1;
            }
        }
        while let Some(i) = block[..scan].iter().rposition(|&b| b == b'\n') {
            newlines_to_skip -= 1;
            if newlines_to_skip == 0 {
                return Ok(begin + i as u64 + 1);
            }
            scan = i;
        }
        end = begin;
    }
    Ok(0)
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::METRICS.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "stopping"})),
        )
            .into_response();
    }
    match state.worker.get() {
        Some(_) => Json(json!({"status": "ready"})).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "replaying"})),
        )
            .into_response(),
    }
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
    use http_body_util::BodyExt;
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

    async fn read(text: &str, tail: Option<usize>, offset: Option<u64>) -> (String, u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        std::fs::write(&path, text).unwrap();
        let file = tokio::fs::File::open(&path).await.unwrap();
        let (body, size) = read_log(file, &LogParams { tail, offset }).await.unwrap();
        let bytes = body.collect().await.unwrap().to_bytes();
        (String::from_utf8(bytes.to_vec()).unwrap(), size)
    }

    #[tokio::test]
    async fn tail_gives_the_last_lines() {
        assert_eq!(read("a\nb\nc\n", Some(2), None).await, ("b\nc\n".into(), 6));
        assert_eq!(read("a\nb\nc", Some(2), None).await, ("b\nc".into(), 5));
        assert_eq!(read("a\nb\nc\n", Some(9), None).await.0, "a\nb\nc\n");
        assert_eq!(read("a\nb\nc\n", Some(0), None).await.0, "");
        assert_eq!(read("", Some(3), None).await, ("".into(), 0));
        // Across the 64 KiB blocks it reads backwards in.
        let long: String = (0..20_000).map(|n| format!("line {n}\n")).collect();
        let (tail, _) = read(&long, Some(3), None).await;
        assert_eq!(tail, "line 19997\nline 19998\nline 19999\n");
    }

    #[tokio::test]
    async fn offset_gives_what_came_after_it() {
        assert_eq!(read("abcdef", None, Some(4)).await, ("ef".into(), 6));
        assert_eq!(read("abcdef", None, Some(6)).await, ("".into(), 6));
        assert_eq!(read("abcdef", None, Some(99)).await, ("".into(), 6));
        assert_eq!(read("abcdef", None, None).await, ("abcdef".into(), 6));
    }
}
