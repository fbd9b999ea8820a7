//! The OpenAPI 3.1 description of the G.O.D trainer API, derived by `utoipa` from the
//! handlers' `#[utoipa::path]` attributes and the answers' types, and served on the trainer
//! API's own listener at `GET /openapi.json` (as FastAPI serves the upstream trainer's).
//! The start request is checked by hand (`job_of`), so its schema is built here.

use std::borrow::Cow;
use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, ObjectBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::{ContentBuilder, Ref, RefOr};
use utoipa::{OpenApi, PartialSchema, ToResponse, ToSchema};

use super::Detail;
use crate::job::{FileFormat, MAX_HOURS, ModelType};

/// The trainer API's description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "training-worker: the G.O.D trainer API",
        description = "What the G.O.D validator's tournament orchestrator calls on a trainer box, on a listener of its own ([god_trainer] listen). No token: it admits 127.0.0.1, ::1 and the addresses of [god_trainer] allow, and answers anyone else 403. Errors are FastAPI-shaped: {\"detail\": \"...\"}. A task started here is also a job of the main API, its job_id derived from (task_id, hotkey).",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    paths(
        super::start_training,
        super::task,
        super::gpu_availability,
        super::recent_tasks,
        serve,
    ),
    components(responses(AccessForbidden, Invalid))
)]
struct TrainerApiDoc;

/// The trainer API's description as served: JSON text, built once.
pub fn openapi_json() -> &'static str {
    static TEXT: LazyLock<String> = LazyLock::new(|| {
        TrainerApiDoc::openapi()
            .to_pretty_json()
            .expect("an OpenAPI document serialises")
    });
    &TEXT
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    summary = "This document",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API.", body = Object),
        (status = 403, response = AccessForbidden),
    ),
)]
pub(super) async fn serve() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

impl PartialSchema for Detail {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some("Every error, FastAPI-shaped."))
            .property(
                "detail",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("What is wrong; for a 422, it names the field.")),
            )
            .required("detail")
            .into()
    }
}

impl ToSchema for Detail {
    fn name() -> Cow<'static, str> {
        "Detail".into()
    }
}

fn detail_response(description: &str, example: &str) -> RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Detail")))
                .example(Some(json!({ "detail": example })))
                .build(),
        )
        .build()
        .into()
}

/// `403`: the client's address is not admitted.
pub(super) struct AccessForbidden;

impl<'r> ToResponse<'r> for AccessForbidden {
    fn response() -> (&'r str, RefOr<utoipa::openapi::Response>) {
        let response = detail_response(
            "The client is neither loopback (127.0.0.1, ::1) nor in [god_trainer] allow.",
            "Access forbidden",
        );
        ("AccessForbidden", response)
    }
}

/// `422`: the request does not validate.
pub(super) struct Invalid;

impl<'r> ToResponse<'r> for Invalid {
    fn response() -> (&'r str, RefOr<utoipa::openapi::Response>) {
        let response = detail_response(
            "The request does not validate; the detail names the field.",
            "training_data.hours_to_complete: must be a number above 0",
        );
        ("Invalid", response)
    }
}

fn of(t: Type) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(t)
}

fn or_null(t: Type) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(SchemaType::from_iter([t, Type::Null]))
}

/// The body of a start, as `job_of` checks it.
pub(super) struct StartRequest;

impl PartialSchema for StartRequest {
    fn schema() -> RefOr<Schema> {
        let training_data = of(Type::Object)
            .description(Some(
                "The job: a text job (dataset, dataset_type, file_format) or, with a dataset_zip, an image job (dataset_zip, model_type). Other fields are kept as sent.",
            ))
            .property("task_id", of(Type::String).min_length(Some(1)))
            .property("model", of(Type::String).min_length(Some(1)))
            .property(
                "hours_to_complete",
                of(Type::Number)
                    .exclusive_minimum(Some(0))
                    .maximum(Some(MAX_HOURS))
                    .description(Some(
                        "The time budget of the stages with timeout = \"budget\", counted from each one's first start.",
                    )),
            )
            .property("expected_repo_name", or_null(Type::String))
            .property("dataset", of(Type::String).min_length(Some(1)))
            .property("dataset_type", Ref::from_schema_name("DatasetType"))
            .property(
                "file_format",
                of(Type::String).enum_values(Some(FileFormat::ALL.map(FileFormat::as_str))),
            )
            .property("dataset_zip", or_null(Type::String))
            .property(
                "model_type",
                of(Type::String).enum_values(Some(ModelType::ALL.map(ModelType::as_str))),
            )
            .required("task_id")
            .required("model")
            .required("hours_to_complete")
            .additional_properties(Some(AdditionalProperties::FreeForm(true)));
        of(Type::Object)
            .description(Some(
                "A start. Every field not named here, at either level, is kept as sent.",
            ))
            .property("training_data", training_data)
            .property("github_repo", of(Type::String).min_length(Some(1)))
            .property(
                "gpu_ids",
                ArrayBuilder::new()
                    .items(of(Type::Integer).minimum(Some(0)))
                    .min_items(Some(1))
                    .unique_items(true)
                    .description(Some("The GPUs to train on, each named once.")),
            )
            .property("hotkey", of(Type::String).min_length(Some(1)))
            .property("github_branch", or_null(Type::String))
            .property("github_commit_hash", or_null(Type::String))
            .property(
                "github_token",
                or_null(Type::String).write_only(Some(true)).description(Some(
                    "Reaches the stages as GITHUB_TOKEN only; never echoed, logged or written to a job file.",
                )),
            )
            .property(
                "requested_datasets",
                ObjectBuilder::new()
                    .schema_type(SchemaType::AnyValue)
                    .description(Some("Kept as sent.")),
            )
            .required("training_data")
            .required("github_repo")
            .required("gpu_ids")
            .required("hotkey")
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .into()
    }
}

impl ToSchema for StartRequest {
    fn name() -> Cow<'static, str> {
        "StartRequest".into()
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        crate::api::schemas::dataset_type_schemas(schemas);
    }
}
