#!/usr/bin/env bash
# Benchmark of `gram-data build` against the Python way (HF datasets .map(batched=True) + HF
# tokenizers), on the same synthetic rows, same machine, same run. Run by hand (not in CI):
#
#   bash benches/data_build.sh [ROWS]      # default 200000
#
# Needs `pip install datasets tokenizers` for the reference side (the script installs them into
# a venv under the cache if missing). Prints rows/s, tokens/s, peak RSS of both and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-200000}"
# The dev profile optimises every dependency (opt-level 3; see Cargo.toml), so the hot loops
# (tokenizers, arrow, parquet, datafusion) run optimised without a second, release build of burn.
source benches/common.sh
BIN="$BIN/gram-data"
WORK="$GRAM_CACHE/bench-data"; mkdir -p "$WORK"
IN="$WORK/synthetic-$ROWS.jsonl"
[ -s "$IN" ] || python3 benches/data/gen_synthetic.py "$IN" "$ROWS"
VENV="$GRAM_CACHE/bench-venv"
bench_venv "$VENV" "datasets, tokenizers" datasets tokenizers
TOK=../shared/fixtures/smollm2
rm -rf "$WORK/rust" "$WORK/python"
/usr/bin/time -f '%e %M' -o "$WORK/rust.time" "$BIN" build pipelines/chosen-rejected.toml --input "$IN" \
    --model "$TOK" --out "$WORK/rust" --valid 0 --test 0 --quiet 2> "$WORK/rust.log"
"$VENV/bin/python" benches/data/python_reference.py "$IN" "$TOK" "$WORK/python" > "$WORK/python.json"
python3 - "$WORK" "$ROWS" <<'PY'
import json, sys
work, rows = sys.argv[1], int(sys.argv[2])
secs, kb = open(f"{work}/rust.time").read().split()
st = json.load(open(f"{work}/rust/stats.json"))
toks = st["stage1_tokens"]["total"] + st["stage2_tokens"]["total"]
py = json.load(open(f"{work}/python.json"))
r_rows = rows / float(secs)
print(f"rows            {rows}")
print(f"gram-data       {r_rows:10.0f} rows/s   peak RSS {int(kb)/1024:8.1f} MiB   ({float(secs):.1f} s, {toks/float(secs):.0f} tokens/s)")
print(f"python (HF)     {py['rows_per_s']:10.0f} rows/s   peak RSS {py['peak_rss_bytes']/2**20:8.1f} MiB   ({py['seconds']:.1f} s, {py['tokens_per_s']:.0f} tokens/s)")
print(f"ratio           {r_rows / py['rows_per_s']:.2f}x rows/s")
PY
