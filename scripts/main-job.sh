#!/usr/bin/env bash
# The main job, end to end on a real small model and real data, setup included.
# What exists so far: fetch SmolLM2-135M-Instruct (GGUF); build the GRAM datasets from the three
# real preference sets of ../shared/data with the model's own (GGUF-embedded) tokenizer and chat
# template; load the model and run a GRAM judge prompt through it; fine-tune it briefly on the
# stage-2 data (GRAM's A/B loss) and write the result as an HF folder; compile it to ONNX (checked
# against burn); score real held-out pairs with onnxruntime (a Parquet job and an accuracy report);
# and score the same pairs with the shipped judge (exports/gram-smollm2-135m-lora, trained by
# scripts/reproduce.sh, whose 12% test split holds this job's 5% one: these pairs are unseen).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
source "${GRAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gram-rs}/env.sh"
cargo build --bins
BIN="$CARGO_TARGET_DIR/debug"
RUN="${GRAM_RUN_DIR:-$GRAM_CACHE/main-job}"
mkdir -p "$RUN"

echo "== 1. gram-data build (hh-rlhf harmless, PandaLM, LLMBar) with the SmolLM2 tokenizer"
"$BIN/gram-data" build pipelines/hh-rlhf-harmless.toml pipelines/pandalm.toml pipelines/llmbar.toml \
    --model "$GRAM_SMOLLM2_GGUF" --out "$RUN/data" --max-tokens 1024 --overwrite

echo "== 2. gram-model inspect: SmolLM2 on a judge prompt"
"$BIN/gram-model" inspect "$GRAM_SMOLLM2_GGUF" --chat --top 5 \
    --text "$(printf 'Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the user question displayed below. You should choose the assistant that follows the user'"'"'s instructions and answers the user'"'"'s question better. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of their responses. Avoid any position biases and ensure that the order in which the responses were presented does not influence your decision. Do not allow the length of the responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as possible. Please directly output your final verdict by strictly following this format: "A" if assistant A is better, "B" if assistant B is better.\n\n[User Question]\nHow do I boil an egg?\n\n[The Start of Assistant A'"'"'s Answer]\nPut the egg in boiling water for 9 minutes, then cool it in cold water.\n[The End of Assistant A'"'"'s Answer]\n\n[The Start of Assistant B'"'"'s Answer]\nEggs are laid by hens.\n[The End of Assistant B'"'"'s Answer]\n\n#Preferred:')"

echo
echo "== 3. gram-train finetune: SmolLM2 on the stage-2 train split, a few steps on the CPU"
"$BIN/gram-train" finetune --model "$GRAM_SMOLLM2_GGUF" --data "$RUN/data" --out "$RUN/finetune" --overwrite \
    --max-steps "${GRAM_MAIN_STEPS:-2}" --batch-size 2 --lr 1e-5 --warmup 0 --max-valid 8 --log-every 1 --quiet

echo
echo "== 4. gram-export onnx: the fine-tuned model as an ONNX judge, checked against burn"
"$BIN/gram-export" onnx --model "$RUN/finetune/final" --out "$RUN/export" --max-tokens 1024 --verify --overwrite

echo
echo "== 5. gram-score: held-out pairs (stage-2 test split) through onnxruntime"
TEST_SHARD="$(ls "$RUN"/data/stage2/test-*.parquet | head -n 1)"
"$BIN/gram-score" pairwise --model "$RUN/export" --input "$TEST_SHARD" --out "$RUN/scored.parquet" --overwrite \
    --limit "${GRAM_MAIN_SCORE_ROWS:-16}" --restart --quiet
"$BIN/gram-score" eval --model "$RUN/export" --data "$RUN/data" --split test \
    --limit "${GRAM_MAIN_EVAL_PAIRS:-16}" --json "$RUN/eval.json" --quiet

echo
echo "== 6. the shipped GRAM judge (a LoRA adapter over the same GGUF) on the same held-out pairs"
"$BIN/gram-export" onnx --model exports/gram-smollm2-135m-lora --base "$GRAM_SMOLLM2_GGUF" \
    --out "$RUN/export-shipped" --max-tokens 1024 --overwrite
"$BIN/gram-score" eval --model "$RUN/export-shipped" --data "$RUN/data" --split test \
    --limit "${GRAM_MAIN_EVAL_PAIRS:-16}" --json "$RUN/eval-shipped.json" --quiet

echo
echo "outputs:"
echo "  model     $GRAM_SMOLLM2_GGUF"
echo "  datasets  $RUN/data/stage1, $RUN/data/stage2"
echo "  rejects   $RUN/data/rejects-00000.parquet"
echo "  stats     $RUN/data/stats.json"
echo "  trained   $RUN/finetune/final (HF folder), metrics $RUN/finetune/metrics.jsonl, curves $RUN/finetune/curves.png"
echo "  onnx      $RUN/export (model.onnx, tokenizer, gram-export.json)"
echo "  scored    $RUN/scored.parquet (input columns + score_a, score_b, p_a_first, p_a_second)"
echo "  accuracy  $RUN/eval.json (briefly fine-tuned), $RUN/eval-shipped.json (shipped judge)"
