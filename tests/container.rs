//! The container image, without a container engine: the Dockerfile is parsed and its
//! structure checked (a builder stage and a small runtime stage, an unprivileged user, the
//! data dir on a volume, SIGTERM as the stop signal, a health check by the binary itself,
//! an entrypoint and command that name files the image has, every COPY source in the
//! repository), deploy/docker-compose.yml is checked for what a restart needs, and the
//! image's command is run directly: the real binary with the image's arguments, the files
//! the image COPYs mapped back to the repository, and the paths that exist only in the image
//! (the /data volume, the listen address) overridden through the environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const BINARY: &str = env!("CARGO_BIN_EXE_training-worker");
const PACKAGE: &str = env!("CARGO_PKG_NAME");

// ---------------------------------------------------------------------------------------
// The Dockerfile, parsed
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

#[derive(Debug)]
struct Stage {
    /// The base image.
    base: String,
    /// The name after `AS`.
    name: Option<String>,
    instructions: Vec<Instruction>,
}

impl Stage {
    fn all<'a>(&'a self, keyword: &str) -> impl Iterator<Item = &'a Instruction> + use<'a> {
        let keyword = keyword.to_string();
        self.instructions
            .iter()
            .filter(move |i| i.keyword == keyword)
    }

    /// The last instruction with `keyword` (the one in force).
    fn last(&self, keyword: &str) -> Option<&Instruction> {
        self.all(keyword).last()
    }

    fn copies(&self) -> Vec<CopyInstruction> {
        self.all("COPY")
            .map(|i| CopyInstruction::parse(&i.args))
            .collect()
    }
}

/// A `COPY [--from=STAGE] [--chown=..] SRC... DEST`.
#[derive(Debug)]
struct CopyInstruction {
    from: Option<String>,
    sources: Vec<String>,
    dest: String,
}

impl CopyInstruction {
    fn parse(args: &str) -> CopyInstruction {
        let mut from = None;
        let mut paths = Vec::new();
        let words: Vec<String> = match exec_form(args) {
            Some(words) => words,
            None => args.split_whitespace().map(String::from).collect(),
        };
        for word in words {
            if let Some(stage) = word.strip_prefix("--from=") {
                from = Some(stage.to_string());
            } else if !word.starts_with("--") {
                paths.push(word);
            }
        }
        let dest = paths.pop().expect("COPY has a destination");
        assert!(!paths.is_empty(), "COPY {args}: no source");
        CopyInstruction {
            from,
            sources: paths,
            dest,
        }
    }

    /// Where a source lands: a directory destination (ending in `/`, or several sources)
    /// takes the source's file name.
    fn target_of(&self, source: &str) -> String {
        if self.dest.ends_with('/') || self.sources.len() > 1 {
            let name = Path::new(source).file_name().expect("a file name");
            format!(
                "{}/{}",
                self.dest.trim_end_matches('/'),
                name.to_string_lossy()
            )
        } else {
            self.dest.clone()
        }
    }
}

/// The JSON array of an exec-form instruction, if it is one.
fn exec_form(args: &str) -> Option<Vec<String>> {
    let args = args.trim();
    if !args.starts_with('[') {
        return None;
    }
    Some(serde_json::from_str(args).unwrap_or_else(|e| panic!("{args}: not a JSON array: {e}")))
}

/// Stages in order; comments skipped, continued lines joined, keywords upper-cased.
fn parse_dockerfile(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        // A comment or a blank line, also inside a continued instruction.
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(
        current.is_empty(),
        "the Dockerfile ends inside a continued line"
    );

    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let keyword = keyword.to_uppercase();
        let args = args.trim().to_string();
        if keyword == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_] => None,
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => panic!("FROM {args}: expected IMAGE [AS NAME]"),
            };
            stages.push(Stage {
                base: words[0].to_string(),
                name,
                instructions: Vec::new(),
            });
            continue;
        }
        let stage = stages
            .last_mut()
            .unwrap_or_else(|| panic!("{keyword} before the first FROM"));
        stage.instructions.push(Instruction { keyword, args });
    }
    stages
}

struct Image {
    builder: Stage,
    runtime: Stage,
}

fn image() -> Image {
    let text = std::fs::read_to_string(repo("Dockerfile")).expect("the Dockerfile");
    let mut stages = parse_dockerfile(&text);
    assert_eq!(
        stages.len(),
        2,
        "two stages: a builder and the runtime image"
    );
    let runtime = stages.pop().expect("two stages");
    let builder = stages.pop().expect("two stages");
    Image { builder, runtime }
}

fn repo(relative: &str) -> PathBuf {
    Path::new(REPO).join(relative)
}

impl Image {
    /// Every path in the runtime image that a COPY from the repository puts there, and the
    /// repository file it comes from.
    fn files_from_repo(&self) -> BTreeMap<String, PathBuf> {
        let mut files = BTreeMap::new();
        for copy in self.runtime.copies() {
            if copy.from.is_some() {
                continue;
            }
            for source in &copy.sources {
                files.insert(copy.target_of(source), repo(source));
            }
        }
        files
    }

    /// Where the runtime stage installs the binary the builder built.
    fn installed_binary(&self) -> String {
        let builder_name = self.builder.name.as_deref().expect("a named builder");
        let copies = self.runtime.copies();
        let copy = copies
            .iter()
            .find(|c| c.from.as_deref() == Some(builder_name))
            .expect("the runtime stage copies the binary from the builder");
        copy.target_of(&copy.sources[0])
    }

    /// `ENTRYPOINT` + `CMD`, both in exec form.
    fn command(&self) -> Vec<String> {
        let entrypoint = self.runtime.last("ENTRYPOINT").expect("an ENTRYPOINT");
        let cmd = self.runtime.last("CMD").expect("a CMD");
        let mut argv = exec_form(&entrypoint.args).expect("ENTRYPOINT in exec form");
        argv.extend(exec_form(&cmd.args).expect("CMD in exec form"));
        argv
    }

    /// The command without its init (tini and its `--`).
    fn daemon_command(&self) -> Vec<String> {
        let mut argv = self.command();
        if argv[0].ends_with("/tini") {
            argv.remove(0);
            if argv.first().map(String::as_str) == Some("--") {
                argv.remove(0);
            }
        }
        argv
    }

    /// The health check's command, in exec form.
    fn health_check(&self) -> Vec<String> {
        let check = self.runtime.last("HEALTHCHECK").expect("a HEALTHCHECK");
        let (_, command) = check
            .args
            .split_once("CMD")
            .unwrap_or_else(|| panic!("HEALTHCHECK {}: no CMD", check.args));
        exec_form(command).expect("the health check in exec form (no shell in between)")
    }

    /// Every text of the runtime stage's RUN instructions.
    fn runtime_runs(&self) -> String {
        self.runtime
            .all("RUN")
            .map(|i| i.args.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The container config, from the repository.
fn container_config() -> toml::Table {
    let text =
        std::fs::read_to_string(repo("config/container.toml")).expect("config/container.toml");
    text.parse().expect("config/container.toml is TOML")
}

// ---------------------------------------------------------------------------------------
// Structure
// ---------------------------------------------------------------------------------------

#[test]
fn the_builder_stage_builds_the_release_binary_from_files_in_the_repository() {
    let image = image();
    let builder = &image.builder;
    assert_eq!(
        builder.name.as_deref(),
        Some("builder"),
        "FROM ... AS builder"
    );
    assert!(builder.base.starts_with("rust:"), "built with a Rust image");
    let workdir = builder
        .last("WORKDIR")
        .expect("a builder WORKDIR")
        .args
        .clone();

    let builds: Vec<usize> = builder
        .instructions
        .iter()
        .enumerate()
        .filter(|(_, i)| i.keyword == "RUN" && i.args.contains("cargo build"))
        .map(|(n, _)| n)
        .collect();
    assert!(!builds.is_empty(), "the builder runs cargo build");
    for &n in &builds {
        let args = &builder.instructions[n].args;
        assert!(
            args.contains("--release") && args.contains("--locked"),
            "cargo build --release --locked: {args}"
        );
    }

    // Every source exists; the sources copied before the first build are what cargo sees
    // of the manifest's targets.
    let mut before_first_build = Vec::new();
    for (n, instruction) in builder.instructions.iter().enumerate() {
        if instruction.keyword != "COPY" {
            continue;
        }
        let copy = CopyInstruction::parse(&instruction.args);
        assert!(
            copy.from.is_none(),
            "the builder copies from the repository"
        );
        for source in &copy.sources {
            assert!(
                repo(source).exists(),
                "COPY {source}: not in the repository"
            );
            if n < builds[0] {
                before_first_build.push(source.trim_end_matches('/').to_string());
            }
        }
    }
    // What the build context leaves out cannot be copied.
    let ignored: Vec<String> = std::fs::read_to_string(repo(".dockerignore"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    let all_sources = builder
        .copies()
        .into_iter()
        .chain(image.runtime.copies())
        .filter(|c| c.from.is_none())
        .flat_map(|c| c.sources);
    for source in all_sources {
        let source = source.trim_end_matches('/');
        assert!(
            !ignored
                .iter()
                .any(|i| source == i || source.starts_with(&format!("{i}/"))),
            "COPY {source}: excluded from the build context by .dockerignore"
        );
    }
    assert!(
        ignored.iter().any(|i| i == "target"),
        ".dockerignore keeps target/ (gigabytes) out of the build context"
    );

    // Cargo refuses a manifest whose declared targets are missing, even those it does not build.
    let manifest: toml::Table = std::fs::read_to_string(repo("Cargo.toml"))
        .expect("Cargo.toml")
        .parse()
        .expect("Cargo.toml is TOML");
    for (kind, dir) in [
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
    ] {
        for target in manifest
            .get(kind)
            .and_then(|t| t.as_array())
            .into_iter()
            .flatten()
        {
            let name = target["name"].as_str().expect("a target name");
            let path = target
                .get("path")
                .and_then(|p| p.as_str())
                .map(String::from)
                .unwrap_or_else(|| format!("{dir}/{name}.rs"));
            assert!(
                before_first_build
                    .iter()
                    .any(|copied| path == *copied || path.starts_with(&format!("{copied}/"))),
                "[[{kind}]] {name} ({path}) is not copied before the first cargo build: {before_first_build:?}"
            );
        }
    }
    assert!(
        before_first_build.iter().any(|s| s == "Cargo.lock"),
        "--locked needs Cargo.lock"
    );

    // The runtime stage takes the binary from where the builder left it.
    let copies = image.runtime.copies();
    let binary = copies
        .iter()
        .find(|c| c.from.as_deref() == Some("builder"))
        .expect("COPY --from=builder");
    assert_eq!(
        binary.sources,
        [format!("{workdir}/target/release/{PACKAGE}")]
    );
}

#[test]
fn the_runtime_image_is_small_unprivileged_and_keeps_its_data_on_a_volume() {
    let image = image();
    let runtime = &image.runtime;
    assert!(
        !runtime.base.starts_with("rust"),
        "the runtime image is not the toolchain image: {}",
        runtime.base
    );
    assert!(
        runtime.base.contains("slim") || runtime.base.contains("distroless"),
        "a small base image: {}",
        runtime.base
    );

    let user = runtime.last("USER").expect("a USER").args.clone();
    let user_name = user.split(':').next().unwrap_or("");
    assert!(
        !["root", "0", ""].contains(&user_name),
        "runs as root: USER {user}"
    );
    // Nothing after USER switches back.
    let last_user = runtime
        .instructions
        .iter()
        .rposition(|i| i.keyword == "USER")
        .expect("a USER");
    assert!(
        !runtime.instructions[last_user..]
            .iter()
            .any(|i| i.keyword == "RUN"),
        "RUN after USER: the image's setup should be done as root, before USER"
    );

    let volumes: Vec<String> = runtime
        .all("VOLUME")
        .flat_map(|v| {
            exec_form(&v.args)
                .unwrap_or_else(|| v.args.split_whitespace().map(String::from).collect())
        })
        .collect();
    assert!(volumes.iter().any(|v| v == "/data"), "VOLUME /data");
    let config = container_config();
    assert_eq!(
        config["data_dir"].as_str(),
        Some("/data"),
        "the container config keeps the data dir on the volume"
    );
    let runs = image.runtime_runs();
    assert!(
        runs.contains("chown") && runs.contains("/data"),
        "the volume's mount point belongs to the user, so that a fresh volume is writable"
    );

    assert_eq!(
        runtime.last("STOPSIGNAL").map(|i| i.args.as_str()),
        Some("SIGTERM")
    );

    // The published port is the one the daemon listens on, on every interface.
    let listen = config["listen"].as_str().expect("a listen address");
    let port = listen.rsplit(':').next().expect("a port");
    assert!(
        listen.starts_with("0.0.0.0:"),
        "listen {listen}: unreachable from outside the container"
    );
    let exposed: Vec<&str> = runtime
        .all("EXPOSE")
        .flat_map(|i| i.args.split_whitespace())
        .collect();
    assert!(
        exposed.iter().any(|e| e.trim_end_matches("/tcp") == port),
        "EXPOSE {port}"
    );
}

#[test]
fn the_health_check_is_the_binary_itself() {
    let image = image();
    let check = image.health_check();
    let binary = image.installed_binary();
    let program = &check[0];
    assert!(
        *program == binary
            || (Path::new(&binary).parent() == Some(Path::new("/usr/local/bin"))
                && *program == PACKAGE),
        "the health check runs {program}, not the installed {binary}"
    );
    assert_eq!(check[1], "health", "training-worker health");
    // It asks 127.0.0.1:8787 unless told otherwise; that must be the listen port.
    let config = container_config();
    let listen = config["listen"].as_str().expect("a listen address");
    assert!(
        listen.ends_with(":8787")
            || image
                .runtime
                .all("ENV")
                .any(|e| e.args.contains("TRAINING_WORKER_SERVER")),
        "listen {listen} is not where `training-worker health` asks"
    );
    let runs = image.runtime_runs();
    for tool in ["curl", "wget"] {
        assert!(
            !runs.contains(tool),
            "{tool} in the runtime image: the health check needs none"
        );
    }
}

#[test]
fn the_entrypoint_and_command_name_files_the_image_has() {
    let image = image();
    let files = image.files_from_repo();
    for (target, source) in &files {
        assert!(
            source.exists(),
            "COPY to {target}: {} is not in the repository",
            source.display()
        );
    }
    let binary = image.installed_binary();
    let argv = image.command();
    if argv[0].ends_with("/tini") {
        // tini must be installed, and separate its options from the daemon's argv.
        assert_eq!(argv[0], "/usr/bin/tini", "Debian's tini path");
        assert!(
            image.runtime_runs().contains(" tini"),
            "tini is used but not installed"
        );
        assert_eq!(argv[1], "--", "tini -- COMMAND");
    }
    let daemon = image.daemon_command();
    assert_eq!(
        daemon[0], binary,
        "the entrypoint runs the installed binary"
    );
    assert_eq!(daemon[1], "serve");
    let config = daemon
        .iter()
        .position(|a| a == "--config")
        .map(|i| daemon[i + 1].clone())
        .expect("serve --config FILE");
    assert!(
        config.starts_with("/etc/training-worker/"),
        "the config lives under /etc/training-worker/: {config}"
    );
    assert_eq!(
        files.get(&config),
        Some(&repo("config/container.toml")),
        "--config names the copied config/container.toml"
    );

    // The trainer the config runs is in the image, and executable.
    let trainer = container_config()["executor"]["command"][0]
        .as_str()
        .expect("executor.command")
        .to_string();
    let source = files
        .get(&trainer)
        .unwrap_or_else(|| panic!("the config's trainer {trainer} is not copied into the image"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(source)
            .expect("the trainer")
            .permissions(),
    );
    assert!(mode & 0o111 != 0, "{} is not executable", source.display());
}

#[test]
fn compose_restarts_the_container_on_a_named_volume() {
    let text = std::fs::read_to_string(repo("deploy/docker-compose.yml"))
        .expect("deploy/docker-compose.yml");
    // Only the lines that are in force: comments hold the optional parts.
    let active: Vec<&str> = text
        .lines()
        .map(|l| l.split(" #").next().unwrap_or(""))
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect();
    let has = |needle: &str| active.iter().any(|l| l.trim() == needle);
    assert!(has("restart: unless-stopped"), "restart: unless-stopped");
    assert!(has("context: .."), "builds the repository's Dockerfile");
    let mount = active
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_prefix("- ")
                .and_then(|m| m.strip_suffix(":/data"))
        })
        .expect("a volume on /data");
    assert!(
        !mount.contains('/') && !mount.starts_with('.'),
        "{mount}: a named volume, not a host path"
    );
    let top_level = active
        .iter()
        .position(|l| *l == "volumes:")
        .expect("top-level volumes:");
    assert!(
        active[top_level + 1..]
            .iter()
            .any(|l| l.trim() == format!("{mount}:")),
        "the volume {mount} is declared"
    );
    // A graceful stop takes up to shutdown_grace; Docker must wait longer than that.
    let grace = active
        .iter()
        .find_map(|l| l.trim().strip_prefix("stop_grace_period:"))
        .expect("stop_grace_period");
    let grace = humantime::parse_duration(grace.trim()).expect("a duration");
    let shutdown = humantime::parse_duration(
        container_config()["shutdown_grace"]
            .as_str()
            .expect("shutdown_grace"),
    )
    .expect("a duration");
    assert!(
        grace > shutdown,
        "stop_grace_period {grace:?} is not above shutdown_grace {shutdown:?}"
    );
    // The GPU reservation is there, commented, for the real trainer.
    for needle in ["driver: nvidia", "capabilities: [gpu]"] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with('#') && l.contains(needle)),
            "a commented GPU reservation ({needle})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The image's command, run directly
// ---------------------------------------------------------------------------------------

/// The daemon started with the image's command; SIGKILLed if still running when dropped.
struct Daemon {
    child: Child,
    stderr: PathBuf,
}

impl Daemon {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within {within:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `argv` (an image command, its program mapped to the built binary and the files the
/// image COPYs mapped to the repository) in `dir` with `env` and no other
/// `TRAINING_WORKER_*` variable.
fn run_mapped(
    image: &Image,
    argv: &[String],
    dir: &Path,
    env: &[(&str, String)],
    log: &str,
) -> Command {
    let files = image.files_from_repo();
    let binary = image.installed_binary();
    assert!(
        argv[0] == binary || argv[0] == PACKAGE,
        "{} is not the installed binary",
        argv[0]
    );
    let mut command = Command::new(BINARY);
    for arg in &argv[1..] {
        match files.get(arg) {
            Some(source) => command.arg(source),
            None => command.arg(arg),
        };
    }
    for (key, _) in std::env::vars() {
        if key.starts_with("TRAINING_WORKER_") || key == "NOTIFY_SOCKET" {
            command.env_remove(key);
        }
    }
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(log)).expect("a log file"));
    command
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("an address").port()
}

async fn poll<T>(what: &str, daemon: &Daemon, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; stderr:\n{}",
            daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn get_json(url: &str) -> Option<Value> {
    let response = reqwest::get(url).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

#[tokio::test]
async fn the_image_command_runs_directly_and_a_restart_recovers_the_queue() {
    let image = image();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let files = image.files_from_repo();
    let trainer = container_config()["executor"]["command"][0]
        .as_str()
        .expect("executor.command")
        .to_string();
    let trainer = files
        .get(&trainer)
        .expect("the config's trainer is in the image")
        .to_str()
        .expect("a UTF-8 path")
        .to_string();
    // What exists only in the image, overridden the documented way.
    let env = [
        (
            "TRAINING_WORKER_DATA_DIR",
            data.to_str().expect("a UTF-8 path").to_string(),
        ),
        ("TRAINING_WORKER_LISTEN", format!("127.0.0.1:{port}")),
        ("TRAINING_WORKER_EXECUTOR_COMMAND", trainer),
    ];
    let daemon_argv = image.daemon_command();
    let start = |log: &str| Daemon {
        child: run_mapped(&image, &daemon_argv, dir.path(), &env, log)
            .spawn()
            .expect("the daemon starts"),
        stderr: dir.path().join(log),
    };

    let mut daemon = start("first.stderr");
    poll("/readyz says 200", &daemon, async || {
        get_json(&format!("{base}/readyz")).await
    })
    .await;
    assert!(
        data.join("jobs").is_dir(),
        "the data dir is not where TRAINING_WORKER_DATA_DIR says"
    );

    // The image's health check, run the same way, passes.
    let check = image.health_check();
    let status = run_mapped(&image, &check, dir.path(), &env, "health.stderr")
        .status()
        .expect("the health check runs");
    assert!(
        status.success(),
        "the health check failed: {}",
        std::fs::read_to_string(dir.path().join("health.stderr")).unwrap_or_default()
    );

    // A job starts with the image's trainer.
    let client = reqwest::Client::new();
    let submitted: Value = client
        .post(format!("{base}/v1/jobs"))
        .json(&json!({"type": "DiffusionJob", "model": "demo", "dataset_zip": "images.zip"}))
        .send()
        .await
        .expect("submit")
        .json()
        .await
        .expect("a job");
    let id = submitted["job_id"].as_str().expect("an id").to_string();
    let job_url = format!("{base}/v1/jobs/{id}");
    poll("the job runs", &daemon, async || {
        get_json(&job_url)
            .await
            .filter(|job| job["status"] == "Running")
    })
    .await;

    // A crash (SIGKILL: the OOM killer, a node failure); the restart policy starts the same
    // command on the same volume, and the interrupted job runs again, first.
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10)).await;
    let mut daemon = start("second.stderr");
    let job = poll("the interrupted job runs again", &daemon, async || {
        get_json(&job_url)
            .await
            .filter(|job| job["status"] == "Running" && job["attempts"] == 2)
    })
    .await;
    assert_eq!(job["job_id"], id.as_str());

    // `docker stop`: SIGTERM, a graceful stop, exit 0, the job written back as Queued.
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "not a graceful stop; stderr:\n{}",
        daemon.stderr()
    );
    let file: Value = serde_json::from_slice(
        &std::fs::read(data.join("jobs").join(format!("{id}.json"))).expect("the job file"),
    )
    .expect("JSON");
    assert_eq!(
        file["status"], "Queued",
        "the interrupted job waits for the next start"
    );

    // With the daemon gone, the health check fails.
    let status = run_mapped(&image, &check, dir.path(), &env, "health-after.stderr")
        .status()
        .expect("the health check runs");
    assert!(!status.success(), "the health check passes with no daemon");
}
