//! The published event contract (`docs/events/`): the committed JSON Schemas are exactly what the
//! Rust types generate, and the current contract is backward compatible with the committed
//! baseline (fields only added, unless an upcaster is registered). Regenerate with
//! `cargo run -p domain --features schema --bin event-schemas`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use domain::model::schema::{compatibility_breaks, generate};
use serde_json::{json, Value};

fn events_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/events")
}

/// Every `*.schema.json` under `dir` (not descending into `baseline/` unless it is `dir`), by path.
fn read_contract(dir: &Path) -> BTreeMap<String, Value> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries =
            std::fs::read_dir(&current).unwrap_or_else(|e| panic!("{}: {e}", current.display()));
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "baseline") {
                    pending.push(path);
                }
            } else if path.to_string_lossy().ends_with(".schema.json") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let value: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
                let relative = path
                    .strip_prefix(dir)
                    .map(|p| p.to_string_lossy().replace('\\', "/"))
                    .unwrap_or_default();
                files.insert(relative, value);
            }
        }
    }
    files
}

fn generated() -> BTreeMap<String, Value> {
    generate()
        .unwrap_or_else(|e| panic!("generate the contract: {e}"))
        .files()
}

/// The committed schemas equal the generated ones, file for file (none missing, none extra).
#[test]
fn committed_schemas_match_the_rust_types() {
    let committed = read_contract(&events_dir());
    let generated = generated();
    let committed_paths: Vec<&String> = committed.keys().collect();
    let generated_paths: Vec<&String> = generated.keys().collect();
    assert_eq!(
        committed_paths, generated_paths,
        "regenerate: cargo run -p domain --features schema --bin event-schemas"
    );
    for (path, schema) in &generated {
        assert_eq!(
            committed.get(path),
            Some(schema),
            "{path} is stale; regenerate: cargo run -p domain --features schema --bin event-schemas"
        );
    }
}

/// Against the committed baseline, every event type and field still exists with a compatible type
/// and no field became required.
#[test]
fn contract_is_backward_compatible_with_the_baseline() {
    let baseline = read_contract(&events_dir().join("baseline"));
    assert!(baseline.len() > 1, "baseline is missing");
    let breaks = compatibility_breaks(&baseline, &generated());
    assert!(breaks.is_empty(), "incompatible event changes: {breaks:#?}");
}

/// The check catches a removed field, a changed type, a new required field and a removed event
/// type, and accepts an added optional field, `T` widened to `T | null` and a new event type.
#[test]
fn compatibility_check_catches_breaking_changes() {
    let baseline = generated();
    let path = "payloads/SandboxAllocated.schema.json";

    let mut added = baseline.clone();
    let doc = added.get_mut(path).unwrap_or_else(|| panic!("{path}"));
    doc["properties"]["seat"] = json!({"type": ["string", "null"]});
    doc["properties"]["lab_duration_s"] = json!({"type": ["integer", "null"], "format": "int64"});
    added.insert(
        "payloads/SandboxRenamed.schema.json".into(),
        json!({"title": "SandboxRenamed"}),
    );
    assert_eq!(
        compatibility_breaks(&baseline, &added),
        Vec::<String>::new()
    );

    let mut removed = baseline.clone();
    if let Some(props) = removed
        .get_mut(path)
        .and_then(|d| d["properties"].as_object_mut())
    {
        props.remove("caller");
    }
    let breaks = compatibility_breaks(&baseline, &removed);
    assert!(
        breaks.iter().any(|b| b.contains("`caller` removed")),
        "{breaks:?}"
    );

    let mut retyped = baseline.clone();
    if let Some(doc) = retyped.get_mut(path) {
        doc["properties"]["lab_duration_s"] = json!({"type": "string"});
    }
    let breaks = compatibility_breaks(&baseline, &retyped);
    assert!(
        breaks
            .iter()
            .any(|b| b.contains("`lab_duration_s` changed type")),
        "{breaks:?}"
    );

    let mut required = baseline.clone();
    if let Some(doc) = required.get_mut(path) {
        doc["properties"]["seat"] = json!({"type": "string"});
        if let Some(list) = doc["required"].as_array_mut() {
            list.push(json!("seat"));
        }
    }
    let breaks = compatibility_breaks(&baseline, &required);
    assert!(
        breaks.iter().any(|b| b.contains("`seat` newly required")),
        "{breaks:?}"
    );

    let mut narrowed = baseline.clone();
    if let Some(doc) = narrowed.get_mut("payloads/ClaimReleased.schema.json") {
        doc["$defs"]["ReleaseReason"]["oneOf"]
            .as_array_mut()
            .map(|members| members.pop());
    }
    let breaks = compatibility_breaks(&baseline, &narrowed);
    assert!(
        breaks.iter().any(|b| b.contains("`reason` changed type")),
        "{breaks:?}"
    );

    let mut dropped = baseline.clone();
    dropped.remove(path);
    let breaks = compatibility_breaks(&baseline, &dropped);
    assert!(breaks.iter().any(|b| b.contains("removed")), "{breaks:?}");
}

/// Checks `value` against the parts of JSON Schema the generated documents use (`$ref` within the
/// document, `oneOf`/`anyOf`, `const`, `enum`, `type`, `format` date-time, `minimum`, `properties`,
/// `required`), and refuses fields the schema does not declare: the contract must describe every
/// field the broker writes.
fn conforms(value: &Value, schema: &Value, root: &Value, at: &str) -> Result<(), String> {
    if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
        let resolved = target
            .strip_prefix('#')
            .and_then(|p| root.pointer(p))
            .ok_or_else(|| format!("{at}: unresolved {target}"))?;
        return conforms(value, resolved, root, at);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema.get(key).and_then(Value::as_array) {
            if !options.iter().any(|o| conforms(value, o, root, at).is_ok()) {
                return Err(format!("{at}: {value} matches no {key} option"));
            }
        }
    }
    if let Some(expected) = schema.get("const") {
        if value != expected {
            return Err(format!("{at}: {value} is not {expected}"));
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            return Err(format!("{at}: {value} not in enum"));
        }
    }
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let fits = types.iter().any(|t| match *t {
            "null" => value.is_null(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            _ => false,
        });
        if !fits {
            return Err(format!("{at}: {value} is not of type {types:?}"));
        }
    }
    if schema.get("format").and_then(Value::as_str) == Some("date-time") {
        if let Some(text) = value.as_str() {
            chrono::DateTime::parse_from_rfc3339(text).map_err(|e| format!("{at}: {text}: {e}"))?;
        }
    }
    if let (Some(minimum), Some(n)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if n < minimum {
            return Err(format!("{at}: {n} < {minimum}"));
        }
    }
    if let Some(items) = schema.get("items") {
        for (i, item) in value.as_array().into_iter().flatten().enumerate() {
            conforms(item, items, root, &format!("{at}[{i}]"))?;
        }
    }
    if let (Some(props), Some(object)) = (
        schema.get("properties").and_then(Value::as_object),
        value.as_object(),
    ) {
        for name in schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(name) {
                return Err(format!("{at}: required `{name}` missing"));
            }
        }
        for (name, field) in object {
            let sub = props
                .get(name)
                .ok_or_else(|| format!("{at}: `{name}` is not in the schema"))?;
            conforms(field, sub, root, &format!("{at}.{name}"))?;
        }
    }
    Ok(())
}

/// Every event a real service records (registration, allocation, claim, release, expiry, cleanup,
/// sync) conforms to the committed envelope and payload schemas.
#[tokio::test]
async fn recorded_events_conform_to_the_committed_schemas() {
    use reqwest::Method;
    use tests::app::{spawn_app, Backend};

    let contract = read_contract(&events_dir());
    let app = spawn_app(Backend::Embedded).await;
    app.seed("ev", 3).await;
    let mut held = Vec::new();
    for caller in ["a", "b"] {
        let body: Value = app
            .allocate(caller)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .json()
            .await
            .unwrap_or(Value::Null);
        held.push(body["sandbox_id"].as_str().unwrap_or_default().to_string());
    }
    let marked = app
        .track(
            Method::POST,
            &format!("/v1/sandboxes/{}/mark-for-deletion", held[0]),
        )
        .header("X-Instruqt-Sandbox-ID", "a")
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(marked.unwrap_or(0), 200);
    // Expiry and cleanup find their work in the view: let the projector apply it first.
    app.wait_until(|s| {
        s.get(domain::SandboxStatus::Allocated) == 1
            && s.get(domain::SandboxStatus::PendingDeletion) == 1
    })
    .await;
    // Past the default lab window (48 h) and its grace.
    app.clock.advance(chrono::Duration::days(3));
    for job in ["auto-expire", "cleanup", "sync"] {
        let ran = app
            .admin(Method::POST, &format!("/v1/admin/{job}"))
            .send()
            .await
            .map(|r| r.status().as_u16());
        assert_eq!(ran.unwrap_or(0), 200, "{job}");
    }
    let mut events = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut request = app
            .admin(Method::GET, "/v1/admin/events")
            .query(&[("limit", "500")]);
        if let Some(cursor) = &cursor {
            request = request.query(&[("cursor", cursor)]);
        }
        let page: Value = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .json()
            .await
            .unwrap_or(Value::Null);
        events.extend(page["events"].as_array().cloned().unwrap_or_default());
        match page["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    app.stop().await;

    let envelope_schema = &contract["envelope.schema.json"];
    let mut seen = std::collections::BTreeSet::new();
    for event in events {
        let mut envelope = event.clone();
        if let Some(map) = envelope.as_object_mut() {
            map.remove("key"); // added by the feed endpoints (asyncapi.yaml)
        }
        let event_type = envelope["event_type"].as_str().unwrap_or("").to_string();
        let payload = envelope["payload"].take();
        envelope["payload"] = json!({});
        let mut envelope_only = envelope_schema.clone();
        envelope_only["properties"]["payload"] = json!({"type": "object"});
        conforms(&envelope, &envelope_only, &envelope_only, "envelope")
            .unwrap_or_else(|e| panic!("{event_type}: {e}"));
        let payload_schema = contract
            .get(&domain::model::schema::payload_path(&event_type))
            .unwrap_or_else(|| panic!("no schema for {event_type}"));
        conforms(&payload, payload_schema, payload_schema, &event_type)
            .unwrap_or_else(|e| panic!("{e}"));
        seen.insert(event_type);
    }
    for expected in [
        "SandboxRegistered",
        "SandboxAllocated",
        "ClaimGranted",
        "DeletionRequested",
        "ClaimReleased",
        "AllocationExpired",
    ] {
        assert!(
            seen.contains(expected),
            "{expected} not exercised: {seen:?}"
        );
    }
}
