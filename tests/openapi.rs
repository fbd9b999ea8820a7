//! `GET /openapi.json` against the API it describes: the router is built from
//! `api::ROUTES` alone, and these tests hold that list, the document and the answers of the
//! running router to each other. They fail when a route exists that the document lacks,
//! when the document names a route or a method that does not answer, when an answer's
//! status, content type, headers or body are not among those documented, and when a route's
//! documented need for the bearer token is not what the router does.
//!
//! The router is driven in-process with `tower::ServiceExt::oneshot`, as in tests/api.rs,
//! with the queue paused (`max_concurrent = 0`) so that nothing runs.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use training_worker::api::{ROUTES, openapi_json};
use training_worker::config::WorkerConfig;

use app_support::{Assembly, executor_config};

#[allow(dead_code)]
mod app_support;

const TOKEN: &str = "s3cret";
const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

// ---------------------------------------------------------------------------------------
// The app and the document
// ---------------------------------------------------------------------------------------

struct App {
    router: Router,
    _root: TempDir,
    shutdown: CancellationToken,
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The app as `daemon::run` assembles it, with an API token and a paused queue.
async fn spawn_app() -> App {
    let root = tempfile::tempdir().expect("tempdir");
    let parts = app_support::assemble(
        &root.path().join("data"),
        Assembly {
            executor: executor_config(
                vec!["/bin/sh".into(), "-c".into(), "exit 0".into()],
                Duration::from_secs(60),
            ),
            worker: WorkerConfig {
                max_concurrent: 0,
                max_attempts: 3,
                gpus: Vec::new(),
                backfill: false,
                ..WorkerConfig::default()
            },
            clock: None,
            api_token: Some(TOKEN.into()),
            max_body_bytes: 1024 * 1024,
        },
    )
    .await;
    App {
        router: parts.router,
        _root: root,
        shutdown: parts.shutdown,
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

impl App {
    async fn send(&self, method: &str, uri: &str, token: bool, body: Option<&Value>) -> Reply {
        let mut request = Request::builder()
            .method(Method::from_bytes(method.to_uppercase().as_bytes()).expect("a method"))
            .uri(uri);
        if token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
        }
        let body = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(body).expect("serialisable"))
            }
            None => Body::empty(),
        };
        let request = request.body(body).expect("a request");
        let (status, headers, body) = app_support::call(&self.router, request).await;
        Reply {
            status,
            headers,
            body: body.to_vec(),
        }
    }
}

fn document() -> Value {
    serde_json::from_str(openapi_json()).expect("the description is JSON")
}

/// Follows a local `$ref` (`#/components/...`), if `value` is one.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{reference}: only local references are used"));
            let target = doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("{reference} points at nothing"));
            resolve(doc, target)
        }
        None => value,
    }
}

/// One documented operation.
struct Operation<'a> {
    method: String,
    path: String,
    op: &'a Value,
    /// Path-level and operation-level parameters, resolved.
    parameters: Vec<&'a Value>,
}

impl Operation<'_> {
    fn name(&self) -> String {
        format!("{} {}", self.method.to_uppercase(), self.path)
    }

    fn needs_token(&self) -> bool {
        let security = self
            .op
            .get("security")
            .unwrap_or_else(|| panic!("{}: no security (say [] for none)", self.name()));
        !security
            .as_array()
            .expect("security is an array")
            .is_empty()
    }

    fn query_parameters(&self) -> impl Iterator<Item = &Value> {
        self.parameters
            .iter()
            .copied()
            .filter(|p| p["in"] == "query")
    }
}

fn operations(doc: &Value) -> Vec<Operation<'_>> {
    let mut found = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let shared: Vec<&Value> = item
            .get("parameters")
            .and_then(Value::as_array)
            .map(|ps| ps.iter().map(|p| resolve(doc, p)).collect())
            .unwrap_or_default();
        for (method, op) in item.as_object().expect("a path item") {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            let mut parameters = shared.clone();
            if let Some(own) = op.get("parameters").and_then(Value::as_array) {
                parameters.extend(own.iter().map(|p| resolve(doc, p)));
            }
            found.push(Operation {
                method: method.clone(),
                path: path.clone(),
                op,
                parameters,
            });
        }
    }
    found
}

// ---------------------------------------------------------------------------------------
// A small JSON Schema check: the keywords the document uses
// ---------------------------------------------------------------------------------------

fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => return Err(format!("{at}: bad type keyword")),
        };
        let matches = |t: &str| match t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_u64() || value.is_i64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            _ => false,
        };
        if !types.iter().any(|t| matches(t)) {
            return Err(format!("{at}: {value} is not of type {types:?}"));
        }
    }
    if let Some(expected) = schema.get("const")
        && value != expected
    {
        return Err(format!("{at}: {value} is not {expected}"));
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        return Err(format!("{at}: {value} is not one of {options:?}"));
    }
    if let (Some(min), Some(text)) = (
        schema.get("minLength").and_then(Value::as_u64),
        value.as_str(),
    ) && (text.chars().count() as u64) < min
    {
        return Err(format!("{at}: shorter than {min}"));
    }
    if let (Some(min), Some(n)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) && n < min
    {
        return Err(format!("{at}: {n} is below {min}"));
    }
    if let Some(object) = value.as_object() {
        for key in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = key.as_str().expect("a required key");
            if !object.contains_key(key) {
                return Err(format!("{at}: lacks the required {key:?}"));
            }
        }
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (key, property) in properties {
                if let Some(inner) = object.get(key) {
                    conforms(doc, property, inner, &format!("{at}.{key}"))?;
                }
            }
            if schema.get("additionalProperties") == Some(&Value::Bool(false))
                && let Some(extra) = object.keys().find(|k| !properties.contains_key(*k))
            {
                return Err(format!("{at}: {extra:?} is not documented"));
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
            && (array.len() as u64) < min
        {
            return Err(format!("{at}: fewer than {min} items"));
        }
        for (i, item) in array.iter().enumerate() {
            conforms(doc, items, item, &format!("{at}[{i}]"))?;
        }
    }
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        let results: Vec<_> = options
            .iter()
            .map(|o| conforms(doc, o, value, at))
            .collect();
        let passed = results.iter().filter(|r| r.is_ok()).count();
        if passed != 1 {
            return Err(format!(
                "{at}: matches {passed} of oneOf, not 1: {results:?}"
            ));
        }
    }
    if let Some(options) = schema.get("anyOf").and_then(Value::as_array) {
        let results: Vec<_> = options
            .iter()
            .map(|o| conforms(doc, o, value, at))
            .collect();
        if !results.iter().any(|r| r.is_ok()) {
            return Err(format!("{at}: matches nothing of anyOf: {results:?}"));
        }
    }
    Ok(())
}

/// Fails unless `reply` is one of the responses documented for `op`: its status, its media
/// type, its documented headers, and for JSON its body against the schema.
fn assert_documented(doc: &Value, op: &Operation<'_>, what: &str, reply: &Reply) {
    let status = reply.status.as_u16().to_string();
    let Some(response) = op.op["responses"].get(&status) else {
        panic!(
            "{what}: answered {status}, which {} does not document; body: {}",
            op.name(),
            String::from_utf8_lossy(&reply.body)
        );
    };
    let response = resolve(doc, response);
    if let Some(headers) = response.get("headers").and_then(Value::as_object) {
        for name in headers.keys() {
            assert!(
                reply.headers.contains_key(name.as_str()),
                "{what}: the documented header {name} is missing"
            );
        }
    }
    let Some(content) = response.get("content").and_then(Value::as_object) else {
        assert!(
            reply.body.is_empty(),
            "{what}: a body where none is documented"
        );
        return;
    };
    let media = reply.content_type().split(';').next().unwrap_or("").trim();
    let Some(documented) = content.get(media) else {
        panic!(
            "{what}: content type {media:?} is not among {:?}",
            content.keys().collect::<Vec<_>>()
        );
    };
    if media == "application/json"
        && let Some(schema) = documented.get("schema")
        && let Err(e) = conforms(doc, schema, &reply.json(), "body")
    {
        panic!("{what}: the body does not match the documented schema: {e}");
    }
}

/// `path` with its `{id}` filled in.
fn uri(path: &str, id: &str) -> String {
    path.replace("{id}", id)
}

/// The documented example of a parameter, as query text.
fn example_text(parameter: &Value) -> String {
    match &parameter["example"] {
        Value::String(s) => s.clone(),
        Value::Null => panic!("parameter {} has no example", parameter["name"]),
        other => other.to_string(),
    }
}

/// The request body examples of `POST /v1/jobs`.
fn job_examples(doc: &Value) -> Vec<(String, Value)> {
    doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
        .as_object()
        .expect("POST /v1/jobs documents examples")
        .iter()
        .map(|(name, example)| (name.clone(), resolve(doc, example)["value"].clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

#[test]
fn the_document_lists_exactly_the_routes_the_router_serves() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["info"]["version"],
        env!("CARGO_PKG_VERSION"),
        "info.version follows the crate"
    );
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_uppercase(), r.path.to_string()))
        .collect();
    assert_eq!(routed.len(), ROUTES.len(), "a route is listed twice");
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .iter()
        .map(|op| (op.method.to_uppercase(), op.path.clone()))
        .collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routes missing from the description: {undocumented:?}; documented but not routed: {unrouted:?}"
    );
}

#[test]
fn no_route_is_added_around_the_list() {
    // The router is built from ROUTES alone; a route added with a literal path would be
    // served without the document (and the test above) knowing.
    let source = include_str!("../src/api/mod.rs");
    for call in [".route(\"", ".route_service(", ".nest(", ".nest_service("] {
        assert!(
            !source.contains(call),
            "src/api/mod.rs calls {call}...: add the route to ROUTES instead"
        );
    }
}

#[test]
fn every_path_parameter_is_declared() {
    let doc = document();
    for op in operations(&doc) {
        let in_path: BTreeSet<&str> = op
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        let declared: BTreeSet<&str> = op
            .parameters
            .iter()
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().expect("a parameter name"))
            .collect();
        assert_eq!(in_path, declared, "{}: path parameters", op.name());
    }
}

#[tokio::test]
async fn the_document_is_served_without_a_token() {
    let app = spawn_app().await;
    let reply = app.send("GET", "/openapi.json", false, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type(), "application/json");
    assert_eq!(reply.json(), document());
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented() {
    let doc = document();
    let app = spawn_app().await;

    // Every documented job example is accepted.
    let mut ids = Vec::new();
    for (name, example) in job_examples(&doc) {
        let reply = app.send("POST", "/v1/jobs", true, Some(&example)).await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "example {name:?} refused: {}",
            String::from_utf8_lossy(&reply.body)
        );
        ids.push(reply.json()["job_id"].as_str().expect("an id").to_string());
    }
    let id = ids[0].clone();

    let ops = operations(&doc);
    let mut fresh = 100;
    // Cancelling near the end, so that every other operation sees a queued job; then the
    // retry, which needs a finished one.
    let (ends, others): (Vec<_>, Vec<_>) = ops
        .iter()
        .partition(|op| op.path.ends_with("/cancel") || op.path.ends_with("/retry"));
    let (cancels, retries): (Vec<_>, Vec<_>) = ends
        .into_iter()
        .partition(|op| op.path.ends_with("/cancel"));
    for op in others.into_iter().chain(cancels).chain(retries) {
        let base = uri(&op.path, &id);
        let body = op.op.get("requestBody").map(|_| {
            if op.path != "/v1/jobs" {
                return first_example(&doc, op);
            }
            // A new job each time: the same job_id with the same content is a retry (200).
            let mut job = job_examples(&doc)[0].1.clone();
            job["job_id"] = json!(uuid_like(fresh));
            fresh += 1;
            job
        });
        let reply = app.send(&op.method, &base, true, body.as_ref()).await;
        assert!(
            reply.status.is_success(),
            "{}: answered {}: {}",
            op.name(),
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
        assert_documented(&doc, op, &op.name(), &reply);
        // Each query parameter on its own, with its documented example.
        for parameter in op.query_parameters() {
            let name = parameter["name"].as_str().expect("a name");
            let with = format!("{base}?{name}={}", example_text(parameter));
            let reply = app.send(&op.method, &with, true, None).await;
            assert!(
                reply.status.is_success(),
                "{} with {name}: answered {}: {}",
                op.name(),
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
            assert_documented(&doc, op, &with, &reply);
        }
    }
}

/// The first request body example an operation documents.
fn first_example(doc: &Value, op: &Operation<'_>) -> Value {
    let examples = op.op["requestBody"]["content"]["application/json"]["examples"]
        .as_object()
        .unwrap_or_else(|| panic!("{} documents no request example", op.name()));
    let (_, example) = examples
        .iter()
        .next()
        .unwrap_or_else(|| panic!("{} documents no request example", op.name()));
    resolve(doc, example)["value"].clone()
}

/// A fixed, valid job id for the `n`th extra submission.
fn uuid_like(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

#[tokio::test]
async fn the_documented_need_for_a_token_is_what_the_router_does() {
    let doc = document();
    let app = spawn_app().await;
    for op in operations(&doc) {
        let reply = app
            .send(&op.method, &uri(&op.path, &uuid_like(1)), false, None)
            .await;
        if op.needs_token() {
            assert_eq!(
                reply.status,
                StatusCode::UNAUTHORIZED,
                "{} answers without the token",
                op.name()
            );
            assert_documented(&doc, &op, &format!("{} without a token", op.name()), &reply);
        } else {
            assert_ne!(
                reply.status,
                StatusCode::UNAUTHORIZED,
                "{} wants a token the document does not ask for",
                op.name()
            );
        }
    }
    let schemes = &doc["components"]["securitySchemes"]["bearerAuth"];
    assert_eq!(schemes["type"], "http");
    assert_eq!(schemes["scheme"], "bearer");
}

#[tokio::test]
async fn undocumented_methods_are_refused() {
    let doc = document();
    let app = spawn_app().await;
    let id = uuid_like(1);
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "post", "put", "delete", "patch"] {
            if item.get(method).is_some() {
                continue;
            }
            let reply = app.send(method, &uri(path, &id), true, None).await;
            assert_eq!(
                reply.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{} {path} is served but not documented",
                method.to_uppercase()
            );
        }
    }
}

#[tokio::test]
async fn documented_errors_have_the_documented_shape() {
    let doc = document();
    let app = spawn_app().await;
    let ops = operations(&doc);
    let op = |method: &str, path: &str| {
        ops.iter()
            .find(|op| op.method == method && op.path == path)
            .unwrap_or_else(|| panic!("{method} {path} is documented"))
    };
    let stored = app
        .send("POST", "/v1/jobs", true, Some(&job_examples(&doc)[0].1))
        .await
        .json();
    let id = stored["job_id"].as_str().expect("an id").to_string();
    let missing = uuid_like(7);
    let mut conflicting = stored.clone();
    conflicting["model"] = json!("another/model");

    let cases: Vec<(&Operation<'_>, String, Option<Value>, u16)> = vec![
        (
            op("post", "/v1/jobs"),
            "/v1/jobs".into(),
            Some(json!({})),
            400,
        ),
        (
            op("post", "/v1/jobs"),
            "/v1/jobs".into(),
            Some(
                json!({"type": "TextJob", "model": "m", "dataset": "d", "file_format": "json",
                        "dataset_type": {"reward_functions": [{"reward_func": "f", "reward_weight": -1}]}}),
            ),
            400,
        ),
        (
            op("post", "/v1/jobs"),
            "/v1/jobs".into(),
            Some(conflicting),
            409,
        ),
        (op("post", "/v1/jobs"), "/v1/jobs".into(), None, 415),
        (
            op("post", "/v1/offers"),
            "/v1/offers".into(),
            Some(json!({"type": "TextJob", "model": "m"})),
            400,
        ),
        (op("post", "/v1/offers"), "/v1/offers".into(), None, 415),
        (
            op("get", "/v1/jobs"),
            "/v1/jobs?status=Lost".into(),
            None,
            400,
        ),
        (
            op("get", "/v1/jobs/{id}"),
            "/v1/jobs/not-a-uuid".into(),
            None,
            400,
        ),
        (
            op("get", "/v1/jobs/{id}"),
            format!("/v1/jobs/{missing}"),
            None,
            404,
        ),
        (
            op("get", "/v1/jobs/{id}/logs"),
            format!("/v1/jobs/{id}/logs?tail=1&offset=0"),
            None,
            400,
        ),
        (
            op("get", "/v1/jobs/{id}/logs"),
            format!("/v1/jobs/{missing}/logs"),
            None,
            404,
        ),
        (
            op("post", "/v1/jobs/{id}/cancel"),
            format!("/v1/jobs/{missing}/cancel"),
            None,
            404,
        ),
        (
            op("post", "/v1/jobs/{id}/retry"),
            format!("/v1/jobs/{missing}/retry"),
            None,
            404,
        ),
        (
            op("post", "/v1/jobs/{id}/retry"),
            "/v1/jobs/not-a-uuid/retry".into(),
            None,
            400,
        ),
        // Queued: not finished, so nothing to retry.
        (
            op("post", "/v1/jobs/{id}/retry"),
            format!("/v1/jobs/{id}/retry"),
            None,
            409,
        ),
        (
            op("post", "/v1/jobs/{id}/cancel"),
            format!("/v1/jobs/{id}/cancel"),
            None,
            200,
        ),
        // Cancelled is final: a second cancel is a conflict.
        (
            op("post", "/v1/jobs/{id}/cancel"),
            format!("/v1/jobs/{id}/cancel"),
            None,
            409,
        ),
        // A finished job may start over.
        (
            op("post", "/v1/jobs/{id}/retry"),
            format!("/v1/jobs/{id}/retry"),
            None,
            200,
        ),
    ];
    for (op, target, body, expected) in cases {
        let reply = app.send(&op.method, &target, true, body.as_ref()).await;
        let what = format!("{} {target}", op.method.to_uppercase());
        assert_eq!(
            reply.status.as_u16(),
            expected,
            "{what}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_documented(&doc, op, &what, &reply);
    }

    // Over the body limit.
    let mut huge = job_examples(&doc)[0].1.clone();
    huge["padding"] = json!("x".repeat(1024 * 1024));
    let reply = app.send("POST", "/v1/jobs", true, Some(&huge)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_documented(&doc, op("post", "/v1/jobs"), "an oversized job", &reply);
}
