//! What the benches share: the job they submit.

use serde_json::json;

/// The body of the `n`th job a bench submits: a TextJob with an instruct dataset, the size
/// of a typical submission.
pub fn job_body(n: usize) -> String {
    json!({
        "type": "TextJob",
        "model": "mistralai/Mistral-7B-v0.1",
        "dataset": format!("dataset-{n}.json"),
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
        "file_format": "json",
        "expected_repo_name": format!("repo-{n}"),
    })
    .to_string()
}
