//! The worker: the actor that owns every job's state and the queue order.
//!
//! Everything that changes a job goes through it: the HTTP layer sends [`Command`]s through a
//! cloneable [`WorkerHandle`], the executor sends [`Event`]s when trainers end. The actor is
//! the only writer of job state, and it acts on a change only once the store says it is
//! durable: a client hears 201 after the job file is on disk, a trainer starts after the
//! Running record is, a cancel is answered after the Cancelled record is.
//!
//! It never waits for the store inside its loop: a change is sent off, and its completion
//! comes back as one more thing the loop selects on. Meanwhile it keeps taking requests, so
//! many changes reach the store together and are written as one batch. A job with a change
//! in flight is "busy": commands about it wait until that change has landed, so each job's
//! changes reach the disk one at a time and in order.

mod clock;
mod cluster;
mod offers;
mod plan;
mod queue;
mod schedule;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::WorkerConfig;
use crate::executor::{Adoption, Event, Execution, Executor, Outcome, Reports, StageDone};
use crate::job::{Job, JobId, Status, Timestamp};
use crate::metrics::METRICS;
use crate::store::{
    Change, FIRST_QUEUED_RANK, NodeView, Placement, Remote, StoreError, StoreHandle, Write,
};
pub use clock::Clock;
pub use cluster::ClusterBoot;
use offers::Reservations;
pub use offers::{Offer, OfferAnswer};
pub use plan::Estimate;
use queue::Queue;
use schedule::Choice;

/// How long to wait before retrying a write the store refused (disk full, I/O error).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// After a trainer could not be started, the wait before the next try; it doubles with
/// every failed try, up to [`SPAWN_RETRY_MAX`].
const SPAWN_RETRY_FIRST: Duration = Duration::from_millis(500);
const SPAWN_RETRY_MAX: Duration = Duration::from_secs(30);

/// The capacity of the worker's inbox. Senders wait when it is full, which is how load
/// reaches the HTTP clients instead of memory.
const INBOX_CAPACITY: usize = 1024;

/// What a client may ask of the worker.
enum Command {
    Submit {
        job: Box<Job>,
        respond_to: oneshot::Sender<Result<Submitted, WorkerError>>,
    },
    Get {
        id: JobId,
        respond_to: oneshot::Sender<Option<Job>>,
    },
    List {
        status: Option<Status>,
        limit: Option<usize>,
        respond_to: oneshot::Sender<Vec<Job>>,
    },
    Queue {
        respond_to: oneshot::Sender<QueueView>,
    },
    Cancel {
        id: JobId,
        respond_to: oneshot::Sender<Result<Job, WorkerError>>,
    },
    Retry {
        id: JobId,
        respond_to: oneshot::Sender<Result<Job, WorkerError>>,
    },
    LogPath {
        id: JobId,
        respond_to: oneshot::Sender<Option<(PathBuf, Status)>>,
    },
    Ping {
        respond_to: oneshot::Sender<()>,
    },
    Gpus {
        respond_to: oneshot::Sender<Vec<GpuView>>,
    },
    /// From the executor, not a client: a stage has finished and must be recorded before
    /// the next one starts.
    StageDone(StageDone),
    /// From the worker itself: a graceful stop ended this job's trainer, or its trainer
    /// could not be started; write it back to the queue, the start not counted. A command,
    /// so that it waits for a write in flight (a stage's record) and is built from the job
    /// as that write left it.
    Interrupted {
        id: JobId,
        shutdown: bool,
    },
    /// From the executor: a stage of this running job printed this W&B address. The first
    /// of a run is kept in the job.
    Wandb {
        id: JobId,
        url: String,
    },
    Estimates {
        of: Option<JobId>,
        respond_to: oneshot::Sender<HashMap<JobId, Estimate>>,
    },
    Offer {
        offer: Box<Offer>,
        respond_to: oneshot::Sender<OfferAnswer>,
    },
    /// From the trainer API: start this job at once on exactly these GPUs, ahead of the
    /// queue, or refuse it and store nothing.
    StartNow {
        job: Box<Job>,
        gpus: Vec<u32>,
        /// The GitHub token its stages get, kept on disk only while it is unfinished.
        secret: Option<String>,
        respond_to: oneshot::Sender<Result<StartedNow, WorkerError>>,
    },
    /// A read of every job, run by the actor (see [`WorkerHandle::read_jobs`]).
    ReadJobs {
        read: JobsReader,
    },
    /// The jobs kept on their GPUs until docker answers, as they stand now.
    AwaitingSurvey {
        respond_to: oneshot::Sender<Vec<Job>>,
    },
    /// Docker answered: the containers to follow again; the other held jobs are requeued.
    Surveyed {
        adopted: HashMap<JobId, Adoption>,
        respond_to: oneshot::Sender<()>,
    },
    /// From the database store: a job's row as another node left it.
    Remote(Box<Remote>),
    /// From the database store: a running job whose owner's lease has lapsed.
    Takeover(Box<Remote>),
    /// The nodes sharing the queue (see [`WorkerHandle::nodes`]).
    Nodes {
        respond_to: oneshot::Sender<Result<Vec<NodeView>, WorkerError>>,
    },
}

impl Command {
    /// The job a command is about, when it changes one: such commands wait while the job
    /// has a change in flight.
    fn target(&self) -> Option<JobId> {
        match self {
            Command::Submit { job, .. } => Some(job.id),
            Command::Cancel { id, .. } => Some(*id),
            Command::Retry { id, .. } => Some(*id),
            Command::StageDone(done) => Some(done.job_id),
            Command::Interrupted { id, .. } => Some(*id),
            Command::Wandb { id, .. } => Some(*id),
            Command::StartNow { job, .. } => Some(job.id),
            Command::Remote(row) | Command::Takeover(row) => Some(row.job.id),
            _ => None,
        }
    }

    /// Whether the command only reads: answering it changes nothing the estimates depend on.
    fn reads_only(&self) -> bool {
        matches!(
            self,
            Command::Get { .. }
                | Command::List { .. }
                | Command::Queue { .. }
                | Command::Ping { .. }
                | Command::Estimates { .. }
                | Command::LogPath { .. }
                | Command::AwaitingSurvey { .. }
                | Command::Gpus { .. }
                | Command::ReadJobs { .. }
                | Command::Nodes { .. }
        )
    }
}

/// A read of every job that answers its caller itself; see [`WorkerHandle::read_jobs`].
type JobsReader = Box<dyn FnOnce(&mut dyn Iterator<Item = &Job>) + Send>;

/// The answer to a start of the trainer API.
#[derive(Debug, Clone)]
pub enum StartedNow {
    /// Durable as Running on the GPUs asked for now; its trainer starts.
    Started(Job),
    /// The same job was started before and has not finished: nothing changed.
    AlreadyStarted(Job),
}

/// The answer to a submission.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// Stored now.
    Created(Job),
    /// The same job was submitted before; this is it as it stands.
    Existing(Job),
}

/// Why the worker refused a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkerError {
    #[error("job {0} not found")]
    NotFound(JobId),
    #[error("job {id} already exists with different content")]
    Conflict { id: JobId },
    #[error("job {id} has already finished ({status})")]
    Finished { id: JobId, status: Status },
    #[error("job {id} is not finished ({status})")]
    NotFinished { id: JobId, status: Status },
    #[error("job {id} cannot be retried yet: its trainer is still stopping")]
    TrainerStopping { id: JobId },
    /// A start that must happen now cannot: its GPUs or the slots are taken.
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the worker is not running")]
    Stopped,
    #[error(transparent)]
    Invalid(crate::job::FieldError),
}

/// The queue as `queue.json` shows it, and why its queued jobs wait.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueView {
    pub running: Vec<JobId>,
    pub queued: Vec<JobId>,
    /// Why no job starts at all now, when that is so (trainers cannot be started, the
    /// storage refused a write, the daemon is stopping).
    pub paused: Option<String>,
    /// Why each queued job has not started, in queue order.
    pub waiting: Vec<(JobId, String)>,
}

/// One GPU of `[worker] gpus`: what it is, and the job that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuView {
    pub id: u32,
    /// What nvidia-smi said at start (`WorkerConfig::inventory`); `None`: unknown.
    pub gpu: Option<crate::gpu::Gpu>,
    /// The job whose trainer holds it: starting, running, or still stopping after its job
    /// ended. A GPU is free only once that trainer's exit is reported.
    pub job: Option<JobId>,
    /// Free, and held for an accepted offer (`POST /v1/offers`) whose job has not come yet:
    /// the lowest free GPUs, as many as the held offers take.
    pub reserved: bool,
}

/// What the worker's loop left undone when it ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stopped {
    /// Interrupted jobs that could not be written back as Queued: their records still say
    /// Running, so the next boot counts the cut start as an attempt.
    pub unwritten: usize,
}

/// Trainers cannot be started now (the program is missing, no descriptors are left): the
/// box's trouble, not a job's. Starts pause, then one job at a time tries again.
#[derive(Debug, Clone)]
struct SpawnTrouble {
    /// What the last failed start said.
    error: String,
    /// Failed starts in a row.
    failures: u32,
    /// When the next try may start.
    retry_at: Instant,
    /// The job whose start is the current try: no other starts until it has answered.
    probe: Option<JobId>,
}

/// The cloneable way to the worker. The actor runs until shutdown is requested and its
/// trainers have stopped; afterwards every call answers [`WorkerError::Stopped`].
#[derive(Clone, Debug)]
pub struct WorkerHandle {
    inbox: mpsc::Sender<Command>,
    /// The store's own word on whether it takes writes now, read without the actor.
    storage: watch::Receiver<Option<String>>,
    /// The change counter (see [`WorkerHandle::subscribe_changes`]); kept so the actor's
    /// sender always has a receiver.
    changes: watch::Receiver<u64>,
}

impl WorkerHandle {
    /// Why the storage refuses changes now (the database out of reach, reconnecting), or
    /// `None`; `/readyz` answers 503 meanwhile. Answered without a turn of the actor.
    pub fn storage_trouble(&self) -> Option<String> {
        self.storage.borrow().clone()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, WorkerError> {
        let (respond_to, answer) = oneshot::channel();
        self.inbox
            .send(make(respond_to))
            .await
            .map_err(|_| WorkerError::Stopped)?;
        answer.await.map_err(|_| WorkerError::Stopped)
    }

    /// Stores a new job; answers once it is durable.
    pub async fn submit(&self, job: Job) -> Result<Submitted, WorkerError> {
        self.ask(|respond_to| Command::Submit {
            job: Box::new(job),
            respond_to,
        })
        .await?
    }

    pub async fn job(&self, id: JobId) -> Result<Option<Job>, WorkerError> {
        self.ask(|respond_to| Command::Get { id, respond_to }).await
    }

    /// Jobs with `status` (all when `None`): queued ones in queue order, others newest first.
    pub async fn list(
        &self,
        status: Option<Status>,
        limit: Option<usize>,
    ) -> Result<Vec<Job>, WorkerError> {
        self.ask(|respond_to| Command::List {
            status,
            limit,
            respond_to,
        })
        .await
    }

    pub async fn queue(&self) -> Result<QueueView, WorkerError> {
        self.ask(|respond_to| Command::Queue { respond_to }).await
    }

    /// Cancels a job; answers once Cancelled is durable. A running trainer is then stopped.
    pub async fn cancel(&self, id: JobId) -> Result<Job, WorkerError> {
        self.ask(|respond_to| Command::Cancel { id, respond_to })
            .await?
    }

    /// Starts a finished job (Completed, Failed or Cancelled) over: Queued again at the end
    /// of the queue, like a new arrival; answers once that is durable.
    pub async fn retry(&self, id: JobId) -> Result<Job, WorkerError> {
        self.ask(|respond_to| Command::Retry { id, respond_to })
            .await?
    }

    /// Answers once the actor's loop has taken the request: proof that it is alive and not
    /// stuck (for a service manager's watchdog).
    pub async fn ping(&self) -> Result<(), WorkerError> {
        self.ask(|respond_to| Command::Ping { respond_to }).await
    }

    /// Every configured GPU, in configured order, with the job that holds it.
    pub async fn gpus(&self) -> Result<Vec<GpuView>, WorkerError> {
        self.ask(|respond_to| Command::Gpus { respond_to }).await
    }

    /// When the queued and running jobs (only `of`, when given) are expected to start and end.
    pub async fn estimates(
        &self,
        of: Option<JobId>,
    ) -> Result<HashMap<JobId, Estimate>, WorkerError> {
        self.ask(|respond_to| Command::Estimates { of, respond_to })
            .await
    }

    /// Answers an offer; an accepted one may reserve its job's place.
    pub async fn offer(&self, offer: Offer) -> Result<OfferAnswer, WorkerError> {
        self.ask(|respond_to| Command::Offer {
            offer: Box::new(offer),
            respond_to,
        })
        .await
    }

    /// The trainer log's path and the job's status, if the job exists.
    /// Starts `job` at once on exactly `gpus`, ahead of the queue; answers once it is
    /// durable as Running. Refused ([`WorkerError::Busy`], nothing stored) when a GPU is
    /// held by an unfinished job or not in the inventory, or every slot is taken. The same
    /// job unfinished answers as it stands; a finished one starts a fresh run.
    pub async fn start_now(
        &self,
        job: Job,
        gpus: Vec<u32>,
        secret: Option<String>,
    ) -> Result<StartedNow, WorkerError> {
        self.ask(|respond_to| Command::StartNow {
            job: Box::new(job),
            gpus,
            secret,
            respond_to,
        })
        .await?
    }

    /// The jobs that keep their GPUs until docker answers, as they stand now.
    pub async fn awaiting_survey(&self) -> Result<Vec<Job>, WorkerError> {
        self.ask(|respond_to| Command::AwaitingSurvey { respond_to })
            .await
    }

    /// Docker has answered: follows the adopted containers again and requeues the other
    /// jobs that were held for the survey.
    pub async fn surveyed(&self, adopted: HashMap<JobId, Adoption>) -> Result<(), WorkerError> {
        self.ask(|respond_to| Command::Surveyed {
            adopted,
            respond_to,
        })
        .await
    }

    /// Runs `read` over every job (in no order) inside the actor and answers what it returns:
    /// a count, a filtered page, a summary, without the copy of every job that
    /// [`WorkerHandle::list`] makes. The actor waits for it, so it must be a quick pass that
    /// copies only what it returns.
    pub async fn read_jobs<T: Send + 'static>(
        &self,
        read: impl FnOnce(&mut dyn Iterator<Item = &Job>) -> T + Send + 'static,
    ) -> Result<T, WorkerError> {
        let (respond_to, answer) = oneshot::channel();
        let read: JobsReader = Box::new(move |jobs| {
            let _ = respond_to.send(read(jobs));
        });
        self.inbox
            .send(Command::ReadJobs { read })
            .await
            .map_err(|_| WorkerError::Stopped)?;
        answer.await.map_err(|_| WorkerError::Stopped)
    }

    /// A counter the actor bumps after every change that has landed in the store and every
    /// trainer that exits: a watcher wakes, then asks for what it shows. A `watch`, so the
    /// actor's cost per change is one store and one wake-up however many watch it, and a
    /// slow watcher sees only the latest value, never a backlog.
    /// The nodes sharing the queue, sorted by id: every node of the database, or this
    /// daemon alone with the file store.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, WorkerError> {
        self.ask(|respond_to| Command::Nodes { respond_to }).await?
    }

    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    pub async fn log_path(&self, id: JobId) -> Result<Option<(PathBuf, Status)>, WorkerError> {
        self.ask(|respond_to| Command::LogPath { id, respond_to })
            .await
    }
}

/// What the worker needs from the boot.
pub struct Boot {
    /// Every job replay read.
    pub jobs: Vec<Job>,
    /// The unfinished ones in the order they run again.
    pub order: Vec<JobId>,
    /// Running jobs whose container still runs and is followed again instead of requeued.
    pub adopted: HashMap<JobId, Adoption>,
    /// Running jobs whose container may still run, but docker could not be asked: they stay
    /// Running on their GPUs until [`WorkerHandle::surveyed`] says what became of them.
    pub unsurveyed: Vec<JobId>,
    /// This daemon's name and address, as `GET /v1/nodes` shows it.
    pub node: (String, String),
    /// With the database store: this node among the others.
    pub cluster: Option<ClusterBoot>,
}

/// What boot did, for the summary line.
#[derive(Debug, Default, Clone, Copy)]
pub struct BootReport {
    pub loaded: usize,
    pub requeued: usize,
    pub interrupted: usize,
    pub failed_attempts: usize,
    pub adopted: usize,
    /// Jobs kept Running on their GPUs until docker answers.
    pub awaiting_survey: usize,
}

/// A change on its way to the store, and what to do once it lands.
enum Pending {
    Submit {
        job: Job,
        rank: u64,
        respond_to: oneshot::Sender<Result<Submitted, WorkerError>>,
    },
    Start {
        job: Job,
        rank: u64,
        /// Seconds since the job arrived or was last requeued, for the metrics.
        waited: f64,
        /// For a start of the trainer API: who waits for it to be durable.
        respond_to: Option<oneshot::Sender<Result<StartedNow, WorkerError>>>,
    },
    Finish {
        job: Job,
    },
    Cancel {
        job: Job,
        respond_to: oneshot::Sender<Result<Job, WorkerError>>,
    },
    /// A finished job queued again for a fresh run, at the end of the queue.
    Retry {
        job: Job,
        rank: u64,
        respond_to: oneshot::Sender<Result<Job, WorkerError>>,
    },
    Requeue {
        job: Job,
        rank: u64,
        /// Why: a graceful stop (true), or a trainer that could not be started or whose
        /// container is gone after docker answered again (false).
        shutdown: bool,
        /// Whether the cut start counts as an attempt (a crash cut it).
        counted: bool,
    },
    /// The run's W&B address, kept in the running job.
    Wandb {
        job: Job,
        rank: u64,
    },
    StageDone {
        job: Job,
        rank: u64,
        stage: String,
        /// Set when what is recorded is a budgeted stage's first start, not its end.
        started: Option<Timestamp>,
        ack: oneshot::Sender<()>,
    },
    /// A running job whose owner's lease lapsed, taken over: requeued first, or failed.
    Recover {
        job: Job,
        placement: Placement,
    },
}

impl Pending {
    fn job(&self) -> &Job {
        match self {
            Pending::Submit { job, .. }
            | Pending::Start { job, .. }
            | Pending::Finish { job }
            | Pending::Cancel { job, .. }
            | Pending::Retry { job, .. }
            | Pending::Requeue { job, .. }
            | Pending::Wandb { job, .. }
            | Pending::StageDone { job, .. }
            | Pending::Recover { job, .. } => job,
        }
    }

    fn job_id(&self) -> JobId {
        self.job().id
    }

    /// Where the change puts the job in `queue.json`.
    fn placement(&self) -> Placement {
        match self {
            Pending::Submit { rank, .. }
            | Pending::Retry { rank, .. }
            | Pending::Requeue { rank, .. } => Placement::Queued(*rank),
            Pending::Start { rank, .. }
            | Pending::StageDone { rank, .. }
            | Pending::Wandb { rank, .. } => Placement::Running(*rank),
            Pending::Finish { .. } | Pending::Cancel { .. } => Placement::Off,
            Pending::Recover { placement, .. } => *placement,
        }
    }
}

/// What a write does once it is durable, before it lands (see [`Worker::write_then`]).
type AfterWrite = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// What must succeed before a change is written (a secret kept on disk, say).
type Before = Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

type InFlight =
    Pin<Box<dyn std::future::Future<Output = (Pending, Result<(), StoreError>)> + Send>>;

/// A trainer the worker started, and why it was asked to stop, if it was.
struct Running {
    execution: Execution,
    stop_reason: Option<StopReason>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopReason {
    Cancel,
    Shutdown,
    /// The job is no longer this node's (another node changed it, or its lease was not
    /// renewed): nothing of the trainer's end is written.
    Lost,
}

/// The actor. Private: the rest of the program holds a [`WorkerHandle`].
pub struct Worker {
    config: WorkerConfig,
    store: StoreHandle,
    executor: Executor,
    inbox: mpsc::Receiver<Command>,
    events: mpsc::Receiver<Event>,
    stage_done: mpsc::Receiver<StageDone>,
    shutdown: CancellationToken,
    /// The durable state of every job.
    jobs: HashMap<JobId, Job>,
    queue: Queue,
    /// Trainers alive now; their number is what `max_concurrent` limits.
    running: HashMap<JobId, Running>,
    /// Jobs with a change in flight, and the commands waiting for it to land.
    busy: HashMap<JobId, VecDeque<Command>>,
    in_flight: FuturesUnordered<InFlight>,
    /// Starts whose Running record is in flight; they hold a slot already.
    starting: usize,
    /// GPUs held by each starting or running trainer, from the decision to start until the
    /// trainer has exited (a cancelled trainer holds them until it is really gone). Every
    /// such trainer has an entry, an empty one without GPU accounting, so the keys are the
    /// trainers that hold a slot, which estimates start from.
    gpus_in_use: HashMap<JobId, Vec<u32>>,
    /// Trainer outcomes the store refused to record; retried after [`RETRY_AFTER`].
    unrecorded: HashMap<JobId, Event>,
    /// Finished stages the store refused to record; their pipelines wait, and the records
    /// are retried after [`RETRY_AFTER`].
    unrecorded_stages: Vec<StageDone>,
    /// Pipelines whose finished stage is recorded but which wait for a cancel in flight
    /// before they may start the next stage.
    held_acks: HashMap<JobId, oneshot::Sender<()>>,
    /// Containers to follow again, taken by the loop when it starts.
    adopted: HashMap<JobId, Adoption>,
    /// When to try again after a refused start or finish.
    retry_at: Option<Instant>,
    /// The newest creation time handed out; see [`Worker::now_for_creation`].
    last_created: Option<Timestamp>,
    /// Where "now" comes from: the system, or Tokio's clock in tests with paused time.
    clock: Clock,
    /// Places held for the jobs of accepted offers.
    reservations: Reservations,
    /// The last estimates of every queued and running job, and when they were made; dropped
    /// by every change (see [`plan::ESTIMATES_REUSE`]).
    estimates_cache: Option<(Timestamp, HashMap<JobId, Estimate>)>,
    /// From the executor: a trainer started, so trainers can be started.
    started: mpsc::Receiver<JobId>,
    /// W&B addresses the stages printed.
    wandb: mpsc::Receiver<(JobId, String)>,
    /// Lines for the logs of the jobs a restart cut short, written before they run again.
    recovered: Vec<(JobId, String)>,
    /// Set while trainers cannot be started.
    spawn_trouble: Option<SpawnTrouble>,
    /// Jobs whose requeue the store refused, and whether their cut start counts; retried.
    unrequeued: Vec<(JobId, bool)>,
    /// Interrupted jobs a graceful stop could not write back.
    unwritten: usize,
    /// Running jobs held on their GPUs, without a trainer followed, until docker answers;
    /// each holds a slot.
    unsurveyed: std::collections::HashSet<JobId>,
    /// Bumped after each landed change and trainer exit; see
    /// [`WorkerHandle::subscribe_changes`].
    changes: watch::Sender<u64>,
    /// This daemon's name and address.
    node: (String, String),
    /// When this daemon started, for `GET /v1/nodes`.
    started_at: Timestamp,
    /// With the database store: this node among the others.
    cluster: Option<cluster::ClusterState>,
}

impl Worker {
    /// Builds the actor from what replay found, applies the recovery rules (interrupted
    /// jobs requeued first, jobs out of attempts failed), and makes that durable before it
    /// returns. The returned future is the actor's loop.
    pub async fn boot(
        config: WorkerConfig,
        store: StoreHandle,
        executor_for: impl FnOnce(Reports) -> Executor,
        boot: Boot,
        shutdown: CancellationToken,
    ) -> Result<(WorkerHandle, Worker, BootReport), StoreError> {
        let (inbox_tx, inbox) = mpsc::channel(INBOX_CAPACITY);
        let (events_tx, events) = mpsc::channel(INBOX_CAPACITY);
        let (stage_done_tx, stage_done) = mpsc::channel(INBOX_CAPACITY);
        let (started_tx, started) = mpsc::channel(INBOX_CAPACITY);
        let (wandb_tx, wandb) = mpsc::channel(INBOX_CAPACITY);
        let (changes_tx, changes_rx) = watch::channel(0);
        let now = chrono::Utc::now();
        let mut report = BootReport {
            loaded: boot.jobs.len(),
            ..BootReport::default()
        };
        let mut jobs: HashMap<JobId, Job> = boot.jobs.into_iter().map(|j| (j.id, j)).collect();
        let last_created = jobs.values().filter_map(|j| j.created_at).max();

        let mut queue = Queue::new(config.order);
        let mut changes = Vec::new();
        let mut adopted = boot.adopted;
        let mut unsurveyed = std::collections::HashSet::new();
        let mut gpus_in_use = HashMap::new();
        // What each job's log is told about the restart, before anything of it runs again.
        let mut recovered = Vec::new();
        let at = crate::job::format_timestamp(&now);
        for (i, id) in boot.order.into_iter().enumerate() {
            // The same rank the store gave this job when it placed the replay order, or
            // the one the nodes share.
            let rank = boot
                .cluster
                .as_ref()
                .and_then(|c| c.ranks.get(&id).copied())
                .unwrap_or(FIRST_QUEUED_RANK + i as u64);
            let Some(job) = jobs.get_mut(&id) else {
                continue;
            };
            if job.status == Status::Running && adopted.contains_key(&id) {
                // Its container still runs: the job keeps running, on its GPUs, without a
                // new start. Only its place in queue.json is written again.
                info!(job_id = %id, attempts = job.attempts, "job was running when the daemon stopped; its container still runs and is adopted");
                report.adopted += 1;
                let rank = queue.next_start_rank();
                queue.start(id, rank);
                // Every trainer has an entry, an empty one without GPU accounting: estimates
                // count running trainers from it.
                gpus_in_use.insert(id, job.gpu_ids.clone().unwrap_or_default());
                changes.push(Change {
                    job: job.clone(),
                    placement: Placement::Running(rank),
                });
                continue;
            }
            if job.status == Status::Running && boot.unsurveyed.contains(&id) {
                // Its container may still run: it keeps its place and GPUs, without a
                // trainer followed, until docker answers.
                warn!(job_id = %id, "job was running in a container and docker does not answer; it keeps its GPUs until docker does");
                report.awaiting_survey += 1;
                recovered.push((
                    id,
                    format!(
                        "==> attempt {} held at {at}: the daemon restarted while its container ran, and docker does not answer; its GPUs stay held until docker does",
                        job.attempts
                    ),
                ));
                let rank = queue.next_start_rank();
                queue.start(id, rank);
                gpus_in_use.insert(id, job.gpu_ids.clone().unwrap_or_default());
                unsurveyed.insert(id);
                changes.push(Change {
                    job: job.clone(),
                    placement: Placement::Running(rank),
                });
                continue;
            }
            adopted.remove(&id);
            if job.status == Status::Running {
                report.interrupted += 1;
                if job.attempts >= config.max_attempts {
                    let reason = format!(
                        "not started again: started {} times, the last start cut short by a crash (max_attempts = {})",
                        job.attempts, config.max_attempts
                    );
                    warn!(job_id = %id, attempts = job.attempts, "job out of attempts; marked failed");
                    job.finish(Status::Failed, Some(reason), now);
                    report.failed_attempts += 1;
                    changes.push(Change {
                        job: job.clone(),
                        placement: Placement::Off,
                    });
                    continue;
                }
                info!(job_id = %id, attempts = job.attempts, "job was running when the daemon stopped; requeued first");
                recovered.push((
                    id,
                    format!(
                        "==> attempt {} cut short: the daemon stopped while it ran; recovered at {at}, to run again first",
                        job.attempts
                    ),
                ));
                job.requeue_interrupted(true, now);
                queue.insert_queued(rank, id, plan::needs(&config, job));
                changes.push(Change {
                    job: job.clone(),
                    placement: Placement::Queued(rank),
                });
            } else {
                queue.insert_queued(rank, id, plan::needs(&config, job));
            }
            report.requeued += 1;
        }
        // The store placed every unfinished job by replay order with the same ranks, so only
        // the rewritten records need a write.
        let mut cluster = boot.cluster.map(cluster::ClusterState::new);
        let mut met = Vec::new();
        match cluster.as_mut() {
            None => {
                store.commit(changes).await?;
                store
                    .rerank(plan::deadline_ranks(&mut queue, &jobs, config.order))
                    .await?;
            }
            Some(cluster) => {
                // Each on its own: one another node took over meanwhile leaves the rest.
                let writes = changes.into_iter().map(|change| {
                    let id = change.job.id;
                    let base = cluster.versions.get(&id).copied().unwrap_or(0);
                    let store = store.clone();
                    async move {
                        let write = Write {
                            change,
                            base,
                            fence: crate::store::Fence::Recover,
                        };
                        (id, store.write(vec![write]).await)
                    }
                });
                for (id, result) in futures_util::future::join_all(writes).await {
                    match result {
                        Ok(()) => {
                            *cluster.versions.entry(id).or_insert(0) += 1;
                        }
                        Err(StoreError::Conflict { current }) => {
                            met.extend(current.map(|c| *c));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        for job in jobs.values() {
            METRICS.job_status_changed(None, job.status);
        }
        METRICS.recovered.inc_by(report.requeued as u64);
        METRICS.failed.inc_by(report.failed_attempts as u64);

        let mut worker = Worker {
            executor: executor_for(Reports {
                events: events_tx,
                stage_done: stage_done_tx,
                started: started_tx,
                wandb: wandb_tx,
            }),
            config,
            store,
            inbox,
            events,
            stage_done,
            shutdown,
            jobs,
            queue,
            running: HashMap::new(),
            busy: HashMap::new(),
            in_flight: FuturesUnordered::new(),
            starting: 0,
            gpus_in_use,
            unrecorded: HashMap::new(),
            unrecorded_stages: Vec::new(),
            held_acks: HashMap::new(),
            adopted,
            retry_at: None,
            last_created,
            clock: Clock::system(),
            reservations: Reservations::default(),
            estimates_cache: None,
            started,
            wandb,
            recovered,
            spawn_trouble: None,
            unrequeued: Vec::new(),
            unwritten: 0,
            unsurveyed,
            changes: changes_tx,
            node: boot.node,
            started_at: now,
            cluster,
        };
        // Rows another node changed while this boot wrote its own.
        for remote in met {
            worker.apply_remote(remote);
        }
        let handle = WorkerHandle {
            inbox: inbox_tx,
            storage: worker.store.trouble_watch(),
            changes: changes_rx,
        };
        Ok((handle, worker, report))
    }

    /// Takes the time from `clock` instead of the system: for tests with paused time.
    pub fn with_clock(mut self, clock: Clock) -> Worker {
        self.clock = clock;
        self
    }

    /// The actor's loop. Ends after shutdown was requested, every trainer has stopped and
    /// every change has landed, and says what it could not write.
    pub async fn run(mut self) -> Stopped {
        for (id, line) in std::mem::take(&mut self.recovered) {
            self.executor.log_line(id, line).await;
        }
        // Here, on a runtime thread of the actor's own, not in boot: the executor's children
        // are tied to the thread that spawns them.
        for (id, adoption) in std::mem::take(&mut self.adopted) {
            if let Some(job) = self.jobs.get(&id) {
                if let Some(cluster) = self.cluster.as_mut() {
                    cluster.claimed.insert(id, Instant::now());
                }
                let execution = self.executor.adopt(job, adoption);
                self.running.insert(
                    id,
                    Running {
                        execution,
                        stop_reason: None,
                    },
                );
            }
        }
        self.store.report(
            self.config.gpus.clone(),
            self.free_gpus(),
            self.running.len(),
        );
        self.start_ready_jobs();
        let mut stopping = false;
        loop {
            if stopping && self.running.is_empty() && self.in_flight.is_empty() {
                break;
            }
            let retry = self.retry_at;
            let wake = self.reservation_wakeup();
            let spawn_retry = self
                .spawn_trouble
                .as_ref()
                .filter(|t| t.probe.is_none())
                .map(|t| t.retry_at);
            // Whatever this turn takes may change the estimates, unless it only reads.
            let mut changed = true;
            tokio::select! {
                _ = self.shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    self.stop_all();
                }
                Some(command) = self.inbox.recv() => {
                    changed = !command.reads_only();
                    self.handle(command);
                }
                Some(event) = self.events.recv() => self.on_exit(event),
                Some(done) = self.stage_done.recv() => self.handle(Command::StageDone(done)),
                Some(id) = self.started.recv() => self.trainer_started(id),
                Some((id, url)) = self.wandb.recv() => self.handle(Command::Wandb { id, url }),
                Some((pending, result)) = self.in_flight.next() => self.landed(pending, result),
                Some(event) = cluster::next_event(&mut self.cluster) => self.on_cluster(event),
                _ = sleep_until(retry), if retry.is_some() => {
                    self.retry_at = None;
                    self.retry_unrecorded();
                }
                // An expired reservation lets its place go: the start below looks again.
                _ = sleep_until(wake), if !stopping && wake.is_some() => {}
                // Time for the next try at starting a trainer: the start below makes it.
                _ = sleep_until(spawn_retry), if !stopping && spawn_retry.is_some() => {}
            }
            if !stopping {
                changed |= self.start_ready_jobs();
            }
            if changed {
                self.estimates_cache = None;
                self.store.report(
                    self.config.gpus.clone(),
                    self.free_gpus(),
                    self.running.len(),
                );
            }
        }
        info!("worker stopped");
        Stopped {
            unwritten: self.unwritten,
        }
    }

    fn handle(&mut self, command: Command) {
        if let Some(waiting) = command.target().and_then(|id| self.busy.get_mut(&id)) {
            waiting.push_back(command);
            return;
        }
        match command {
            Command::Submit { job, respond_to } => self.submit(*job, respond_to),
            Command::Get { id, respond_to } => {
                let _ = respond_to.send(self.jobs.get(&id).cloned());
            }
            Command::List {
                status,
                limit,
                respond_to,
            } => {
                let _ = respond_to.send(self.list(status, limit));
            }
            Command::Queue { respond_to } => {
                let _ = respond_to.send(self.queue_view());
            }
            Command::Cancel { id, respond_to } => self.cancel(id, respond_to),
            Command::Retry { id, respond_to } => self.retry(id, respond_to),
            Command::Ping { respond_to } => {
                let _ = respond_to.send(());
            }
            Command::Gpus { respond_to } => {
                let _ = respond_to.send(self.gpu_views());
            }
            Command::Estimates { of, respond_to } => {
                let _ = respond_to.send(self.estimates(of));
            }
            Command::Offer { offer, respond_to } => {
                let _ = respond_to.send(self.answer_offer(*offer));
            }
            Command::LogPath { id, respond_to } => {
                let path = self
                    .jobs
                    .get(&id)
                    .map(|job| (self.executor.log_path(id), job.status));
                let _ = respond_to.send(path);
            }
            Command::StageDone(done) => self.record_stage(done),
            Command::StartNow {
                job,
                gpus,
                secret,
                respond_to,
            } => self.start_now(*job, gpus, secret, respond_to),
            Command::ReadJobs { read } => read(&mut self.jobs.values()),
            Command::AwaitingSurvey { respond_to } => {
                let jobs = self
                    .unsurveyed
                    .iter()
                    .filter_map(|id| self.jobs.get(id).cloned())
                    .collect();
                let _ = respond_to.send(jobs);
            }
            Command::Surveyed {
                adopted,
                respond_to,
            } => {
                self.surveyed(adopted);
                let _ = respond_to.send(());
            }
            Command::Wandb { id, url } => self.note_wandb(id, url),
            Command::Remote(row) => self.apply_remote(*row),
            Command::Takeover(row) => self.take_over(*row),
            Command::Nodes { respond_to } => {
                let store = self.store.clone();
                let local = NodeView {
                    id: self.node.0.clone(),
                    address: self.node.1.clone(),
                    live: true,
                    started_at: crate::job::format_timestamp(&self.started_at),
                    heartbeat_at: crate::job::format_timestamp(&self.clock.now()),
                    running: self
                        .queue
                        .running()
                        .iter()
                        .map(|id| id.to_string())
                        .collect(),
                    gpus: self.config.gpus.clone(),
                    free_gpus: self.free_gpus(),
                };
                tokio::spawn(async move {
                    let answer = match store.nodes().await {
                        Some(nodes) => nodes.map_err(WorkerError::Store),
                        None => Ok(vec![local]),
                    };
                    let _ = respond_to.send(answer);
                });
            }
            Command::Interrupted { id, shutdown } => {
                if let Some(job) = self.jobs.get(&id).filter(|j| j.status == Status::Running) {
                    let job = job.clone();
                    self.write_requeue(job, shutdown);
                }
            }
        }
    }

    /// A stage has finished: record it in the job file; its pipeline goes on once that has
    /// landed. A job that no longer runs (cancelled meanwhile) records nothing, and the
    /// dropped acknowledgement tells the pipeline not to go on.
    fn record_stage(&mut self, done: StageDone) {
        let id = done.job_id;
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let Some(rank) = self.queue.running_rank(id) else {
            return;
        };
        if job.status != Status::Running || !self.running.contains_key(&id) {
            return;
        }
        let mut job = job.clone();
        match done.started {
            // A budgeted stage's first start: kept once, so that restarts do not extend it.
            Some(at) => {
                if job.stage_started_at(&done.stage).is_none() {
                    job.stages_started.push((done.stage.clone(), at));
                }
            }
            None => {
                if !job.stages_done.contains(&done.stage) {
                    job.stages_done.push(done.stage.clone());
                }
            }
        }
        job.updated_at = Some(self.clock.now());
        self.write(Pending::StageDone {
            job,
            rank,
            stage: done.stage,
            started: done.started,
            ack: done.ack,
        });
    }

    /// Keeps the first W&B address of a running job's run, durably. Later ones (another
    /// stage's, a later attempt's) change nothing.
    fn note_wandb(&mut self, id: JobId, url: String) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let Some(rank) = self.queue.running_rank(id) else {
            return;
        };
        if job.status != Status::Running || job.wandb_url.is_some() {
            return;
        }
        let mut job = job.clone();
        info!(job_id = %id, url = %url, "a stage printed its W&B address");
        job.wandb_url = Some(url);
        job.updated_at = Some(self.clock.now());
        self.write(Pending::Wandb { job, rank });
    }

    fn submit(
        &mut self,
        mut job: Job,
        respond_to: oneshot::Sender<Result<Submitted, WorkerError>>,
    ) {
        let total = self.config.gpus.len();
        if let Some(count) = job.gpu_count
            && total > 0
            && count as usize > total
        {
            let _ = respond_to.send(Err(WorkerError::Invalid(crate::job::FieldError::new(
                "gpu_count",
                format!("asks for {count} GPUs, and this worker has {total}"),
            ))));
            return;
        }
        if let Some(existing) = self.jobs.get(&job.id) {
            let answer = if existing.same_request(&job) {
                Ok(Submitted::Existing(existing.clone()))
            } else {
                Err(WorkerError::Conflict { id: job.id })
            };
            let _ = respond_to.send(answer);
            return;
        }
        let rank = self.accept(&mut job);
        self.write(Pending::Submit {
            job,
            rank,
            respond_to,
        });
    }

    fn cancel(&mut self, id: JobId, respond_to: oneshot::Sender<Result<Job, WorkerError>>) {
        let Some(job) = self.jobs.get(&id) else {
            let _ = respond_to.send(Err(WorkerError::NotFound(id)));
            return;
        };
        if job.status.is_finished() {
            let _ = respond_to.send(Err(WorkerError::Finished {
                id,
                status: job.status,
            }));
            return;
        }
        let mut job = job.clone();
        job.finish(
            Status::Cancelled,
            Some("cancelled by request".into()),
            chrono::Utc::now(),
        );
        self.write(Pending::Cancel { job, respond_to });
    }

    /// A finished job starts over as a new arrival: a fresh `created_at` (so that replay by
    /// creation time also puts it last) and an arrival rank. Refused while its trainer is
    /// still stopping (a cancelled job within its kill grace), so that two trainers of one
    /// job never overlap. The line in its log is written once the record is durable and
    /// before the job can start, so it comes before the fresh run's first header.
    fn retry(&mut self, id: JobId, respond_to: oneshot::Sender<Result<Job, WorkerError>>) {
        let Some(job) = self.jobs.get(&id) else {
            let _ = respond_to.send(Err(WorkerError::NotFound(id)));
            return;
        };
        if !job.status.is_finished() {
            let _ = respond_to.send(Err(WorkerError::NotFinished {
                id,
                status: job.status,
            }));
            return;
        }
        if self.running.contains_key(&id) || self.gpus_in_use.contains_key(&id) {
            let _ = respond_to.send(Err(WorkerError::TrainerStopping { id }));
            return;
        }
        let mut job = job.clone();
        let previous = job.status;
        let now = self.now_for_creation();
        job.retry(now);
        let rank = self.queue.arrival_rank(job.deadline);
        let note = self.executor.log_line(
            id,
            format!(
                "==> retried at {}: a fresh run (the last run ended {})",
                crate::job::format_timestamp(&now),
                previous
            ),
        );
        self.write_then(
            Pending::Retry {
                job,
                rank,
                respond_to,
            },
            Some(Box::pin(note)),
        );
    }

    fn list(&self, status: Option<Status>, limit: Option<usize>) -> Vec<Job> {
        let limit = limit.unwrap_or(usize::MAX);
        if status == Some(Status::Queued) {
            return self
                .queue
                .queued()
                .into_iter()
                .filter_map(|id| self.jobs.get(&id).cloned())
                .take(limit)
                .collect();
        }
        let mut jobs: Vec<&Job> = self
            .jobs
            .values()
            .filter(|j| status.is_none_or(|s| j.status == s))
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse((j.created_at, j.id)));
        jobs.into_iter().take(limit).cloned().collect()
    }

    /// Sends the change to the store (the job's new record, placed where `pending` says)
    /// and marks the job busy until it lands.
    fn write(&mut self, pending: Pending) {
        self.write_then(pending, None);
    }

    /// [`Worker::write`], and once the change is durable, `then` before it counts as landed
    /// (so before anything acts on it), off the actor's loop.
    fn write_then(&mut self, pending: Pending, then: Option<AfterWrite>) {
        let change = Change {
            job: pending.job().clone(),
            placement: pending.placement(),
        };
        self.busy.entry(pending.job_id()).or_default();
        let store = self.store.clone();
        let write = self.cluster.as_ref().map(|cluster| Write {
            base: cluster.versions.get(&change.job.id).copied().unwrap_or(0),
            fence: Self::fence_of(&pending),
            change: change.clone(),
        });
        self.in_flight.push(Box::pin(async move {
            let result = match write {
                Some(write) => store.write(vec![write]).await,
                None => store.commit(vec![change]).await,
            };
            if let (Ok(()), Some(then)) = (&result, then) {
                then.await;
            }
            (pending, result)
        }));
    }

    /// Writes a running job back as Queued at its place at the head, for a graceful stop or
    /// a trainer that could not be started: the cut start is not counted.
    fn write_requeue(&mut self, mut job: Job, shutdown: bool) {
        job.requeue_interrupted(false, chrono::Utc::now());
        let rank = self.queue.requeue_rank(job.id);
        self.write(Pending::Requeue {
            job,
            rank,
            shutdown,
            counted: false,
        });
    }

    /// Tells the watchers of [`WorkerHandle::subscribe_changes`] that something changed.
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Replaces a job's record in memory with its durable one, keeping the status gauges.
    fn put(&mut self, job: Job) {
        let new = job.status;
        let old = self.jobs.insert(job.id, job).map(|j| j.status);
        if old != Some(new) {
            METRICS.job_status_changed(old, new);
        }
    }

    /// A change has landed (or failed): apply it, answer, and let waiting commands run.
    fn landed(&mut self, pending: Pending, result: Result<(), StoreError>) {
        self.changed();
        let id = pending.job_id();
        if let Some(cluster) = self.cluster.as_mut() {
            match &result {
                Ok(()) => {
                    *cluster.versions.entry(id).or_insert(0) += 1;
                    match pending.placement() {
                        Placement::Running(_) => {
                            cluster.elsewhere.remove(&id);
                            cluster.claimed.entry(id).or_insert_with(Instant::now);
                        }
                        _ => {
                            cluster.claimed.remove(&id);
                            cluster.elsewhere.remove(&id);
                        }
                    }
                }
                Err(StoreError::Conflict { .. }) => {
                    let Err(StoreError::Conflict { current }) = result else {
                        unreachable!("matched above");
                    };
                    // Commands that waited for this write wait for whatever the conflict's
                    // answer writes, or run now.
                    let waiting = self.busy.remove(&id);
                    self.conflicted(pending, current);
                    if let Some(waiting) = waiting {
                        match self.busy.get_mut(&id) {
                            Some(again) => again.extend(waiting),
                            None => {
                                for command in waiting {
                                    self.handle(command);
                                }
                            }
                        }
                    }
                    return;
                }
                Err(_) => {}
            }
        }
        match (pending, result) {
            (
                Pending::Submit {
                    job,
                    rank,
                    respond_to,
                },
                Ok(()),
            ) => {
                info!(job_id = %id, model = %job.model, "job queued");
                METRICS.enqueued.inc();
                self.settle_claim(id, true);
                self.queue
                    .insert_queued(rank, id, plan::needs(&self.config, &job));
                self.put(job.clone());
                let _ = respond_to.send(Ok(Submitted::Created(job)));
            }
            (Pending::Submit { respond_to, .. }, Err(e)) => {
                self.settle_claim(id, false);
                let _ = respond_to.send(Err(e.into()));
            }
            (
                Pending::Start {
                    job,
                    rank,
                    waited,
                    respond_to,
                },
                Ok(()),
            ) => {
                self.starting -= 1;
                self.queue.start(id, rank);
                if let Some(respond_to) = respond_to {
                    // Durable as Running on its GPUs: that is what the answer promises,
                    // also when a shutdown writes it back a moment later.
                    let _ = respond_to.send(Ok(StartedNow::Started(job.clone())));
                }
                if self.shutdown.is_cancelled() {
                    // Shutdown came while the start was being written: do not start a
                    // trainer only to stop it; the start does not count.
                    self.gpus_in_use.remove(&id);
                    self.put(job.clone());
                    // The job stays busy: commands waiting for it wait for this write too.
                    self.write_requeue(job, true);
                    return;
                }
                info!(job_id = %id, attempt = job.attempts, "job started");
                METRICS.started.inc();
                METRICS.queue_wait.observe(waited);
                let execution = self.executor.start(&job);
                self.put(job);
                self.running.insert(
                    id,
                    Running {
                        execution,
                        stop_reason: None,
                    },
                );
            }
            (Pending::Start { respond_to, .. }, Err(e)) => {
                self.starting -= 1;
                self.gpus_in_use.remove(&id);
                self.probe_answered(id);
                if let Some(respond_to) = respond_to {
                    // Nothing was stored: the job was never in the queue, and its secret
                    // must not stay either.
                    tokio::spawn(self.executor.forget_job(id));
                    let _ = respond_to.send(Err(e.into()));
                    if let Some(waiting) = self.busy.remove(&id) {
                        for command in waiting {
                            self.handle(command);
                        }
                    }
                    return;
                }
                warn!(job_id = %id, error = %e, "cannot record the start; the job stays queued");
                self.schedule_retry();
            }
            (Pending::Finish { job }, Ok(())) => {
                if let Some(tx) = self.unrecorded.remove(&id).and_then(|e| e.recorded) {
                    let _ = tx.send(());
                }
                match job.status {
                    Status::Completed => {
                        info!(job_id = %id, "job completed");
                        METRICS.completed.inc();
                    }
                    _ => {
                        warn!(job_id = %id, error = job.error_message.as_deref().unwrap_or(""), "job failed");
                        METRICS.failed.inc();
                    }
                }
                self.note_deadline(&job);
                self.queue.remove(id);
                // Its secret and its record's copy are kept only while it is unfinished.
                tokio::spawn(self.executor.forget_job(id));
                self.put(job);
            }
            (Pending::Finish { job }, Err(e)) => {
                warn!(job_id = %id, status = %job.status, error = %e, "cannot record how the job ended; will retry");
                self.schedule_retry();
            }
            (Pending::Cancel { job, respond_to }, Ok(())) => {
                info!(job_id = %id, "job cancelled");
                METRICS.cancelled.inc();
                tokio::spawn(self.executor.forget_job(id));
                self.queue.remove(id);
                self.put(job.clone());
                self.unrecorded.remove(&id);
                // A pipeline held between two stages is told not to go on.
                self.held_acks.remove(&id);
                if let Some(run) = self.running.get_mut(&id) {
                    run.stop_reason = Some(StopReason::Cancel);
                    run.execution.stop();
                }
                let _ = respond_to.send(Ok(job));
            }
            (Pending::Cancel { respond_to, .. }, Err(e)) => {
                if let Some(ack) = self.held_acks.remove(&id) {
                    let _ = ack.send(());
                }
                let _ = respond_to.send(Err(e.into()));
            }
            (
                Pending::Retry {
                    job,
                    rank,
                    respond_to,
                },
                Ok(()),
            ) => {
                info!(job_id = %id, "job retried: queued again for a fresh run");
                METRICS.retried.inc();
                self.queue
                    .insert_queued(rank, id, plan::needs(&self.config, &job));
                self.put(job.clone());
                let _ = respond_to.send(Ok(job));
            }
            (Pending::Retry { respond_to, .. }, Err(e)) => {
                let _ = respond_to.send(Err(e.into()));
            }
            (
                Pending::Requeue {
                    job,
                    rank,
                    shutdown,
                    ..
                },
                Ok(()),
            ) => {
                if shutdown {
                    info!(job_id = %id, "interrupted job written back to run first at the next boot");
                } else {
                    info!(job_id = %id, attempts = job.attempts, "job back in the queue at its place");
                }
                self.queue
                    .insert_queued(rank, id, plan::needs(&self.config, &job));
                self.put(job);
            }
            (
                Pending::StageDone {
                    job,
                    stage,
                    started,
                    ack,
                    ..
                },
                Ok(()),
            ) => {
                if started.is_some() {
                    info!(job_id = %id, stage = %stage, "stage's first start recorded");
                } else {
                    info!(job_id = %id, stage = %stage, "stage finished and recorded");
                }
                self.put(job);
                let cancel_waits = self.busy.get(&id).is_some_and(|waiting| {
                    waiting.iter().any(|c| matches!(c, Command::Cancel { .. }))
                });
                if cancel_waits {
                    // A cancel came while the stage was being recorded: the next stage must
                    // not start only to be stopped. The pipeline waits until the cancel has
                    // landed (then it is stopped) or failed (then it goes on).
                    self.held_acks.insert(id, ack);
                } else {
                    let _ = ack.send(());
                }
            }
            (
                Pending::StageDone {
                    stage,
                    started,
                    ack,
                    ..
                },
                Err(e),
            ) => {
                // The pipeline waits: starting the next stage before this one is recorded
                // could run it twice after a crash (and a budget not recorded could be
                // counted anew).
                warn!(job_id = %id, stage = %stage, error = %e, "cannot record the stage; will retry");
                self.unrecorded_stages.push(StageDone {
                    job_id: id,
                    stage,
                    started,
                    ack,
                });
                self.schedule_retry();
            }
            (Pending::Wandb { job, .. }, Ok(())) => self.put(job),
            (Pending::Recover { job, placement }, Ok(())) => {
                match placement {
                    Placement::Queued(rank) => {
                        METRICS.recovered.inc();
                        self.queue
                            .insert_queued(rank, id, plan::needs(&self.config, &job));
                    }
                    _ => {
                        METRICS.failed.inc();
                        self.queue.remove(id);
                        tokio::spawn(self.executor.forget_job(id));
                    }
                }
                self.put(job);
            }
            (Pending::Recover { .. }, Err(e)) => {
                // Another turn of the cluster task finds the lease lapsed again.
                warn!(job_id = %id, error = %e, "cannot take over the lapsed job now; will retry");
            }
            (Pending::Wandb { job, .. }, Err(e)) => {
                // Only an address shown with the task: not worth a retry loop.
                warn!(job_id = %id, url = job.wandb_url.as_deref().unwrap_or(""), error = %e, "cannot record the W&B address; it is not shown");
            }
            (Pending::Requeue { shutdown: true, .. }, Err(e)) => {
                // The record still says Running, which the next boot treats as a crash: the
                // daemon cannot promise a clean stop any more.
                error!(job_id = %id, error = %e, "cannot write the interrupted job back; the next boot will count this start");
                self.unwritten += 1;
            }
            (
                Pending::Requeue {
                    shutdown: false,
                    counted,
                    ..
                },
                Err(e),
            ) => {
                // Still Running on disk, with no trainer: retried like an outcome.
                warn!(job_id = %id, error = %e, "cannot put the job back in the queue; will retry");
                self.unrequeued.push((id, counted));
                self.schedule_retry();
            }
        }
        if let Some(waiting) = self.busy.remove(&id) {
            for command in waiting {
                self.handle(command);
            }
        }
    }

    /// Starts queued jobs while slots (and GPUs) are free, in queue order, and fails those
    /// that cannot run (out of time, too many GPUs) as the scan reaches them. Not while a
    /// refused write waits for its retry: the storage is in trouble, and starting would only
    /// hammer it.
    fn start_ready_jobs(&mut self) -> bool {
        let now = self.clock.now();
        let mut changed = self.expire_reservations(now);
        if self.retry_at.is_some() {
            return changed;
        }
        if self
            .spawn_trouble
            .as_ref()
            .is_some_and(|t| t.probe.is_some() || Instant::now() < t.retry_at)
        {
            return changed;
        }
        changed |= self.start_pinned();
        while self.running.len() + self.starting + self.unsurveyed.len()
            < self.config.max_concurrent
        {
            let (id, gpus) = match self.next_start(now) {
                Choice::Start { key, gpus } => (key, gpus),
                Choice::OutOfTime(id) => {
                    changed = true;
                    let reason = self.out_of_time_reason(id);
                    self.fail_queued(id, reason);
                    continue;
                }
                Choice::TooBig(id) => {
                    // Queued when more GPUs were configured: it can never start here.
                    changed = true;
                    let need = self.jobs.get(&id).map_or(0, |j| self.gpus_needed(j));
                    self.fail_queued(
                        id,
                        format!(
                            "asks for {need} GPUs, and only {} are configured (worker.gpus)",
                            self.config.gpus.len()
                        ),
                    );
                    continue;
                }
                Choice::Wait => return changed,
            };
            let Some(job) = self.jobs.get(&id) else {
                return changed;
            };
            changed = true;
            let job = job.clone();
            let waited = job
                .updated_at
                .map_or(0.0, |t| (now - t).as_seconds_f64().max(0.0));
            let accounted = !self.config.gpus.is_empty();
            self.write_start(job, gpus, accounted, waited, None);
            if let Some(trouble) = self.spawn_trouble.as_mut() {
                // One try at a time until a trainer starts again.
                trouble.probe = Some(id);
                break;
            }
        }
        changed
    }

    /// A trainer could not be started: the box's trouble, not the job's. Its job goes back
    /// to its place in the queue, the start not counted, and starts pause for a while
    /// that grows with every failed try. Logged once per episode.
    fn spawn_failed(&mut self, id: JobId, error: &str) {
        METRICS.spawn_failures.inc();
        let failures = self.spawn_trouble.as_ref().map_or(0, |t| t.failures) + 1;
        let wait = SPAWN_RETRY_FIRST
            .saturating_mul(1 << (failures - 1).min(16))
            .min(SPAWN_RETRY_MAX);
        if failures == 1 {
            warn!(job_id = %id, error = %error, "a trainer could not be started; its job stays queued, the start not counted, and starts are retried with backoff until one works");
        }
        self.spawn_trouble = Some(SpawnTrouble {
            error: error.to_string(),
            failures,
            retry_at: Instant::now() + wait,
            probe: None,
        });
        self.handle(Command::Interrupted {
            id,
            shutdown: false,
        });
    }

    /// A start of the trainer API: at once on exactly `gpus`, or refused with nothing
    /// stored. A job of that API never waits in the queue.
    fn start_now(
        &mut self,
        mut job: Job,
        gpus: Vec<u32>,
        secret: Option<String>,
        respond_to: oneshot::Sender<Result<StartedNow, WorkerError>>,
    ) {
        if self.shutdown.is_cancelled() {
            let _ = respond_to.send(Err(WorkerError::Stopped));
            return;
        }
        if let Some(existing) = self.jobs.get(&job.id) {
            if !existing.status.is_finished() {
                let answer = if existing.same_request(&job)
                    && existing.trainer_task == job.trainer_task
                    && existing.gpu_ids.as_deref() == Some(&gpus[..])
                {
                    Ok(StartedNow::AlreadyStarted(existing.clone()))
                } else {
                    Err(WorkerError::Conflict { id: job.id })
                };
                let _ = respond_to.send(answer);
                return;
            }
            if self.gpus_in_use.contains_key(&job.id) {
                let _ = respond_to.send(Err(WorkerError::TrainerStopping { id: job.id }));
                return;
            }
        }
        if let Err(why) = self.can_start_on(&gpus) {
            let _ = respond_to.send(Err(WorkerError::Busy(why)));
            return;
        }
        let now = self.clock.now();
        // No whole-job deadline: `hours_to_complete` bounds only the budgeted stages, so
        // that no such job fails while it uploads.
        job.deadline = None;
        job.created_at = Some(self.now_for_creation());
        job.updated_at = Some(now);
        // A finished job starts over here: its log keeps the earlier runs, and the new
        // run's header (`==> attempt 1 started at …`) begins it.
        info!(job_id = %job.id, gpus = ?gpus, "start of the trainer API on the GPUs it names");
        // Its secret is durable before its Running record: a restart can still clone.
        let before =
            secret.map(|token| Box::pin(self.executor.keep_secret(job.id, token)) as Before);
        self.write_start_after(job, gpus, true, 0.0, Some(respond_to), before);
    }

    /// Writes `job` as Running on `gpus` (recorded in the job when `accounted`): they are
    /// held, and a slot taken, from now until the trainer has exited or the write failed.
    fn write_start(
        &mut self,
        job: Job,
        gpus: Vec<u32>,
        accounted: bool,
        waited: f64,
        respond_to: Option<oneshot::Sender<Result<StartedNow, WorkerError>>>,
    ) {
        self.write_start_after(job, gpus, accounted, waited, respond_to, None);
    }

    /// [`Worker::write_start`], the record written only once `before` has succeeded.
    fn write_start_after(
        &mut self,
        mut job: Job,
        gpus: Vec<u32>,
        accounted: bool,
        waited: f64,
        respond_to: Option<oneshot::Sender<Result<StartedNow, WorkerError>>>,
        before: Option<Before>,
    ) {
        job.start(self.clock.now(), accounted.then(|| gpus.clone()));
        // Held by every trainer, with or without GPU accounting, so that estimates know
        // which slots are taken.
        self.gpus_in_use.insert(job.id, gpus);
        let rank = self.queue.next_start_rank();
        self.starting += 1;
        let pending = Pending::Start {
            job,
            rank,
            waited,
            respond_to,
        };
        match before {
            None => self.write(pending),
            Some(before) => self.write_guarded(pending, before),
        }
    }

    /// Like [`Worker::write`], after `before`; when that fails, nothing is written and the
    /// change lands as refused by the storage.
    fn write_guarded(&mut self, pending: Pending, before: Before) {
        let change = Change {
            job: pending.job().clone(),
            placement: pending.placement(),
        };
        self.busy.entry(pending.job_id()).or_default();
        let store = self.store.clone();
        self.in_flight.push(Box::pin(async move {
            let result = match before.await {
                Ok(()) => store.commit(vec![change]).await,
                Err(e) => Err(StoreError::Unavailable(e)),
            };
            (pending, result)
        }));
    }

    /// Whether a trainer may start now on exactly `gpus`: each in the inventory and held by
    /// no unfinished job (nor one still stopping), and a slot free.
    fn can_start_on(&self, gpus: &[u32]) -> Result<(), String> {
        let unknown: Vec<String> = gpus
            .iter()
            .filter(|g| !self.config.gpus.contains(g))
            .map(u32::to_string)
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "GPU {} is not in this box's inventory",
                unknown.join(", ")
            ));
        }
        let mut held: Vec<String> = Vec::new();
        for gpu in gpus {
            if let Some((holder, _)) = self.gpus_in_use.iter().find(|(_, ids)| ids.contains(gpu)) {
                held.push(format!("GPU {gpu} is held by job {holder}"));
            }
        }
        let reserved_now = self.reserved_gpus(self.clock.now());
        let reserved: Vec<String> = gpus
            .iter()
            .filter(|g| reserved_now.contains(g))
            .map(|g| format!("GPU {g} is held for an accepted offer"))
            .collect();
        held.extend(reserved);
        if !held.is_empty() {
            return Err(held.join("; "));
        }
        if self.running.len() + self.starting + self.unsurveyed.len() >= self.config.max_concurrent
        {
            return Err(format!(
                "all {} slots are taken (worker.max_concurrent)",
                self.config.max_concurrent
            ));
        }
        Ok(())
    }

    /// Queued jobs of the trainer API (written back by a graceful stop or requeued after a
    /// crash) start again on the GPUs they ran on, first, and never on others.
    fn start_pinned(&mut self) -> bool {
        let pinned: Vec<(JobId, Vec<u32>)> = self
            .queue
            .queued()
            .into_iter()
            .filter(|id| !self.busy.contains_key(id))
            .filter_map(|id| {
                let job = self.jobs.get(&id)?;
                job.trainer_task.as_ref()?;
                Some((id, job.gpu_ids.clone().unwrap_or_default()))
            })
            .collect();
        let mut changed = false;
        for (id, gpus) in pinned {
            if self.can_start_on(&gpus).is_err() {
                continue;
            }
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            let job = job.clone();
            self.write_start(job, gpus, true, 0.0, None);
            changed = true;
        }
        changed
    }

    /// Docker answered for the held jobs: an adopted container is followed again (and
    /// stopped at once if its job was cancelled meanwhile); a job without one gives its
    /// GPUs back and is requeued first as an interrupted start, or fails out of attempts,
    /// as at boot.
    fn surveyed(&mut self, mut adopted: HashMap<JobId, Adoption>) {
        for id in std::mem::take(&mut self.unsurveyed) {
            let Some(job) = self.jobs.get(&id) else {
                self.gpus_in_use.remove(&id);
                continue;
            };
            if let Some(adoption) = adopted.remove(&id) {
                info!(job_id = %id, container = %adoption.container, "docker answers; the job's container still runs and is adopted");
                let execution = self.executor.adopt(job, adoption);
                let cancelled = job.status != Status::Running;
                if cancelled {
                    execution.stop();
                }
                self.running.insert(
                    id,
                    Running {
                        execution,
                        stop_reason: cancelled.then_some(StopReason::Cancel),
                    },
                );
                continue;
            }
            // No container of it runs any more: its GPUs are free.
            self.gpus_in_use.remove(&id);
            if job.status == Status::Running {
                info!(job_id = %id, attempts = job.attempts, "docker answers; the job's container is gone, so it is requeued first");
                self.requeue_counted(id);
            }
        }
    }

    /// Requeues a Running job without a trainer first, its cut start counted (a crash cut
    /// it), or fails it when it is out of attempts, as boot does.
    fn requeue_counted(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id).filter(|j| j.status == Status::Running) else {
            return;
        };
        {
            let mut job = job.clone();
            if job.attempts >= self.config.max_attempts {
                let reason = format!(
                    "not started again: started {} times, the last start cut short by a crash (max_attempts = {})",
                    job.attempts, self.config.max_attempts
                );
                warn!(job_id = %id, attempts = job.attempts, "job out of attempts; marked failed");
                job.finish(Status::Failed, Some(reason), self.clock.now());
                self.write(Pending::Finish { job });
                return;
            }
            job.requeue_interrupted(true, chrono::Utc::now());
            let rank = self.queue.requeue_rank(id);
            self.write(Pending::Requeue {
                job,
                rank,
                shutdown: false,
                counted: true,
            });
        }
    }

    /// A trainer is running: trainers can be started, so starts go on as usual.
    fn trainer_started(&mut self, id: JobId) {
        if let Some(trouble) = self.spawn_trouble.take() {
            info!(job_id = %id, failed_tries = trouble.failures, "a trainer started again; starts resume");
        }
    }

    /// The try at a start is over without a running trainer (its record failed, or it was
    /// stopped first): the next try may go.
    fn probe_answered(&mut self, id: JobId) {
        if let Some(trouble) = self.spawn_trouble.as_mut()
            && trouble.probe == Some(id)
        {
            trouble.probe = None;
        }
    }

    /// The queue, and why each queued job waits.
    fn queue_view(&mut self) -> QueueView {
        let queued = self.queue.queued();
        let paused = if let Some(trouble) = &self.spawn_trouble {
            let next = trouble.retry_at.saturating_duration_since(Instant::now());
            Some(format!(
                "trainers cannot be started ({}); {} failed tries, the next {}",
                trouble.error,
                trouble.failures,
                match trouble.probe {
                    Some(id) => format!("is under way with job {id}"),
                    None => format!(
                        "in {}",
                        humantime::format_duration(Duration::from_secs(next.as_secs().max(1)))
                    ),
                }
            ))
        } else if self.config.max_concurrent == 0 {
            Some("starts are paused (worker.max_concurrent = 0)".to_string())
        } else if self.retry_at.is_some() {
            Some("the storage refused a write; starts resume once it is retried".to_string())
        } else if self.shutdown.is_cancelled() {
            Some("the daemon is stopping".to_string())
        } else {
            None
        };
        let waiting = if paused.is_some() || queued.is_empty() {
            queued
                .iter()
                .map(|id| (*id, paused.clone().unwrap_or_default()))
                .collect()
        } else {
            self.wait_reasons(&queued)
        };
        QueueView {
            running: self.queue.running(),
            queued,
            paused,
            waiting,
        }
    }

    /// Why each of `queued` (in queue order) has not started, from the worker's state.
    fn wait_reasons(&mut self, queued: &[JobId]) -> Vec<(JobId, String)> {
        let now = self.clock.now();
        let estimates = self.estimates(None);
        let slots_full = self.running.len() + self.starting + self.unsurveyed.len()
            >= self.config.max_concurrent;
        let stopping: Vec<JobId> = self
            .running
            .iter()
            .filter(|(_, r)| r.stop_reason == Some(StopReason::Cancel))
            .map(|(id, _)| *id)
            .collect();
        let free = self.free_gpus().len();
        let reserved = self.reservations.held(now).count();
        let mut ahead: Option<JobId> = None;
        let mut reasons = Vec::with_capacity(queued.len());
        for id in queued {
            let Some(job) = self.jobs.get(id) else {
                continue;
            };
            let estimate = estimates.get(id).and_then(|e| e.start);
            let reason = match (job.deadline, estimate) {
                (Some(deadline), Some(start)) if start > deadline => format!(
                    "its deadline ({}) cannot be met: its turn comes at about {}",
                    crate::job::format_timestamp(&deadline),
                    crate::job::format_timestamp(&start)
                ),
                (Some(deadline), None) if deadline <= now => {
                    "its deadline has passed; it fails instead of starting".to_string()
                }
                _ if slots_full && !stopping.is_empty() => format!(
                    "a slot is held by cancelled job {} until its trainer has stopped",
                    stopping[0]
                ),
                _ if slots_full && self.config.max_concurrent == 1 => {
                    "the one slot is busy (worker.max_concurrent = 1)".to_string()
                }
                _ if slots_full => format!(
                    "all {n} slots are busy (worker.max_concurrent = {n})",
                    n = self.config.max_concurrent
                ),
                _ if self.gpus_needed(job) > free => {
                    format!("needs {} GPUs and {free} are free", self.gpus_needed(job))
                }
                _ if reserved > 0 => format!("{reserved} place(s) are held for accepted offers"),
                _ => match ahead {
                    Some(before) => format!("waits behind job {before}"),
                    None => "about to start".to_string(),
                },
            };
            ahead.get_or_insert(*id);
            reasons.push((*id, reason));
        }
        reasons
    }

    /// GPUs a job takes: none without GPU accounting, else what it asks for (one by default).
    fn gpus_needed(&self, job: &Job) -> usize {
        self.gpus_for(job.gpu_count)
    }

    /// The configured GPUs that no starting or running trainer holds, in configured order.
    fn free_gpus(&self) -> Vec<u32> {
        self.config
            .gpus
            .iter()
            .copied()
            .filter(|gpu| !self.gpus_in_use.values().any(|ids| ids.contains(gpu)))
            .collect()
    }

    /// The free GPUs the offers held at `now` will take: the lowest free ones, as many as
    /// they ask for. A start of the trainer API cannot have them.
    fn reserved_gpus(&self, now: Timestamp) -> Vec<u32> {
        let wanted: usize = self.reservations.held(now).map(|r| r.gpus).sum();
        self.free_gpus().into_iter().take(wanted).collect()
    }

    fn gpu_views(&self) -> Vec<GpuView> {
        let reserved = self.reserved_gpus(self.clock.now());
        self.config
            .gpus
            .iter()
            .map(|&id| GpuView {
                id,
                reserved: reserved.contains(&id),
                gpu: self.config.inventory.iter().find(|g| g.id == id).cloned(),
                job: self
                    .gpus_in_use
                    .iter()
                    .find(|(_, ids)| ids.contains(&id))
                    .map(|(job, _)| *job),
            })
            .collect()
    }

    /// Fails a queued job that cannot run, durably.
    fn fail_queued(&mut self, id: JobId, reason: String) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        warn!(job_id = %id, reason = %reason, "job cannot run; marked failed");
        let mut job = job.clone();
        job.finish(Status::Failed, Some(reason), self.clock.now());
        self.write(Pending::Finish { job });
    }

    /// A trainer has ended: record how, unless the job's fate was already decided.
    fn on_exit(&mut self, event: Event) {
        // Its GPUs and slot are free from now on.
        self.changed();
        let id = event.job_id;
        self.probe_answered(id);
        let stop_reason = self.running.remove(&id).and_then(|r| r.stop_reason);
        // The trainer is gone: its GPUs are free, whatever happens to the record.
        self.gpus_in_use.remove(&id);
        let Some(job) = self.jobs.get(&id) else {
            error!(job_id = %id, "a trainer ended for a job the worker does not know");
            return;
        };
        if let Some(started) = job.started_at {
            let ran = (chrono::Utc::now() - started).as_seconds_f64();
            METRICS.run_time.observe(ran.max(0.0));
        }
        if job.status != Status::Running {
            // Cancelled while running: the record was final before the trainer stopped.
            return;
        }
        if stop_reason == Some(StopReason::Lost) {
            // Another node's now, or about to be: nothing of this run is written.
            info!(job_id = %id, "the trainer of a job this node lost has stopped");
            return;
        }
        if event.outcome == Outcome::LeaseExpired {
            // The supervisor stopped it: this node could not renew its lease in time. The
            // start counts, as a crash's would.
            warn!(job_id = %id, "the trainer was stopped because this node could not renew its lease; requeued first");
            self.requeue_counted(id);
            return;
        }
        if stop_reason == Some(StopReason::Shutdown) && event.outcome == Outcome::Stopped {
            self.handle(Command::Interrupted { id, shutdown: true });
            return;
        }
        if let Outcome::SpawnFailed(error) = &event.outcome {
            let error = error.clone();
            self.spawn_failed(id, &error);
            return;
        }
        self.record_outcome(event);
    }

    fn record_outcome(&mut self, event: Event) {
        let id = event.job_id;
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if self.busy.contains_key(&id) {
            // A cancel is in flight; it decides. Keep the outcome in case it fails.
            self.unrecorded.insert(id, event);
            self.schedule_retry();
            return;
        }
        let mut job = job.clone();
        let message = event.error_message();
        let status = if message.is_none() {
            Status::Completed
        } else {
            Status::Failed
        };
        if status == Status::Completed
            && let Some(stage) = &event.stage
            && !job.stages_done.contains(stage)
        {
            // The last stage is recorded with the end, not before it like the others.
            job.stages_done.push(stage.clone());
        }
        job.finish(status, message, self.clock.now());
        self.write(Pending::Finish { job });
        // Kept until the finish lands, so a failed write can be retried.
        self.unrecorded.insert(id, event);
    }

    fn retry_unrecorded(&mut self) {
        for done in std::mem::take(&mut self.unrecorded_stages) {
            self.handle(Command::StageDone(done));
        }
        for (id, counted) in std::mem::take(&mut self.unrequeued) {
            if counted {
                self.requeue_counted(id);
            } else {
                self.handle(Command::Interrupted {
                    id,
                    shutdown: false,
                });
            }
        }
        let ids: Vec<JobId> = self.unrecorded.keys().copied().collect();
        for id in ids {
            let still_running = self
                .jobs
                .get(&id)
                .is_some_and(|j| j.status == Status::Running);
            if !still_running {
                self.unrecorded.remove(&id);
                continue;
            }
            if self.busy.contains_key(&id) {
                self.schedule_retry();
                continue;
            }
            if let Some(event) = self.unrecorded.remove(&id) {
                self.record_outcome(event);
            }
        }
    }

    fn schedule_retry(&mut self) {
        if self.retry_at.is_none() {
            self.retry_at = Some(Instant::now() + RETRY_AFTER);
        }
    }

    /// Shutdown: stop every trainer; their jobs are written back as they end.
    fn stop_all(&mut self) {
        self.executor.stop_cleanups();
        if !self.running.is_empty() {
            info!(
                trainers = self.running.len(),
                "stopping trainers for shutdown"
            );
        }
        for run in self.running.values_mut() {
            run.stop_reason.get_or_insert(StopReason::Shutdown);
            run.execution.stop();
        }
    }

    /// A creation time later than every one handed out before, so that creation order is
    /// queue order even when the clock stands still or steps back.
    fn now_for_creation(&mut self) -> Timestamp {
        let mut now = self.clock.now();
        if let Some(last) = self.last_created {
            let next = last + chrono::Duration::microseconds(1);
            if now < next {
                now = next;
            }
        }
        self.last_created = Some(now);
        now
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
