//! The supervisor: a small process beside each trainer that owns the trainer's whole tree.
//!
//! The daemon never spawns a trainer itself. It spawns its own binary as
//! `training-worker supervise` (a hidden subcommand), which spawns the trainer and stays its
//! parent. The supervisor is a child subreaper, so every process the trainer starts stays
//! in its subtree even after leaving the trainer's process group (`setsid`, a double fork):
//! orphans are reparented to the supervisor, not to init. That lets it promise two things
//! the daemon alone could not:
//!
//! - **No descendant outlives the job.** When the trainer's leader exits, or is stopped,
//!   the supervisor kills every process left below it and reports the outcome only once
//!   none is left. So the worker frees a job's GPUs only when its tree is gone.
//! - **No trainer outlives its daemon.** The daemon holds the write end of the supervisor's
//!   stdin. When the daemon dies, however it dies, the kernel closes it; the supervisor reads
//!   end-of-file and kills the whole tree at once. The trainer's leader also gets a
//!   parent-death signal tied to the supervisor, which is single-threaded, so a SIGKILLed
//!   supervisor still takes its leader with it (its other descendants carry the owner mark,
//!   which the next daemon's boot sweep kills).
//!
//! It also writes the trainer's output into the job's log (the trainer's stdout and stderr
//! are one pipe to it), rotating the log when it reaches `max_log_bytes`; see [`LogWriter`].
//!
//! ## Protocol
//! Lines of text, both ways.
//!
//! Daemon to supervisor (its stdin):
//! - `stop`: SIGTERM to every process of the tree, SIGKILL to what remains after the grace.
//! - `kill`: SIGKILL to every process of the tree now.
//! - `lease MS [GRACE_MS]`: unless another `lease` line arrives within MS milliseconds,
//!   stop the trainer as for `stop`, with GRACE_MS between SIGTERM and SIGKILL when given,
//!   run the `--on-lease-expiry` command if there is one (`docker kill` of a container),
//!   and say `lease-expired`. A renewal that stops arriving, because the daemon is paused
//!   or cut off from the database, then stops the trainer without the daemon's help.
//! - end of file: the daemon is gone; SIGKILL to the tree now.
//!
//! Supervisor to daemon (its stdout):
//! - `started PID`: the trainer runs, with this process id.
//! - `spawn-failed MESSAGE`: the trainer could not be started (nothing ran).
//! - `lease-expired`: a lease ran out; the stop has begun.
//! - `wandb URL`: the first `https://wandb.ai/...` address the trainer printed (once at
//!   most: a run's W&B page, which the trainer API shows as the task's `wandb_url`).
//! - `exited CODE` or `signalled SIGNAL`: how the trainer's leader ended, sent once no
//!   process of the tree is left; the supervisor exits right after.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::warn;

/// The hidden subcommand the daemon runs its own binary with.
pub const SUBCOMMAND: &str = "supervise";

/// The running binary, even if a redeploy has replaced or removed its file since it
/// started: what the daemon runs as the supervisor.
pub const THIS_BINARY: &str = "/proc/self/exe";

/// What the supervisor is told on its command line.
#[derive(Debug, Clone)]
pub struct Args {
    /// The job's log: the trainer's output is appended to it.
    pub log: PathBuf,
    /// Rotate the log when it reaches this size; 0: never.
    pub max_log_bytes: u64,
    /// Between SIGTERM and SIGKILL when the trainer is stopped.
    pub grace: Duration,
    /// The soft descriptor limit the trainer gets; `None`: the supervisor's own.
    pub nofile: Option<u64>,
    /// Run when a lease runs out, beside the stop (`docker kill` of the container whose
    /// output this supervisor follows); empty: nothing.
    pub on_lease_expiry: Vec<OsString>,
    /// The trainer's argv; its environment is the supervisor's own.
    pub argv: Vec<OsString>,
}

impl Args {
    /// The supervisor's arguments after the subcommand, as the daemon passes them.
    pub fn to_command_line(&self) -> Vec<OsString> {
        let mut line: Vec<OsString> = vec![
            "--log".into(),
            self.log.clone().into_os_string(),
            "--max-log-bytes".into(),
            self.max_log_bytes.to_string().into(),
            "--grace-ms".into(),
            self.grace.as_millis().to_string().into(),
        ];
        if let Some(nofile) = self.nofile {
            line.push("--nofile".into());
            line.push(nofile.to_string().into());
        }
        for word in &self.on_lease_expiry {
            line.push("--on-lease-expiry".into());
            line.push(word.clone());
        }
        line.push("--".into());
        line.extend(self.argv.iter().cloned());
        line
    }

    /// Parses what [`Args::to_command_line`] made.
    pub fn parse(mut line: impl Iterator<Item = OsString>) -> Result<Args, String> {
        let mut log = None;
        let mut max_log_bytes = 0;
        let mut grace = Duration::from_secs(10);
        let mut nofile = None;
        let mut on_lease_expiry = Vec::new();
        loop {
            let Some(flag) = line.next() else {
                return Err("missing `--` before the trainer's argv".into());
            };
            let flag = flag.to_string_lossy().into_owned();
            if flag == "--" {
                break;
            }
            let value = line.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let number = || {
                value
                    .to_string_lossy()
                    .parse::<u64>()
                    .map_err(|e| format!("{flag}: {e}"))
            };
            match flag.as_str() {
                "--log" => log = Some(PathBuf::from(value.clone())),
                "--max-log-bytes" => max_log_bytes = number()?,
                "--grace-ms" => grace = Duration::from_millis(number()?),
                "--nofile" => nofile = Some(number()?),
                "--on-lease-expiry" => on_lease_expiry.push(value.clone()),
                _ => return Err(format!("unknown argument {flag}")),
            }
        }
        let argv: Vec<OsString> = line.collect();
        if argv.is_empty() {
            return Err("no trainer argv after `--`".into());
        }
        Ok(Args {
            log: log.ok_or("--log is required")?,
            max_log_bytes,
            grace,
            nofile,
            on_lease_expiry,
            argv,
        })
    }
}

/// A message from the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Stop,
    Kill,
    /// The lease's length, and the grace of the stop it makes when it runs out.
    Lease(Duration, Option<Duration>),
}

impl Control {
    pub fn line(&self) -> String {
        match self {
            Control::Stop => "stop\n".into(),
            Control::Kill => "kill\n".into(),
            Control::Lease(ms, None) => format!("lease {}\n", ms.as_millis()),
            Control::Lease(ms, Some(grace)) => {
                format!("lease {} {}\n", ms.as_millis(), grace.as_millis())
            }
        }
    }

    fn parse(line: &str) -> Option<Control> {
        let mut words = line.split_whitespace();
        match (words.next()?, words.next(), words.next(), words.next()) {
            ("stop", None, None, None) => Some(Control::Stop),
            ("kill", None, None, None) => Some(Control::Kill),
            ("lease", Some(ms), grace, None) => {
                let ms = Duration::from_millis(ms.parse().ok()?);
                let grace = match grace {
                    Some(g) => Some(Duration::from_millis(g.parse().ok()?)),
                    None => None,
                };
                Some(Control::Lease(ms, grace))
            }
            _ => None,
        }
    }
}

/// A message from the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Started(u32),
    SpawnFailed(String),
    LeaseExpired,
    /// The first W&B address in the trainer's output.
    WandbUrl(String),
    Exited(i32),
    Signalled(i32),
}

impl Report {
    pub fn line(&self) -> String {
        match self {
            Report::Started(pid) => format!("started {pid}\n"),
            // One line, whatever the message holds.
            Report::SpawnFailed(e) => format!("spawn-failed {}\n", e.replace('\n', " ")),
            Report::LeaseExpired => "lease-expired\n".into(),
            Report::WandbUrl(url) => format!("wandb {url}\n"),
            Report::Exited(code) => format!("exited {code}\n"),
            Report::Signalled(sig) => format!("signalled {sig}\n"),
        }
    }

    pub fn parse(line: &str) -> Option<Report> {
        let line = line.trim_end_matches(['\n', '\r']);
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "started" => rest.parse().ok().map(Report::Started),
            "spawn-failed" => Some(Report::SpawnFailed(rest.to_string())),
            "lease-expired" => Some(Report::LeaseExpired),
            "wandb" if !rest.is_empty() && !rest.contains(char::is_whitespace) => {
                Some(Report::WandbUrl(rest.to_string()))
            }
            "exited" => rest.parse().ok().map(Report::Exited),
            "signalled" => rest.parse().ok().map(Report::Signalled),
            _ => None,
        }
    }
}

/// The daemon's side: a supervised trainer, spoken to over the supervisor's stdin and
/// stdout. Dropping it closes the supervisor's stdin, which kills the trainer's tree.
pub struct Supervised {
    child: tokio::process::Child,
    control: Option<tokio::process::ChildStdin>,
    /// The supervisor's reports, read as they come by a task of their own, so that a
    /// W&B address reaches its sink while the trainer runs.
    reports: tokio::sync::mpsc::UnboundedReceiver<Report>,
    /// The supervisor said its lease ran out: the stop that follows is the lease's.
    pub lease_expired: bool,
}

/// Where a supervised trainer's first W&B address goes, as soon as it is printed.
pub type UrlSink = Box<dyn Fn(String) + Send + Sync>;

/// How long a supervisor may take to report after being told to stop, beyond the grace,
/// before it is killed itself (its trainer's leader then dies by its parent-death signal).
const REPORT_SLACK: Duration = Duration::from_secs(15);

impl Supervised {
    /// Spawns the supervisor, which spawns `argv` with exactly `env`. An error here means
    /// the supervisor itself could not start (out of descriptors, say); a trainer that
    /// cannot start is reported by [`Supervised::started`].
    pub fn spawn(
        program: &Path,
        args: &Args,
        env: &[(String, String)],
        wandb: Option<UrlSink>,
    ) -> io::Result<Supervised> {
        let mut command = tokio::process::Command::new(program);
        command
            .arg0("training-worker")
            .arg(SUBCOMMAND)
            .args(args.to_command_line())
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own group, so that a Ctrl-C meant for the daemon does not reach it.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = command.spawn()?;
        let control = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("the supervisor's stdout is not piped"))?;
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let (sender, reports) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                match Report::parse(&line) {
                    Some(Report::WandbUrl(url)) => {
                        if let Some(sink) = &wandb {
                            sink(url);
                        }
                    }
                    Some(report) => {
                        if sender.send(report).is_err() {
                            return;
                        }
                    }
                    None => warn!(line = %line, "unknown line from a supervisor"),
                }
            }
        });
        Ok(Supervised {
            child,
            control,
            reports,
            lease_expired: false,
        })
    }

    /// Waits for the trainer to start: its pid, or why it could not start.
    pub async fn started(&mut self) -> Result<u32, String> {
        match self.next().await {
            Some(Report::Started(pid)) => Ok(pid),
            Some(Report::SpawnFailed(e)) => Err(e),
            Some(other) => Err(format!("the supervisor said {other:?} before starting")),
            None => Err(self.died().await),
        }
    }

    /// Waits for the trainer's end (its whole tree gone): how its leader ended, or why the
    /// supervisor could not say.
    pub async fn ended(&mut self) -> Result<Report, String> {
        loop {
            match self.next().await {
                Some(Report::LeaseExpired) => {
                    warn!("a trainer's lease ran out; its supervisor stops it");
                    self.lease_expired = true;
                }
                Some(end @ (Report::Exited(_) | Report::Signalled(_))) => {
                    let _ = self.child.wait().await;
                    return Ok(end);
                }
                Some(other) => return Err(format!("the supervisor said {other:?}")),
                None => return Err(self.died().await),
            }
        }
    }

    /// Tells the supervisor to stop the trainer (SIGTERM, SIGKILL after the grace) and
    /// waits for the end. A supervisor that does not report in time is killed.
    pub async fn stop(&mut self, grace: Duration) -> Result<Report, String> {
        self.send(Control::Stop).await;
        match tokio::time::timeout(grace + REPORT_SLACK, self.ended()).await {
            Ok(end) => end,
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                Err("the supervisor did not report after the stop; killed it".into())
            }
        }
    }

    /// Renews the trainer's lease: it is stopped, with `grace` between SIGTERM and
    /// SIGKILL, unless renewed again within `ttl`.
    pub async fn renew(&mut self, ttl: Duration, grace: Duration) {
        self.send(Control::Lease(ttl, Some(grace))).await;
    }

    async fn send(&mut self, message: Control) {
        use tokio::io::AsyncWriteExt;
        if let Some(control) = self.control.as_mut()
            && control.write_all(message.line().as_bytes()).await.is_err()
        {
            self.control = None;
        }
    }

    async fn next(&mut self) -> Option<Report> {
        self.reports.recv().await
    }

    /// Why the supervisor stopped talking.
    async fn died(&mut self) -> String {
        match self.child.wait().await {
            Ok(status) => format!("the trainer's supervisor ended without a report ({status})"),
            Err(e) => format!("cannot wait for the trainer's supervisor: {e}"),
        }
    }
}

/// Set by the SIGTERM handler: someone asked the supervisor itself to stop.
static TERM_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM_REQUESTED.store(true, Ordering::SeqCst);
}

/// The supervisor process's main: runs the trainer to its end and reports. The exit code
/// is 0 once a final report was written, 2 for arguments it cannot use.
pub fn main(line: impl Iterator<Item = OsString>) -> ExitCode {
    let args = match Args::parse(line) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: supervise: {e}");
            return ExitCode::from(2);
        }
    };
    let mut out = io::stdout().lock();
    let report = |out: &mut io::StdoutLock, report: Report| {
        // The daemon may be gone; then nobody needs the answer.
        let _ = out.write_all(report.line().as_bytes());
        let _ = out.flush();
    };
    match Supervisor::start(&args) {
        Ok(mut supervisor) => {
            report(&mut out, Report::Started(supervisor.leader));
            let end = supervisor.run(|r| report(&mut out, r));
            report(&mut out, end);
        }
        Err(e) => report(&mut out, Report::SpawnFailed(e.to_string())),
    }
    ExitCode::SUCCESS
}

/// The supervisor's state while its trainer runs.
struct Supervisor {
    leader: u32,
    /// Readable when the leader has exited; `None` where pidfds are not available (then the
    /// loop's timeout finds the exit).
    leader_fd: Option<OwnedFd>,
    /// The read end of the trainer's stdout and stderr; `None` once every writer is gone.
    output: Option<File>,
    log: LogWriter,
    grace: Duration,
    on_lease_expiry: Vec<OsString>,
    /// Looks for the first W&B address in the output; `None` once it was found.
    wandb: Option<UrlScanner>,
    /// Found and not yet reported.
    found: Option<String>,
}

impl Supervisor {
    fn start(args: &Args) -> io::Result<Supervisor> {
        // SAFETY: signal dispositions are process-wide and set before any child exists; the
        // handler only stores to an atomic.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_term as *const () as usize;
            // No SA_RESTART: a SIGTERM interrupts poll, which then looks at the flag.
            action.sa_flags = 0;
            libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
            if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let log = LogWriter::open(&args.log, args.max_log_bytes)?;
        let (read, write) = pipe()?;
        let mut command = Command::new(&args.argv[0]);
        command
            .args(&args.argv[1..])
            .stdin(Stdio::null())
            .stdout(write.try_clone()?)
            .stderr(write)
            .process_group(0);
        let supervisor = std::process::id();
        let nofile = args.nofile;
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe system calls (prctl, getppid, kill on itself, get/setrlimit).
        unsafe {
            command.pre_exec(move || {
                if let Some(soft) = nofile {
                    let mut limit = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                        limit.rlim_cur = soft.min(limit.rlim_max);
                        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                    }
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The supervisor may have died between fork and prctl.
                if libc::getppid() as u32 != supervisor {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        // Dropped with the command: only the trainer's tree holds the write end now, so the
        // read end sees end-of-file once all of it is gone.
        drop(command);
        let leader = child.id();
        // The child is reaped by pid below, not through `Child`.
        drop(child);
        Ok(Supervisor {
            leader,
            leader_fd: pidfd_open(leader),
            output: Some(read),
            log,
            grace: args.grace,
            on_lease_expiry: args.on_lease_expiry.clone(),
            wandb: Some(UrlScanner::new(WANDB_PREFIX)),
            found: None,
        })
    }

    /// Runs until the leader has exited and every other process of the tree is gone.
    fn run(&mut self, mut report: impl FnMut(Report)) -> Report {
        let mut control = Some(ControlReader::stdin());
        let mut kill_at: Option<Instant> = None;
        let mut lease_until: Option<Instant> = None;
        let mut lease_grace: Option<Duration> = None;
        let mut status = None;
        let stop = |kill_at: &mut Option<Instant>, grace: Duration| {
            if kill_at.is_none() {
                signal_tree(libc::SIGTERM);
                *kill_at = Some(Instant::now() + grace);
            }
        };
        loop {
            if let Some(s) = reap(self.leader) {
                status = Some(s);
            }
            if status.is_some() {
                break;
            }
            if TERM_REQUESTED.swap(false, Ordering::SeqCst) {
                stop(&mut kill_at, self.grace);
            }
            let now = Instant::now();
            if kill_at.is_some_and(|at| at <= now) {
                signal_tree(libc::SIGKILL);
            }
            if lease_until.is_some_and(|at| at <= now) {
                lease_until = None;
                report(Report::LeaseExpired);
                stop(&mut kill_at, lease_grace.unwrap_or(self.grace));
                self.run_on_lease_expiry();
            }
            let next = [kill_at, lease_until]
                .into_iter()
                .flatten()
                .filter(|at| *at > now)
                .min();
            // Without a pidfd, the leader's exit is found by the reap above at this pace.
            let cap = if self.leader_fd.is_some() {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(50)
            };
            let wait = next.map_or(cap, |at| (at - now).min(cap));
            let mut fds = Vec::with_capacity(3);
            let control_fd = control.as_ref().map(|c| c.fd());
            let output_fd = self.output.as_ref().map(File::as_raw_fd);
            let leader_fd = self.leader_fd.as_ref().map(AsRawFd::as_raw_fd);
            for fd in [control_fd, output_fd, leader_fd].into_iter().flatten() {
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            if poll(&mut fds, wait).is_err() {
                // EINTR: a signal; the flag is looked at on the next turn.
                continue;
            }
            let ready = |fd: Option<RawFd>| {
                fd.is_some_and(|fd| fds.iter().any(|p| p.fd == fd && p.revents != 0))
            };
            if ready(output_fd) {
                self.pump_output();
            }
            if let Some(url) = self.found.take() {
                report(Report::WandbUrl(url));
            }
            if ready(control_fd)
                && let Some(reader) = control.as_mut()
            {
                match reader.read() {
                    None => {
                        // The daemon is gone: nothing may outlive it.
                        control = None;
                        signal_tree(libc::SIGKILL);
                        kill_at = Some(Instant::now());
                    }
                    Some(messages) => {
                        for message in messages {
                            match message {
                                Control::Stop => stop(&mut kill_at, self.grace),
                                Control::Kill => {
                                    signal_tree(libc::SIGKILL);
                                    kill_at = Some(Instant::now());
                                }
                                Control::Lease(ms, grace) => {
                                    lease_until = Some(Instant::now() + ms);
                                    lease_grace = grace;
                                }
                            }
                        }
                    }
                }
            }
        }
        // The leader has exited: nothing of its tree may stay behind it.
        self.sweep();
        if let Some(url) = self.found.take().or_else(|| self.wandb.take()?.finish()) {
            report(Report::WandbUrl(url));
        }
        let status = status.expect("the loop ends only once the leader's status is known");
        if libc::WIFEXITED(status) {
            Report::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            Report::Signalled(libc::WTERMSIG(status))
        } else {
            Report::Exited(-1)
        }
    }

    /// Runs the `--on-lease-expiry` command and waits for it a while: a container must be
    /// killed before the lease can lapse.
    fn run_on_lease_expiry(&self) {
        let Some((program, args)) = self.on_lease_expiry.split_first() else {
            return;
        };
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                eprintln!("warning: supervise: cannot run the lease-expiry command: {e}");
                return;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("warning: supervise: the lease-expiry command did not finish in 10 s");
    }

    /// Copies what the trainer wrote into the log; notes the end of its output.
    fn pump_output(&mut self) {
        let Some(output) = self.output.as_mut() else {
            return;
        };
        let mut buf = [0u8; 64 * 1024];
        match output.read(&mut buf) {
            Ok(0) => self.output = None,
            Ok(n) => {
                self.log.write(&buf[..n]);
                if let Some(url) = self.wandb.as_mut().and_then(|s| s.feed(&buf[..n])) {
                    self.wandb = None;
                    self.found = Some(url);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("warning: supervise: cannot read the trainer's output: {e}");
                self.output = None;
            }
        }
    }

    /// Kills every descendant until none is left, reaping them, then takes in the output
    /// they wrote last.
    fn sweep(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            while reap_any().is_some() {}
            let left = descendants(std::process::id());
            if left.is_empty() || Instant::now() > deadline {
                if !left.is_empty() {
                    eprintln!(
                        "warning: supervise: {} processes of the trainer would not die",
                        left.len()
                    );
                }
                break;
            }
            for pid in left {
                // SAFETY: kill only sends a signal; these are our own descendants.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            // Wait for them to die while draining what they write, so that none blocks on
            // a full pipe.
            self.drain_for(Duration::from_millis(10));
        }
        // Every writer is gone now; read what is left. Bounded, in case a process outside
        // the tree was handed the pipe.
        let until = Instant::now() + Duration::from_secs(2);
        while self.output.is_some() && Instant::now() < until {
            self.drain_for(Duration::from_millis(100));
        }
    }

    fn drain_for(&mut self, wait: Duration) {
        let Some(fd) = self.output.as_ref().map(File::as_raw_fd) else {
            std::thread::sleep(wait);
            return;
        };
        let mut fds = [libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        if poll(&mut fds, wait).is_ok() && fds[0].revents != 0 {
            self.pump_output();
        }
    }
}

/// Where a run's W&B page lives.
pub const WANDB_PREFIX: &str = "https://wandb.ai/";

/// The longest line looked at whole; a longer one is looked at in its last part only.
const SCAN_LINE_MAX: usize = 8 * 1024;

/// Finds the first address that starts with a prefix in output that comes in pieces: it is
/// looked for line by line, so an address cut between two reads is still found.
#[derive(Debug)]
pub struct UrlScanner {
    prefix: &'static str,
    /// The current line, not yet ended.
    line: Vec<u8>,
}

impl UrlScanner {
    pub fn new(prefix: &'static str) -> UrlScanner {
        UrlScanner {
            prefix,
            line: Vec::new(),
        }
    }

    /// Takes more output; the first address found in a line it ends.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Option<String> {
        // Carriage returns end lines too: progress bars redraw a line with them.
        while let Some(end) = bytes.iter().position(|b| *b == b'\n' || *b == b'\r') {
            self.push(&bytes[..end]);
            if let Some(url) = self.finish_line() {
                return Some(url);
            }
            bytes = &bytes[end + 1..];
        }
        self.push(bytes);
        None
    }

    /// The output has ended: the last line, if it did not end with a newline.
    pub fn finish(&mut self) -> Option<String> {
        self.finish_line()
    }

    fn push(&mut self, bytes: &[u8]) {
        self.line.extend_from_slice(bytes);
        if self.line.len() > SCAN_LINE_MAX {
            let cut = self.line.len() - SCAN_LINE_MAX / 2;
            self.line.drain(..cut);
        }
    }

    fn finish_line(&mut self) -> Option<String> {
        let line = std::mem::take(&mut self.line);
        find_url(&line, self.prefix)
    }
}

/// The first address in `line` that starts with `prefix`, up to the first character that
/// cannot be part of it (space, a control character such as a colour code's ESC, a quote,
/// a bracket), without a trailing full stop or comma.
fn find_url(line: &[u8], prefix: &str) -> Option<String> {
    let prefix = prefix.as_bytes();
    let mut from = 0;
    while let Some(at) = line[from..]
        .windows(prefix.len())
        .position(|w| w == prefix)
        .map(|p| p + from)
    {
        let rest = &line[at..];
        let end = rest
            .iter()
            .position(|b| {
                !b.is_ascii_graphic()
                    || matches!(b, b'"' | b'\'' | b'<' | b'>' | b'`' | b')' | b']')
            })
            .unwrap_or(rest.len());
        let url = rest[..end]
            .strip_suffix(b".")
            .or_else(|| rest[..end].strip_suffix(b","))
            .unwrap_or(&rest[..end]);
        if url.len() > prefix.len() {
            return Some(String::from_utf8_lossy(url).into_owned());
        }
        from = at + prefix.len();
    }
    None
}

/// Reads control lines from the daemon without blocking the loop.
struct ControlReader {
    stdin: File,
    pending: Vec<u8>,
}

impl ControlReader {
    fn stdin() -> ControlReader {
        // SAFETY: fd 0 is the supervisor's stdin, owned by nothing else in this process;
        // the reader is made once.
        let stdin = unsafe { File::from_raw_fd(0) };
        ControlReader {
            stdin,
            pending: Vec::new(),
        }
    }

    fn fd(&self) -> RawFd {
        self.stdin.as_raw_fd()
    }

    /// The complete messages read now; `None` at end of file or on an error.
    fn read(&mut self) -> Option<Vec<Control>> {
        let mut buf = [0u8; 4096];
        let n = match self.stdin.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Some(Vec::new()),
            Err(_) => return None,
        };
        self.pending.extend_from_slice(&buf[..n]);
        let mut messages = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            match Control::parse(&text) {
                Some(message) => messages.push(message),
                None => eprintln!("warning: supervise: unknown message {:?}", text.trim()),
            }
        }
        Some(messages)
    }
}

/// Appends to a job's log, rotating it at `max_bytes`: the log becomes `<log>.1` (replacing
/// an older one), and `<log>.offset` records where the new log starts in the job's whole
/// output, so that a reader's offsets keep counting across rotations (see [`LogOffsets`]).
/// A log never grows far past `max_bytes`, so one job's output takes at most about twice
/// that on disk.
pub struct LogWriter {
    path: PathBuf,
    file: File,
    max_bytes: u64,
    /// Set after a failed write, so that a full disk is reported once, not per line.
    failing: bool,
}

impl LogWriter {
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<LogWriter> {
        Ok(LogWriter {
            path: path.to_path_buf(),
            file: open_append(path)?,
            max_bytes,
            failing: false,
        })
    }

    pub fn write(&mut self, bytes: &[u8]) {
        match self.file.write_all(bytes) {
            Ok(()) => self.failing = false,
            Err(e) => {
                if !self.failing {
                    eprintln!(
                        "warning: supervise: cannot write {}: {e}",
                        self.path.display()
                    );
                }
                self.failing = true;
            }
        }
        if self.max_bytes > 0
            && let Ok(meta) = self.file.metadata()
            && meta.len() >= self.max_bytes
            && let Err(e) = self.rotate(meta.len())
        {
            eprintln!(
                "warning: supervise: cannot rotate {}: {e}",
                self.path.display()
            );
        }
    }

    fn rotate(&mut self, size: u64) -> io::Result<()> {
        let offsets = LogOffsets::new(&self.path);
        let base = offsets.base();
        std::fs::rename(&self.path, offsets.rotated())?;
        // The new base is written before the new log exists: a reader that finds the new
        // log finds its base too.
        let temp = suffixed(&offsets.base_file(), ".tmp");
        std::fs::write(&temp, (base + size).to_string())?;
        std::fs::rename(&temp, offsets.base_file())?;
        self.file = open_append(&self.path)?;
        Ok(())
    }
}

/// Where a job's log starts in its whole output, and the rotated part before it.
pub struct LogOffsets {
    path: PathBuf,
}

impl LogOffsets {
    pub fn new(log: &Path) -> LogOffsets {
        LogOffsets {
            path: log.to_path_buf(),
        }
    }

    /// The previous part of the log, rotated away.
    pub fn rotated(&self) -> PathBuf {
        suffixed(&self.path, ".1")
    }

    fn base_file(&self) -> PathBuf {
        suffixed(&self.path, ".offset")
    }

    /// How many bytes of the job's output came before the current log file: 0 until the
    /// first rotation.
    pub fn base(&self) -> u64 {
        std::fs::read_to_string(self.base_file())
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    }
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    unsafe { Ok((File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))) }
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the descriptor was just created and is owned by nothing else.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn poll(fds: &mut [libc::pollfd], wait: Duration) -> io::Result<usize> {
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: the slice is valid for its length for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Reaps every exited child; returns the leader's wait status once it has exited.
fn reap(leader: u32) -> Option<libc::c_int> {
    let mut leader_status = None;
    while let Some((pid, status)) = reap_any() {
        if pid as u32 == leader {
            leader_status = Some(status);
        }
    }
    leader_status
}

fn reap_any() -> Option<(libc::pid_t, libc::c_int)> {
    let mut status = 0;
    // SAFETY: waitpid writes the status into a local.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    (pid > 0).then_some((pid, status))
}

/// Sends `signal` to every live descendant of the supervisor.
fn signal_tree(signal: libc::c_int) {
    for pid in descendants(std::process::id()) {
        // SAFETY: kill only sends a signal; these are our own descendants.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// The live (not zombie) descendants of `root`, from `/proc`.
pub fn descendants(root: u32) -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut parents: Vec<(libc::pid_t, libc::pid_t, bool)> = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(stat) = parse_stat(&stat) {
            parents.push((pid, stat.ppid, stat.state == 'Z'));
        }
    }
    let mut found = vec![root as libc::pid_t];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for (pid, ppid, _) in &parents {
            if *ppid == parent && !found.contains(pid) {
                found.push(*pid);
            }
        }
        i += 1;
    }
    found
        .into_iter()
        .skip(1)
        .filter(|pid| !parents.iter().any(|(p, _, zombie)| p == pid && *zombie))
        .collect()
}

/// What `/proc/PID/stat` says of a process that the supervisor and the boot sweep use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub state: char,
    pub ppid: libc::pid_t,
    pub pgid: libc::pid_t,
}

/// Parses `/proc/PID/stat`. The command name may hold spaces and parentheses, so fields are
/// counted after its last `)`.
pub(crate) fn parse_stat(stat: &str) -> Option<ProcStat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    Some(ProcStat { state, ppid, pgid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_round_trips() {
        let args = Args {
            log: "/tmp/x y.log".into(),
            max_log_bytes: 1024,
            grace: Duration::from_millis(1500),
            nofile: Some(1024),
            on_lease_expiry: vec!["docker".into(), "kill".into(), "tw-1-train".into()],
            argv: vec!["/bin/sh".into(), "-c".into(), "echo --log".into()],
        };
        let parsed = Args::parse(args.to_command_line().into_iter()).unwrap();
        assert_eq!(parsed.log, args.log);
        assert_eq!(parsed.max_log_bytes, 1024);
        assert_eq!(parsed.grace, Duration::from_millis(1500));
        assert_eq!(parsed.nofile, Some(1024));
        assert_eq!(parsed.on_lease_expiry, args.on_lease_expiry);
        assert_eq!(parsed.argv, args.argv);
        assert!(Args::parse(["--log".into(), "x".into()].into_iter()).is_err());
        assert!(Args::parse(["--log".into(), "x".into(), "--".into()].into_iter()).is_err());
    }

    #[test]
    fn messages_round_trip() {
        for control in [
            Control::Stop,
            Control::Kill,
            Control::Lease(Duration::from_millis(5000), None),
            Control::Lease(
                Duration::from_millis(5000),
                Some(Duration::from_millis(300)),
            ),
        ] {
            assert_eq!(Control::parse(&control.line()), Some(control));
        }
        for report in [
            Report::Started(42),
            Report::SpawnFailed("No such file or directory (os error 2)".into()),
            Report::LeaseExpired,
            Report::WandbUrl("https://wandb.ai/team/project/runs/abc123".into()),
            Report::Exited(3),
            Report::Signalled(9),
        ] {
            assert_eq!(Report::parse(&report.line()), Some(report));
        }
        assert_eq!(
            Report::parse(&Report::SpawnFailed("a\nb".into()).line()),
            Some(Report::SpawnFailed("a b".into()))
        );
        assert_eq!(Control::parse("lease soon\n"), None);
    }

    #[test]
    fn the_first_wandb_address_is_found_across_reads_and_colour_codes() {
        let mut scanner = UrlScanner::new(WANDB_PREFIX);
        assert_eq!(
            scanner.feed(b"wandb: Syncing run\nsee https://wandb.ai/ for"),
            None
        );
        assert_eq!(
            scanner.feed(b" more\nwandb: \x1b[34m\x1b[4mhttps://wandb.ai/te"),
            None
        );
        assert_eq!(
            scanner.feed(b"am/proj/runs/x1y2\x1b[0m\n"),
            Some("https://wandb.ai/team/proj/runs/x1y2".into())
        );
        let mut last = UrlScanner::new(WANDB_PREFIX);
        assert_eq!(last.feed(b"View run at https://wandb.ai/a/b/runs/c."), None);
        assert_eq!(last.finish(), Some("https://wandb.ai/a/b/runs/c".into()));
        let mut progress = UrlScanner::new(WANDB_PREFIX);
        assert_eq!(
            progress.feed(b"10%\r(https://wandb.ai/a/b)\r20%"),
            Some("https://wandb.ai/a/b".into())
        );
        let mut none = UrlScanner::new(WANDB_PREFIX);
        assert_eq!(
            none.feed(b"http://wandb.ai/x https://example.com/wandb.ai/\n"),
            None
        );
        assert_eq!(none.finish(), None);
    }

    #[test]
    fn stat_lines_with_odd_names_parse() {
        assert_eq!(
            parse_stat("123 (a b) c) S 77 120 123 0 -1"),
            Some(ProcStat {
                state: 'S',
                ppid: 77,
                pgid: 120
            })
        );
        assert_eq!(parse_stat("9 (z) Z 1 9").map(|s| s.state), Some('Z'));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_log_rotates_at_its_cap_and_keeps_counting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.log");
        let mut log = LogWriter::open(&path, 10).unwrap();
        log.write(b"0123456789abc");
        let offsets = LogOffsets::new(&path);
        assert_eq!(offsets.base(), 13);
        assert_eq!(std::fs::read(offsets.rotated()).unwrap(), b"0123456789abc");
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        log.write(b"more");
        assert_eq!(std::fs::read(&path).unwrap(), b"more");
        log.write(b"0123456");
        assert_eq!(offsets.base(), 24);
        assert_eq!(std::fs::read(offsets.rotated()).unwrap(), b"more0123456");
    }
}
