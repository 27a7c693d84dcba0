//! Writes the event contract's JSON Schemas under `docs/events/` (or the directory given), and with
//! `--update-baseline` also under its `baseline/`, the contract later versions are checked against.
//!
//! `cargo run -p domain --features schema --bin event-schemas [-- DIR] [--update-baseline]`

use std::path::PathBuf;

fn main() -> anyhow_free::Result {
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/events");
    let mut update_baseline = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--update-baseline" => update_baseline = true,
            "-h" | "--help" => {
                println!("usage: event-schemas [DIR] [--update-baseline]");
                return Ok(());
            }
            dir => out = PathBuf::from(dir),
        }
    }
    let schemas = domain::model::schema::generate()?;
    let mut targets = vec![out.clone()];
    if update_baseline {
        targets.push(out.join("baseline"));
    }
    for dir in targets {
        for (path, doc) in schemas.files() {
            let file = dir.join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&file, format!("{}\n", serde_json::to_string_pretty(&doc)?))?;
        }
        println!(
            "wrote {} schemas to {}",
            schemas.files().len(),
            dir.display()
        );
    }
    Ok(())
}

/// Start-up style errors without pulling `anyhow` into the domain crate.
mod anyhow_free {
    /// Any error, printed by `main`'s `Termination`.
    pub type Result = std::result::Result<(), Box<dyn std::error::Error>>;
}
