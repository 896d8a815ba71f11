#!/usr/bin/env bash
# Load on the reward server: 1, 8 and 32 concurrent OpenRLHF-shaped clients against
# `gram-score serve` running the shipped GRAM judge (exports/gram-smollm2-135m-lora over the
# SmolLM2-135M GGUF), on real pairs (the held-out split of hh-rlhf harmless + PandaLM + LLMBar).
# Prints pairs/s, p50/p99 request latency, errors (must be 0) and the server's peak RSS per
# level, and checks that every reward equals `gram-score reference` on the same pairs in a
# Parquet file: the judge pads each pair to its own widths and batches only pairs of equal
# widths, so a score does not depend on the company a pair is batched with. The script prints
# the batch job's own difference between --batch-tokens 4096 and the default 1024 beside the
# server's, and fails past 1e-6 or on any error. Run by hand (not in CI):
#
#   bash benches/serve_load.sh [PAIRS] [ITEMS_PER_REQUEST]     # defaults 64 pairs, 2 items
#   LEVELS="1 8" bash benches/serve_load.sh                    # other client counts
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS="${1:-64}"
ITEMS="${2:-2}"
LEVELS="${LEVELS:-1 8 32}"
source benches/common.sh
VENV="$GRAM_CACHE/torch-venv"
bench_venv "$VENV" pyarrow pyarrow
WORK="$GRAM_CACHE/bench-serve"; mkdir -p "$WORK"

# One (prompt, response, reference) per pair: the pair's first response against its second;
# and the shipped judge.
shipped_judge_and_pairs "$WORK" "$PAIRS" "prompt response reference"
for t in 1024 4096; do
    "$BIN/gram-score" reference --model "$WORK/judge" --input "$WORK/pairs.parquet" --batch-tokens "$t" \
        --out "$WORK/reference-$t.parquet" --overwrite --restart --quiet >/dev/null
done

rm -f "$WORK/levels.jsonl"
for c in $LEVELS; do
    # A fresh server per level, so its peak RSS is that level's.
    "$BIN/gram-score" serve --model "$WORK/judge" --addr 127.0.0.1:0 --reference-from labels \
        2> "$WORK/server-$c.log" & PID=$!
    for _ in $(seq 600); do grep -q "listening on" "$WORK/server-$c.log" 2>/dev/null && break; sleep 0.1; done
    ADDR=$(sed -n 's/.*listening on http:\/\///p' "$WORK/server-$c.log")
    [ -n "$ADDR" ] || { cat "$WORK/server-$c.log"; exit 1; }
    "$VENV/bin/python" benches/serve/load_client.py --url "http://$ADDR/get_reward" \
        --pairs "$WORK/pairs.parquet" --clients "$c" --items "$ITEMS" > "$WORK/level.json"
    RSS=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
    kill -TERM "$PID"; wait "$PID"
    python3 -c "import json,sys;r=json.load(open(sys.argv[1]));r['peak_rss_mib']=int(sys.argv[2])/1024;print(json.dumps(r))" \
        "$WORK/level.json" "$RSS" >> "$WORK/levels.jsonl"
done

"$VENV/bin/python" - "$WORK" <<'PY'
import json, struct, sys
import pyarrow.parquet as pq
work = sys.argv[1]
# The server's JSON carries each f32 reward as its shortest decimal; back to f32 it is the same bits.
f32 = lambda x: struct.unpack("f", struct.pack("f", x))[0]
ref = pq.read_table(f"{work}/reference-1024.parquet").column("reward").to_pylist()
ref4k = pq.read_table(f"{work}/reference-4096.parquet").column("reward").to_pylist()
levels = [json.loads(l) for l in open(f"{work}/levels.jsonl")]
print(f"gram-score reference, --batch-tokens 4096 against 1024: max |reward diff| {max(abs(a - b) for a, b in zip(ref, ref4k)):.1e}")
print(f"{'clients':>7} {'pairs':>6} {'items/req':>9} {'pairs/s':>8} {'p50 s':>7} {'p99 s':>7} {'errors':>6} {'peak RSS MiB':>12} {'max |reward - reference|':>25}")
ok = True
for r in levels:
    diff = max((abs(f32(a) - b) if a is not None and b is not None else float("inf")) for a, b in zip(r["rewards"], ref))
    ok &= r["errors"] == 0 and diff <= 1e-6
    print(f"{r['clients']:>7} {r['pairs']:>6} {r['items_per_request']:>9} {r['pairs_per_s']:>8.2f} {r['p50_s']:>7.2f} {r['p99_s']:>7.2f} "
          f"{r['errors']:>6} {r['peak_rss_mib']:>12.0f} {diff:>25.1e}")
    if r["first_error"]:
        print(f"  first error: {r['first_error']}")
sys.exit(0 if ok else 1)
PY
