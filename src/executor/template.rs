//! Argument templates: the `{job_id}`-style placeholders of `[[executor.stages]]` and of
//! the single `executor.command`.
//!
//! A template is parsed once, when the configuration loads, so an unknown placeholder or a
//! stray brace is a configuration error at start and never a failed job hours later.
//! Rendering is a plain substitution: each placeholder becomes exactly one piece of text
//! inside the same argv entry, so a value with spaces or quotes stays one argument and no
//! shell ever sees it.

use std::fmt;

use crate::job::{DatasetShape, Job, JobKind};

/// The values a template may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placeholder {
    JobId,
    Model,
    Dataset,
    DatasetTypeJson,
    FileFormat,
    TaskType,
    ExpectedRepoName,
    HoursToComplete,
    GpuIds,
    DataDir,
    DatasetZip,
    ModelType,
    Attempt,
    Stage,
    TaskId,
    Hotkey,
    GithubRepo,
    GithubCommitHash,
    GithubBranch,
}

impl Placeholder {
    pub const ALL: [Placeholder; 19] = [
        Placeholder::JobId,
        Placeholder::Model,
        Placeholder::Dataset,
        Placeholder::DatasetTypeJson,
        Placeholder::FileFormat,
        Placeholder::TaskType,
        Placeholder::ExpectedRepoName,
        Placeholder::HoursToComplete,
        Placeholder::GpuIds,
        Placeholder::DataDir,
        Placeholder::DatasetZip,
        Placeholder::ModelType,
        Placeholder::Attempt,
        Placeholder::Stage,
        Placeholder::TaskId,
        Placeholder::Hotkey,
        Placeholder::GithubRepo,
        Placeholder::GithubCommitHash,
        Placeholder::GithubBranch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Placeholder::JobId => "job_id",
            Placeholder::Model => "model",
            Placeholder::Dataset => "dataset",
            Placeholder::DatasetTypeJson => "dataset_type_json",
            Placeholder::FileFormat => "file_format",
            Placeholder::TaskType => "task_type",
            Placeholder::ExpectedRepoName => "expected_repo_name",
            Placeholder::HoursToComplete => "hours_to_complete",
            Placeholder::GpuIds => "gpu_ids",
            Placeholder::DataDir => "data_dir",
            Placeholder::DatasetZip => "dataset_zip",
            Placeholder::ModelType => "model_type",
            Placeholder::Attempt => "attempt",
            Placeholder::Stage => "stage",
            Placeholder::TaskId => "task_id",
            Placeholder::Hotkey => "hotkey",
            Placeholder::GithubRepo => "github_repo",
            Placeholder::GithubCommitHash => "github_commit_hash",
            Placeholder::GithubBranch => "github_branch",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Value(Placeholder),
}

/// One argv entry (or volume, or environment value) with its placeholders.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// A template that does not parse; the message names the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(String);

impl Template {
    /// Parses `{name}` placeholders; `{{` and `}}` are literal braces.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(TemplateError(format!(
                                    "{text:?}: unclosed \"{{\" (write \"{{{{\" for a literal brace)"
                                )));
                            }
                        }
                    }
                    let placeholder = Placeholder::ALL
                        .into_iter()
                        .find(|p| p.name() == name)
                        .ok_or_else(|| {
                            let known: Vec<&str> =
                                Placeholder::ALL.iter().map(|p| p.name()).collect();
                            TemplateError(format!(
                                "{text:?}: unknown placeholder {{{name}}}; known: {}",
                                known.join(", ")
                            ))
                        })?;
                    if !literal.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Value(placeholder));
                }
                '}' => {
                    return Err(TemplateError(format!(
                        "{text:?}: stray \"}}\" (write \"}}}}\" for a literal brace)"
                    )));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Template { pieces })
    }

    /// A template that is exactly `text`, braces and all (a process's program path).
    pub fn literal(text: &str) -> Template {
        Template {
            pieces: vec![Piece::Text(text.to_string())],
        }
    }

    /// Whether the template names no value at all.
    pub fn is_literal(&self) -> bool {
        self.pieces.iter().all(|p| matches!(p, Piece::Text(_)))
    }

    pub fn render(&self, values: &Values) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Value(p) => out.push_str(values.get(*p)),
            }
        }
        out
    }
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => text.push_str(&t.replace('{', "{{").replace('}', "}}")),
                Piece::Value(p) => {
                    text.push('{');
                    text.push_str(p.name());
                    text.push('}');
                }
            }
        }
        write!(f, "{text:?}")
    }
}

/// The G.O.D task type a job is: what its trainer's `--task-type` expects.
pub fn task_type(job: &Job) -> &'static str {
    match &job.kind {
        JobKind::Text { dataset_type, .. } => match dataset_type.shape() {
            DatasetShape::Instruct => "InstructTextTask",
            DatasetShape::Dpo => "DpoTask",
            DatasetShape::Grpo => "GrpoTask",
            DatasetShape::ChatTemplate => "ChatTask",
            DatasetShape::Environment => "EnvTask",
        },
        JobKind::Diffusion { .. } => "ImageTask",
    }
}

/// The fields of a job's kind as text, empty where the kind has none: what both the
/// placeholders and the trainer's environment give.
pub struct KindFields<'a> {
    pub dataset: &'a str,
    /// The `dataset_type` object as compact JSON text.
    pub dataset_type: &'a str,
    pub file_format: &'a str,
    pub dataset_zip: &'a str,
    pub model_type: &'a str,
}

impl KindFields<'_> {
    pub fn of(job: &Job) -> KindFields<'_> {
        match &job.kind {
            JobKind::Text {
                dataset,
                dataset_type,
                file_format,
            } => KindFields {
                dataset,
                dataset_type: dataset_type.as_json_text(),
                file_format: file_format.as_str(),
                dataset_zip: "",
                model_type: "",
            },
            JobKind::Diffusion {
                dataset_zip,
                model_type,
            } => KindFields {
                dataset: "",
                dataset_type: "",
                file_format: "",
                dataset_zip,
                model_type: model_type.as_str(),
            },
        }
    }
}

/// A G.O.D trainer task's fields as text, empty for a job of the main API: what both the
/// placeholders and the trainer's environment give.
pub struct TaskFields<'a> {
    pub task_id: &'a str,
    pub hotkey: &'a str,
    pub github_repo: &'a str,
    pub github_commit_hash: &'a str,
    pub github_branch: &'a str,
}

impl TaskFields<'_> {
    pub fn of(job: &Job) -> TaskFields<'_> {
        match &job.trainer_task {
            Some(task) => TaskFields {
                task_id: &task.task_id,
                hotkey: &task.hotkey,
                github_repo: &task.github_repo,
                github_commit_hash: task.github_commit_hash.as_deref().unwrap_or(""),
                github_branch: task.github_branch.as_deref().unwrap_or(""),
            },
            None => TaskFields {
                task_id: "",
                hotkey: "",
                github_repo: "",
                github_commit_hash: "",
                github_branch: "",
            },
        }
    }
}

/// Every placeholder's text for one job, one stage, one attempt. Fields a job does not have
/// (a `dataset` for a DiffusionJob, a missing `expected_repo_name`) are empty.
#[derive(Clone, Debug)]
pub struct Values {
    values: Vec<String>,
}

impl Values {
    pub fn new(job: &Job, stage: &str, data_dir: &str) -> Values {
        let KindFields {
            dataset,
            dataset_type,
            file_format,
            dataset_zip,
            model_type,
        } = KindFields::of(job);
        let task = TaskFields::of(job);
        let values = Placeholder::ALL
            .into_iter()
            .map(|p| match p {
                Placeholder::JobId => job.id.to_string(),
                Placeholder::Model => job.model.clone(),
                Placeholder::Dataset => dataset.to_string(),
                Placeholder::DatasetTypeJson => dataset_type.to_string(),
                Placeholder::FileFormat => file_format.to_string(),
                Placeholder::TaskType => task_type(job).to_string(),
                Placeholder::ExpectedRepoName => job.expected_repo_name.clone().unwrap_or_default(),
                Placeholder::HoursToComplete => {
                    job.hours_to_complete.map(format_hours).unwrap_or_default()
                }
                Placeholder::GpuIds => job
                    .gpu_ids
                    .iter()
                    .flatten()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                Placeholder::DataDir => data_dir.to_string(),
                Placeholder::DatasetZip => dataset_zip.to_string(),
                Placeholder::ModelType => model_type.to_string(),
                Placeholder::Attempt => job.attempts.to_string(),
                Placeholder::Stage => stage.to_string(),
                Placeholder::TaskId => task.task_id.to_string(),
                Placeholder::Hotkey => task.hotkey.to_string(),
                Placeholder::GithubRepo => task.github_repo.to_string(),
                Placeholder::GithubCommitHash => task.github_commit_hash.to_string(),
                Placeholder::GithubBranch => task.github_branch.to_string(),
            })
            .collect();
        Values { values }
    }

    pub fn get(&self, p: Placeholder) -> &str {
        let i = Placeholder::ALL
            .iter()
            .position(|q| *q == p)
            .expect("every placeholder is in ALL");
        &self.values[i]
    }
}

/// Hours as G.O.D's scripts pass them: whole numbers without a fraction.
fn format_hours(hours: f64) -> String {
    if hours.fract() == 0.0 {
        format!("{}", hours as u64)
    } else {
        format!("{hours}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(body: serde_json::Value) -> Job {
        Job::from_submission(body, chrono::Utc::now()).unwrap()
    }

    #[test]
    fn placeholders_render_each_into_one_argument() {
        let mut j = job(json!({
            "type": "TextJob", "model": "Qwen/Qwen2.5-0.5B", "dataset": "s3://b/d.json",
            "file_format": "s3", "hours_to_complete": 3,
            "expected_repo_name": "my repo; rm -rf /",
            "dataset_type": {"field_prompt": "p", "field_chosen": "c", "field_rejected": "r"}
        }));
        j.gpu_ids = Some(vec![2, 3]);
        let values = Values::new(&j, "train", "/data");
        let render = |t: &str| Template::parse(t).unwrap().render(&values);
        assert_eq!(render("--task-id={job_id}"), format!("--task-id={}", j.id));
        assert_eq!(render("{task_type}"), "DpoTask");
        assert_eq!(render("{expected_repo_name}"), "my repo; rm -rf /");
        assert_eq!(render("{hours_to_complete}h"), "3h");
        assert_eq!(render("device={gpu_ids}"), "device=2,3");
        assert_eq!(render("{data_dir}/cache:/cache"), "/data/cache:/cache");
        assert_eq!(render("{{literal}} {stage}"), "{literal} train");
        assert_eq!(
            render("{dataset_type_json}"),
            r#"{"field_prompt":"p","field_chosen":"c","field_rejected":"r"}"#
        );
        assert_eq!(render("[{dataset_zip}]"), "[]");
    }

    #[test]
    fn a_trainer_tasks_fields_render_and_are_empty_for_a_job_of_the_main_api() {
        let mut j = job(json!({"type": "DiffusionJob", "model": "m", "dataset_zip": "z"}));
        let render = |j: &Job, t: &str| {
            Template::parse(t)
                .unwrap()
                .render(&Values::new(j, "s", "/d"))
        };
        let all = "{task_id}|{hotkey}|{github_repo}|{github_commit_hash}|{github_branch}";
        assert_eq!(render(&j, all), "||||");
        j.trainer_task = Some(crate::job::TrainerTask {
            task_id: "t-1".into(),
            hotkey: "5Fhk".into(),
            github_repo: "https://github.com/example/miner".into(),
            github_branch: Some("main".into()),
            github_commit_hash: None,
            request: serde_json::Value::Null,
        });
        assert_eq!(
            render(&j, all),
            "t-1|5Fhk|https://github.com/example/miner||main"
        );
    }

    #[test]
    fn task_types_follow_the_dataset_shape() {
        let text = |dt: serde_json::Value| {
            task_type(&job(
                json!({"type": "TextJob", "model": "m", "dataset": "d",
                "file_format": "hf", "dataset_type": dt}),
            ))
        };
        assert_eq!(text(json!({"field_instruction": "q"})), "InstructTextTask");
        assert_eq!(text(json!({"field_chosen": "c"})), "DpoTask");
        assert_eq!(
            text(
                json!({"field_prompt": "p", "reward_functions": [{"reward_func": "def f(c): return 1", "reward_weight": 1}]})
            ),
            "GrpoTask"
        );
        assert_eq!(text(json!({"chat_template": "chatml"})), "ChatTask");
        assert_eq!(text(json!({"environment_names": ["alfworld"]})), "EnvTask");
        assert_eq!(text(json!({"environment_names": null})), "EnvTask");
        let image = job(json!({"type": "DiffusionJob", "model": "m", "dataset_zip": "z"}));
        assert_eq!(task_type(&image), "ImageTask");
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        let err = Template::parse("--x={jobid}").unwrap_err().to_string();
        assert!(err.contains("unknown placeholder {jobid}") && err.contains("job_id"));
        assert!(
            Template::parse("{job_id")
                .unwrap_err()
                .to_string()
                .contains("unclosed")
        );
        assert!(
            Template::parse("a}b")
                .unwrap_err()
                .to_string()
                .contains("stray")
        );
        assert!(Template::parse("plain").unwrap().is_literal());
        assert_eq!(
            format!("{:?}", Template::parse("a{{b}}{model}").unwrap()),
            "\"a{{b}}{model}\""
        );
    }
}
