//! The command-line client: `submit`, `status`, `list`, `queue`, `cancel`, `retry`, `logs`,
//! `wait`, `offer`, `nodes` and `health`, each one or a few HTTP calls to a running daemon,
//! over HTTP or HTTPS.
//!
//! Output is for people on a terminal (a table, statuses in colour, relative times) and plain
//! text when piped; `--json` prints what the API answered, for scripts. Every failure is one
//! line on stderr, and the exit code says what happened (see [`Exit`]), so a script can
//! branch on it without parsing text.
//!
//! [`run`] is the whole interface for `main.rs`: it takes the parsed [`Command`] and returns
//! the exit code. It runs on a current-thread Tokio runtime: a client waits on one request at
//! a time and needs no worker threads.

mod commands;
mod http;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use crate::job::{JobId, Status};

/// Where the client finds the daemon when neither `--server` nor `TRAINING_WORKER_SERVER` says.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8787";

/// The exit codes of the client commands, shown under `--help`. Keep in step with [`Exit`]
/// and the README.
pub const EXIT_CODES_HELP: &str = "\
Exit codes of the client commands:
  0  success; with wait and logs --follow: the job Completed
  1  error: the daemon cannot be reached or refused the request, bad input (one line on stderr)
  2  usage: bad arguments
  3  the job does not exist
  4  conflict: the job has already finished (cancel), is not finished (retry), or its id exists with other content (submit)
  5  the job Failed (wait, logs --follow)
  6  the job was Cancelled (wait, logs --follow)
  7  wait --timeout ran out before the job finished
  8  offer: the daemon declined the offer";

/// How a client command ended. The values are a stable interface for scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The command did what it was asked; a waited-for job Completed.
    Success = 0,
    /// Any error not listed below: unreachable daemon, refused request, bad input.
    Error = 1,
    /// Bad arguments; clap exits with it before [`run`] is called.
    Usage = 2,
    /// The job does not exist (404).
    NotFound = 3,
    /// 409: the job has already finished (cancel), is not finished (retry), or its id exists
    /// with other content (submit).
    Conflict = 4,
    /// The waited-for job Failed.
    JobFailed = 5,
    /// The waited-for job was Cancelled.
    JobCancelled = 6,
    /// `wait --timeout` ran out first.
    TimedOut = 7,
    /// The daemon answered an offer with `accepted: false`.
    Declined = 8,
}

impl Exit {
    /// The exit code that reports a job that has ended with `status`.
    fn of_final(status: Status) -> Exit {
        match status {
            Status::Failed => Exit::JobFailed,
            Status::Cancelled => Exit::JobCancelled,
            _ => Exit::Success,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// Why a client command failed, told apart where a script branches on it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon says the job does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The daemon answered 409.
    #[error("{0}")]
    Conflict(String),
    /// `wait --timeout` ran out.
    #[error("{0}")]
    TimedOut(String),
    /// The daemon could not be reached, or answered 502, 503 or 504: worth asking again
    /// while waiting for a job (the daemon may be restarting; the job is durable).
    #[error("{0}")]
    Unavailable(String),
    /// Whoever reads our output has gone (`| head`); not an error worth a message.
    #[error("stdout closed")]
    StdoutClosed,
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl ClientError {
    fn exit(&self) -> Exit {
        match self {
            ClientError::NotFound(_) => Exit::NotFound,
            ClientError::Conflict(_) => Exit::Conflict,
            ClientError::TimedOut(_) => Exit::TimedOut,
            ClientError::StdoutClosed => Exit::Success,
            ClientError::Unavailable(_) | ClientError::Other(_) => Exit::Error,
        }
    }
}

/// How to reach the daemon; shared by every client command.
#[derive(Clone, Debug, Args)]
pub struct Connection {
    /// The daemon's URL, http:// or https:// [default: http://$TRAINING_WORKER_LISTEN if
    /// set, else http://127.0.0.1:8787]; a token is read from TRAINING_WORKER_API_TOKEN
    #[arg(long, value_name = "URL", env = "TRAINING_WORKER_SERVER")]
    pub server: Option<String>,
    /// CA certificates (PEM) to trust for an https:// server, besides the system's: for a
    /// daemon behind a private CA
    #[arg(long, value_name = "FILE", env = "TRAINING_WORKER_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

/// `--json`: print what the API answered instead of text for people.
#[derive(Clone, Copy, Debug, Args)]
pub struct Format {
    /// Print the API's JSON instead of text
    #[arg(long)]
    pub json: bool,
}

/// A job named on the command line: its whole id, or the first characters of it (the tables
/// on a terminal show the first 8), which name it if no other job's id starts the same way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobRef {
    Id(JobId),
    Prefix(String),
}

/// The shortest prefix taken: shorter ones would match many jobs by chance.
const MIN_PREFIX: usize = 4;

impl std::str::FromStr for JobRef {
    type Err = String;

    fn from_str(text: &str) -> Result<JobRef, String> {
        if let Ok(id) = text.parse::<JobId>() {
            return Ok(JobRef::Id(id));
        }
        let is_prefix = (MIN_PREFIX..36).contains(&text.len())
            && text.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if is_prefix {
            return Ok(JobRef::Prefix(text.to_ascii_lowercase()));
        }
        Err(format!(
            "not a job id: expected a UUID like 123e4567-e89b-12d3-a456-426614174000, \
             or its first {MIN_PREFIX} or more characters"
        ))
    }
}

impl std::fmt::Display for JobRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobRef::Id(id) => id.fmt(f),
            JobRef::Prefix(prefix) => f.write_str(prefix),
        }
    }
}

/// A status to filter `list` by; any case is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "PascalCase")]
pub enum StatusFilter {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl StatusFilter {
    fn status(self) -> Status {
        match self {
            StatusFilter::Queued => Status::Queued,
            StatusFilter::Running => Status::Running,
            StatusFilter::Completed => Status::Completed,
            StatusFilter::Failed => Status::Failed,
            StatusFilter::Cancelled => Status::Cancelled,
        }
    }
}

/// The client's subcommands; `main.rs` flattens them into its own.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a job (a JSON file, or - for stdin) and print its id.
    #[command(after_help = EXIT_CODES_HELP)]
    Submit {
        /// The job's JSON file, or - to read it from stdin
        #[arg(value_name = "FILE|-")]
        file: PathBuf,
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show one job: type, model, status, attempts, times, error.
    #[command(after_help = EXIT_CODES_HELP)]
    Status {
        /// The job's id, or its first characters (at least 4) if no other job's id starts so
        id: JobRef,
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        connection: Connection,
    },
    /// List jobs in a table: queued ones in queue order, the others newest first.
    #[command(after_help = EXIT_CODES_HELP)]
    List {
        /// Only jobs with this status
        #[arg(long, value_enum, ignore_case = true, value_name = "STATUS")]
        status: Option<StatusFilter>,
        /// At most this many jobs
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show the queue: running jobs, then queued ones in the order they will start.
    #[command(after_help = EXIT_CODES_HELP)]
    Queue {
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        connection: Connection,
    },
    /// Cancel a job, queued or running (a running trainer is stopped).
    #[command(after_help = EXIT_CODES_HELP)]
    Cancel {
        /// The job's id, or its first characters (at least 4) if no other job's id starts so
        id: JobRef,
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        connection: Connection,
    },
    /// Start a finished job over: queued again at the end of the queue for a fresh run.
    ///
    /// A Completed, Failed or Cancelled job starts from its first stage with its attempts at
    /// 0; its earlier attempts stay in its log. A job that is not finished is a conflict (4).
    #[command(after_help = EXIT_CODES_HELP)]
    Retry {
        /// The job's id, or its first characters (at least 4) if no other job's id starts so
        id: JobRef,
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        connection: Connection,
    },
    /// Print a job's trainer output; --follow keeps printing until the job ends.
    ///
    /// With --follow the exit code says how the job ended, as with wait.
    #[command(after_help = EXIT_CODES_HELP)]
    Logs {
        /// The job's id, or its first characters (at least 4) if no other job's id starts so
        id: JobRef,
        /// Only the last N lines (then, with --follow, everything after them)
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Keep printing new output until the job has ended; the exit code then says how
        /// it ended, as with wait
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Block until a job has ended; the exit code says how.
    ///
    /// 0 when it Completed, 5 Failed, 6 Cancelled, 7 when --timeout ran out first. Once the
    /// daemon has answered, an outage (a restart) is waited out: the job is durable.
    #[command(after_help = EXIT_CODES_HELP)]
    Wait {
        /// The job's id, or its first characters (at least 4) if no other job's id starts so
        id: JobRef,
        /// Give up after this long (e.g. 90s, 2h) [default: wait as long as it takes]
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        connection: Connection,
    },
    /// Ask whether the daemon would take a job, and when it would run it; nothing is stored.
    ///
    /// The offer is a JSON file (or - for stdin), the job itself will do, or --type, --model
    /// and --hours (with --gpus and --job-id). Prints whether it was accepted, the estimated
    /// start and finish, and the place held for the job if any. Exit 0 when accepted, 8 when
    /// declined (the reason is printed).
    #[command(after_help = EXIT_CODES_HELP)]
    Offer {
        /// The offer's JSON file, or - to read it from stdin
        #[arg(value_name = "FILE|-", required_unless_present_any = ["job_type", "model", "hours"], conflicts_with_all = ["job_type", "model", "hours", "gpus", "job_id"])]
        file: Option<PathBuf>,
        /// The job's type: TextJob or DiffusionJob
        #[arg(long = "type", value_name = "TYPE", requires_all = ["model", "hours"])]
        job_type: Option<String>,
        /// The model the job would train
        #[arg(long, requires_all = ["job_type", "hours"])]
        model: Option<String>,
        /// The job's budget, hours_to_complete
        #[arg(long, value_name = "HOURS", requires_all = ["job_type", "model"])]
        hours: Option<f64>,
        /// GPUs the job would ask for [default: the daemon's default]
        #[arg(long, value_name = "N")]
        gpus: Option<u32>,
        /// The id the job will have: then only that job claims the place held for it
        #[arg(long, value_name = "ID")]
        job_id: Option<String>,
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        connection: Connection,
    },
    /// List the daemons that share the queue: address, live or gone, last heartbeat, running
    /// jobs, free GPUs.
    ///
    /// With the PostgreSQL store, every node the database has known; with the file store,
    /// the daemon asked, alone.
    #[command(after_help = EXIT_CODES_HELP)]
    Nodes {
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        connection: Connection,
    },
    /// Check that the daemon answers: exit 0 if so, 1 otherwise.
    ///
    /// Asks GET /healthz (the process serves), or with --ready GET /readyz (replay is done
    /// and jobs run); exit 0 on 200, else 1 with one line on stderr. For a container's
    /// HEALTHCHECK.
    Health {
        /// Ask /readyz: replay is done and the worker runs
        #[arg(long)]
        ready: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

impl Command {
    fn connection(&self) -> &Connection {
        match self {
            Command::Submit { connection, .. }
            | Command::Status { connection, .. }
            | Command::List { connection, .. }
            | Command::Queue { connection, .. }
            | Command::Cancel { connection, .. }
            | Command::Retry { connection, .. }
            | Command::Logs { connection, .. }
            | Command::Wait { connection, .. }
            | Command::Offer { connection, .. }
            | Command::Nodes { connection, .. }
            | Command::Health { connection, .. } => connection,
        }
    }
}

/// Runs one client command against the daemon and returns its exit code. Errors are
/// printed here, as one line on stderr.
pub fn run(command: Command) -> ExitCode {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let connection = command.connection();
    let result = http::Api::new(
        connection.server.as_deref(),
        env("TRAINING_WORKER_LISTEN").as_deref(),
        env("TRAINING_WORKER_API_TOKEN"),
        connection.ca_cert.as_deref(),
    )
    .map_err(ClientError::from)
    .and_then(|api| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))?;
        let style = render::Style::detect();
        runtime.block_on(commands::run(&api, &style, command))
    });
    match result {
        Ok(exit) => exit.into(),
        Err(e) => {
            if !matches!(e, ClientError::StdoutClosed) {
                eprintln!("error: {}", one_line(&format!("{e:#}")));
            }
            e.exit().into()
        }
    }
}

/// Folds a message onto one line: a server's message or an OS error may hold newlines.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_named_by_its_id_or_a_prefix_of_it() {
        let id = "123e4567-e89b-12d3-a456-426614174000";
        assert_eq!(
            id.parse::<JobRef>(),
            Ok(JobRef::Id(id.parse().expect("a UUID")))
        );
        assert_eq!(
            "123E4567".parse::<JobRef>(),
            Ok(JobRef::Prefix("123e4567".into()))
        );
        assert_eq!(
            "123e4567-e8".parse::<JobRef>(),
            Ok(JobRef::Prefix("123e4567-e8".into()))
        );
        for bad in [
            "123",
            "not-a-uuid",
            "",
            "123e4567-e89b-12d3-a456-42661417400x",
        ] {
            let e = bad.parse::<JobRef>().expect_err(bad);
            assert!(e.contains("not a job id"), "{e}");
        }
    }
}
