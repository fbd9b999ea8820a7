//! The OpenAPI 3.1 description of the main API, derived by `utoipa` from the handlers'
//! `#[utoipa::path]` attributes, the parameters' and answers' types, and the hand-built
//! schemas of `schemas.rs`. Served at `GET /openapi.json`; tests/openapi.rs holds it against
//! [`super::ROUTES`] and the router's answers, and against the description as it was
//! written by hand before (tests/fixtures/openapi-before.json).
//!
//! What the attributes cannot say is added here once: the responses every route shares
//! (`components/responses`), the examples, and each operation's need for the token, which
//! follows the router's one rule (paths under `/v1/` need it).

use std::sync::LazyLock;

use serde_json::{Value, json};
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response};
use utoipa::{Modify, OpenApi, ToResponse};

use super::ApiError;
use super::probes::Probe;
use super::schemas::{EXAMPLE_ID, error_example};
use super::views::{GpuEntry, NodesView, QueueView};
use crate::job::Job;
use crate::store::NodeView;
use crate::worker::{Offer, OfferAnswer};

/// The main API's description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "training-worker",
        description = "Runs ML fine-tuning jobs from a durable on-disk queue. JSON in and out; every error is {\"error\": \"...\"} with a 4xx or 5xx status. With an API token configured, every /v1/ call needs `Authorization: Bearer <token>`; the probes, the metrics and this document never do. Any call may also be answered 503 {\"error\": \"too many connections ...\"} with Connection: close, before it reaches a route, when the server already holds its most connections ([api] max_connections); retry it.",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    servers((url = "http://127.0.0.1:8787", description = "The default listen address.")),
    tags(
        (name = "jobs", description = "Submit, inspect and cancel training jobs."),
        (name = "nodes", description = "The daemons that share one queue (with the PostgreSQL store)."),
        (name = "offers", description = "Ask whether a job would be taken and when it would start, before sending it."),
        (name = "operations", description = "Probes, metrics, this document; no token needed."),
    ),
    paths(
        super::submit,
        super::list,
        super::job,
        super::cancel,
        super::retry,
        super::logs,
        super::views::queue,
        super::views::gpus,
        super::views::nodes,
        super::offer,
        super::probes::healthz,
        super::probes::readyz,
        super::probes::metrics,
        super::probes::openapi,
    ),
    components(
        schemas(Job, QueueView, GpuEntry, NodesView, NodeView, ApiError, Probe, Offer, OfferAnswer),
        responses(BadRequest, Unauthorized, JobNotFound, Unavailable, Internal),
    ),
    modifiers(&BearerToken),
)]
pub struct ApiDoc;

/// The main API's description as served: JSON text, built once.
pub fn document() -> &'static str {
    static TEXT: LazyLock<String> = LazyLock::new(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("an OpenAPI document serialises")
    });
    &TEXT
}

/// The token's scheme, and each operation's need for it: the router asks for it on every
/// path under `/v1/` and nowhere else (see [`super::router`]). An empty list says "no token"
/// explicitly, over any default a client may assume.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description = Some(
            "The api_token setting (TRAINING_WORKER_API_TOKEN). Without one configured, no token is needed."
                .into(),
        );
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearerAuth", SecurityScheme::Http(scheme));
        for (path, item) in openapi.paths.paths.iter_mut() {
            let needs_token = path.starts_with("/v1/");
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for operation in operations.into_iter().flatten() {
                operation.security = Some(if needs_token {
                    vec![SecurityRequirement::new("bearerAuth", Vec::<String>::new())]
                } else {
                    Vec::new()
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The responses every route shares
// ---------------------------------------------------------------------------------------

/// An error response: its description, and the body of [`ApiError`] with an example.
fn error_response(description: &str, example: Value) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Error")))
            .example(Some(example))
            .build(),
    )
}

/// `400`: the request is malformed.
pub struct BadRequest;

impl<'r> ToResponse<'r> for BadRequest {
    fn response() -> (&'r str, RefOr<Response>) {
        let example = error_example(&format!(
            "id: not a UUID (expected the hyphenated form, like {EXAMPLE_ID})"
        ));
        let response = error_response(
            "The request is malformed; the message names the field.",
            example,
        );
        ("BadRequest", response.build().into())
    }
}

/// `401`: the token is missing or wrong.
pub struct Unauthorized;

impl<'r> ToResponse<'r> for Unauthorized {
    fn response() -> (&'r str, RefOr<Response>) {
        let challenge = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["Bearer"]));
        let response = error_response(
            "A token is configured and the request does not carry it.",
            error_example("missing or wrong bearer token (Authorization: Bearer <token>)"),
        )
        .header(
            "WWW-Authenticate",
            HeaderBuilder::new().schema(challenge).build(),
        );
        ("Unauthorized", response.build().into())
    }
}

/// `404`: no job has this id.
pub struct JobNotFound;

impl<'r> ToResponse<'r> for JobNotFound {
    fn response() -> (&'r str, RefOr<Response>) {
        let example = json!({
            "error": format!("job {EXAMPLE_ID} not found"),
            "status": super::error::NOT_FOUND,
        });
        let response = error_response("No job has this id.", example);
        ("JobNotFound", response.build().into())
    }
}

/// `503`: not ready, stopping, or storage unavailable.
pub struct Unavailable;

impl<'r> ToResponse<'r> for Unavailable {
    fn response() -> (&'r str, RefOr<Response>) {
        let response = error_response(
            "Not ready (replaying the data dir), stopping, or storage unavailable: nothing was stored; try again later.",
            error_example("storage unavailable: nothing was stored; try again later"),
        );
        ("Unavailable", response.build().into())
    }
}

/// `500`: a bug.
pub struct Internal;

impl<'r> ToResponse<'r> for Internal {
    fn response() -> (&'r str, RefOr<Response>) {
        let response = error_response(
            "A bug; the detail is in the daemon's log.",
            error_example("internal error"),
        );
        ("Internal", response.build().into())
    }
}

// ---------------------------------------------------------------------------------------
// Examples (tests/openapi.rs submits each of them)
// ---------------------------------------------------------------------------------------

/// Request examples, named by the handlers' attributes.
pub mod examples {
    use serde_json::{Value, json};

    use super::EXAMPLE_ID;

    /// The seed's job: a TextJob with an instruct dataset.
    pub fn instruct() -> Value {
        json!({
            "type": "TextJob",
            "job_id": EXAMPLE_ID,
            "model": "mistralai/Mistral-7B-v0.1",
            "expected_repo_name": "my-fine-tuned-model",
            "dataset": "my-dataset.json",
            "dataset_type": {
                "system_prompt": "You are a helpful assistant.",
                "system_format": "{system}",
                "field_system": "system",
                "field_instruction": "instruction",
                "field_input": "input",
                "field_output": "output",
                "format": "{system}\n\n{instruction}\n\n{input}",
                "no_input_format": "{system}\n\n{instruction}",
                "field": null
            },
            "file_format": "json"
        })
    }

    pub fn dpo() -> Value {
        json!({
            "type": "TextJob",
            "model": "Qwen/Qwen2.5-1.5B",
            "dataset": "org/preferences",
            "file_format": "hf",
            "dataset_type": {
                "field_prompt": "prompt",
                "field_system": "system",
                "field_chosen": "chosen",
                "field_rejected": "rejected",
                "prompt_format": "{prompt}",
                "chosen_format": "{chosen}",
                "rejected_format": "{rejected}"
            }
        })
    }

    pub fn grpo() -> Value {
        json!({
            "type": "TextJob",
            "model": "Qwen/Qwen2.5-0.5B-Instruct",
            "dataset": "s3://bucket/prompts.csv",
            "file_format": "s3",
            "dataset_type": {
                "field_prompt": "prompt",
                "extra_column": null,
                "reward_functions": [
                    {
                        "reward_func": "def reward(completions, **kwargs):\n    return [len(c) / 100 for c in completions]",
                        "reward_weight": 0.7
                    },
                    {
                        "reward_func": "def format_reward(completions, **kwargs):\n    return [1.0 for _ in completions]",
                        "reward_weight": 0.3
                    }
                ]
            }
        })
    }

    pub fn chat() -> Value {
        json!({
            "type": "TextJob",
            "model": "meta-llama/Llama-3.2-1B",
            "dataset": "conversations.csv",
            "file_format": "csv",
            "dataset_type": {
                "chat_template": "chatml",
                "chat_column": "conversations",
                "chat_role_field": "from",
                "chat_content_field": "value",
                "chat_user_reference": "human",
                "chat_assistant_reference": "gpt"
            }
        })
    }

    pub fn diffusion() -> Value {
        json!({
            "type": "DiffusionJob",
            "model": "stabilityai/stable-diffusion-xl-base-1.0",
            "dataset_zip": "https://example.com/images.zip",
            "model_type": "sdxl",
            "expected_repo_name": "my-sdxl-lora"
        })
    }

    pub fn offer() -> Value {
        json!({
            "type": "TextJob",
            "model": "unsloth/Llama-3.2-1B",
            "gpu_count": 1,
            "hours_to_complete": 3
        })
    }

    pub fn offer_answer() -> Value {
        json!({
            "accepted": true,
            "estimated_start": "2026-11-28T21:40:00.000000Z",
            "estimated_finish": "2026-11-29T00:15:00.000000Z",
            "message": "accepted: it would start in 25m (at 2026-11-28T21:40:00.000000Z) and end by its deadline at 2026-11-29T00:15:00.000000Z; its place is held until 2026-11-28T21:15:30.000000Z for the first job sent with this type, model, gpu_count and hours_to_complete, whose budget runs from now",
            "reservation": {
                "id": "0f8c1c52-5f0e-4a8e-9d0e-3b1f6a2c9d11",
                "expires_at": "2026-11-28T21:15:30.000000Z"
            }
        })
    }
}
