//! The long run of the model-based liveness test on a real store (`tests::liveness_model`; a
//! benchmark-style command that prints figures, not a test): runs random cases until the count
//! is reached or one fails, then prints cases per second, or the seed that reproduces the failure
//! and its shrunk steps (exit status 1).
//!
//! `cargo run --release -p tests --features bench --bin liveness-model -- --store embedded --cases 500`
//! (`--store dynamodb` starts DynamoDB Local, or uses `DDB_ENDPOINT_URL`; `--seed <n>` replays).

use clap::{Parser, ValueEnum};
use tests::liveness_model::{run, ModelStore, RunOptions};

/// The stores the model runs on.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Store {
    /// The embedded store in a fresh file.
    Embedded,
    /// Fresh tables on DynamoDB Local.
    Dynamodb,
}

/// Command-line settings.
#[derive(Debug, Parser)]
#[command(
    name = "liveness-model",
    about = "Long run of the model-based liveness test"
)]
struct Args {
    /// The store under test.
    #[arg(long, value_enum, default_value_t = Store::Embedded)]
    store: Store,
    /// Random cases to run.
    #[arg(long, default_value_t = 500)]
    cases: u32,
    /// Most steps per case.
    #[arg(long, default_value_t = 40)]
    max_steps: usize,
    /// The seed (default: a random one, printed).
    #[arg(long)]
    seed: Option<u64>,
}

fn main() {
    let args = Args::parse();
    let options = RunOptions {
        store: match args.store {
            Store::Embedded => ModelStore::EmbeddedFile,
            Store::Dynamodb => ModelStore::DynamoLocal,
        },
        cases: args.cases,
        max_steps: args.max_steps,
        seed: args.seed.unwrap_or_else(rand::random),
    };
    println!(
        "liveness model on {:?}: {} cases of up to {} steps, seed {}",
        options.store, options.cases, options.max_steps, options.seed
    );
    match run(&options) {
        Ok(report) => {
            let secs = report.elapsed.as_secs_f64().max(f64::EPSILON);
            println!(
                "{} cases, {} steps, {} restarts or crashes, {} notifications ({} repeated after a restart) in {secs:.1} s: {:.2} cases/s, {:.1} steps/s",
                report.cases,
                report.steps,
                report.restarts,
                report.notifications,
                report.repeated_notifications,
                f64::from(report.cases) / secs,
                report.steps as f64 / secs
            );
        }
        Err(failure) => {
            eprintln!("FAILED, replay with --seed: {failure}");
            std::process::exit(1);
        }
    }
}
