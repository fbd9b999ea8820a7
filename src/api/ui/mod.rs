//! The dashboard at `/ui`: server-rendered HTML over the same [`AppState`] and
//! [`WorkerHandle`](crate::worker::WorkerHandle) as the API, nothing else.
//!
//! Pages are drawn by the server (maud, inline SVG for the charts); one small script and one
//! stylesheet are compiled in. The tables work without JavaScript; the live parts use
//! server-sent events, one stream for all of a browser's tabs (a shared worker):
//! `/ui/events` wakes on the worker's change counter
//! ([`WorkerHandle::subscribe_changes`](crate::worker::WorkerHandle::subscribe_changes)), and
//! the page then asks for its live region again, which is rendered once per change and page
//! however many tabs ask (see [`render_cached`]). A job's log follows by the same offsets as
//! `GET /v1/jobs/{id}/logs`.
//!
//! Security: with `api_token` set, every page but the login form and the static files needs
//! the token, given once to the form and then kept in an HttpOnly, SameSite=Strict cookie
//! scoped to `/ui`. Every action is a POST that must come from this origin and carry the CSRF
//! token of the session (an HMAC of it under a key drawn at start), also without a token.
//! Every answer carries a strict Content-Security-Policy and refuses framing; no CORS
//! header is ever sent.

mod auth;
mod chart;
mod live;
mod pages;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::Markup;
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::job::{JobId, Timestamp};
use crate::worker::WorkerError;
pub use auth::{CSRF_FIELD, SESSION_COOKIE};

/// The policy every answer of the dashboard carries: only this origin's script, style and
/// connections, no inline script or style, no framing, forms only to this origin.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
    base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const CSS: &str = include_str!("assets/ui.css");
const JS: &str = include_str!("assets/ui.js");
const EVENTS_JS: &str = include_str!("assets/events.js");

/// The header the script sends to ask for a page's live region only.
const PARTIAL_HEADER: &str = "x-ui-partial";

/// What the dashboard's handlers share.
#[derive(Clone)]
pub(crate) struct Ui(Arc<Inner>);

pub(crate) struct Inner {
    app: AppState,
    /// Signs the CSRF tokens; drawn at start, so a restart ends every form in flight.
    key: [u8; 32],
    /// When this listener was built, for the uptime.
    started: std::time::Instant,
    /// Live regions as rendered at a change count, by the URI that asked: ten tabs on one
    /// page cost one render per change.
    rendered: Mutex<HashMap<String, (u64, Arc<String>)>>,
    /// Held while a live region is rendered for the script, so that tabs woken by one change
    /// wait for the first render instead of each rendering the same region.
    rendering: tokio::sync::Mutex<()>,
}

/// Live regions kept at once; past it the cache starts over.
const RENDERED_MAX: usize = 64;

impl std::ops::Deref for Ui {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The dashboard's routes, under `/ui`, for [`super::router`] to merge.
pub fn router<S: Clone + Send + Sync + 'static>(app: AppState) -> Router<S> {
    let ui = Ui(Arc::new(Inner {
        app,
        key: auth::random_key(),
        started: std::time::Instant::now(),
        rendered: Mutex::new(HashMap::new()),
        rendering: tokio::sync::Mutex::new(()),
    }));
    let guarded = Router::new()
        .route("/ui", get(overview))
        .route("/ui/queue", get(queue))
        .route("/ui/history", get(history))
        .route("/ui/jobs/{id}", get(job))
        .route("/ui/jobs/{id}/log", get(live::log))
        .route("/ui/jobs/{id}/cancel", post(cancel))
        .route("/ui/jobs/{id}/retry", post(retry))
        .route("/ui/events", get(live::events))
        .route("/ui/logout", post(auth::logout))
        .route_layer(middleware::from_fn_with_state(ui.clone(), auth::require));
    Router::new()
        .merge(guarded)
        .route("/ui/", get(|| async { Redirect::to("/ui") }))
        .route("/ui/login", get(auth::login_form).post(auth::login))
        .route("/ui/assets/ui.css", get(css))
        .route("/ui/assets/ui.js", get(js))
        .route("/ui/assets/events.js", get(events_js))
        .layer(middleware::from_fn(security_headers))
        .with_state(ui)
}

/// The headers of every dashboard answer.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let set = |headers: &mut HeaderMap, name: &'static str, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(headers, "content-security-policy", CONTENT_SECURITY_POLICY);
    set(headers, "x-frame-options", "DENY");
    set(headers, "x-content-type-options", "nosniff");
    set(headers, "referrer-policy", "same-origin");
    set(headers, "cross-origin-opener-policy", "same-origin");
    set(headers, "cross-origin-resource-policy", "same-origin");
    if !headers.contains_key(header::CACHE_CONTROL) {
        set(headers, "cache-control", "no-store");
    }
    response
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

/// The shared worker that holds the one event stream of all tabs.
async fn events_js() -> Response {
    asset("text/javascript; charset=utf-8", EVENTS_JS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// An answer that is not a page: its status, and a sentence for the operator.
#[derive(Debug)]
pub(crate) struct UiError {
    status: StatusCode,
    message: String,
}

impl UiError {
    fn new(status: StatusCode, message: impl Into<String>) -> UiError {
        UiError {
            status,
            message: message.into(),
        }
    }
}

impl From<WorkerError> for UiError {
    fn from(e: WorkerError) -> UiError {
        let text = e.to_string();
        UiError::from_api(ApiError::from(e), text)
    }
}

impl UiError {
    /// The API's status for the error; its text where it is the client's, a generic one for
    /// a 5xx (whose detail the API's mapping has logged).
    fn from_api(e: ApiError, text: String) -> UiError {
        let status = e.into_response().status();
        let message = if status.is_server_error() {
            "the daemon cannot answer now; try again shortly".to_string()
        } else {
            text
        };
        UiError { status, message }
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let page = pages::error_page(self.status, &self.message);
        (self.status, Html(page.into_string())).into_response()
    }
}

impl Ui {
    fn worker(&self) -> Result<&crate::worker::WorkerHandle, UiError> {
        self.app
            .worker()
            .map_err(|e| UiError::from_api(e, String::new()))
    }

    /// The change count now.
    fn version(&self) -> Result<u64, UiError> {
        Ok(*self.worker()?.subscribe_changes().borrow())
    }
}

/// A page: the whole document, or only its live region when the script asks for it. The
/// live region is rendered once per change count and URI.
async fn render_cached<F, Fut>(
    ui: &Ui,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    title: &str,
    nav: pages::Nav,
    render: F,
) -> Result<Response, UiError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(Markup, Markup), UiError>>,
{
    let partial = headers.contains_key(PARTIAL_HEADER);
    let key = uri.to_string();
    let version = ui.version()?;
    let cached = || {
        ui.rendered
            .lock()
            .ok()?
            .get(&key)
            .filter(|(at, _)| *at == version)
            .map(|(_, html)| html.clone())
    };
    let _rendering = if partial {
        if let Some(html) = cached() {
            return Ok(Html(html.to_string()).into_response());
        }
        let guard = ui.rendering.lock().await;
        // Another tab may have rendered it while this one waited.
        if let Some(html) = cached() {
            return Ok(Html(html.to_string()).into_response());
        }
        Some(guard)
    } else {
        None
    };
    let (fixed, live) = render().await?;
    let live = Arc::new(live.into_string());
    if let Ok(mut rendered) = ui.rendered.lock() {
        if rendered.len() >= RENDERED_MAX {
            rendered.clear();
        }
        rendered.insert(key, (version, live.clone()));
    }
    if partial {
        return Ok(Html(live.to_string()).into_response());
    }
    let csrf = auth::csrf_for(ui, headers);
    // A job's log comes after its live part; the history's filters before its table.
    let fixed_first = nav != pages::Nav::None;
    let page = pages::layout(
        title,
        nav,
        ui.app.api_token.is_some(),
        &csrf,
        fixed,
        &live,
        fixed_first,
    );
    Ok(Html(page.into_string()).into_response())
}

async fn overview(
    State(ui): State<Ui>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Response, UiError> {
    render_cached(
        &ui,
        &headers,
        &uri,
        "Overview",
        pages::Nav::Overview,
        || pages::overview(&ui),
    )
    .await
}

async fn queue(
    State(ui): State<Ui>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Response, UiError> {
    render_cached(&ui, &headers, &uri, "Queue", pages::Nav::Queue, || {
        pages::queue(&ui)
    })
    .await
}

/// The history's filters, as the form sends them; empty fields mean "any".
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct HistoryParams {
    #[serde(default)]
    status: String,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    model: String,
    /// Finished within this many hours.
    #[serde(default)]
    within: String,
    /// A prefix of the id.
    #[serde(default)]
    q: String,
    #[serde(default)]
    page: usize,
}

async fn history(
    State(ui): State<Ui>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(params): Query<HistoryParams>,
) -> Result<Response, UiError> {
    let fixed = pages::history_filters(&params);
    render_cached(
        &ui,
        &headers,
        &uri,
        "History",
        pages::Nav::History,
        || async { Ok((fixed, pages::history(&ui, &params).await?)) },
    )
    .await
}

fn parse_id(text: &str) -> Result<JobId, UiError> {
    text.parse()
        .map_err(|_| UiError::new(StatusCode::NOT_FOUND, format!("no job {text:?}")))
}

/// A job's page; the log is followed by [`live::log`].
async fn job(
    State(ui): State<Ui>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Path(id): Path<String>,
) -> Result<Response, UiError> {
    let id = parse_id(&id)?;
    let worker = ui.worker()?;
    let Some(found) = worker.job(id).await? else {
        return Err(UiError::new(StatusCode::NOT_FOUND, format!("no job {id}")));
    };
    let title = format!("Job {}", short_id(&id));
    // One per process and token, so the live region rendered for one tab suits every tab.
    let csrf = auth::csrf_for(&ui, &headers);
    // The script asks for the live part only: the log is not read for it.
    let partial = headers.contains_key(PARTIAL_HEADER);
    render_cached(&ui, &headers, &uri, &title, pages::Nav::None, || async {
        let log = if partial {
            maud::html! {}
        } else {
            pages::job_log(&ui, &found).await?
        };
        Ok((log, pages::job(&ui, id, &csrf).await?))
    })
    .await
}

/// The form of an action: only its CSRF token.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ActionForm {
    #[serde(default)]
    csrf: String,
}

async fn cancel(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: Result<axum::Form<ActionForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, UiError> {
    auth::check_action(&ui, &headers, form.as_ref().ok().map(|f| f.csrf.as_str()))?;
    let id = parse_id(&id)?;
    ui.app
        .worker_for_change()
        .map_err(|e| UiError::from_api(e, String::new()))?
        .cancel(id)
        .await?;
    Ok(Redirect::to(&format!("/ui/jobs/{id}?done=cancelled")).into_response())
}

async fn retry(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: Result<axum::Form<ActionForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, UiError> {
    auth::check_action(&ui, &headers, form.as_ref().ok().map(|f| f.csrf.as_str()))?;
    let id = parse_id(&id)?;
    ui.app
        .worker_for_change()
        .map_err(|e| UiError::from_api(e, String::new()))?
        .retry(id)
        .await?;
    Ok(Redirect::to(&format!("/ui/jobs/{id}?done=retried")).into_response())
}

/// The first 8 characters of an id: enough to tell jobs apart on a page.
fn short_id(id: &JobId) -> String {
    id.to_string().chars().take(8).collect()
}

/// A duration as an operator reads it: `3h 12m`, `4m 05s`, `12s`.
fn human(seconds: i64) -> String {
    let s = seconds.max(0);
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {sec:02}s")
    } else {
        format!("{sec}s")
    }
}

/// A moment as shown in tables: UTC to the second.
fn moment(t: &Timestamp) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_an_operator_says_them() {
        assert_eq!(human(0), "0s");
        assert_eq!(human(59), "59s");
        assert_eq!(human(65), "1m 05s");
        assert_eq!(human(3 * 3600 + 12 * 60 + 5), "3h 12m");
        assert_eq!(human(2 * 86_400 + 3600), "2d 1h");
        assert_eq!(human(-5), "0s");
    }
}
