//! The derived OpenAPI description against the one written by hand before it
//! (tests/fixtures/openapi-before.json), on what a client relies on: the same paths and
//! methods, operation ids, tags and need for the token; per operation the same status codes,
//! parameters, request body, media types, response headers and schemas. Both documents are
//! normalised first: `$ref`s resolved, prose left out (descriptions, titles, summaries,
//! examples), order ignored, and the few spellings that mean the same in JSON Schema made one
//! (see [`normalise`]). A deliberate difference is listed in [`DELIBERATE`] with its reason.
//!
//! Then both documents the daemon serves are checked by a real OpenAPI 3.1 validator
//! (`openapi-spec-validator`, Python): skipped with one line when it is not installed, a
//! failure when `CI` is set.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use training_worker::api::{god, openapi_json};

/// The hand-written description as it was served before it was derived.
const BEFORE: &str = include_str!("fixtures/openapi-before.json");

/// Differences made on purpose: (where, why). `where` is the path of the normalised value
/// that differs, as [`differences`] reports it.
const DELIBERATE: &[(&str, &str)] = &[
    (
        "GET /readyz/responses/",
        "/readyz also answers 503 \"storage unavailable\" with a reason while the PostgreSQL \
         store's database is out of reach",
    ),
    (
        "GET /healthz/responses/",
        "the probes share one schema, /readyz's new status and reason included",
    ),
    (
        "GET /v1/nodes",
        "a new route: the daemons that share one queue (with the PostgreSQL store), and with \
         the file store this daemon alone",
    ),
];

/// Keys whose value is a map from names to things, where a key is never a keyword.
const NAME_MAPS: &[&str] = &[
    "properties",
    "headers",
    "content",
    "responses",
    "paths",
    "mapping",
    "schemas",
    "securitySchemes",
];

/// Keywords that are prose for people, not rules for a client.
const PROSE: &[&str] = &[
    "description",
    "title",
    "summary",
    "example",
    "examples",
    "externalDocs",
];

/// Keywords whose array value is a set.
const SETS: &[&str] = &["oneOf", "anyOf", "enum", "required", "type", "tags"];

fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').expect("a local reference");
            let target = doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("{reference} points at nothing"));
            resolve(doc, target)
        }
        None => value,
    }
}

/// `value` with every `$ref` resolved, prose left out, and one spelling for what means the
/// same: `const: x` is `enum: [x]`; a one-element `type` list is its element; an empty schema
/// as `additionalProperties` is `true`; `propertyNames: {type: string}` says nothing (every
/// key is a string); an `allOf` of schemas with no keyword in common is their merge; sets are
/// sorted. A `format` on an `integer` or `number` (`int32`, `int64`, `double`, which utoipa
/// writes from the Rust type) is left out: in JSON Schema 2020-12 it is an annotation, and
/// the bounds a client relies on (`minimum`) are compared.
fn normalise(doc: &Value, value: &Value) -> Value {
    normalise_at(doc, value, false)
}

fn normalise_at(doc: &Value, value: &Value, names: bool) -> Value {
    let value = resolve(doc, value);
    match value {
        Value::Array(items) => Value::Array(items.iter().map(|v| normalise(doc, v)).collect()),
        Value::Object(object) if names => sorted(
            object
                .iter()
                .map(|(k, v)| (k.clone(), normalise(doc, v)))
                .collect(),
        ),
        Value::Object(object) => normalise_object(doc, object),
        other => other.clone(),
    }
}

/// An object with its keys in one order, so that its text is canonical.
fn sorted(object: Map<String, Value>) -> Value {
    let ordered: BTreeMap<String, Value> = object.into_iter().collect();
    Value::Object(ordered.into_iter().collect())
}

fn normalise_object(doc: &Value, object: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for (key, value) in object {
        if PROSE.contains(&key.as_str()) {
            continue;
        }
        let mut value = normalise_at(doc, value, NAME_MAPS.contains(&key.as_str()));
        if key == "const" {
            out.insert("enum".into(), json!([value]));
            continue;
        }
        if key == "additionalProperties" && value == json!({}) {
            value = Value::Bool(true);
        }
        if key == "type"
            && let Value::Array(types) = &value
            && types.len() == 1
        {
            value = types[0].clone();
        }
        if SETS.contains(&key.as_str())
            && let Value::Array(items) = &mut value
        {
            items.sort_by_key(Value::to_string);
        }
        out.insert(key.clone(), value);
    }
    let numeric = |t: &Value| t == "integer" || t == "number";
    let numeric = match out.get("type") {
        Some(Value::Array(types)) => types.iter().any(numeric),
        Some(t) => numeric(t),
        None => false,
    };
    if numeric {
        out.remove("format");
    }
    // Every key of a JSON object is a string.
    if out.get("propertyNames") == Some(&json!({"type": "string"})) {
        out.remove("propertyNames");
    }
    if let Some(Value::Array(parts)) = out.get("allOf").cloned()
        && let Some(merged) = merge_disjoint(&parts)
    {
        out.remove("allOf");
        for (key, value) in merged {
            out.insert(key, value);
        }
    }
    sorted(out)
}

/// The merge of schemas that share no keyword, which is what their `allOf` means.
fn merge_disjoint(parts: &[Value]) -> Option<Map<String, Value>> {
    let mut merged = Map::new();
    for part in parts {
        for (key, value) in part.as_object()? {
            if merged.insert(key.clone(), value.clone()).is_some() {
                return None;
            }
        }
    }
    Some(merged)
}

/// What a client relies on, per operation (`METHOD /path`), normalised.
fn contract(text: &str) -> BTreeMap<String, Value> {
    let doc: Value = serde_json::from_str(text).expect("a description is JSON");
    let mut operations = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let shared = item.get("parameters").cloned().unwrap_or(json!([]));
        for (method, op) in item.as_object().expect("a path item") {
            if method == "parameters" {
                continue;
            }
            let mut op = op.as_object().expect("an operation").clone();
            // Parameters by where and name, wherever they are declared; `required: false`
            // is the default.
            let mut parameters = Map::new();
            let own = op.remove("parameters").unwrap_or(json!([]));
            for parameter in shared
                .as_array()
                .into_iter()
                .chain(own.as_array())
                .flatten()
            {
                let mut parameter = normalise(&doc, parameter);
                let object = parameter.as_object_mut().expect("a parameter");
                if object.get("required") == Some(&Value::Bool(false)) {
                    object.remove("required");
                }
                let key = format!("{} {}", object["in"], object["name"]);
                parameters.insert(key, parameter);
            }
            let mut op = normalise(&doc, &Value::Object(op));
            op["parameters"] = Value::Object(parameters);
            operations.insert(format!("{} {path}", method.to_uppercase()), op);
        }
    }
    operations.insert(
        "securitySchemes".into(),
        normalise(&doc, &doc["components"]["securitySchemes"]),
    );
    operations.insert(
        "info".into(),
        json!({"title": doc["info"]["title"], "version": doc["info"]["version"],
               "servers": doc["servers"].as_array().map(|s| s.iter().map(|s| s["url"].clone()).collect::<Vec<_>>())}),
    );
    operations
}

/// Where `before` and `after` differ: a path to each differing value, with both values.
fn differences(at: &str, before: &Value, after: &Value, found: &mut Vec<String>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            let keys: std::collections::BTreeSet<&String> = b.keys().chain(a.keys()).collect();
            for key in keys {
                let (b, a) = (
                    b.get(key).unwrap_or(&Value::Null),
                    a.get(key).unwrap_or(&Value::Null),
                );
                differences(&format!("{at}/{key}"), b, a, found);
            }
        }
        (Value::Array(b), Value::Array(a)) if b.len() == a.len() => {
            for (i, (b, a)) in b.iter().zip(a).enumerate() {
                differences(&format!("{at}/{i}"), b, a, found);
            }
        }
        (b, a) if b != a => found.push(format!("{at}: before {b}, now {a}")),
        _ => {}
    }
}

#[test]
fn the_derived_description_says_what_the_hand_written_one_said() {
    let before = contract(BEFORE);
    let after = contract(openapi_json());
    let mut found = Vec::new();
    let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for key in keys {
        let (b, a) = (
            before.get(key).unwrap_or(&Value::Null),
            after.get(key).unwrap_or(&Value::Null),
        );
        differences(key, b, a, &mut found);
    }
    let unexplained: Vec<&String> = found
        .iter()
        .filter(|d| !DELIBERATE.iter().any(|(at, _)| d.starts_with(at)))
        .collect();
    assert!(
        unexplained.is_empty(),
        "the description changed for its users:\n{}",
        unexplained
            .iter()
            .map(|d| d.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Runs `openapi-spec-validator` on `document`; `None` when it is not installed.
fn validate_openapi_31(name: &str, document: &str) -> Option<Result<(), String>> {
    let installed = std::process::Command::new("python3")
        .args(["-c", "import openapi_spec_validator"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(name);
    std::fs::write(&file, document).expect("write the document");
    let output = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator", "--schema", "3.1"])
        .arg(&file)
        .output()
        .expect("run openapi-spec-validator");
    Some(if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    })
}

#[test]
fn the_descriptions_are_valid_openapi_31() {
    let documents = [
        ("openapi.json", openapi_json()),
        ("trainer-openapi.json", god::openapi_json()),
    ];
    for (name, document) in documents {
        match validate_openapi_31(name, document) {
            Some(result) => {
                if let Err(report) = result {
                    panic!("{name} is not valid OpenAPI 3.1:\n{report}");
                }
            }
            None => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "openapi-spec-validator is not installed (pip install openapi-spec-validator), and CI is set"
                );
                eprintln!("skipped: openapi-spec-validator is not installed");
                return;
            }
        }
    }
}
