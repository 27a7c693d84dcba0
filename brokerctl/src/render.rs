//! Output: JSON for programs, `export` lines for a lab's env file, aligned tables for people.

use serde_json::Value;

/// Quotes `value` for a POSIX shell (single quotes; an embedded `'` becomes `'\''`).
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The text of a JSON scalar (`""` for null, the JSON itself for arrays and objects).
pub fn scalar_text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `export SANDBOX_<FIELD>='value'` lines for each field of an object, in `fields` order (the
/// sandbox id's variable is `SANDBOX_ID`, not `SANDBOX_SANDBOX_ID`).
pub fn env_lines(object: &Value, fields: &[&str]) -> String {
    let mut out = String::new();
    for field in fields {
        let name = field
            .strip_prefix("sandbox_")
            .unwrap_or(field)
            .to_ascii_uppercase();
        out.push_str(&format!(
            "export SANDBOX_{name}={}\n",
            shell_quote(&scalar_text(&object[*field]))
        ));
    }
    out
}

/// Every scalar of a JSON object as (dotted path, value), nested objects flattened
/// (`{"by_prefix":{"lab":{"available":3}}}` → `by_prefix.lab.available`, 3), in key order.
pub fn flat_fields(value: &Value) -> Vec<(String, Value)> {
    fn walk(path: &str, value: &Value, out: &mut Vec<(String, Value)>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, inner) in map {
                    let next = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    walk(&next, inner, out);
                }
            }
            other => out.push((path.to_string(), other.clone())),
        }
    }
    let mut out = Vec::new();
    walk("", value, &mut out);
    out
}

/// A row with its epoch-second `*_at` fields as RFC 3339 UTC times, for people reading a table.
pub fn with_readable_times(row: &Value) -> Value {
    let mut row = row.clone();
    if let Some(map) = row.as_object_mut() {
        for (key, value) in map.iter_mut() {
            if let (true, Some(secs)) = (key.ends_with("_at"), value.as_i64()) {
                if let Some(time) = chrono::DateTime::from_timestamp(secs, 0) {
                    *value = Value::String(time.format("%Y-%m-%dT%H:%M:%SZ").to_string());
                }
            }
        }
    }
    row
}

/// An aligned text table of `rows` (objects) over `columns`.
pub fn table(rows: &[Value], columns: &[&str]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| columns.iter().map(|c| scalar_text(&row[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<String>| -> String {
        let padded: Vec<String> = values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(columns.iter().map(|c| c.to_ascii_uppercase()).collect());
    for row in cells {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Env lines survive quotes and spaces in values when sourced by a shell.
    #[test]
    fn env_lines_quote_values() {
        let v = json!({"sandbox_id": "a'b c", "expires_at": 12, "sfdc_account_id": null});
        assert_eq!(
            env_lines(&v, &["sandbox_id", "expires_at", "sfdc_account_id"]),
            "export SANDBOX_ID='a'\\''b c'\nexport SANDBOX_EXPIRES_AT='12'\nexport SANDBOX_SFDC_ACCOUNT_ID=''\n"
        );
    }

    /// Nested counts flatten to dotted rows; epoch `*_at` fields read as UTC times.
    #[test]
    fn tables_are_written_for_people() {
        let stats = json!({"available": 2, "by_prefix": {"lab": {"available": 2}}});
        assert_eq!(
            flat_fields(&stats),
            vec![
                ("available".to_string(), json!(2)),
                ("by_prefix.lab.available".to_string(), json!(2)),
            ]
        );
        let row = with_readable_times(&json!({"expires_at": 1_767_225_600, "name": "lab-1"}));
        assert_eq!(row["expires_at"], "2026-01-01T00:00:00Z");
        assert_eq!(row["name"], "lab-1");
    }

    /// Table columns are as wide as their widest cell.
    #[test]
    fn table_aligns_columns() {
        let rows = vec![json!({"a": "x", "b": 1}), json!({"a": "longer", "b": null})];
        assert_eq!(table(&rows, &["a", "b"]), "A       B\nx       1\nlonger\n");
    }
}
