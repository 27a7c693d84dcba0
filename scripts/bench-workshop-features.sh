#!/usr/bin/env bash
# Allocation with the workshop features active against without, in one run: the same build, the
# same load generator, the same shape, runs alternating so that drift on a shared machine hits
# both variants alike.
#
#   bash scripts/bench-workshop-features.sh [--backend embedded|dynamo] [--runs N] [--keep DIR]
#                                           [--write docs/benchmarks.md]
#
# Shape: 1,200 students over 4 tracks (300 each), 100 at a time, pool 2,000.
#   without   no reservation, no Prefer header
#   with      300 sandboxes reserved for the first track before the run (ADR 0028: its students
#             draw from the earmarks, the other tracks never see them), and `Prefer: wait=5` on
#             every request (ADR 0029). The pool does not run dry in this shape, so the header's
#             cost is measured on the normal path: no line forms.
# Prints, per variant, the range over the runs of 201/s, p50 and p99, the statuses, and the
# ratio with/without of each run pair; with --write, also replaces the part of that page between
# `<!-- generated: bench-workshop-features BACKEND -->` and its end marker. Needs a release build of loadgen
# (cargo build --release -p tests --features bench --bins) and python3; traffic stays on
# 127.0.0.1 and every run is bounded by its request count.
set -euo pipefail
cd "$(dirname "$0")/.."

backend=embedded runs=3 keep= write=
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) backend=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    --write) write=$2; shift 2 ;;
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

shape=(--backend "$backend" --pool 2000 --tracks 4 --concurrency 100 --requests 1200)
for run in $(seq 1 "$runs"); do
  for variant in without with; do
    extra=()
    [ "$variant" = with ] && extra=(--reserve 300 --prefer-wait 5)
    echo "run $run, $variant …" >&2
    "$loadgen" "${shape[@]}" "${extra[@]}" --json "$out/$variant--$run.json" >"$out/$variant--$run.log" 2>&1 ||
      { echo "  failed; its log:" >&2; tail -20 "$out/$variant--$run.log" >&2; exit 1; }
  done
done

python3 - "$out" "$runs" "$backend" "$write" <<'PY'
import json, os, platform, subprocess, sys, datetime
out, runs, backend, write = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lines = []
def cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
def level(variant, run):
    return json.load(open(os.path.join(out, f"{variant}--{run}.json")))["levels"][0]
commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
lines.append(f"Produced by `scripts/bench-workshop-features.sh` at commit `{commit}` on {datetime.date.today()}, "
             f"on {cpu()} ({os.cpu_count()} cores), {backend} store, {runs} run(s) per variant (ranges: min–max).")
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
text = "\n".join(lines)
print(text)
if write:
    begin, end = f"<!-- generated: bench-workshop-features {backend} -->", f"<!-- end generated: bench-workshop-features {backend} -->"
    page = open(write).read()
    if begin not in page or end not in page:
        sys.exit(f"{write} has no {begin} … {end} markers")
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    open(write, "w").write(f"{head}{begin}\n\n{text}\n\n{end}{tail}")
    print(f"wrote {write}")
PY
