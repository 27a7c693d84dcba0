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
        "payloads/LeaseExtended.schema.json".into(),
        json!({"title": "LeaseExtended"}),
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
