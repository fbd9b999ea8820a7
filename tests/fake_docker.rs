//! The fake docker CLI (tests/support/fake-docker) that the container-stage tests run the
//! daemon against: its contract, checked on its own. `run -d` prints an id and the container
//! outlives its caller's process group; `ps -a --filter label=... --format` lists it with its
//! labels; `logs -f [--since]` streams until it exits; `wait` prints its exit code; `stop -t`
//! escalates to SIGKILL; `kill`, `rm -f` and name conflicts answer like docker; `calls.log`
//! holds each argv as JSON and no secret; a container sees its `-e` variables and nothing of
//! its caller's environment.
//!
//! Every wait polls a condition with a deadline. The only fixed pauses are two short ones
//! before checking that something did *not* happen (a container still runs). Every container
//! a test starts is removed (`rm -f`) when the test ends.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tempfile::TempDir;

const FAKE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/fake-docker");
const POLL: Duration = Duration::from_millis(20);
const PS_FORMAT: &str = r#"{{.Names}}\t{{.State}}\t{{.Label "training-worker.job"}}\t{{.Label "training-worker.stage"}}"#;

/// A state directory for the fake, with its images; removes its containers when dropped.
struct Fake {
    dir: TempDir,
}

impl Fake {
    fn new() -> Fake {
        let dir = tempfile::Builder::new()
            .prefix("fake-docker-")
            .tempdir()
            .expect("temp dir");
        fs::create_dir_all(dir.path().join("state/images")).expect("images dir");
        Fake { dir }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A scratch file path, outside the fake's state.
    fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Installs an image: an executable bash script.
    fn image(&self, name: &str, body: &str) {
        let path = self.state().join("images").join(name);
        fs::write(&path, format!("#!/bin/bash\n{body}\n")).expect("write image");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod image");
    }

    /// The CLI as the daemon runs it: a cleared environment with PATH, HOME, the state dir
    /// and whatever `env` adds.
    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        self.program(FAKE, args, env)
    }

    /// Any program with the environment the daemon gives the CLI.
    fn program(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("DOCKER_FAKE_STATE", self.state())
            .stdin(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        command
    }

    fn docker_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.command(args, env)
            .output()
            .unwrap_or_else(|e| panic!("running fake-docker {args:?}: {e}"))
    }

    fn docker(&self, args: &[&str]) -> Output {
        self.docker_env(args, &[])
    }

    /// Runs a command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "fake-docker {args:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// `run -d` with the daemon's labels; the container id.
    fn run(&self, name: &str, extra: &[&str], image_and_args: &[&str]) -> String {
        self.run_env(name, extra, image_and_args, &[])
    }

    fn run_env(
        &self,
        name: &str,
        extra: &[&str],
        image_and_args: &[&str],
        env: &[(&str, &str)],
    ) -> String {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--label",
            "training-worker.job=J",
            "--label",
            "training-worker.stage=S",
            "--label",
            "training-worker.owner=test-owner",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(image_and_args);
        let out = self.docker_env(&args, env);
        assert!(
            out.status.success(),
            "run {name} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string();
        assert!(
            id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "run prints a 64-hex container id, got {id:?}"
        );
        id
    }

    /// Containers by name: (state, job label, stage label), from the daemon's `ps` call.
    fn ps(&self, owner: &str) -> BTreeMap<String, (String, String, String)> {
        let filter = format!("label=training-worker.owner={owner}");
        let text = self.ok(&[
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            &filter,
            "--format",
            PS_FORMAT,
        ]);
        text.lines()
            .map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                assert_eq!(
                    fields.len(),
                    4,
                    "ps line {line:?} has four tab-separated fields"
                );
                (
                    fields[0].to_string(),
                    (
                        fields[1].to_string(),
                        fields[2].to_string(),
                        fields[3].to_string(),
                    ),
                )
            })
            .collect()
    }

    fn state_of(&self, name: &str) -> String {
        self.ps("test-owner")
            .get(name)
            .map(|(state, _, _)| state.clone())
            .unwrap_or_else(|| "absent".into())
    }

    fn inspect(&self, name: &str) -> String {
        self.ok(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.ExitCode}}",
            name,
        ])
        .trim()
        .to_string()
    }

    fn logs(&self, name: &str) -> String {
        self.ok(&["logs", name])
    }

    /// The argv of every call so far, from calls.log.
    fn calls(&self) -> Vec<Vec<String>> {
        let text = fs::read_to_string(self.state().join("calls.log")).unwrap_or_default();
        text.lines()
            .map(|line| {
                let value: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("calls.log line {line:?} is not JSON: {e}"));
                value
                    .as_array()
                    .unwrap_or_else(|| panic!("calls.log line {line:?} is not an array"))
                    .iter()
                    .map(|v| v.as_str().expect("string argument").to_string())
                    .collect()
            })
            .collect()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let Ok(out) = self.command(&["ps", "-aq", "--no-trunc"], &[]).output() else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        if !ids.is_empty() {
            let mut args = vec!["rm".to_string(), "-f".to_string()];
            args.extend(ids);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = self.command(&args, &[]).output();
        }
    }
}

/// Polls `check` until it gives a value; panics naming `what` after `timeout`.
fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        thread::sleep(POLL);
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Whether `pid` runs (a zombie does not).
fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .unwrap_or("X");
    state != "Z" && state != "X"
}

/// Pids of the processes whose environment holds `entry` ("NAME=value").
fn processes_with_env(entry: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for proc_entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = proc_entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environ) = fs::read(proc_entry.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|e| e == entry.as_bytes()) && pid_alive(pid) {
            found.push(pid);
        }
    }
    found
}

/// An RFC 3339 UTC timestamp with microseconds, as the daemon passes to `logs --since`.
fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).expect("after 1970");
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// An image that prints a line, then waits until `release` exists, prints another and exits
/// with `code`.
fn gated_image(fake: &Fake, name: &str, release: &Path, code: i32) {
    fake.image(
        name,
        &format!(
            "echo \"first $*\"\nwhile [ ! -e {release} ]; do sleep 0.02; done\necho second\necho to-stderr >&2\nexit {code}",
            release = release.display()
        ),
    );
}

#[test]
fn run_lists_the_container_with_its_labels_and_ps_filters_by_owner() {
    let fake = Fake::new();
    let release = fake.scratch("release");
    gated_image(&fake, "worker", &release, 0);
    fake.run("tw-a-download", &[], &["worker"]);
    let out = fake.docker(&[
        "run",
        "-d",
        "--name",
        "other-owner",
        "--label",
        "training-worker.owner=someone-else",
        "worker",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let listed = fake.ps("test-owner");
    assert_eq!(
        listed.get("tw-a-download"),
        Some(&("running".to_string(), "J".to_string(), "S".to_string())),
        "ps lists the running container with its job and stage labels: {listed:?}"
    );
    assert!(
        !listed.contains_key("other-owner"),
        "the owner filter leaves others out"
    );
    assert_eq!(fake.inspect("tw-a-download"), "running 0");

    fs::write(&release, b"").expect("release");
    assert_eq!(fake.ok(&["wait", "tw-a-download"]).trim(), "0");
    assert_eq!(
        fake.state_of("tw-a-download"),
        "exited",
        "an exited container stays listed"
    );
    assert_eq!(fake.inspect("tw-a-download"), "exited 0");
}

#[test]
fn logs_follow_streams_until_the_container_exits_and_wait_prints_its_code() {
    let fake = Fake::new();
    let release = fake.scratch("release");
    gated_image(&fake, "worker", &release, 3);
    fake.run(
        "tw-b-train",
        &[],
        &["worker", "--task-id", "two words", "{\"json\": 1}"],
    );

    let follow = fake
        .command(&["logs", "-f", "tw-b-train"], &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("logs -f");
    let waiter = fake
        .command(&["wait", "tw-b-train"], &[])
        .stdout(Stdio::piped())
        .spawn()
        .expect("wait");
    wait_until(
        "the first line is in the log",
        Duration::from_secs(10),
        || fake.logs("tw-b-train").contains("first").then_some(()),
    );
    assert_eq!(
        fake.logs("tw-b-train"),
        "first --task-id two words {\"json\": 1}\n",
        "arguments reach the image as separate argv entries"
    );
    thread::sleep(Duration::from_millis(100));
    assert_eq!(
        fake.state_of("tw-b-train"),
        "running",
        "it waits for its release"
    );

    fs::write(&release, b"").expect("release");
    let followed = follow.wait_with_output().expect("logs -f ends");
    assert!(
        followed.status.success(),
        "logs -f exits 0: {}",
        stderr(&followed)
    );
    assert_eq!(
        stdout(&followed),
        "first --task-id two words {\"json\": 1}\nsecond\nto-stderr\n",
        "logs -f printed everything, stdout and stderr, then ended with the container"
    );
    let waited = waiter.wait_with_output().expect("wait ends");
    assert!(waited.status.success());
    assert_eq!(stdout(&waited), "3\n", "wait prints the exit code");
    assert_eq!(fake.inspect("tw-b-train"), "exited 3");
}

#[test]
fn logs_since_includes_what_was_written_after_the_time() {
    let fake = Fake::new();
    let release = fake.scratch("release");
    gated_image(&fake, "worker", &release, 0);
    fake.run("tw-c-train", &[], &["worker"]);
    wait_until(
        "the first line is in the log",
        Duration::from_secs(10),
        || fake.logs("tw-c-train").contains("first").then_some(()),
    );
    // A time well after the first line, and the second line written after that time.
    let since_time = SystemTime::now() + Duration::from_secs(1);
    let since = rfc3339(since_time);
    wait_until(
        "the clock passed the --since time",
        Duration::from_secs(5),
        || (SystemTime::now() > since_time).then_some(()),
    );
    // Following from that time while the container runs (an adopted container).
    let follow = fake
        .command(&["logs", "-f", "--since", &since, "tw-c-train"], &[])
        .stdout(Stdio::piped())
        .spawn()
        .expect("logs -f --since");
    fs::write(&release, b"").expect("release");
    let followed = follow.wait_with_output().expect("logs -f --since ends");
    assert!(followed.status.success());
    assert_eq!(
        stdout(&followed),
        "second\nto-stderr\n",
        "lines written after --since are printed, lines from well before are not"
    );
    assert_eq!(
        fake.ok(&["logs", "--since", &since, "tw-c-train"]),
        "second\nto-stderr\n"
    );
    let early = rfc3339(SystemTime::now() - Duration::from_secs(3600));
    assert_eq!(
        fake.ok(&["logs", "--since", &early, "tw-c-train"]),
        "first \nsecond\nto-stderr\n",
        "a time before the start gives everything"
    );
}

#[test]
fn stop_sends_sigterm_then_sigkill_after_the_grace() {
    let fake = Fake::new();
    fake.image("sleeper", "echo up\nsleep 1000");
    fake.run("tw-d-term", &[], &["sleeper"]);
    wait_until("the container printed", Duration::from_secs(10), || {
        fake.logs("tw-d-term").contains("up").then_some(())
    });
    let start = Instant::now();
    assert_eq!(
        fake.ok(&["stop", "-t", "30", "tw-d-term"]).trim(),
        "tw-d-term"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "a container that dies of SIGTERM stops at once, took {:?}",
        start.elapsed()
    );
    assert_eq!(
        fake.ok(&["wait", "tw-d-term"]).trim(),
        "143",
        "128 + SIGTERM"
    );
    assert_eq!(fake.inspect("tw-d-term"), "exited 143");

    // A main process that ignores SIGTERM is killed once the grace has passed.
    fake.run_env(
        "tw-d-kill",
        &[],
        &["sleeper"],
        &[("DOCKER_FAKE_IGNORE_TERM", "1")],
    );
    wait_until("the container printed", Duration::from_secs(10), || {
        fake.logs("tw-d-kill").contains("up").then_some(())
    });
    let start = Instant::now();
    assert_eq!(
        fake.ok(&["stop", "-t", "1", "tw-d-kill"]).trim(),
        "tw-d-kill"
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "stop -t 1 waited the grace, then killed: took {took:?}"
    );
    assert_eq!(
        fake.ok(&["wait", "tw-d-kill"]).trim(),
        "137",
        "128 + SIGKILL"
    );
    assert_eq!(fake.state_of("tw-d-kill"), "exited");
    // Stopping an exited container is no error.
    assert_eq!(
        fake.ok(&["stop", "-t", "1", "tw-d-kill"]).trim(),
        "tw-d-kill"
    );
}

#[test]
fn kill_and_rm_end_the_container_and_every_process_in_it() {
    let fake = Fake::new();
    let pids = fake.scratch("pids");
    fake.image(
        "forker",
        "sleep 1000 &\necho $! >> \"$PIDS\"\necho $$ >> \"$PIDS\"\nwait",
    );
    let env = format!("PIDS={}", pids.display());

    fake.run("tw-e-kill", &["-e", &env], &["forker"]);
    let recorded = |count: usize| {
        wait_until(
            "the image recorded its pids",
            Duration::from_secs(10),
            || {
                let text = fs::read_to_string(&pids).unwrap_or_default();
                let pids: Vec<u32> = text.lines().filter_map(|l| l.parse().ok()).collect();
                (pids.len() >= count).then_some(pids)
            },
        )
    };
    let first = recorded(2);
    assert!(first.iter().all(|p| pid_alive(*p)));
    assert_eq!(fake.ok(&["kill", "tw-e-kill"]).trim(), "tw-e-kill");
    assert_eq!(fake.ok(&["wait", "tw-e-kill"]).trim(), "137");
    wait_until(
        "the container's processes are gone",
        Duration::from_secs(10),
        || first.iter().all(|p| !pid_alive(*p)).then_some(()),
    );
    let again = fake.docker(&["kill", "tw-e-kill"]);
    assert_eq!(
        again.status.code(),
        Some(1),
        "kill of an exited container fails"
    );
    assert!(
        stderr(&again).contains("is not running"),
        "{}",
        stderr(&again)
    );

    fake.run("tw-e-rm", &["-e", &env], &["forker"]);
    let all = recorded(4);
    let second = &all[2..];
    let refused = fake.docker(&["rm", "tw-e-rm"]);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "rm without -f refuses a running container"
    );
    assert!(stderr(&refused).contains("container is running"));
    assert_eq!(fake.ok(&["rm", "-f", "tw-e-rm"]).trim(), "tw-e-rm");
    assert_eq!(fake.state_of("tw-e-rm"), "absent");
    wait_until(
        "the removed container's processes are gone",
        Duration::from_secs(10),
        || second.iter().all(|p| !pid_alive(*p)).then_some(()),
    );

    // Cleanup calls for containers that are not there: "No such container", harmless (exit 0
    // with -f, as docker since 20.10).
    let missing = fake.docker(&["rm", "-f", "tw-e-rm"]);
    assert_eq!(
        missing.status.code(),
        Some(0),
        "rm -f of a missing container"
    );
    assert!(
        stderr(&missing).contains("No such container"),
        "{}",
        stderr(&missing)
    );
    let missing = fake.docker(&["rm", "tw-e-rm"]);
    assert_eq!(missing.status.code(), Some(1), "rm of a missing container");
    for args in [
        &["wait", "nothing-here"][..],
        &["logs", "nothing-here"],
        &["stop", "-t", "1", "nothing-here"],
    ] {
        let out = fake.docker(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("No such container"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let inspect = fake.docker(&["inspect", "-f", "{{.State.Status}}", "nothing-here"]);
    assert_eq!(inspect.status.code(), Some(1));
    assert!(stderr(&inspect).contains("No such object: nothing-here"));
}

#[test]
fn a_name_in_use_conflicts_until_the_container_is_removed() {
    let fake = Fake::new();
    fake.image("quick", "exit 0");
    fake.image("sleeper", "sleep 1000");
    fake.run("tw-f-dup", &[], &["sleeper"]);
    let conflict = fake.docker(&["run", "-d", "--name", "tw-f-dup", "quick"]);
    assert_eq!(conflict.status.code(), Some(125));
    assert!(
        stderr(&conflict).contains("Conflict. The container name \"/tw-f-dup\" is already in use"),
        "{}",
        stderr(&conflict)
    );
    fake.ok(&["rm", "-f", "tw-f-dup"]);

    fake.run("tw-f-dup", &[], &["quick"]);
    assert_eq!(fake.ok(&["wait", "tw-f-dup"]).trim(), "0");
    let exited = fake.docker(&["run", "-d", "--name", "tw-f-dup", "quick"]);
    assert_eq!(
        exited.status.code(),
        Some(125),
        "an exited container still holds its name"
    );
    fake.ok(&["rm", "tw-f-dup"]);
    fake.run("tw-f-dup", &[], &["quick"]);

    // Racing for one name: exactly one wins.
    let racers: Vec<Child> = (0..6)
        .map(|_| {
            fake.command(&["run", "-d", "--name", "tw-f-race", "sleeper"], &[])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn run")
        })
        .collect();
    let won = racers
        .into_iter()
        .map(|mut c| c.wait().expect("run ends"))
        .filter(|s| s.success())
        .count();
    assert_eq!(won, 1, "one run takes the name, the others conflict");
}

#[test]
fn run_refuses_what_docker_refuses() {
    let fake = Fake::new();
    fake.image("sleeper", "sleep 1000");

    let unknown = fake.docker(&["run", "-d", "--name", "tw-g-1", "no-such-image"]);
    assert_eq!(unknown.status.code(), Some(125));
    assert!(
        stderr(&unknown).contains("Unable to find image"),
        "{}",
        stderr(&unknown)
    );

    let failing = fake.docker_env(
        &["run", "-d", "--name", "tw-g-2", "sleeper"],
        &[("DOCKER_FAKE_FAIL_RUN", "1")],
    );
    assert_eq!(failing.status.code(), Some(125));
    assert!(
        stderr(&failing).contains("Error response from daemon"),
        "{}",
        stderr(&failing)
    );

    // docker parses --gpus as CSV: several device ids need the inner quotes.
    let unquoted = fake.docker(&[
        "run",
        "-d",
        "--name",
        "tw-g-3",
        "--gpus",
        "device=0,1",
        "sleeper",
    ]);
    assert_eq!(unquoted.status.code(), Some(125));
    assert!(stderr(&unquoted).contains("cannot set both Count and DeviceIDs"));
    fake.run("tw-g-4", &["--gpus", "\"device=0,1\""], &["sleeper"]);
    fake.run(
        "tw-g-5",
        &[
            "--gpus",
            "device=0",
            "--memory",
            "128g",
            "--shm-size",
            "16g",
        ],
        &["sleeper"],
    );

    let bad_memory = fake.docker(&[
        "run", "-d", "--name", "tw-g-6", "--memory", "lots", "sleeper",
    ]);
    assert_eq!(bad_memory.status.code(), Some(125));
    let too_many_cpus = fake.docker_env(
        &["run", "-d", "--name", "tw-g-7", "--cpus", "16", "sleeper"],
        &[("DOCKER_FAKE_NCPU", "8")],
    );
    assert_eq!(too_many_cpus.status.code(), Some(125));
    assert!(stderr(&too_many_cpus).contains("Range of CPUs is from 0.01 to 8.00"));
    let unknown_flag = fake.docker(&["run", "-d", "--name", "tw-g-8", "--no-such-flag", "sleeper"]);
    assert_eq!(unknown_flag.status.code(), Some(125));

    let listed = fake.ps("test-owner");
    let names: Vec<&str> = listed.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["tw-g-4", "tw-g-5"],
        "refused runs leave no container"
    );

    let no_state = Command::new(FAKE)
        .args(["ps", "-a"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("run without state");
    assert_eq!(no_state.status.code(), Some(1));
    assert!(stderr(&no_state).contains("DOCKER_FAKE_STATE"));
}

#[test]
fn calls_log_holds_every_argv_as_json_and_no_secret() {
    let fake = Fake::new();
    fake.image("quick", "exit 0");
    let secret = "hf_secret_value_4f1c";
    let args = [
        "run",
        "-d",
        "--name",
        "tw-h-log",
        "-e",
        "HUGGINGFACE_TOKEN",
        "-e",
        "PLAIN=a b\tc",
        "--security-opt=no-new-privileges",
        "quick",
        "--dataset-type",
        "{\"field\": \"x\"}",
    ];
    let out = fake.docker_env(&args, &[("HUGGINGFACE_TOKEN", secret)]);
    assert!(out.status.success(), "{}", stderr(&out));
    fake.ok(&["wait", "tw-h-log"]);
    fake.ok(&["ps", "-a", "--format", PS_FORMAT]);

    let calls = fake.calls();
    assert_eq!(calls.len(), 3, "one line per invocation: {calls:?}");
    assert_eq!(calls[0], args.map(String::from), "the argv, exactly");
    assert_eq!(calls[1], ["wait", "tw-h-log"]);
    assert_eq!(calls[2], ["ps", "-a", "--format", PS_FORMAT]);

    // The secret is in no file of the fake's state.
    let mut stack = vec![fake.state()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read state").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = fs::read(&path) {
                assert!(
                    !String::from_utf8_lossy(&bytes).contains(secret),
                    "{} holds the secret",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn a_container_sees_its_e_variables_and_nothing_of_its_callers_environment() {
    let fake = Fake::new();
    let dump = fake.scratch("environ");
    let release = fake.scratch("release");
    fake.image(
        "env-dump",
        &format!(
            "tr '\\0' '\\n' < /proc/$$/environ | sort > {dump}.tmp && mv {dump}.tmp {dump}\n\
             while [ ! -e {release} ]; do sleep 0.02; done",
            dump = dump.display(),
            release = release.display()
        ),
    );
    let marker = format!("TW_DATA_DIR={}", fake.dir.path().join("data").display());
    let marker_value = marker.trim_start_matches("TW_DATA_DIR=").to_string();
    fake.run_env(
        "tw-i-env",
        &[
            "-e",
            "HUGGINGFACE_TOKEN",
            "-e",
            "TRANSFORMERS_CACHE=/cache/hf_cache",
            "-e",
            "NOT_SET",
        ],
        &["env-dump"],
        &[
            ("TW_DATA_DIR", &marker_value),
            ("HUGGINGFACE_TOKEN", "hf_from_the_caller"),
            ("UNLISTED", "not for the container"),
            ("DOCKER_CONFIG", "/nowhere"),
        ],
    );
    let seen = wait_until(
        "the container dumped its environment",
        Duration::from_secs(10),
        || fs::read_to_string(&dump).ok(),
    );
    let names: Vec<&str> = seen
        .lines()
        .map(|l| l.split('=').next().unwrap_or(""))
        .collect();
    assert_eq!(
        names,
        ["HUGGINGFACE_TOKEN", "PATH", "TRANSFORMERS_CACHE"],
        "exactly the -e variables (an unset one left out) and PATH: {seen}"
    );
    assert!(
        seen.contains("HUGGINGFACE_TOKEN=hf_from_the_caller\n"),
        "-e NAME takes the caller's value"
    );
    assert!(seen.contains("TRANSFORMERS_CACHE=/cache/hf_cache\n"));

    // No process of the running container carries the caller's marker: a daemon that kills
    // its marked processes at boot leaves containers alone.
    assert_eq!(fake.state_of("tw-i-env"), "running");
    assert_eq!(
        processes_with_env(&marker),
        Vec::<u32>::new(),
        "processes carrying {marker}"
    );
    fs::write(&release, b"").expect("release");
    assert_eq!(fake.ok(&["wait", "tw-i-env"]).trim(), "0");
}

#[test]
fn a_container_outlives_its_callers_process_group() {
    let fake = Fake::new();
    let release = fake.scratch("release");
    gated_image(&fake, "worker", &release, 5);
    // The daemon's way: the CLI in a process group of its own. Here the group runs
    // `run -d`, then follows the logs, and is SIGKILLed while it follows.
    let script = format!(
        "\"{FAKE}\" run -d --name tw-j-survive --label training-worker.owner=test-owner worker >/dev/null \
         && exec \"{FAKE}\" logs -f tw-j-survive"
    );
    let mut group = fake
        .program("bash", &["-c", &script], &[])
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn the caller");
    wait_until(
        "the container runs and is followed",
        Duration::from_secs(10),
        || {
            (fake.state_of("tw-j-survive") == "running"
                && fake.logs("tw-j-survive").contains("first"))
            .then_some(())
        },
    );
    let pgid = group.id();
    let killed = Command::new("bash")
        .args(["-c", &format!("kill -KILL -- -{pgid}")])
        .status()
        .expect("kill the caller's group");
    assert!(killed.success());
    group.wait().expect("the caller is reaped");

    // A container killed with its caller would be gone at once; give it a moment to show.
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        fake.state_of("tw-j-survive"),
        "running",
        "the container outlives its caller's process group"
    );
    fs::write(&release, b"").expect("release");
    assert_eq!(fake.ok(&["wait", "tw-j-survive"]).trim(), "5");
    assert_eq!(fake.logs("tw-j-survive"), "first \nsecond\nto-stderr\n");
}

#[test]
fn concurrent_containers_and_calls_stay_apart() {
    let fake = Fake::new();
    fake.image(
        "counter",
        "for i in 1 2 3 4 5; do echo \"$1 $i\"; sleep 0.05; done\nexit $2",
    );
    let runs: Vec<Child> = (0..8)
        .map(|i| {
            let name = format!("tw-k-{i}");
            let code = i.to_string();
            fake.command(
                &[
                    "run",
                    "-d",
                    "--name",
                    &name,
                    "--label",
                    "training-worker.owner=test-owner",
                    "counter",
                    &name,
                    &code,
                ],
                &[],
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn run")
        })
        .collect();
    for mut run in runs {
        assert!(run.wait().expect("run").success());
    }
    let waits: Vec<(usize, Child)> = (0..8)
        .map(|i| {
            let child = fake
                .command(&["wait", &format!("tw-k-{i}")], &[])
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn wait");
            (i, child)
        })
        .collect();
    for (i, child) in waits {
        let out = child.wait_with_output().expect("wait");
        assert_eq!(
            stdout(&out).trim(),
            i.to_string(),
            "container {i} exit code"
        );
    }
    for i in 0..8 {
        let expected: String = (1..=5).map(|n| format!("tw-k-{i} {n}\n")).collect();
        assert_eq!(
            fake.logs(&format!("tw-k-{i}")),
            expected,
            "container {i} has its own log"
        );
    }
    assert_eq!(
        fake.calls().len(),
        8 + 8 + 8,
        "every concurrent call recorded once"
    );
}
