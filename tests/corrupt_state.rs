//! Corrupt state (CONTRACT.md 6): whatever is wrong in a data dir, the daemon boots, loses no
//! readable job, and sets every damaged file aside in `quarantine/` with a warning naming it.
//!
//! A seeded generator builds a valid data dir (jobs of every type and `dataset_type` shape,
//! in every status, and a consistent `queue.json`), then applies 1 to 4 random damages. The
//! expected outcome is computed from what the generator did, never from replay's code: a job
//! file it left alone must load, one it damaged must move to `quarantine/`; unknown fields
//! and a newer schema are not damage (those files must load and stay as they are).
//!
//! Most cases go through `Store::open`, the daemon's boot path for the data dir, in-process;
//! every 25th (at least 20) boots the real binary on the damaged dir.
//!
//! - `TW_CORRUPT_CASES=N` runs N cases (default 500).
//! - `TW_CORRUPT_CASE=I` runs case I only, in-process and with the binary, to reproduce a
//!   failure; the failure message names the case.

#[allow(dead_code)]
#[path = "e2e_support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "hostile_support/mod.rs"]
mod hostile_support;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::StatusCode;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use hostile_support::{Rng, case_seed};
use support::{SEED_ID, SEED_JOB, Sandbox, Settings, secs};
use training_worker::store::files::Store;

const BASE_SEED: u64 = 0xc022_0975_7a7e_2026;
const DEFAULT_CASES: usize = 500;
/// Every this many cases, one boots the real binary.
const BINARY_EVERY: usize = 25;
const MIN_BINARY_CASES: usize = 20;
/// The daemon's default, which the sandbox's config keeps.
const MAX_ATTEMPTS: u32 = 3;

fn case_count() -> usize {
    std::env::var("TW_CORRUPT_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// The cases to run in-process and the ones to run with the binary.
fn plan() -> (Vec<usize>, Vec<usize>) {
    if let Some(one) = std::env::var("TW_CORRUPT_CASE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return (vec![one], vec![one]);
    }
    let n = case_count();
    let binary_count = (n / BINARY_EVERY).max(MIN_BINARY_CASES);
    (
        (0..n).collect(),
        (0..binary_count).map(|i| i * BINARY_EVERY).collect(),
    )
}

// ---------------------------------------------------------------------------------------
// The generator
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Damage {
    /// A job file cut short at a random length (0 included).
    TruncatedJob,
    /// A zero-length job file.
    EmptyJob,
    /// A job file that is not JSON.
    InvalidJson,
    /// A job file that is JSON with a field of the wrong type or value.
    WrongTypes,
    /// A job file named for one job that holds another.
    DuplicateId,
    /// A job's content under its id in upper case.
    UppercaseName,
    /// Not damage: unknown fields and a newer schema, which must load unchanged.
    UnknownFields,
    QueueTorn,
    QueueMissing,
    QueueNotJson,
    QueueWrongShape,
    QueueNamesMissingFiles,
    QueueNamesTwice,
    QueueNamesFinished,
    /// Not damage: `queue.json` behind the job files (newest jobs absent, interrupted jobs
    /// still listed as running), as after a crash.
    QueueLags,
    /// Leftovers of interrupted writes (`.<name>.tmp`).
    TempFile,
    /// Files in `jobs/` that are not `<job_id>.json`.
    NonJobFile,
    /// Directories in `jobs/`.
    Directory,
}

const DAMAGES: [Damage; 18] = [
    Damage::TruncatedJob,
    Damage::EmptyJob,
    Damage::InvalidJson,
    Damage::WrongTypes,
    Damage::DuplicateId,
    Damage::UppercaseName,
    Damage::UnknownFields,
    Damage::QueueTorn,
    Damage::QueueMissing,
    Damage::QueueNotJson,
    Damage::QueueWrongShape,
    Damage::QueueNamesMissingFiles,
    Damage::QueueNamesTwice,
    Damage::QueueNamesFinished,
    Damage::QueueLags,
    Damage::TempFile,
    Damage::NonJobFile,
    Damage::Directory,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
    /// Queued with a `started_at`: interrupted, runs first.
    Interrupted,
}

const STATES: [State; 6] = [
    State::Queued,
    State::Running,
    State::Completed,
    State::Failed,
    State::Cancelled,
    State::Interrupted,
];

impl State {
    fn finished(self) -> bool {
        matches!(self, State::Completed | State::Failed | State::Cancelled)
    }

    fn name(self) -> &'static str {
        match self {
            State::Queued | State::Interrupted => "Queued",
            State::Running => "Running",
            State::Completed => "Completed",
            State::Failed => "Failed",
            State::Cancelled => "Cancelled",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Instruct,
    Dpo,
    Grpo,
    Chat,
    Sdxl,
    Flux,
}

const SHAPES: [Shape; 6] = [
    Shape::Instruct,
    Shape::Dpo,
    Shape::Grpo,
    Shape::Chat,
    Shape::Sdxl,
    Shape::Flux,
];

impl Shape {
    fn is_text(self) -> bool {
        !matches!(self, Shape::Sdxl | Shape::Flux)
    }
}

/// One job of the generated data dir and what became of its file.
#[derive(Clone, Debug)]
struct JobFile {
    id: String,
    state: State,
    shape: Shape,
    /// Microseconds since the epoch; `None` for the seed's file, which has no additions.
    created: Option<i64>,
    started: Option<i64>,
    attempts: u32,
    /// The file's name in `jobs/`.
    file_name: String,
    /// The file's content as written.
    bytes: Vec<u8>,
    /// Its file was damaged: the job must not load and the file must be quarantined.
    lost: bool,
    /// Unknown fields were added: it must load with them, and its file must stay as it is.
    extended: bool,
}

impl JobFile {
    fn value(&self) -> Value {
        serde_json::from_slice(&self.bytes).expect("an intact job file is JSON")
    }
}

/// Something in the data dir that is not a job's own file.
#[derive(Clone, Debug)]
enum Entry {
    File(Vec<u8>),
    /// A directory with the files inside it.
    Dir(Vec<(String, Vec<u8>)>),
}

#[derive(Clone, Debug)]
enum QueueState {
    Lists {
        running: Vec<String>,
        queued: Vec<String>,
    },
    /// Bytes that are no queue file: it must be quarantined.
    Broken(Vec<u8>),
    Absent,
}

/// A generated data dir, the damages done to it, and what booting it must give.
struct Case {
    index: usize,
    seed: u64,
    jobs: Vec<JobFile>,
    queue: QueueState,
    /// Paths relative to the data dir.
    extra: BTreeMap<String, Entry>,
    damages: Vec<(Damage, String)>,
    /// Relative paths that must be moved to `quarantine/`.
    quarantined: BTreeSet<String>,
    /// Relative paths of temporary files that must be removed.
    temps: BTreeSet<String>,
}

fn format_micros(micros: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(micros)
        .expect("a time in range")
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn dataset_type(shape: Shape, rng: &mut Rng) -> Value {
    match shape {
        Shape::Instruct => json!({
            "system_prompt": "You are a helpful assistant.",
            "system_format": "{system}",
            "field_system": "system",
            "field_instruction": "instruction",
            "field_input": if rng.chance(50) { json!("input") } else { Value::Null },
            "field_output": "output",
            "format": "{system}\n\n{instruction}\n\n{input}",
            "no_input_format": "{system}\n\n{instruction}",
            "field": null,
        }),
        Shape::Dpo => json!({
            "field_prompt": "prompt",
            "field_system": "system",
            "field_chosen": "chosen",
            "field_rejected": "rejected",
            "prompt_format": "{prompt}",
            "chosen_format": "{chosen}",
            "rejected_format": "{rejected}",
        }),
        Shape::Grpo => json!({
            "field_prompt": "prompt",
            "reward_functions": [
                {"reward_func": "def reward_len(completions, **kw):\n    return [len(c) for c in completions]", "reward_weight": 0.7},
                {"reward_func": "def reward_one(completions, **kw):\n    return [1.0] * len(completions)", "reward_weight": 0},
            ],
            "extra_column": if rng.chance(50) { json!("answer") } else { Value::Null },
        }),
        Shape::Chat => json!({
            "chat_template": "chatml",
            "chat_column": "conversations",
            "chat_role_field": "from",
            "chat_content_field": "value",
            "chat_user_reference": "human",
            "chat_assistant_reference": "gpt",
        }),
        Shape::Sdxl | Shape::Flux => unreachable!("a diffusion job has no dataset_type"),
    }
}

/// A job file in the daemon's own format, consistent with its status.
fn make_job(rng: &mut Rng, state: State, shape: Shape, created: i64, started: i64) -> JobFile {
    let id = rng.uuid();
    let started = match state {
        State::Queued => None,
        State::Cancelled if rng.chance(50) => None,
        _ => Some(started),
    };
    let finished = state
        .finished()
        .then(|| started.unwrap_or(created) + 10_000_000 + rng.below(1_000_000) as i64);
    let updated = finished.or(started).unwrap_or(created)
        + if state == State::Interrupted {
            5_000_000
        } else {
            0
        };
    let attempts = match state {
        State::Queued => 0,
        State::Interrupted => rng.between(0, 2) as u32,
        State::Cancelled if started.is_none() => 0,
        _ => rng.between(1, 3) as u32,
    };
    let error_message = match state {
        State::Failed => json!("trainer exited with status 1: CUDA out of memory"),
        State::Cancelled => json!("cancelled by a client"),
        _ => Value::Null,
    };
    let mut object = Map::new();
    object.insert(
        "type".into(),
        json!(if shape.is_text() {
            "TextJob"
        } else {
            "DiffusionJob"
        }),
    );
    object.insert("job_id".into(), json!(id));
    object.insert(
        "model".into(),
        json!(*rng.pick(&[
            "mistralai/Mistral-7B-v0.1",
            "Qwen/Qwen2.5-0.5B",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "black-forest-labs/FLUX.1-dev",
        ])),
    );
    object.insert("status".into(), json!(state.name()));
    object.insert("error_message".into(), error_message);
    object.insert(
        "expected_repo_name".into(),
        if rng.chance(60) {
            json!(format!("repo-{}", rng.below(1000)))
        } else {
            Value::Null
        },
    );
    if shape.is_text() {
        object.insert("dataset".into(), json!("my-dataset.json"));
        object.insert("dataset_type".into(), dataset_type(shape, rng));
        object.insert(
            "file_format".into(),
            json!(*rng.pick(&["csv", "json", "hf", "s3"])),
        );
    } else {
        object.insert(
            "dataset_zip".into(),
            json!("https://example.com/images.zip"),
        );
        object.insert(
            "model_type".into(),
            json!(if shape == Shape::Flux { "flux" } else { "sdxl" }),
        );
    }
    object.insert("attempts".into(), json!(attempts));
    for (key, t) in [
        ("created_at", Some(created)),
        ("updated_at", Some(updated)),
        ("started_at", started),
        ("finished_at", finished),
    ] {
        object.insert(
            key.into(),
            t.map_or(Value::Null, |t| json!(format_micros(t))),
        );
    }
    let value = Value::Object(object);
    // Mostly the daemon's own pretty form; sometimes compact, as another writer might.
    let mut bytes = if rng.chance(80) {
        serde_json::to_vec_pretty(&value).expect("JSON serialises")
    } else {
        serde_json::to_vec(&value).expect("JSON serialises")
    };
    bytes.push(b'\n');
    JobFile {
        file_name: format!("{id}.json"),
        id,
        state,
        shape,
        created: Some(created),
        started,
        attempts,
        bytes,
        lost: false,
        extended: false,
    }
}

/// The bytes of `value` as a job file.
fn pretty(value: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("JSON serialises");
    bytes.push(b'\n');
    bytes
}

fn last_brace(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .rposition(|&b| b == b'}')
        .expect("a JSON object ends with a brace")
}

impl Case {
    fn generate(index: usize) -> Case {
        let seed = case_seed(BASE_SEED, index);
        let mut rng = Rng::new(seed);
        let n = rng.between(6, 10);
        let state_offset = rng.below(STATES.len());
        let shape_offset = rng.below(SHAPES.len());
        let base = (1_600_000_000 + rng.below(100_000_000) as i64) * 1_000_000;
        // Starts happen in an order unrelated to arrival, so that "running first, in the
        // order they started" is distinct from "by created_at".
        let mut start_rank: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut start_rank);
        // Until the defect shown by the_queue_order_after_a_crash_survives_a_graceful_restart
        // and the_seed_job_keeps_its_place_across_a_graceful_restart is fixed, the generated
        // dirs avoid the states that trigger it (they would fail every binary case for that
        // one reason): interrupted jobs started after every Running one, and the seed's file
        // only in a data dir without interrupted jobs.
        let with_seed = rng.chance(15);
        let mut jobs = Vec::new();
        for i in 0..n {
            let mut state = STATES[(state_offset + i) % STATES.len()];
            if with_seed && state == State::Interrupted {
                state = State::Queued;
            }
            let shape = SHAPES[(shape_offset + i * 5) % SHAPES.len()];
            let created = base + i as i64 * 1_000_000 + rng.below(999_999) as i64;
            let later = if state == State::Interrupted {
                100_000_000
            } else {
                0
            };
            let started = base
                + 100_000_000
                + later
                + start_rank[i] as i64 * 1_000_000
                + rng.below(999_999) as i64;
            jobs.push(make_job(&mut rng, state, shape, created, started));
        }
        if with_seed {
            // The seed's example, byte for byte: Running, without the daemon's additions.
            jobs.push(JobFile {
                id: SEED_ID.to_string(),
                state: State::Running,
                shape: Shape::Instruct,
                created: None,
                started: None,
                attempts: 0,
                file_name: format!("{SEED_ID}.json"),
                bytes: SEED_JOB.as_bytes().to_vec(),
                lost: false,
                extended: false,
            });
        }
        let mut case = Case {
            index,
            seed,
            jobs,
            queue: QueueState::Absent,
            extra: BTreeMap::new(),
            damages: Vec::new(),
            quarantined: BTreeSet::new(),
            temps: BTreeSet::new(),
        };
        let order = case.expected_order(false);
        let (running, queued): (Vec<String>, Vec<String>) = order
            .into_iter()
            .partition(|id| case.job(id).state == State::Running);
        case.queue = QueueState::Lists { running, queued };

        let wanted = rng.between(1, 4);
        let mut tries = 0;
        while case.damages.len() < wanted && tries < 100 {
            tries += 1;
            let damage = *rng.pick(&DAMAGES);
            if let Some(what) = case.apply(damage, &mut rng) {
                case.damages.push((damage, what));
            }
        }
        case
    }

    fn job(&self, id: &str) -> &JobFile {
        self.jobs
            .iter()
            .find(|j| j.id == id)
            .expect("a job of the case")
    }

    /// A job whose file is still intact and unchanged.
    fn pick_intact(&self, rng: &mut Rng) -> Option<usize> {
        let intact: Vec<usize> = (0..self.jobs.len())
            .filter(|&i| !self.jobs[i].lost && !self.jobs[i].extended)
            .collect();
        (!intact.is_empty()).then(|| *rng.pick(&intact))
    }

    fn lose(&mut self, i: usize, bytes: Vec<u8>) -> String {
        let job = &mut self.jobs[i];
        job.bytes = bytes;
        job.lost = true;
        self.quarantined.insert(format!("jobs/{}", job.file_name));
        job.file_name.clone()
    }

    fn add_extra(&mut self, path: String, entry: Entry) -> bool {
        if self.extra.contains_key(&path) {
            return false;
        }
        self.extra.insert(path, entry);
        true
    }

    /// A valid job file for a job that is not part of the case.
    fn stranger(rng: &mut Rng) -> (String, Vec<u8>) {
        let job = make_job(rng, State::Queued, Shape::Sdxl, 1_700_000_000_000_000, 0);
        (job.id, job.bytes)
    }

    /// Applies one damage; `None` when it does not fit this case (nothing was changed).
    fn apply(&mut self, damage: Damage, rng: &mut Rng) -> Option<String> {
        match damage {
            Damage::TruncatedJob => {
                let i = self.pick_intact(rng)?;
                let bytes = self.jobs[i].bytes.clone();
                let len = rng.below(last_brace(&bytes));
                let name = self.lose(i, bytes[..len].to_vec());
                Some(format!("jobs/{name} cut to {len} bytes"))
            }
            Damage::EmptyJob => {
                let i = self.pick_intact(rng)?;
                let name = self.lose(i, Vec::new());
                Some(format!("jobs/{name} emptied"))
            }
            Damage::InvalidJson => {
                let i = self.pick_intact(rng)?;
                let mut bytes = self.jobs[i].bytes.clone();
                // Just inside the string value of the first field ("type").
                let in_string = bytes.iter().position(|&b| b == b':').expect("a field") + 3;
                let how = match rng.below(9) {
                    0 => {
                        bytes.extend_from_slice(b"{\"job_id\": 1}");
                        "trailing data"
                    }
                    1 => {
                        let colon = bytes.iter().position(|&b| b == b':').expect("a field");
                        bytes[colon] = b'=';
                        "'=' for ':'"
                    }
                    2 => {
                        bytes.splice(in_string..in_string, [0xff, 0xfe]);
                        "invalid UTF-8 in a string"
                    }
                    3 => {
                        bytes.insert(in_string, 0x01);
                        "a raw control character in a string"
                    }
                    4 => {
                        let len = rng.between(1, 300);
                        bytes = rng.bytes(len);
                        bytes[0] = 0xff;
                        "random binary"
                    }
                    5 => {
                        for b in bytes.iter_mut() {
                            if *b == b'"' {
                                *b = b'\'';
                            }
                        }
                        "single quotes"
                    }
                    6 => {
                        bytes.splice(0..0, *b"\0\0\0\0");
                        "leading NUL bytes"
                    }
                    7 => {
                        bytes.splice(0..0, *b"// a comment\n");
                        "a comment"
                    }
                    _ => {
                        let comma = bytes.iter().position(|&b| b == b',').expect("two fields");
                        bytes.remove(comma);
                        "a missing comma"
                    }
                };
                let name = self.lose(i, bytes);
                Some(format!("jobs/{name}: {how}"))
            }
            Damage::WrongTypes => {
                let i = self.pick_intact(rng)?;
                let mut value = self.jobs[i].value();
                let how = wrong_type(&mut value, self.jobs[i].shape, rng);
                let name = self.lose(i, pretty(&value));
                Some(format!("jobs/{name}: {how}"))
            }
            Damage::DuplicateId => {
                let source = self.pick_intact(rng)?;
                let bytes = self.jobs[source].bytes.clone();
                let source_id = self.jobs[source].id.clone();
                let victim = self.pick_intact(rng).filter(|&v| v != source);
                match victim {
                    Some(v) if rng.chance(50) => {
                        let name = self.lose(v, bytes);
                        Some(format!("jobs/{name} holds job {source_id}"))
                    }
                    _ => {
                        let name = format!("{}.json", rng.uuid());
                        self.add_extra(format!("jobs/{name}"), Entry::File(bytes));
                        self.quarantined.insert(format!("jobs/{name}"));
                        Some(format!("jobs/{name} (new) holds job {source_id}"))
                    }
                }
            }
            Damage::UppercaseName => {
                let i = self.pick_intact(rng)?;
                let upper = format!("{}.json", self.jobs[i].id.to_uppercase());
                if self.extra.contains_key(&format!("jobs/{upper}")) {
                    return None;
                }
                if rng.chance(50) {
                    let bytes = self.jobs[i].bytes.clone();
                    self.add_extra(format!("jobs/{upper}"), Entry::File(bytes));
                    self.quarantined.insert(format!("jobs/{upper}"));
                    Some(format!("jobs/{upper}: a copy beside the lowercase file"))
                } else {
                    self.jobs[i].file_name = upper.clone();
                    let bytes = self.jobs[i].bytes.clone();
                    self.lose(i, bytes);
                    Some(format!("jobs/{upper}: the only file of its job"))
                }
            }
            Damage::UnknownFields => {
                let i = self.pick_intact(rng)?;
                let mut value = self.jobs[i].value();
                let how = add_unknown_fields(&mut value, self.jobs[i].shape, rng);
                let job = &mut self.jobs[i];
                job.bytes = pretty(&value);
                job.extended = true;
                Some(format!("jobs/{}: {how}", job.file_name))
            }
            Damage::QueueTorn => {
                let QueueState::Lists { .. } = &self.queue else {
                    return None;
                };
                let bytes = self.queue_bytes();
                let len = rng.below(last_brace(&bytes));
                self.queue = QueueState::Broken(bytes[..len].to_vec());
                self.quarantined.insert("queue.json".into());
                Some(format!("queue.json cut to {len} bytes"))
            }
            Damage::QueueMissing => {
                let QueueState::Lists { .. } = &self.queue else {
                    return None;
                };
                self.queue = QueueState::Absent;
                Some("queue.json deleted".into())
            }
            Damage::QueueNotJson => {
                let QueueState::Lists { .. } = &self.queue else {
                    return None;
                };
                let bytes = match rng.below(6) {
                    0 => b"garbage".to_vec(),
                    1 => {
                        let len = rng.between(1, 100);
                        let mut b = rng.bytes(len);
                        b[0] = 0xff;
                        b
                    }
                    2 => b"{running: [], queued: []}".to_vec(),
                    3 => b"<queue/>".to_vec(),
                    4 => b"\0\0\0\0".to_vec(),
                    _ => b"running=a,b\n".to_vec(),
                };
                self.queue = QueueState::Broken(bytes.clone());
                self.quarantined.insert("queue.json".into());
                Some(format!(
                    "queue.json not JSON: {:?}",
                    String::from_utf8_lossy(&bytes)
                ))
            }
            Damage::QueueWrongShape => {
                let QueueState::Lists { queued, .. } = &self.queue else {
                    return None;
                };
                let text = match rng.below(8) {
                    0 => "[]".to_string(),
                    1 => "null".to_string(),
                    2 => "{}".to_string(),
                    3 => "42".to_string(),
                    4 => r#"{"running": "x", "queued": []}"#.to_string(),
                    5 => r#"{"running": [1, 2], "queued": []}"#.to_string(),
                    6 => json!({ "queued": queued }).to_string(),
                    _ => r#"{"running": null, "queued": {"a": 1}}"#.to_string(),
                };
                self.queue = QueueState::Broken(text.clone().into_bytes());
                self.quarantined.insert("queue.json".into());
                Some(format!("queue.json wrong shape: {text}"))
            }
            Damage::QueueNamesMissingFiles => {
                let mut names = Vec::new();
                for _ in 0..rng.between(1, 3) {
                    names.push(match rng.below(6) {
                        0 | 1 => rng.uuid(),
                        2 => rng.uuid().to_uppercase(),
                        3 => "not-a-uuid".to_string(),
                        4 => "../../etc/passwd".to_string(),
                        _ => rng.uuid().replace('-', ""),
                    });
                }
                let QueueState::Lists { running, queued } = &mut self.queue else {
                    return None;
                };
                for name in &names {
                    let list = if rng.chance(30) {
                        &mut *running
                    } else {
                        &mut *queued
                    };
                    let at = rng.below(list.len() + 1);
                    list.insert(at, name.clone());
                }
                Some(format!(
                    "queue.json names files that do not exist: {names:?}"
                ))
            }
            Damage::QueueNamesTwice => {
                let QueueState::Lists { running, queued } = &mut self.queue else {
                    return None;
                };
                let all: Vec<(bool, usize)> = (0..running.len())
                    .map(|i| (true, i))
                    .chain((0..queued.len()).map(|i| (false, i)))
                    .collect();
                if all.is_empty() {
                    return None;
                }
                let (in_running, at) = *rng.pick(&all);
                let id = if in_running {
                    running[at].clone()
                } else {
                    queued[at].clone()
                };
                // A second mention, after the first; the first is the one that counts.
                let same_list = rng.chance(50);
                let list = if in_running == same_list {
                    &mut *running
                } else {
                    &mut *queued
                };
                let first = list.iter().position(|x| *x == id).map_or(0, |p| p + 1);
                let at = rng.between(first, list.len());
                list.insert(at, id.clone());
                Some(format!("queue.json names {id} twice"))
            }
            Damage::QueueNamesFinished => {
                let finished: Vec<String> = self
                    .jobs
                    .iter()
                    .filter(|j| j.state.finished())
                    .map(|j| j.id.clone())
                    .collect();
                let QueueState::Lists { running, queued } = &mut self.queue else {
                    return None;
                };
                let id = rng.pick(&finished).clone();
                let list = if rng.chance(50) {
                    &mut *running
                } else {
                    &mut *queued
                };
                let at = rng.below(list.len() + 1);
                list.insert(at, id.clone());
                Some(format!("queue.json names finished job {id}"))
            }
            Damage::QueueLags => {
                // The newest Queued jobs are not listed yet; interrupted ones still listed
                // as running.
                let mut newest: Vec<(i64, String)> = self
                    .jobs
                    .iter()
                    .filter(|j| j.state == State::Queued)
                    .map(|j| (j.created.unwrap_or(0), j.id.clone()))
                    .collect();
                newest.sort();
                let interrupted: Vec<String> = self
                    .jobs
                    .iter()
                    .filter(|j| j.state == State::Interrupted)
                    .map(|j| j.id.clone())
                    .collect();
                let QueueState::Lists { running, queued } = &mut self.queue else {
                    return None;
                };
                let drop_n = rng.between(1, 2).min(newest.len());
                let dropped: Vec<String> = newest[newest.len() - drop_n..]
                    .iter()
                    .map(|(_, id)| id.clone())
                    .collect();
                queued.retain(|id| !dropped.contains(id));
                let moved = rng.chance(50);
                if moved {
                    queued.retain(|id| !interrupted.contains(id));
                    running.extend(interrupted.iter().cloned());
                }
                Some(format!(
                    "queue.json lags: does not list {dropped:?}{}",
                    if moved {
                        "; lists interrupted jobs as running"
                    } else {
                        ""
                    }
                ))
            }
            Damage::TempFile => {
                let (path, entry) = match rng.below(5) {
                    0 => {
                        let job = rng.pick(&self.jobs).clone();
                        let len = rng.below(job.bytes.len() + 1);
                        (
                            format!("jobs/.{}.json.tmp", job.id),
                            job.bytes[..len].to_vec(),
                        )
                    }
                    1 => {
                        // A whole new job that was never renamed into place: never acknowledged,
                        // so it must not appear.
                        let (id, bytes) = Case::stranger(rng);
                        (format!("jobs/.{id}.json.tmp"), bytes)
                    }
                    2 => {
                        let bytes = self.queue_bytes();
                        let len = rng.below(bytes.len() + 1);
                        (".queue.json.tmp".to_string(), bytes[..len].to_vec())
                    }
                    3 => (format!("jobs/.{}.json.tmp", rng.uuid()), Vec::new()),
                    _ => ("jobs/.X.tmp".to_string(), b"leftover".to_vec()),
                };
                if !self.add_extra(path.clone(), Entry::File(entry)) {
                    return None;
                }
                self.temps.insert(path.clone());
                Some(format!("stray temporary file {path}"))
            }
            Damage::NonJobFile => {
                let some_job = rng.pick(&self.jobs).clone();
                let (id, stranger) = Case::stranger(rng);
                let k = rng.below(1000);
                let (name, bytes) = match rng.below(10) {
                    0 => (format!("notes-{k}.txt"), b"remember to buy GPUs\n".to_vec()),
                    1 => ("README".to_string(), b"# jobs\n".to_vec()),
                    2 => (format!("{}.json.bak", some_job.id), some_job.bytes.clone()),
                    3 => (format!("{}.json~", some_job.id), some_job.bytes.clone()),
                    4 => (format!("job-{k}.json"), stranger),
                    5 => (format!(".hidden-{k}"), b"x".to_vec()),
                    6 => (id, stranger),
                    7 => (format!("{}.json", id.replace('-', "")), stranger),
                    8 => (format!("{id}.JSON"), stranger),
                    _ => (format!("{id}.json.tmp"), stranger),
                };
                let path = format!("jobs/{name}");
                if !self.add_extra(path.clone(), Entry::File(bytes)) {
                    return None;
                }
                self.quarantined.insert(path.clone());
                Some(format!("non-job file {path}"))
            }
            Damage::Directory => {
                let (id, stranger) = Case::stranger(rng);
                let k = rng.below(1000);
                let (name, inside) = match rng.below(3) {
                    0 => (
                        format!("subdir-{k}"),
                        vec![(format!("{id}.json"), stranger)],
                    ),
                    1 => (format!("{id}.json"), vec![("x".to_string(), b"x".to_vec())]),
                    _ => (format!("empty-{k}"), Vec::new()),
                };
                let path = format!("jobs/{name}");
                if !self.add_extra(path.clone(), Entry::Dir(inside)) {
                    return None;
                }
                self.quarantined.insert(path.clone());
                Some(format!("directory {path}/"))
            }
        }
    }

    fn queue_bytes(&self) -> Vec<u8> {
        match &self.queue {
            QueueState::Lists { running, queued } => {
                let mut bytes =
                    serde_json::to_vec_pretty(&json!({"running": running, "queued": queued}))
                        .expect("JSON serialises");
                bytes.push(b'\n');
                bytes
            }
            QueueState::Broken(bytes) => bytes.clone(),
            QueueState::Absent => b"{\"running\": [], \"queued\": []}".to_vec(),
        }
    }

    fn write(&self, data_dir: &Path) {
        let jobs_dir = data_dir.join("jobs");
        fs::create_dir_all(&jobs_dir).expect("create jobs/");
        for job in &self.jobs {
            fs::write(jobs_dir.join(&job.file_name), &job.bytes).expect("write a job file");
        }
        for (path, entry) in &self.extra {
            let path = data_dir.join(path);
            match entry {
                Entry::File(bytes) => fs::write(&path, bytes).expect("write a file"),
                Entry::Dir(files) => {
                    fs::create_dir_all(&path).expect("create a directory");
                    for (name, bytes) in files {
                        fs::write(path.join(name), bytes).expect("write a file");
                    }
                }
            }
        }
        if !matches!(self.queue, QueueState::Absent) {
            fs::write(data_dir.join("queue.json"), self.queue_bytes()).expect("write queue.json");
        }
    }

    /// The jobs that must load.
    fn loaded(&self) -> Vec<&JobFile> {
        self.jobs.iter().filter(|j| !j.lost).collect()
    }

    /// The unfinished jobs in the order they run again (CONTRACT.md 6): those that were
    /// running first, by start; then Queued by arrival (the generator keeps `queue.json` in
    /// arrival order). With `boot`, as the worker leaves it: a Running job already started
    /// `max_attempts` times fails instead.
    fn expected_order(&self, boot: bool) -> Vec<String> {
        let live: Vec<&JobFile> = self.jobs.iter().filter(|j| !j.lost).collect();
        let mut running: Vec<&JobFile> = live
            .iter()
            .copied()
            .filter(|j| j.state == State::Running)
            .filter(|j| !boot || j.attempts < MAX_ATTEMPTS)
            .collect();
        running.sort_by_key(|j| (j.started.is_none(), j.started, j.created));
        let mut interrupted: Vec<&JobFile> = live
            .iter()
            .copied()
            .filter(|j| j.state == State::Interrupted)
            .collect();
        interrupted.sort_by_key(|j| j.started);
        let mut queued: Vec<&JobFile> = live
            .iter()
            .copied()
            .filter(|j| j.state == State::Queued)
            .collect();
        queued.sort_by_key(|j| j.created);
        running
            .into_iter()
            .chain(interrupted)
            .chain(queued)
            .map(|j| j.id.clone())
            .collect()
    }

    /// What `queue.json` names that has no loadable job file, as written, first mention only.
    fn expected_missing(&self) -> BTreeSet<String> {
        let QueueState::Lists { running, queued } = &self.queue else {
            return BTreeSet::new();
        };
        let loaded: BTreeSet<&str> = self.loaded().iter().map(|j| j.id.as_str()).collect();
        running
            .iter()
            .chain(queued)
            .filter(|text| {
                let known = text.len() == 36
                    && uuid::Uuid::try_parse(text).is_ok()
                    && loaded.contains(text.to_lowercase().as_str());
                !known
            })
            .cloned()
            .collect()
    }

    fn describe(&self) -> String {
        let mut out = format!(
            "case {} (seed {:#018x}; rerun with TW_CORRUPT_CASE={}):\n",
            self.index, self.seed, self.index
        );
        for job in &self.jobs {
            let _ = writeln!(
                out,
                "  job {} {:?} {:?} attempts={} file={}{}{}",
                job.id,
                job.state,
                job.shape,
                job.attempts,
                job.file_name,
                if job.lost { " LOST" } else { "" },
                if job.extended { " EXTENDED" } else { "" }
            );
        }
        for (damage, what) in &self.damages {
            let _ = writeln!(out, "  damage {damage:?}: {what}");
        }
        out
    }
}

fn wrong_type(value: &mut Value, shape: Shape, rng: &mut Rng) -> String {
    let object = value.as_object_mut().expect("a job is an object");
    let mut generic: Vec<(&str, Value)> = vec![
        ("model", json!(1)),
        ("model", json!("")),
        ("model", json!("   ")),
        ("status", json!("Bogus")),
        ("status", json!("queued")),
        ("status", json!(null)),
        ("attempts", json!(-1)),
        ("attempts", json!(4_294_967_296u64)),
        ("attempts", json!("2")),
        ("attempts", json!(1.5)),
        ("created_at", json!("yesterday")),
        ("updated_at", json!("2026-13-45T99:00:00Z")),
        ("started_at", json!(12)),
        ("finished_at", json!(true)),
        ("job_id", json!(42)),
        ("job_id", json!("not-a-uuid")),
        ("type", json!("AudioJob")),
        ("type", json!(["TextJob"])),
        ("error_message", json!(3)),
        ("expected_repo_name", json!(false)),
    ];
    if shape.is_text() {
        generic.extend([
            ("dataset", json!(null)),
            ("dataset", json!(7)),
            ("dataset_type", json!("instruct")),
            ("dataset_type", json!(null)),
            ("file_format", json!("parquet")),
        ]);
    } else {
        generic.extend([
            ("dataset_zip", json!("")),
            ("model_type", json!("sd15")),
            ("model_type", json!(1)),
        ]);
    }
    let choice = rng.below(generic.len() + 5);
    if choice < generic.len() {
        let (key, bad) = generic.swap_remove(choice);
        let text = format!("{key}: {bad}");
        object.insert(key.to_string(), bad);
        return text;
    }
    match choice - generic.len() {
        0 => {
            let key = *rng.pick(&["type", "job_id", "model", "status"]);
            object.remove(key);
            format!("{key} removed")
        }
        1 if shape.is_text() => {
            let dt = object["dataset_type"]
                .as_object_mut()
                .expect("dataset_type is an object");
            let (key, bad) = match shape {
                Shape::Instruct => ("field_instruction", json!({})),
                Shape::Dpo => ("field_chosen", json!(3)),
                Shape::Grpo => ("reward_functions", json!([])),
                _ => ("chat_template", json!(["x"])),
            };
            dt.insert(key.into(), bad.clone());
            format!("dataset_type.{key}: {bad}")
        }
        2 if shape == Shape::Grpo => {
            object["dataset_type"]["reward_functions"][0]["reward_weight"] = json!(-1);
            "reward_weight: -1".into()
        }
        2 if shape.is_text() => {
            object.remove("dataset_type");
            "dataset_type removed".into()
        }
        _ => {
            let top = rng
                .pick(&[json!([]), json!(null), json!("job"), json!(1)])
                .clone();
            let text = format!("the whole file is {top}");
            *value = top;
            text
        }
    }
}

/// Adds fields this version does not know, as a newer daemon or client would write them.
fn add_unknown_fields(value: &mut Value, shape: Shape, rng: &mut Rng) -> String {
    let candidates = [
        ("schema_version", "99"),
        ("hours_to_complete", "3"),
        (
            "future",
            r#"{"nested": [1, 2.50, "x", null], "big": 123456789012345678901234567890, "tiny": 1e-400}"#,
        ),
        ("tags", r#"["a", "b"]"#),
        ("priority", "null"),
        ("note", r#""žluťoučký kůň \u0000 🚀""#),
    ];
    let object = value.as_object_mut().expect("a job is an object");
    let mut added = Vec::new();
    for (key, text) in candidates {
        if rng.chance(50) || (added.is_empty() && key == "note") {
            object.insert(
                key.into(),
                serde_json::from_str(text).expect("valid JSON text"),
            );
            added.push(key.to_string());
        }
    }
    if shape.is_text() && rng.chance(70) {
        let dt = object["dataset_type"]
            .as_object_mut()
            .expect("dataset_type is an object");
        dt.insert(
            "x_tokenizer".into(),
            serde_json::from_str(r#"{"pad": true, "max_len": 4096, "ratio": 0.50}"#)
                .expect("valid JSON text"),
        );
        added.push("dataset_type.x_tokenizer".into());
        if shape == Shape::Grpo {
            object["dataset_type"]["reward_functions"][0]["func_hash"] = json!("abc123");
            added.push("dataset_type.reward_functions[0].func_hash".into());
        }
    }
    format!("unknown fields {added:?}")
}

// ---------------------------------------------------------------------------------------
// Checking a booted case
// ---------------------------------------------------------------------------------------

/// Names of the entries of a directory (empty when it does not exist).
fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The files a boot must leave: every loaded job's file as the generator wrote it (the
/// store does not rewrite job files), one quarantine entry per damaged file with its
/// content, no temporary file, and nothing else.
fn check_files(case: &Case, data_dir: &Path, rewritten: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    let expected_jobs: BTreeSet<String> = case
        .loaded()
        .iter()
        .map(|j| format!("{}.json", j.id))
        .collect();
    let found_jobs = names(&data_dir.join("jobs"));
    if found_jobs != expected_jobs {
        problems.push(format!(
            "jobs/ holds {:?}, expected {:?}",
            found_jobs.difference(&expected_jobs).collect::<Vec<_>>(),
            expected_jobs.difference(&found_jobs).collect::<Vec<_>>()
        ));
    }
    for job in case.loaded() {
        let path = data_dir.join("jobs").join(format!("{}.json", job.id));
        let Ok(bytes) = fs::read(&path) else {
            continue;
        };
        if rewritten.contains(&job.id) {
            // The daemon rewrote it (a Running job requeued or failed): its fields, unknown
            // ones included, must survive.
            let now: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            for (key, v) in job.value().as_object().expect("an object") {
                let changes = [
                    "status",
                    "updated_at",
                    "finished_at",
                    "error_message",
                    "attempts",
                ];
                if !changes.contains(&key.as_str()) && now.get(key) != Some(v) {
                    problems.push(format!(
                        "jobs/{}.json: {key} was {v}, is now {:?}",
                        job.id,
                        now.get(key)
                    ));
                }
            }
        } else if bytes != job.bytes {
            problems.push(format!(
                "jobs/{}.json changed:\n{}",
                job.id,
                String::from_utf8_lossy(&bytes)
            ));
        }
    }

    let quarantine = data_dir.join("quarantine");
    let entries = names(&quarantine);
    if entries.len() != case.quarantined.len() {
        problems.push(format!(
            "quarantine/ holds {} entries {entries:?}, expected {} ({:?})",
            entries.len(),
            case.quarantined.len(),
            case.quarantined
        ));
    }
    for rel in &case.quarantined {
        let name = rel.rsplit('/').next().expect("a name");
        let suffix = format!("-{name}");
        let Some(entry) = entries.iter().find(|e| e.ends_with(&suffix)) else {
            problems.push(format!("{rel} is not in quarantine/ ({entries:?})"));
            continue;
        };
        if rel != "queue.json" && data_dir.join(rel).exists() {
            problems.push(format!("{rel} is still in place"));
        }
        let moved = quarantine.join(entry);
        let expected = if rel == "queue.json" {
            Some(Entry::File(case.queue_bytes()))
        } else if let Some(e) = case.extra.get(rel) {
            Some(e.clone())
        } else {
            case.jobs
                .iter()
                .find(|j| format!("jobs/{}", j.file_name) == *rel)
                .map(|j| Entry::File(j.bytes.clone()))
        };
        match expected {
            Some(Entry::File(bytes)) => {
                if fs::read(&moved).ok() != Some(bytes) {
                    problems.push(format!("quarantine/{entry} does not hold what {rel} held"));
                }
            }
            Some(Entry::Dir(files)) => {
                let inside = names(&moved);
                let wanted: BTreeSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
                if !moved.is_dir() || inside != wanted {
                    problems.push(format!("quarantine/{entry} is not the directory {rel}"));
                }
            }
            None => problems.push(format!("the generator lost track of {rel}")),
        }
    }

    for dir in [data_dir.to_path_buf(), data_dir.join("jobs")] {
        for name in names(&dir) {
            if name.starts_with('.') && name.ends_with(".tmp") {
                problems.push(format!("temporary file {} left", dir.join(name).display()));
            }
        }
    }
    problems
}

/// Each quarantined file is named by a warning.
fn check_warnings(case: &Case, log: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for rel in &case.quarantined {
        let needle = format!("/{rel} ");
        let named = log
            .lines()
            .any(|l| l.contains("WARN") && l.contains("quarantine") && l.contains(&needle));
        if !named {
            problems.push(format!("no warning names {rel}"));
        }
    }
    for id in case.expected_missing() {
        let named = log
            .lines()
            .any(|l| l.contains("WARN") && l.contains(&format!("job_id={id}")));
        if !named {
            problems.push(format!(
                "no warning names {id:?}, listed without a job file"
            ));
        }
    }
    problems
}

/// The ids `queue.json` lists, running then queued.
fn queue_file_ids(data_dir: &Path) -> Result<Vec<String>, String> {
    let bytes = fs::read(data_dir.join("queue.json")).map_err(|e| format!("queue.json: {e}"))?;
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("queue.json is not JSON: {e}"))?;
    let mut ids = Vec::new();
    for key in ["running", "queued"] {
        let list = value[key]
            .as_array()
            .ok_or_else(|| format!("queue.json has no {key} list: {value}"))?;
        for id in list {
            ids.push(
                id.as_str()
                    .ok_or_else(|| format!("queue.json: {id} is not a string"))?
                    .to_string(),
            );
        }
    }
    Ok(ids)
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .expect("the log buffer is not poisoned")
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Boots `case` through `Store::open` with its log captured; the problems found.
fn run_in_process(case: &Case) -> Vec<String> {
    let root = tempfile::Builder::new()
        .prefix("tw-corrupt-")
        .tempdir()
        .expect("create a temp dir");
    let data_dir = root.path().join("data");
    case.write(&data_dir);

    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let log = log.clone();
            move || log.clone()
        })
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let opened = tracing::subscriber::with_default(subscriber, || {
        Store::open(&data_dir, CancellationToken::new())
    });
    let opened = match opened {
        Ok(opened) => opened,
        Err(e) => return vec![format!("Store::open failed: {e}")],
    };
    let log_text = String::from_utf8_lossy(&log.0.lock().expect("not poisoned")).into_owned();
    let mut problems = Vec::new();
    let recovered = &opened.recovered;

    let expected: BTreeMap<String, &JobFile> = case
        .loaded()
        .into_iter()
        .map(|j| (j.id.clone(), j))
        .collect();
    let got: BTreeSet<String> = recovered.jobs.iter().map(|j| j.id.to_string()).collect();
    let lost: Vec<&String> = expected.keys().filter(|id| !got.contains(*id)).collect();
    if !lost.is_empty() {
        problems.push(format!("readable jobs lost: {lost:?}"));
    }
    let wrong: Vec<&String> = got
        .iter()
        .filter(|id| !expected.contains_key(*id))
        .collect();
    if !wrong.is_empty() {
        problems.push(format!(
            "jobs loaded from damaged or foreign files: {wrong:?}"
        ));
    }
    for job in &recovered.jobs {
        let Some(file) = expected.get(&job.id.to_string()) else {
            continue;
        };
        // Every field of the file, unknown ones included, comes back with the same value.
        let out = job.to_json();
        for (key, v) in file.value().as_object().expect("an object") {
            if out.get(key) != Some(v) {
                problems.push(format!(
                    "job {}: field {key} is {:?}, the file says {v}",
                    job.id,
                    out.get(key)
                ));
            }
        }
        if job.status.as_str() != file.state.name() {
            problems.push(format!("job {} loaded as {}", job.id, job.status));
        }
    }

    let order: Vec<String> = recovered.order.iter().map(|id| id.to_string()).collect();
    let expected_order = case.expected_order(false);
    if order != expected_order {
        problems.push(format!(
            "requeue order {order:?}, expected {expected_order:?}"
        ));
    }
    let damaged: BTreeSet<String> = recovered
        .damaged
        .iter()
        .map(|d| {
            d.path
                .strip_prefix(&data_dir)
                .unwrap_or(&d.path)
                .display()
                .to_string()
        })
        .collect();
    if damaged != case.quarantined {
        problems.push(format!(
            "reported damaged {damaged:?}, expected {:?}",
            case.quarantined
        ));
    }
    let missing: BTreeSet<String> = recovered.missing.iter().cloned().collect();
    if missing != case.expected_missing() {
        problems.push(format!(
            "reported missing {missing:?}, expected {:?}",
            case.expected_missing()
        ));
    }
    let temps: BTreeSet<String> = recovered
        .temp_files
        .iter()
        .map(|p| p.strip_prefix(&data_dir).unwrap_or(p).display().to_string())
        .collect();
    if temps != case.temps {
        problems.push(format!(
            "reported temporary files {temps:?}, expected {:?}",
            case.temps
        ));
    }
    problems.extend(check_files(case, &data_dir, &BTreeSet::new()));
    problems.extend(check_warnings(case, &log_text));
    match queue_file_ids(&data_dir) {
        Ok(ids) if ids == expected_order => {}
        Ok(ids) => problems.push(format!(
            "queue.json lists {ids:?}, expected {expected_order:?}"
        )),
        Err(e) => problems.push(e),
    }

    drop(opened.handle);
    if opened.thread.join().is_err() {
        problems.push("the store thread panicked".into());
    }
    match training_worker::check::check(&data_dir) {
        Ok(report) if report.is_clean() => {}
        Ok(report) => problems.push(format!(
            "check is not clean after the boot:\n{}",
            report.render(&data_dir)
        )),
        Err(e) => problems.push(format!("check failed: {e}")),
    }
    problems
}

#[test]
fn generated_damaged_data_dirs_boot_in_process_losing_no_readable_job() {
    let (cases, _) = plan();
    let started = Instant::now();
    let mut by_kind: BTreeMap<Damage, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut jobs = 0;
    let mut quarantined = 0;
    for &index in &cases {
        let case = Case::generate(index);
        for (damage, _) in &case.damages {
            *by_kind.entry(*damage).or_default() += 1;
        }
        jobs += case.jobs.len();
        quarantined += case.quarantined.len();
        let problems = run_in_process(&case);
        if !problems.is_empty() {
            failures.push(format!(
                "{}  => {}",
                case.describe(),
                problems.join("\n  => ")
            ));
        }
    }
    eprintln!(
        "corrupt_state (in-process): {} cases, {jobs} jobs, {} damages, {quarantined} files quarantined, {:.1?}",
        cases.len(),
        by_kind.values().sum::<usize>(),
        started.elapsed()
    );
    for (damage, n) in &by_kind {
        eprintln!("  {damage:?}: {n}");
    }
    if cases.len() >= DEFAULT_CASES {
        for damage in DAMAGES {
            assert!(
                by_kind.get(&damage).copied().unwrap_or(0) > 0,
                "no case exercised {damage:?}"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Prints the case when the test panics with it in hand.
struct Describe<'a>(&'a Case);

impl Drop for Describe<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.0.describe());
        }
    }
}

async fn run_binary(case: &Case) {
    let _describe = Describe(case);
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings {
        max_concurrent: 0,
        max_attempts: MAX_ATTEMPTS,
        ..Settings::default()
    });
    case.write(&sandbox.data_dir());
    let daemon = sandbox.start().await;

    // The queue: everything unfinished, as the worker leaves it after boot.
    let expected_order = case.expected_order(true);
    assert_eq!(
        daemon.queue().await,
        (vec![], expected_order.clone()),
        "GET /v1/queue"
    );
    let mut rewritten = BTreeSet::new();
    for file in case.loaded() {
        let job = daemon.job(&file.id).await;
        for (key, v) in file.value().as_object().expect("an object") {
            let may_change = file.state == State::Running
                && ["status", "updated_at", "finished_at", "error_message"].contains(&key.as_str());
            if !may_change {
                assert_eq!(&job[key], v, "field {key} of job {}: {job}", file.id);
            }
        }
        if file.state == State::Running {
            rewritten.insert(file.id.clone());
            let status = if file.attempts >= MAX_ATTEMPTS {
                "Failed"
            } else {
                "Queued"
            };
            assert_eq!(job["status"], status, "{job}");
        }
    }
    let loaded: BTreeSet<&str> = case.loaded().iter().map(|j| j.id.as_str()).collect();
    for file in case.jobs.iter().filter(|j| j.lost) {
        if !loaded.contains(file.id.as_str()) {
            let reply = daemon.get(&format!("/v1/jobs/{}", file.id)).await;
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "{}: {reply:?}",
                file.id
            );
        }
    }
    let problems = check_warnings(case, &daemon.stderr());
    assert!(problems.is_empty(), "{problems:?}");

    // Unknown fields survive the daemon's own rewrite of a job file: cancel the unfinished
    // jobs that carry them.
    let mut expected_order = expected_order;
    for file in case.loaded() {
        if file.extended && expected_order.contains(&file.id) {
            let reply = daemon.cancel(&file.id).await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "cancel {}: {reply:?}",
                file.id
            );
            let job = reply.json();
            assert_eq!(job["status"], "Cancelled", "{job}");
            for (key, v) in file.value().as_object().expect("an object") {
                let changes = ["status", "updated_at", "finished_at", "error_message"];
                if !changes.contains(&key.as_str()) {
                    assert_eq!(&job[key], v, "field {key} of cancelled job {}", file.id);
                }
            }
            rewritten.insert(file.id.clone());
            expected_order.retain(|id| *id != file.id);
        }
    }

    let (status, _) = daemon.terminate(secs(15)).await;
    assert_eq!(status.code(), Some(0), "graceful stop");
    let problems = check_files(case, &sandbox.data_dir(), &rewritten);
    assert!(problems.is_empty(), "{problems:#?}");
    let ids = queue_file_ids(&sandbox.data_dir()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ids, expected_order, "queue.json after the stop");
    let check = Command::new(env!("CARGO_BIN_EXE_training-worker"))
        .arg("check")
        .arg("--data-dir")
        .arg(sandbox.data_dir())
        .env_remove("TRAINING_WORKER_DATA_DIR")
        .output()
        .expect("run training-worker check");
    assert!(
        check.status.success(),
        "training-worker check after the stop: {}\n{}{}",
        check.status,
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_damaged_data_dirs_boot_the_real_binary() {
    let (_, cases) = plan();
    let started = Instant::now();
    let mut quarantined = 0;
    let mut extended = 0;
    for &index in &cases {
        let case = Case::generate(index);
        quarantined += case.quarantined.len();
        extended += case.loaded().iter().filter(|j| j.extended).count();
        run_binary(&case).await;
    }
    eprintln!(
        "corrupt_state (binary): {} cases booted, {quarantined} files quarantined, {extended} jobs with unknown fields, {:.1?}",
        cases.len(),
        started.elapsed()
    );
}

/// Boots `files` (paused), stops gracefully, boots again: the queue must be the same both
/// times, since nothing ran in between. Returns the first queue.
async fn queue_after_two_boots(files: &[(String, Vec<u8>)]) -> Vec<String> {
    let sandbox = Sandbox::new();
    sandbox.configure(&Settings {
        max_concurrent: 0,
        ..Settings::default()
    });
    for (name, bytes) in files {
        sandbox.write_data_file(&format!("jobs/{name}"), bytes);
    }
    let daemon = sandbox.start().await;
    let first = daemon.queue().await;
    let (status, _) = daemon.terminate(secs(15)).await;
    assert_eq!(status.code(), Some(0), "graceful stop");
    let daemon = sandbox.start().await;
    let second = daemon.queue().await;
    assert_eq!(
        second, first,
        "a graceful restart with nothing started in between reordered the queue (first boot, then second)"
    );
    first.1
}

/// A job file with one start, so that it is not out of attempts.
fn once_started(job: &JobFile) -> (String, Vec<u8>) {
    let mut value = job.value();
    value["attempts"] = json!(1);
    (job.file_name.clone(), pretty(&value))
}

/// Found by this suite: a job Running at a crash went first at the next boot, ahead of a job
/// interrupted earlier; that boot wrote it back as Queued with its `started_at`, and the boot
/// after ordered interrupted jobs by `started_at`, so a plain restart swapped them. Both were
/// running once, so both lead the queue in the order they started, at every boot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_order_after_a_crash_survives_a_graceful_restart() {
    let mut rng = Rng::new(7);
    let base = 1_700_000_000_000_000;
    // B was cut by a graceful stop (Queued with started_at); A, started after it, was
    // running when the daemon crashed.
    let b = make_job(
        &mut rng,
        State::Interrupted,
        Shape::Sdxl,
        base,
        base + 10_000_000,
    );
    let a = make_job(
        &mut rng,
        State::Running,
        Shape::Sdxl,
        base + 1_000_000,
        base + 20_000_000,
    );
    let first = queue_after_two_boots(&[once_started(&a), once_started(&b)]).await;
    assert_eq!(
        first,
        vec![b.id, a.id],
        "jobs that were running go first, by start"
    );
}

/// The same with the seed's job file: Running without `started_at`, so its start time is
/// unknown; it goes after the jobs whose start is known, and stays there at the next boot
/// (written back as Queued, it keeps its place in `queue.json`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_job_keeps_its_place_across_a_graceful_restart() {
    let mut rng = Rng::new(8);
    let base = 1_700_000_000_000_000;
    let b = make_job(
        &mut rng,
        State::Interrupted,
        Shape::Flux,
        base,
        base + 10_000_000,
    );
    let seed = (format!("{SEED_ID}.json"), SEED_JOB.as_bytes().to_vec());
    let first = queue_after_two_boots(&[seed, once_started(&b)]).await;
    assert_eq!(
        first,
        vec![b.id, SEED_ID.to_string()],
        "a known start goes before an unknown one"
    );
}

/// A data dir with one readable job, for the targeted cases below.
fn one_job_dir() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let root = tempfile::Builder::new()
        .prefix("tw-corrupt-")
        .tempdir()
        .expect("create a temp dir");
    let data_dir = root.path().join("data");
    let mut rng = Rng::new(9);
    let job = make_job(
        &mut rng,
        State::Queued,
        Shape::Dpo,
        1_700_000_000_000_000,
        0,
    );
    fs::create_dir_all(data_dir.join("jobs")).expect("create jobs/");
    fs::write(data_dir.join("jobs").join(&job.file_name), &job.bytes).expect("write a job");
    (root, data_dir, job.id)
}

/// DEFECT (found by this suite): a FIFO named like a job file makes replay block forever in
/// `read`, so the daemon never becomes ready (`/readyz` stays 503). Any file that cannot be
/// read must be quarantined, not waited on.
#[test]
fn a_fifo_named_like_a_job_file_does_not_hang_the_boot() {
    let (_root, data_dir, id) = one_job_dir();
    let fifo = data_dir
        .join("jobs")
        .join("12345678-1234-4234-8234-123456789abc.json");
    let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: mkfifo reads a NUL-terminated path and creates a file; nothing else.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "mkfifo");

    let (answer, opened) = std::sync::mpsc::channel();
    let dir = data_dir.clone();
    let boot = std::thread::spawn(move || {
        let result = Store::open(&dir, CancellationToken::new()).map(|opened| {
            let loaded: Vec<String> = opened
                .recovered
                .jobs
                .iter()
                .map(|j| j.id.to_string())
                .collect();
            (loaded, opened.recovered.damaged.len())
        });
        let _ = answer.send(result.map_err(|e| e.to_string()));
    });
    let outcome = opened.recv_timeout(secs(5));
    if outcome.is_err() {
        // Give the blocked reader an end of file so that its thread can finish.
        use std::os::unix::fs::OpenOptionsExt;
        let _ = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo);
        let _ = boot.join();
        panic!(
            "Store::open (the daemon's boot) is still blocked reading the FIFO {fifo:?} after 5 s"
        );
    }
    let (loaded, damaged) = outcome.expect("answered").expect("Store::open succeeds");
    assert_eq!(loaded, vec![id], "the readable job loads");
    assert_eq!(damaged, 1, "the FIFO is set aside");
}

/// DEFECT (found by this suite): a directory named like a temporary file stops the boot:
/// `data/.queue.json.tmp/` makes `Store::open` fail ("cannot write .../.queue.json.tmp: Is a
/// directory"), and the daemon exits 74 at every start. One in `jobs/` (`.x.tmp/`) does not
/// stop it, but stays behind, and `check` reports it at every run.
#[test]
fn directories_named_like_temporary_files_neither_stop_the_boot_nor_stay() {
    let (_root, data_dir, id) = one_job_dir();
    fs::create_dir_all(data_dir.join(".queue.json.tmp")).expect("create a directory");
    fs::create_dir_all(data_dir.join("jobs").join(".x.tmp")).expect("create a directory");
    let opened = match Store::open(&data_dir, CancellationToken::new()) {
        Ok(opened) => opened,
        Err(e) => panic!("the boot failed on a directory named like a temporary file: {e}"),
    };
    let loaded: Vec<String> = opened
        .recovered
        .jobs
        .iter()
        .map(|j| j.id.to_string())
        .collect();
    assert_eq!(loaded, vec![id]);
    drop(opened.handle);
    opened.thread.join().expect("the store thread ends");
    let report = training_worker::check::check(&data_dir).expect("check reads the dir");
    assert!(
        report.is_clean(),
        "check after the boot:\n{}",
        report.render(&data_dir)
    );
}
