#!/usr/bin/env bash
# What one task of a `gram-data build --cluster` plan costs beyond its rows: the same small
# build (LLMBar's pairs, SmolLM2's tokenizer) on a Ballista cluster of 2 executor
# processes (one task slot each, scripts/cluster.sh) cut into P tasks after the dedup
# repartition, P = 2, 16 and 64, in ROUNDS alternating rounds. The rows and their work are the
# same at every P, so the wall time that grows with P is the tasks' own cost: scheduling,
# launching, the shuffle's extra files, each task's shards and its row of counts. Run by hand
# (not in CI):
#
#   bash benches/cluster_tasks.sh [ROUNDS]     # default 3
#
# Prints each P's median wall seconds and plan seconds, and the cost per task on one slot:
# (plan(64) - plan(2)) * slots / (64 - 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
source benches/common.sh
WORK="$GRAM_CACHE/bench-cluster-tasks"
rm -rf "$WORK"
mkdir -p "$WORK"
TOK="$(cd ../shared/fixtures/smollm2 && pwd)"
PORT="${PORT:-50350}"
SLOTS=2
trap 'bash scripts/cluster.sh stop' EXIT
RAYON_NUM_THREADS=1 TASK_SLOTS=1 GRAM_BIN="$BIN" bash scripts/cluster.sh start "$SLOTS" "$PORT" >/dev/null
for _ in $(seq "$ROUNDS"); do
    for p in 2 16 64; do
        rm -rf "${WORK:?}/out-$p"
        start=$(date +%s.%N)
        "$BIN/gram-data" build pipelines/llmbar.toml --model "$TOK" --out "$WORK/out-$p" \
            --max-tokens 512 --quiet --cluster "df://127.0.0.1:$PORT" --partitions "$p" \
            2> "$WORK/$p.log" || { cat "$WORK/$p.log" >&2; exit 1; }
        end=$(date +%s.%N)
        python3 - "$WORK/out-$p/stats.json" "$start" "$end" >> "$WORK/$p.jsonl" <<'PY'
import json, sys
st = json.load(open(sys.argv[1]))
print(json.dumps({"wall": float(sys.argv[3]) - float(sys.argv[2]), "plan": st["plan_seconds"],
                  "written": st["pairs_written"]}))
PY
    done
done
python3 - "$WORK" "$SLOTS" <<'PY'
import json, statistics, sys
work, slots = sys.argv[1], int(sys.argv[2])
med = {}
for p in (2, 16, 64):
    runs = [json.loads(l) for l in open(f"{work}/{p}.jsonl")]
    med[p] = {k: statistics.median(r[k] for r in runs) for k in ("wall", "plan")}
    print(f"P={p:>2}: wall {med[p]['wall']:.2f} s, plan {med[p]['plan']:.2f} s "
          f"(median of {len(runs)}; {runs[0]['written']} pairs written)")
per_task = (med[64]["plan"] - med[2]["plan"]) * slots / (64 - 2)
print(f"cost per task on one slot: {per_task * 1000:.0f} ms")
PY
