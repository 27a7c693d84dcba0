//! Throughput of the API's rate limiter (a benchmark that prints figures, not a test): checks per
//! second with 1 and 4 threads, for a small hot key set and for a key stream far larger than the
//! bound (every check a new key, so generations rotate constantly), plus the keys tracked at the
//! end — which must stay within the bound however many keys went through.
//!
//! `cargo run --release -p tests --features bench --bin rate_limit_bench [-- --checks 2000000 --max-keys 100000]`

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use command_api::rate_limit::RateLimiter;

/// Command-line settings.
#[derive(Debug, Parser)]
#[command(name = "rate_limit_bench", about = "Rate limiter benchmark")]
struct Args {
    /// Checks per case (split over the threads).
    #[arg(long, default_value_t = 2_000_000)]
    checks: usize,
    /// The limiter's key bound (`RATE_LIMIT_MAX_KEYS`).
    #[arg(long, default_value_t = 100_000)]
    max_keys: usize,
    /// Distinct keys of the hot case.
    #[arg(long, default_value_t = 1_000)]
    hot_keys: usize,
}

fn run(args: &Args, threads: usize, churn: bool) -> (f64, usize) {
    let limiter = Arc::new(RateLimiter::new(50.0, 200.0, args.max_keys));
    let per_thread = args.checks / threads;
    let hot_keys = args.hot_keys.max(1);
    let keys: Vec<String> = (0..hot_keys)
        .map(|i| format!("track::student-{i}"))
        .collect();
    let keys = Arc::new(keys);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let limiter = limiter.clone();
            let keys = keys.clone();
            std::thread::spawn(move || {
                let now = Instant::now();
                let mut allowed = 0usize;
                for i in 0..per_thread {
                    let decision = if churn {
                        limiter.check(&format!("addr:{t}-{i}"), now)
                    } else {
                        limiter.check(&keys[(i * 7 + t) % keys.len()], now)
                    };
                    allowed += usize::from(decision.allowed);
                }
                allowed
            })
        })
        .collect();
    for handle in handles {
        let _ = handle.join();
    }
    let rate = (per_thread * threads) as f64 / started.elapsed().as_secs_f64();
    (rate, limiter.tracked())
}

fn main() {
    let args = Args::parse();
    println!(
        "| keys | threads | checks/s | keys tracked at the end (bound {}) |",
        args.max_keys
    );
    println!("|---|---|---|---|");
    for churn in [false, true] {
        for threads in [1, 4] {
            let (rate, tracked) = run(&args, threads, churn);
            let keys = if churn {
                format!("every check a new key ({} in all)", args.checks)
            } else {
                format!("{} hot keys", args.hot_keys)
            };
            println!("| {keys} | {threads} | {rate:.0} | {tracked} |");
        }
    }
}
