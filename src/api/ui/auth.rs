//! Who may see the dashboard and act from it: the login form, the session cookie, the
//! same-origin check and the CSRF token.
//!
//! The session is the API token itself, hex-encoded in an HttpOnly, SameSite=Strict cookie
//! scoped to `/ui` (the API's Bearer check is untouched). The CSRF token of a session is
//! HMAC-SHA256(key, session) under a key drawn when the listener starts: a page of another
//! origin can neither read it (no CORS) nor compute it. Without an API token the session is
//! empty and the token is the same for every page, but an action still needs it.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::{Ui, UiError, pages};
use crate::api::constant_time_eq;

/// The cookie that keeps the session.
pub const SESSION_COOKIE: &str = "tw_ui_session";
/// The form field that carries the CSRF token.
pub const CSRF_FIELD: &str = "csrf";

/// A fresh key for the CSRF tokens, from the system's random source (through UUID v4).
pub(super) fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    key
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The session cookie's value in `headers`, if any.
fn session(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
}

/// Whether the request's session holds the API token (always, when none is set).
fn signed_in(ui: &Ui, headers: &HeaderMap) -> bool {
    let Some(expected) = &ui.app.api_token else {
        return true;
    };
    session(headers)
        .and_then(unhex)
        .is_some_and(|given| constant_time_eq(&given, expected.as_bytes()))
}

fn csrf_of(ui: &Ui, session: &str) -> String {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(&ui.key).expect("HMAC takes a key of any length");
    mac.update(b"training-worker ui csrf\0");
    mac.update(session.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// The CSRF token for the forms of a page answered to `headers`.
pub(super) fn csrf_for(ui: &Ui, headers: &HeaderMap) -> String {
    let session = match ui.app.api_token {
        Some(_) => session(headers).unwrap_or(""),
        None => "",
    };
    csrf_of(ui, session)
}

/// Refuses a POST that comes from another origin: its `Origin` (or, without one, its
/// `Sec-Fetch-Site`) must say this one. Clients that are not browsers send neither.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(origin) = text(header::ORIGIN.as_str()) {
        let Some(host) = text(header::HOST.as_str()) else {
            return false;
        };
        let origin = origin.to_ascii_lowercase();
        let host = host.to_ascii_lowercase();
        return origin == format!("http://{host}") || origin == format!("https://{host}");
    }
    text("sec-fetch-site").is_none_or(|site| site == "same-origin")
}

/// What an action must show: the same origin, then the CSRF token of its session.
pub(super) fn check_action(
    ui: &Ui,
    headers: &HeaderMap,
    csrf: Option<&str>,
) -> Result<(), UiError> {
    if !same_origin(headers) {
        return Err(UiError::new(
            StatusCode::FORBIDDEN,
            "refused: the request comes from another origin",
        ));
    }
    let expected = csrf_for(ui, headers);
    let given = csrf.unwrap_or("");
    if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        return Err(UiError::new(
            StatusCode::FORBIDDEN,
            "refused: the form's CSRF token is missing or wrong; reload the page and try again",
        ));
    }
    Ok(())
}

/// Lets a signed-in request through; sends a page's visitor to the login form and answers
/// anything else 401.
pub(super) async fn require(State(ui): State<Ui>, request: Request, next: Next) -> Response {
    if signed_in(&ui, request.headers()) {
        return next.run(request).await;
    }
    let is_page = request.method() == axum::http::Method::GET
        && request
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("text/html"));
    if is_page {
        return Redirect::to("/ui/login").into_response();
    }
    UiError::new(StatusCode::UNAUTHORIZED, "sign in first at /ui/login").into_response()
}

pub(super) async fn login_form(State(ui): State<Ui>, headers: HeaderMap) -> Response {
    if ui.app.api_token.is_none() || signed_in(&ui, &headers) {
        return Redirect::to("/ui").into_response();
    }
    Html(pages::login(&csrf_of(&ui, ""), None).into_string()).into_response()
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

/// Takes the API token once and keeps it in the session cookie.
pub(super) async fn login(
    State(ui): State<Ui>,
    headers: HeaderMap,
    form: Result<axum::Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, UiError> {
    let form = form.map(|f| f.0).unwrap_or_default();
    if !same_origin(&headers) {
        return Err(UiError::new(
            StatusCode::FORBIDDEN,
            "refused: the request comes from another origin",
        ));
    }
    let csrf = csrf_of(&ui, "");
    if !constant_time_eq(form.csrf.as_bytes(), csrf.as_bytes()) {
        return Err(UiError::new(
            StatusCode::FORBIDDEN,
            "refused: the form's CSRF token is missing or wrong; reload the page and try again",
        ));
    }
    let Some(expected) = &ui.app.api_token else {
        return Ok(Redirect::to("/ui").into_response());
    };
    if !constant_time_eq(form.token.as_bytes(), expected.as_bytes()) {
        let page = pages::login(&csrf, Some("That is not the daemon's API token."));
        return Ok((StatusCode::UNAUTHORIZED, Html(page.into_string())).into_response());
    }
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/ui; HttpOnly; SameSite=Strict",
        hex(expected.as_bytes())
    );
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/ui")).into_response())
}

/// Ends the session: the cookie is dropped.
pub(super) async fn logout(
    State(ui): State<Ui>,
    headers: HeaderMap,
    form: Result<axum::Form<super::ActionForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, UiError> {
    check_action(&ui, &headers, form.as_ref().ok().map(|f| f.csrf.as_str()))?;
    let cookie = format!("{SESSION_COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0");
    let target = if ui.app.api_token.is_some() {
        "/ui/login"
    } else {
        "/ui"
    };
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to(target)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        assert_eq!(unhex(&hex(b"s3cret token;=")).unwrap(), b"s3cret token;=");
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn a_post_from_another_origin_is_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "127.0.0.1:8787".parse().unwrap());
        assert!(same_origin(&headers));
        headers.insert(header::ORIGIN, "http://127.0.0.1:8787".parse().unwrap());
        assert!(same_origin(&headers));
        headers.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(!same_origin(&headers));
        headers.remove(header::ORIGIN);
        headers.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(!same_origin(&headers));
    }
}
