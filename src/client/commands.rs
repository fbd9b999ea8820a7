//! What each client command does: its requests, its output, its exit code.
//!
//! `wait` and `logs --follow` poll. Once the daemon has answered them, they ride out an
//! outage (connection refused, 503 while it replays): the job is durable and a restarted
//! daemon replays it, so the wait goes on instead of failing a script halfway.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use chrono::Utc;
use serde_json::Value;

use super::http::{Api, LogPart, Submitted};
use super::render::{self, JobView, Style};
use super::{ClientError, Command, Exit, JobRef};
use crate::job::{JobId, Status};

/// How often `wait` and `logs --follow` ask again.
const POLL: Duration = Duration::from_millis(500);

pub async fn run(api: &Api, style: &Style, command: Command) -> Result<Exit, ClientError> {
    match command {
        Command::Submit { file, format, .. } => submit(api, style, &file, format.json).await,
        Command::Status { id, format, .. } => {
            let id = resolve(api, &id).await?;
            status(api, style, id, format.json).await
        }
        Command::List {
            status,
            limit,
            format,
            ..
        } => list(api, style, status.map(|s| s.status()), limit, format.json).await,
        Command::Queue { format, .. } => queue(api, style, format.json).await,
        Command::Cancel { id, format, .. } => {
            let id = resolve(api, &id).await?;
            cancel(api, style, id, format.json).await
        }
        Command::Retry { id, format, .. } => {
            let id = resolve(api, &id).await?;
            retry(api, style, id, format.json).await
        }
        Command::Logs {
            id, tail, follow, ..
        } => {
            let id = resolve(api, &id).await?;
            if follow {
                follow_logs(api, id, tail).await
            } else {
                logs(api, id, tail).await
            }
        }
        Command::Wait {
            id,
            timeout,
            format,
            ..
        } => {
            let id = resolve(api, &id).await?;
            wait(api, style, id, timeout, format.json).await
        }
        Command::Offer {
            file,
            job_type,
            model,
            hours,
            gpus,
            job_id,
            format,
            ..
        } => {
            let body = match file {
                Some(file) => read_body(&file, "offer")?.1,
                None => {
                    let mut offer = serde_json::Map::new();
                    offer.insert("type".into(), job_type.into());
                    offer.insert("model".into(), model.into());
                    offer.insert("hours_to_complete".into(), hours.into());
                    if let Some(gpus) = gpus {
                        offer.insert("gpu_count".into(), gpus.into());
                    }
                    if let Some(job_id) = job_id {
                        offer.insert("job_id".into(), job_id.into());
                    }
                    serde_json::to_vec(&offer).context("cannot form the offer")?
                }
            };
            offer(api, body, format.json).await
        }
        Command::Nodes { format, .. } => nodes(api, style, format.json).await,
        Command::Health { ready, .. } => health(api, ready).await,
    }
}

/// The job `job` names: the id as given, or the one job whose id starts with the prefix.
async fn resolve(api: &Api, job: &JobRef) -> Result<JobId, ClientError> {
    let prefix = match job {
        JobRef::Id(id) => return Ok(*id),
        JobRef::Prefix(prefix) => prefix,
    };
    let all = api.list(None, None, false).await?;
    let matching: Vec<JobId> = all
        .as_array()
        .context("the daemon answered a job list that is not a JSON array")?
        .iter()
        .filter_map(|job| job.get("job_id")?.as_str())
        .filter(|id| id.starts_with(prefix.as_str()))
        .filter_map(|id| id.parse().ok())
        .collect();
    match matching[..] {
        [id] => Ok(id),
        [] => Err(ClientError::NotFound(format!(
            "no job's id starts with {prefix}"
        ))),
        _ => Err(ClientError::Other(anyhow!(
            "{prefix} is ambiguous: the ids of {} jobs start with it; give more of the id",
            matching.len()
        ))),
    }
}

/// Writes to stdout at once; a closed pipe ends the command quietly.
fn emit(text: &str) -> Result<(), ClientError> {
    emit_bytes(text.as_bytes())
}

fn emit_bytes(bytes: &[u8]) -> Result<(), ClientError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => ClientError::StdoutClosed,
            _ => ClientError::Other(anyhow!("cannot write to stdout: {e}")),
        })
}

fn emit_json(value: &Value) -> Result<(), ClientError> {
    let text = serde_json::to_string_pretty(value).context("cannot print the answer as JSON")?;
    emit(&format!("{text}\n"))
}

/// The bytes of `file`, or of stdin for `-`, and the name to give them in messages.
fn read_body(file: &Path, what: &str) -> Result<(String, Vec<u8>), ClientError> {
    if file == Path::new("-") {
        let mut body = Vec::new();
        std::io::stdin()
            .read_to_end(&mut body)
            .with_context(|| format!("cannot read the {what} from stdin"))?;
        return Ok(("stdin".to_string(), body));
    }
    let name = file.display().to_string();
    let body = std::fs::read(file).with_context(|| format!("cannot read {name}"))?;
    Ok((name, body))
}

async fn submit(api: &Api, style: &Style, file: &Path, json: bool) -> Result<Exit, ClientError> {
    let (name, body) = read_body(file, "job")?;
    let submitted = api.submit(body).await.map_err(|e| match e {
        ClientError::Conflict(msg) => ClientError::Conflict(format!("{name}: {msg}")),
        ClientError::Other(e) => ClientError::Other(e.context(format!("cannot submit {name}"))),
        other => other,
    })?;
    let (job, verb) = match &submitted {
        Submitted::Created(job) => (job, "submitted"),
        Submitted::Existing(job) => (job, "already submitted"),
    };
    if json {
        emit_json(job)?;
    } else {
        let view = JobView::from_json(job);
        if style.tty {
            let status = render::paint(&view.status_text, view.status(), style.color);
            emit(&format!(
                "{verb} {}: {status} ({}, {})\n",
                view.id, view.kind, view.model
            ))?;
        } else {
            emit(&format!("{}\n", view.id))?;
        }
    }
    Ok(Exit::Success)
}

async fn status(api: &Api, style: &Style, id: JobId, json: bool) -> Result<Exit, ClientError> {
    if json {
        emit_json(&api.job(id).await?)?;
    } else {
        let job = api.job_with_estimates(id).await?;
        emit(&render::job_block(
            &JobView::from_json(&job),
            Utc::now(),
            style,
        ))?;
    }
    Ok(Exit::Success)
}

fn jobs_of(list: &Value) -> Result<Vec<JobView>, ClientError> {
    let jobs = list
        .as_array()
        .context("the daemon answered a job list that is not a JSON array")?;
    Ok(jobs.iter().map(JobView::from_json).collect())
}

async fn list(
    api: &Api,
    style: &Style,
    status: Option<Status>,
    limit: Option<usize>,
    json: bool,
) -> Result<Exit, ClientError> {
    let answer = api.list(status, limit, false).await?;
    if json {
        emit_json(&answer)?;
        return Ok(Exit::Success);
    }
    let jobs = jobs_of(&answer)?;
    if jobs.is_empty() {
        match status {
            Some(status) => emit(&format!("no {status} jobs\n"))?,
            None => emit("no jobs\n")?,
        }
    } else {
        emit(&render::job_table(&jobs, Utc::now(), style))?;
    }
    Ok(Exit::Success)
}

async fn queue(api: &Api, style: &Style, json: bool) -> Result<Exit, ClientError> {
    if json {
        emit_json(&api.queue().await?)?;
        return Ok(Exit::Success);
    }
    // Queued first: a job that starts between the two calls then shows in both lists
    // (and is kept as running) rather than in neither.
    let queued = jobs_of(&api.list(Some(Status::Queued), None, true).await?)?;
    let mut running = jobs_of(&api.list(Some(Status::Running), None, true).await?)?;
    running.sort_by_key(|job| job.started_at);
    let queued: Vec<JobView> = queued
        .into_iter()
        .filter(|q| running.iter().all(|r| r.id != q.id))
        .collect();
    if running.is_empty() && queued.is_empty() {
        emit("the queue is empty\n")?;
    } else {
        emit(&render::queue_table(&running, &queued, Utc::now(), style))?;
    }
    // Asked last: the reasons are about the queue as it is now.
    let view = api.queue().await?;
    emit(&render::wait_reasons(&view, WAIT_REASONS_SHOWN))?;
    Ok(Exit::Success)
}

async fn nodes(api: &Api, style: &Style, json: bool) -> Result<Exit, ClientError> {
    let answer = api.nodes().await?;
    if json {
        emit_json(&answer)?;
        return Ok(Exit::Success);
    }
    let nodes = answer
        .get("nodes")
        .and_then(Value::as_array)
        .context("the daemon answered a node list without a JSON array of nodes")?;
    if nodes.is_empty() {
        emit("no nodes\n")?;
    } else {
        emit(&render::node_table(nodes, Utc::now(), style))?;
    }
    Ok(Exit::Success)
}

/// How many queued jobs `queue` says the reason for; the others wait behind them.
const WAIT_REASONS_SHOWN: usize = 10;

async fn cancel(api: &Api, style: &Style, id: JobId, json: bool) -> Result<Exit, ClientError> {
    let job = api.cancel(id).await?;
    print_changed(style, &job, json)
}

async fn retry(api: &Api, style: &Style, id: JobId, json: bool) -> Result<Exit, ClientError> {
    let job = api.retry(id).await?;
    print_changed(style, &job, json)
}

/// A job a command has just changed: its id and new status, or the API's JSON.
fn print_changed(style: &Style, job: &Value, json: bool) -> Result<Exit, ClientError> {
    if json {
        emit_json(job)?;
    } else {
        let view = JobView::from_json(job);
        let status = render::paint(&view.status_text, view.status(), style.color);
        emit(&format!("{} {status}\n", view.id))?;
    }
    Ok(Exit::Success)
}

/// Streams a log answer's body to stdout; `written` counts what got there, so that an
/// answer cut short is asked for again from where it stopped.
async fn copy_body(
    api: &Api,
    response: &mut reqwest::Response,
    written: &mut u64,
) -> Result<(), ClientError> {
    while let Some(chunk) = api.chunk(response).await? {
        let bytes = chunk.as_ref();
        emit_bytes(bytes)?;
        *written += bytes.len() as u64;
    }
    Ok(())
}

async fn logs(api: &Api, id: JobId, tail: Option<usize>) -> Result<Exit, ClientError> {
    let part = tail.map_or(LogPart::All, LogPart::Tail);
    let mut log = api.logs(id, part).await?;
    copy_body(api, &mut log.response, &mut 0).await?;
    Ok(Exit::Success)
}

/// Warns once per outage while `wait` or `logs --follow` rides it out.
#[derive(Default)]
struct Outage {
    warned: bool,
}

impl Outage {
    fn note(&mut self, message: &str) {
        if !self.warned {
            self.warned = true;
            eprintln!(
                "warning: {}; retrying until it answers",
                super::one_line(message)
            );
        }
    }

    fn over(&mut self) {
        self.warned = false;
    }
}

async fn follow_logs(api: &Api, id: JobId, tail: Option<usize>) -> Result<Exit, ClientError> {
    let mut part = tail.map_or(LogPart::From(0), LogPart::Tail);
    let mut answered = false;
    let mut outage = Outage::default();
    loop {
        let mut log = match api.logs(id, part).await {
            Ok(log) => log,
            Err(ClientError::Unavailable(message)) if answered => {
                outage.note(&message);
                tokio::time::sleep(POLL).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        answered = true;
        outage.over();
        let mut written = 0;
        match copy_body(api, &mut log.response, &mut written).await {
            Ok(()) => part = LogPart::From(log.next_offset),
            Err(ClientError::Unavailable(message)) => {
                // Cut short: ask again from the last byte printed. A cut tail has no known
                // start, so it is asked for again only if nothing of it was printed.
                part = match part {
                    LogPart::From(offset) => LogPart::From(offset + written),
                    _ if written == 0 => part,
                    _ => return Err(ClientError::Unavailable(message)),
                };
                outage.note(&message);
                tokio::time::sleep(POLL).await;
                continue;
            }
            Err(e) => return Err(e),
        }
        // The status was read before the log's size, so a final status means the
        // trainer's output was complete when this answer was cut off at that size.
        if log.status.is_finished() {
            return Ok(Exit::of_final(log.status));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn wait(
    api: &Api,
    style: &Style,
    id: JobId,
    timeout: Option<Duration>,
    json: bool,
) -> Result<Exit, ClientError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut job = api.job(id).await?;
    let mut outage = Outage::default();
    loop {
        let view = JobView::from_json(&job);
        let status = view
            .status()
            .with_context(|| format!("job {id} has an unknown status {:?}", view.status_text))?;
        if status.is_finished() {
            if json {
                emit_json(&job)?;
            } else {
                emit(&ended(&view, style))?;
            }
            return Ok(Exit::of_final(status));
        }
        let mut pause = POLL;
        if let (Some(deadline), Some(timeout)) = (deadline, timeout) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::TimedOut(format!(
                    "job {id} is still {status} after {}",
                    render::span(timeout)
                )));
            }
            pause = pause.min(left);
        }
        tokio::time::sleep(pause).await;
        match api.job(id).await {
            Ok(now) => {
                outage.over();
                job = now;
            }
            Err(ClientError::Unavailable(message)) => outage.note(&message),
            Err(e) => return Err(e),
        }
    }
}

/// `<id> Completed after 3m 05s`, or `<id> Failed after 12s: <error message>`.
fn ended(view: &JobView, style: &Style) -> String {
    let mut line = format!(
        "{} {}",
        view.id,
        render::paint(&view.status_text, view.status(), style.color)
    );
    if let (Some(started), Some(finished)) = (view.started_at, view.finished_at) {
        line.push_str(&format!(" after {}", render::duration(finished - started)));
    }
    if let Some(error) = &view.error {
        line.push_str(&format!(": {}", super::one_line(error)));
    }
    line.push('\n');
    line
}

/// Sends an offer; exit 0 when it is accepted, [`Exit::Declined`] when not.
async fn offer(api: &Api, body: Vec<u8>, json: bool) -> Result<Exit, ClientError> {
    let answer = api.offer(body).await.map_err(|e| match e {
        ClientError::Other(e) => ClientError::Other(e.context("cannot send the offer")),
        other => other,
    })?;
    let accepted = answer
        .get("accepted")
        .and_then(Value::as_bool)
        .context("the daemon's answer to the offer lacks `accepted`")?;
    if json {
        emit_json(&answer)?;
    } else {
        emit(&render::offer_block(&answer, Utc::now()))?;
    }
    Ok(if accepted {
        Exit::Success
    } else {
        Exit::Declined
    })
}

async fn health(api: &Api, ready: bool) -> Result<Exit, ClientError> {
    let (status, word) = api.health(ready).await?;
    let path = if ready { "/readyz" } else { "/healthz" };
    if status != reqwest::StatusCode::OK {
        return Err(ClientError::Other(anyhow!(
            "{path}: the daemon at {} answered {status}: {word}",
            api.server()
        )));
    }
    let word = if word.is_empty() { "ok".into() } else { word };
    emit(&format!("{word}\n"))?;
    Ok(Exit::Success)
}
