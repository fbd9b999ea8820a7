//! The dashboard's pages, drawn with maud. Each page is a fixed part (filters, the log)
//! and a live region the script replaces when the worker says something changed.

use axum::http::StatusCode;
use chrono::Utc;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde_json::Value;

use super::chart::{self, Hourly};
use super::{CSRF_FIELD, HistoryParams, Ui, UiError, human, moment, short_id};
use crate::api::{LogParams, read_rotated_log};
use crate::job::{Job, JobId, Status, format_timestamp};

/// Which tab of the navigation is the current page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Nav {
    Overview,
    Queue,
    History,
    None,
}

/// Lines of a job's log shown when its page opens; the rest follows live.
const LOG_TAIL_LINES: usize = 400;
/// Finished jobs per page of the history.
pub(super) const HISTORY_PAGE: usize = 50;
/// Queued jobs listed on the queue page, from the head of the queue.
const QUEUE_SHOWN: usize = 200;
/// Hours the overview's charts cover.
const CHART_HOURS: usize = 24;

/// The whole document around a page's parts.
pub(super) fn layout(
    title: &str,
    nav: Nav,
    signed_in: bool,
    csrf: &str,
    fixed: Markup,
    live: &str,
    fixed_first: bool,
) -> Markup {
    let tab = |target: Nav, href: &str, label: &str| {
        html! {
            @if nav == target {
                a href=(href) aria-current="page" { (label) }
            } @else {
                a href=(href) { (label) }
            }
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · training-worker" }
                link rel="stylesheet" href="/ui/assets/ui.css";
                script src="/ui/assets/ui.js" defer {}
            }
            body data-csrf=(csrf) {
                a class="skip" href="#main" { "Skip to content" }
                header {
                    span class="brand" { "training-worker" }
                    nav aria-label="Pages" {
                        (tab(Nav::Overview, "/ui", "Overview"))
                        (tab(Nav::Queue, "/ui/queue", "Queue"))
                        (tab(Nav::History, "/ui/history", "History"))
                    }
                    @if signed_in {
                        form method="post" action="/ui/logout" class="logout" {
                            input type="hidden" name=(CSRF_FIELD) value=(csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                    span class="live-state" id="live-state" role="status" aria-live="polite" {}
                }
                main id="main" {
                    h1 { (title) }
                    @if fixed_first { (fixed) }
                    // Pages without a live part (sign in, errors) are not refreshed.
                    @if !live.is_empty() {
                        div id="live" data-live="" { (PreEscaped(live)) }
                    }
                    @if !fixed_first { (fixed) }
                }
            }
        }
    }
}

/// A page that says what went wrong, with the status.
pub(super) fn error_page(status: StatusCode, message: &str) -> Markup {
    let title = status.canonical_reason().unwrap_or("Error");
    let body = html! {
        p class="error" role="alert" { (message) }
        p { a href="/ui" { "Back to the overview" } }
    };
    layout(title, Nav::None, false, "", body, "", true)
}

/// The form that asks for the API token once.
pub(super) fn login(csrf: &str, problem: Option<&str>) -> Markup {
    let body = html! {
        @if let Some(problem) = problem {
            p class="error" role="alert" { (problem) }
        }
        form method="post" action="/ui/login" class="login" {
            input type="hidden" name=(CSRF_FIELD) value=(csrf);
            label for="token" { "API token (" code { "api_token" } " in the daemon's config)" }
            input id="token" name="token" type="password" autocomplete="current-password" required autofocus;
            button type="submit" { "Sign in" }
        }
    };
    layout("Sign in", Nav::None, false, csrf, body, "", true)
}

fn status_badge(status: Status) -> Markup {
    html! { span class=(format!("badge {}", status.as_str().to_ascii_lowercase())) { (status.as_str()) } }
}

fn job_link(id: &JobId) -> Markup {
    html! { a href=(format!("/ui/jobs/{id}")) class="mono" title=(id.to_string()) { (short_id(id)) } }
}

fn gpus_text(ids: Option<&Vec<u32>>) -> String {
    match ids {
        Some(ids) if !ids.is_empty() => ids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        _ => "—".into(),
    }
}

/// Counts, charts, GPUs, the daemon itself, and the jobs on a second or later start.
pub(super) async fn overview(ui: &Ui) -> Result<(Markup, Markup), UiError> {
    let worker = ui.worker()?;
    let gpus = worker.gpus().await?;
    let estimates = worker.estimates(None).await?;
    let queue = worker.queue().await?;
    let now = Utc::now();
    // One pass over the jobs inside the worker; only the few restarted ones are copied.
    let (counts, hourly, restarted) = worker
        .read_jobs(move |jobs| {
            let mut counts = [0usize; 5];
            let mut finished = Vec::new();
            let mut restarted = Vec::new();
            for job in jobs {
                counts[Status::ALL
                    .iter()
                    .position(|s| *s == job.status)
                    .unwrap_or(0)] += 1;
                if job
                    .finished_at
                    .is_some_and(|t| (now - t).num_hours() < CHART_HOURS as i64)
                {
                    finished.push(job);
                }
                if !job.status.is_finished() && job.attempts > 1 && restarted.len() < 20 {
                    restarted.push(job.clone());
                }
            }
            (counts, Hourly::of(finished, now, CHART_HOURS), restarted)
        })
        .await?;
    // The next slot frees when the first running job is expected to end at the latest.
    let next_free = queue
        .running
        .iter()
        .filter_map(|id| estimates.get(id).and_then(|e| e.finish))
        .min();
    let uptime = ui.started.elapsed().as_secs() as i64;
    let live = html! {
        section aria-labelledby="counts-h" {
            h2 id="counts-h" { "Jobs by status" }
            ul class="counts" {
                @for (i, status) in Status::ALL.iter().enumerate() {
                    li {
                        a href=(status_href(*status)) {
                            span class="count" { (counts[i]) }
                            (status_badge(*status))
                        }
                    }
                }
            }
            @if let Some(paused) = &queue.paused {
                p class="error" role="alert" { "Starts are paused: " (paused) }
            }
        }
        div class="charts" {
            section aria-labelledby="tp-h" {
                h2 id="tp-h" { "Finished per hour" }
                (chart::throughput(&hourly))
                p class="legend" { span class="key ok" {} "completed " span class="key bad" {} "failed" }
            }
            section aria-labelledby="fr-h" {
                h2 id="fr-h" { "Failure rate per hour" }
                (chart::failure_rate(&hourly))
            }
        }
        section aria-labelledby="gpus-h" {
            h2 id="gpus-h" { "GPUs" }
            @if gpus.is_empty() {
                p { "No GPUs are configured (" code { "[worker] gpus" } "): jobs run without GPU accounting." }
            } @else {
                div class="scroll" { table {
                    thead { tr { th scope="col" { "GPU" } th scope="col" { "Model" } th scope="col" { "Memory" } th scope="col" { "Held by" } } }
                    tbody {
                        @for gpu in &gpus {
                            tr {
                                td { (gpu.id) }
                                td { (gpu.gpu.as_ref().map_or("unknown".to_string(), |g| g.name.clone())) }
                                td { (gpu.gpu.as_ref().filter(|g| g.memory_mib > 0).map_or("—".to_string(), |g| format!("{} MiB", g.memory_mib))) }
                                td {
                                    @if let Some(id) = gpu.job { (job_link(&id)) }
                                    @else if gpu.reserved { "reserved for an accepted offer" }
                                    @else { "free" }
                                }
                            }
                        }
                    }
                } }
            }
            p {
                "Next slot expected free: "
                @match next_free {
                    Some(at) if !queue.running.is_empty() => { strong { (moment(&at)) " UTC" } " (in " (human((at - now).num_seconds())) ", at the latest)" }
                    _ => { "now or unknown (no running job with an expected end)" }
                }
            }
        }
        section aria-labelledby="daemon-h" {
            h2 id="daemon-h" { "Daemon" }
            dl class="fields" {
                dt { "Version" } dd { (env!("CARGO_PKG_VERSION")) }
                dt { "Data dir" } dd class="mono" { (ui.app.data_dir.as_ref().map_or("unknown".to_string(), |d| d.display().to_string())) }
                dt { "Up for" } dd { (human(uptime)) }
            }
        }
        section aria-labelledby="boot-h" {
            h2 id="boot-h" { "Recoveries at the last start" }
            @match ui.app.boot.get() {
                None => { p { "Not known here (the daemon did not report its start)." } }
                Some((report, quarantined, at)) => {
                    p { "Started " (moment(at)) " UTC (" (human((now - *at).num_seconds())) " ago) on " (report.loaded) " jobs." }
                    ul {
                        li { (report.interrupted) " were running when the daemon stopped: " (report.interrupted.saturating_sub(report.failed_attempts)) " requeued to run first, " (report.failed_attempts) " failed out of attempts" }
                        li { (report.adopted) " containers still running were adopted" }
                        @if report.awaiting_survey > 0 { li { (report.awaiting_survey) " held on their GPUs until docker answered" } }
                        @if *quarantined > 0 { li class="error" { (quarantined) " unreadable files quarantined (see " code { "quarantine/" } " in the data dir)" } }
                    }
                }
            }
        }
        section aria-labelledby="restarted-h" {
            h2 id="restarted-h" { "Unfinished jobs on a later attempt" }
            @if restarted.is_empty() {
                p { "None: every unfinished job is on its first start." }
            } @else {
                p { "Jobs whose earlier start was cut short (a crash, a restart, or a trainer that failed) and that run again." }
                div class="scroll" { table {
                    thead { tr { th scope="col" { "Job" } th scope="col" { "Status" } th scope="col" { "Attempt" } th scope="col" { "Last change" } } }
                    tbody { @for job in &restarted { tr {
                        td { (job_link(&job.id)) } td { (status_badge(job.status)) } td { (job.attempts) }
                        td { (job.updated_at.as_ref().map_or("—".into(), moment)) }
                    } } }
                } }
            }
        }
    };
    Ok((html! {}, live))
}

fn status_href(status: Status) -> String {
    match status {
        Status::Queued | Status::Running => "/ui/queue".into(),
        s => format!("/ui/history?status={}", s.as_str()),
    }
}

/// The running jobs, then the queued ones in start order.
pub(super) async fn queue(ui: &Ui) -> Result<(Markup, Markup), UiError> {
    let worker = ui.worker()?;
    let view = worker.queue().await?;
    let estimates = worker.estimates(None).await?;
    let gpus = worker.gpus().await?;
    let now = Utc::now();
    let running = worker.list(Some(Status::Running), None).await?;
    // A long queue is shown from its head; the rest only counted.
    let queued = worker.list(Some(Status::Queued), Some(QUEUE_SHOWN)).await?;
    let more = view.queued.len().saturating_sub(queued.len());
    let waiting: std::collections::HashMap<JobId, &String> =
        view.waiting.iter().map(|(id, why)| (*id, why)).collect();
    let reserved: Vec<u32> = gpus.iter().filter(|g| g.reserved).map(|g| g.id).collect();
    let live = html! {
        @if let Some(paused) = &view.paused {
            p class="error" role="alert" { "Starts are paused: " (paused) }
        }
        section aria-labelledby="running-h" {
            h2 id="running-h" { "Running (" (running.len()) ")" }
            @if running.is_empty() { p { "No job is running." } } @else {
                div class="scroll" { table id="running" {
                    thead { tr {
                        th scope="col" { "Job" } th scope="col" { "Model" } th scope="col" { "Stage" }
                        th scope="col" { "Elapsed" } th scope="col" { "Attempt" } th scope="col" { "GPUs" } th scope="col" { "Ends by" }
                    } }
                    tbody { @for job in &running { tr data-job=(job.id.to_string()) {
                        td { (job_link(&job.id)) }
                        td class="wrap" { (job.model) }
                        td { (stage_text(job)) }
                        td { (job.started_at.map_or("—".into(), |t| human((now - t).num_seconds()))) }
                        td { (job.attempts) }
                        td { (gpus_text(job.gpu_ids.as_ref())) }
                        td { (estimates.get(&job.id).and_then(|e| e.finish).as_ref().map_or("—".into(), moment)) }
                    } } }
                } }
            }
        }
        section aria-labelledby="queued-h" {
            h2 id="queued-h" { "Queued (" (view.queued.len()) "), in start order" }
            @if queued.is_empty() { p { "The queue is empty." } } @else {
                div class="scroll" { table id="queued" {
                    thead { tr {
                        th scope="col" { "#" } th scope="col" { "Job" } th scope="col" { "Model" } th scope="col" { "GPUs" }
                        th scope="col" { "Expected start" } th scope="col" { "Deadline" } th scope="col" { "Waiting because" }
                    } }
                    tbody { @for (i, job) in queued.iter().enumerate() { tr data-job=(job.id.to_string()) {
                        td { (i + 1) }
                        td { (job_link(&job.id)) }
                        td class="wrap" { (job.model) }
                        td { (job.gpu_count.map_or("—".into(), |n| n.to_string())) }
                        td { (estimates.get(&job.id).and_then(|e| e.start).as_ref().map_or("not expected".into(), moment)) }
                        td { (job.deadline.as_ref().map_or("—".into(), moment)) }
                        td class="wrap" { (waiting.get(&job.id).map_or("", |w| w.as_str())) }
                    } } }
                } }
                @if more > 0 { p class="note" { "And " (more) " more after these." } }
            }
        }
        section aria-labelledby="offers-h" {
            h2 id="offers-h" { "Reserved for offers" }
            @if reserved.is_empty() { p { "No GPU is held for an accepted offer." } }
            @else { p { "GPUs held for accepted offers whose jobs have not come yet: " (gpus_text(Some(&reserved))) } }
        }
    };
    Ok((html! {}, live))
}

/// A running job's stage as the job knows it: the last one started or done.
fn stage_text(job: &Job) -> String {
    let started = job.stages_started.last().map(|(s, _)| s.as_str());
    match (job.stages_done.last(), started) {
        (_, Some(s)) if !job.stages_done.iter().any(|d| d == s) => s.to_string(),
        (Some(done), _) => format!("after {done}"),
        _ => "—".into(),
    }
}

/// The filter form of the history; outside the live region, so typing is never replaced.
pub(super) fn history_filters(p: &HistoryParams) -> Markup {
    let option = |value: &str, label: &str, current: &str| {
        html! { @if value == current { option value=(value) selected { (label) } } @else { option value=(value) { (label) } } }
    };
    html! {
        form method="get" action="/ui/history" class="filters" role="search" {
            div { label for="q" { "Id starts with" } input id="q" name="q" value=(p.q) autocomplete="off" spellcheck="false"; }
            div { label for="status" { "Status" }
                select id="status" name="status" {
                    (option("", "Any finished", &p.status))
                    @for s in [Status::Completed, Status::Failed, Status::Cancelled] { (option(s.as_str(), s.as_str(), &p.status)) }
                }
            }
            div { label for="type" { "Type" }
                select id="type" name="type" {
                    (option("", "Any", &p.kind)) (option("TextJob", "TextJob", &p.kind)) (option("DiffusionJob", "DiffusionJob", &p.kind))
                }
            }
            div { label for="model" { "Model contains" } input id="model" name="model" value=(p.model) autocomplete="off"; }
            div { label for="within" { "Finished within" }
                select id="within" name="within" {
                    (option("", "Any time", &p.within)) (option("1", "1 hour", &p.within)) (option("24", "24 hours", &p.within))
                    (option("168", "7 days", &p.within)) (option("720", "30 days", &p.within))
                }
            }
            button type="submit" { "Filter" }
        }
    }
}

/// Whether a finished job passes the history's filters.
pub(super) fn matches(job: &Job, p: &HistoryParams, since: Option<crate::job::Timestamp>) -> bool {
    if !job.status.is_finished() {
        return false;
    }
    if !p.status.is_empty() && !job.status.as_str().eq_ignore_ascii_case(&p.status) {
        return false;
    }
    if !p.kind.is_empty() && job.kind.type_name() != p.kind {
        return false;
    }
    if !p.model.is_empty()
        && !job
            .model
            .to_ascii_lowercase()
            .contains(&p.model.to_ascii_lowercase())
    {
        return false;
    }
    if let Some(since) = since
        && job.finished_at.is_none_or(|t| t < since)
    {
        return false;
    }
    let q = p.q.trim().to_ascii_lowercase();
    q.is_empty() || job.id.to_string().starts_with(&q)
}

/// One page of the finished jobs that pass the filters, newest first: filtered inside the
/// worker in one pass, and only the page's jobs copied out.
pub(super) async fn history(ui: &Ui, p: &HistoryParams) -> Result<Markup, UiError> {
    let since = p
        .within
        .parse::<i64>()
        .ok()
        .map(|h| Utc::now() - chrono::Duration::hours(h));
    let skip = p.page.saturating_mul(HISTORY_PAGE);
    let filter = p.clone();
    let (total, page) = ui
        .worker()?
        .read_jobs(move |jobs| page_of(jobs, &filter, since, skip, HISTORY_PAGE))
        .await?;
    let link = |to: usize| {
        let query = serde_urlencoded_pairs(&[
            ("q", p.q.as_str()),
            ("status", p.status.as_str()),
            ("type", p.kind.as_str()),
            ("model", p.model.as_str()),
            ("within", p.within.as_str()),
            ("page", &to.to_string()),
        ]);
        format!("/ui/history?{query}")
    };
    let pages = total.div_ceil(HISTORY_PAGE).max(1);
    Ok(html! {
        p { (total) " finished jobs match, newest first. Page " (p.page + 1) " of " (pages) "." }
        div class="scroll" { table id="history" {
            thead { tr {
                th scope="col" { "Job" } th scope="col" { "Status" } th scope="col" { "Type" } th scope="col" { "Model" }
                th scope="col" { "Finished" } th scope="col" { "Took" } th scope="col" { "Attempts" }
            } }
            tbody { @for job in &page { tr data-job=(job.id.to_string()) {
                td { (job_link(&job.id)) }
                td { (status_badge(job.status)) }
                td { (job.kind.type_name()) }
                td class="wrap" { (job.model) }
                td { (job.finished_at.as_ref().map_or("—".into(), moment)) }
                td { @match (job.started_at, job.finished_at) { (Some(s), Some(f)) => (human((f - s).num_seconds())), _ => "—" } }
                td { (job.attempts) }
            } } }
        } }
        nav class="pager" aria-label="Pages of the history" {
            @if p.page > 0 { a href=(link(p.page - 1)) rel="prev" { "← Newer" } }
            @if skip + HISTORY_PAGE < total { a href=(link(p.page + 1)) rel="next" { "Older →" } }
        }
    })
}

/// The jobs that pass the filters, newest first (by creation, then id, as the API lists
/// them): how many, and copies of those from `skip` to `skip + take`. The newest ones are
/// selected before they are sorted, so a page costs one pass and a partial sort.
pub(super) fn page_of(
    jobs: &mut dyn Iterator<Item = &Job>,
    p: &HistoryParams,
    since: Option<crate::job::Timestamp>,
    skip: usize,
    take: usize,
) -> (usize, Vec<Job>) {
    let mut matching: Vec<&Job> = jobs.filter(|j| matches(j, p, since)).collect();
    let total = matching.len();
    let end = skip.saturating_add(take).min(total);
    if skip >= end {
        return (total, Vec::new());
    }
    let newest_first = |a: &&Job, b: &&Job| (b.created_at, b.id).cmp(&(a.created_at, a.id));
    if end < total {
        matching.select_nth_unstable_by(end - 1, newest_first);
        matching.truncate(end);
    }
    matching.sort_unstable_by(newest_first);
    (
        total,
        matching[skip..end].iter().map(|j| (*j).clone()).collect(),
    )
}

/// `key=value&...`, each part percent-encoded.
fn serde_urlencoded_pairs(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", percent(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A job's fields, timeline, stages and actions: the live region of its page.
pub(super) async fn job(ui: &Ui, id: JobId, csrf: &str) -> Result<Markup, UiError> {
    let worker = ui.worker()?;
    let Some(job) = worker.job(id).await? else {
        return Err(UiError::new(StatusCode::NOT_FOUND, format!("no job {id}")));
    };
    let estimate = if job.status.is_finished() {
        None
    } else {
        worker.estimates(Some(id)).await?.remove(&id)
    };
    let mut timeline: Vec<(crate::job::Timestamp, String)> = Vec::new();
    if let Some(t) = job.created_at {
        timeline.push((t, "created (queued)".into()));
    }
    if let Some(t) = job.started_at {
        timeline.push((t, format!("started (attempt {})", job.attempts)));
    }
    for (stage, t) in &job.stages_started {
        timeline.push((*t, format!("stage {stage} first started")));
    }
    if let Some(t) = job.finished_at {
        timeline.push((t, job.status.as_str().to_lowercase()));
    }
    timeline.sort_by_key(|(t, _)| *t);
    let value = job.to_json();
    Ok(html! {
        p { (status_badge(job.status)) " " span class="mono" { (job.id) } }
        @if let Some(message) = &job.error_message { p class="error" { (message) } }
        @if let Some(e) = estimate {
            p {
                @if let (Status::Queued, Some(start)) = (job.status, e.start) { "Expected to start " (moment(&start)) " UTC. " }
                @if let Some(finish) = e.finish { "Expected to end by " (moment(&finish)) " UTC." }
            }
        }
        (actions(&job, csrf))
        div class="two" {
            section aria-labelledby="timeline-h" {
                h2 id="timeline-h" { "Timeline" }
                ol class="timeline" {
                    @for (t, what) in &timeline { li { time datetime=(format_timestamp(t)) { (moment(t)) } " " (what) } }
                    @if let Some(t) = job.updated_at { li { time datetime=(format_timestamp(&t)) { (moment(&t)) } " last change recorded" } }
                }
                p class="note" { "Attempts so far: " (job.attempts) "." }
                h2 { "Stages" }
                @if job.stages_done.is_empty() && job.stages_started.is_empty() { p { "No stage recorded." } }
                @else { ul { @for s in &job.stages_done { li { (s) " — done" } } } }
            }
            section aria-labelledby="fields-h" {
                h2 id="fields-h" { "Fields" }
                dl class="fields" {
                    @if let Value::Object(map) = &value {
                        @for (key, v) in map {
                            dt { (key) }
                            dd class="mono" { (field_text(v)) }
                        }
                    }
                }
            }
        }
    })
}

fn field_text(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::String(s) => s.clone(),
        Value::Array(_) | Value::Object(_) => serde_json::to_string_pretty(v).unwrap_or_default(),
        other => other.to_string(),
    }
}

/// Cancel (unfinished) or retry (finished), each behind a confirmation that needs no script.
fn actions(job: &Job, csrf: &str) -> Markup {
    let (verb, path, explain) = if job.status.is_finished() {
        (
            "Retry",
            "retry",
            "It goes to the end of the queue for a fresh run.",
        )
    } else {
        ("Cancel", "cancel", "A running trainer is stopped.")
    };
    html! {
        details class="action" {
            summary { (verb) " this job…" }
            form method="post" action=(format!("/ui/jobs/{}/{path}", job.id)) {
                input type="hidden" name=(CSRF_FIELD) value=(csrf);
                p { (explain) }
                button type="submit" class=(if path == "cancel" { "danger" } else { "" }) id=(format!("confirm-{path}")) {
                    "Yes, " (verb.to_lowercase()) " it"
                }
            }
        }
    }
}

/// A job's log: its last lines now, then followed live from the offset they end at.
pub(super) async fn job_log(ui: &Ui, job: &Job) -> Result<Markup, UiError> {
    let Some((path, _)) = ui.worker()?.log_path(job.id).await? else {
        return Err(UiError::new(
            StatusCode::NOT_FOUND,
            format!("no job {}", job.id),
        ));
    };
    let params = LogParams {
        tail: Some(LOG_TAIL_LINES),
        offset: None,
    };
    let (text, size) = match read_rotated_log(&path, &params).await {
        Ok((body, size)) => {
            let bytes = axum::body::to_bytes(body, 16 * 1024 * 1024)
                .await
                .unwrap_or_default();
            (String::from_utf8_lossy(&bytes).into_owned(), size)
        }
        Err(_) => ("(the log cannot be read)".into(), 0),
    };
    // What the daemon wrote into the log about each run: its start, its end, a restart
    // that cut it short and how it was recovered.
    let runs: Vec<&str> = text.lines().filter(|l| l.starts_with("==> ")).collect();
    Ok(html! {
        section aria-labelledby="runs-h" {
            h2 id="runs-h" { "Runs and recoveries" }
            @if runs.is_empty() { p { "The log shown below records no run yet." } }
            @else {
                ul class="runs" { @for line in &runs { li class="mono" { (line.trim_start_matches("==> ")) } } }
                p class="note" { "As the daemon wrote them into the log (its last " (LOG_TAIL_LINES) " lines)." }
            }
        }
        section aria-labelledby="log-h" class="log" {
            h2 id="log-h" { "Log" }
            p class="note" {
                "The last " (LOG_TAIL_LINES) " lines, followed live while the page is open. "
                a href=(format!("/v1/jobs/{}/logs", job.id)) { "Whole log" } " (API; needs the token)."
            }
            pre id="log" tabindex="0" aria-label="Trainer log" data-follow=(format!("/ui/jobs/{}/log?offset={size}", job.id)) { (text) }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_page_is_the_newest_matching_jobs_in_order() {
        let start = Utc::now() - chrono::Duration::hours(10);
        let jobs: Vec<Job> = (0..120u128)
            .map(|n| {
                let mut job = crate::job::sample_job(n + 1);
                job.status = if n % 2 == 0 {
                    Status::Completed
                } else {
                    Status::Failed
                };
                job.created_at = Some(start + chrono::Duration::seconds(n as i64));
                job.finished_at = job.created_at;
                job
            })
            .collect();
        let any = HistoryParams::default();
        let (total, page) = page_of(&mut jobs.iter(), &any, None, 0, 50);
        assert_eq!(total, 120);
        let created: Vec<_> = page.iter().map(|j| j.created_at).collect();
        let expected: Vec<_> = (70..120).rev().map(|n| jobs[n].created_at).collect();
        assert_eq!(created, expected);
        // The last, short page, and one past the end.
        let (_, last) = page_of(&mut jobs.iter(), &any, None, 100, 50);
        assert_eq!(last.len(), 20);
        assert_eq!(last[19].id, jobs[0].id);
        assert!(page_of(&mut jobs.iter(), &any, None, 150, 50).1.is_empty());
        // Filtered by status.
        let failed = HistoryParams {
            status: "failed".into(),
            ..HistoryParams::default()
        };
        let (total, page) = page_of(&mut jobs.iter(), &failed, None, 0, 10);
        assert_eq!(total, 60);
        assert!(page.iter().all(|j| j.status == Status::Failed));
        assert_eq!(page[0].id, jobs[119].id);
    }
}
