#!/usr/bin/env bash
# The workshop burst on DynamoDB Local, before and after group commit (ADR 0025), in one run:
# every build is driven by the same load generator (`loadgen --api-binary`: the build runs as a
# child process with its projector, on fresh tables with the pool registered beforehand).
#
#   bash scripts/bench-workshop.sh --build NAME=PATH [--build NAME=PATH …] [--runs N] [--pool P]
#                                  [--write docs/benchmarks.md] [--keep DIR | --from DIR]
#
# Shapes (each run of each build, in turn):
#   workshop   300 students of one track with a quota of 300, all at once (concurrency 300)
#   10-tracks  1,000 students over 10 tracks with a quota of 100 each, concurrency 100
#   one-client 200 students one after the other (concurrency 1): group commit must not slow it
# --keep DIR keeps every run's loadgen output and JSON there; --from DIR reports on runs kept
# earlier, running nothing.
# A build given as NAME=PATH@ENV=VALUE runs with that setting (e.g. DDB_GROUP_COMMIT_ITEMS=0).
# Prints, per shape and build, the range over the runs of: 201/s, p50, p99, event transactions,
# cancelled transactions, candidate conflicts, allocations decided again, store requests and the
# write units of the event items (computed from the items; DynamoDB Local's own report is a flat
# figure per transaction); with --write, replaces the generated part of that page. Projector lag
# is left out: each run starts right after its pool was projected, whose lag the gauge still
# shows, so the samples do not describe the allocations. Needs release builds of loadgen (cargo build --release -p tests --features bench
# --bins) and python3. Traffic stays on 127.0.0.1; every level is bounded in requests.
set -euo pipefail
cd "$(dirname "$0")/.."

builds=() runs=3 pool=2000 write= keep= from=
while [ $# -gt 0 ]; do
  case "$1" in
    --build) builds+=("$2"); shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --pool) pool=$2; shift 2 ;;
    --write) write=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    --from) from=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ ${#builds[@]} -gt 0 ] || { echo "give at least one --build NAME=PATH" >&2; exit 2; }
loadgen=${LOADGEN:-target/release/loadgen}
[ -n "$from" ] || [ -x "$loadgen" ] || { echo "$loadgen is missing: cargo build --release -p tests --features bench --bins" >&2; exit 2; }
if [ -n "$from" ]; then
  out=$from
elif [ -n "$keep" ]; then
  out=$keep
  mkdir -p "$out"
else
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi

shapes=("workshop:--concurrency 300 --requests 300 --tracks 1 --track-quota 300"
        "10-tracks:--concurrency 100 --requests 1000 --tracks 10 --track-quota 100"
        "one-client:--concurrency 1 --requests 200 --tracks 1")
# What the runs were made from, kept beside them for a later --from.
if [ -z "$from" ]; then
  git rev-parse --short=12 HEAD >"$out/commit"
  date -u +%Y-%m-%d >"$out/date"
fi
[ -n "$from" ] && runs=$(find "$out" -name 'workshop--*--*.json' | sed 's/.*--//; s/\.json$//' | sort -un | wc -l)
for run in $( [ -z "$from" ] && seq 1 "$runs"); do
  for shape in "${shapes[@]}"; do
    name=${shape%%:*} shape_args=${shape#*:}
    for build in "${builds[@]}"; do
      label=${build%%=*} rest=${build#*=}
      binary=${rest%%@*} setting=
      [ "$rest" != "$binary" ] && setting=${rest#*@}
      echo "run $run, $name, $label …" >&2
      # shellcheck disable=SC2086
      env ${setting:+"$setting"} "$loadgen" --backend dynamo --api-binary "$binary" --pool "$pool" \
        $shape_args --json "$out/$name--$label--$run.json" >"$out/$name--$label--$run.log" 2>&1 ||
        { echo "  failed; its log:" >&2; tail -20 "$out/$name--$label--$run.log" >&2; }
    done
  done
done

PYTHONPATH="$(dirname "$0")${PYTHONPATH:+:$PYTHONPATH}" python3 - "$out" "$runs" "$pool" "$write" "${builds[@]}" <<'PY'
from bench_common import cpu, write_section
import glob, json, os, platform, subprocess, sys, datetime
out, runs, pool, write, builds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
labels = [b.split("=", 1)[0] for b in builds]
def kept(name, fallback):
    try:
        return open(os.path.join(out, name)).read().strip() or fallback
    except OSError:
        return fallback
commit = kept("commit", subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip())
date = kept("date", str(datetime.date.today()))
figures = [
    ("201/s", lambda l: l["created_per_s"], 0),
    ("p50 ms", lambda l: l["p50_ms"], 0),
    ("p99 ms", lambda l: l["p99_ms"], 0),
    ("event transactions / 201", lambda l: l["contention"].get("event_transactions_per_201"), 2),
    ("cancelled / 201", lambda l: l["contention"].get("cancellations_per_201"), 2),
    ("candidate conflicts / 201", lambda l: l["contention"].get("candidate_conflicts_per_201"), 2),
    ("decided again / 201", lambda l: l["contention"].get("redecided_per_201"), 2),
    ("store requests / 201", lambda l: l["store_requests_per_201"], 2),
    ("event write units / 201", lambda l: l["contention"].get("event_write_units_per_201"), 1),
]
def cell(values, digits):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return f"{lo:.{digits}f}" if round(lo, digits) == round(hi, digits) else f"{lo:.{digits}f}–{hi:.{digits}f}"
lines = [f"Produced by `scripts/bench-workshop.sh` at commit `{commit}` on {date}, on "
         f"{cpu()} ({os.cpu_count()} cores), DynamoDB Local, pool {pool}, {runs} run(s) per build "
         "(ranges are min–max over the runs); each build ran as its own process with its projector, "
         "driven by the same load generator. \"–\": the build does not export that figure.", ""]
titles = {
    "workshop": "300 students of one track, quota 300, all at once",
    "10-tracks": "1,000 students over 10 tracks, quota 100 each, 100 at a time",
    "one-client": "200 students one after the other, no quota",
}
for shape, title in titles.items():
    lines.append(f"**{shape}** — {title}")
    lines.append("")
    lines.append("| figure | " + " | ".join(labels) + " |")
    lines.append("|---|" + "---|" * len(labels))
    levels = {}
    statuses = {}
    for label in labels:
        levels[label] = []
        statuses[label] = []
        for path in sorted(glob.glob(f"{out}/{shape}--{label}--*.json")):
            report = json.load(open(path))
            for level in report["levels"]:
                levels[label].append(level)
                statuses[label].append(level["statuses"])
    for name, get, digits in figures:
        row = [cell([get(l) for l in levels[label]], digits) for label in labels]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines.append("| runs (statuses) | " + " | ".join(
        f"{len(levels[label])} ({'; '.join(json.dumps(s, sort_keys=True) for s in statuses[label])})" for label in labels) + " |")
    lines.append("")
text = "\n".join(lines)
print(text)
if write:
    write_section(write, "bench-workshop", text)
PY
