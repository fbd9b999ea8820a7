//! One error type for every handler: 4xx say what is wrong, 5xx stay opaque and are logged
//! once, and all of them are `{"error": "..."}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::{error, warn};

use crate::job::{FieldError, JobId};
use crate::store::StoreError;
use crate::worker::WorkerError;

#[derive(Debug)]
pub enum ApiError {
    /// 400: the request is malformed; the message names the field.
    BadRequest(String),
    /// 401: a token is configured and the request does not carry it.
    Unauthorized,
    /// 404 for a job id that does not exist.
    JobNotFound(JobId),
    /// 404 for a path that is no route.
    NoRoute(String),
    /// 405.
    MethodNotAllowed,
    /// 409.
    Conflict(String),
    /// 413.
    TooLarge(usize),
    /// 415.
    UnsupportedMediaType,
    /// 503: storage refused the write, or the daemon is booting or stopping.
    Unavailable(&'static str),
    /// 503: storage failed after the change became visible, so it may or may not have been
    /// stored; the client learns which by asking again after the restart.
    OutcomeUnknown(Option<JobId>),
    /// 500: a bug; the detail goes to the log only.
    Internal(String),
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> ApiError {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<WorkerError> for ApiError {
    fn from(e: WorkerError) -> ApiError {
        match e {
            WorkerError::NotFound(id) => ApiError::JobNotFound(id),
            WorkerError::Invalid(field) => ApiError::BadRequest(field.to_string()),
            WorkerError::Conflict { .. }
            | WorkerError::Finished { .. }
            | WorkerError::NotFinished { .. }
            | WorkerError::TrainerStopping { .. }
            | WorkerError::Busy(_) => ApiError::Conflict(e.to_string()),
            WorkerError::Store(StoreError::Unavailable(detail)) => {
                warn!(error = %detail, "request refused: storage unavailable");
                ApiError::Unavailable("storage unavailable: nothing was stored; try again later")
            }
            WorkerError::Store(StoreError::Fatal(detail)) => {
                error!(error = %detail, "request refused: storage failed");
                ApiError::Unavailable(
                    "storage failed: nothing was stored; the daemon is restarting",
                )
            }
            WorkerError::Store(StoreError::OutcomeUnknown(detail)) => {
                error!(error = %detail, "storage failed after a change became visible");
                ApiError::OutcomeUnknown(None)
            }
            WorkerError::Store(StoreError::Conflict { .. }) => ApiError::Conflict(
                "the job changed on another node at the same moment; read it again and retry"
                    .into(),
            ),
            WorkerError::Store(StoreError::Closed) | WorkerError::Stopped => {
                ApiError::Unavailable("the daemon is shutting down")
            }
        }
    }
}

/// The `status` of a 404's body, beside its `error`.
pub(super) const NOT_FOUND: &str = "Not Found";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::BadRequest(msg) => (StatusCode::BAD_REQUEST, json!({"error": msg})),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                json!({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"}),
            ),
            ApiError::JobNotFound(id) => (
                StatusCode::NOT_FOUND,
                json!({"error": format!("job {id} not found"), "status": NOT_FOUND}),
            ),
            ApiError::NoRoute(path) => (
                StatusCode::NOT_FOUND,
                json!({"error": format!("no such route: {path}"), "status": NOT_FOUND}),
            ),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "method not allowed on this route"}),
            ),
            ApiError::Conflict(msg) => (StatusCode::CONFLICT, json!({"error": msg})),
            ApiError::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": format!("body: larger than the limit of {limit} bytes")}),
            ),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({"error": "content-type: must be application/json"}),
            ),
            ApiError::Unavailable(msg) => (StatusCode::SERVICE_UNAVAILABLE, json!({"error": msg})),
            ApiError::OutcomeUnknown(job_id) => {
                let mut body = json!({
                    "error": "storage failed while the change was being stored: it may or may not have been stored; the daemon is restarting; after it, GET the job (or resubmit it with the same job_id) to learn which"
                });
                if let Some(id) = job_id {
                    body["job_id"] = id.to_string().into();
                }
                (StatusCode::SERVICE_UNAVAILABLE, body)
            }
            ApiError::Internal(detail) => {
                error!(error = %detail, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "internal error"}),
                )
            }
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
