#!/usr/bin/env bash
# Training throughput of gram-train's CPU backend beside PyTorch eager, same machine, same run:
# the same configs (benches/train/*.json), the same GRAM stage-2 step (A/B logits at the last
# position, label-smoothed loss, AdamW), random tokens of the same shape. Each side runs ROUNDS
# times, alternating; the median of the rounds is reported, with each side's peak RSS. Cases:
# LLaMA 1.5M and 40M (8 x 256, full fine-tuning); SmolLM2-135M's shape (4 x 512) with full
# fine-tuning, LoRA r=16 on all seven projections (PyTorch: peft), and the top 8 layers only,
# with the time one epoch of the stage-2 train split of ../shared/data (EPOCH_TOKENS, counted by
# the script from a gram-data build) would take. Then memory: Qwen3-0.6B's shape, 4 x 1024
# tokens, LoRA with --recompute beside full fine-tuning with --recompute (gram-train only, one
# step each). Run by hand (not in CI):
#
#   bash benches/train_speed.sh [ROUNDS]      # default 3
#   SKIP_MEMORY=1 bash benches/train_speed.sh # without the Qwen3-0.6B memory check (~15 min)
#   CASES="smollm2-full" SKIP_MEMORY=1 bash benches/train_speed.sh 5   # some cases only
#
# The PyTorch side needs torch + transformers + peft; the script installs them into a venv under
# the cache (PyPI's torch wheel; ~4 GB with its CUDA libraries, which the CPU run does not use).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
source benches/common.sh
BIN="$BIN/gram-train"
VENV="$GRAM_CACHE/torch-venv"
bench_venv "$VENV" "torch, transformers, peft" torch==2.15.0 transformers==5.24.0 peft==0.21.2
THREADS=$(nproc)
WORK="$GRAM_CACHE/bench-train"; mkdir -p "$WORK"; rm -f "$WORK"/*.jsonl
ALL_CASES="llama-1.5m llama-40m smollm2-full smollm2-lora16 smollm2-top8"
CASES="${CASES:-$ALL_CASES}"
for c in $CASES; do
    case " $ALL_CASES " in *" $c "*) ;; *) echo "train_speed.sh: unknown case '$c' (cases: $ALL_CASES)" >&2; exit 2 ;; esac
done
run_pair() { # name config batch seq [extra flags for both sides]; STEPS, WARMUP per case
    local name=$1 cfg=$2 b=$3 t=$4; shift 4
    case " $CASES " in *" $name "*) ;; *) return 0 ;; esac
    local steps=${STEPS:-8} warmup=${WARMUP:-2}
    for r in $(seq "$ROUNDS"); do
        "$BIN" bench --model-config "$cfg" --batch-size "$b" --seq-len "$t" --steps "$steps" --warmup "$warmup" "$@" >> "$WORK/$name.rust.jsonl"
        "$VENV/bin/python" benches/train/torch_reference.py --model-config "$cfg" --batch-size "$b" --seq-len "$t" \
            --steps "$steps" --warmup "$warmup" --threads "$THREADS" "$@" >> "$WORK/$name.torch.jsonl"
    done
}
# Tokens of one epoch of the shared sets' stage-2 train split (both orders), built as the main job does.
DATA="$WORK/shared-data"
if [ ! -f "$DATA/stats.json" ]; then
    "$CARGO_TARGET_DIR/debug/gram-data" build pipelines/hh-rlhf-harmless.toml pipelines/pandalm.toml pipelines/llmbar.toml \
        --model "$GRAM_SMOLLM2_GGUF" --out "$DATA" --max-tokens 1024 --overwrite --quiet
fi
# stats.json counts stage-2 tokens over all splits; the train split's share is its share of rows.
EPOCH_TOKENS=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); r=s["stage2"]; print(round(s["stage2_tokens"]["total"]*r.get("train",0)/max(sum(r.values()),1)))' "$DATA/stats.json")
run_pair llama-1.5m benches/train/llama-1.5m.json 8 256
run_pair llama-40m benches/train/llama-40m.json 8 256
# SmolLM2's steps take 10-30 s: 4 timed steps after 1 untimed one.
STEPS=4 WARMUP=1 run_pair smollm2-full benches/train/smollm2-135m.json 4 512
STEPS=4 WARMUP=1 run_pair smollm2-lora16 benches/train/smollm2-135m.json 4 512 --lora-rank 16
STEPS=4 WARMUP=1 run_pair smollm2-top8 benches/train/smollm2-135m.json 4 512 --train-layers 8
python3 - "$WORK" "$EPOCH_TOKENS" "$CASES" <<'PY'
import json, statistics, sys
work, epoch, cases = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
print(f"{'case':<15} {'params':>10} {'batch x seq':>12} {'gram-train tok/s':>17} {'pytorch tok/s':>14} {'ratio':>7} {'RSS MiB ours/torch':>19} {'epoch h ours/torch':>19}")
for name in cases:
    rs = [json.loads(l) for l in open(f"{work}/{name}.rust.jsonl")]
    ts = [json.loads(l) for l in open(f"{work}/{name}.torch.jsonl")]
    r = statistics.median(x["tokens_per_s"] for x in rs)
    t = statistics.median(x["tokens_per_s"] for x in ts)
    rss = f"{max(x['peak_rss_mib'] for x in rs):.0f}/{max(x.get('peak_rss_mib', 0) for x in ts):.0f}"
    hours = f"{epoch / r / 3600:.1f}/{epoch / t / 3600:.1f}" if name.startswith("smollm2") else ""
    print(f"{name:<15} {rs[0]['params']:>10} {str(rs[0]['batch_size'])+' x '+str(rs[0]['seq_len']):>12} {r:>17.0f} {t:>14.0f} {r/t:>6.2f}x {rss:>19} {hours:>19}")
for name in cases:
    rs = [round(json.loads(l)["tokens_per_s"]) for l in open(f"{work}/{name}.rust.jsonl")]
    ts = [round(json.loads(l)["tokens_per_s"]) for l in open(f"{work}/{name}.torch.jsonl")]
    print(f"{name} rounds, tokens/s: gram-train {rs}, PyTorch {ts}")
print(f"one epoch of the stage-2 train split: {epoch} tokens")
PY
if [ -z "${SKIP_MEMORY:-}" ]; then
    echo "Qwen3-0.6B shape, 4 x 1024 tokens, one step:"
    for flags in "--lora-rank 16 --recompute" "--recompute"; do
        # shellcheck disable=SC2086
        "$BIN" bench --model-config benches/train/qwen3-0.6b.json --batch-size 4 --seq-len 1024 --steps 1 --warmup 0 $flags \
            | python3 -c 'import json, sys
r = json.load(sys.stdin)
print("  %-45s recompute=%s  peak RSS %.2f GiB  step %.0f s" % (r["trained"], r["recompute"], r["peak_rss_mib"] / 1024, r["step_s_median"]))'
    done
fi
