//! `xtask`: maintenance commands of the repository, run with `cargo run -p xtask -- <command>`.
//!
//! | command | what |
//! |---|---|
//! | `config-reference` | rewrite the generated part of `docs/configuration.md` from the clap definitions of every binary |
//! | `config-reference --check` | exit 1 when the checked-in page differs from what would be generated |
//!
//! `cargo test -p xtask` runs the check too, so `cargo test --workspace` fails on a stale page.
//!
//! # Layout
//! - this file — the command line and the page rewrite;
//! - [`reference`] — walking clap `Command`s into the Markdown tables.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};

mod reference;

/// The page and the markers around its generated part.
const PAGE: &str = "docs/configuration.md";
const BEGIN: &str = "<!-- generated: config-reference -->";
const END: &str = "<!-- end generated: config-reference -->";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["config-reference"] => write_page().map(|()| ExitCode::SUCCESS),
        ["config-reference", "--check"] => check_page().map(|stale| {
            if stale {
                eprintln!("{PAGE} is stale: run `cargo run -p xtask -- config-reference`");
                ExitCode::FAILURE
            } else {
                println!("{PAGE} is up to date");
                ExitCode::SUCCESS
            }
        }),
        _ => {
            eprintln!("usage: cargo run -p xtask -- config-reference [--check]");
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn page_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(PAGE)
}

/// The page with its generated part replaced by `generated`.
fn splice(page: &str, generated: &str) -> anyhow::Result<String> {
    let Some(begin) = page.find(BEGIN) else {
        bail!("{PAGE} has no `{BEGIN}` marker");
    };
    let Some(end) = page.find(END) else {
        bail!("{PAGE} has no `{END}` marker");
    };
    if end < begin {
        bail!("{PAGE}: the end marker comes before the begin marker");
    }
    Ok(format!(
        "{}{BEGIN}\n\n{}\n{}",
        &page[..begin],
        generated.trim_end(),
        &page[end..]
    ))
}

fn rendered() -> anyhow::Result<(String, String)> {
    let path = page_path();
    let page =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let updated = splice(&page, &reference::render())?;
    Ok((page, updated))
}

fn write_page() -> anyhow::Result<()> {
    let (page, updated) = rendered()?;
    if page != updated {
        std::fs::write(page_path(), updated).with_context(|| format!("write {PAGE}"))?;
        println!("{PAGE} rewritten");
    } else {
        println!("{PAGE} is up to date");
    }
    Ok(())
}

/// `true` when the checked-in page differs from what would be generated.
fn check_page() -> anyhow::Result<bool> {
    let (page, updated) = rendered()?;
    Ok(page != updated)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in configuration reference is what the clap definitions generate, so a new or
    /// changed setting cannot ship with a stale page.
    #[test]
    fn configuration_reference_is_current() -> anyhow::Result<()> {
        let (page, updated) = rendered()?;
        assert!(
            page == updated,
            "{PAGE} is stale: run `cargo run -p xtask -- config-reference` and commit the page"
        );
        Ok(())
    }

    /// Splicing keeps what is around the markers and is stable when run twice.
    #[test]
    fn splice_replaces_only_the_marked_part() -> anyhow::Result<()> {
        let page = format!("head\n{BEGIN}\nold\n{END}\ntail\n");
        let once = splice(&page, "new\n")?;
        assert_eq!(once, format!("head\n{BEGIN}\n\nnew\n{END}\ntail\n"));
        assert_eq!(splice(&once, "new\n")?, once);
        assert!(splice("no markers", "x").is_err());
        Ok(())
    }
}
