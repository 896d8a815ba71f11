#!/usr/bin/env bash
# The GRAM paper's central comparison at small scale, rerunnable: SmolLM2-135M-Instruct as
#   (a) a zero-shot judge (no training),
#   (b) a judge trained with stage 2 only,
#   (c) GRAM: stage 1 (unlabeled pairs) then stage 2, continuing the same adapter,
#   (d) a Bradley-Terry reward model,
# where (b), (c) and (d) see the same labeled pairs (--max-train-pairs picks the same ones for
# every run) for the same number of epochs. The learning rate is chosen on the valid split (a
# short stage-2 pilot per candidate), and each run keeps the epoch whose checkpoint has the best
# valid accuracy; the test split is read only by the final evaluation. Each model is exported (gram-export onnx;
# (d) with --head reward) and evaluated with gram-score eval on the test split: accuracy per
# source and per LLMBar subset with 95% bootstrap intervals over pairs.
#
#   bash scripts/reproduce.sh                    # the full run (CPU)
#   REPRO_QUICK=1 bash scripts/reproduce.sh      # a few steps of everything: checks the pipeline
#   REPRO_BACKEND=wgpu bash scripts/reproduce.sh # training on a GPU through wgpu
#   REPRO_RESUME=1 bash scripts/reproduce.sh     # after a stop: keeps the steps that finished
#   REPRO_BIN=dir REPRO_DATA=dir REPRO_UNTIL=train bash scripts/reproduce.sh
#       # on a machine without the toolchain (a GPU box): prebuilt gram-* binaries and an already
#       # built dataset, training only; copy REPRO_OUT back and rerun with REPRO_RESUME=1 to evaluate
#
# Settings: scripts/recipes/{pretrain,finetune,bt}.toml; REPRO_PAIRS, REPRO_EPOCHS, REPRO_LRS
# override the budget. Output: $GRAM_CACHE/reproduce/ (results.md, results.json, runs, exports).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${REPRO_BIN:-}" ]; then
    BIN="$(cd "$REPRO_BIN" && pwd)"
    : "${GRAM_SMOLLM2_GGUF:?with REPRO_BIN, GRAM_SMOLLM2_GGUF must name the model file}"
    GRAM_CACHE="${GRAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gram-rs}"
else
    bash scripts/setup.sh >/dev/null
    # shellcheck disable=SC1091
    source "${GRAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gram-rs}/env.sh"
    cargo build --bins -q
    BIN="$CARGO_TARGET_DIR/debug"
fi
OUT="${REPRO_OUT:-$GRAM_CACHE/reproduce}"
BACKEND="${REPRO_BACKEND:-cpu}"
if [ -n "${REPRO_QUICK:-}" ]; then
    PAIRS=${REPRO_PAIRS:-16}; EPOCHS=${REPRO_EPOCHS:-1}; LRS=${REPRO_LRS:-"2e-4"}
    PILOT_STEPS=2; EVAL_LIMIT="--limit 24"; VALID=16
else
    # Sized for about 2 hours on 2 CPU cores: a step of 8 stage-2 rows (408 tokens on average)
    # takes ~16 s there, a valid pass of 160 rows ~3 min, and the test evaluation (~480 pairs,
    # both orders, through onnxruntime) ~10 min per judge.
    PAIRS=${REPRO_PAIRS:-160}; EPOCHS=${REPRO_EPOCHS:-2}; LRS=${REPRO_LRS:-"2e-4 1e-3"}
    PILOT_STEPS=12; EVAL_LIMIT=""; VALID=160
fi
mkdir -p "$OUT"
TIMES="$OUT/times.tsv"
if [ -n "${REPRO_RESUME:-}" ]; then touch "$TIMES"; else : > "$TIMES"; fi
timed() { # name command...: runs it, appends "name<TAB>seconds" to times.tsv (a step already
    local name=$1; shift  # there is kept when resuming: it finished in an earlier run)
    if cut -f1 "$TIMES" | grep -qxF -- "$name"; then
        echo "   $name: finished earlier, kept"
        return
    fi
    local t0; t0=$(date +%s)
    "$@"
    echo -e "$name\t$(( $(date +%s) - t0 ))" >> "$TIMES"
}
train() { # stage recipe out [flags...]; valid rows: VALID (bt: VALID/2 pairs, the same pairs)
    local stage=$1 recipe=$2 out=$3; shift 3
    local valid=$VALID; [ "$stage" = bt ] && valid=$((VALID / 2))
    "$BIN/gram-train" "$stage" --config "scripts/recipes/$recipe.toml" --model "$GRAM_SMOLLM2_GGUF" \
        --data "$OUT/data" --out "$out" --backend "$BACKEND" --max-train-pairs "$PAIRS" \
        --max-valid "$valid" --overwrite --quiet "$@"
}
valid_acc() { # run folder -> the last valid accuracy
    python3 -c 'import json,sys; v=[json.loads(l) for l in open(sys.argv[1]) if "\"valid\"" in l]; print(v[-1]["acc"])' "$1/metrics.jsonl"
}
best_checkpoint() { # run folder -> its checkpoint (one per epoch) with the best valid accuracy
    python3 - "$1" <<'PY'
import json, sys
run = sys.argv[1]
v = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"valid"' in l]
best = max(v, key=lambda x: (x["acc"], -x["step"]))
print(f"{run}/checkpoints/step-{best['step']:07d}")
PY
}

if [ -n "${REPRO_DATA:-}" ]; then
    echo "== data: the dataset already built in $REPRO_DATA"
    [ "$(cd "$REPRO_DATA" && pwd)" = "$(mkdir -p "$OUT/data" && cd "$OUT/data" && pwd)" ] \
        || { rm -rf "$OUT/data"; cp -r "$REPRO_DATA" "$OUT/data"; }
else
    echo "== data: gram-data build of the three shared sets (test 12%, valid 10% of prompts)"
    timed data "$BIN/gram-data" build pipelines/hh-rlhf-harmless.toml pipelines/pandalm.toml pipelines/llmbar.toml \
        --model "$GRAM_SMOLLM2_GGUF" --out "$OUT/data" --max-tokens 512 --valid 0.10 --test 0.12 --overwrite --quiet
fi

echo "== learning rate: a ${PILOT_STEPS}-step stage-2 pilot per candidate, judged on valid"
best_lr=""; best_acc=-1
for lr in $LRS; do
    timed "pilot lr $lr" train finetune finetune "$OUT/runs/pilot-$lr" --lr "$lr" --max-steps "$PILOT_STEPS"
    acc=$(valid_acc "$OUT/runs/pilot-$lr")
    echo "   lr $lr: valid accuracy $acc"
    if python3 -c "import sys; sys.exit(0 if float('$acc') > float('$best_acc') else 1)"; then
        best_lr=$lr; best_acc=$acc
    fi
done
echo "   chosen lr $best_lr"

steps_per_epoch=$(( (2 * PAIRS + 7) / 8 ))   # both orders, 4 rows x 2 accumulated per step
per_epoch=(--epochs "$EPOCHS" --eval-every "$steps_per_epoch" --save-every "$steps_per_epoch" --keep "$EPOCHS")
echo "== (b) stage 2 only, $EPOCHS epochs over $PAIRS pairs (a checkpoint and valid after each)"
timed "(b) stage 2" train finetune finetune "$OUT/runs/b" --lr "$best_lr" "${per_epoch[@]}"
echo "== (c) GRAM: stage 1 then stage 2 on the same adapter"
timed "(c) stage 1" train pretrain pretrain "$OUT/runs/c1" --lr "$best_lr" --epochs "$EPOCHS"
timed "(c) stage 2" train finetune finetune "$OUT/runs/c2" --lr "$best_lr" "${per_epoch[@]}" \
    --adapter "$OUT/runs/c1/final"
echo "== (d) Bradley-Terry on the same pairs"
timed "(d) bt" train bt bt "$OUT/runs/d" --lr "$best_lr" "${per_epoch[@]}"
if [ "${REPRO_UNTIL:-}" = train ]; then
    echo "== stopping after training (REPRO_UNTIL=train): $OUT"
    exit 0
fi

echo "== export and evaluate on the test split"
evaluate() { # name model head
    local name=$1 model=$2 head=$3
    "$BIN/gram-export" onnx --model "$model" --base "$GRAM_SMOLLM2_GGUF" --head "$head" --out "$OUT/exports/$name" \
        --max-tokens 512 --overwrite
    # shellcheck disable=SC2086
    "$BIN/gram-score" eval --model "$OUT/exports/$name" --data "$OUT/data" --split test $EVAL_LIMIT \
        --json "$OUT/eval-$name.json" --quiet
}
timed "(a) eval" evaluate a "$GRAM_SMOLLM2_GGUF" judge
timed "(b) eval" evaluate b "$(best_checkpoint "$OUT/runs/b")" judge
timed "(c) eval" evaluate c "$(best_checkpoint "$OUT/runs/c2")" judge
timed "(d) eval" evaluate d "$(best_checkpoint "$OUT/runs/d")" reward

python3 scripts/reproduce_table.py "$OUT" "$best_lr" "$EPOCHS" "$PAIRS" "$BACKEND" | tee "$OUT/results.md"

echo "== the GRAM judge (c) packaged to ship: bf16 PEFT adapter + model card"
JUDGE="$OUT/gram-smollm2-135m-lora"
best_c=$(best_checkpoint "$OUT/runs/c2")
"$BIN/gram-export" adapter --model "$best_c" --out "$JUDGE" --base-name "$(basename "$GRAM_SMOLLM2_GGUF")" --overwrite
python3 scripts/model_card.py "$OUT" "$best_c" "$JUDGE" > "$JUDGE/README.md.tmp"
mv "$JUDGE/README.md.tmp" "$JUDGE/README.md"
echo "   $JUDGE (copy it to exports/ to ship it)"
