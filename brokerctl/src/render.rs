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

    /// Table columns are as wide as their widest cell.
    #[test]
    fn table_aligns_columns() {
        let rows = vec![json!({"a": "x", "b": 1}), json!({"a": "longer", "b": null})];
        assert_eq!(table(&rows, &["a", "b"]), "A       B\nx       1\nlonger\n");
    }
}
