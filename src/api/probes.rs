//! The routes for operators and tools, open without the token: the liveness and readiness
//! probes, the metrics, and the API's description.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

/// What the probes answer.
#[derive(Serialize, ToSchema)]
pub(super) struct Probe {
    status: ProbeStatus,
    /// Why the storage refuses changes, with `"storage unavailable"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum ProbeStatus {
    Ok,
    Ready,
    Replaying,
    Stopping,
    /// The store refuses changes now (its database out of reach) and is reconnecting.
    #[serde(rename = "storage unavailable")]
    StorageUnavailable,
}

impl ProbeStatus {
    fn answer(self) -> Json<Probe> {
        Json(Probe {
            status: self,
            reason: None,
        })
    }
}

#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "operations",
    summary = "Liveness",
    description = "200 while the process serves, also during replay. `training-worker health` asks this.",
    responses(
        (status = 200, description = "Alive.", body = Probe,
            examples(("ok" = (value = json!({"status": "ok"}))))),
    ),
)]
pub(super) async fn healthz() -> Json<Probe> {
    ProbeStatus::Ok.answer()
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "operations",
    summary = "This document",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API.", body = Object),
    ),
)]
pub(super) async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::document(),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    responses(
        (status = 200, description = "The Prometheus text exposition format (version 0.0.4).",
            content_type = "text/plain", body = String),
    ),
)]
pub(super) async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::METRICS.render(),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "operations",
    summary = "Readiness",
    description = "200 once replay is done and the worker runs; 503 before, once a stop has begun, and while the store refuses changes (its database out of reach; the reason says so). `training-worker health --ready` asks this.",
    responses(
        (status = 200, description = "Ready.", body = Probe,
            examples(("ready" = (value = json!({"status": "ready"}))))),
        (status = 503, description = "Replaying the data dir, stopping, or the storage unavailable.", body = Probe,
            examples(
                ("replaying" = (value = json!({"status": "replaying"}))),
                ("stopping" = (value = json!({"status": "stopping"}))),
                ("storage unavailable" = (value = json!({"status": "storage unavailable", "reason": "lost the connection to the database postgres://worker:***@db/training"}))),
            )),
    ),
)]
pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    if state.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            ProbeStatus::Stopping.answer(),
        )
            .into_response();
    }
    match state.worker.get() {
        Some(worker) => match worker.storage_trouble() {
            None => ProbeStatus::Ready.answer().into_response(),
            Some(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Probe {
                    status: ProbeStatus::StorageUnavailable,
                    reason: Some(reason),
                }),
            )
                .into_response(),
        },
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            ProbeStatus::Replaying.answer(),
        )
            .into_response(),
    }
}
