#!/usr/bin/env bash
# `gram-data build` with and without `--cluster`, on the same synthetic rows as
# benches/data_build.sh, same machine, same run: the build without it (2 threads), the
# tokenising plan in this process (`--cluster local`), and on a Ballista cluster
# (scripts/cluster.sh) of 1 and of 2 executor processes with one task slot and one tokenising
# thread each, so that an executor stands for one core. Each row is the median of ROUNDS
# alternating rounds. Run by hand (not in CI):
#
#   bash benches/cluster_build.sh [ROWS] [ROUNDS] [FILES]  # default 200000 rows, 1 round, 4 files
#
# Prints wall seconds, the plan's seconds (submit to last shard written) and the time before it
# (checking the specs, loading the tokenizer), the gram-data process's CPU seconds (on a
# cluster: the client's own work), its peak RSS, and the sizes that cross the network on a
# cluster: the input the executors read (one task per input file), the shuffle (the pairs
# repartitioned by their dedup key) and the dataset's Parquet, which the executors write (only
# counts come back to the client).
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-200000}"
ROUNDS="${2:-1}"
FILES="${3:-4}"
source benches/common.sh
WORK="$GRAM_CACHE/bench-cluster"
mkdir -p "$WORK" "$GRAM_CACHE/bench-data"
rm -f "$WORK"/*.jsonl "$WORK"/*.shuffle
IN="$GRAM_CACHE/bench-data/synthetic-$ROWS.jsonl"
[ -s "$IN" ] || python3 benches/data/gen_synthetic.py "$IN" "$ROWS"
# The rows cut into FILES files: a plan reads one file per task.
rm -rf "$WORK/input" && mkdir -p "$WORK/input"
split -n "l/$FILES" -d -a 3 --additional-suffix=.jsonl "$IN" "$WORK/input/part-"
TOK="$(cd ../shared/fixtures/smollm2 && pwd)"
PORT="${PORT:-50250}"
run() { # name [gram-data build flags]
    local name=$1
    shift
    rm -rf "${WORK:?}/$name"
    /usr/bin/time -f '%e %M %U %S' -o "$WORK/$name.time" "$BIN/gram-data" build pipelines/chosen-rejected.toml \
        --input "$WORK/input/*.jsonl" --model "$TOK" --out "$WORK/$name" --valid 0 --test 0 --quiet "$@" 2> "$WORK/$name.log" \
        || { cat "$WORK/$name.log" >&2; exit 1; }
    python3 - "$WORK" "$name" <<'PY' >> "$WORK/$name.jsonl"
import json, os, sys
work, name = sys.argv[1], sys.argv[2]
secs, kib, user, sys_ = open(f"{work}/{name}.time").read().split()
st = json.load(open(f"{work}/{name}/stats.json"))
size = sum(os.path.getsize(os.path.join(d, f)) for s in ("stage1", "stage2")
           for d, _, fs in os.walk(f"{work}/{name}/{s}") for f in fs)
print(json.dumps({"wall": float(secs), "rss_mib": int(kib) / 1024, "plan": st.get("plan_seconds"),
                  "cpu": float(user) + float(sys_),
                  "written": st["pairs_written"], "dataset_bytes": size}))
PY
}
# The bytes the executors' shuffle wrote for the last build (their work folders, from
# scripts/cluster.sh, hold nothing else).
shuffled() { du -scb "$GRAM_CACHE"/cluster/work-* | tail -1 | cut -f1 >> "$WORK/$1.shuffle"; }
cluster() { RAYON_NUM_THREADS=1 TASK_SLOTS=1 GRAM_BIN="$BIN" bash scripts/cluster.sh start "$1" "$PORT" >/dev/null; }
trap 'bash scripts/cluster.sh stop' EXIT
for _ in $(seq "$ROUNDS"); do
    run plain --threads 2
    run local --cluster local
    cluster 1
    run executors-1 --cluster "df://127.0.0.1:$PORT"
    shuffled executors-1
    cluster 2
    run executors-2 --cluster "df://127.0.0.1:$PORT"
    shuffled executors-2
    bash scripts/cluster.sh stop
done
python3 - "$WORK" "$ROWS" "$(du -sb "$IN" | cut -f1)" "$FILES" <<'PY'
import json, statistics, sys
work, rows, in_bytes, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
print(f"{rows} rows ({in_bytes / 2**20:.0f} MiB of JSONL in {files} files)")
print(f"{'run':<13} {'wall s':>8} {'rows/s':>8} {'plan s':>8} {'before plan s':>14} {'gram-data CPU s':>16} {'RSS MiB':>8} {'dataset MiB':>12}")
for name in ["plain", "local", "executors-1", "executors-2"]:
    rs = [json.loads(l) for l in open(f"{work}/{name}.jsonl")]
    wall = statistics.median(r["wall"] for r in rs)
    plan = statistics.median(r["plan"] or 0 for r in rs)
    cpu = statistics.median(r["cpu"] for r in rs)
    print(f"{name:<13} {wall:8.1f} {rows / wall:8.0f} {plan:8.1f} {wall - plan:14.1f} {cpu:16.1f} "
          f"{max(r['rss_mib'] for r in rs):8.0f} {rs[0]['dataset_bytes'] / 2**20:12.1f}")
for name in ["executors-1", "executors-2"]:
    sh = [int(l) for l in open(f"{work}/{name}.shuffle")]
    print(f"{name}: shuffle files {statistics.median(sh) / 2**20:.1f} MiB")
PY
