//! The published event contract: JSON Schemas (draft 2020-12) of every event payload and of the
//! envelope, generated from the Rust types so they cannot drift from what is stored, and the
//! backward-compatibility rule stream consumers rely on: between a baseline and now, fields are
//! only added — none removed, none changing type, no new required field — unless the event type
//! has an upcaster from the baseline's schema version (then old payloads are converted on read).
//! Behind the `schema` feature so the services do not carry schemars.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use super::events::{
    AdminJobEvent, ClaimEvent, EventEnvelope, PoolControlEvent, QuotaEvent, ReservationEvent,
    SandboxEvent, SyncEvent, TicketEvent, UsageEvent, CURRENT_SCHEMA_VERSION, EVENT_TYPES,
    UPCASTERS,
};

/// The JSON Schema dialect of every generated document.
pub const DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";

/// The generated contract.
#[derive(Debug, Clone, PartialEq)]
pub struct EventSchemas {
    /// The envelope (`envelope.schema.json`); its `payload` is one of the payload schemas.
    pub envelope: Value,
    /// Each event type's payload schema (`payloads/<type>.schema.json`), by event type.
    pub payloads: BTreeMap<String, Value>,
}

impl EventSchemas {
    /// Every document by its path under `docs/events/`.
    pub fn files(&self) -> BTreeMap<String, Value> {
        let mut files = BTreeMap::new();
        files.insert("envelope.schema.json".to_string(), self.envelope.clone());
        for (event_type, schema) in &self.payloads {
            files.insert(payload_path(event_type), schema.clone());
        }
        files
    }
}

/// Where an event type's payload schema lives under `docs/events/`.
pub fn payload_path(event_type: &str) -> String {
    format!("payloads/{event_type}.schema.json")
}

/// Why the contract could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// An entry of `EVENT_TYPES` has no variant in the event enums, or the reverse.
    #[error("event types and enum variants differ: {0}")]
    Mismatch(String),
    /// schemars produced something of an unexpected shape.
    #[error("unexpected schema shape for {0}")]
    Shape(String),
}

/// Generates the contract for every type in [`EVENT_TYPES`].
pub fn generate() -> Result<EventSchemas, SchemaError> {
    let mut payloads = BTreeMap::new();
    for (stream, root) in [
        ("sandbox", schema_value::<SandboxEvent>()),
        ("claim", schema_value::<ClaimEvent>()),
        ("sync", schema_value::<SyncEvent>()),
        ("adminjob", schema_value::<AdminJobEvent>()),
        ("pool-control", schema_value::<PoolControlEvent>()),
        ("quota", schema_value::<QuotaEvent>()),
        ("reservation", schema_value::<ReservationEvent>()),
        ("usage", schema_value::<UsageEvent>()),
        ("ticket", schema_value::<TicketEvent>()),
    ] {
        let defs = root.get("$defs").cloned();
        let variants = root
            .get("oneOf")
            .and_then(Value::as_array)
            .ok_or_else(|| SchemaError::Shape(stream.to_string()))?;
        for variant in variants {
            let event_type =
                variant_tag(variant).ok_or_else(|| SchemaError::Shape(stream.into()))?;
            let mut doc = Map::new();
            doc.insert("$schema".into(), json!(DIALECT));
            doc.insert("title".into(), json!(event_type));
            doc.insert("x-stream".into(), json!(stream));
            doc.insert("x-schema-version".into(), json!(CURRENT_SCHEMA_VERSION));
            if let Value::Object(fields) = variant {
                for (k, v) in fields {
                    doc.insert(k.clone(), v.clone());
                }
            }
            if let Some(defs) = &defs {
                if variant.to_string().contains("#/$defs/") {
                    doc.insert("$defs".into(), defs.clone());
                }
            }
            payloads.insert(event_type, Value::Object(doc));
        }
    }
    let known: BTreeSet<&str> = EVENT_TYPES.iter().copied().collect();
    let generated: BTreeSet<&str> = payloads.keys().map(String::as_str).collect();
    if known != generated {
        return Err(SchemaError::Mismatch(format!(
            "only in EVENT_TYPES: {:?}; only in the enums: {:?}",
            known.difference(&generated).collect::<Vec<_>>(),
            generated.difference(&known).collect::<Vec<_>>()
        )));
    }
    let mut envelope = schema_value::<EventEnvelope>();
    let refs: Vec<Value> = EVENT_TYPES
        .iter()
        .map(|t| json!({"$ref": payload_path(t)}))
        .collect();
    if let Some(payload) = envelope.pointer_mut("/properties/payload") {
        let description = payload.get("description").cloned();
        *payload = json!({"oneOf": refs});
        if let Some(description) = description {
            payload["description"] = description;
        }
    }
    if let Some(event_type) = envelope.pointer_mut("/properties/event_type") {
        event_type["enum"] = json!(EVENT_TYPES.as_slice());
    }
    envelope["$schema"] = json!(DIALECT);
    envelope["x-schema-version"] = json!(CURRENT_SCHEMA_VERSION);
    Ok(EventSchemas { envelope, payloads })
}

fn schema_value<T: JsonSchema>() -> Value {
    schemars::schema_for!(T).to_value()
}

/// The `type` tag of an internally tagged variant's schema.
fn variant_tag(variant: &Value) -> Option<String> {
    let tag = variant.pointer("/properties/type")?;
    tag.get("const")
        .or_else(|| tag.get("enum").and_then(|e| e.get(0)))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Every backward-incompatible difference between a baseline contract and the current one, as
/// readable lines (empty: compatible). Both maps are documents by path, as [`EventSchemas::files`].
pub fn compatibility_breaks(
    baseline: &BTreeMap<String, Value>,
    current: &BTreeMap<String, Value>,
) -> Vec<String> {
    let mut breaks = Vec::new();
    for (path, old) in baseline {
        let Some(new) = current.get(path) else {
            breaks.push(format!(
                "{path}: removed (stored events of this type still exist)"
            ));
            continue;
        };
        let title = old["title"].as_str().unwrap_or(path);
        let old_version = old["x-schema-version"].as_u64().unwrap_or(1) as u32;
        let upcasted = UPCASTERS
            .iter()
            .any(|u| u.event_type == title && u.from_version >= old_version);
        if upcasted {
            continue;
        }
        breaks.extend(
            document_breaks(old, new)
                .into_iter()
                .map(|b| format!("{path}: {b}")),
        );
    }
    breaks
}

fn document_breaks(old: &Value, new: &Value) -> Vec<String> {
    let mut breaks = Vec::new();
    let empty = Map::new();
    let old_props = old["properties"].as_object().unwrap_or(&empty);
    let new_props = new["properties"].as_object().unwrap_or(&empty);
    for (name, old_field) in old_props {
        match new_props.get(name) {
            None => breaks.push(format!("field `{name}` removed")),
            Some(new_field) => {
                let old_shape = shape(old_field, old);
                let new_shape = shape(new_field, new);
                if !compatible_shape(&old_shape, &new_shape) {
                    breaks.push(format!(
                        "field `{name}` changed type: {old_shape} -> {new_shape}"
                    ));
                }
            }
        }
    }
    let required = |doc: &Value| -> BTreeSet<String> {
        doc["required"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    for name in required(new).difference(&required(old)) {
        breaks.push(format!("field `{name}` newly required"));
    }
    breaks
}

/// A field's schema without documentation, with local `$ref`s resolved against `doc`.
fn shape(field: &Value, doc: &Value) -> Value {
    match field {
        Value::Object(map) => {
            if let Some(target) = map.get("$ref").and_then(Value::as_str) {
                if let Some(pointer) = target.strip_prefix('#') {
                    if let Some(resolved) = doc.pointer(pointer) {
                        return shape(resolved, doc);
                    }
                }
            }
            Value::Object(
                map.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "description" | "title" | "default"))
                    .map(|(k, v)| (k.clone(), shape(v, doc)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| shape(v, doc)).collect()),
        other => other.clone(),
    }
}

/// Same shape, or a widening every old value still satisfies: `T` → `T | null`, an enum or a
/// `oneOf` that gained members.
fn compatible_shape(old: &Value, new: &Value) -> bool {
    if old == new {
        return true;
    }
    let (Some(old_map), Some(new_map)) = (old.as_object(), new.as_object()) else {
        return false;
    };
    let keys: BTreeSet<&String> = old_map.keys().chain(new_map.keys()).collect();
    keys.into_iter().all(|key| {
        let (a, b) = (old_map.get(key), new_map.get(key));
        match (key.as_str(), a, b) {
            (_, Some(a), Some(b)) if a == b => true,
            ("type", Some(Value::String(t)), Some(Value::Array(ts))) => {
                ts.iter().all(|x| x == t || x == "null") && ts.contains(&json!(t))
            }
            ("enum" | "oneOf" | "anyOf", Some(Value::Array(a)), Some(Value::Array(b))) => {
                a.iter().all(|x| b.contains(x))
            }
            _ => false,
        }
    })
}
