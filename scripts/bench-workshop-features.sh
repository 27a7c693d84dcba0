#!/usr/bin/env bash
# Allocation with the workshop features active against without, in one run: the same build, the
# same load generator, the same shape, runs alternating so that drift on a shared machine hits
# both variants alike.
#
#   bash scripts/bench-workshop-features.sh [--backend embedded|dynamo] [--runs N] [--keep DIR]
#                                           [--write docs/benchmarks.md] [--shape levels|line|both]
#
# Shape: 1,200 students over 4 tracks (300 each), 100 at a time, pool 2,000.
#   without   no reservation, no Prefer header
#   with      300 sandboxes reserved for the first track before the run (ADR 0028: its students
#             draw from the earmarks, the other tracks never see them), and `Prefer: wait=5` on
#             every request (ADR 0029). The pool does not run dry in this shape, so the header's
#             cost is measured on the normal path: no line forms.
# Prints, per variant, the range over the runs of 201/s, p50 and p99, the statuses, and the
# ratio with/without of each run pair; with --write, also replaces the part of that page between
# `<!-- generated: bench-workshop-features BACKEND -->` and its end marker.
#
# Shape `line` (a waiting line that forms and is served): 600 students over 4 tracks arrive one
# every 10 ms, each with `Prefer: wait=10`, at a pool of 100; during the run 400 new sandboxes
# are registered, 20 every 300 ms. More arrive than the pool and the supply hold, so the line
# grows, is served from the supply, and the last 100 waits run out. Prints the range over the
# runs of the students served at once and from the line, the wait of those served from the
# line (p50/p99, as the service recorded it on the allocation), how many of a track were served
# after a later arrival of the same track, the 409s after a wait and the longest line
# (`broker_waiting_line_length`); with --write, into `<!-- generated: bench-workshop-line BACKEND -->`.
# Each run stops by itself when the last student is answered (about 20 s).
#
# `--shape` picks the levels (with against without), the line, or both (the default). Needs a release build of loadgen
# (cargo build --release -p tests --features bench --bins) and python3; traffic stays on
# 127.0.0.1 and every run is bounded by its request count.
set -euo pipefail
cd "$(dirname "$0")/.."

backend=embedded runs=3 keep= write= shape=both
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) backend=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    --write) write=$2; shift 2 ;;
    --shape) shape=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
loadgen=${LOADGEN:-target/release/loadgen}
[ -x "$loadgen" ] || { echo "$loadgen is missing: cargo build --release -p tests --features bench --bins" >&2; exit 2; }
if [ -n "$keep" ]; then
  out=$keep
  mkdir -p "$out"
else
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi

case "$shape" in levels | line | both) ;; *) echo "--shape is levels, line or both, not $shape" >&2; exit 2 ;; esac

if [ "$shape" != line ]; then
levels=(--backend "$backend" --pool 2000 --tracks 4 --concurrency 100 --requests 1200)
for run in $(seq 1 "$runs"); do
  for variant in without with; do
    extra=()
    [ "$variant" = with ] && extra=(--reserve 300 --prefer-wait 5)
    echo "run $run, $variant …" >&2
    "$loadgen" "${levels[@]}" "${extra[@]}" --json "$out/$variant--$run.json" >"$out/$variant--$run.log" 2>&1 ||
      { echo "  failed; its log:" >&2; tail -20 "$out/$variant--$run.log" >&2; exit 1; }
  done
done

PYTHONPATH="$(dirname "$0")${PYTHONPATH:+:$PYTHONPATH}" python3 - "$out" "$runs" "$backend" "$write" "$loadgen" <<'PY'
from bench_common import cpu, write_section
import json, os, platform, subprocess, sys, datetime
out, runs, backend, write = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
build = "release" if "/release/" in sys.argv[5] else "debug (not comparable with release figures)"
lines = []
def level(variant, run):
    return json.load(open(os.path.join(out, f"{variant}--{run}.json")))["levels"][0]
commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
lines.append(f"Produced by `scripts/bench-workshop-features.sh` at commit `{commit}` on {datetime.date.today()}, "
             f"on {cpu()} ({os.cpu_count()} cores), {backend} store, {build} build, {runs} run(s) per variant (ranges: min–max).")
lines.append("")
lines.append("| figure | without | with (reservation + Prefer: wait) | with / without, per run pair |")
lines.append("|---|---|---|---|")
for name, key, digits in [("201/s", "created_per_s", 0), ("p50 ms", "p50_ms", 1), ("p99 ms", "p99_ms", 1)]:
    cells = []
    for variant in ("without", "with"):
        values = [level(variant, r)[key] for r in range(1, runs + 1)]
        cells.append(f"{min(values):.{digits}f}–{max(values):.{digits}f}")
    ratios = [level("with", r)[key] / level("without", r)[key] for r in range(1, runs + 1) if level("without", r)[key]]
    cells.append(f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "–")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
for variant in ("without", "with"):
    statuses = [json.dumps(level(variant, r)["statuses"], sort_keys=True) for r in range(1, runs + 1)]
    lines.append(f"| statuses, {variant} | " + "; ".join(statuses) + " | | |")
# Where the p99 comes from: the slowest 1% of each run, on the reserved track and sent when.
for variant in ("without", "with"):
    cells = []
    for r in range(1, runs + 1):
        slow = level(variant, r).get("slowest_1pct") or []
        if slow:
            reserved = sum(1 for x in slow if x["track"] == "loadgen-0")
            sent = sorted(x["sent_ms"] for x in slow)
            cells.append(f"{reserved}/{len(slow)} on the reserved track, sent {sent[0]:.0f}–{sent[-1]:.0f} ms")
    if cells:
        lines.append(f"| slowest 1%, {variant} | " + "; ".join(cells) + " | | |")
# What each 201 cost the store, by DynamoDB operation (absent on the embedded store).
ops = sorted({op for variant in ("without", "with") for r in range(1, runs + 1)
              for op in (level(variant, r).get("store_requests_per_201_by_op") or {})})
for op in ops:
    cells = []
    for variant in ("without", "with"):
        values = [(level(variant, r).get("store_requests_per_201_by_op") or {}).get(op, 0.0) for r in range(1, runs + 1)]
        cells.append(f"{min(values):.2f}–{max(values):.2f}")
    lines.append(f"| `{op}` per 201 | " + " | ".join(cells) + " | |")
text = "\n".join(lines)
print(text)
if write:
    write_section(write, f"bench-workshop-features {backend}", text)
PY
fi

[ "$shape" = levels ] && exit 0
line=(--backend "$backend" --pool 100 --tracks 4 --line-students 600 --line-arrival-ms 10
  --line-supply 400 --line-supply-batch 20 --line-supply-every-ms 300 --prefer-wait 10)
for run in $(seq 1 "$runs"); do
  echo "line run $run …" >&2
  "$loadgen" "${line[@]}" --json "$out/line--$run.json" >"$out/line--$run.log" 2>&1 ||
    { echo "  failed; its log:" >&2; tail -20 "$out/line--$run.log" >&2; exit 1; }
done

PYTHONPATH="$(dirname "$0")${PYTHONPATH:+:$PYTHONPATH}" python3 - "$out" "$runs" "$backend" "$write" "$loadgen" <<'PY'
from bench_common import cpu, write_section
import json, os, platform, subprocess, sys, datetime
out, runs, backend, write = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
build = "release" if "/release/" in sys.argv[5] else "debug (not comparable with release figures)"
reports = [json.load(open(os.path.join(out, f"line--{r}.json"))) for r in range(1, runs + 1)]
def span(key, digits=0):
    values = [r[key] for r in reports if r.get(key) is not None]
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}" if values else "–"
first = reports[0]
commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
lines = [
    f"Produced by `scripts/bench-workshop-features.sh --shape line` at commit `{commit}` on {datetime.date.today()}, "
    f"on {cpu()} ({os.cpu_count()} cores), {backend} store, {build} build, {runs} run(s) (ranges: min–max). "
    f"{first['students']} students over {first['tracks']} tracks, one every {first['arrival_gap_ms']} ms, "
    f"`Prefer: wait={first['wait_s']}`; pool {first['pool']}, {first['supply']} registered during the run "
    f"({first['supply_batch']} every {first['supply_gap_ms']} ms).",
    "",
    "| figure | runs |",
    "|---|---|",
    f"| run s | {span('elapsed_s', 1)} |",
    f"| served at once (201, no wait) | {span('served_at_once')} |",
    f"| served from the line (201 after waiting) | {span('served_from_line')} |",
    f"| wait of those served, p50 ms | {span('wait_p50_ms')} |",
    f"| wait of those served, p99 ms | {span('wait_p99_ms')} |",
    f"| served after a later arrival of their track | {span('out_of_order')} |",
    f"| … that later arrival sent at most, ms after | {span('out_of_order_max_sent_later_ms', 1)} |",
    f"| 409 after the wait ran out | {span('timed_out_409')} |",
    f"| 409 at once, lines full | {span('full_409')} |",
    f"| longest line, all tracks (`broker_waiting_line_length`) | {span('line_peak')} |",
    "| statuses | " + "; ".join(json.dumps(r["statuses"], sort_keys=True) for r in reports) + " |",
    "| no double allocation (history replayed) | " + "; ".join(str(r["no_double_allocation"]).lower() for r in reports) + " |",
]
text = "\n".join(lines)
print(text)
if write:
    write_section(write, f"bench-workshop-line {backend}", text)
PY
