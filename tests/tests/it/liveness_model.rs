//! The model-based liveness test on the real stores (`tests::liveness_model`, docs/liveness.md):
//! a bounded number of random cases on the embedded file store and on DynamoDB Local, each step
//! checked for double allocations, lost acknowledged allocations, false 409s and notifications
//! missing or arriving for nothing. `LIVENESS_MODEL_SEED=<n>` replays a failure; the long run is
//! the `liveness-model` bench.

use tests::liveness_model::{run, ModelStore, RunOptions};

/// The seed: `LIVENESS_MODEL_SEED`, else a random one (printed, and named by a failure).
fn seed() -> u64 {
    std::env::var("LIVENESS_MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random)
}

fn run_bounded(store: ModelStore, cases: u32, max_steps: usize) {
    let options = RunOptions {
        store,
        cases,
        max_steps,
        seed: seed(),
    };
    match run(&options) {
        Ok(report) => println!(
            "{store:?} seed {}: {} cases, {} steps, {} restarts, {} notifications ({} repeated) in {:.1} s",
            options.seed,
            report.cases,
            report.steps,
            report.restarts,
            report.notifications,
            report.repeated_notifications,
            report.elapsed.as_secs_f64()
        ),
        Err(failure) => panic!("LIVENESS_MODEL_SEED={failure}"),
    }
}

/// Embedded file store: 32 random cases of up to 30 steps keep every invariant of the model.
#[test]
fn embedded_file_store() {
    run_bounded(ModelStore::EmbeddedFile, 32, 30);
}

/// DynamoDB Local: 24 random cases of up to 20 steps keep every invariant of the model.
#[test]
fn dynamodb_local() {
    let _turn = tests::ddb_local::heavy_load_blocking();
    run_bounded(ModelStore::DynamoLocal, 24, 20);
}
