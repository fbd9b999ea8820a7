//! The OpenAPI schemas of the types whose JSON form is written by hand rather than derived:
//! the job (`job.rs` is its one codec: unknown fields kept, server-owned fields, four dataset
//! shapes told apart by their keys), its id and status, the offer and its answer, and the
//! error body. Each schema is built here from the same constants the codec checks against
//! (the dataset shapes' field lists, the file formats, the model types, the largest budget),
//! so that a field the codec learns shows up in the description or fails its test.

use std::borrow::Cow;

use serde_json::{Value, json};
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::schema::{
    AdditionalProperties, AllOfBuilder, AnyOfBuilder, ArrayBuilder, Discriminator, KnownFormat,
    ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use crate::job::{
    CHAT_FIELDS, DPO_FIELDS, FileFormat, GRPO_TEXT_FIELDS, INSTRUCT_FIELDS, Job, JobId, MAX_HOURS,
    ModelType, Status,
};
use crate::worker::{Offer, OfferAnswer};

/// The example id the description uses throughout.
pub const EXAMPLE_ID: &str = "123e4567-e89b-12d3-a456-426614174000";

/// A schema of one JSON type.
fn of(t: Type) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(t)
}

/// A schema of one JSON type, or null.
fn or_null(t: Type) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(SchemaType::from_iter([t, Type::Null]))
}

/// An RFC 3339 UTC time, or null.
fn time_or_null() -> ObjectBuilder {
    or_null(Type::String).format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
}

/// A non-empty string.
fn text() -> ObjectBuilder {
    of(Type::String).min_length(Some(1))
}

/// A reference to a named schema, with a description of its own.
fn reference(name: &str, description: &str) -> RefOr<Schema> {
    let mut reference = Ref::from_schema_name(name);
    reference.description = description.to_string();
    RefOr::Ref(reference)
}

/// Any value; described, but unconstrained.
fn anything(description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::AnyValue)
        .description(Some(description))
        .into()
}

/// An array schema marked `readOnly`. utoipa 5's `Array` has no field for the keyword, so it
/// goes in through the map of extra keywords, which is written flat beside the others.
fn read_only_array(array: ArrayBuilder) -> RefOr<Schema> {
    let keywords = Extensions::from_iter([("readOnly", true)]);
    array.extensions(Some(keywords)).into()
}

/// A schema that only requires `key` (one alternative of an `anyOf`).
fn requires(key: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::AnyValue)
        .required(key)
}

impl PartialSchema for JobId {
    fn schema() -> RefOr<Schema> {
        of(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
            .description(Some(
                "A UUID in the 36-character hyphenated form (any case on input, lowercase on output).",
            ))
            .examples([EXAMPLE_ID])
            .into()
    }
}

impl ToSchema for JobId {
    fn name() -> Cow<'static, str> {
        "JobId".into()
    }
}

impl PartialSchema for Status {
    fn schema() -> RefOr<Schema> {
        of(Type::String)
            .enum_values(Some(Status::ALL.map(Status::as_str)))
            .into()
    }
}

impl ToSchema for Status {
    fn name() -> Cow<'static, str> {
        "Status".into()
    }
}

// ---------------------------------------------------------------------------------------
// The job
// ---------------------------------------------------------------------------------------

impl PartialSchema for Job {
    fn schema() -> RefOr<Schema> {
        let mapping =
            ["TextJob", "DiffusionJob"].map(|name| (name, format!("#/components/schemas/{name}")));
        OneOfBuilder::new()
            .description(Some(
                "A job, as submitted and as stored (the same JSON object on the wire and in data/jobs/<job_id>.json).",
            ))
            .item(Ref::from_schema_name("TextJob"))
            .item(Ref::from_schema_name("DiffusionJob"))
            .discriminator(Some(Discriminator::with_mapping("type", mapping)))
            .into()
    }
}

impl ToSchema for Job {
    fn name() -> Cow<'static, str> {
        "Job".into()
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((JobId::name().into(), JobId::schema()));
        schemas.push((Status::name().into(), Status::schema()));
        schemas.push(("TextJob".into(), text_job()));
        schemas.push(("DiffusionJob".into(), diffusion_job()));
        dataset_type_schemas(schemas);
    }
}

/// A TextJob: the common fields around a text dataset's.
fn text_job() -> RefOr<Schema> {
    let kind = vec![
        (
            "dataset",
            text()
                .description(Some(
                    "The dataset (a path, a Hugging Face name or an S3 URL); passed as DATASET.",
                ))
                .into(),
        ),
        ("dataset_type", Ref::from_schema_name("DatasetType").into()),
        (
            "file_format",
            of(Type::String)
                .enum_values(Some(FileFormat::ALL.map(FileFormat::as_str)))
                .description(Some("How the dataset is stored; passed as FILE_FORMAT."))
                .into(),
        ),
    ];
    job_object(
        "TextJob",
        "Fine-tuning of a language model on a text dataset.",
        kind,
        &["dataset", "dataset_type", "file_format"],
    )
}

/// A DiffusionJob: the common fields around an image dataset's.
fn diffusion_job() -> RefOr<Schema> {
    let kind = vec![
        (
            "dataset_zip",
            text()
                .description(Some("The images; passed as DATASET_ZIP."))
                .into(),
        ),
        (
            "model_type",
            of(Type::String)
                .enum_values(Some(ModelType::ALL.map(ModelType::as_str)))
                .default(Some(json!(ModelType::Sdxl.as_str())))
                .description(Some("Passed as MODEL_TYPE."))
                .into(),
        ),
    ];
    job_object(
        "DiffusionJob",
        "Fine-tuning of an image model on a zip of images.",
        kind,
        &["dataset_zip"],
    )
}

/// The fields every job has, with `kind`'s (its type's own) after the first four, as
/// `Job::to_json` writes them.
fn job_object(
    type_name: &str,
    description: &str,
    kind: Vec<(&str, RefOr<Schema>)>,
    kind_required: &[&str],
) -> RefOr<Schema> {
    let server = |builder: ObjectBuilder, description: &str| -> RefOr<Schema> {
        builder
            .read_only(Some(true))
            .description(Some(description))
            .into()
    };
    let mut object = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(description))
        .property(
            "type",
            ObjectBuilder::new()
                .schema_type(SchemaType::AnyValue)
                .enum_values(Some([type_name]))
                .description(Some("The kind of job.")),
        )
        .property(
            "job_id",
            reference(
                "JobId",
                "Optional on submit: the server assigns a random (v4) UUID. Resubmitting the same job_id with the same content answers 200 with the stored job (a safe retry); with different content, 409.",
            ),
        )
        .property(
            "model",
            text().description(Some("The model to fine-tune; passed to the trainer as MODEL.")),
        )
        .property(
            "expected_repo_name",
            or_null(Type::String).description(Some(
                "Where the trainer uploads the result; passed as EXPECTED_REPO_NAME.",
            )),
        );
    for (name, schema) in kind {
        object = object.property(name, schema);
    }
    let timestamps = [
        (
            "created_at",
            "RFC 3339 UTC; set by the server when the job is accepted, and anew when it is retried: the arrival of its current run, which orders the queue.",
        ),
        ("updated_at", "RFC 3339 UTC; the last change."),
        ("started_at", "RFC 3339 UTC; the last start."),
        (
            "finished_at",
            "RFC 3339 UTC; when the job became Completed, Failed or Cancelled.",
        ),
    ];
    object = object
        .property(
            "status",
            reference(
                "Status",
                "Set by the server. A submission may omit it or send \"Queued\"; any other value is refused with 400.",
            ),
        )
        .property(
            "error_message",
            server(
                or_null(Type::String),
                "Why a job is Failed or Cancelled, for people; null otherwise.",
            ),
        )
        .property(
            "attempts",
            server(
                of(Type::Integer).minimum(Some(0)),
                "Starts so far in the current run (a retry sets it to 0). A start cut short by a graceful stop is taken back, so this counts only starts that ended or crashed.",
            ),
        );
    for (name, description) in timestamps {
        object = object.property(name, server(time_or_null(), description));
    }
    object = object
        .property(
            "gpu_count",
            or_null(Type::Integer).minimum(Some(0)).description(Some(
                "GPUs the job asks for when the worker has GPUs configured (`[worker] gpus`); default 1. More than the worker has is a 400. Written only when given.",
            )),
        )
        .property(
            "gpu_ids",
            read_only_array(
                ArrayBuilder::new()
                    .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
                    .items(of(Type::Integer).minimum(Some(0)))
                    .description(Some(
                        "The GPUs of the job's last start (set by the server when GPUs are configured); its trainer sees them as CUDA_VISIBLE_DEVICES.",
                    )),
            ),
        )
        .property(
            "hours_to_complete",
            or_null(Type::Number)
                .exclusive_minimum(Some(0))
                .maximum(Some(MAX_HOURS))
                .description(Some(
                    "The job's time budget in hours. Its deadline is fixed when the job is accepted, and anew only when it is retried. Written only when given.",
                )),
        )
        .property(
            "deadline",
            server(
                time_or_null(),
                "RFC 3339 UTC; acceptance (or retry) time plus hours_to_complete. Written only for jobs with a budget.",
            ),
        )
        .property(
            "stages_done",
            read_only_array(
                ArrayBuilder::new().items(of(Type::String)).description(Some(
                    "The executor stages ([[executor.stages]]) this job has finished, in order; a recovered job resumes at the first stage not listed. Written only when not empty.",
                )),
            ),
        )
        .property(
            "stages_started",
            server(
                of(Type::Object).additional_properties(Some(RefOr::T(Schema::Object(
                    of(Type::String)
                        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
                        .build(),
                )))),
                "When each stage with timeout = \"budget\" first started (RFC 3339 UTC), so that a stage restarted after a crash gets only what is left of its budget. Written only when not empty.",
            ),
        )
        .property(
            "trainer_task",
            server(
                or_null(Type::Object),
                "Set on a job of the G.O.D trainer API (started by POST /v1/trainer/start_training on its own listener): task_id, hotkey, github_repo, github_branch, github_commit_hash and request (the start request as sent, without its token). Never set by a client of this API.",
            ),
        )
        .property(
            "wandb_url",
            server(
                or_null(Type::String),
                "The first https://wandb.ai/... address a stage printed in this run. Written only once one was printed; a retry clears it.",
            ),
        )
        .property(
            "estimated_start",
            server(
                time_or_null(),
                "Only in GET /v1/jobs?estimates=true, for queued jobs (never stored): when the job is expected to start, from the budgets and elapsed times of the jobs ahead and the GPU slots (see the README's \"Budgets, ordering and offers\"); null when it is not expected to start (the queue is paused, or its deadline passes before its turn). GET /v1/jobs/{id} gives it as the x-estimated-start header. Ignored on submit.",
            ),
        )
        .property(
            "estimated_finish",
            server(
                time_or_null(),
                "Only in GET /v1/jobs?estimates=true, for queued and running jobs (never stored): when the job is expected to end at the latest: its deadline, or for a job without a budget its start plus [worker] assumed_duration; null when it is not expected to start. GET /v1/jobs/{id} gives it as the x-estimated-finish header. Ignored on submit.",
            ),
        )
        .additional_properties(Some(AdditionalProperties::RefOr(anything(
            "Fields the server does not know are kept, and written back unchanged.",
        ))));
    for key in ["type", "model"].iter().chain(kind_required) {
        object = object.required(*key);
    }
    object.into()
}

// ---------------------------------------------------------------------------------------
// The dataset types
// ---------------------------------------------------------------------------------------

/// `DatasetType` and its shapes, each an object of its shape's fields (strings or null) that
/// keeps other keys, told apart as `DatasetType::parse` tells them.
pub(crate) fn dataset_type_schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
    let shapes = [
        "InstructDatasetType",
        "DpoDatasetType",
        "GrpoDatasetType",
        "ChatTemplateDatasetType",
        "EnvironmentDatasetType",
    ];
    let mut any = AnyOfBuilder::new().description(Some(
        "One of the G.O.D dataset shapes, told by its distinctive keys: environment_names means an environment task (the trainer's EnvTask); reward_functions means GRPO; field_chosen or field_rejected means DPO; chat_template or chat_column means chat template; anything else is instruct. Then that shape's fields are checked: the named fields must be strings or null, and a GRPO object needs valid reward_functions (a bad one is a 400, never a silent instruct). Other keys are kept. Passed to the trainer as DATASET_TYPE (JSON text).",
    ));
    for shape in shapes {
        any = any.item(Ref::from_schema_name(shape));
    }
    schemas.push(("DatasetType".into(), any.into()));

    let environment = of(Type::Object)
        .title(Some("environment"))
        .description(Some(
            "A G.O.D environment task: the environments the trainer trains in.",
        ))
        .property(
            "environment_names",
            ArrayBuilder::new()
                .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
                .items(of(Type::String)),
        )
        .required("environment_names");
    schemas.push(("EnvironmentDatasetType".into(), environment.into()));

    let instruct = shape_fields(INSTRUCT_FIELDS)
        .title(Some("instruct"))
        .description(Some("Instruction tuning: the default shape."));
    schemas.push(("InstructDatasetType".into(), instruct.into()));

    let dpo = shape_fields(DPO_FIELDS)
        .title(Some("DPO"))
        .description(Some(
            "Preference pairs; told by field_chosen or field_rejected.",
        ));
    schemas.push((
        "DpoDatasetType".into(),
        told_by(dpo, &["field_chosen", "field_rejected"]),
    ));

    let grpo = shape_fields(GRPO_TEXT_FIELDS)
        .title(Some("GRPO"))
        .description(Some("Reward-function training; told by reward_functions."))
        .property(
            "reward_functions",
            ArrayBuilder::new()
                .min_items(Some(1))
                .items(Ref::from_schema_name("RewardFunction")),
        )
        .required("reward_functions");
    schemas.push(("GrpoDatasetType".into(), grpo.into()));

    let reward = of(Type::Object)
        .property(
            "reward_func",
            text().description(Some("The reward function (its source or its name).")),
        )
        .property("reward_weight", of(Type::Number).minimum(Some(0)))
        .required("reward_func")
        .required("reward_weight")
        .additional_properties(Some(AdditionalProperties::FreeForm(true)));
    schemas.push(("RewardFunction".into(), reward.into()));

    let chat = shape_fields(CHAT_FIELDS)
        .title(Some("chat template"))
        .description(Some("Conversations; told by chat_template or chat_column."));
    schemas.push((
        "ChatTemplateDatasetType".into(),
        told_by(chat, &["chat_template", "chat_column"]),
    ));
}

/// An object of a shape's fields, each a string or null, that keeps other keys.
fn shape_fields(fields: &[&str]) -> ObjectBuilder {
    let mut object = of(Type::Object);
    for field in fields {
        object = object.property(*field, or_null(Type::String));
    }
    object.additional_properties(Some(AdditionalProperties::FreeForm(true)))
}

/// A shape that has at least one of `keys`. An object schema of utoipa cannot carry an
/// `anyOf` beside its properties, so the two go side by side in an `allOf`, which means
/// the same.
fn told_by(shape: ObjectBuilder, keys: &[&str]) -> RefOr<Schema> {
    let mut any = AnyOfBuilder::new();
    for key in keys {
        any = any.item(requires(key));
    }
    AllOfBuilder::new().item(shape).item(any).into()
}

// ---------------------------------------------------------------------------------------
// Offers
// ---------------------------------------------------------------------------------------

impl PartialSchema for Offer {
    fn schema() -> RefOr<Schema> {
        of(Type::Object)
            .description(Some(
                "A job offered: what it is and its budget. Other fields are ignored, so the job itself may be sent as its own offer.",
            ))
            .property(
                "type",
                of(Type::String)
                    .enum_values(Some(["TextJob", "DiffusionJob"]))
                    .description(Some("The kind of job.")),
            )
            .property(
                "model",
                text().description(Some(
                    "The model to fine-tune; must match one of [offers] models.",
                )),
            )
            .property(
                "gpu_count",
                or_null(Type::Integer).minimum(Some(0)).description(Some(
                    "GPUs the job would ask for (default 1 when the worker has [worker] gpus).",
                )),
            )
            .property(
                "hours_to_complete",
                of(Type::Number)
                    .exclusive_minimum(Some(0))
                    .maximum(Some(MAX_HOURS))
                    .description(Some(
                        "The job's time budget in hours; at most [offers] max_hours.",
                    )),
            )
            .property(
                "job_id",
                reference(
                    "JobId",
                    "The id the job will be sent with, when known: then only that job claims the reservation.",
                ),
            )
            .required("type")
            .required("model")
            .required("hours_to_complete")
            .additional_properties(Some(AdditionalProperties::RefOr(anything("Ignored."))))
            .into()
    }
}

impl ToSchema for Offer {
    fn name() -> Cow<'static, str> {
        "Offer".into()
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((JobId::name().into(), JobId::schema()));
    }
}

impl PartialSchema for OfferAnswer {
    fn schema() -> RefOr<Schema> {
        let reservation = or_null(Type::Object)
            .description(Some(
                "For an accepted offer when [offers] reserve_for is not 0s: the job's place is held until expires_at for the first job sent with the same type, model, gpu_count and hours_to_complete (and job_id, when the offer named one). That job counts as accepted at the offer's time: its created_at and deadline are the offer's. Held in memory only.",
            ))
            .property(
                "id",
                of(Type::String).format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid))),
            )
            .property(
                "expires_at",
                of(Type::String).format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
            )
            .required("id")
            .required("expires_at")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        of(Type::Object)
            .property(
                "accepted",
                of(Type::Boolean).description(Some(
                    "Whether the job would be taken: its type, model and budget are within [offers], it fits the GPUs, and it is estimated to start within [offers] max_wait and before its deadline.",
                )),
            )
            .property(
                "estimated_start",
                time_or_null().description(Some(
                    "When the job would start if sent now; null when it would not start (the queue is paused, it needs more GPUs than there are, or its deadline would pass first).",
                )),
            )
            .property(
                "estimated_finish",
                time_or_null().description(Some(
                    "When it would end at the latest: its deadline, now plus hours_to_complete.",
                )),
            )
            .property("message", text().description(Some("Why, for people.")))
            .property("reservation", reservation)
            .required("accepted")
            .required("estimated_start")
            .required("estimated_finish")
            .required("message")
            .required("reservation")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .into()
    }
}

impl ToSchema for OfferAnswer {
    fn name() -> Cow<'static, str> {
        "OfferAnswer".into()
    }
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

impl PartialSchema for super::ApiError {
    fn schema() -> RefOr<Schema> {
        of(Type::Object)
            .description(Some(
                "Every error. 4xx messages say what is wrong and name the field; 5xx stay opaque.",
            ))
            .property("error", of(Type::String))
            .property(
                "status",
                of(Type::String)
                    .enum_values(Some([super::error::NOT_FOUND]))
                    .description(Some("On 404 only.")),
            )
            .property(
                "job_id",
                reference(
                    "JobId",
                    "On a 503 whose outcome is unknown (storage failed mid-write): the id to GET, or to resubmit, once the daemon is back.",
                ),
            )
            .required("error")
            .into()
    }
}

impl ToSchema for super::ApiError {
    fn name() -> Cow<'static, str> {
        "Error".into()
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((JobId::name().into(), JobId::schema()));
    }
}

/// An example body of an error, as the description shows it.
pub fn error_example(message: &str) -> Value {
    json!({ "error": message })
}
