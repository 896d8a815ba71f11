#!/usr/bin/env bash
# Training throughput of gram-train's CPU backend beside PyTorch eager, same machine, same run:
# the same LLaMA configs (benches/train/llama-1.5m.json, llama-40m.json), the same GRAM stage-2
# step (A/B logits at the last position, label-smoothed loss, AdamW), random tokens of the same
# shape. Each side runs ROUNDS times, alternating; the median of the rounds is reported. Run by
# hand (not in CI):
#
#   bash benches/train_speed.sh [ROUNDS]      # default 3
#
# The PyTorch side needs torch + transformers; the script installs them into a venv under the
# cache (PyPI's torch wheel; ~4 GB with its CUDA libraries, which the CPU run does not use).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
bash scripts/setup.sh >/dev/null
source "${GRAM_CACHE:-$HOME/.cache/gram-rs}/env.sh"
cargo build --bins -q
BIN="$CARGO_TARGET_DIR/debug/gram-train"
VENV="$GRAM_CACHE/torch-venv"
if ! "$VENV/bin/python" -c 'import torch, transformers' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" -q install --find-links "$GRAM_CACHE/wheels" torch==2.15.0 transformers==5.24.0
fi
THREADS=$(nproc)
WORK="$GRAM_CACHE/bench-train"; mkdir -p "$WORK"; rm -f "$WORK"/*.jsonl
run_pair() { # name config batch seq
    local name=$1 cfg=$2 b=$3 t=$4
    for r in $(seq "$ROUNDS"); do
        "$BIN" bench --model-config "$cfg" --batch-size "$b" --seq-len "$t" --steps 8 --warmup 2 >> "$WORK/$name.rust.jsonl"
        "$VENV/bin/python" benches/train/torch_reference.py --model-config "$cfg" --batch-size "$b" --seq-len "$t" \
            --steps 8 --warmup 2 --threads "$THREADS" >> "$WORK/$name.torch.jsonl"
    done
}
run_pair llama-1.5m benches/train/llama-1.5m.json 8 256
run_pair llama-40m benches/train/llama-40m.json 8 256
python3 - "$WORK" <<'PY'
import json, statistics, sys
work = sys.argv[1]
print(f"{'config':<12} {'params':>10} {'batch x seq':>12} {'gram-train tok/s':>17} {'pytorch tok/s':>14} {'ratio':>7}")
for name in ["llama-1.5m", "llama-40m"]:
    rs = [json.loads(l) for l in open(f"{work}/{name}.rust.jsonl")]
    ts = [json.loads(l) for l in open(f"{work}/{name}.torch.jsonl")]
    r = statistics.median(x["tokens_per_s"] for x in rs)
    t = statistics.median(x["tokens_per_s"] for x in ts)
    print(f"{name:<12} {rs[0]['params']:>10} {str(rs[0]['batch_size'])+' x '+str(rs[0]['seq_len']):>12} {r:>17.0f} {t:>14.0f} {r/t:>6.2f}x")
PY
