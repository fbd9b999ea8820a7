//! What the G.O.D trainer API's end-to-end tests share: the fixtures made by the real
//! client's models, a fake nvidia-smi, and a client of the trainer API's listener.

use std::fs;
use std::path::{Path, PathBuf};

use reqwest::StatusCode;
use serde_json::Value;

/// The request and response bodies the real client's models made, beside the project.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/god");

/// A fixture as JSON.
pub fn fixture(name: &str) -> Value {
    let bytes = fs::read(PathBuf::from(FIXTURES).join(name)).expect("the fixture");
    serde_json::from_slice(&bytes).expect("a fixture is JSON")
}

/// The fixtures, or `None` once the test said in one line why it does not run.
pub fn fixtures_or_skip(test: &str) -> Option<()> {
    if PathBuf::from(FIXTURES).is_dir() {
        return Some(());
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: the G.O.D fixtures must be beside the project in CI"
    );
    eprintln!("SKIPPED {test}: the G.O.D fixtures are not beside the project");
    None
}

/// Writes an nvidia-smi in `dir` that reports `gpus` H100s, as the real one answers the
/// inventory query; its path as a TOML string.
pub fn fake_nvidia_smi(dir: &Path, gpus: usize) -> String {
    let smi = dir.join("nvidia-smi");
    let ids: Vec<String> = (0..gpus).map(|i| i.to_string()).collect();
    fs::write(
        &smi,
        format!(
            "#!/bin/sh\nfor i in {}; do echo \"$i, NVIDIA H100 80GB HBM3, 81559\"; done\n",
            ids.join(" ")
        ),
    )
    .expect("write the fake nvidia-smi");
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&smi, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    serde_json::to_string(&smi.display().to_string()).expect("a string")
}

/// The task id of a start body.
pub fn task_id(body: &Value) -> &str {
    body["training_data"]["task_id"]
        .as_str()
        .expect("a task id")
}

/// The hotkey of a start body.
pub fn hotkey(body: &Value) -> &str {
    body["hotkey"].as_str().expect("a hotkey")
}

/// The main API's id of the job a start body's pair names.
pub fn job_id(body: &Value) -> String {
    training_worker::api::god::job_id_of(task_id(body), hotkey(body)).to_string()
}

/// A client of the trainer API's listener.
pub struct TrainerApi {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub client: reqwest::Client,
}

impl TrainerApi {
    pub fn new(base: String) -> TrainerApi {
        TrainerApi {
            base,
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .expect("a client"),
        }
    }

    /// The answer's status and body (JSON, or the text as a JSON string).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(body);
        }
        let reply = request.send().await.expect("the trainer API answers");
        let status = reply.status();
        let text = reply.text().await.expect("a body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn start_task(&self, body: &Value) -> (StatusCode, Value) {
        self.call(
            reqwest::Method::POST,
            "/v1/trainer/start_training",
            Some(body),
        )
        .await
    }

    /// `GET /v1/trainer/{task_id}?hotkey=H` for the pair a start body names.
    pub async fn task(&self, body: &Value) -> (StatusCode, Value) {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/trainer/{}?hotkey={}", task_id(body), hotkey(body)),
            None,
        )
        .await
    }
}
