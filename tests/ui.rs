//! The dashboard's routes at the router level (`Router::oneshot`, no socket): what each
//! answers, the login and its cookie, the CSRF and same-origin checks on every action, and
//! the headers that keep the pages to this origin. The browser tests are in ui_browser.rs.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tempfile::TempDir;
use tower::ServiceExt;

use training_worker::config::WorkerConfig;

use app_support::{Assembly, call, executor_config};

#[allow(dead_code)]
mod app_support;

const TOKEN: &str = "s3cret token";

struct App {
    router: Router,
    handle: training_worker::worker::WorkerHandle,
    _root: TempDir,
}

/// The app with nothing ever started (`max_concurrent = 0`), and `token` as its API token.
async fn app(token: Option<&str>) -> App {
    let root = tempfile::tempdir().expect("a temp dir");
    let parts = app_support::assemble(
        &root.path().join("data"),
        Assembly {
            executor: executor_config(
                vec!["/bin/sh".into(), "-c".into(), "exit 0".into()],
                std::time::Duration::from_secs(60),
            ),
            worker: WorkerConfig {
                max_concurrent: 0,
                ..WorkerConfig::default()
            },
            clock: None,
            api_token: token.map(str::to_string),
            max_body_bytes: 1024 * 1024,
        },
    )
    .await;
    App {
        router: parts.router,
        handle: parts.handle,
        _root: root,
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl App {
    async fn send(&self, request: Request<Body>) -> Reply {
        let (status, headers, body): (StatusCode, HeaderMap, Bytes) =
            call(&self.router, request).await;
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// GET `uri` as a browser asks for a page, with `cookie` if given.
    async fn page(&self, uri: &str, cookie: Option<&str>) -> Reply {
        let mut request = Request::get(uri).header(header::ACCEPT, "text/html");
        if let Some(cookie) = cookie {
            request = request.header(header::COOKIE, cookie);
        }
        self.send(request.body(Body::empty()).unwrap()).await
    }

    /// POST a form to `uri` from `origin`, with `cookie` if given.
    async fn form(&self, uri: &str, body: &str, origin: &str, cookie: Option<&str>) -> Reply {
        let mut request = Request::post(uri)
            .header(header::HOST, "127.0.0.1:8787")
            .header(header::ORIGIN, origin)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(cookie) = cookie {
            request = request.header(header::COOKIE, cookie);
        }
        self.send(request.body(Body::from(body.to_string())).unwrap())
            .await
    }

    /// Submits a job through the API; its id.
    async fn submit(&self, token: Option<&str>) -> String {
        let mut request =
            Request::post("/v1/jobs").header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = json!({"type": "DiffusionJob", "model": "m", "dataset_zip": "z"});
        let reply = self
            .send(request.body(Body::from(body.to_string())).unwrap())
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        let job: Value = serde_json::from_str(&reply.body).unwrap();
        job["job_id"].as_str().unwrap().to_string()
    }

    async fn status_of(&self, id: &str, token: Option<&str>) -> String {
        let mut request = Request::get(format!("/v1/jobs/{id}"));
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let reply = self.send(request.body(Body::empty()).unwrap()).await;
        let job: Value = serde_json::from_str(&reply.body).unwrap();
        job["status"].as_str().unwrap().to_string()
    }
}

const SAME: &str = "http://127.0.0.1:8787";

/// The CSRF token a page carries for its forms.
fn csrf_of(page: &str) -> String {
    let start = page.find("data-csrf=\"").expect("a page with a CSRF token") + 11;
    page[start..start + 64].to_string()
}

fn assert_locked_down(reply: &Reply) {
    let csp = reply.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(reply.headers["x-frame-options"], "DENY");
    assert!(!reply.headers.contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn without_a_token_every_page_opens_with_a_strict_policy() {
    let app = app(None).await;
    let id = app.submit(None).await;
    for uri in [
        "/ui".to_string(),
        "/ui/queue".into(),
        "/ui/history".into(),
        "/ui/history?status=Failed&type=TextJob&model=x&within=24&q=12&page=3".into(),
        format!("/ui/jobs/{id}"),
    ] {
        let reply = app.page(&uri, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}: {}", reply.body);
        assert_locked_down(&reply);
        assert!(reply.body.starts_with("<!DOCTYPE html>"), "{uri}");
    }
    // The queue and the job page show the job.
    assert!(app.page("/ui/queue", None).await.body.contains(&id));
    assert!(
        app.page(&format!("/ui/jobs/{id}"), None)
            .await
            .body
            .contains(&id)
    );
    // The script asks for the live region only.
    let request = Request::get("/ui/queue")
        .header("x-ui-partial", "1")
        .body(Body::empty())
        .unwrap();
    let partial = app.send(request).await;
    assert_eq!(partial.status, StatusCode::OK);
    assert!(partial.body.contains(&id) && !partial.body.contains("<html"));
    // The static files.
    for (uri, kind) in [
        ("/ui/assets/ui.css", "text/css"),
        ("/ui/assets/ui.js", "text/javascript"),
    ] {
        let reply = app.page(uri, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}");
        assert!(
            reply.headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with(kind)
        );
        assert_locked_down(&reply);
    }
    // Without a token there is nothing to sign in to.
    let login = app.page("/ui/login", None).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn an_unknown_job_is_404() {
    let app = app(None).await;
    for uri in [
        "/ui/jobs/123e4567-e89b-12d3-a456-426614174999",
        "/ui/jobs/not-an-id",
        "/ui/jobs/123e4567-e89b-12d3-a456-426614174999/log",
    ] {
        let reply = app.page(uri, None).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
        assert_locked_down(&reply);
    }
    let cancel = app
        .form(
            "/ui/jobs/123e4567-e89b-12d3-a456-426614174999/cancel",
            "",
            SAME,
            None,
        )
        .await;
    // The CSRF token is checked before anything else is looked at.
    assert_eq!(cancel.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_event_streams_are_server_sent_events() {
    let app = app(None).await;
    let id = app.submit(None).await;
    for uri in [
        "/ui/events".to_string(),
        format!("/ui/jobs/{id}/log?offset=0"),
    ] {
        let request = Request::get(&uri).body(Body::empty()).unwrap();
        // The stream does not end by itself; only its head is looked at.
        let response = app.router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{uri}");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream",
            "{uri}"
        );
    }
}

#[tokio::test]
async fn with_a_token_the_pages_need_the_login() {
    let app = app(Some(TOKEN)).await;
    let id = app.submit(Some(TOKEN)).await;
    // A page sends the browser to the login form; anything else is 401.
    for uri in [
        "/ui".to_string(),
        "/ui/queue".into(),
        "/ui/history".into(),
        format!("/ui/jobs/{id}"),
    ] {
        let reply = app.page(&uri, None).await;
        assert_eq!(reply.status, StatusCode::SEE_OTHER, "{uri}");
        assert_eq!(reply.headers[header::LOCATION], "/ui/login");
        assert_locked_down(&reply);
    }
    for uri in ["/ui/events".to_string(), format!("/ui/jobs/{id}/log")] {
        let request = Request::get(&uri).body(Body::empty()).unwrap();
        assert_eq!(
            app.send(request).await.status,
            StatusCode::UNAUTHORIZED,
            "{uri}"
        );
    }
    // A cookie that is not the token's is no session.
    let wrong = app.page("/ui", Some("tw_ui_session=00ff")).await;
    assert_eq!(wrong.status, StatusCode::SEE_OTHER);
    // The login form and the static files need nothing.
    let login = app.page("/ui/login", None).await;
    assert_eq!(login.status, StatusCode::OK);
    assert_locked_down(&login);
    assert!(login.body.contains("type=\"password\""));
    assert_eq!(
        app.page("/ui/assets/ui.css", None).await.status,
        StatusCode::OK
    );
    // An action without a session is refused before its form is read.
    let cancel = app
        .form(&format!("/ui/jobs/{id}/cancel"), "csrf=x", SAME, None)
        .await;
    assert_eq!(cancel.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.status_of(&id, Some(TOKEN)).await, "Queued");
}

#[tokio::test]
async fn the_login_sets_an_http_only_strict_cookie_and_the_api_keeps_its_bearer_check() {
    let app = app(Some(TOKEN)).await;
    let form = app.page("/ui/login", None).await;
    let csrf = csrf_of(&form.body);
    let token = "s3cret%20token";

    let bad = app
        .form("/ui/login", &format!("token=nope&csrf={csrf}"), SAME, None)
        .await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    assert!(!bad.headers.contains_key(header::SET_COOKIE));
    assert!(bad.body.contains("not the daemon"));

    let no_csrf = app
        .form("/ui/login", &format!("token={token}"), SAME, None)
        .await;
    assert_eq!(no_csrf.status, StatusCode::FORBIDDEN);
    let elsewhere = app
        .form(
            "/ui/login",
            &format!("token={token}&csrf={csrf}"),
            "http://evil.example",
            None,
        )
        .await;
    assert_eq!(elsewhere.status, StatusCode::FORBIDDEN);

    let good = app
        .form(
            "/ui/login",
            &format!("token={token}&csrf={csrf}"),
            SAME,
            None,
        )
        .await;
    assert_eq!(good.status, StatusCode::SEE_OTHER, "{}", good.body);
    assert_eq!(good.headers[header::LOCATION], "/ui");
    let cookie = good.headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    let session = cookie.split(';').next().unwrap().to_string();
    let overview = app.page("/ui", Some(&session)).await;
    assert_eq!(overview.status, StatusCode::OK);
    assert!(overview.body.contains("Sign out"));

    // The cookie is the dashboard's; the API still wants its Bearer header.
    let request = Request::get("/v1/queue")
        .header(header::COOKIE, &session)
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.send(request).await.status, StatusCode::UNAUTHORIZED);

    // Signing out drops the cookie.
    let csrf = csrf_of(&overview.body);
    let out = app
        .form("/ui/logout", &format!("csrf={csrf}"), SAME, Some(&session))
        .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(
        out.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

#[tokio::test]
async fn an_action_needs_the_csrf_token_and_this_origin() {
    let app = app(Some(TOKEN)).await;
    let id = app.submit(Some(TOKEN)).await;
    let session = format!(
        "tw_ui_session={}",
        TOKEN
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let page = app.page(&format!("/ui/jobs/{id}"), Some(&session)).await;
    assert_eq!(page.status, StatusCode::OK);
    let csrf = csrf_of(&page.body);
    let cancel = format!("/ui/jobs/{id}/cancel");

    for (body, origin, why) in [
        ("".to_string(), SAME, "no CSRF token"),
        ("csrf=0000".to_string(), SAME, "a wrong CSRF token"),
        (
            format!("csrf={csrf}"),
            "http://evil.example",
            "another origin",
        ),
        (format!("csrf={csrf}"), "null", "an opaque origin"),
    ] {
        let reply = app.form(&cancel, &body, origin, Some(&session)).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{why}");
        assert_locked_down(&reply);
    }
    // A browser that sends no Origin but says the request is cross-site.
    let request = Request::builder()
        .method(Method::POST)
        .uri(&cancel)
        .header(header::COOKIE, &session)
        .header("sec-fetch-site", "cross-site")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("csrf={csrf}")))
        .unwrap();
    assert_eq!(app.send(request).await.status, StatusCode::FORBIDDEN);
    assert_eq!(app.status_of(&id, Some(TOKEN)).await, "Queued");

    // With both, the cancel goes through, and the retry after it.
    let reply = app
        .form(&cancel, &format!("csrf={csrf}"), SAME, Some(&session))
        .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    assert_eq!(app.status_of(&id, Some(TOKEN)).await, "Cancelled");
    // Cancelling again is the API's 409, as a page.
    let again = app
        .form(&cancel, &format!("csrf={csrf}"), SAME, Some(&session))
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    let retry = format!("/ui/jobs/{id}/retry");
    let reply = app
        .form(&retry, &format!("csrf={csrf}"), SAME, Some(&session))
        .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    assert_eq!(app.status_of(&id, Some(TOKEN)).await, "Queued");
}

#[tokio::test]
async fn every_watcher_wakes_once_a_change_has_landed() {
    let app = app(None).await;
    let mut tabs: Vec<_> = (0..10).map(|_| app.handle.subscribe_changes()).collect();
    let before = *tabs[0].borrow_and_update();
    for tab in &mut tabs[1..] {
        tab.borrow_and_update();
    }
    let id = app.submit(None).await;
    for tab in &mut tabs {
        tokio::time::timeout(std::time::Duration::from_secs(10), tab.changed())
            .await
            .expect("a watcher wakes after the submission")
            .expect("the worker runs");
        assert!(*tab.borrow_and_update() > before);
    }
    // Woken, a tab's live region shows the job; all tabs are served the same render.
    let partial = |uri: &str| {
        Request::get(uri)
            .header("x-ui-partial", "1")
            .body(Body::empty())
            .unwrap()
    };
    let first = app.send(partial("/ui/queue")).await;
    let second = app.send(partial("/ui/queue")).await;
    assert!(first.body.contains(&id));
    assert_eq!(first.body, second.body);
}
