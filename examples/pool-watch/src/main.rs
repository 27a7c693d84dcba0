//! `pool-watch`: a sample consumer of the broker's event contract (`docs/events/`). It follows the
//! live feed from the first event, folds each sandbox's events into its status, and keeps live
//! counts per name prefix (`lab-0007` counts under `lab`). A snapshot file holds the fold together
//! with the id of the last event folded, so a restart resumes with `Last-Event-ID` from exactly
//! there: no event is counted twice or missed.
//!
//! ```text
//! BROKER_ADMIN_TOKEN=… pool-watch --url http://127.0.0.1:8080 --snapshot /var/lib/pool-watch.json
//! ```
//!
//! Like every consumer should, it ignores event types and fields it does not know.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use brokerctl::client::{Broker, Token};
use brokerctl::live_feed::LiveFeed;
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Follow the broker's events and print live counts per name prefix.
#[derive(Debug, Parser)]
struct Args {
    /// Base URL of the broker.
    #[arg(long, env = "BROKER_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Fold and resume point, kept across restarts.
    #[arg(long, env = "POOL_WATCH_SNAPSHOT")]
    snapshot: Option<PathBuf>,
    /// Print the counts at most this often (seconds).
    #[arg(long, default_value_t = 5)]
    print_every: u64,
    /// Stop after this many events (then print the counts as JSON).
    #[arg(long)]
    count: Option<u64>,
}

/// The fold: each sandbox's prefix and status, and where the feed resumes.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    /// Id of the last event folded (`Last-Event-ID` on resume).
    last_id: Option<String>,
    /// sandbox id → (name prefix, status).
    sandboxes: BTreeMap<String, (String, String)>,
}

impl Snapshot {
    /// Folds one envelope (the feed's `data`).
    fn apply(&mut self, envelope: &Value) {
        let Some(id) = envelope["stream_id"]
            .as_str()
            .and_then(|s| s.strip_prefix("sandbox#"))
        else {
            return; // claim and sync streams say nothing about the pool
        };
        let payload = &envelope["payload"];
        let status = match envelope["event_type"].as_str().unwrap_or("") {
            "SandboxRegistered" => {
                let name = payload["name"].as_str().unwrap_or("");
                self.sandboxes
                    .insert(id.to_string(), (prefix_of(name), "available".into()));
                return;
            }
            "SandboxAllocated" => "allocated",
            "DeletionRequested" | "AllocationExpired" | "DeletionRetried" => "pending_deletion",
            "SandboxMarkedStale" => "stale",
            "SandboxRestored" => "available",
            "DeletionFailed" => "deletion_failed",
            "SandboxDeleted" | "SandboxRetired" => "deleted",
            _ => return, // retries, leases and types added later do not move the status
        };
        if let Some(entry) = self.sandboxes.get_mut(id) {
            entry.1 = status.to_string();
        }
    }

    /// prefix → status → count (deleted sandboxes are not counted).
    fn counts(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (prefix, status) in self.sandboxes.values() {
            if status != "deleted" {
                *counts
                    .entry(prefix.clone())
                    .or_default()
                    .entry(status.clone())
                    .or_default() += 1;
            }
        }
        counts
    }

    fn load(path: &Path) -> Self {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    /// Writes the snapshot atomically: the fold and its resume point always match.
    fn save(&self, path: &Path) -> std::io::Result<()> {
        let temp = path.with_extension("tmp");
        std::fs::write(&temp, serde_json::to_vec(self).unwrap_or_default())?;
        std::fs::rename(&temp, path)
    }
}

/// `lab-0007` → `lab`; a name without a dash is its own prefix.
fn prefix_of(name: &str) -> String {
    name.rsplit_once('-')
        .map_or(name, |(prefix, _)| prefix)
        .to_string()
}

fn print_counts(snapshot: &Snapshot) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<24} {:>9} {:>9} {:>9} {:>7} {:>7}",
        "PREFIX", "AVAILABLE", "ALLOCATED", "PENDING", "STALE", "FAILED"
    );
    for (prefix, by_status) in snapshot.counts() {
        let n = |s: &str| by_status.get(s).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{prefix:<24} {:>9} {:>9} {:>9} {:>7} {:>7}",
            n("available"),
            n("allocated"),
            n("pending_deletion"),
            n("stale"),
            n("deletion_failed")
        );
    }
    let _ = out.flush();
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let token = match std::env::var("BROKER_ADMIN_TOKEN").map(|t| Token::new(&t)) {
        Ok(Ok(token)) => token,
        _ => {
            eprintln!("pool-watch: set BROKER_ADMIN_TOKEN");
            return std::process::ExitCode::from(3);
        }
    };
    let mut snapshot = args
        .snapshot
        .as_deref()
        .map(Snapshot::load)
        .unwrap_or_default();
    // With no snapshot, start before all history: the server replays every event from the first.
    let since = snapshot
        .last_id
        .clone()
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string());
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            eprintln!("pool-watch: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut feed = LiveFeed::new(Broker::with_client(http, &args.url, token), Some(since));
    let mut seen = 0u64;
    let mut last_print = Instant::now();
    let print_every = Duration::from_secs(args.print_every);
    let result = feed
        .follow(|event| {
            if let Ok(envelope) = serde_json::from_str::<Value>(&event.data) {
                snapshot.apply(&envelope);
            }
            snapshot.last_id.clone_from(&event.id);
            seen += 1;
            if let Some(path) = &args.snapshot {
                if let Err(e) = snapshot.save(path) {
                    eprintln!("pool-watch: snapshot {}: {e}", path.display());
                }
            }
            if args.count.is_some_and(|n| seen >= n) {
                return ControlFlow::Break(());
            }
            if last_print.elapsed() >= print_every {
                print_counts(&snapshot);
                last_print = Instant::now();
            }
            ControlFlow::Continue(())
        })
        .await;
    match result {
        Ok(()) => {
            println!(
                "{}",
                serde_json::to_string(&snapshot.counts()).unwrap_or_default()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("pool-watch: {failure}");
            std::process::ExitCode::from(failure.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(id: &str, event_type: &str, payload: Value) -> Value {
        json!({"stream_id": format!("sandbox#{id}"), "event_type": event_type, "payload": payload})
    }

    /// Registration, allocation and release move a sandbox between the counts of its prefix;
    /// claim events and unknown types change nothing.
    #[test]
    fn fold_counts_per_prefix() {
        let mut s = Snapshot::default();
        s.apply(&event(
            "1",
            "SandboxRegistered",
            json!({"name": "lab-0001"}),
        ));
        s.apply(&event(
            "2",
            "SandboxRegistered",
            json!({"name": "lab-0002"}),
        ));
        s.apply(&event(
            "3",
            "SandboxRegistered",
            json!({"name": "aws-x-0001"}),
        ));
        s.apply(&event("1", "SandboxAllocated", json!({})));
        s.apply(&json!({"stream_id": "claim#a#b", "event_type": "ClaimGranted"}));
        s.apply(&event("2", "SomethingNew", json!({})));
        s.apply(&event("3", "SandboxDeleted", json!({})));
        let counts = s.counts();
        assert_eq!(counts["lab"]["available"], 1);
        assert_eq!(counts["lab"]["allocated"], 1);
        assert!(!counts.contains_key("aws-x"));
        s.apply(&event("1", "DeletionRequested", json!({})));
        assert_eq!(s.counts()["lab"]["pending_deletion"], 1);
    }
}
