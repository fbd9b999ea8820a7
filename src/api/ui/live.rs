//! The dashboard's server-sent events: the worker's changes, and a job's log as it grows.
//!
//! `/ui/events` sends one `change` event per wake of the worker's change counter. A `watch`
//! keeps only the latest count, so a burst of changes reaches a slow tab as one event, and
//! each tab costs the worker nothing: it only wakes the tab, which then asks for its page's
//! live region (rendered once per change, see [`super::render_cached`]).
//!
//! `/ui/jobs/{id}/log` sends the log from an offset on, by the offsets of
//! `GET /v1/jobs/{id}/logs`: each `log` event carries the text (as a JSON string, so that
//! line ends survive) and its id is the offset after it, which a reconnecting browser sends
//! back as `Last-Event-ID`. The log file is looked at every [`LOG_POLL`]; the job's status
//! only when the worker says something changed. Once the job is finished and everything is
//! sent, an `end` event closes the stream.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde::Deserialize;

use super::{Ui, UiError, parse_id};
use crate::api::{LogParams, read_rotated_log};
use crate::job::{JobId, Status};

/// How often a followed log is looked at for new output.
const LOG_POLL: Duration = Duration::from_millis(400);

/// Most bytes read for one `log` event. The page starts following at the end of the tail it
/// shows, so a follower is never far behind; one that is (a reconnect after a long time)
/// ends and starts again at the tail when the page is reloaded.
const LOG_CHUNK: usize = 8 * 1024 * 1024;

/// The worker's changes, one `change` event per wake.
pub(super) async fn events(State(ui): State<Ui>) -> Result<Response, UiError> {
    let changes = ui.worker()?.subscribe_changes();
    let shutdown = ui.app.shutdown.clone();
    let stream = stream::unfold((changes, shutdown), |(mut changes, shutdown)| async move {
        tokio::select! {
            changed = changes.changed() => {
                // The worker has stopped: the stream ends and the browser tries again later.
                changed.ok()?;
                let count = *changes.borrow_and_update();
                let event = Event::default().event("change").data(count.to_string());
                Some((Ok::<_, Infallible>(event), (changes, shutdown)))
            }
            _ = shutdown.cancelled() => None,
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct LogQuery {
    #[serde(default)]
    offset: u64,
}

/// Where a log follower is.
struct Follow {
    ui: Ui,
    id: JobId,
    offset: u64,
    status: Status,
    path: std::path::PathBuf,
    changes: tokio::sync::watch::Receiver<u64>,
    ended: bool,
}

/// A job's log from `offset` (or the `Last-Event-ID` a reconnecting browser sends) on.
pub(super) async fn log(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> Result<Response, UiError> {
    let id = parse_id(&id)?;
    let worker = ui.worker()?;
    let changes = worker.subscribe_changes();
    let Some((path, status)) = worker.log_path(id).await? else {
        return Err(UiError::new(
            axum::http::StatusCode::NOT_FOUND,
            format!("no job {id}"),
        ));
    };
    let offset = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(query.offset);
    let follow = Follow {
        ui,
        id,
        offset,
        status,
        path,
        changes,
        ended: false,
    };
    let stream = stream::unfold(follow, next_log_event);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The next event of a follower: new text, or the end once the job is finished and all of
/// its log is sent.
async fn next_log_event(mut f: Follow) -> Option<(Result<Event, Infallible>, Follow)> {
    if f.ended {
        return None;
    }
    loop {
        // The status first: a log read after a final status holds all of its output.
        let finished = f.status.is_finished();
        let (text, size) = read_from(&f.path, f.offset).await?;
        if !text.is_empty() {
            f.offset += text.len() as u64;
            let data = serde_json::to_string(&String::from_utf8_lossy(&text)).ok()?;
            let event = Event::default()
                .event("log")
                .id(f.offset.to_string())
                .data(data);
            return Some((Ok(event), f));
        }
        if finished && f.offset >= size {
            f.ended = true;
            let event = Event::default().event("end").data(f.status.as_str());
            return Some((Ok(event), f));
        }
        tokio::select! {
            changed = f.changes.changed() => {
                changed.ok()?;
                f.changes.borrow_and_update();
                let worker = f.ui.worker().ok()?;
                let (_, status) = worker.log_path(f.id).await.ok()??;
                f.status = status;
            }
            _ = tokio::time::sleep(LOG_POLL) => {}
            _ = f.ui.app.shutdown.cancelled() => return None,
        }
    }
}

/// The log from `offset` (at most [`LOG_CHUNK`] bytes), and the log's size when read.
async fn read_from(path: &std::path::Path, offset: u64) -> Option<(Vec<u8>, u64)> {
    let params = LogParams {
        tail: None,
        offset: Some(offset),
    };
    let (body, size) = read_rotated_log(path, &params).await.ok()?;
    let bytes = axum::body::to_bytes(body, LOG_CHUNK).await.ok()?;
    Some((bytes.to_vec(), size))
}
