//! The daemon's HTTP API as the client sees it: one method per call, answers as JSON values,
//! failures as [`ClientError`]s that say what is wrong in one line.
//!
//! The client speaks HTTP, or HTTPS through rustls (no OpenSSL): the server's certificate is
//! checked against the system's CAs and any given with `--ca-cert`. It connects directly,
//! never through `HTTP_PROXY`: the daemon listens on loopback or a private network, or behind
//! a TLS-terminating proxy the URL names.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use super::{ClientError, DEFAULT_SERVER};
use crate::job::{JobId, Status};

/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon may stay silent in the middle of an answer. It answers in
/// milliseconds; a log of any size streams without pause.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The log endpoint's headers: the offset to ask from next, and the job's status.
use crate::api::{
    ESTIMATED_FINISH_HEADER, ESTIMATED_START_HEADER, JOB_STATUS_HEADER, LOG_SIZE_HEADER,
};

/// A daemon's API at one base URL.
pub struct Api {
    client: reqwest::Client,
    /// Ends with `/`, so that `v1/...` joins under any path prefix a reverse proxy adds.
    base: Url,
    /// Sent as `Authorization: Bearer` when set.
    token: Option<String>,
}

/// How a submit was taken.
pub enum Submitted {
    /// 201: stored as a new job.
    Created(Value),
    /// 200: the same job had already been submitted; this is how it stands.
    Existing(Value),
}

/// Which part of a log to ask for.
#[derive(Clone, Copy, Debug)]
pub enum LogPart {
    All,
    Tail(usize),
    From(u64),
}

/// A log answer: the body still to be read, the size to ask from next, the job's status
/// when the log was read.
pub struct LogChunk {
    pub response: reqwest::Response,
    pub next_offset: u64,
    pub status: Status,
}

impl Api {
    /// `server` is `--server` or `TRAINING_WORKER_SERVER`; without it, `listen` (the daemon's
    /// `TRAINING_WORKER_LISTEN`, for a client run beside the daemon) or the default.
    pub fn new(
        server: Option<&str>,
        listen: Option<&str>,
        token: Option<String>,
        ca_cert: Option<&Path>,
    ) -> anyhow::Result<Api> {
        let base = base_url(server, listen)?;
        let mut builder = reqwest::Client::builder();
        if let Some(path) = ca_cert {
            for certificate in ca_certificates(path)? {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("training-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot set up the HTTP client")?;
        Ok(Api {
            client,
            base,
            token,
        })
    }

    /// The server's URL as the user would write it, for messages.
    pub fn server(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    fn url(&self, path: &str) -> Result<Url, ClientError> {
        Ok(self
            .base
            .join(path)
            .with_context(|| format!("cannot form a URL from {} and {path}", self.base))?)
    }

    /// Sends a request and turns a failure to get any answer into a one-line error.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response, ClientError> {
        let url = self.url(path)?;
        let mut request = self.client.request(method, url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        request.send().await.map_err(|e| self.transport_error(&e))
    }

    fn transport_error(&self, e: &reqwest::Error) -> ClientError {
        let cause = root_cause(e);
        if e.is_connect() && cause.contains("certificate") {
            ClientError::Unavailable(format!(
                "cannot connect to the daemon at {}: {cause}; a certificate from a private CA \
                 is trusted with --ca-cert FILE (or TRAINING_WORKER_CA_CERT)",
                self.server()
            ))
        } else if e.is_connect() {
            ClientError::Unavailable(format!(
                "cannot connect to the daemon at {}: {cause}",
                self.server()
            ))
        } else if e.is_timeout() {
            ClientError::Unavailable(format!(
                "the daemon at {} did not answer in time",
                self.server()
            ))
        } else {
            ClientError::Unavailable(format!(
                "no answer from the daemon at {}: {cause}",
                self.server()
            ))
        }
    }

    /// Passes a 2xx on; turns anything else into an error carrying the server's message.
    /// `about` is the job the call is about: a 404 that names it means the job does not
    /// exist (rather than, say, a wrong URL).
    async fn checked(
        &self,
        response: reqwest::Response,
        about: Option<JobId>,
    ) -> Result<reqwest::Response, ClientError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| text.trim().chars().take(200).collect());
        let message = if message.is_empty() {
            status.to_string()
        } else {
            message
        };
        Err(match status {
            StatusCode::NOT_FOUND if about.is_some_and(|id| message.contains(&id.to_string())) => {
                ClientError::NotFound(message)
            }
            StatusCode::CONFLICT => ClientError::Conflict(message),
            StatusCode::UNAUTHORIZED => ClientError::Other(anyhow!(
                "the daemon at {} refused the request ({status}): {message}; \
                 set TRAINING_WORKER_API_TOKEN to its api_token",
                self.server()
            )),
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => ClientError::Unavailable(format!(
                "the daemon at {} is unavailable ({status}): {message}",
                self.server()
            )),
            _ if status.is_client_error() => ClientError::Other(anyhow!("{message} ({status})")),
            _ => ClientError::Other(anyhow!(
                "the daemon at {} answered {status}: {message}",
                self.server()
            )),
        })
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        about: Option<JobId>,
    ) -> Result<Value, ClientError> {
        let response = self.send(method, path, None).await?;
        let response = self.checked(response, about).await?;
        self.parse(response).await
    }

    async fn parse(&self, response: reqwest::Response) -> Result<Value, ClientError> {
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(&e))?;
        Ok(serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the daemon at {} answered with something that is not JSON",
                self.server()
            )
        })?)
    }

    /// `POST /v1/jobs` with `body` as it is: the daemon validates it and names what is wrong.
    pub async fn submit(&self, body: Vec<u8>) -> Result<Submitted, ClientError> {
        let response = self.send(Method::POST, "v1/jobs", Some(body)).await?;
        let response = self.checked(response, None).await?;
        let created = response.status() == StatusCode::CREATED;
        let job = self.parse(response).await?;
        Ok(if created {
            Submitted::Created(job)
        } else {
            Submitted::Existing(job)
        })
    }

    /// `GET /v1/jobs/{id}`.
    pub async fn job(&self, id: JobId) -> Result<Value, ClientError> {
        self.json(Method::GET, &format!("v1/jobs/{id}"), Some(id))
            .await
    }

    /// `GET /v1/jobs/{id}`, with the estimates its headers give added to the job as
    /// `estimated_start` and `estimated_finish` (as the job lists carry them).
    pub async fn job_with_estimates(&self, id: JobId) -> Result<Value, ClientError> {
        let response = self
            .send(Method::GET, &format!("v1/jobs/{id}"), None)
            .await?;
        let response = self.checked(response, Some(id)).await?;
        let header = |name: &str| -> Value {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| *v != "none")
                .map_or(Value::Null, |v| Value::String(v.to_string()))
        };
        let start = header(ESTIMATED_START_HEADER);
        let finish = header(ESTIMATED_FINISH_HEADER);
        let mut job = self.parse(response).await?;
        if let Some(object) = job.as_object_mut() {
            object.insert("estimated_start".into(), start);
            object.insert("estimated_finish".into(), finish);
        }
        Ok(job)
    }

    /// `GET /v1/jobs?status=S&limit=N`, with `estimates=true` when `estimates`.
    pub async fn list(
        &self,
        status: Option<Status>,
        limit: Option<usize>,
        estimates: bool,
    ) -> Result<Value, ClientError> {
        let mut query = Vec::new();
        if estimates {
            query.push("estimates=true".to_string());
        }
        if let Some(status) = status {
            query.push(format!("status={status}"));
        }
        if let Some(limit) = limit {
            query.push(format!("limit={limit}"));
        }
        let path = if query.is_empty() {
            "v1/jobs".to_string()
        } else {
            format!("v1/jobs?{}", query.join("&"))
        };
        self.json(Method::GET, &path, None).await
    }

    /// `GET /v1/queue`.
    pub async fn queue(&self) -> Result<Value, ClientError> {
        self.json(Method::GET, "v1/queue", None).await
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Value, ClientError> {
        self.json(Method::GET, "v1/nodes", None).await
    }

    /// `POST /v1/jobs/{id}/cancel`.
    pub async fn cancel(&self, id: JobId) -> Result<Value, ClientError> {
        self.json(Method::POST, &format!("v1/jobs/{id}/cancel"), Some(id))
            .await
    }

    /// `POST /v1/jobs/{id}/retry`.
    pub async fn retry(&self, id: JobId) -> Result<Value, ClientError> {
        self.json(Method::POST, &format!("v1/jobs/{id}/retry"), Some(id))
            .await
    }

    /// `POST /v1/offers` with `body` as it is: the answer, accepted or not.
    pub async fn offer(&self, body: Vec<u8>) -> Result<Value, ClientError> {
        let response = self.send(Method::POST, "v1/offers", Some(body)).await?;
        let response = self.checked(response, None).await?;
        self.parse(response).await
    }

    /// `GET /v1/jobs/{id}/logs`, with the body left to stream.
    pub async fn logs(&self, id: JobId, part: LogPart) -> Result<LogChunk, ClientError> {
        let path = match part {
            LogPart::All => format!("v1/jobs/{id}/logs"),
            LogPart::Tail(lines) => format!("v1/jobs/{id}/logs?tail={lines}"),
            LogPart::From(offset) => format!("v1/jobs/{id}/logs?offset={offset}"),
        };
        let response = self.send(Method::GET, &path, None).await?;
        let response = self.checked(response, Some(id)).await?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let next_offset = header(LOG_SIZE_HEADER)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("the daemon's log answer lacks a valid {LOG_SIZE_HEADER}"))?;
        let status = header(JOB_STATUS_HEADER)
            .and_then(|v| Status::parse_loose(&v))
            .with_context(|| {
                format!("the daemon's log answer lacks a valid {JOB_STATUS_HEADER}")
            })?;
        Ok(LogChunk {
            response,
            next_offset,
            status,
        })
    }

    /// `GET /healthz` or `GET /readyz`: the status and the body's `status` word.
    pub async fn health(&self, ready: bool) -> Result<(StatusCode, String), ClientError> {
        let path = if ready { "readyz" } else { "healthz" };
        let response = self.send(Method::GET, path, None).await?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let word = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| text.trim().chars().take(200).collect());
        Ok((status, word))
    }

    /// Reads the next piece of a streamed body.
    pub async fn chunk(
        &self,
        response: &mut reqwest::Response,
    ) -> Result<Option<impl AsRef<[u8]> + use<>>, ClientError> {
        response.chunk().await.map_err(|e| self.transport_error(&e))
    }
}

/// The certificates of a PEM file (`--ca-cert`), each to trust as a root.
fn ca_certificates(path: &Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let name = path.display();
    let pem = std::fs::read(path).with_context(|| format!("cannot read the CA file {name}"))?;
    if !pem
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        bail!("the CA file {name} holds no PEM certificate (-----BEGIN CERTIFICATE-----)");
    }
    reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("the CA file {name} is not valid PEM"))
}

/// The innermost error's message: for a refused connection "Connection refused (os error
/// 111)" rather than reqwest's chain of wrappers.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The base URL from `--server` (or its variable), else from the daemon's listen address,
/// else the default. A bare `host:port` means `http://host:port`.
fn base_url(server: Option<&str>, listen: Option<&str>) -> anyhow::Result<Url> {
    let server = server.map(str::trim).filter(|s| !s.is_empty());
    let text = match (server, listen) {
        (Some(server), _) => server.to_string(),
        (None, Some(listen)) => listen_url(listen),
        (None, None) => DEFAULT_SERVER.to_string(),
    };
    let with_scheme = if text.contains("://") {
        text.clone()
    } else {
        format!("http://{text}")
    };
    let mut url = Url::parse(&with_scheme).with_context(|| format!("server {text:?}"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => bail!(
            "server {text:?}: unsupported scheme {other:?}; use http://HOST:PORT or https://HOST:PORT"
        ),
    }
    if url.host_str().is_none_or(str::is_empty) {
        bail!("server {text:?}: no host");
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("server {text:?}: a server URL has no query or fragment");
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// The URL at which a daemon listening on `listen` is reached from the same host: a
/// wildcard address (`0.0.0.0`, `[::]`) is reached on loopback.
fn listen_url(listen: &str) -> String {
    let listen = listen.trim();
    if let Some(port) = listen.strip_prefix("0.0.0.0:") {
        return format!("http://127.0.0.1:{port}");
    }
    if let Some(port) = listen.strip_prefix("[::]:") {
        return format!("http://[::1]:{port}");
    }
    format!("http://{listen}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(server: Option<&str>, listen: Option<&str>) -> String {
        base_url(server, listen).unwrap().to_string()
    }

    #[test]
    fn the_server_comes_from_the_flag_then_the_listen_address_then_the_default() {
        assert_eq!(base(None, None), "http://127.0.0.1:8787/");
        assert_eq!(
            base(Some("http://10.0.0.5:9000"), Some("0.0.0.0:1")),
            "http://10.0.0.5:9000/"
        );
        assert_eq!(base(Some("  "), None), "http://127.0.0.1:8787/");
        assert_eq!(base(None, Some("0.0.0.0:8788")), "http://127.0.0.1:8788/");
        assert_eq!(base(None, Some("[::]:8788")), "http://[::1]:8788/");
        assert_eq!(base(None, Some("127.0.0.2:80")), "http://127.0.0.2/");
    }

    #[test]
    fn a_server_url_may_lack_its_scheme_and_keep_a_path_prefix() {
        assert_eq!(base(Some("box:8787"), None), "http://box:8787/");
        assert_eq!(
            base(Some("http://proxy/training"), None),
            "http://proxy/training/"
        );
        let url = base_url(Some("http://proxy/training"), None).unwrap();
        assert_eq!(
            url.join("v1/jobs").unwrap().as_str(),
            "http://proxy/training/v1/jobs"
        );
    }

    #[test]
    fn https_is_taken_and_other_schemes_are_refused_with_a_reason() {
        assert_eq!(base(Some("https://box:8787"), None), "https://box:8787/");
        let e = base_url(Some("ftp://box"), None).unwrap_err();
        assert!(format!("{e:#}").contains("unsupported scheme"), "{e:#}");
        assert!(base_url(Some("http://box:8787?x=1"), None).is_err());
    }

    #[test]
    fn a_ca_file_that_is_missing_or_not_pem_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = ca_certificates(&missing).unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot read the CA file"),
            "{e:#}"
        );
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let e = ca_certificates(&garbage).unwrap_err();
        assert!(
            format!("{e:#}").contains("holds no PEM certificate"),
            "{e:#}"
        );
    }
}
