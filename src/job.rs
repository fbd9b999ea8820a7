//! The job: its id, its status, its fields, the legal status transitions, and its JSON form.
//!
//! The JSON object is the same on the wire and on disk (the seed's job file format), so this
//! module is the one codec for both: [`Job::from_submission`] validates what a client sends,
//! [`Job::from_stored`] reads a job file, [`Job::to_json`] writes either. Fields the server does
//! not know are kept verbatim in [`Job::extra`] and written back unchanged, so a newer client or
//! a newer daemon never loses data through this one.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

/// A job's id: a UUID, always written lowercase and hyphenated.
///
/// It is the only thing that ever names a file, and it can only be built by parsing, so no
/// client-supplied text reaches a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(Uuid);

impl JobId {
    /// A fresh random (v4) id for a job submitted without one.
    pub fn new_random() -> JobId {
        JobId(Uuid::new_v4())
    }

    pub fn from_uuid(uuid: Uuid) -> JobId {
        JobId(uuid)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `Uuid`'s Display is the lowercase hyphenated form.
        fmt::Display::fmt(&self.0, f)
    }
}

/// Written as its text (lowercase, hyphenated), as everywhere else.
impl Serialize for JobId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Why a text is not a job id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a UUID (expected the hyphenated form, like 123e4567-e89b-12d3-a456-426614174000)")]
pub struct InvalidJobId;

impl FromStr for JobId {
    type Err = InvalidJobId;

    /// Accepts only the 36-character hyphenated form (any case); braces, URNs and the
    /// 32-digit simple form are refused so that one job has one spelling.
    fn from_str(s: &str) -> Result<JobId, InvalidJobId> {
        if s.len() != 36 {
            return Err(InvalidJobId);
        }
        Uuid::try_parse(s).map(JobId).map_err(|_| InvalidJobId)
    }
}

/// Where a job is in its life. Set by the server only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Queued,
        Status::Running,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "Queued",
            Status::Running => "Running",
            Status::Completed => "Completed",
            Status::Failed => "Failed",
            Status::Cancelled => "Cancelled",
        }
    }

    /// Completed, Failed and Cancelled are final: nothing moves a job out of them.
    pub fn is_finished(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    /// Parses a status name; case-insensitive, for query strings typed by people.
    pub fn parse_loose(s: &str) -> Option<Status> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The file formats a text dataset can come in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    Csv,
    Json,
    Hf,
    S3,
}

impl FileFormat {
    pub const ALL: [FileFormat; 4] = [
        FileFormat::Csv,
        FileFormat::Json,
        FileFormat::Hf,
        FileFormat::S3,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FileFormat::Csv => "csv",
            FileFormat::Json => "json",
            FileFormat::Hf => "hf",
            FileFormat::S3 => "s3",
        }
    }

    fn parse(s: &str) -> Option<FileFormat> {
        FileFormat::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// The diffusion model families a DiffusionJob can train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    Sdxl,
    Flux,
}

impl ModelType {
    pub const ALL: [ModelType; 2] = [ModelType::Sdxl, ModelType::Flux];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Sdxl => "sdxl",
            ModelType::Flux => "flux",
        }
    }
}

/// The four G.O.D dataset shapes, told apart by their distinctive keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetShape {
    Instruct,
    Dpo,
    Grpo,
    ChatTemplate,
    /// A G.O.D environment task's: `environment_names`, the environments it trains in.
    Environment,
}

impl DatasetShape {
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetShape::Instruct => "instruct",
            DatasetShape::Dpo => "dpo",
            DatasetShape::Grpo => "grpo",
            DatasetShape::ChatTemplate => "chat_template",
            DatasetShape::Environment => "environment",
        }
    }
}

pub(crate) const INSTRUCT_FIELDS: &[&str] = &[
    "system_prompt",
    "system_format",
    "field_system",
    "field_instruction",
    "field_input",
    "field_output",
    "format",
    "no_input_format",
    "field",
];
pub(crate) const DPO_FIELDS: &[&str] = &[
    "field_prompt",
    "field_system",
    "field_chosen",
    "field_rejected",
    "prompt_format",
    "chosen_format",
    "rejected_format",
];
pub(crate) const GRPO_TEXT_FIELDS: &[&str] = &["field_prompt", "extra_column"];
pub(crate) const CHAT_FIELDS: &[&str] = &[
    "chat_template",
    "chat_column",
    "chat_role_field",
    "chat_content_field",
    "chat_user_reference",
    "chat_assistant_reference",
];

/// A validated `dataset_type` object.
///
/// The object is kept as sent, key order and unknown keys included, so it is written back
/// unchanged; validation only guarantees that its shape's fields have the right types. It is
/// held as compact JSON text: a parsed map costs several times the memory, and a daemon
/// keeps every job it has ever run.
#[derive(Clone, Debug)]
pub struct DatasetType {
    shape: DatasetShape,
    raw: Box<RawValue>,
}

impl PartialEq for DatasetType {
    /// Equal when they hold the same keys and values, in any order.
    fn eq(&self, other: &DatasetType) -> bool {
        self.shape == other.shape && self.to_json() == other.to_json()
    }
}

impl DatasetType {
    /// Tells the shape by its distinctive keys, then checks that shape's fields.
    pub fn parse(value: &Value) -> Result<DatasetType, FieldError> {
        let Value::Object(object) = value else {
            return Err(FieldError::new(
                "dataset_type",
                "must be an object (instruct, DPO, GRPO or chat template fields)",
            ));
        };
        let has = |key: &str| object.contains_key(key);
        let shape = if has("environment_names") {
            DatasetShape::Environment
        } else if has("reward_functions") {
            DatasetShape::Grpo
        } else if has("field_chosen") || has("field_rejected") {
            DatasetShape::Dpo
        } else if has("chat_template") || has("chat_column") {
            DatasetShape::ChatTemplate
        } else {
            DatasetShape::Instruct
        };
        let text_fields = match shape {
            DatasetShape::Instruct => INSTRUCT_FIELDS,
            DatasetShape::Dpo => DPO_FIELDS,
            DatasetShape::Grpo => GRPO_TEXT_FIELDS,
            DatasetShape::ChatTemplate => CHAT_FIELDS,
            DatasetShape::Environment => &[],
        };
        for field in text_fields {
            match object.get(*field) {
                None | Some(Value::Null) | Some(Value::String(_)) => {}
                Some(_) => {
                    return Err(FieldError::new(
                        format!("dataset_type.{field}"),
                        "must be a string or null",
                    ));
                }
            }
        }
        if shape == DatasetShape::Grpo {
            check_reward_functions(object.get("reward_functions"))?;
        }
        if shape == DatasetShape::Environment {
            check_environment_names(object.get("environment_names"))?;
        }
        Ok(DatasetType {
            shape,
            raw: to_raw(value),
        })
    }

    pub fn shape(&self) -> DatasetShape {
        self.shape
    }

    /// The object as compact JSON text, as given to trainers.
    pub fn as_json_text(&self) -> &str {
        self.raw.get()
    }

    pub fn to_json(&self) -> Value {
        from_raw(&self.raw)
    }
}

/// A JSON value as compact text. Serialising a `Value` cannot fail, and its text is valid
/// JSON, so neither step can.
fn to_raw(value: &Value) -> Box<RawValue> {
    RawValue::from_string(value.to_string()).expect("a serialised Value is valid JSON")
}

fn from_raw(raw: &RawValue) -> Value {
    serde_json::from_str(raw.get()).expect("a RawValue holds valid JSON")
}

/// Fields this version does not know, in the order they came, each as compact JSON text.
#[derive(Clone, Debug, Default)]
pub struct Extra(Vec<(String, Box<RawValue>)>);

impl Extra {
    fn from_map(map: Map<String, Value>) -> Extra {
        Extra(map.into_iter().map(|(k, v)| (k, to_raw(&v))).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<Value> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| from_raw(v))
    }

    pub fn insert(&mut self, key: impl Into<String>, value: &Value) {
        let key = key.into();
        self.0.retain(|(k, _)| *k != key);
        self.0.push((key, to_raw(value)));
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }

    fn to_map(&self) -> Map<String, Value> {
        self.0
            .iter()
            .map(|(k, v)| (k.clone(), from_raw(v)))
            .collect()
    }
}

impl PartialEq for Extra {
    /// Equal when they hold the same keys and values, in any order.
    fn eq(&self, other: &Extra) -> bool {
        self.0.len() == other.0.len() && self.to_map() == other.to_map()
    }
}

/// `environment_names`: null, or a list of names.
fn check_environment_names(value: Option<&Value>) -> Result<(), FieldError> {
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(names)) => match names.iter().position(|n| !n.is_string()) {
            None => Ok(()),
            Some(i) => Err(FieldError::new(
                format!("dataset_type.environment_names[{i}]"),
                "must be a string",
            )),
        },
        Some(_) => Err(FieldError::new(
            "dataset_type.environment_names",
            "must be a list of environment names or null",
        )),
    }
}

fn check_reward_functions(value: Option<&Value>) -> Result<(), FieldError> {
    let path = "dataset_type.reward_functions";
    let Some(Value::Array(functions)) = value else {
        return Err(FieldError::new(
            path,
            "must be an array of {reward_func, reward_weight} objects",
        ));
    };
    if functions.is_empty() {
        return Err(FieldError::new(
            path,
            "must name at least one reward function",
        ));
    }
    for (i, function) in functions.iter().enumerate() {
        let Value::Object(function) = function else {
            return Err(FieldError::new(format!("{path}[{i}]"), "must be an object"));
        };
        match function.get("reward_func") {
            Some(Value::String(s)) if !s.trim().is_empty() => {}
            _ => {
                return Err(FieldError::new(
                    format!("{path}[{i}].reward_func"),
                    "must be a non-empty string",
                ));
            }
        }
        let weight = function.get("reward_weight").and_then(Value::as_f64);
        match weight {
            Some(w) if w.is_finite() && w >= 0.0 => {}
            _ => {
                return Err(FieldError::new(
                    format!("{path}[{i}].reward_weight"),
                    "must be a number >= 0",
                ));
            }
        }
    }
    Ok(())
}

/// What kind of training a job is, with the fields only that kind has.
#[derive(Clone, Debug, PartialEq)]
pub enum JobKind {
    Text {
        dataset: String,
        dataset_type: DatasetType,
        file_format: FileFormat,
    },
    Diffusion {
        dataset_zip: String,
        model_type: ModelType,
    },
}

impl JobKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            JobKind::Text { .. } => "TextJob",
            JobKind::Diffusion { .. } => "DiffusionJob",
        }
    }
}

/// A moment, stored as RFC 3339 UTC with microseconds.
pub type Timestamp = DateTime<Utc>;

pub fn format_timestamp(t: &Timestamp) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// One training job: the client's request plus what the server records about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub status: Status,
    /// Why a job is Failed or Cancelled, for people.
    pub error_message: Option<String>,
    pub model: String,
    pub expected_repo_name: Option<String>,
    pub kind: JobKind,
    /// Starts of the current run that ended or were cut by a crash (a start cut by a graceful
    /// stop is taken back); a retry begins a new run at 0.
    pub attempts: u32,
    /// When the current run arrived: at acceptance, and again at a retry. Strictly
    /// increasing in arrival order, so it orders the queue when `queue.json` is lost.
    pub created_at: Option<Timestamp>,
    pub updated_at: Option<Timestamp>,
    /// The last start. A Queued job with a start time was interrupted and goes first.
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    /// GPUs the job asks for; `None`: the default (one when GPUs are configured).
    pub gpu_count: Option<u32>,
    /// The GPUs of its last start, when GPUs are configured. Server-owned.
    pub gpu_ids: Option<Vec<u32>>,
    /// The time budget the client gave, in hours (`hours_to_complete` in G.O.D requests).
    pub hours_to_complete: Option<f64>,
    /// When the budget runs out: acceptance time plus `hours_to_complete`. Server-owned, fixed
    /// at acceptance, so that restarts do not extend it; only a retry (a fresh run, accepted
    /// anew) fixes another.
    pub deadline: Option<Timestamp>,
    /// The executor stages finished so far, in order. Server-owned; a recovered job resumes
    /// at its first stage not listed here.
    pub stages_done: Vec<String>,
    /// When each stage with a time budget (`timeout = "budget"`) first started, in the
    /// order they did. Server-owned, recorded before the stage runs, so that a stage
    /// restarted after a crash gets only what is left of its budget.
    pub stages_started: Vec<(String, Timestamp)>,
    /// For a job of the G.O.D trainer API: the task it runs. Server-owned; `None` for a job
    /// of the main API.
    pub trainer_task: Option<TrainerTask>,
    /// The first W&B address (`https://wandb.ai/...`) a stage of this run printed.
    /// Server-owned; a fresh run forgets it.
    pub wandb_url: Option<String>,
    /// Fields this version does not know, in the order they came, written back unchanged.
    pub extra: Extra,
}

/// The G.O.D trainer API's part of a job: the (task, miner hotkey) pair it runs and the
/// miner's repository, which stages get as placeholders and environment variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainerTask {
    pub task_id: String,
    pub hotkey: String,
    pub github_repo: String,
    pub github_branch: Option<String>,
    pub github_commit_hash: Option<String>,
    /// The start request as it was sent, its secret (`github_token`) taken out: what the
    /// task's answers echo, and what an identical retry is compared with.
    pub request: Value,
}

impl TrainerTask {
    fn to_json(&self) -> Value {
        serde_json::json!({
            "task_id": self.task_id,
            "hotkey": self.hotkey,
            "github_repo": self.github_repo,
            "github_branch": self.github_branch,
            "github_commit_hash": self.github_commit_hash,
            "request": self.request,
        })
    }

    fn from_json(value: &Value) -> Result<TrainerTask, FieldError> {
        if !value.is_object() {
            return Err(FieldError::new("trainer_task", "must be an object or null"));
        }
        let field =
            |name: &str| FieldError::new(format!("trainer_task.{name}"), "must be a string");
        let text = |name: &str| -> Result<String, FieldError> {
            value[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| field(name))
        };
        let optional = |name: &str| -> Result<Option<String>, FieldError> {
            match &value[name] {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                _ => Err(field(name)),
            }
        };
        Ok(TrainerTask {
            task_id: text("task_id")?,
            hotkey: text("hotkey")?,
            github_repo: text("github_repo")?,
            github_branch: optional("github_branch")?,
            github_commit_hash: optional("github_commit_hash")?,
            request: value.get("request").cloned().unwrap_or(Value::Null),
        })
    }
}

/// A field that is missing or wrong, named by its JSON path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The largest budget a job may carry: a year.
pub const MAX_HOURS: f64 = 8760.0;

/// A number of hours as a span of time, to the microsecond (the precision of timestamps).
pub fn hours(hours: f64) -> chrono::Duration {
    chrono::Duration::microseconds((hours * 3_600_000_000.0).round() as i64)
}

/// The keys this version understands at the top level; everything else goes to `extra`.
const KNOWN_TEXT: &[&str] = &["dataset", "dataset_type", "file_format"];
const KNOWN_DIFFUSION: &[&str] = &["dataset_zip", "model_type"];
const KNOWN_COMMON: &[&str] = &[
    "type",
    "job_id",
    "model",
    "status",
    "error_message",
    "expected_repo_name",
    "attempts",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "gpu_count",
    "gpu_ids",
    "hours_to_complete",
    "deadline",
    "stages_done",
    "stages_started",
    "trainer_task",
    "wandb_url",
];

impl Job {
    /// Validates a client's submission. Server-owned fields (`status` other than `Queued`,
    /// `attempts`, timestamps, `error_message`) are not the client's to set: `status` is
    /// refused, the rest are ignored.
    pub fn from_submission(value: Value, now: Timestamp) -> Result<Job, FieldError> {
        let Value::Object(mut object) = value else {
            return Err(FieldError::new("body", "must be a JSON object (a job)"));
        };
        // Problems are reported in the order the job format lists its fields (type, job_id,
        // model, status, then the rest), so a client that fixes them one at a time meets
        // them in the order it reads the documentation.
        job_type(&object)?;
        let id = match object.get("job_id") {
            None | Some(Value::Null) => JobId::new_random(),
            Some(Value::String(s)) => s
                .parse()
                .map_err(|e: InvalidJobId| FieldError::new("job_id", e.to_string()))?,
            Some(_) => return Err(FieldError::new("job_id", "must be a UUID string")),
        };
        trainer_value("model", &required_string(&object, "model")?)?;
        match object.get("status") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "Queued" => {}
            Some(_) => {
                return Err(FieldError::new(
                    "status",
                    "is set by the server; omit it or send \"Queued\"",
                ));
            }
        }
        for key in [
            "error_message",
            "attempts",
            "created_at",
            "updated_at",
            "started_at",
            "finished_at",
            "gpu_ids",
            "deadline",
            "stages_done",
            "stages_started",
            "trainer_task",
            "wandb_url",
            // What the API adds to a job it shows; a job read back and resubmitted is the
            // same request.
            "estimated_start",
            "estimated_finish",
        ] {
            // shift_remove keeps the order of the remaining (possibly unknown) fields.
            object.shift_remove(key);
        }
        let mut job = Job::from_fields(id, object, Source::Submission)?;
        job.status = Status::Queued;
        job.accept(now);
        Ok(job)
    }

    /// Reads a job file. Everything a submission needs must be there and valid, and so must
    /// the server's fields; the additions are optional so that the seed's files load.
    pub fn from_stored(value: Value) -> Result<Job, FieldError> {
        let Value::Object(object) = value else {
            return Err(FieldError::new("job", "must be a JSON object"));
        };
        let id = match object.get("job_id") {
            Some(Value::String(s)) => s
                .parse()
                .map_err(|e: InvalidJobId| FieldError::new("job_id", e.to_string()))?,
            _ => return Err(FieldError::new("job_id", "required, a UUID string")),
        };
        let status = match object.get("status") {
            Some(Value::String(s)) => Status::ALL
                .into_iter()
                .find(|status| status.as_str() == s)
                .ok_or_else(|| FieldError::new("status", format!("unknown status {s:?}")))?,
            _ => return Err(FieldError::new("status", "required, a status name")),
        };
        let error_message = optional_string(&object, "error_message")?;
        let attempts = match object.get("attempts") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| FieldError::new("attempts", "must be a whole number"))?,
        };
        let created_at = optional_timestamp(&object, "created_at")?;
        let updated_at = optional_timestamp(&object, "updated_at")?;
        let started_at = optional_timestamp(&object, "started_at")?;
        let finished_at = optional_timestamp(&object, "finished_at")?;
        let gpu_ids = match object.get("gpu_ids") {
            None | Some(Value::Null) => None,
            Some(Value::Array(ids)) => Some(
                ids.iter()
                    .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| FieldError::new("gpu_ids", "must be GPU ids (whole numbers)"))?,
            ),
            Some(_) => return Err(FieldError::new("gpu_ids", "must be an array or null")),
        };
        let deadline = optional_timestamp(&object, "deadline")?;
        let stages_done = match object.get("stages_done") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(names)) => names
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| FieldError::new("stages_done", "must be stage names (strings)"))?,
            Some(_) => return Err(FieldError::new("stages_done", "must be an array or null")),
        };
        let stages_started = match object.get("stages_started") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(started)) => started
                .iter()
                .map(|(stage, at)| {
                    at.as_str()
                        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                        .map(|t| (stage.clone(), t.with_timezone(&Utc)))
                })
                .collect::<Option<Vec<(String, Timestamp)>>>()
                .ok_or_else(|| {
                    FieldError::new("stages_started", "must map stage names to RFC 3339 times")
                })?,
            Some(_) => {
                return Err(FieldError::new(
                    "stages_started",
                    "must be an object or null",
                ));
            }
        };
        let trainer_task = match object.get("trainer_task") {
            None | Some(Value::Null) => None,
            Some(task) => Some(TrainerTask::from_json(task)?),
        };
        let wandb_url = match object.get("wandb_url") {
            None | Some(Value::Null) => None,
            Some(Value::String(url)) => Some(url.clone()),
            Some(_) => return Err(FieldError::new("wandb_url", "must be a string or null")),
        };
        let mut job = Job::from_fields(id, object, Source::File)?;
        job.trainer_task = trainer_task;
        job.wandb_url = wandb_url;
        job.status = status;
        job.deadline = deadline;
        job.stages_done = stages_done;
        job.stages_started = stages_started;
        job.error_message = error_message;
        job.attempts = attempts;
        job.created_at = created_at;
        job.updated_at = updated_at;
        job.started_at = started_at;
        job.finished_at = finished_at;
        job.gpu_ids = gpu_ids;
        Ok(job)
    }

    /// The part both readers share: type, model and the kind's fields, in the order the job
    /// format lists them; unknown keys to `extra`. A submission's values must also be able to
    /// reach a trainer (see [`trainer_value`]); a stored job is read as it is, so that a file
    /// written before that rule is still served rather than quarantined.
    fn from_fields(
        id: JobId,
        mut object: Map<String, Value>,
        source: Source,
    ) -> Result<Job, FieldError> {
        let for_trainer = |field: &str, value: &str| match source {
            Source::Submission => trainer_value(field, value),
            Source::File => Ok(()),
        };
        let type_name = job_type(&object)?;
        let model = required_string(&object, "model")?;
        for_trainer("model", &model)?;
        let expected_repo_name = optional_string(&object, "expected_repo_name")?;
        if let Some(name) = &expected_repo_name {
            for_trainer("expected_repo_name", name)?;
        }
        let kind = match type_name {
            JobType::Text => {
                let dataset = required_string(&object, "dataset")?;
                for_trainer("dataset", &dataset)?;
                let dataset_type = match object.get("dataset_type") {
                    None | Some(Value::Null) => {
                        return Err(FieldError::new(
                            "dataset_type",
                            "required for a TextJob (instruct, DPO, GRPO or chat template fields)",
                        ));
                    }
                    Some(v) => DatasetType::parse(v)?,
                };
                // The trainer gets the object as JSON text (DATASET_TYPE, {dataset_type_json}).
                for_trainer("dataset_type", dataset_type.as_json_text())?;
                let file_format = match object.get("file_format") {
                    Some(Value::String(s)) => FileFormat::parse(s).ok_or_else(|| {
                        FieldError::new(
                            "file_format",
                            format!("unknown format {s:?}; one of csv, json, hf, s3"),
                        )
                    })?,
                    _ => {
                        return Err(FieldError::new(
                            "file_format",
                            "required for a TextJob, one of csv, json, hf, s3",
                        ));
                    }
                };
                JobKind::Text {
                    dataset,
                    dataset_type,
                    file_format,
                }
            }
            JobType::Diffusion => {
                let dataset_zip = required_string(&object, "dataset_zip")?;
                for_trainer("dataset_zip", &dataset_zip)?;
                let model_type = match object.get("model_type") {
                    None | Some(Value::Null) => ModelType::Sdxl,
                    Some(Value::String(s)) if s == "sdxl" => ModelType::Sdxl,
                    Some(Value::String(s)) if s == "flux" => ModelType::Flux,
                    Some(_) => {
                        return Err(FieldError::new(
                            "model_type",
                            "must be \"sdxl\" (the default) or \"flux\"",
                        ));
                    }
                };
                JobKind::Diffusion {
                    dataset_zip,
                    model_type,
                }
            }
        };
        let gpu_count = gpu_count_field(&object)?;
        let hours_to_complete = hours_field(&object)?;
        let kind_fields = match kind {
            JobKind::Text { .. } => KNOWN_TEXT,
            JobKind::Diffusion { .. } => KNOWN_DIFFUSION,
        };
        object.retain(|key, _| {
            !KNOWN_COMMON.contains(&key.as_str()) && !kind_fields.contains(&key.as_str())
        });
        Ok(Job {
            id,
            status: Status::Queued,
            error_message: None,
            model,
            expected_repo_name,
            kind,
            attempts: 0,
            created_at: None,
            updated_at: None,
            started_at: None,
            finished_at: None,
            gpu_count,
            gpu_ids: None,
            hours_to_complete,
            deadline: None,
            stages_done: Vec::new(),
            stages_started: Vec::new(),
            trainer_task: None,
            wandb_url: None,
            extra: Extra::from_map(object),
        })
    }

    /// The JSON object, in the seed's key order, then the additions, then unknown fields.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a job always serialises")
    }

    /// Whether `other` asks for the same work: everything the client chose is equal. Used to
    /// tell a safe retry of a submission (same id, same content) from a conflicting one.
    pub fn same_request(&self, other: &Job) -> bool {
        self.id == other.id
            && self.model == other.model
            && self.expected_repo_name == other.expected_repo_name
            && self.kind == other.kind
            && self.gpu_count == other.gpu_count
            && self.hours_to_complete == other.hours_to_complete
            && self.extra == other.extra
    }

    /// Sets what acceptance fixes: the creation time and, with a budget, the deadline.
    pub fn accept(&mut self, now: Timestamp) {
        self.created_at = Some(now);
        self.updated_at = Some(now);
        self.deadline = self.hours_to_complete.map(|h| now + hours(h));
    }

    /// The budget left at `now`: `None` without a deadline, zero once it has passed.
    pub fn time_left(&self, now: Timestamp) -> Option<std::time::Duration> {
        self.deadline
            .map(|deadline| (deadline - now).to_std().unwrap_or_default())
    }

    /// Queued -> Running: a new start, counted before the trainer runs, on these GPUs (when
    /// GPUs are configured).
    pub fn start(&mut self, now: Timestamp, gpu_ids: Option<Vec<u32>>) {
        debug_assert_eq!(self.status, Status::Queued);
        self.status = Status::Running;
        self.gpu_ids = gpu_ids;
        self.attempts = self.attempts.saturating_add(1);
        self.started_at = Some(now);
        self.finished_at = None;
        self.error_message = None;
        self.updated_at = Some(now);
    }

    /// Running -> Completed, Failed or Cancelled; Queued -> Cancelled or Failed.
    pub fn finish(&mut self, status: Status, error_message: Option<String>, now: Timestamp) {
        debug_assert!(status.is_finished() && !self.status.is_finished());
        self.status = status;
        self.error_message = error_message;
        self.finished_at = Some(now);
        self.updated_at = Some(now);
    }

    /// Running -> Queued after an interruption. `counted` says whether the cut start still
    /// counts as an attempt: a crash's does, a graceful stop's is taken back. The start time
    /// is kept: it is what puts an interrupted job at the head of the queue.
    pub fn requeue_interrupted(&mut self, counted: bool, now: Timestamp) {
        debug_assert_eq!(self.status, Status::Running);
        self.status = Status::Queued;
        if !counted {
            self.attempts = self.attempts.saturating_sub(1);
        }
        self.updated_at = Some(now);
    }

    /// When `stage` first started, for a stage with a time budget.
    pub fn stage_started_at(&self, stage: &str) -> Option<Timestamp> {
        self.stages_started
            .iter()
            .find(|(name, _)| name == stage)
            .map(|(_, at)| *at)
    }

    /// Completed, Failed or Cancelled -> Queued: a fresh run, as if the job had just
    /// arrived at `now` (a creation time later than every one handed out before, so that
    /// replay by `created_at` puts it after every job queued before it). Attempts, stages,
    /// GPUs, the error and the start and end times start over; a budget's deadline is fixed
    /// anew from `now`. The client's fields and the unknown ones are kept.
    pub fn retry(&mut self, now: Timestamp) {
        debug_assert!(self.status.is_finished());
        self.status = Status::Queued;
        self.error_message = None;
        self.attempts = 0;
        self.started_at = None;
        self.finished_at = None;
        self.stages_done.clear();
        self.stages_started.clear();
        self.wandb_url = None;
        self.gpu_ids = None;
        self.accept(now);
    }

    /// Whether a Queued job was started before and cut short, so it goes first.
    pub fn was_interrupted(&self) -> bool {
        self.status == Status::Queued && self.started_at.is_some()
    }

    /// The pretty JSON a job file holds (the API sends the same object compact).
    pub fn to_file_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(&self.to_json())
            .expect("a serde_json::Value always serialises");
        bytes.push(b'\n');
        bytes
    }
}

/// A small valid job with a fixed id, for tests across the crate.
#[cfg(test)]
pub(crate) fn sample_job(n: u128) -> Job {
    let mut job = Job::from_submission(
        serde_json::json!({"type": "DiffusionJob", "model": "m", "dataset_zip": "z"}),
        Utc::now(),
    )
    .expect("the sample job is valid");
    job.id = JobId::from_uuid(Uuid::from_u128(n));
    job
}

impl Serialize for Job {
    /// The seed's key order, then the additions, then the unknown fields verbatim.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", self.kind.type_name())?;
        map.serialize_entry("job_id", &self.id.to_string())?;
        map.serialize_entry("model", &self.model)?;
        map.serialize_entry("status", self.status.as_str())?;
        map.serialize_entry("error_message", &self.error_message)?;
        map.serialize_entry("expected_repo_name", &self.expected_repo_name)?;
        match &self.kind {
            JobKind::Text {
                dataset,
                dataset_type,
                file_format,
            } => {
                map.serialize_entry("dataset", dataset)?;
                map.serialize_entry("dataset_type", &*dataset_type.raw)?;
                map.serialize_entry("file_format", file_format.as_str())?;
            }
            JobKind::Diffusion {
                dataset_zip,
                model_type,
            } => {
                map.serialize_entry("dataset_zip", dataset_zip)?;
                map.serialize_entry("model_type", model_type.as_str())?;
            }
        }
        map.serialize_entry("attempts", &self.attempts)?;
        for (key, t) in [
            ("created_at", &self.created_at),
            ("updated_at", &self.updated_at),
            ("started_at", &self.started_at),
            ("finished_at", &self.finished_at),
        ] {
            map.serialize_entry(key, &t.as_ref().map(format_timestamp))?;
        }
        // Written only when set, so that job files of boxes without GPU accounting stay as
        // they were.
        if let Some(count) = self.gpu_count {
            map.serialize_entry("gpu_count", &count)?;
        }
        if let Some(ids) = &self.gpu_ids {
            map.serialize_entry("gpu_ids", ids)?;
        }
        if let Some(hours) = self.hours_to_complete {
            // Whole hours stay whole numbers, as G.O.D sends them.
            if hours.fract() == 0.0 {
                map.serialize_entry("hours_to_complete", &(hours as u64))?;
            } else {
                map.serialize_entry("hours_to_complete", &hours)?;
            }
        }
        if let Some(deadline) = &self.deadline {
            map.serialize_entry("deadline", &format_timestamp(deadline))?;
        }
        if !self.stages_done.is_empty() {
            map.serialize_entry("stages_done", &self.stages_done)?;
        }
        if let Some(task) = &self.trainer_task {
            map.serialize_entry("trainer_task", &task.to_json())?;
        }
        if !self.stages_started.is_empty() {
            let started: serde_json::Map<String, Value> = self
                .stages_started
                .iter()
                .map(|(stage, at)| (stage.clone(), Value::String(format_timestamp(at))))
                .collect();
            map.serialize_entry("stages_started", &started)?;
        }
        if let Some(url) = &self.wandb_url {
            map.serialize_entry("wandb_url", url)?;
        }
        for (key, value) in &self.extra.0 {
            map.serialize_entry(key, &**value)?;
        }
        map.end()
    }
}

/// `gpu_count`: absent, null, or a whole number >= 0. Shared with offers, which say it the
/// same way.
pub(crate) fn gpu_count_field(object: &Map<String, Value>) -> Result<Option<u32>, FieldError> {
    match object.get("gpu_count") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| FieldError::new("gpu_count", "must be a whole number >= 0")),
    }
}

/// `hours_to_complete`: absent, null, or hours above 0 and at most [`MAX_HOURS`]. Shared
/// with offers.
pub(crate) fn hours_field(object: &Map<String, Value>) -> Result<Option<f64>, FieldError> {
    match object.get("hours_to_complete") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|h| h.is_finite() && *h > 0.0 && *h <= MAX_HOURS)
            .map(Some)
            .ok_or_else(|| {
                FieldError::new(
                    "hours_to_complete",
                    format!("must be a number of hours above 0 and at most {MAX_HOURS}"),
                )
            }),
    }
}

/// Who wrote the job being read: a client (every rule applies) or the store (a file on disk).
#[derive(Clone, Copy)]
enum Source {
    Submission,
    File,
}

/// The `type` field, checked.
#[derive(Clone, Copy)]
enum JobType {
    Text,
    Diffusion,
}

fn job_type(object: &Map<String, Value>) -> Result<JobType, FieldError> {
    match object.get("type") {
        Some(Value::String(s)) if s == "TextJob" => Ok(JobType::Text),
        Some(Value::String(s)) if s == "DiffusionJob" => Ok(JobType::Diffusion),
        Some(Value::String(other)) => Err(FieldError::new(
            "type",
            format!("unknown job type {other:?}; \"TextJob\" or \"DiffusionJob\""),
        )),
        Some(_) | None => Err(FieldError::new(
            "type",
            "required, \"TextJob\" or \"DiffusionJob\"",
        )),
    }
}

/// The kernel's limit on one argument or one `NAME=value` environment string, its
/// terminating NUL included (MAX_ARG_STRLEN, 32 pages of 4 KiB). A longer one makes
/// execve(2) fail with E2BIG.
pub const MAX_ARG_STRLEN: usize = 131_072;

/// The environment variable each job field reaches a trainer as (the executor's job
/// environment; a `{placeholder}` of the same field renders the same text).
const TRAINER_VARIABLES: &[(&str, &str)] = &[
    ("model", "MODEL"),
    ("expected_repo_name", "EXPECTED_REPO_NAME"),
    ("dataset", "DATASET"),
    ("dataset_type", "DATASET_TYPE"),
    ("dataset_zip", "DATASET_ZIP"),
];

/// Checks that a field's text can be handed to a trainer: a NUL byte cannot be in an
/// argument or an environment variable at all, and `NAME=value` must fit in
/// [`MAX_ARG_STRLEN`]. Refused at submission, because a stored job that breaks either rule
/// can never start.
fn trainer_value(field: &str, value: &str) -> Result<(), FieldError> {
    if value.contains('\0') {
        return Err(FieldError::new(
            field,
            "must not contain a NUL character (\\u0000): a trainer's arguments and environment cannot hold one",
        ));
    }
    let variable = TRAINER_VARIABLES
        .iter()
        .find(|(name, _)| *name == field)
        .map_or("", |(_, variable)| variable);
    // "NAME=" before the value, the NUL after it.
    let max = MAX_ARG_STRLEN - variable.len() - 2;
    if value.len() > max {
        return Err(FieldError::new(
            field,
            format!(
                "is {} bytes; at most {max} fit in the trainer's environment variable {variable}",
                value.len()
            ),
        ));
    }
    Ok(())
}

pub(crate) fn required_string(
    object: &Map<String, Value>,
    key: &str,
) -> Result<String, FieldError> {
    match object.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(FieldError::new(key, "must not be empty")),
        Some(_) => Err(FieldError::new(key, "must be a string")),
        None => Err(FieldError::new(key, "required")),
    }
}

fn optional_string(object: &Map<String, Value>, key: &str) -> Result<Option<String>, FieldError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(FieldError::new(key, "must be a string or null")),
    }
}

fn optional_timestamp(
    object: &Map<String, Value>,
    key: &str,
) -> Result<Option<Timestamp>, FieldError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| FieldError::new(key, "must be an RFC 3339 time or null")),
        Some(_) => Err(FieldError::new(key, "must be an RFC 3339 time or null")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The example job file of the seed document, byte for byte.
    const SEED_EXAMPLE: &str = include_str!("../tests/fixtures/seed-job.json");

    fn now() -> Timestamp {
        "2026-01-02T03:04:05.123456Z".parse().unwrap()
    }

    fn text_job(dataset_type: Value) -> Value {
        json!({
            "type": "TextJob",
            "model": "m",
            "dataset": "d.json",
            "dataset_type": dataset_type,
            "file_format": "json",
        })
    }

    #[test]
    fn seed_example_loads_and_keeps_its_fields() {
        let value: Value = serde_json::from_str(SEED_EXAMPLE).unwrap();
        let job = Job::from_stored(value.clone()).unwrap();
        assert_eq!(job.id.to_string(), "123e4567-e89b-12d3-a456-426614174000");
        assert_eq!(job.status, Status::Running);
        assert_eq!(job.attempts, 0);
        assert_eq!(
            job.expected_repo_name.as_deref(),
            Some("my-fine-tuned-model")
        );
        let JobKind::Text { dataset_type, .. } = &job.kind else {
            panic!("seed example is a TextJob")
        };
        assert_eq!(dataset_type.shape(), DatasetShape::Instruct);
        // Every field of the seed comes back with the same value.
        let out = job.to_json();
        for (key, v) in value.as_object().unwrap() {
            assert_eq!(&out[key], v, "field {key}");
        }
        // And the written form reads back to the same job.
        let again: Value = serde_json::from_slice(&job.to_file_bytes()).unwrap();
        assert_eq!(Job::from_stored(again).unwrap(), job);
    }

    #[test]
    fn unknown_fields_are_kept_verbatim() {
        // Parsed from text, so that the numbers keep the spelling the client chose.
        let submission: Value = serde_json::from_str(
            r#"{"type": "TextJob", "model": "m", "dataset": "d.json", "file_format": "json",
                "dataset_type": {"field_instruction": "q", "new_knob": [1, 2.50, "x"]},
                "hours_to_complete": 3,
                "future": {"nested": 1.000, "big": 123456789012345678901234567890}}"#,
        )
        .unwrap();
        let job = Job::from_submission(submission.clone(), now()).unwrap();
        let out = job.to_json();
        assert_eq!(out["hours_to_complete"], json!(3));
        assert_eq!(out["future"], submission["future"]);
        assert_eq!(out["dataset_type"], submission["dataset_type"]);
        // Numbers keep their spelling through a file round trip.
        let text = String::from_utf8(job.to_file_bytes()).unwrap();
        assert!(text.contains("2.50"), "{text}");
        assert!(text.contains("1.000"), "{text}");
        assert!(text.contains("123456789012345678901234567890"), "{text}");
        let back = Job::from_stored(serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(back, job);
    }

    #[test]
    fn each_dataset_shape_is_recognised_and_round_trips() {
        let cases = [
            (
                json!({"system_prompt": "s", "field_instruction": "i", "field": null}),
                DatasetShape::Instruct,
            ),
            (
                json!({"field_prompt": "p", "field_chosen": "c", "field_rejected": "r", "prompt_format": "{prompt}"}),
                DatasetShape::Dpo,
            ),
            (
                json!({"field_prompt": "p", "reward_functions": [{"reward_func": "def f(x): return 1", "reward_weight": 0.5, "func_hash": "abc"}], "extra_column": null}),
                DatasetShape::Grpo,
            ),
            (
                json!({"chat_template": "chatml", "chat_column": "conversations", "chat_role_field": "from"}),
                DatasetShape::ChatTemplate,
            ),
            (
                json!({"chat_column": "messages"}),
                DatasetShape::ChatTemplate,
            ),
            (
                json!({"environment_names": ["alfworld", "webshop"]}),
                DatasetShape::Environment,
            ),
        ];
        for (dataset_type, shape) in cases {
            let job = Job::from_submission(text_job(dataset_type.clone()), now()).unwrap();
            let JobKind::Text {
                dataset_type: dt, ..
            } = &job.kind
            else {
                panic!()
            };
            assert_eq!(dt.shape(), shape, "{dataset_type}");
            let back = Job::from_stored(job.to_json()).unwrap();
            assert_eq!(back, job);
            assert_eq!(back.to_json()["dataset_type"], dataset_type);
        }
    }

    #[test]
    fn bad_environment_names_name_the_field() {
        for (dataset_type, field) in [
            (
                json!({"environment_names": "alfworld"}),
                "dataset_type.environment_names",
            ),
            (
                json!({"environment_names": ["alfworld", 3]}),
                "dataset_type.environment_names[1]",
            ),
        ] {
            let err = Job::from_submission(text_job(dataset_type.clone()), now()).unwrap_err();
            assert!(err.to_string().contains(field), "{dataset_type}: {err}");
        }
    }

    #[test]
    fn bad_grpo_is_an_error_never_instruct() {
        let bad = [
            (
                json!({"reward_functions": null}),
                "dataset_type.reward_functions",
            ),
            (
                json!({"reward_functions": []}),
                "dataset_type.reward_functions",
            ),
            (
                json!({"reward_functions": [{"reward_weight": 1}]}),
                "dataset_type.reward_functions[0].reward_func",
            ),
            (
                json!({"reward_functions": [{"reward_func": "f", "reward_weight": -0.1}]}),
                "dataset_type.reward_functions[0].reward_weight",
            ),
            (
                json!({"reward_functions": [{"reward_func": "f", "reward_weight": "1"}]}),
                "dataset_type.reward_functions[0].reward_weight",
            ),
            (json!({"field_chosen": 3}), "dataset_type.field_chosen"),
            (
                json!({"chat_template": ["x"]}),
                "dataset_type.chat_template",
            ),
            (
                json!({"field_instruction": {}}),
                "dataset_type.field_instruction",
            ),
            (json!("instruct"), "dataset_type"),
        ];
        for (dataset_type, field) in bad {
            let err = Job::from_submission(text_job(dataset_type.clone()), now()).unwrap_err();
            assert_eq!(err.field, field, "{dataset_type}: {err}");
        }
    }

    #[test]
    fn submissions_are_validated_field_by_field() {
        let good = text_job(json!({}));
        type Mutation = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("type");
                }),
                "type",
            ),
            (Box::new(|v| v["type"] = json!("AudioJob")), "type"),
            (Box::new(|v| v["model"] = json!("")), "model"),
            (
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("model");
                }),
                "model",
            ),
            (Box::new(|v| v["model"] = json!(7)), "model"),
            (
                Box::new(|v| v["job_id"] = json!("../../etc/passwd")),
                "job_id",
            ),
            (Box::new(|v| v["job_id"] = json!(12)), "job_id"),
            (Box::new(|v| v["status"] = json!("Completed")), "status"),
            (
                Box::new(|v| v["file_format"] = json!("parquet")),
                "file_format",
            ),
            (
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("dataset");
                }),
                "dataset",
            ),
            (
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("dataset_type");
                }),
                "dataset_type",
            ),
            (
                Box::new(|v| v["expected_repo_name"] = json!(false)),
                "expected_repo_name",
            ),
        ];
        for (mutate, field) in cases {
            let mut body = good.clone();
            mutate(&mut body);
            let err = Job::from_submission(body.clone(), now()).unwrap_err();
            assert_eq!(err.field, field, "{body}: {err}");
        }
        assert_eq!(
            Job::from_submission(json!([1]), now()).unwrap_err().field,
            "body"
        );
    }

    #[test]
    fn the_first_problem_reported_is_the_first_in_the_documented_field_order() {
        // Every field below is wrong at once; each round fixes the one reported, which must
        // be the next in the order the job format lists them.
        let mut body = json!({
            "type": 7,
            "job_id": "not-a-uuid",
            "status": "Completed",
            "expected_repo_name": false,
            "dataset_type": null,
            "file_format": "parquet",
        });
        let fixes: Vec<(&str, Value)> = vec![
            ("type", json!("TextJob")),
            ("job_id", json!("123e4567-e89b-12d3-a456-426614174000")),
            ("model", json!("m")),
            ("status", json!("Queued")),
            ("expected_repo_name", json!(null)),
            ("dataset", json!("d")),
            ("dataset_type", json!({"field_instruction": "q"})),
            ("file_format", json!("json")),
        ];
        for (field, fix) in fixes {
            let err = Job::from_submission(body.clone(), now()).unwrap_err();
            assert_eq!(err.field, field, "{body}: {err}");
            body[field] = fix;
        }
        Job::from_submission(body, now()).unwrap();

        let mut image = json!({"type": "DiffusionJob", "model_type": "dalle"});
        for (field, fix) in [("model", json!("m")), ("dataset_zip", json!("z"))] {
            let err = Job::from_submission(image.clone(), now()).unwrap_err();
            assert_eq!(err.field, field, "{image}: {err}");
            image[field] = fix;
        }
        assert_eq!(
            Job::from_submission(image, now()).unwrap_err().field,
            "model_type"
        );
    }

    #[test]
    fn values_a_trainer_cannot_receive_are_refused_at_submission() {
        let nul = "a\u{0}b";
        let long = |n: usize| "x".repeat(n);
        let text = |field: &str, value: Value| {
            let mut body = text_job(json!({}));
            body[field] = value;
            body
        };
        let image = |field: &str, value: &str| {
            let mut body = json!({"type": "DiffusionJob", "model": "m", "dataset_zip": "z"});
            body[field] = json!(value);
            body
        };
        let cases = [
            (text("model", json!(nul)), "model"),
            (text("dataset", json!(nul)), "dataset"),
            (text("expected_repo_name", json!(nul)), "expected_repo_name"),
            (image("dataset_zip", nul), "dataset_zip"),
            (image("model", nul), "model"),
            // "MODEL=" + value + NUL over 128 KiB.
            (text("model", json!(long(MAX_ARG_STRLEN - 6))), "model"),
            (text("dataset", json!(long(MAX_ARG_STRLEN - 8))), "dataset"),
            (
                text(
                    "dataset_type",
                    json!({"field_instruction": long(MAX_ARG_STRLEN)}),
                ),
                "dataset_type",
            ),
            (image("dataset_zip", &long(MAX_ARG_STRLEN)), "dataset_zip"),
        ];
        for (body, field) in cases {
            let err = Job::from_submission(body.clone(), now()).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
        // Exactly at the limit is fine, and so is a NUL written as an escape inside the
        // dataset_type object: its JSON text holds the six characters \u0000.
        Job::from_submission(text("model", json!(long(MAX_ARG_STRLEN - 7))), now()).unwrap();
        Job::from_submission(
            text("dataset_type", json!({"field_instruction": nul})),
            now(),
        )
        .unwrap();
        // A stored job is read as it is: refusing it now would quarantine a file.
        let mut stored = Job::from_submission(text_job(json!({})), now())
            .unwrap()
            .to_json();
        stored["model"] = json!(nul);
        assert_eq!(Job::from_stored(stored).unwrap().model, nul);
    }

    #[test]
    fn diffusion_jobs_default_to_sdxl() {
        let job = Job::from_submission(
            json!({"type": "DiffusionJob", "model": "stabilityai/sdxl", "dataset_zip": "https://x/y.zip"}),
            now(),
        )
        .unwrap();
        assert_eq!(
            job.kind,
            JobKind::Diffusion {
                dataset_zip: "https://x/y.zip".into(),
                model_type: ModelType::Sdxl
            }
        );
        let flux =
            json!({"type": "DiffusionJob", "model": "m", "dataset_zip": "z", "model_type": "flux"});
        assert!(matches!(
            Job::from_submission(flux, now()).unwrap().kind,
            JobKind::Diffusion {
                model_type: ModelType::Flux,
                ..
            }
        ));
        let bad =
            json!({"type": "DiffusionJob", "model": "m", "dataset_zip": "z", "model_type": "sd15"});
        assert_eq!(
            Job::from_submission(bad, now()).unwrap_err().field,
            "model_type"
        );
        let empty = json!({"type": "DiffusionJob", "model": "m", "dataset_zip": " "});
        assert_eq!(
            Job::from_submission(empty, now()).unwrap_err().field,
            "dataset_zip"
        );
    }

    #[test]
    fn submission_sets_server_fields_and_ignores_client_ones() {
        let mut body = text_job(json!({}));
        body["job_id"] = json!("123E4567-E89B-12D3-A456-426614174000");
        body["attempts"] = json!(9);
        body["created_at"] = json!("1999-01-01T00:00:00Z");
        body["error_message"] = json!("x");
        body["status"] = json!("Queued");
        let job = Job::from_submission(body, now()).unwrap();
        assert_eq!(job.id.to_string(), "123e4567-e89b-12d3-a456-426614174000");
        assert_eq!(job.status, Status::Queued);
        assert_eq!(job.attempts, 0);
        assert_eq!(job.created_at, Some(now()));
        assert_eq!(job.error_message, None);
        assert!(job.extra.is_empty(), "{:?}", job.extra);
        let without_id = Job::from_submission(text_job(json!({})), now()).unwrap();
        assert_eq!(without_id.id.as_uuid().get_version_num(), 4);
    }

    #[test]
    fn job_ids_parse_only_the_hyphenated_form() {
        assert!(
            "123e4567-e89b-12d3-a456-426614174000"
                .parse::<JobId>()
                .is_ok()
        );
        for bad in [
            "",
            "123e4567e89b12d3a456426614174000",
            "{123e4567-e89b-12d3-a456-426614174000}",
            "urn:uuid:123e4567-e89b-12d3-a456-426614174000",
            "../../../../../../../../etc/passwd",
            "123e4567-e89b-12d3-a456-42661417400g",
        ] {
            assert_eq!(bad.parse::<JobId>(), Err(InvalidJobId), "{bad}");
        }
    }

    #[test]
    fn transitions_record_attempts_and_times() {
        let mut job = Job::from_submission(text_job(json!({})), now()).unwrap();
        let later = now() + chrono::Duration::seconds(5);
        job.start(later, None);
        assert_eq!(
            (job.status, job.attempts, job.started_at),
            (Status::Running, 1, Some(later))
        );
        job.requeue_interrupted(false, later);
        assert_eq!((job.status, job.attempts), (Status::Queued, 0));
        assert!(job.was_interrupted());
        job.start(later, None);
        job.requeue_interrupted(true, later);
        assert_eq!(job.attempts, 1);
        job.start(later, None);
        job.finish(Status::Failed, Some("exit status 1".into()), later);
        assert_eq!(job.status, Status::Failed);
        assert!(job.status.is_finished());
        assert_eq!(job.finished_at, Some(later));
        assert_eq!(job.attempts, 2);
    }

    #[test]
    fn a_retry_starts_a_finished_job_over_as_a_new_arrival() {
        let mut body = text_job(json!({}));
        body["hours_to_complete"] = json!(2);
        body["gpu_count"] = json!(1);
        body["note"] = json!("kept");
        let mut job = Job::from_submission(body, now()).unwrap();
        job.accept(now());
        let original = job.clone();
        let ran = now() + chrono::Duration::minutes(5);
        job.start(ran, Some(vec![3]));
        job.stages_done.push("download".into());
        job.finish(Status::Failed, Some("exit status 1".into()), ran);

        let later = now() + chrono::Duration::hours(1);
        job.retry(later);
        assert_eq!(job.status, Status::Queued);
        assert_eq!(job.attempts, 0);
        assert_eq!(job.error_message, None);
        assert_eq!((job.started_at, job.finished_at), (None, None));
        assert!(job.stages_done.is_empty());
        assert_eq!(job.gpu_ids, None);
        assert_eq!(
            job.created_at,
            Some(later),
            "a new place at the end of the queue"
        );
        assert_eq!(job.updated_at, Some(later));
        assert_eq!(job.deadline, Some(later + chrono::Duration::hours(2)));
        assert!(
            !job.was_interrupted(),
            "a fresh run does not jump the queue"
        );
        assert!(
            job.same_request(&original),
            "the client's request is unchanged"
        );
        assert_eq!(Job::from_stored(job.to_json()).unwrap(), job);

        for end in [Status::Completed, Status::Cancelled] {
            let mut job = original.clone();
            job.start(ran, None);
            job.finish(end, None, ran);
            job.retry(later);
            assert_eq!((job.status, job.attempts), (Status::Queued, 0));
            job.start(later, None);
            assert_eq!(job.attempts, 1, "the fresh run's first start is attempt 1");
        }
    }

    #[test]
    fn gpu_fields_round_trip_and_only_the_count_is_the_clients() {
        let mut body =
            json!({"type": "DiffusionJob", "model": "m", "dataset_zip": "z", "gpu_count": 2});
        body["gpu_ids"] = json!([7]);
        let mut job = Job::from_submission(body, now()).unwrap();
        assert_eq!((job.gpu_count, job.gpu_ids.clone()), (Some(2), None));
        job.start(now(), Some(vec![0, 1]));
        let back = Job::from_stored(job.to_json()).unwrap();
        assert_eq!(back.gpu_ids, Some(vec![0, 1]));
        assert_eq!(back, job);
        for bad in [json!(-1), json!(1.5), json!("2")] {
            let body =
                json!({"type": "DiffusionJob", "model": "m", "dataset_zip": "z", "gpu_count": bad});
            assert_eq!(
                Job::from_submission(body, now()).unwrap_err().field,
                "gpu_count"
            );
        }
        // Without GPUs nothing about them is written.
        let plain = Job::from_submission(text_job(json!({})), now()).unwrap();
        let out = plain.to_json();
        assert!(
            out.get("gpu_count").is_none() && out.get("gpu_ids").is_none(),
            "{out}"
        );
    }

    #[test]
    fn budget_fixes_a_deadline_at_acceptance_and_stages_round_trip() {
        let body = text_job(json!({}));
        let mut with_budget = body.clone();
        with_budget["hours_to_complete"] = json!(1.5);
        with_budget["deadline"] = json!("1999-01-01T00:00:00Z");
        with_budget["stages_done"] = json!(["download"]);
        with_budget["stages_started"] = json!({"train": "1999-01-01T00:00:00Z"});
        with_budget["trainer_task"] = json!({"task_id": "t", "hotkey": "h", "github_repo": "r"});
        with_budget["wandb_url"] = json!("https://wandb.ai/a/b/runs/c");
        let mut job = Job::from_submission(with_budget, now()).unwrap();
        assert_eq!(job.hours_to_complete, Some(1.5));
        assert_eq!(job.deadline, Some(now() + chrono::Duration::minutes(90)));
        assert!(job.stages_done.is_empty(), "the client cannot claim stages");
        assert!(job.stages_started.is_empty(), "nor their start times");
        assert_eq!(job.trainer_task, None, "nor a trainer task");
        assert_eq!(job.wandb_url, None, "nor what a stage printed");
        assert_eq!(
            job.time_left(now() + chrono::Duration::minutes(30)),
            Some(std::time::Duration::from_secs(3600))
        );
        assert_eq!(
            job.time_left(now() + chrono::Duration::hours(3)),
            Some(std::time::Duration::ZERO)
        );
        job.start(now(), None);
        job.stages_done.push("download".into());
        job.stages_started.push(("train".into(), now()));
        job.trainer_task = Some(TrainerTask {
            task_id: "4f0c8a52-8d1e-4d8a-9b43-0a6f2b1c7d01".into(),
            hotkey: "5Fhk".into(),
            github_repo: "https://github.com/example/miner-trainer".into(),
            github_branch: None,
            github_commit_hash: Some("8631451".into()),
            request: json!({"gpu_ids": [0], "unknown": {"kept": true}}),
        });
        job.wandb_url = Some("https://wandb.ai/team/project/runs/r1".into());
        let back = Job::from_stored(job.to_json()).unwrap();
        assert_eq!(back, job);
        for bad in [json!(0), json!(-2), json!("3"), json!(1e9)] {
            let mut b = body.clone();
            b["hours_to_complete"] = bad;
            assert_eq!(
                Job::from_submission(b, now()).unwrap_err().field,
                "hours_to_complete"
            );
        }
        let plain = Job::from_submission(body, now()).unwrap().to_json();
        for key in [
            "hours_to_complete",
            "deadline",
            "stages_done",
            "stages_started",
            "trainer_task",
            "wandb_url",
        ] {
            assert!(plain.get(key).is_none(), "{key} in {plain}");
        }
    }

    #[test]
    fn same_request_ignores_server_fields_only() {
        let a = Job::from_submission(text_job(json!({})), now()).unwrap();
        let mut b = a.clone();
        b.start(now(), None);
        assert!(a.same_request(&b));
        b.model = "other".into();
        assert!(!a.same_request(&b));
        let mut c = a.clone();
        c.extra.insert("x", &json!(1));
        assert!(!a.same_request(&c));
    }
}
