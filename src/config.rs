//! Configuration: loaded and validated once at start, then passed explicitly.
//!
//! Layers, later wins: built-in defaults, the TOML file, `TRAINING_WORKER_*` environment
//! variables, command-line flags. Every problem is a [`ConfigError`] naming the setting, which
//! the daemon turns into exit code 78.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::executor::template::Template;
use crate::gpu::{GodType, Gpu, GpuTypes};

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "config/default.toml";
/// The prefix of every environment variable the daemon reads.
pub const ENV_PREFIX: &str = "TRAINING_WORKER_";

/// How the store makes a batch of job files durable before the renames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// An fsync per file, in parallel: isolated from everything else on the filesystem.
    #[default]
    Fsync,
    /// One syncfs(2) for the batch: fewer flushes, but it also waits for every other dirty
    /// page on the filesystem (a trainer's checkpoint, say).
    Syncfs,
}

impl SyncMode {
    pub fn parse(s: &str) -> Option<SyncMode> {
        match s {
            "fsync" => Some(SyncMode::Fsync),
            "syncfs" => Some(SyncMode::Syncfs),
            _ => None,
        }
    }
}

/// `[store]`: where job records live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    pub kind: StoreKind,
}

/// `[store] kind`: the backend behind the store's boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// The data dir's job files (the default), made durable the way `sync` says.
    Files { sync: SyncMode },
    /// A PostgreSQL database.
    Postgres(PostgresConfig),
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            kind: StoreKind::Files {
                sync: SyncMode::default(),
            },
        }
    }
}

/// `[store] kind = "postgres"`: how to reach the database.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// A libpq connection string or `postgres://` URL; it may hold a password, so it is
    /// only ever shown through [`PostgresConfig::display_url`].
    pub url: String,
    /// Connections the store keeps open at most.
    pub pool_size: usize,
    /// `[cluster]`: this daemon as one node of the database's cluster.
    pub cluster: ClusterConfig,
}

/// `[cluster]`: how a daemon shares a PostgreSQL queue with others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's name, unique among the live nodes of a database; default the host name.
    pub node_id: String,
    /// How long a claim on a running job holds without renewal; renewed at a third of it.
    pub lease: Duration,
    /// Where this node's API is reached, as `training-worker nodes` shows it.
    pub address: String,
    /// Not a setting: `migrate` opens a database alone, refusing while any node is live,
    /// and recovers every running job as a boot of a single daemon would.
    pub exclusive: bool,
}

impl ClusterConfig {
    /// The shortest lease: a renewal every third of it must fit a round trip to the database
    /// and the trainers' stop (see ARCHITECTURE.md, "Leases and fencing").
    pub const MIN_LEASE: Duration = Duration::from_secs(3);

    /// A node for a one-off tool (`migrate`): exclusive, with a name of its own.
    pub fn exclusive(name: &str) -> ClusterConfig {
        ClusterConfig {
            node_id: name.to_string(),
            lease: Duration::from_secs(15),
            address: String::new(),
            exclusive: true,
        }
    }
}

impl PostgresConfig {
    /// The URL with any password replaced, for messages and logs.
    pub fn display_url(&self) -> String {
        redact_password(&self.url)
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.display_url())
            .field("pool_size", &self.pool_size)
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// `postgres://user:secret@host/db` as `postgres://user:***@host/db`, and a key-value
/// string's `password=secret` as `password=***`.
pub fn redact_password(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        if let Some((userinfo, host)) = authority.rsplit_once('@')
            && let Some((user, _)) = userinfo.split_once(':')
        {
            return format!("{scheme}://{user}:***@{host}{tail}");
        }
        let redacted: Vec<String> = tail
            .split('&')
            .map(|part| match part.split_once('=') {
                Some((key, _)) if key.trim_start_matches('?') == "password" => {
                    format!("{key}=***")
                }
                _ => part.to_string(),
            })
            .collect();
        return format!("{scheme}://{authority}{}", redacted.join("&"));
    }
    url.split_whitespace()
        .map(|part| match part.split_once('=') {
            Some(("password", _)) => "password=***".to_string(),
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The order in which queued jobs start (`[worker] order`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Order {
    /// Arrival order.
    #[default]
    Fifo,
    /// Earliest deadline first (compared to the second), arrival order among equal
    /// deadlines; jobs without a deadline after every job with one, in arrival order.
    Deadline,
}

impl Order {
    pub fn parse(s: &str) -> Option<Order> {
        match s {
            "fifo" => Some(Order::Fifo),
            "deadline" => Some(Order::Deadline),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// Everything the daemon needs to know, validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// Absolute: trainers get paths inside it, and it must not change with the working dir.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// When set, every `/v1/` call needs `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
    pub max_body_bytes: usize,
    /// How long a graceful stop may take in all.
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// `[store]`: the backend that holds the job records.
    pub store: StoreConfig,
    /// `[cluster]`: this daemon as a node (with the database store, one of several).
    pub cluster: ClusterConfig,
    pub api: ApiConfig,
    /// `[god_trainer]`: the G.O.D trainer API's listener.
    pub trainer_api: TrainerApiConfig,
    pub worker: WorkerConfig,
    pub executor: ExecutorConfig,
    pub god_trainer: GodTrainerConfig,
}

/// `[god_trainer]`: what the G.O.D trainer API needs; for now only how it names GPUs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GodTrainerConfig {
    /// Parts of GPU names (`H200`) reported as one of the types the client accepts, for
    /// GPUs whose name holds none of them.
    pub gpu_types: GpuTypes,
}

/// Where the G.O.D trainer API listens, and who may call it (it has no token: the
/// orchestrator sends none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrainerApiConfig {
    /// `None`: the API is off.
    pub listen: Option<SocketAddr>,
    /// Client addresses allowed besides 127.0.0.1 and ::1.
    pub allow: Vec<std::net::IpAddr>,
}

/// How the HTTP server treats its connections (`[api]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiConfig {
    /// How long a client may take to send a request's headers (and an idle connection may
    /// wait for its next request) before the daemon closes it; a slow or stalled client
    /// holds a descriptor for no longer than this.
    pub header_read_timeout: Duration,
    /// The most connections served at once; more are answered 503 and closed. The daemon
    /// lowers it to fit its descriptor limit (see `api::serve::connection_cap`).
    pub max_connections: usize,
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 512,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkerConfig {
    /// Trainers running at once; 0 pauses the queue.
    pub max_concurrent: usize,
    /// Starts cut by crashes after which a job is failed instead of started again.
    pub max_attempts: u32,
    /// The GPU ids jobs are given; empty: no GPU accounting. With `gpus = "auto"` empty
    /// after load, and set at start to the ids nvidia-smi reports.
    pub gpus: Vec<u32>,
    /// `gpus = "auto"`: the ids come from nvidia-smi at start, and an inventory that cannot
    /// be read stops the start.
    pub gpus_auto: bool,
    /// The nvidia-smi program: a bare name is looked up on `PATH` when it runs, a path is
    /// taken from the working directory. Not checked at load: with a list of ids the box
    /// may well have none.
    pub nvidia_smi: PathBuf,
    /// What nvidia-smi says the GPUs of `gpus` are, in their order; resolved at start by
    /// `executor::gpus::inventory`, empty until then and when unknown. Only `gpus` counts
    /// for handing out GPUs.
    pub inventory: Vec<Gpu>,
    /// Whether a job may start ahead of an earlier one that waits for more GPUs than are
    /// free. Off: the queue is strictly in order, and a big job is never starved.
    pub backfill: bool,
    /// The order in which queued jobs start.
    pub order: Order,
    /// How long a job without `hours_to_complete` is taken to run, for start estimates: its
    /// real run time is unknown until it ends.
    pub assumed_duration: Duration,
    /// What offers (`POST /v1/offers`) may be accepted; the worker answers them, since the
    /// answer depends on its queue.
    pub offers: OfferConfig,
}

impl Default for WorkerConfig {
    /// The built-in defaults, as `config/default.toml` lists them.
    fn default() -> WorkerConfig {
        WorkerConfig {
            max_concurrent: 1,
            max_attempts: 3,
            gpus: Vec::new(),
            gpus_auto: false,
            nvidia_smi: PathBuf::from(DEFAULT_NVIDIA_SMI),
            inventory: Vec::new(),
            backfill: false,
            order: Order::Fifo,
            assumed_duration: Duration::from_secs(3600),
            offers: OfferConfig::default(),
        }
    }
}

/// The limits an offer must be within to be accepted (`[offers]`).
#[derive(Clone, Debug, PartialEq)]
pub struct OfferConfig {
    /// The job types offers may be for: `TextJob`, `DiffusionJob`.
    pub job_types: Vec<String>,
    /// Patterns an offer's model must match one of: `*` stands for any run of characters,
    /// `?` for one; letters match in either case, as model names on the Hub do.
    pub models: Vec<String>,
    /// The largest `hours_to_complete` accepted.
    pub max_hours: f64,
    /// The longest estimated wait before the job starts that is still accepted.
    pub max_wait: Duration,
    /// How long an accepted offer holds its place for its job; zero: no reservations.
    pub reserve_for: Duration,
}

impl Default for OfferConfig {
    fn default() -> OfferConfig {
        OfferConfig {
            job_types: JOB_TYPES.iter().map(|t| t.to_string()).collect(),
            models: vec!["*".into()],
            max_hours: crate::job::MAX_HOURS,
            max_wait: Duration::from_secs(3600),
            reserve_for: Duration::from_secs(30),
        }
    }
}

/// `worker.nvidia_smi` unless set.
pub const DEFAULT_NVIDIA_SMI: &str = "nvidia-smi";

/// The job types there are, which `offers.job_types` lists from.
const JOB_TYPES: &[&str] = &["TextJob", "DiffusionJob"];

/// The longest `offers.reserve_for`: a reservation holds back the jobs behind it, so it is
/// meant to bridge the moment between an offer and its job, not to book the box.
const MAX_RESERVE_FOR: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug)]
pub struct ExecutorConfig {
    /// The trainer's argv: the program resolved to an absolute path at load time, the
    /// arguments `{placeholder}` templates like a stage's. Used (as a one-stage pipeline)
    /// when no stages are configured; empty when there are stages.
    pub command: Vec<Template>,
    /// `[[executor.stages]]`: the pipeline each job runs, in order; empty: the single command.
    pub stages: Vec<Stage>,
    /// The docker CLI, resolved at load time; set only when a stage is a container.
    pub docker: Option<PathBuf>,
    /// At boot, follow a crashed daemon's container that still runs instead of removing it.
    pub adopt_running: bool,
    /// The longest a stage may run (a stage may set its own).
    pub timeout: Duration,
    /// Derived from `[store] kind`: with the records in a database there is no job file,
    /// so a trainer's `JOB_FILE` is a copy the executor writes to `run/`.
    pub job_copies: bool,
    /// Between SIGTERM and SIGKILL when a trainer is stopped.
    pub kill_grace: Duration,
    /// Names of daemon environment variables a trainer receives.
    pub pass_env: Vec<String>,
    /// A job's log is rotated when it reaches this size (the previous part kept as
    /// `<job_id>.log.1`); 0: never.
    pub max_log_bytes: u64,
    /// The program run as each trainer's supervisor (`training-worker supervise`): this
    /// binary. Not a setting; tests that run the executor inside another binary set it.
    pub supervisor: PathBuf,
    /// The soft descriptor limit trainers get (the one the daemon inherited, before it
    /// raised its own); `None`: the daemon's. Not a setting: the daemon sets it at start.
    pub trainer_nofile: Option<u64>,
}

/// One named step of the pipeline.
#[derive(Clone, Debug)]
pub struct Stage {
    /// Unique; recorded in a job's `stages_done` and in its container's name and label.
    pub name: String,
    /// This stage's own limit; `None`: `executor.timeout`, or the budget below.
    pub timeout: Option<Duration>,
    /// `timeout = "budget"`: the limit is the job's `hours_to_complete`, counted from the
    /// stage's first start (recorded in the job file, so a restart does not extend it).
    pub budget: bool,
    /// What a stage stopped by its time limit counts as.
    pub on_timeout: OnTimeout,
    /// The `executor.pass_env` names this stage gets; `None`: all of them. Lets secrets go
    /// only to the stage that needs them (an uploader's token, say).
    pub pass_env: Option<Vec<String>>,
    /// `always = true`: it also runs after an earlier stage failed, once the job's failure
    /// is recorded (a cleanup: an image built for the job removed, say).
    pub always: bool,
    /// The job types it runs for (`TextJob`, `DiffusionJob`); empty: every job. For the
    /// others it is skipped, and the log says so.
    pub job_types: Vec<String>,
    pub run: StageRun,
}

impl Stage {
    /// Whether it runs for a job of this type (`TextJob`, `DiffusionJob`).
    pub fn runs_for(&self, job_type: &str) -> bool {
        self.job_types.is_empty() || self.job_types.iter().any(|t| t == job_type)
    }
}

/// What a stage stopped by its own time limit counts as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnTimeout {
    /// The job fails ("timed out after …").
    #[default]
    Fail,
    /// The stage counts as done and the pipeline goes on (a trainer stopped at its budget
    /// is uploaded as it stands).
    Continue,
}

#[derive(Clone, Debug)]
pub enum StageRun {
    /// A child process; the program (first entry) is resolved at load time and literal.
    Process { argv: Vec<Template> },
    /// A container started through the docker CLI.
    Docker(Box<DockerStage>),
}

/// How a container stage is started: everything `docker run` gets besides the names and
/// labels the executor adds.
#[derive(Clone, Debug)]
pub struct DockerStage {
    /// The image, with placeholders (an image built for the job: `trainer-{job_id}`).
    pub image: Template,
    /// The arguments after the image.
    pub args: Vec<Template>,
    /// Whether the container gets the job's GPUs (`--gpus device=...`).
    pub gpus: bool,
    /// `--memory`, in bytes, per assigned GPU (at least one).
    pub memory_per_gpu: Option<u64>,
    /// `--cpus` per assigned GPU (at least one).
    pub cpus_per_gpu: Option<f64>,
    /// `--shm-size` by the job's GPU count: each entry applies from that many GPUs on (a
    /// job without GPUs counts as one), in increasing order; empty: docker's default.
    pub shm_size: Vec<(usize, String)>,
    pub network: Option<String>,
    /// `-v` specs.
    pub volumes: Vec<Template>,
    /// `-e NAME=value` beside the job's environment.
    pub env: Vec<(String, Template)>,
    /// Further `docker run` flags, passed as written, before the image.
    pub docker_args: Vec<String>,
}

/// A setting that is missing, malformed or inconsistent.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn new(msg: impl Into<String>) -> ConfigError {
        ConfigError(msg.into())
    }
}

/// What the command line says; `None` leaves the setting to the lower layers.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub log_format: Option<String>,
}

/// The TOML file as written; every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    api_token: Option<String>,
    max_body_bytes: Option<usize>,
    shutdown_grace: Option<String>,
    log_format: Option<String>,
    #[serde(default)]
    store: FileStore,
    #[serde(default)]
    cluster: FileCluster,
    #[serde(default)]
    api: FileApi,
    #[serde(default)]
    worker: FileWorker,
    #[serde(default)]
    executor: FileExecutor,
    #[serde(default)]
    offers: FileOffers,
    #[serde(default)]
    god_trainer: FileGodTrainer,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGodTrainer {
    listen: Option<String>,
    allow: Option<Vec<String>>,
    gpu_types: Option<std::collections::BTreeMap<String, String>>,
}

/// `[worker] gpus` as written: a list of ids or a word (`"auto"` is the only one).
#[derive(Debug)]
enum FileGpus {
    Ids(Vec<u32>),
    Word(String),
}

impl<'de> Deserialize<'de> for FileGpus {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<FileGpus, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = FileGpus;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of GPU ids like [0, 1], or \"auto\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FileGpus, E> {
                Ok(FileGpus::Word(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<FileGpus, A::Error> {
                let mut ids = Vec::new();
                while let Some(id) = seq.next_element()? {
                    ids.push(id);
                }
                Ok(FileGpus::Ids(ids))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStore {
    kind: Option<String>,
    sync: Option<String>,
    url: Option<String>,
    pool_size: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    node_id: Option<String>,
    lease: Option<String>,
    address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileApi {
    header_read_timeout: Option<String>,
    max_connections: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWorker {
    max_concurrent: Option<usize>,
    max_attempts: Option<u32>,
    gpus: Option<FileGpus>,
    nvidia_smi: Option<String>,
    backfill: Option<bool>,
    order: Option<String>,
    assumed_duration: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOffers {
    job_types: Option<Vec<String>>,
    models: Option<Vec<String>>,
    max_hours: Option<f64>,
    max_wait: Option<String>,
    reserve_for: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileExecutor {
    command: Option<Vec<String>>,
    timeout: Option<String>,
    kill_grace: Option<String>,
    pass_env: Option<Vec<String>>,
    max_log_bytes: Option<String>,
    docker: Option<String>,
    adopt_running: Option<bool>,
    #[serde(default)]
    stages: Vec<FileStage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStage {
    name: String,
    kind: Option<String>,
    #[serde(default)]
    command: Vec<String>,
    timeout: Option<String>,
    on_timeout: Option<String>,
    image: Option<String>,
    gpus: Option<bool>,
    memory_per_gpu: Option<String>,
    cpus_per_gpu: Option<f64>,
    shm_size: Option<FileShmSize>,
    network: Option<String>,
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    docker_args: Vec<String>,
    pass_env: Option<Vec<String>>,
    always: Option<bool>,
    job_types: Option<Vec<String>>,
}

/// `shm_size = "8g"`, or by GPU count: `shm_size = { 1 = "8g", 4 = "16g" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileShmSize {
    One(String),
    ByGpus(std::collections::BTreeMap<String, String>),
}

/// The built-in `executor.command`: the demo trainer of a checkout of the repository,
/// relative to the working directory like every relative program path.
pub const DEMO_TRAINER: &str = "config/demo-trainer.sh";

/// Variables with the prefix that only the command-line client reads (`SERVER`, `CA_CERT`); the
/// daemon does not warn about them, since both often share one shell.
const CLIENT_ENV_KEYS: &[&str] = &["SERVER", "CA_CERT"];

/// The environment variables read, without the prefix, for error messages and docs.
pub const ENV_KEYS: &[&str] = &[
    "CONFIG",
    "DATA_DIR",
    "LISTEN",
    "API_TOKEN",
    "MAX_BODY_BYTES",
    "SHUTDOWN_GRACE",
    "LOG_FORMAT",
    "STORE_KIND",
    "STORE_SYNC",
    "DATABASE_URL",
    "STORE_POOL_SIZE",
    "NODE_ID",
    "CLUSTER_LEASE",
    "CLUSTER_ADDRESS",
    "API_HEADER_READ_TIMEOUT",
    "API_MAX_CONNECTIONS",
    "GOD_TRAINER_LISTEN",
    "GOD_TRAINER_ALLOW",
    "WORKER_MAX_CONCURRENT",
    "WORKER_MAX_ATTEMPTS",
    "WORKER_GPUS",
    "WORKER_NVIDIA_SMI",
    "WORKER_BACKFILL",
    "WORKER_ORDER",
    "WORKER_ASSUMED_DURATION",
    "EXECUTOR_COMMAND",
    "EXECUTOR_TIMEOUT",
    "EXECUTOR_KILL_GRACE",
    "EXECUTOR_PASS_ENV",
    "EXECUTOR_MAX_LOG_BYTES",
    "EXECUTOR_DOCKER",
    "EXECUTOR_ADOPT_RUNNING",
    "OFFERS_JOB_TYPES",
    "OFFERS_MODELS",
    "OFFERS_MAX_HOURS",
    "OFFERS_MAX_WAIT",
    "OFFERS_RESERVE_FOR",
    "GOD_TRAINER_GPU_TYPES",
];

impl Config {
    /// Loads the layers. `env` looks a variable up (the real environment in the daemon, a
    /// map in tests); `cwd` anchors relative paths.
    pub fn load(
        overrides: &Overrides,
        env: impl Fn(&str) -> Option<String>,
        cwd: &Path,
    ) -> Result<Config, ConfigError> {
        let var = |key: &str| env(&format!("{ENV_PREFIX}{key}")).filter(|v| !v.is_empty());
        // An error names the setting as the operator wrote it: the variable when one is set
        // (it wins over the file), else the file's key.
        let name_of = |key: &str| setting_name(&var, key);

        let explicit_file = overrides
            .config_file
            .clone()
            .or_else(|| var("CONFIG").map(PathBuf::from));
        let file = match explicit_file {
            Some(path) => read_file(&cwd.join(path))?,
            None => {
                let default = cwd.join(DEFAULT_CONFIG_FILE);
                if default.exists() {
                    read_file(&default)?
                } else {
                    FileConfig::default()
                }
            }
        };

        // Read without `var`'s filter: an empty variable is a mistake here, not "unset",
        // since joined to the working directory it would make that the data dir.
        let data_dir_var = format!("{ENV_PREFIX}DATA_DIR");
        let (data_dir, data_dir_name) = match (&overrides.data_dir, env(&data_dir_var)) {
            (Some(flag), _) => (flag.clone(), "--data-dir".to_string()),
            (None, Some(v)) => (PathBuf::from(v), data_dir_var),
            (None, None) => match file.data_dir {
                Some(path) => (path, "data_dir".to_string()),
                None => (PathBuf::from("data"), "data_dir".to_string()),
            },
        };
        if data_dir.as_os_str().to_string_lossy().trim().is_empty() {
            return Err(ConfigError::new(format!(
                "{data_dir_name}: empty; name a directory (the default is \"data\")"
            )));
        }
        let (listen_text, listen_name) = match &overrides.listen {
            Some(flag) => (flag.clone(), "--listen".to_string()),
            None => (
                var("LISTEN")
                    .or(file.listen)
                    .unwrap_or_else(|| "127.0.0.1:8787".into()),
                name_of("listen"),
            ),
        };
        let listen = listen_address(&listen_name, &listen_text)?;
        // An explicitly empty variable clears a token set in the file.
        let api_token = match env(&format!("{ENV_PREFIX}API_TOKEN")) {
            Some(token) => Some(token),
            None => file.api_token,
        }
        .filter(|t| !t.is_empty());
        let max_body_bytes = match var("MAX_BODY_BYTES") {
            Some(v) => parse_number(&name_of("max_body_bytes"), &v)?,
            None => file.max_body_bytes.unwrap_or(1024 * 1024),
        };
        if max_body_bytes == 0 {
            return Err(ConfigError::new(format!(
                "{}: must be at least 1",
                name_of("max_body_bytes")
            )));
        }
        let shutdown_grace = duration(
            &name_of("shutdown_grace"),
            var("SHUTDOWN_GRACE").or(file.shutdown_grace),
            "20s",
        )?;
        if shutdown_grace.is_zero() {
            return Err(ConfigError::new(format!(
                "{}: must be longer than 0s",
                name_of("shutdown_grace")
            )));
        }
        let (log_format_text, log_format_name) = match &overrides.log_format {
            Some(flag) => (flag.clone(), "--log-format".to_string()),
            None => (
                var("LOG_FORMAT")
                    .or(file.log_format)
                    .unwrap_or_else(|| "text".into()),
                name_of("log_format"),
            ),
        };
        let log_format = LogFormat::parse(&log_format_text).ok_or_else(|| {
            ConfigError::new(format!(
                "{log_format_name}: {log_format_text:?} is not \"text\" or \"json\""
            ))
        })?;

        let cluster = cluster(&var, file.cluster, listen)?;
        let store = store(&var, file.store, cluster.clone())?;
        let api = api(&var, file.api)?;
        let trainer_api = trainer_api(&var, &file.god_trainer)?;
        let max_concurrent = match var("WORKER_MAX_CONCURRENT") {
            Some(v) => parse_number(&name_of("worker.max_concurrent"), &v)?,
            None => file.worker.max_concurrent.unwrap_or(1),
        };
        let max_attempts = match var("WORKER_MAX_ATTEMPTS") {
            Some(v) => parse_number(&name_of("worker.max_attempts"), &v)?,
            None => file.worker.max_attempts.unwrap_or(3),
        };
        if max_attempts == 0 {
            return Err(ConfigError::new(format!(
                "{}: must be at least 1",
                name_of("worker.max_attempts")
            )));
        }
        let gpus_written = match var("WORKER_GPUS") {
            Some(v) if v.trim() == "auto" => FileGpus::Word(v),
            Some(v) => FileGpus::Ids(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| parse_number(&name_of("worker.gpus"), s))
                    .collect::<Result<Vec<u32>, _>>()?,
            ),
            None => file.worker.gpus.unwrap_or(FileGpus::Ids(Vec::new())),
        };
        let (gpus, gpus_auto) = match gpus_written {
            FileGpus::Ids(ids) => (ids, false),
            FileGpus::Word(word) if word.trim() == "auto" => (Vec::new(), true),
            FileGpus::Word(word) => {
                return Err(ConfigError::new(format!(
                    "{}: {word:?} is not \"auto\" or a list of GPU ids",
                    name_of("worker.gpus")
                )));
            }
        };
        let nvidia_smi = var("WORKER_NVIDIA_SMI")
            .or(file.worker.nvidia_smi)
            .unwrap_or_else(|| DEFAULT_NVIDIA_SMI.into());
        let nvidia_smi = match nvidia_smi.trim() {
            "" => {
                return Err(ConfigError::new(format!(
                    "{}: empty; name a program (the default is \"{DEFAULT_NVIDIA_SMI}\")",
                    name_of("worker.nvidia_smi")
                )));
            }
            // Without `.` components, so that messages name it as plainly as it was written.
            program if program.contains('/') => cwd.join(program).components().collect(),
            program => PathBuf::from(program),
        };
        let god_trainer = god_trainer(&var, file.god_trainer)?;
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = gpus.iter().find(|id| !seen.insert(**id)) {
            return Err(ConfigError::new(format!(
                "{}: GPU {twice} is listed twice",
                name_of("worker.gpus")
            )));
        }
        let backfill = match var("WORKER_BACKFILL") {
            Some(v) => parse_bool(&name_of("worker.backfill"), &v)?,
            None => file.worker.backfill.unwrap_or(false),
        };
        let order_text = var("WORKER_ORDER")
            .or(file.worker.order)
            .unwrap_or_else(|| "fifo".into());
        let order = Order::parse(order_text.trim()).ok_or_else(|| {
            ConfigError::new(format!(
                "{}: {order_text:?} is not \"fifo\" or \"deadline\"",
                name_of("worker.order")
            ))
        })?;
        let assumed_duration = duration(
            &name_of("worker.assumed_duration"),
            var("WORKER_ASSUMED_DURATION").or(file.worker.assumed_duration),
            "1h",
        )?;
        // At most the largest budget a job may carry, so that estimates stay within dates.
        if assumed_duration.is_zero()
            || assumed_duration.as_secs_f64() > crate::job::MAX_HOURS * 3600.0
        {
            return Err(ConfigError::new(format!(
                "{}: must be longer than 0s and at most 8760h (a year)",
                name_of("worker.assumed_duration")
            )));
        }
        let offers = offers(&var, file.offers)?;

        let command_name = name_of("executor.command");
        let command_given = var("EXECUTOR_COMMAND").is_some() || file.executor.command.is_some();
        if command_given && !file.executor.stages.is_empty() {
            return Err(ConfigError::new(format!(
                "{command_name}: set either executor.command or [[executor.stages]], not both",
            )));
        }
        let command = match var("EXECUTOR_COMMAND") {
            Some(v) => parse_command(&command_name, &v)?,
            None => file
                .executor
                .command
                .unwrap_or_else(|| vec![DEMO_TRAINER.into()]),
        };
        let path_var = env("PATH");
        let command = if file.executor.stages.is_empty() {
            command_templates(&command_name, command, cwd, path_var.as_deref()).map_err(|e| {
                if command_given {
                    e
                } else {
                    // Only a checkout of the repository has the demo trainer: say what to set
                    // rather than only that a file is missing.
                    ConfigError::new(format!(
                        "executor.command: not set, and the built-in default {DEMO_TRAINER} (the repository's demo trainer) is not in the working directory {}; set executor.command in a config file (--config) or {ENV_PREFIX}EXECUTOR_COMMAND",
                        cwd.display()
                    ))
                }
            })?
        } else {
            Vec::new()
        };
        let stages = file
            .executor
            .stages
            .into_iter()
            .enumerate()
            .map(|(i, stage)| parse_stage(i, stage, cwd, path_var.as_deref()))
            .collect::<Result<Vec<Stage>, ConfigError>>()?;
        for (i, stage) in stages.iter().enumerate() {
            if stages[..i].iter().any(|s| s.name == stage.name) {
                return Err(ConfigError::new(format!(
                    "executor.stages[{i}].name: {:?} is used twice; stage names must be unique",
                    stage.name
                )));
            }
        }
        let docker = match var("EXECUTOR_DOCKER").or(file.executor.docker) {
            _ if !stages.iter().any(|s| matches!(s.run, StageRun::Docker(_))) => None,
            program => {
                let program = program.unwrap_or_else(|| "docker".into());
                let resolved =
                    resolve_command("executor.docker", vec![program], cwd, path_var.as_deref())?;
                Some(PathBuf::from(&resolved[0]))
            }
        };
        let adopt_running = match var("EXECUTOR_ADOPT_RUNNING") {
            Some(v) => parse_bool(&name_of("executor.adopt_running"), &v)?,
            None => file.executor.adopt_running.unwrap_or(false),
        };
        let timeout = duration(
            &name_of("executor.timeout"),
            var("EXECUTOR_TIMEOUT").or(file.executor.timeout),
            "24h",
        )?;
        if timeout.is_zero() {
            return Err(ConfigError::new(format!(
                "{}: must be longer than 0s",
                name_of("executor.timeout")
            )));
        }
        let kill_grace = duration(
            &name_of("executor.kill_grace"),
            var("EXECUTOR_KILL_GRACE").or(file.executor.kill_grace),
            "10s",
        )?;
        if kill_grace >= shutdown_grace {
            return Err(ConfigError::new(format!(
                "{} ({}) must be shorter than {} ({}), so that a graceful stop can stop trainers in time",
                name_of("executor.kill_grace"),
                humantime::format_duration(kill_grace),
                name_of("shutdown_grace"),
                humantime::format_duration(shutdown_grace)
            )));
        }
        let max_log_bytes = match var("EXECUTOR_MAX_LOG_BYTES").or(file.executor.max_log_bytes) {
            None => DEFAULT_MAX_LOG_BYTES,
            Some(text) if text.trim() == "0" => 0,
            Some(text) => parse_bytes(&text).ok_or_else(|| {
                ConfigError::new(format!(
                    "executor.max_log_bytes: {text:?} is not a size like \"1g\" or \"512m\" (0: no limit)"
                ))
            })?,
        };
        let pass_env: Vec<String> = match var("EXECUTOR_PASS_ENV") {
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            None => file.executor.pass_env.unwrap_or_default(),
        };
        for name in &pass_env {
            if !is_env_name(name) {
                return Err(ConfigError::new(format!(
                    "{}: {name:?} is not an environment variable name",
                    name_of("executor.pass_env")
                )));
            }
        }

        for (i, stage) in stages.iter().enumerate() {
            if let Some(name) = stage
                .pass_env
                .iter()
                .flatten()
                .find(|name| !pass_env.contains(name))
            {
                return Err(ConfigError::new(format!(
                    "executor.stages[{i}].pass_env: {name:?} is not in executor.pass_env, so the daemon does not read it"
                )));
            }
        }

        let job_copies = matches!(store.kind, StoreKind::Postgres(_));
        Ok(Config {
            data_dir: cwd.join(data_dir),
            listen,
            api_token,
            max_body_bytes,
            shutdown_grace,
            log_format,
            store,
            cluster,
            api,
            trainer_api,
            worker: WorkerConfig {
                max_concurrent,
                max_attempts,
                gpus,
                gpus_auto,
                nvidia_smi,
                inventory: Vec::new(),
                backfill,
                order,
                assumed_duration,
                offers,
            },
            executor: ExecutorConfig {
                command,
                stages,
                docker,
                adopt_running,
                timeout,
                job_copies,
                kill_grace,
                pass_env,
                max_log_bytes,
                supervisor: PathBuf::from(crate::executor::supervisor::THIS_BINARY),
                trainer_nofile: None,
            },
            god_trainer,
        })
    }
}

/// The `[offers]` section, with its environment variables over it.
fn offers(
    var: &impl Fn(&str) -> Option<String>,
    file: FileOffers,
) -> Result<OfferConfig, ConfigError> {
    let defaults = OfferConfig::default();
    let name_of = |key: &str| setting_name(var, key);
    let list = |key: &str, file: Option<Vec<String>>, default: Vec<String>| match var(key) {
        Some(v) => v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        None => file.unwrap_or(default),
    };
    let job_types = list("OFFERS_JOB_TYPES", file.job_types, defaults.job_types);
    if job_types.is_empty() {
        return Err(ConfigError::new(format!(
            "{}: empty, so no offer could be accepted; list TextJob, DiffusionJob or both",
            name_of("offers.job_types")
        )));
    }
    if let Some(unknown) = job_types.iter().find(|t| !JOB_TYPES.contains(&t.as_str())) {
        return Err(ConfigError::new(format!(
            "{}: {unknown:?} is not a job type; TextJob or DiffusionJob",
            name_of("offers.job_types")
        )));
    }
    let models = list("OFFERS_MODELS", file.models, defaults.models);
    if models.is_empty() || models.iter().any(|m| m.trim().is_empty()) {
        return Err(ConfigError::new(format!(
            "{}: must list at least one non-empty pattern (\"*\" takes any model)",
            name_of("offers.models")
        )));
    }
    let max_hours = match var("OFFERS_MAX_HOURS") {
        Some(v) => v.trim().parse::<f64>().map_err(|_| {
            ConfigError::new(format!(
                "{}: {v:?} is not a number of hours",
                name_of("offers.max_hours")
            ))
        })?,
        None => file.max_hours.unwrap_or(defaults.max_hours),
    };
    if !(max_hours > 0.0 && max_hours <= crate::job::MAX_HOURS) {
        return Err(ConfigError::new(format!(
            "{}: {max_hours} must be above 0 and at most {} (a year)",
            name_of("offers.max_hours"),
            crate::job::MAX_HOURS
        )));
    }
    let max_wait = duration(
        &name_of("offers.max_wait"),
        var("OFFERS_MAX_WAIT").or(file.max_wait),
        "1h",
    )?;
    let reserve_for = duration(
        &name_of("offers.reserve_for"),
        var("OFFERS_RESERVE_FOR").or(file.reserve_for),
        "30s",
    )?;
    if reserve_for > MAX_RESERVE_FOR {
        return Err(ConfigError::new(format!(
            "{}: {} is longer than {}; a reservation holds back the jobs behind it, so keep it short",
            name_of("offers.reserve_for"),
            humantime::format_duration(reserve_for),
            humantime::format_duration(MAX_RESERVE_FOR)
        )));
    }
    Ok(OfferConfig {
        job_types,
        models,
        max_hours,
        max_wait,
        reserve_for,
    })
}

/// The `[god_trainer]` section; `gpu_types` from the environment as `H200=H100,GH200=H100`.
fn god_trainer(
    var: &impl Fn(&str) -> Option<String>,
    file: FileGodTrainer,
) -> Result<GodTrainerConfig, ConfigError> {
    let name = setting_name(var, "god_trainer.gpu_types");
    let pairs: Vec<(String, String)> = match var("GOD_TRAINER_GPU_TYPES") {
        Some(v) => v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((part, to)) => Ok((part.trim().to_string(), to.trim().to_string())),
                None => Err(ConfigError::new(format!(
                    "{name}: {pair:?} is not NAME_PART=TYPE, like H200=H100"
                ))),
            })
            .collect::<Result<_, _>>()?,
        None => file.gpu_types.unwrap_or_default().into_iter().collect(),
    };
    let mut gpu_types = GpuTypes::new();
    for (part, to) in pairs {
        if part.trim().is_empty() {
            return Err(ConfigError::new(format!(
                "{name}: an empty name part would match no GPU"
            )));
        }
        let Some(to) = GodType::parse(&to) else {
            return Err(ConfigError::new(format!(
                "{name}: {part:?} maps to {to:?}, which is not H100, A100 or A6000 (the types the G.O.D client accepts)"
            )));
        };
        gpu_types.insert(part, to);
    }
    Ok(GodTrainerConfig { gpu_types })
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(format!("cannot read config file {}: {e}", path.display()))
    })?;
    toml::from_str(&text).map_err(|e| {
        // toml's message spans several lines with a caret; one line is enough here.
        let msg = e.message().trim().to_string();
        // The line itself names the key, which the message may not.
        let at = e
            .span()
            .map(|span| {
                let line = text[..span.start].matches('\n').count() + 1;
                let content = text.lines().nth(line - 1).unwrap_or("").trim();
                format!(" (line {line}: {content})")
            })
            .unwrap_or_default();
        ConfigError::new(format!("config file {}{at}: {msg}", path.display()))
    })
}

/// The `[api]` settings.
/// `[store]`, with `TRAINING_WORKER_STORE_KIND`, `_STORE_SYNC`, `_DATABASE_URL` and
/// `_STORE_POOL_SIZE` over the file.
fn store(
    var: &impl Fn(&str) -> Option<String>,
    file: FileStore,
    cluster: ClusterConfig,
) -> Result<StoreConfig, ConfigError> {
    let name_of = |key: &str| setting_name(var, key);
    let kind = var("STORE_KIND")
        .or(file.kind)
        .unwrap_or_else(|| "files".into());
    let sync_text = var("STORE_SYNC").or(file.sync);
    // The URL's variable is the name PostgreSQL tools use, not STORE_URL.
    let url_name = match var("DATABASE_URL") {
        Some(_) => format!("{ENV_PREFIX}DATABASE_URL"),
        None => "store.url".to_string(),
    };
    let url = var("DATABASE_URL").or(file.url);
    let pool_size = match var("STORE_POOL_SIZE") {
        Some(v) => Some(parse_number(&name_of("store.pool_size"), &v)?),
        None => file.pool_size,
    };
    match kind.trim() {
        "files" => {
            let sync_text = sync_text.unwrap_or_else(|| "fsync".into());
            let sync = SyncMode::parse(sync_text.trim()).ok_or_else(|| {
                ConfigError::new(format!(
                    "{}: {sync_text:?} is not \"fsync\" or \"syncfs\"",
                    name_of("store.sync")
                ))
            })?;
            if let Some(url) = url.filter(|u| !u.trim().is_empty()) {
                let shown = redact_password(&url);
                return Err(ConfigError::new(format!(
                    "{}: {shown:?} is set, but {} is \"files\"; set it to \"postgres\" to use the database",
                    url_name,
                    name_of("store.kind")
                )));
            }
            Ok(StoreConfig {
                kind: StoreKind::Files { sync },
            })
        }
        "postgres" => {
            let url = url.filter(|u| !u.trim().is_empty()).ok_or_else(|| {
                ConfigError::new(format!(
                    "{}: empty; with {} = \"postgres\" name the database (a postgres:// URL), here or in {ENV_PREFIX}DATABASE_URL",
                    url_name,
                    name_of("store.kind")
                ))
            })?;
            if let Err(e) = url.parse::<tokio_postgres::Config>() {
                return Err(ConfigError::new(format!(
                    "{}: {:?} is not a PostgreSQL connection string: {e}",
                    url_name,
                    redact_password(&url)
                )));
            }
            // `sync` is the file store's: the database makes its own writes durable.
            let _ = sync_text;
            let pool_size = pool_size.unwrap_or(8);
            if pool_size < 2 {
                return Err(ConfigError::new(format!(
                    "{}: must be at least 2 (one connection holds the store's lock)",
                    name_of("store.pool_size")
                )));
            }
            Ok(StoreConfig {
                kind: StoreKind::Postgres(PostgresConfig {
                    url,
                    pool_size,
                    cluster,
                }),
            })
        }
        other => Err(ConfigError::new(format!(
            "{}: {other:?} is not \"files\" or \"postgres\"",
            name_of("store.kind")
        ))),
    }
}

/// `[cluster]`, with `TRAINING_WORKER_NODE_ID`, `_CLUSTER_LEASE` and `_CLUSTER_ADDRESS` over
/// the file. Read with either store; only the database store has other nodes.
fn cluster(
    var: &impl Fn(&str) -> Option<String>,
    file: FileCluster,
    listen: SocketAddr,
) -> Result<ClusterConfig, ConfigError> {
    let name_of = |key: &str| setting_name(var, key);
    let node_id = var("NODE_ID")
        .or(file.node_id)
        .map(|id| id.trim().to_string())
        .unwrap_or_else(|| {
            crate::store::lock::host_name()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                        c
                    } else {
                        '-'
                    }
                })
                .take(64)
                .collect()
        });
    let node_name = match var("NODE_ID") {
        Some(_) => format!("{ENV_PREFIX}NODE_ID"),
        None => "cluster.node_id".to_string(),
    };
    if node_id.is_empty()
        || node_id.len() > 64
        || !node_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(ConfigError::new(format!(
            "{node_name}: {node_id:?} must be 1 to 64 letters, digits, '-', '_' or '.'"
        )));
    }
    let lease_name = name_of("cluster.lease");
    let lease = duration(&lease_name, var("CLUSTER_LEASE").or(file.lease), "15s")?;
    if lease < ClusterConfig::MIN_LEASE {
        return Err(ConfigError::new(format!(
            "{lease_name}: {} is shorter than {}, too short for a renewal at a third of it",
            humantime::format_duration(lease),
            humantime::format_duration(ClusterConfig::MIN_LEASE)
        )));
    }
    let address = var("CLUSTER_ADDRESS")
        .or(file.address)
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| {
            let host = if listen.ip().is_unspecified() {
                crate::store::lock::host_name()
            } else {
                listen.ip().to_string()
            };
            match listen.ip() {
                std::net::IpAddr::V6(_) if !listen.ip().is_unspecified() => {
                    format!("http://[{host}]:{}", listen.port())
                }
                _ => format!("http://{host}:{}", listen.port()),
            }
        });
    Ok(ClusterConfig {
        node_id,
        lease,
        address,
        exclusive: false,
    })
}

fn api(var: &impl Fn(&str) -> Option<String>, file: FileApi) -> Result<ApiConfig, ConfigError> {
    let header_read_timeout = duration(
        "api.header_read_timeout",
        var("API_HEADER_READ_TIMEOUT").or(file.header_read_timeout),
        "10s",
    )?;
    if header_read_timeout.is_zero() {
        return Err(ConfigError::new(
            "api.header_read_timeout: must be longer than 0s",
        ));
    }
    let max_connections = match var("API_MAX_CONNECTIONS") {
        Some(v) => parse_number("api.max_connections", &v)?,
        None => file
            .max_connections
            .unwrap_or(ApiConfig::default().max_connections),
    };
    if max_connections == 0 {
        return Err(ConfigError::new("api.max_connections: must be at least 1"));
    }
    Ok(ApiConfig {
        header_read_timeout,
        max_connections,
    })
}

/// `[god_trainer]`: `listen` (empty: off) and `allow`; the variables take a comma list.
fn trainer_api(
    var: &impl Fn(&str) -> Option<String>,
    file: &FileGodTrainer,
) -> Result<TrainerApiConfig, ConfigError> {
    let (listen_text, listen_name) = match var("GOD_TRAINER_LISTEN") {
        Some(v) => (Some(v), "TRAINING_WORKER_GOD_TRAINER_LISTEN"),
        None => (file.listen.clone(), "god_trainer.listen"),
    };
    let listen = match listen_text.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(listen_address(listen_name, text)?),
    };
    let (allow, allow_name): (Vec<String>, &str) = match var("GOD_TRAINER_ALLOW") {
        Some(v) => (
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            "TRAINING_WORKER_GOD_TRAINER_ALLOW",
        ),
        None => (file.allow.clone().unwrap_or_default(), "god_trainer.allow"),
    };
    let allow = allow
        .iter()
        .map(|a| {
            a.trim()
                .parse()
                .map_err(|_| ConfigError::new(format!("{allow_name}: {a:?} is not an IP address")))
        })
        .collect::<Result<Vec<std::net::IpAddr>, ConfigError>>()?;
    Ok(TrainerApiConfig { listen, allow })
}

fn parse_number<T: std::str::FromStr>(key: &str, text: &str) -> Result<T, ConfigError> {
    text.trim()
        .parse()
        .map_err(|_| ConfigError::new(format!("{key}: {text:?} is not a whole number")))
}

fn duration(key: &str, text: Option<String>, default: &str) -> Result<Duration, ConfigError> {
    let text = text.unwrap_or_else(|| default.to_string());
    humantime::parse_duration(text.trim()).map_err(|e| {
        ConfigError::new(format!(
            "{key}: {text:?} is not a duration like \"90s\" or \"13h\" ({e})"
        ))
    })
}

/// The command as a JSON array (`["python3", "train.py"]`) or words split the way a POSIX
/// shell splits them (`'my trainer.sh' --flag "a b"` is three), without expanding anything.
fn parse_command(name: &str, text: &str) -> Result<Vec<String>, ConfigError> {
    if text.trim_start().starts_with('[') {
        serde_json::from_str(text)
            .map_err(|e| ConfigError::new(format!("{name}: not a JSON array of strings: {e}")))
    } else {
        shell_words::split(text).map_err(|e| {
            ConfigError::new(format!(
                "{name}: {text:?} cannot be split into words ({e}); close every quote, or give a JSON array"
            ))
        })
    }
}

/// The single `executor.command` as a one-stage pipeline's argv: the program resolved (see
/// [`resolve_command`]) and literal, the arguments templates like a process stage's.
fn command_templates(
    name: &str,
    command: Vec<String>,
    cwd: &Path,
    path_var: Option<&str>,
) -> Result<Vec<Template>, ConfigError> {
    if command.first().is_some_and(|p| p.contains('{')) {
        return Err(ConfigError::new(format!(
            "{name}: the program (first entry) cannot hold placeholders"
        )));
    }
    let command = resolve_command(name, command, cwd, path_var)?;
    let mut argv = vec![Template::literal(&command[0])];
    for arg in &command[1..] {
        argv.push(Template::parse(arg).map_err(|e| ConfigError::new(format!("{name}: {e}")))?);
    }
    Ok(argv)
}

/// How an error names `key` (`worker.max_concurrent`): by its environment variable
/// (`TRAINING_WORKER_WORKER_MAX_CONCURRENT`) when that is set, since it wins over the file.
fn setting_name(var: &impl Fn(&str) -> Option<String>, key: &str) -> String {
    let suffix = key.replace('.', "_").to_ascii_uppercase();
    if var(&suffix).is_some() {
        format!("{ENV_PREFIX}{suffix}")
    } else {
        key.to_string()
    }
}

/// `listen`: an address, or a host name and port resolved now (`localhost:8787`). Of the
/// addresses a name has, the first IPv4 one is taken, else the first: the client's default
/// server is `127.0.0.1`, and `localhost` often resolves to `::1` first.
fn listen_address(name: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(address) = text.parse() {
        return Ok(address);
    }
    let bad = |why: String| {
        ConfigError::new(format!(
            "{name}: {text:?} is not an address like 127.0.0.1:8787 or localhost:8787 ({why})"
        ))
    };
    let addresses: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .collect();
    addresses
        .iter()
        .find(|a| a.is_ipv4())
        .or(addresses.first())
        .copied()
        .ok_or_else(|| bad("the name resolves to no address".into()))
}

/// The names of `TRAINING_WORKER_*` variables among `names` that neither the daemon nor
/// the client reads: a typo there would otherwise be silently ignored, unlike one in the
/// file.
pub fn unknown_variables(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut unknown: Vec<String> = names
        .into_iter()
        .filter(|name| {
            name.strip_prefix(ENV_PREFIX).is_some_and(|suffix| {
                !ENV_KEYS.contains(&suffix) && !CLIENT_ENV_KEYS.contains(&suffix)
            })
        })
        .collect();
    unknown.sort();
    unknown
}

fn parse_bool(key: &str, text: &str) -> Result<bool, ConfigError> {
    match text.trim() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(ConfigError::new(format!(
            "{key}: {other:?} is not true or false"
        ))),
    }
}

/// Checks one `[[executor.stages]]` entry; `i` names it in messages.
fn parse_stage(
    i: usize,
    stage: FileStage,
    cwd: &Path,
    path_var: Option<&str>,
) -> Result<Stage, ConfigError> {
    let key = |field: &str| format!("executor.stages[{i}].{field}");
    let name_ok = !stage.name.is_empty()
        && stage.name.len() <= 40
        && stage
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !name_ok {
        return Err(ConfigError::new(format!(
            "{}: {:?} must be 1 to 40 letters, digits, '-' or '_'",
            key("name"),
            stage.name
        )));
    }
    let templates = |field: &str, texts: &[String]| {
        texts
            .iter()
            .map(|t| {
                Template::parse(t).map_err(|e| ConfigError::new(format!("{}: {e}", key(field))))
            })
            .collect::<Result<Vec<Template>, ConfigError>>()
    };
    let budget = stage.timeout.as_deref().map(str::trim) == Some("budget");
    let timeout = match stage.timeout.filter(|_| !budget) {
        None => None,
        Some(text) => {
            let t = duration(&key("timeout"), Some(text), "")?;
            if t.is_zero() {
                return Err(ConfigError::new(format!(
                    "{}: must be longer than 0s",
                    key("timeout")
                )));
            }
            Some(t)
        }
    };
    let kind = stage.kind.as_deref().unwrap_or("process");
    let docker_only = [
        ("image", stage.image.is_some()),
        ("gpus", stage.gpus.is_some()),
        ("memory_per_gpu", stage.memory_per_gpu.is_some()),
        ("cpus_per_gpu", stage.cpus_per_gpu.is_some()),
        ("shm_size", stage.shm_size.is_some()),
        ("network", stage.network.is_some()),
        ("volumes", !stage.volumes.is_empty()),
        ("env", !stage.env.is_empty()),
        ("docker_args", !stage.docker_args.is_empty()),
    ];
    let run = match kind {
        "process" => {
            if let Some((field, _)) = docker_only.iter().find(|(_, set)| *set) {
                return Err(ConfigError::new(format!(
                    "{}: only for kind = \"docker\" stages",
                    key(field)
                )));
            }
            let mut command = stage.command;
            if command.first().is_some_and(|p| p.contains('{')) {
                return Err(ConfigError::new(format!(
                    "{}: the program (first entry) cannot hold placeholders",
                    key("command")
                )));
            }
            let program = command.first().cloned().unwrap_or_default();
            let resolved = resolve_command(&key("command"), vec![program], cwd, path_var)?;
            command[0] = resolved[0].clone();
            let mut argv = vec![Template::literal(&command[0])];
            argv.extend(templates("command", &command[1..])?);
            StageRun::Process { argv }
        }
        "docker" => {
            let image = stage
                .image
                .filter(|s| !s.trim().is_empty())
                .ok_or_else(|| {
                    ConfigError::new(format!("{}: required for a docker stage", key("image")))
                })?;
            let image = Template::parse(&image)
                .map_err(|e| ConfigError::new(format!("{}: {e}", key("image"))))?;
            let memory_per_gpu = stage
                .memory_per_gpu
                .map(|text| {
                    parse_bytes(&text).ok_or_else(|| {
                        ConfigError::new(format!(
                            "{}: {text:?} is not a size like \"64g\" or \"512m\"",
                            key("memory_per_gpu")
                        ))
                    })
                })
                .transpose()?;
            if stage
                .cpus_per_gpu
                .is_some_and(|c| !c.is_finite() || c <= 0.0)
            {
                return Err(ConfigError::new(format!(
                    "{}: must be a number above 0",
                    key("cpus_per_gpu")
                )));
            }
            let shm_size = shm_sizes(&key("shm_size"), stage.shm_size)?;
            let gpus = stage.gpus.unwrap_or(true);
            if stage.always == Some(true) && gpus {
                return Err(ConfigError::new(format!(
                    "{}: an always = true stage may run after its job has let go of its GPUs; set gpus = false",
                    key("gpus")
                )));
            }
            let env = stage
                .env
                .iter()
                .map(|(name, value)| {
                    if !is_env_name(name) {
                        return Err(ConfigError::new(format!(
                            "{}: {name:?} is not an environment variable name",
                            key("env")
                        )));
                    }
                    let value = Template::parse(value)
                        .map_err(|e| ConfigError::new(format!("{}.{name}: {e}", key("env"))))?;
                    Ok((name.clone(), value))
                })
                .collect::<Result<Vec<_>, ConfigError>>()?;
            StageRun::Docker(Box::new(DockerStage {
                image,
                args: templates("command", &stage.command)?,
                gpus,
                memory_per_gpu,
                cpus_per_gpu: stage.cpus_per_gpu,
                shm_size,
                network: stage.network.filter(|n| !n.is_empty()),
                volumes: templates("volumes", &stage.volumes)?,
                env,
                docker_args: stage.docker_args,
            }))
        }
        other => {
            return Err(ConfigError::new(format!(
                "{}: {other:?} is not \"process\" or \"docker\"",
                key("kind")
            )));
        }
    };
    if stage.job_types.as_ref().is_some_and(Vec::is_empty) {
        return Err(ConfigError::new(format!(
            "{}: empty, so the stage would never run; leave it out to run it for every job",
            key("job_types")
        )));
    }
    let job_types = stage.job_types.unwrap_or_default();
    if let Some(unknown) = job_types.iter().find(|t| !JOB_TYPES.contains(&t.as_str())) {
        return Err(ConfigError::new(format!(
            "{}: {unknown:?} is not a job type; TextJob or DiffusionJob",
            key("job_types")
        )));
    }
    let on_timeout = match stage.on_timeout.as_deref() {
        None | Some("fail") => OnTimeout::Fail,
        Some("continue") => OnTimeout::Continue,
        Some(other) => {
            return Err(ConfigError::new(format!(
                "{}: {other:?} is not \"fail\" or \"continue\"",
                key("on_timeout")
            )));
        }
    };
    Ok(Stage {
        name: stage.name,
        timeout,
        budget,
        on_timeout,
        pass_env: stage.pass_env,
        always: stage.always.unwrap_or(false),
        job_types,
        run,
    })
}

/// `shm_size` as (from this many GPUs, size) entries in increasing order.
fn shm_sizes(key: &str, shm: Option<FileShmSize>) -> Result<Vec<(usize, String)>, ConfigError> {
    let entries: Vec<(String, String)> = match shm {
        None => return Ok(Vec::new()),
        Some(FileShmSize::One(size)) => vec![("1".into(), size)],
        Some(FileShmSize::ByGpus(map)) => map.into_iter().collect(),
    };
    if entries.is_empty() {
        return Err(ConfigError::new(format!(
            "{key}: give a size (\"8g\") or sizes by GPU count ({{ 1 = \"8g\", 4 = \"16g\" }})"
        )));
    }
    let mut sizes = Vec::with_capacity(entries.len());
    for (count, size) in entries {
        let from: usize = match count.trim().parse() {
            Ok(n) if n >= 1 => n,
            _ => {
                return Err(ConfigError::new(format!(
                    "{key}: {count:?} is not a GPU count from 1 up"
                )));
            }
        };
        if parse_bytes(&size).is_none() {
            return Err(ConfigError::new(format!(
                "{key}: {size:?} is not a size like \"16g\""
            )));
        }
        sizes.push((from, size));
    }
    sizes.sort_by_key(|(from, _)| *from);
    Ok(sizes)
}

/// A size as docker writes it: a number with an optional `b`, `k`, `m`, `g` or `t` (powers
/// of 1024), in bytes.
/// `executor.max_log_bytes` unless set: a trainer that prints a progress bar per step for
/// days fills no disk.
const DEFAULT_MAX_LOG_BYTES: u64 = 1 << 30;

pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim().to_ascii_lowercase();
    let text = text
        .strip_suffix('b')
        .filter(|t| !t.is_empty() && !t.ends_with(|c: char| c.is_ascii_digit()))
        .unwrap_or(&text);
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let n: u64 = digits.parse().ok()?;
    let factor: u64 = match unit {
        "" | "b" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(factor).filter(|b| *b > 0)
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Makes the program absolute (relative paths from `cwd`, bare names through `PATH`) and
/// checks that it can be run, so a typo is a config error at start, not a failed job later.
fn resolve_command(
    key: &str,
    mut command: Vec<String>,
    cwd: &Path,
    path_var: Option<&str>,
) -> Result<Vec<String>, ConfigError> {
    let Some(program) = command.first().filter(|p| !p.is_empty()) else {
        return Err(ConfigError::new(format!(
            "{key}: must name a program (an argv list)"
        )));
    };
    let resolved = if program.contains('/') {
        let candidate = cwd.join(program);
        if !is_executable(&candidate) {
            let relative = if Path::new(program).is_relative() {
                " (a relative path is taken from the working directory)"
            } else {
                ""
            };
            return Err(ConfigError::new(format!(
                "{key}: {} is not an executable file{relative}",
                candidate.display()
            )));
        }
        candidate
    } else {
        path_var
            .unwrap_or("/usr/local/bin:/usr/bin:/bin")
            .split(':')
            .filter(|dir| !dir.is_empty())
            .map(|dir| Path::new(dir).join(program))
            .find(|candidate| is_executable(candidate))
            .ok_or_else(|| ConfigError::new(format!("{key}: program {program:?} is not on PATH")))?
    };
    command[0] = resolved.to_string_lossy().into_owned();
    Ok(command)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn setup() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("config")).unwrap();
        let trainer = dir.path().join("config/demo-trainer.sh");
        std::fs::write(&trainer, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&trainer, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    fn load(dir: &Path, env: &[(&str, &str)], overrides: Overrides) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(&overrides, |k| env.get(k).cloned(), dir)
    }

    #[test]
    fn stages_parse_with_their_templates_and_limits() {
        let dir = setup();
        let text = r#"
[executor]
docker = "config/demo-trainer.sh"
[[executor.stages]]
name = "download"
command = ["config/demo-trainer.sh", "--task-id={job_id}"]
timeout = "1h"
[[executor.stages]]
name = "train"
kind = "docker"
image = "trainer-{job_id}"
command = ["--model", "{model}"]
memory_per_gpu = "64g"
cpus_per_gpu = 8
shm_size = { 4 = "16g", 1 = "8g" }
always = true
network = "none"
gpus = false
volumes = ["{data_dir}/cache:/cache:rw"]
env = { TRANSFORMERS_CACHE = "/cache/hf_cache" }
"#;
        std::fs::write(dir.path().join(DEFAULT_CONFIG_FILE), text).unwrap();
        let c = load(dir.path(), &[], Overrides::default()).unwrap();
        let stages = &c.executor.stages;
        assert_eq!(stages.len(), 2);
        assert_eq!(stages[0].timeout, Some(Duration::from_secs(3600)));
        let StageRun::Process { argv } = &stages[0].run else {
            panic!("download is a process")
        };
        assert!(Path::new(&format!("{:?}", argv[0]).trim_matches('"')).is_absolute());
        assert_eq!(format!("{:?}", argv[1]), "\"--task-id={job_id}\"");
        let StageRun::Docker(spec) = &stages[1].run else {
            panic!("train is a container")
        };
        assert_eq!(spec.memory_per_gpu, Some(64 << 30));
        assert_eq!(spec.cpus_per_gpu, Some(8.0));
        assert_eq!(format!("{:?}", spec.image), "\"trainer-{job_id}\"");
        assert_eq!(spec.shm_size, [(1, "8g".into()), (4, "16g".into())]);
        assert!(stages[1].always && !stages[0].always);
        assert!(!spec.gpus);
        assert_eq!(spec.env.len(), 1);
        assert!(c.executor.docker.as_ref().is_some_and(|p| p.is_absolute()));
        assert!(!c.executor.adopt_running);
    }

    #[test]
    fn sizes_read_like_docker_writes_them() {
        assert_eq!(parse_bytes("64g"), Some(64 << 30));
        assert_eq!(parse_bytes("512M"), Some(512 << 20));
        assert_eq!(parse_bytes("16gb"), Some(16 << 30));
        assert_eq!(parse_bytes("1024"), Some(1024));
        for bad in ["", "g", "0", "12q", "-1g", "1.5g"] {
            assert_eq!(parse_bytes(bad), None, "{bad}");
        }
    }

    #[test]
    fn defaults_without_a_file() {
        let dir = setup();
        let c = load(dir.path(), &[], Overrides::default()).unwrap();
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.listen, "127.0.0.1:8787".parse().unwrap());
        assert_eq!(c.api_token, None);
        assert_eq!(c.max_body_bytes, 1048576);
        assert_eq!(c.shutdown_grace, Duration::from_secs(20));
        assert_eq!((c.worker.max_concurrent, c.worker.max_attempts), (1, 3));
        assert_eq!(c.executor.timeout, Duration::from_secs(24 * 3600));
        assert_eq!(c.executor.kill_grace, Duration::from_secs(10));
        assert_eq!(
            c.executor.command,
            vec![Template::literal(
                &dir.path().join("config/demo-trainer.sh").to_string_lossy()
            )]
        );
    }

    #[test]
    fn without_a_trainer_the_error_says_what_to_set() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path(), &[], Overrides::default())
            .unwrap_err()
            .to_string();
        for text in [
            "executor.command",
            "config/demo-trainer.sh",
            "working directory",
            "--config",
            "TRAINING_WORKER_EXECUTOR_COMMAND",
        ] {
            assert!(err.contains(text), "{text:?} in {err}");
        }
    }

    #[test]
    fn an_empty_data_dir_is_an_error_in_every_layer() {
        let dir = setup();
        let flag = |text: &str| Overrides {
            data_dir: Some(text.into()),
            ..Overrides::default()
        };
        for (file, env, overrides, name) in [
            ("data_dir = \"\"", None, Overrides::default(), "data_dir"),
            ("data_dir = \"  \"", None, Overrides::default(), "data_dir"),
            (
                "",
                Some(""),
                Overrides::default(),
                "TRAINING_WORKER_DATA_DIR",
            ),
            (
                "",
                Some(" "),
                Overrides::default(),
                "TRAINING_WORKER_DATA_DIR",
            ),
            ("", None, flag(""), "--data-dir"),
            ("data_dir = \"ok\"", Some("ok"), flag(" "), "--data-dir"),
        ] {
            std::fs::write(dir.path().join(DEFAULT_CONFIG_FILE), file).unwrap();
            let env: Vec<(&str, &str)> = env
                .map(|v| ("TRAINING_WORKER_DATA_DIR", v))
                .into_iter()
                .collect();
            let err = load(dir.path(), &env, overrides).unwrap_err().to_string();
            assert!(err.starts_with(name) && err.contains("empty"), "{err}");
        }
    }

    #[test]
    fn errors_from_a_variable_name_the_variable() {
        let dir = setup();
        std::fs::write(
            dir.path().join(DEFAULT_CONFIG_FILE),
            "[worker]\nmax_concurrent = 2\n",
        )
        .unwrap();
        for (variable, value) in [
            ("TRAINING_WORKER_WORKER_MAX_CONCURRENT", "x"),
            ("TRAINING_WORKER_WORKER_MAX_ATTEMPTS", "0"),
            ("TRAINING_WORKER_WORKER_GPUS", "0,a"),
            ("TRAINING_WORKER_WORKER_BACKFILL", "maybe"),
            ("TRAINING_WORKER_WORKER_ORDER", "lifo"),
            ("TRAINING_WORKER_MAX_BODY_BYTES", "lots"),
            ("TRAINING_WORKER_SHUTDOWN_GRACE", "soon"),
            ("TRAINING_WORKER_LOG_FORMAT", "xml"),
            ("TRAINING_WORKER_STORE_SYNC", "never"),
            ("TRAINING_WORKER_LISTEN", "nowhere"),
            ("TRAINING_WORKER_EXECUTOR_TIMEOUT", "0s"),
            ("TRAINING_WORKER_EXECUTOR_KILL_GRACE", "1h"),
            ("TRAINING_WORKER_EXECUTOR_PASS_ENV", "A B"),
            ("TRAINING_WORKER_EXECUTOR_ADOPT_RUNNING", "yes"),
            ("TRAINING_WORKER_EXECUTOR_COMMAND", "./missing.sh"),
            ("TRAINING_WORKER_EXECUTOR_COMMAND", "[1]"),
            ("TRAINING_WORKER_OFFERS_MAX_HOURS", "many"),
            ("TRAINING_WORKER_OFFERS_JOB_TYPES", "ImageJob"),
            ("TRAINING_WORKER_OFFERS_RESERVE_FOR", "2h"),
        ] {
            let err = load(dir.path(), &[(variable, value)], Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("{variable}: "))
                    || err.starts_with(&format!("{variable} (")),
                "{variable}={value}: {err}"
            );
        }
    }

    #[test]
    fn the_command_variable_splits_words_as_a_shell_does() {
        let dir = setup();
        let trainer = dir.path().join("my trainer.sh");
        std::fs::copy(dir.path().join("config/demo-trainer.sh"), &trainer).unwrap();
        let env = [(
            "TRAINING_WORKER_EXECUTOR_COMMAND",
            "'./my trainer.sh' --flag \"a b\" --id={job_id}",
        )];
        let c = load(dir.path(), &env, Overrides::default()).unwrap();
        let argv: Vec<String> = c
            .executor
            .command
            .iter()
            .map(|t| format!("{t:?}"))
            .collect();
        assert_eq!(
            argv,
            vec![
                format!("{:?}", dir.path().join("./my trainer.sh").to_string_lossy()),
                "\"--flag\"".into(),
                "\"a b\"".into(),
                "\"--id={job_id}\"".into(),
            ]
        );
        let err = load(
            dir.path(),
            &[("TRAINING_WORKER_EXECUTOR_COMMAND", "'my trainer.sh --flag")],
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("TRAINING_WORKER_EXECUTOR_COMMAND: "),
            "{err}"
        );
    }

    #[test]
    fn the_single_command_takes_the_templates_of_stages() {
        let dir = setup();
        std::fs::write(
            dir.path().join(DEFAULT_CONFIG_FILE),
            "[executor]\ncommand = [\"config/demo-trainer.sh\", \"--task-id={job_id}\", \"--x\"]\n",
        )
        .unwrap();
        let c = load(dir.path(), &[], Overrides::default()).unwrap();
        let argv = &c.executor.command;
        assert!(argv[0].is_literal() && !argv[1].is_literal() && argv[2].is_literal());
        assert_eq!(format!("{:?}", argv[1]), "\"--task-id={job_id}\"");
        for (text, name) in [
            (
                "[executor]\ncommand = [\"config/demo-trainer.sh\", \"{jobid}\"]",
                "executor.command: ",
            ),
            (
                "[executor]\ncommand = [\"config/{stage}.sh\"]",
                "executor.command: ",
            ),
        ] {
            std::fs::write(dir.path().join(DEFAULT_CONFIG_FILE), text).unwrap();
            let err = load(dir.path(), &[], Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(name), "{text}: {err}");
        }
        std::fs::remove_file(dir.path().join(DEFAULT_CONFIG_FILE)).unwrap();
        let env = [(
            "TRAINING_WORKER_EXECUTOR_COMMAND",
            "config/demo-trainer.sh {model",
        )];
        let err = load(dir.path(), &env, Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("TRAINING_WORKER_EXECUTOR_COMMAND: ") && err.contains("unclosed"),
            "{err}"
        );
    }

    #[test]
    fn listen_takes_host_names_resolved_at_load() {
        let dir = setup();
        let listen = |text: &str| {
            load(
                dir.path(),
                &[],
                Overrides {
                    listen: Some(text.into()),
                    ..Overrides::default()
                },
            )
        };
        let c = listen("localhost:8787").unwrap();
        assert!(
            c.listen.ip().is_loopback() && c.listen.is_ipv4(),
            "{}",
            c.listen
        );
        assert_eq!(c.listen.port(), 8787);
        assert_eq!(
            listen("[::1]:9").unwrap().listen,
            "[::1]:9".parse().unwrap()
        );
        for bad in ["localhost", "no-such-host.invalid:8787", "localhost:port"] {
            let err = listen(bad).unwrap_err().to_string();
            assert!(err.starts_with("--listen: ") && err.contains(bad), "{err}");
        }
    }

    #[test]
    fn unknown_variables_are_those_with_the_prefix_that_nothing_reads() {
        let names = [
            "TRAINING_WORKER_WORKER_SLOTS",
            "TRAINING_WORKER_DATA_DIR",
            "TRAINING_WORKER_SERVER",
            "TRAINING_WORKER_API_TOKEN",
            "TRAINING_WORKER_LISTEN_ADDR",
            "PATH",
            "TRAINING_WORKERS",
        ];
        assert_eq!(
            unknown_variables(names.map(String::from)),
            vec![
                "TRAINING_WORKER_LISTEN_ADDR".to_string(),
                "TRAINING_WORKER_WORKER_SLOTS".into()
            ]
        );
    }

    #[test]
    fn layers_file_then_env_then_flags() {
        let dir = setup();
        std::fs::write(
            dir.path().join(DEFAULT_CONFIG_FILE),
            "data_dir = \"from-file\"\nlisten = \"127.0.0.1:1\"\napi_token = \"file\"\n[worker]\nmax_concurrent = 4\n[executor]\ntimeout = \"90s\"\npass_env = [\"HF_TOKEN\"]\n",
        )
        .unwrap();
        let c = load(dir.path(), &[], Overrides::default()).unwrap();
        assert_eq!(c.data_dir, dir.path().join("from-file"));
        assert_eq!(c.api_token.as_deref(), Some("file"));
        assert_eq!(c.worker.max_concurrent, 4);
        assert_eq!(c.executor.timeout, Duration::from_secs(90));
        assert_eq!(c.executor.pass_env, vec!["HF_TOKEN".to_string()]);

        let env = [
            ("TRAINING_WORKER_DATA_DIR", "from-env"),
            ("TRAINING_WORKER_LISTEN", "127.0.0.1:2"),
            ("TRAINING_WORKER_API_TOKEN", "env"),
            ("TRAINING_WORKER_WORKER_MAX_CONCURRENT", "0"),
        ];
        let c = load(dir.path(), &env, Overrides::default()).unwrap();
        assert_eq!(c.data_dir, dir.path().join("from-env"));
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.api_token.as_deref(), Some("env"));
        assert_eq!(c.worker.max_concurrent, 0);

        let flags = Overrides {
            data_dir: Some("from-flag".into()),
            listen: Some("127.0.0.1:3".into()),
            ..Overrides::default()
        };
        let c = load(dir.path(), &env, flags).unwrap();
        assert_eq!(c.data_dir, dir.path().join("from-flag"));
        assert_eq!(c.listen.port(), 3);

        let c = load(
            dir.path(),
            &[("TRAINING_WORKER_API_TOKEN", "")],
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.api_token, None,
            "an empty variable clears the file's token"
        );
    }

    #[test]
    fn bad_settings_name_the_key() {
        let dir = setup();
        let cases: &[(&str, &str)] = &[
            ("listen = \"nowhere\"", "listen"),
            ("shutdown_grace = \"soon\"", "shutdown_grace"),
            ("colour = \"blue\"", "colour"),
            ("[worker]\nmax_attempts = 0", "worker.max_attempts"),
            ("[worker]\nmax_concurrent = -1", "max_concurrent"),
            ("[executor]\ncommand = []", "executor.command"),
            (
                "[executor]\ncommand = [\"./missing.sh\"]",
                "executor.command",
            ),
            (
                "[executor]\ncommand = [\"no-such-program-xyz\"]",
                "executor.command",
            ),
            ("[executor]\npass_env = [\"A B\"]", "executor.pass_env"),
            ("max_body_bytes = 0", "max_body_bytes"),
            ("[worker]\ngpus = [0, 1, 0]", "worker.gpus"),
            ("[worker]\ngpus = [-1]", "gpus"),
            ("[worker]\nbackfill = \"yes\"", "backfill"),
            ("log_format = \"xml\"", "log_format"),
            ("[worker]\norder = \"lifo\"", "worker.order"),
            (
                "[worker]\nassumed_duration = \"0s\"",
                "worker.assumed_duration",
            ),
            (
                "[worker]\nassumed_duration = \"a while\"",
                "worker.assumed_duration",
            ),
            ("[offers]\njob_types = []", "offers.job_types"),
            ("[offers]\njob_types = [\"ImageJob\"]", "offers.job_types"),
            ("[offers]\nmodels = []", "offers.models"),
            ("[offers]\nmodels = [\"\"]", "offers.models"),
            ("[offers]\nmax_hours = 0", "offers.max_hours"),
            ("[offers]\nmax_hours = 9000", "offers.max_hours"),
            ("[offers]\nmax_wait = \"soon\"", "offers.max_wait"),
            ("[offers]\nreserve_for = \"2h\"", "offers.reserve_for"),
            ("[offers]\nquota = 3", "quota"),
            ("[store]\nsync = \"sometimes\"", "store.sync"),
            (
                "[api]\nheader_read_timeout = \"0s\"",
                "api.header_read_timeout",
            ),
            (
                "[api]\nheader_read_timeout = \"soon\"",
                "api.header_read_timeout",
            ),
            ("[api]\nmax_connections = 0", "api.max_connections"),
            ("[api]\nmax_conections = 10", "max_conections"),
            (
                "shutdown_grace = \"5s\"\n[executor]\nkill_grace = \"5s\"",
                "executor.kill_grace",
            ),
            ("[executor]\nadopt_running = \"yes\"", "adopt_running"),
            (
                "[[executor.stages]]\nname = \"a b\"\ncommand = [\"config/demo-trainer.sh\"]",
                "executor.stages[0].name",
            ),
            (
                "[[executor.stages]]\nname = \"a\"\ncommand = [\"config/demo-trainer.sh\", \"{jobid}\"]",
                "executor.stages[0].command",
            ),
            (
                "[[executor.stages]]\nname = \"a\"\ncommand = [\"config/demo-trainer.sh\"]\n[[executor.stages]]\nname = \"a\"\ncommand = [\"config/demo-trainer.sh\"]",
                "executor.stages[1].name",
            ),
            (
                "[[executor.stages]]\nname = \"a\"\nkind = \"vm\"",
                "executor.stages[0].kind",
            ),
            (
                "[executor]\ndocker = \"config/demo-trainer.sh\"\n[[executor.stages]]\nname = \"a\"\nkind = \"docker\"",
                "executor.stages[0].image",
            ),
            (
                "[executor]\ndocker = \"config/demo-trainer.sh\"\n[[executor.stages]]\nname = \"a\"\nkind = \"docker\"\nimage = \"i\"\nmemory_per_gpu = \"lots\"",
                "executor.stages[0].memory_per_gpu",
            ),
            (
                "[executor]\ndocker = \"config/demo-trainer.sh\"\n[[executor.stages]]\nname = \"a\"\nkind = \"docker\"\nimage = \"i\"\nenv = { \"A B\" = \"x\" }",
                "executor.stages[0].env",
            ),
            (
                "[[executor.stages]]\nname = \"a\"\ncommand = [\"config/demo-trainer.sh\"]\nimage = \"i\"",
                "executor.stages[0].image",
            ),
            (
                "[executor]\ndocker = \"config/demo-trainer.sh\"\n[[executor.stages]]\nname = \"a\"\nkind = \"docker\"\nimage = \"i-{nope}\"",
                "executor.stages[0].image",
            ),
            (
                "[executor]\ndocker = \"config/demo-trainer.sh\"\n[[executor.stages]]\nname = \"a\"\nkind = \"docker\"\nimage = \"i\"\nshm_size = { 0 = \"8g\" }",
                "executor.stages[0].shm_size",
            ),
            (
                "[executor]\ndocker = \"config/demo-trainer.sh\"\n[[executor.stages]]\nname = \"a\"\nkind = \"docker\"\nimage = \"i\"\nshm_size = { 1 = \"lots\" }",
                "executor.stages[0].shm_size",
            ),
            (
                "[executor]\ndocker = \"config/demo-trainer.sh\"\n[[executor.stages]]\nname = \"a\"\nkind = \"docker\"\nimage = \"i\"\nshm_size = {}",
                "executor.stages[0].shm_size",
            ),
            (
                "[executor]\ndocker = \"config/demo-trainer.sh\"\n[[executor.stages]]\nname = \"a\"\nkind = \"docker\"\nimage = \"i\"\nalways = true",
                "executor.stages[0].gpus",
            ),
            (
                "[[executor.stages]]\nname = \"a\"\ncommand = [\"config/demo-trainer.sh\"]\njob_types = [\"VideoJob\"]",
                "executor.stages[0].job_types",
            ),
            (
                "[[executor.stages]]\nname = \"a\"\ncommand = [\"config/demo-trainer.sh\"]\njob_types = []",
                "executor.stages[0].job_types",
            ),
            (
                "[[executor.stages]]\nname = \"a\"\ncommand = [\"config/demo-trainer.sh\"]\npass_env = [\"HF_TOKEN\"]",
                "executor.stages[0].pass_env",
            ),
            (
                "[executor]\ndocker = \"no-such-docker-xyz\"\n[[executor.stages]]\nname = \"a\"\nkind = \"docker\"\nimage = \"i\"",
                "executor.docker",
            ),
            (
                "[executor]\ncommand = [\"config/demo-trainer.sh\"]\n[[executor.stages]]\nname = \"a\"\ncommand = [\"config/demo-trainer.sh\"]",
                "executor.command",
            ),
        ];
        for (text, key) in cases {
            std::fs::write(dir.path().join(DEFAULT_CONFIG_FILE), text).unwrap();
            let err = load(dir.path(), &[], Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        let missing = Overrides {
            config_file: Some("nope.toml".into()),
            ..Overrides::default()
        };
        let err = load(dir.path(), &[], missing).unwrap_err().to_string();
        assert!(err.contains("nope.toml"), "{err}");
    }

    #[test]
    fn the_shipped_default_file_loads_and_matches_the_built_in_defaults() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR"));
        let c = load(shipped, &[], Overrides::default()).unwrap();
        let dir = setup();
        let builtin = load(dir.path(), &[], Overrides::default()).unwrap();
        assert_eq!(c.listen, builtin.listen);
        assert_eq!(c.data_dir, shipped.join("data"));
        assert_eq!(c.max_body_bytes, builtin.max_body_bytes);
        assert_eq!(c.shutdown_grace, builtin.shutdown_grace);
        assert_eq!(c.worker.max_concurrent, builtin.worker.max_concurrent);
        assert_eq!(c.worker.max_attempts, builtin.worker.max_attempts);
        assert_eq!(c.executor.timeout, builtin.executor.timeout);
        assert_eq!(c.executor.kill_grace, builtin.executor.kill_grace);
        assert_eq!(c.api_token, None);
        assert_eq!(c.worker, builtin.worker);
        assert_eq!(builtin.worker, WorkerConfig::default());
        assert_eq!(c.api, builtin.api);
        assert_eq!(builtin.api, ApiConfig::default());
    }

    #[test]
    fn api_limits_come_from_the_file_and_the_environment() {
        let dir = setup();
        std::fs::write(
            dir.path().join(DEFAULT_CONFIG_FILE),
            "[api]\nheader_read_timeout = \"3s\"\nmax_connections = 40\n",
        )
        .unwrap();
        let c = load(dir.path(), &[], Overrides::default()).unwrap();
        assert_eq!(c.api.header_read_timeout, Duration::from_secs(3));
        assert_eq!(c.api.max_connections, 40);
        let c = load(
            dir.path(),
            &[
                ("TRAINING_WORKER_API_HEADER_READ_TIMEOUT", "1m"),
                ("TRAINING_WORKER_API_MAX_CONNECTIONS", "7"),
            ],
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.api.header_read_timeout, Duration::from_secs(60));
        assert_eq!(c.api.max_connections, 7);
    }

    #[test]
    fn order_and_offers_come_from_the_file_and_the_environment() {
        let dir = setup();
        std::fs::write(
            dir.path().join(DEFAULT_CONFIG_FILE),
            "[worker]\norder = \"deadline\"\nassumed_duration = \"3h\"\n\
             [offers]\njob_types = [\"TextJob\"]\nmodels = [\"unsloth/*\", \"Qwen/*\"]\n\
             max_hours = 12.5\nmax_wait = \"20m\"\nreserve_for = \"0s\"\n",
        )
        .unwrap();
        let c = load(dir.path(), &[], Overrides::default()).unwrap();
        assert_eq!(c.worker.order, Order::Deadline);
        assert_eq!(c.worker.assumed_duration, Duration::from_secs(3 * 3600));
        let offers = &c.worker.offers;
        assert_eq!(offers.job_types, vec!["TextJob".to_string()]);
        assert_eq!(
            offers.models,
            vec!["unsloth/*".to_string(), "Qwen/*".into()]
        );
        assert_eq!(offers.max_hours, 12.5);
        assert_eq!(offers.max_wait, Duration::from_secs(20 * 60));
        assert_eq!(offers.reserve_for, Duration::ZERO);

        let env = [
            ("TRAINING_WORKER_WORKER_ORDER", "fifo"),
            ("TRAINING_WORKER_OFFERS_JOB_TYPES", "TextJob, DiffusionJob"),
            ("TRAINING_WORKER_OFFERS_MODELS", "*"),
            ("TRAINING_WORKER_OFFERS_MAX_HOURS", "2"),
            ("TRAINING_WORKER_OFFERS_RESERVE_FOR", "45s"),
        ];
        let c = load(dir.path(), &env, Overrides::default()).unwrap();
        assert_eq!(c.worker.order, Order::Fifo);
        let offers = &c.worker.offers;
        assert_eq!(offers.job_types.len(), 2);
        assert_eq!(offers.models, vec!["*".to_string()]);
        assert_eq!(offers.max_hours, 2.0);
        assert_eq!(
            offers.max_wait,
            Duration::from_secs(20 * 60),
            "from the file"
        );
        assert_eq!(offers.reserve_for, Duration::from_secs(45));
    }

    #[test]
    fn gpus_are_a_list_or_auto_and_nvidia_smi_is_found_when_it_runs() {
        let dir = setup();
        let file = dir.path().join(DEFAULT_CONFIG_FILE);
        std::fs::write(&file, "[worker]\ngpus = \"auto\"\n").unwrap();
        let c = load(dir.path(), &[], Overrides::default()).unwrap();
        assert!(c.worker.gpus_auto);
        assert!(c.worker.gpus.is_empty(), "filled at start, not at load");
        assert_eq!(c.worker.nvidia_smi, PathBuf::from("nvidia-smi"));

        std::fs::write(
            &file,
            "[worker]\ngpus = [3, 1]\nnvidia_smi = \"./bin/fake-smi\"\n",
        )
        .unwrap();
        let c = load(dir.path(), &[], Overrides::default()).unwrap();
        assert_eq!(
            (c.worker.gpus.clone(), c.worker.gpus_auto),
            (vec![3, 1], false)
        );
        assert_eq!(c.worker.nvidia_smi, dir.path().join("bin/fake-smi"));

        let env = [
            ("TRAINING_WORKER_WORKER_GPUS", " auto "),
            (
                "TRAINING_WORKER_WORKER_NVIDIA_SMI",
                "/opt/nvidia/nvidia-smi",
            ),
        ];
        let c = load(dir.path(), &env, Overrides::default()).unwrap();
        assert!(c.worker.gpus_auto && c.worker.gpus.is_empty());
        assert_eq!(c.worker.nvidia_smi, PathBuf::from("/opt/nvidia/nvidia-smi"));
        let env = [("TRAINING_WORKER_WORKER_GPUS", "0,2")];
        let c = load(dir.path(), &env, Overrides::default()).unwrap();
        assert_eq!((c.worker.gpus, c.worker.gpus_auto), (vec![0, 2], false));

        for (text, env, named) in [
            ("[worker]\ngpus = \"all\"\n", None, "worker.gpus"),
            ("[worker]\ngpus = true\n", None, "gpus"),
            (
                "",
                Some(("TRAINING_WORKER_WORKER_GPUS", "0,auto")),
                "TRAINING_WORKER_WORKER_GPUS",
            ),
            ("[worker]\nnvidia_smi = \" \"\n", None, "worker.nvidia_smi"),
        ] {
            std::fs::write(&file, text).unwrap();
            let env: Vec<(&str, &str)> = env.into_iter().collect();
            let err = load(dir.path(), &env, Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{text:?}: {err}");
        }
    }

    #[test]
    fn gpu_types_map_name_parts_to_the_three_types_the_client_accepts() {
        let dir = setup();
        let file = dir.path().join(DEFAULT_CONFIG_FILE);
        std::fs::write(
            &file,
            "[god_trainer]\ngpu_types = { \"H200\" = \"H100\", \"GH200\" = \"H100\" }\n",
        )
        .unwrap();
        let c = load(dir.path(), &[], Overrides::default()).unwrap();
        let want = GpuTypes::from([
            ("H200".into(), GodType::H100),
            ("GH200".into(), GodType::H100),
        ]);
        assert_eq!(c.god_trainer.gpu_types, want);
        let env = [("TRAINING_WORKER_GOD_TRAINER_GPU_TYPES", "L40S = A6000, ")];
        let c = load(dir.path(), &env, Overrides::default()).unwrap();
        assert_eq!(
            c.god_trainer.gpu_types,
            GpuTypes::from([("L40S".into(), GodType::A6000)])
        );
        for (text, env) in [
            ("[god_trainer]\ngpu_types = { \"H200\" = \"H200\" }\n", None),
            ("[god_trainer]\ngpu_types = { \"\" = \"H100\" }\n", None),
            ("", Some(("TRAINING_WORKER_GOD_TRAINER_GPU_TYPES", "H200"))),
        ] {
            std::fs::write(&file, text).unwrap();
            let env: Vec<(&str, &str)> = env.into_iter().collect();
            let err = load(dir.path(), &env, Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.to_ascii_lowercase().contains("gpu_types"),
                "{text:?}: {err}"
            );
        }
        assert!(unknown_variables(["TRAINING_WORKER_GOD_TRAINER_GPU_TYPES".into()]).is_empty());
        assert!(unknown_variables(["TRAINING_WORKER_WORKER_NVIDIA_SMI".into()]).is_empty());
    }

    #[test]
    fn cluster_settings_name_the_node_and_its_lease() {
        let dir = setup();
        let c = load(dir.path(), &[], Overrides::default()).unwrap();
        assert_eq!(c.cluster.lease, Duration::from_secs(15));
        assert!(!c.cluster.node_id.is_empty());
        assert!(
            c.cluster
                .node_id
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.')),
            "the host name made a valid id: {:?}",
            c.cluster.node_id
        );
        assert_eq!(c.cluster.address, "http://127.0.0.1:8787");
        assert!(!c.cluster.exclusive);

        let file = dir.path().join("config/default.toml");
        std::fs::write(
            &file,
            "[store]\nkind = \"postgres\"\nurl = \"postgres://db/q\"\n\
             [cluster]\nnode_id = \"gpu-box-1\"\nlease = \"30s\"\naddress = \"https://box1:8787\"\n",
        )
        .unwrap();
        let c = load(dir.path(), &[], Overrides::default()).unwrap();
        assert_eq!(c.cluster.node_id, "gpu-box-1");
        assert_eq!(c.cluster.lease, Duration::from_secs(30));
        assert_eq!(c.cluster.address, "https://box1:8787");
        let StoreKind::Postgres(pg) = &c.store.kind else {
            panic!("the database store");
        };
        assert_eq!(pg.cluster, c.cluster);
        let env = [
            ("TRAINING_WORKER_NODE_ID", "b2"),
            ("TRAINING_WORKER_CLUSTER_LEASE", "6s"),
        ];
        let c = load(dir.path(), &env, Overrides::default()).unwrap();
        assert_eq!(
            (c.cluster.node_id.as_str(), c.cluster.lease),
            ("b2", Duration::from_secs(6))
        );

        for (text, env, key) in [
            ("[cluster]\nnode_id = \"a b\"\n", None, "cluster.node_id"),
            ("[cluster]\nnode_id = \"\"\n", None, "cluster.node_id"),
            ("[cluster]\nlease = \"1s\"\n", None, "cluster.lease"),
            ("[cluster]\nlease = \"soon\"\n", None, "cluster.lease"),
            ("[cluster]\nleases = \"9s\"\n", None, "leases"),
            (
                "",
                Some(("TRAINING_WORKER_NODE_ID", "x/y")),
                "TRAINING_WORKER_NODE_ID",
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            let env: Vec<(&str, &str)> = env.into_iter().collect();
            let err = load(dir.path(), &env, Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
        assert!(
            unknown_variables([
                "TRAINING_WORKER_NODE_ID".into(),
                "TRAINING_WORKER_CLUSTER_LEASE".into(),
                "TRAINING_WORKER_CLUSTER_ADDRESS".into()
            ])
            .is_empty()
        );
    }
}
