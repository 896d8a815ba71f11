#!/usr/bin/env bash
# Scoring speed of two gram-score binaries side by side: a change against the commit before it,
# on the same machine in the same minutes. Each round scores the same real pairs with
# `gram-score pairwise` of both binaries (alternating which goes first) through the shipped judge
# (exports/gram-smollm2-135m-lora over the SmolLM2-135M GGUF) on the held-out split of the shared
# sets; it prints each side's median pairs/s, the median of the per-round ratios NEW/OLD, and the
# largest score difference between the two. Run by hand:
#
#   git worktree add /tmp/old HEAD~1 && (cd /tmp/old && cargo build --bins) # the old binary
#   cp "$CARGO_TARGET_DIR/debug/gram-score" /tmp/gram-score.old            # copy it aside
#   cargo build --bins                                                      # the new one
#   bash benches/score_paired.sh /tmp/gram-score.old "$CARGO_TARGET_DIR/debug/gram-score" [ROUNDS] [PAIRS]
set -euo pipefail
cd "$(dirname "$0")/.."
OLD="$1"; NEW="$2"; ROUNDS="${3:-3}"; PAIRS="${4:-96}"
source benches/common.sh
VENV="$GRAM_CACHE/torch-venv"
bench_venv "$VENV" pyarrow pyarrow
WORK="$GRAM_CACHE/bench-score-paired"; mkdir -p "$WORK"
# PAIRS held-out pairs (one order each: the job scores both) and the shipped judge.
shipped_judge_and_pairs "$WORK" "$PAIRS" "prompt response_a response_b"
rm -f "$WORK"/*.jsonl
run() { # side binary
    local t0 t1
    t0=$(date +%s.%N)
    "$2" pairwise --model "$WORK/judge" --input "$WORK/pairs.parquet" --out "$WORK/$1.parquet" \
        --overwrite --restart --quiet >/dev/null
    t1=$(date +%s.%N)
    python3 -c "import sys; print(int(sys.argv[3]) / (float(sys.argv[2]) - float(sys.argv[1])))" "$t0" "$t1" "$PAIRS" \
        >> "$WORK/$1.jsonl"
}
for r in $(seq "$ROUNDS"); do
    if (( r % 2 )); then run old "$OLD"; run new "$NEW"; else run new "$NEW"; run old "$OLD"; fi
done
"$VENV/bin/python" - "$WORK" <<'PY'
import statistics, sys
import pyarrow.parquet as pq
work = sys.argv[1]
old = [float(l) for l in open(f"{work}/old.jsonl")]
new = [float(l) for l in open(f"{work}/new.jsonl")]
ratios = [n / o for n, o in zip(new, old)]
a = pq.read_table(f"{work}/old.parquet").column("score_a").to_pylist()
b = pq.read_table(f"{work}/new.parquet").column("score_a").to_pylist()
print(f"pairs/s per round: old {[round(x, 3) for x in old]}, new {[round(x, 3) for x in new]}")
print(f"median pairs/s: old {statistics.median(old):.3f}, new {statistics.median(new):.3f}; "
      f"new/old (median of rounds) {statistics.median(ratios):.3f}x, range {min(ratios):.3f}-{max(ratios):.3f}")
print(f"max |score_a new - old| over {len(a)} pairs: {max(abs(x - y) for x, y in zip(a, b)):.1e}")
PY
