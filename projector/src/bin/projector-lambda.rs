//! `projector-lambda`: the projector as an AWS Lambda function on the events table's stream
//! (built with `cargo lambda build --release -p projector --bin projector-lambda`; the handler is
//! [`projector::lambda`]). Configuration from the environment: `TABLE_PREFIX`, `DDB_ENDPOINT_URL`,
//! `AWS_REGION`, `STATS_SHARDS`, `DDB_MAX_RETRIES`.

use std::sync::Arc;

use projector::cli::LogFormat;
use projector::lambda::LambdaConfig;
use projector::{Projector, ProjectorMetrics};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    // JSON lines always: CloudWatch metric filters read $.target, $.message and $.lag_ms.
    runtime::init_tracing(LogFormat::Json);
    let config: LambdaConfig = runtime::parse_settings();
    let store = config.store.dynamo(&config.store.table_prefix).await?;
    // Lambda has no scrape endpoint: the lag reaches CloudWatch through the per-batch log line.
    let projector = Projector::new(
        Arc::new(store.clone()),
        Arc::new(store),
        ProjectorMetrics::unregistered(),
    );
    projector::lambda::run(projector).await
}
