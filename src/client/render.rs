//! Text for people: a job as a block, jobs as a table, times relative to now, statuses in
//! colour on a terminal. Pure functions of the jobs, the time and a [`Style`], so that they
//! are tested without a terminal or a daemon.

use std::io::IsTerminal;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;

use crate::job::Status;

/// What the output goes to.
#[derive(Clone, Copy, Debug)]
pub struct Style {
    /// Stdout is a terminal: a person reads it.
    pub tty: bool,
    /// Statuses in colour: on a terminal, unless `NO_COLOR` is set (no-color.org).
    pub color: bool,
    /// The terminal's width in columns; the model column is cut to fit it. `None` when
    /// piped: nothing is cut.
    pub width: Option<usize>,
}

impl Style {
    pub fn detect() -> Style {
        let tty = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Style {
            tty,
            color: tty && !no_color,
            width: tty.then(terminal_width),
        }
    }
}

/// The width of the terminal on stdout, else `COLUMNS`, else 120.
fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ only fills the winsize struct passed by pointer, which lives
    // for the whole call; a failure leaves it zeroed, which is handled below.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        return usize::from(size.ws_col);
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .filter(|&c| c > 0)
        .unwrap_or(120)
}

/// The fields of a job the text output shows, read leniently: a field missing from the
/// daemon's answer shows as `-` rather than failing the command.
#[derive(Clone, Debug, Default)]
pub struct JobView {
    pub id: String,
    pub kind: String,
    pub model: String,
    /// The status as sent; [`JobView::status`] parses it.
    pub status_text: String,
    pub attempts: Option<u64>,
    pub created_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// TextJob: the dataset and its format; DiffusionJob: the zip and the model type.
    pub dataset: Option<String>,
    pub expected_repo_name: Option<String>,
    /// The time budget in hours, and when it runs out.
    pub hours: Option<f64>,
    pub deadline: Option<DateTime<Utc>>,
    /// What the daemon expects: a queued job's start, a queued or running job's end.
    pub estimated_start: Option<DateTime<Utc>>,
    pub estimated_finish: Option<DateTime<Utc>>,
}

impl JobView {
    pub fn from_json(job: &Value) -> JobView {
        // Every text shown comes from a client or a trainer's output (an error message ends
        // with its last line), so none of it may reach the terminal as control codes.
        let text = |key: &str| job.get(key).and_then(Value::as_str).map(printable);
        let time = |key: &str| {
            text(key)
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc))
        };
        let dataset = match (text("dataset"), text("dataset_zip")) {
            (Some(dataset), _) => Some(match text("file_format") {
                Some(format) => format!("{dataset} ({format})"),
                None => dataset,
            }),
            (None, Some(zip)) => Some(match text("model_type") {
                Some(model_type) => format!("{zip} ({model_type})"),
                None => zip,
            }),
            (None, None) => None,
        };
        JobView {
            id: text("job_id").unwrap_or_else(|| "-".into()),
            kind: text("type").unwrap_or_else(|| "-".into()),
            model: text("model").unwrap_or_else(|| "-".into()),
            status_text: text("status").unwrap_or_else(|| "-".into()),
            attempts: job.get("attempts").and_then(Value::as_u64),
            created_at: time("created_at"),
            started_at: time("started_at"),
            finished_at: time("finished_at"),
            error: text("error_message"),
            dataset,
            expected_repo_name: text("expected_repo_name"),
            hours: job.get("hours_to_complete").and_then(Value::as_f64),
            deadline: time("deadline"),
            estimated_start: time("estimated_start"),
            estimated_finish: time("estimated_finish"),
        }
    }

    pub fn status(&self) -> Option<Status> {
        Status::parse_loose(&self.status_text)
    }

    /// How long it ran: to its end when finished, to `now` while running.
    fn run_time(&self, now: DateTime<Utc>) -> Option<TimeDelta> {
        let started = self.started_at?;
        match self.status() {
            Some(Status::Running) => Some(now - started),
            Some(s) if s.is_finished() => Some(self.finished_at? - started),
            _ => None,
        }
    }
}

/// `status` in its colour when `color` is on.
pub fn paint(text: &str, status: Option<Status>, color: bool) -> String {
    let code = match status {
        _ if !color => return text.to_string(),
        Some(Status::Queued) => "33",    // yellow
        Some(Status::Running) => "1;34", // bold blue
        Some(Status::Completed) => "32", // green
        Some(Status::Failed) => "1;31",  // bold red
        Some(Status::Cancelled) => "2",  // dim
        None => return text.to_string(),
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// `text` with what a terminal would act on made visible: control characters (an ESC that
/// clears the screen, a CR that overwrites a line) and the bidirectional overrides that
/// reorder what is shown, each as a `\u{..}` escape. Printable text, non-ASCII included,
/// is kept as it is.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// A span of time in at most two units: `42s`, `3m 05s`, `5h 12m`, `3d 4h`.
pub fn duration(span: TimeDelta) -> String {
    let s = span.num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// A moment relative to `now` in at most two units, rounded to the smaller one:
/// `just now`, `42s ago`, `3m 5s ago`, `in 1h 59m`, `3d 4h ago`.
pub fn ago(then: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let ms = (now - then).num_milliseconds();
    // A few seconds ahead is clock skew between client and daemon, not the future.
    if ms < 1000 {
        return if ms > -5000 {
            "just now".into()
        } else {
            format!("in {}", two_units(-ms))
        };
    }
    format!("{} ago", two_units(ms))
}

/// A positive span in milliseconds as its largest unit and the next, rounded to the
/// nearest of the smaller unit (1h 59m 40s is `2h`), the smaller left out when it is 0.
fn two_units(ms: i64) -> String {
    let pair = |big: i64, big_unit: &str, small: i64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit} {small}{small_unit}")
        }
    };
    let s = (ms + 500) / 1000;
    if s < 60 {
        return format!("{s}s");
    }
    if s < 3600 {
        return pair(s / 60, "m", s % 60, "s");
    }
    let minutes = (s + 30) / 60;
    if minutes < 24 * 60 {
        return pair(minutes / 60, "h", minutes % 60, "m");
    }
    let hours = (s + 1800) / 3600;
    pair(hours / 24, "d", hours % 24, "h")
}

/// A span the client was given (`wait --timeout`) as a person reads it: to the whole
/// second, or in milliseconds below one, never the nanoseconds a parsed `1.25s` carries.
pub fn span(span: std::time::Duration) -> String {
    if span < std::time::Duration::from_secs(1) {
        return format!("{}ms", span.as_millis());
    }
    let seconds = (span.as_millis() + 500) / 1000;
    humantime::format_duration(std::time::Duration::from_secs(seconds as u64)).to_string()
}

fn absolute(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The answer to an offer as `label  value` lines: accepted or declined, the estimated
/// start and finish, the place held for the job, and the daemon's reason.
pub fn offer_block(answer: &Value, now: DateTime<Utc>) -> String {
    let text = |key: &str| answer.get(key).and_then(Value::as_str);
    let when = |t: &str| match DateTime::parse_from_rfc3339(t) {
        Ok(t) => {
            let t = t.with_timezone(&Utc);
            format!("{} ({})", absolute(t), ago(t, now))
        }
        Err(_) => printable(t),
    };
    let accepted = answer.get("accepted").and_then(Value::as_bool) == Some(true);
    let mut lines = vec![(
        "offer",
        if accepted { "accepted" } else { "declined" }.to_string(),
    )];
    if let Some(start) = text("estimated_start") {
        lines.push(("starts", when(start)));
    }
    if let Some(finish) = text("estimated_finish") {
        lines.push(("ends by", when(finish)));
    }
    if let Some(reservation) = answer.get("reservation").filter(|r| !r.is_null()) {
        let field = |key: &str| reservation.get(key).and_then(Value::as_str);
        let id = field("id").map_or_else(|| "?".to_string(), printable);
        let held = match field("expires_at") {
            Some(expires) => format!("{id}, held until {}", when(expires)),
            None => id,
        };
        lines.push(("reserved", held));
    }
    if let Some(message) = text("message") {
        lines.push(("message", printable(message)));
    }
    // One width whatever lines there are, so that answers line up one under the other.
    lines
        .iter()
        .map(|(label, value)| format!("{label:8}  {value}\n"))
        .collect()
}

/// One job as a block of `label  value` lines; lines for what the job lacks are left out.
pub fn job_block(job: &JobView, now: DateTime<Utc>, style: &Style) -> String {
    let mut lines: Vec<(&str, String)> = vec![
        ("id", job.id.clone()),
        ("status", paint(&job.status_text, job.status(), style.color)),
        ("type", job.kind.clone()),
        ("model", job.model.clone()),
    ];
    if let Some(dataset) = &job.dataset {
        lines.push(("dataset", dataset.clone()));
    }
    if let Some(repo) = &job.expected_repo_name {
        lines.push(("repo", repo.clone()));
    }
    if let Some(attempts) = job.attempts {
        lines.push(("attempts", attempts.to_string()));
    }
    let when = |t: DateTime<Utc>| format!("{}  ({})", ago(t, now), absolute(t));
    if let Some(t) = job.created_at {
        lines.push(("created", when(t)));
    }
    if let Some(t) = job.started_at {
        let mut line = when(t);
        if job.status() == Some(Status::Running) {
            line.push_str(&format!(", running for {}", duration(now - t)));
        }
        lines.push(("started", line));
    }
    if let (Some(t), Some(true)) = (job.finished_at, job.status().map(Status::is_finished)) {
        let mut line = when(t);
        if let Some(ran) = job.run_time(now) {
            line.push_str(&format!(", ran {}", duration(ran)));
        }
        lines.push(("finished", line));
    }
    if let Some(t) = job.deadline {
        let mut line = when(t);
        if let Some(hours) = job.hours {
            line.push_str(&format!(", a budget of {}", budget(hours)));
        }
        lines.push(("deadline", line));
    }
    match job.status() {
        Some(Status::Queued) => {
            let start = match job.estimated_start {
                Some(t) => format!("{}, estimated", when(t)),
                None => {
                    "not expected: the queue is paused, or the job cannot start before its deadline"
                        .into()
                }
            };
            lines.push(("starts", start));
            if let Some(t) = job.estimated_finish {
                lines.push(("ends", format!("{}, estimated", when(t))));
            }
        }
        Some(Status::Running) => {
            if let Some(t) = job.estimated_finish {
                lines.push(("ends", format!("{}, estimated", when(t))));
            }
        }
        _ => {}
    }
    if let Some(error) = &job.error {
        lines.push(("error", error.clone()));
    }
    let mut out = String::new();
    for (label, value) in lines {
        out.push_str(&format!("{label:<9} {value}\n"));
    }
    out
}

/// A budget in hours as a person says it: `3h`, `1h 30m`.
fn budget(hours: f64) -> String {
    let minutes = (hours * 60.0).round() as i64;
    match (minutes / 60, minutes % 60) {
        (0, m) => format!("{m}m"),
        (h, 0) => format!("{h}h"),
        (h, m) => format!("{h}h {m}m"),
    }
}

/// A table cell; a status cell is painted after padding, so escapes do not skew widths.
struct Cell {
    text: String,
    status: Option<Status>,
}

impl From<String> for Cell {
    fn from(text: String) -> Cell {
        Cell { text, status: None }
    }
}

fn status_cell(job: &JobView) -> Cell {
    Cell {
        text: job.status_text.clone(),
        status: job.status(),
    }
}

/// Columns two spaces apart, a header line on top. The last column is not padded, and on a
/// terminal it is cut (in the middle, which keeps a model's org and its name's end) to fit.
fn table(headers: &[&str], rows: Vec<Vec<Cell>>, style: &Style) -> String {
    const GAP: usize = 2;
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.text.chars().count());
        }
    }
    let fixed: usize = widths[..columns - 1].iter().map(|w| w + GAP).sum();
    let last_max = style.width.map(|w| w.saturating_sub(fixed).max(12));
    let mut out = String::new();
    let mut line = |cells: Vec<Cell>| {
        let mut text = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if i + 1 == columns {
                let value = match last_max {
                    Some(max) => truncate_middle(&cell.text, max),
                    None => cell.text,
                };
                text.push_str(&value);
            } else {
                let pad = widths[i] - cell.text.chars().count() + GAP;
                text.push_str(&paint(&cell.text, cell.status, style.color));
                text.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(headers.iter().map(|h| Cell::from(h.to_string())).collect());
    for row in rows {
        line(row);
    }
    out
}

/// `text` cut to `max` characters with `…` in the middle.
fn truncate_middle(text: &str, max: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= max {
        return text.to_string();
    }
    let keep = max.saturating_sub(1);
    let head = keep / 2;
    let tail = keep - head;
    let mut out: String = chars[..head].iter().collect();
    out.push('…');
    out.extend(&chars[chars.len() - tail..]);
    out
}

/// The id as a table shows it: on a terminal its first 8 characters, which every command
/// takes as a prefix; piped, all of it.
fn table_id(job: &JobView, style: &Style) -> Cell {
    let id = if style.tty {
        job.id.chars().take(8).collect()
    } else {
        job.id.clone()
    };
    Cell::from(id)
}

/// `list`: one job per row.
pub fn job_table(jobs: &[JobView], now: DateTime<Utc>, style: &Style) -> String {
    let rows = jobs
        .iter()
        .map(|job| {
            vec![
                table_id(job, style),
                status_cell(job),
                Cell::from(job.kind.clone()),
                Cell::from(job.attempts.map_or("-".into(), |a| a.to_string())),
                Cell::from(job.created_at.map_or("-".into(), |t| ago(t, now))),
                Cell::from(job.run_time(now).map_or("-".into(), duration)),
                Cell::from(job.model.clone()),
            ]
        })
        .collect();
    table(
        &[
            "ID", "STATUS", "TYPE", "ATTEMPTS", "CREATED", "RUNTIME", "MODEL",
        ],
        rows,
        style,
    )
}

/// `queue`: running jobs (position `-`), then queued ones numbered in the order they start,
/// with their deadlines and, for queued ones, when they are expected to start.
pub fn queue_table(
    running: &[JobView],
    queued: &[JobView],
    now: DateTime<Utc>,
    style: &Style,
) -> String {
    let since = |t: Option<DateTime<Utc>>| t.map_or("-".into(), |t| ago(t, now));
    let mut rows = Vec::new();
    for job in running {
        rows.push(vec![
            Cell::from("-".to_string()),
            table_id(job, style),
            status_cell(job),
            Cell::from(since(job.started_at)),
            Cell::from(since(job.deadline)),
            Cell::from("-".to_string()),
            Cell::from(job.model.clone()),
        ]);
    }
    for (n, job) in queued.iter().enumerate() {
        rows.push(vec![
            Cell::from((n + 1).to_string()),
            table_id(job, style),
            status_cell(job),
            Cell::from(since(job.created_at)),
            Cell::from(since(job.deadline)),
            Cell::from(since(job.estimated_start)),
            Cell::from(job.model.clone()),
        ]);
    }
    table(
        &[
            "POS",
            "ID",
            "STATUS",
            "SINCE",
            "DEADLINE",
            "EST. START",
            "MODEL",
        ],
        rows,
        style,
    )
}

/// `nodes`: one node of `GET /v1/nodes` per row, read leniently like a job: what a node
/// lacks shows as `-`.
pub fn node_table(nodes: &[Value], now: DateTime<Utc>, style: &Style) -> String {
    let rows = nodes
        .iter()
        .map(|node| {
            // A node's id and address come from its own configuration, on another box.
            let text = |key: &str| node.get(key).and_then(Value::as_str).map(printable);
            let ids = |key: &str| -> Option<Vec<u64>> {
                node.get(key)?
                    .as_array()?
                    .iter()
                    .map(Value::as_u64)
                    .collect()
            };
            let state = match node.get("live").and_then(Value::as_bool) {
                Some(true) => "live",
                Some(false) => "gone",
                None => "-",
            };
            let heartbeat = text("heartbeat_at")
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map_or("-".into(), |t| ago(t.with_timezone(&Utc), now));
            let running = node
                .get("running")
                .and_then(Value::as_array)
                .map_or("-".into(), |jobs| jobs.len().to_string());
            vec![
                Cell::from(text("id").unwrap_or_else(|| "-".into())),
                Cell::from(
                    text("address")
                        .filter(|a| !a.is_empty())
                        .unwrap_or_else(|| "-".into()),
                ),
                Cell::from(state.to_string()),
                Cell::from(heartbeat),
                Cell::from(running),
                Cell::from(free_gpus(ids("gpus"), ids("free_gpus"))),
            ]
        })
        .collect();
    table(
        &[
            "NODE",
            "ADDRESS",
            "STATE",
            "HEARTBEAT",
            "RUNNING",
            "FREE GPUS",
        ],
        rows,
        style,
    )
}

/// A node's free GPUs among all of its: `1,3 of 4`, `none of 4`; `-` without GPUs.
fn free_gpus(gpus: Option<Vec<u64>>, free: Option<Vec<u64>>) -> String {
    let (Some(gpus), Some(free)) = (gpus, free) else {
        return "-".into();
    };
    if gpus.is_empty() {
        return "-".into();
    }
    let free = if free.is_empty() {
        "none".to_string()
    } else {
        free.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    format!("{free} of {}", gpus.len())
}

/// Why the queue does not move, from `GET /v1/queue`: the reason starts are paused, or why
/// each of the first `shown` queued jobs waits. Empty when nothing waits.
pub fn wait_reasons(view: &serde_json::Value, shown: usize) -> String {
    let mut out = String::new();
    if let Some(paused) = view["paused"].as_str() {
        out.push_str(&format!("paused: {}\n", printable(paused)));
        return out;
    }
    let order: Vec<&str> = view["queued"]
        .as_array()
        .map(|ids| ids.iter().filter_map(|id| id.as_str()).collect())
        .unwrap_or_default();
    let reasons = &view["waiting"];
    for id in order.iter().take(shown) {
        if let Some(reason) = reasons[*id].as_str() {
            if out.is_empty() {
                out.push_str("why they wait:\n");
            }
            out.push_str(&format!("  {id}  {}\n", printable(reason)));
        }
    }
    if order.len() > shown && !out.is_empty() {
        out.push_str(&format!(
            "  … and {} more behind them\n",
            order.len() - shown
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_says_why_it_waits() {
        let view = serde_json::json!({
            "running": ["r"],
            "queued": ["a", "b", "c"],
            "paused": null,
            "waiting": {"a": "the one slot is busy", "b": "waits behind job a", "c": "waits behind job a"},
        });
        assert_eq!(
            wait_reasons(&view, 2),
            "why they wait:\n  a  the one slot is busy\n  b  waits behind job a\n  … and 1 more behind them\n"
        );
        let paused = serde_json::json!({
            "running": [], "queued": ["a"], "paused": "trainers cannot be started (\u{1b}[2J)",
            "waiting": {"a": "x"},
        });
        assert_eq!(
            wait_reasons(&paused, 10),
            "paused: trainers cannot be started (\\u{1b}[2J)\n"
        );
        let empty = serde_json::json!({"running": [], "queued": [], "paused": null, "waiting": {}});
        assert_eq!(wait_reasons(&empty, 10), "");
    }
    use serde_json::json;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    const PLAIN: Style = Style {
        tty: false,
        color: false,
        width: None,
    };

    fn failed_job() -> JobView {
        JobView::from_json(&json!({
            "type": "TextJob",
            "job_id": "123e4567-e89b-12d3-a456-426614174000",
            "model": "mistralai/Mistral-7B-v0.1",
            "dataset": "train.json",
            "file_format": "json",
            "status": "Failed",
            "attempts": 2,
            "error_message": "exited with status 3; last output: out of memory",
            "created_at": "2025-01-01T10:00:00Z",
            "started_at": "2025-01-01T10:01:00Z",
            "finished_at": "2025-01-01T10:04:05Z",
        }))
    }

    #[test]
    fn times_read_as_a_person_would_say_them() {
        let now = at("2025-01-02T12:00:00Z");
        assert_eq!(ago(at("2025-01-02T12:00:00Z"), now), "just now");
        assert_eq!(ago(at("2025-01-02T12:00:02Z"), now), "just now");
        assert_eq!(ago(at("2025-01-02T11:59:18Z"), now), "42s ago");
        assert_eq!(ago(at("2025-01-02T11:57:00Z"), now), "3m ago");
        assert_eq!(ago(at("2025-01-02T07:00:00Z"), now), "5h ago");
        assert_eq!(ago(at("2024-12-30T12:00:00Z"), now), "3d ago");
        assert_eq!(ago(at("2025-01-02T12:10:00Z"), now), "in 10m");
        assert_eq!(ago(at("2025-01-02T11:56:55Z"), now), "3m 5s ago");
        assert_eq!(ago(at("2025-01-02T13:59:00Z"), now), "in 1h 59m");
        // Rounded to the smaller unit, never cut: 1h 59m 40s is 2h, 59.6 s is a minute.
        assert_eq!(ago(at("2025-01-02T13:59:40Z"), now), "in 2h");
        assert_eq!(ago(at("2025-01-02T11:59:00.400Z"), now), "1m ago");
        assert_eq!(ago(at("2025-01-02T10:00:31Z"), now), "1h 59m ago");
        assert_eq!(ago(at("2025-01-02T10:00:29Z"), now), "2h ago");
        assert_eq!(ago(at("2024-12-30T08:00:00Z"), now), "3d 4h ago");
        assert_eq!(ago(at("2025-01-01T12:00:01Z"), now), "1d ago");
        assert_eq!(ago(at("2025-01-02T12:00:06Z"), now), "in 6s");
        assert_eq!(duration(TimeDelta::seconds(42)), "42s");
        assert_eq!(duration(TimeDelta::seconds(185)), "3m 05s");
        assert_eq!(duration(TimeDelta::seconds(5 * 3600 + 12 * 60)), "5h 12m");
        assert_eq!(duration(TimeDelta::seconds(3 * 86400 + 4 * 3600)), "3d 4h");
        assert_eq!(duration(TimeDelta::seconds(-3)), "0s");
    }

    #[test]
    fn spans_given_to_the_client_print_to_the_second() {
        let parsed = |text: &str| span(humantime::parse_duration(text).unwrap());
        assert_eq!(parsed("1.123456789s"), "1s");
        assert_eq!(parsed("90.6s"), "1m 31s");
        assert_eq!(parsed("2h"), "2h");
        assert_eq!(parsed("250ms 300us"), "250ms");
        assert_eq!(parsed("0s"), "0ms");
    }

    #[test]
    fn control_characters_are_shown_escaped_and_printable_text_as_is() {
        assert_eq!(printable("a\x1b[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(
            printable("line\r\nnext\t\x07\u{7f}\u{9b}"),
            "line\\u{d}\\u{a}next\\u{9}\\u{7}\\u{7f}\\u{9b}"
        );
        assert_eq!(printable("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(printable("Qwen/模型-ü 🚀"), "Qwen/模型-ü 🚀");

        let hostile = JobView::from_json(&json!({
            "type": "TextJob", "job_id": "00000000-0000-4000-8000-000000000003",
            "model": "m\u{1b}[2J", "status": "Failed", "dataset": "d\u{1b}]0;title\u{7}",
            "file_format": "json", "expected_repo_name": "r\r",
            "error_message": "exited with status 1; last output: \u{1b}[31mboom",
        }));
        let now = at("2025-01-01T10:00:00Z");
        let views = [
            job_block(&hostile, now, &PLAIN),
            job_table(std::slice::from_ref(&hostile), now, &PLAIN),
            queue_table(&[], std::slice::from_ref(&hostile), now, &PLAIN),
        ];
        for text in views {
            assert!(
                !text.chars().any(|c| c.is_control() && c != '\n'),
                "{text:?}"
            );
            assert!(text.contains("m\\u{1b}[2J"), "{text}");
        }
        let block = job_block(&hostile, now, &PLAIN);
        assert!(block.contains("last output: \\u{1b}[31mboom"), "{block}");
    }

    #[test]
    fn a_job_block_shows_what_a_person_asks_first() {
        let now = at("2025-01-01T10:05:05Z");
        let text = job_block(&failed_job(), now, &PLAIN);
        assert_eq!(
            text,
            "id        123e4567-e89b-12d3-a456-426614174000\n\
             status    Failed\n\
             type      TextJob\n\
             model     mistralai/Mistral-7B-v0.1\n\
             dataset   train.json (json)\n\
             attempts  2\n\
             created   5m 5s ago  (2025-01-01 10:00:00 UTC)\n\
             started   4m 5s ago  (2025-01-01 10:01:00 UTC)\n\
             finished  1m ago  (2025-01-01 10:04:05 UTC), ran 3m 05s\n\
             error     exited with status 3; last output: out of memory\n"
        );
    }

    #[test]
    fn a_table_is_aligned_and_plain_unless_coloured() {
        let now = at("2025-01-01T10:05:05Z");
        let queued = JobView::from_json(&json!({
            "type": "DiffusionJob", "job_id": "00000000-0000-4000-8000-000000000001",
            "model": "sdxl", "status": "Queued", "attempts": 0,
            "created_at": "2025-01-01T10:05:00Z",
        }));
        let jobs = [failed_job(), queued];
        let text = job_table(&jobs, now, &PLAIN);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("ID  "), "{text}");
        let status_at = lines[0].find("STATUS").unwrap();
        assert_eq!(
            lines[1][status_at..].split_whitespace().next(),
            Some("Failed")
        );
        assert_eq!(
            lines[2][status_at..].split_whitespace().next(),
            Some("Queued")
        );
        assert!(lines[1].contains("3m 05s"), "{text}");
        assert!(lines[2].ends_with("sdxl"), "{text}");
        assert!(!text.contains('\x1b'), "{text}");

        let colour = Style {
            tty: true,
            color: true,
            width: Some(80),
        };
        let text = job_table(&jobs, now, &colour);
        assert!(text.contains("\x1b[1;31mFailed\x1b[0m"), "{text}");
        assert!(
            text.contains("\n123e4567  "),
            "short ids on a terminal: {text}"
        );
        assert!(text.contains("\x1b[33mQueued\x1b[0m"), "{text}");
        for line in text.lines() {
            let visible = line.replace("\x1b[1;31m", "").replace("\x1b[33m", "");
            let visible = visible.replace("\x1b[0m", "");
            assert!(visible.chars().count() <= 80, "{line:?}");
        }
        assert!(
            text.contains("mistrala…l-7B-v0.1"),
            "the model is cut to fit: {text}"
        );
    }

    #[test]
    fn a_queued_job_shows_its_deadline_and_estimates() {
        let now = at("2025-01-01T10:00:00Z");
        let queued = JobView::from_json(&json!({
            "type": "DiffusionJob", "job_id": "00000000-0000-4000-8000-000000000001",
            "model": "sdxl", "status": "Queued", "attempts": 0,
            "created_at": "2025-01-01T09:50:00Z", "hours_to_complete": 1.5,
            "deadline": "2025-01-01T11:20:00Z",
            "estimated_start": "2025-01-01T10:25:00Z",
            "estimated_finish": "2025-01-01T11:20:00Z",
        }));
        let text = job_block(&queued, now, &PLAIN);
        assert!(
            text.contains("deadline  in 1h 20m  (2025-01-01 11:20:00 UTC), a budget of 1h 30m\n"),
            "{text}"
        );
        assert!(
            text.contains("starts    in 25m  (2025-01-01 10:25:00 UTC), estimated\n"),
            "{text}"
        );
        assert!(
            text.contains("ends      in 1h 20m  (2025-01-01 11:20:00 UTC), estimated\n"),
            "{text}"
        );
        let mut paused = queued.clone();
        paused.estimated_start = None;
        assert!(
            job_block(&paused, now, &PLAIN).contains("starts    not expected"),
            "a queued job without an estimate says so"
        );

        let running = JobView::from_json(&json!({
            "type": "TextJob", "job_id": "00000000-0000-4000-8000-000000000002",
            "model": "m", "status": "Running", "started_at": "2025-01-01T09:59:00Z",
            "deadline": "2025-01-01T12:00:00Z",
        }));
        let table = queue_table(&[running], &[queued], now, &PLAIN);
        let lines: Vec<&str> = table.lines().collect();
        let column = lines[0].find("EST. START").unwrap();
        let deadline = lines[0].find("DEADLINE").unwrap();
        assert_eq!(lines[1][column..].split_whitespace().next(), Some("-"));
        assert_eq!(&lines[2][column..column + 6], "in 25m", "{table}");
        assert_eq!(&lines[1][deadline..deadline + 5], "in 2h", "{table}");
    }

    #[test]
    fn nodes_show_their_state_heartbeat_running_jobs_and_free_gpus() {
        let now = at("2025-01-01T10:00:00Z");
        let nodes = [
            json!({
                "id": "box-a", "address": "http://10.0.0.1:8787", "live": true,
                "started_at": "2025-01-01T09:00:00Z", "heartbeat_at": "2025-01-01T09:59:58Z",
                "running": ["00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002"],
                "gpus": [0, 1, 2, 3], "free_gpus": [1, 3],
            }),
            json!({
                "id": "box-b", "address": "http://10.0.0.2:8787", "live": false,
                "started_at": "2025-01-01T08:00:00Z", "heartbeat_at": "2025-01-01T09:55:00Z",
                "running": [], "gpus": [0, 1], "free_gpus": [],
            }),
            json!({
                "id": "cpu-\u{1b}[2J", "address": "", "live": true,
                "started_at": "2025-01-01T09:00:00Z", "heartbeat_at": "2025-01-01T10:00:00Z",
                "running": [], "gpus": [], "free_gpus": [],
            }),
        ];
        assert_eq!(
            node_table(&nodes, now, &PLAIN),
            "NODE           ADDRESS               STATE  HEARTBEAT  RUNNING  FREE GPUS\n\
             box-a          http://10.0.0.1:8787  live   2s ago     2        1,3 of 4\n\
             box-b          http://10.0.0.2:8787  gone   5m ago     0        none of 2\n\
             cpu-\\u{1b}[2J  -                     live   just now   0        -\n"
        );
        // What a node lacks shows as `-` rather than failing the command.
        let table = node_table(&[json!({"id": "box-c"})], now, &PLAIN);
        assert_eq!(
            table.lines().nth(1),
            Some("box-c  -        -      -          -        -"),
            "{table}"
        );
    }

    #[test]
    fn long_texts_are_cut_in_the_middle() {
        assert_eq!(truncate_middle("short", 10), "short");
        assert_eq!(truncate_middle("abcdefghijkl", 7), "abc…jkl");
        assert_eq!(truncate_middle("abcdefghijkl", 6), "ab…jkl");
    }
}
