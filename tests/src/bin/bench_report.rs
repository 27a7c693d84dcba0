//! `bench-report`: runs the benchmarks the docs quote and writes the benchmark report — the
//! generated part of `docs/benchmarks.md`, SVG plots in `docs/benchmarks/`, and the raw figures in
//! `docs/benchmarks/results.json` (a later run's `--baseline`).
//!
//! ```text
//! cargo build --release -p tests --features bench --bins
//! cargo run --release -p tests --features bench --bin bench-report                  # default size
//! cargo run --release -p tests --features bench --bin bench-report -- --requests 400 --backends embedded
//! cargo run --release -p tests --features bench --bin bench-report -- --baseline old-results.json
//! ```
//!
//! Each backend is driven by the `loadgen` binary beside this one (a child process per backend,
//! killed after `--timeout` seconds), at every concurrency level, with the pool sized to the run.
//! Traffic goes to 127.0.0.1 only. The report states the commit, the date and the machine (CPU
//! model and cores) it was produced on; with `--baseline`, every figure gets its ratio to the
//! baseline's.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use plotters::prelude::*;
use serde_json::Value;

const BEGIN: &str = "<!-- generated: bench-report -->";
const END: &str = "<!-- end generated: bench-report -->";

#[derive(Debug, Parser)]
#[command(
    name = "bench-report",
    about = "Run the benchmarks and write the report"
)]
struct Args {
    /// Stores to drive (`embedded`, `dynamo`).
    #[arg(long, value_delimiter = ',', default_value = "embedded,dynamo")]
    backends: Vec<String>,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,400")]
    concurrency: Vec<usize>,
    /// Allocation requests per level (the size of the run).
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Seconds after which a backend's run is stopped (its figures are then missing).
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// A previous `results.json`: figures get their ratio to it.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// The page whose generated part is rewritten.
    #[arg(long, default_value = "docs/benchmarks.md")]
    page: PathBuf,
    /// Where the plots and `results.json` go.
    #[arg(long, default_value = "docs/benchmarks")]
    out_dir: PathBuf,
    /// Run nothing: draw allocations/s and p99 against concurrency, side by side in one SVG
    /// (`--plot-to`), from this JSON (`{"runs": {series: {"levels": [...]}}}`, the shape of
    /// `results.json`; `scripts/bench-reference.sh` writes it).
    #[arg(long, requires = "plot_to")]
    plot_from: Option<PathBuf>,
    /// The SVG `--plot-from` draws.
    #[arg(long, requires = "plot_from")]
    plot_to: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let (Some(from), Some(to)) = (&args.plot_from, &args.plot_to) {
        let results: Value = serde_json::from_slice(
            &std::fs::read(from).with_context(|| format!("read {}", from.display()))?,
        )?;
        return plot_throughput_and_p99(&results, to);
    }
    let loadgen = std::env::current_exe()?.with_file_name("loadgen");
    if !loadgen.exists() {
        bail!(
            "{} is missing: build it first (cargo build --release -p tests --features bench --bins)",
            loadgen.display()
        );
    }
    std::fs::create_dir_all(&args.out_dir)?;
    let mut runs = BTreeMap::new();
    for backend in &args.backends {
        eprintln!("bench-report: {backend} at {:?} …", args.concurrency);
        let run = run_loadgen(&loadgen, backend, &args).await?;
        runs.insert(backend.clone(), run);
    }
    let results = serde_json::json!({
        "commit": command_output("git", &["rev-parse", "--short=12", "HEAD"]),
        "date": chrono::Utc::now().format("%Y-%m-%d").to_string(),
        "cpu": cpu_model(),
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "requests_per_level": args.requests,
        "runs": runs,
    });
    let baseline = match &args.baseline {
        Some(path) => Some(serde_json::from_slice::<Value>(
            &std::fs::read(path).with_context(|| format!("read {}", path.display()))?,
        )?),
        None => None,
    };
    std::fs::write(
        args.out_dir.join("results.json"),
        serde_json::to_vec_pretty(&results)?,
    )?;
    plot_against_concurrency(
        &results,
        "created_per_s",
        "allocations/s (201)",
        &args.out_dir.join("throughput.svg"),
    )?;
    plot_against_concurrency(
        &results,
        "p99_ms",
        "p99 latency, ms",
        &args.out_dir.join("p99.svg"),
    )?;
    plot_lag(&results, &args.out_dir.join("lag.svg"))?;
    let generated = render(&results, baseline.as_ref(), &args.out_dir, &args.page);
    let page = std::fs::read_to_string(&args.page)
        .with_context(|| format!("read {}", args.page.display()))?;
    std::fs::write(&args.page, splice(&page, &generated)?)?;
    eprintln!(
        "bench-report: wrote {} and {}",
        args.page.display(),
        args.out_dir.display()
    );
    Ok(())
}

/// One backend's levels, from `loadgen --json`.
async fn run_loadgen(loadgen: &Path, backend: &str, args: &Args) -> anyhow::Result<Value> {
    let json = std::env::temp_dir().join(format!("bench-report-{}.json", uuid::Uuid::new_v4()));
    let levels: Vec<String> = args.concurrency.iter().map(ToString::to_string).collect();
    // Every level's 201s come from one pool that must not run dry (the tail would measure 409s).
    let pool = args.requests * args.concurrency.len() + 500;
    let mut child = tokio::process::Command::new(loadgen)
        .args(["--backend", backend, "--concurrency", &levels.join(",")])
        .args(["--requests", &args.requests.to_string()])
        .args(["--pool", &pool.to_string(), "--json"])
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", loadgen.display()))?;
    let status = tokio::time::timeout(Duration::from_secs(args.timeout), child.wait()).await;
    match status {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => bail!("loadgen --backend {backend} failed: {status}"),
        Ok(Err(e)) => bail!("loadgen --backend {backend}: {e}"),
        Err(_) => {
            let _ = child.kill().await;
            bail!("loadgen --backend {backend} ran past {} s", args.timeout)
        }
    }
    let value = serde_json::from_slice(&std::fs::read(&json)?)?;
    let _ = std::fs::remove_file(&json);
    Ok(value)
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The levels of every backend: (backend, [(concurrency, level)]).
fn levels(results: &Value) -> Vec<(String, Vec<(f64, Value)>)> {
    let Some(runs) = results["runs"].as_object() else {
        return Vec::new();
    };
    runs.iter()
        .map(|(backend, run)| {
            let levels = run["levels"]
                .as_array()
                .map(|levels| {
                    levels
                        .iter()
                        .map(|l| (l["concurrency"].as_f64().unwrap_or(0.0), l.clone()))
                        .collect()
                })
                .unwrap_or_default();
            (backend.clone(), levels)
        })
        .collect()
}

const COLOURS: [RGBColor; 4] = [BLUE, RED, GREEN, MAGENTA];

fn plot_against_concurrency(
    results: &Value,
    field: &str,
    label: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    draw_against_concurrency(&root, results, field, label)?;
    root.present()?;
    Ok(())
}

/// Allocations/s and p99 against concurrency, side by side in one SVG: one picture compares
/// every series on both figures.
fn plot_throughput_and_p99(results: &Value, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1200, 440)).into_drawing_area();
    let (left, right) = root.split_horizontally(600);
    draw_against_concurrency(&left, results, "created_per_s", "allocations/s (201)")?;
    draw_against_concurrency(&right, results, "p99_ms", "p99 latency, ms")?;
    root.present()?;
    Ok(())
}

fn draw_against_concurrency<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    results: &Value,
    field: &str,
    label: &str,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let series: Vec<(String, Vec<(f64, f64)>)> = levels(results)
        .into_iter()
        .map(|(backend, levels)| {
            let points = levels
                .iter()
                .filter_map(|(c, l)| l[field].as_f64().map(|v| (c.max(1.0).log10(), v)))
                .collect();
            (backend, points)
        })
        .collect();
    let max_y = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(0.0_f64, f64::max)
        .max(1.0)
        * 1.1;
    let max_x = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(0.0_f64, f64::max)
        .max(1.0);
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(format!("{label} against concurrency"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc("concurrent clients (log scale)")
        .y_desc(label)
        .x_label_formatter(&|x| format!("{:.0}", 10f64.powf(*x)))
        .draw()?;
    for (i, (backend, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
            .label(backend.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, colour.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Projector lag against time during the highest-concurrency level of each backend.
fn plot_lag(results: &Value, path: &Path) -> anyhow::Result<()> {
    let series: Vec<(String, Vec<(f64, f64)>)> = levels(results)
        .into_iter()
        .filter_map(|(backend, levels)| {
            let (c, level) = levels.last()?.clone();
            let points = level["lag_series"]
                .as_array()?
                .iter()
                .filter_map(|p| Some((p[0].as_f64()? / 1000.0, p[1].as_f64()?)))
                .collect();
            Some((format!("{backend}, C={c}"), points))
        })
        .collect();
    let max_x = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let max_y = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(0.0_f64, f64::max)
        .max(10.0)
        * 1.1;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("projector lag during the run", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc("seconds into the level")
        .y_desc("lag, ms")
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// `value (×ratio)` when the baseline has the same figure.
fn with_ratio(value: Option<f64>, base: Option<f64>, digits: usize) -> String {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{v:.digits$} (×{:.2})", v / b),
        (Some(v), _) => format!("{v:.digits$}"),
        (None, _) => "–".into(),
    }
}

fn render(results: &Value, baseline: Option<&Value>, out_dir: &Path, page: &Path) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Produced by `bench-report` at commit `{}` on {}, on {} ({} cores), {} allocation requests \
         per level. Figures are from one run on a machine that may have been shared; compare \
         ratios within a run.\n",
        results["commit"].as_str().unwrap_or("?"),
        results["date"].as_str().unwrap_or("?"),
        results["cpu"].as_str().unwrap_or("?"),
        results["cores"],
        results["requests_per_level"]
    );
    if let Some(base) = baseline {
        let _ = writeln!(
            out,
            "Ratios (×) are to the baseline at commit `{}` ({}).\n",
            base["commit"].as_str().unwrap_or("?"),
            base["date"].as_str().unwrap_or("?")
        );
    }
    let rel = |name: &str| {
        let dir = out_dir
            .strip_prefix(page.parent().unwrap_or(Path::new("")))
            .unwrap_or(out_dir);
        format!("{}/{name}", dir.display())
    };
    let _ = writeln!(
        out,
        "![allocations per second against concurrency]({})\n\n![p99 against concurrency]({})\n\n![projector lag during the run]({})\n",
        rel("throughput.svg"),
        rel("p99.svg"),
        rel("lag.svg")
    );
    out.push_str(
        "| store | clients | requests | 201/s | p50 ms | p99 ms | store requests / 201 | RCU / 201 | WCU / 201 | event transactions / 201 | cancelled / 201 | lag p99 ms | statuses |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let base_levels: BTreeMap<(String, u64), Value> = baseline
        .map(|b| {
            levels(b)
                .into_iter()
                .flat_map(|(backend, levels)| {
                    levels
                        .into_iter()
                        .map(move |(c, l)| ((backend.clone(), c as u64), l))
                })
                .collect()
        })
        .unwrap_or_default();
    for (backend, levels) in levels(results) {
        for (c, level) in levels {
            let base = base_levels.get(&(backend.clone(), c as u64));
            let field = |name: &str| level[name].as_f64();
            let base_field = |name: &str| base.and_then(|b| b[name].as_f64());
            // Absent from reports of builds before these figures existed.
            let contention = |name: &str| level["contention"][name].as_f64();
            let base_contention = |name: &str| base.and_then(|b| b["contention"][name].as_f64());
            let _ = writeln!(
                out,
                "| {backend} | {c} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                level["requests"],
                with_ratio(field("created_per_s"), base_field("created_per_s"), 0),
                with_ratio(field("p50_ms"), base_field("p50_ms"), 1),
                with_ratio(field("p99_ms"), base_field("p99_ms"), 1),
                with_ratio(
                    field("store_requests_per_201"),
                    base_field("store_requests_per_201"),
                    2
                ),
                with_ratio(field("rcu_per_201"), base_field("rcu_per_201"), 2),
                with_ratio(field("wcu_per_201"), base_field("wcu_per_201"), 2),
                with_ratio(
                    contention("event_transactions_per_201"),
                    base_contention("event_transactions_per_201"),
                    2
                ),
                with_ratio(
                    contention("cancellations_per_201"),
                    base_contention("cancellations_per_201"),
                    2
                ),
                with_ratio(field("lag_p99_ms"), base_field("lag_p99_ms"), 0),
                level["statuses"]
            );
        }
    }
    out
}

fn splice(page: &str, generated: &str) -> anyhow::Result<String> {
    let (Some(begin), Some(end)) = (page.find(BEGIN), page.find(END)) else {
        bail!("the page needs the markers `{BEGIN}` and `{END}`");
    };
    if end < begin {
        bail!("the end marker comes before the begin marker");
    }
    Ok(format!(
        "{}{BEGIN}\n\n{}\n{}",
        &page[..begin],
        generated.trim_end(),
        &page[end..]
    ))
}
