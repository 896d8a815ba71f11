#!/usr/bin/env bash
# Scoring throughput of gram-score (onnxruntime) beside PyTorch eager on the same model and the
# same real preference pairs, same machine, same run, plus the machine's f32 GEMM peak. Run by
# hand (not in CI):
#
#   bash benches/score_speed.sh [ROUNDS] [PAIRS]      # defaults 3 rounds, 96 pairs
#   MODELS=smollm2 bash benches/score_speed.sh         # one model (the other's results are kept)
#
# Pairs: the held-out (test) split of hh-rlhf harmless + PandaLM + LLMBar as `gram-data build`
# makes it with SmolLM2's tokenizer and chat template (max 1024 tokens). Models: a ~44M LLaMA
# (benches/score/llama-40m.json, random weights, SmolLM2's vocabulary) and SmolLM2-135M-Instruct
# (the Q4_1 GGUF, dequantised to f32 on both sides). gram-score runs `pairwise` end to end
# (Parquet in and out, tokenisation included, model loading excluded) on gram-export's default
# judge graph (judge prefix precomputed, each pair's common tokens run once); PyTorch scores the same
# token ids in file order, 8 pairs (16 sequences) per batch, full forward, as GRAM's evaluation
# does (benches/score/torch_reference.py). Each side runs ROUNDS times, alternating; medians.
#
# GEMM efficiency: the FLOPs gram-score actually did (its report counts padded tokens, sequences
# and attention cells; matrix products only: 2 x non-embedding weights per position, the last
# layer's query/output/MLP on the last position only, plus QK^T and PV) over its time, divided
# by the best f32 GEMM rate PyTorch's BLAS reaches here: "of peak" against the best rate of
# every measurement in the script (at its start and end, and around each run), "of adjacent"
# the median over runs of each run against the better rate measured right before and right
# after it (the machine's speed drifts by tens of percent within minutes, so a rate from
# another minute is a poor yardstick). PyTorch's own rate is printed beside it, by the same
# accounting over the work it does (the full head at every position, padding to the batch's
# longest sequence, the whole score matrix): what this machine gives eager PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
PAIRS="${2:-96}"
source benches/common.sh
VENV="$GRAM_CACHE/torch-venv"
bench_venv "$VENV" "torch, transformers, pyarrow, gguf, accelerate" torch==2.15.0 transformers==5.24.0 pyarrow gguf accelerate
THREADS=$(nproc)
MODELS="${MODELS:-llama-40m smollm2}"
WORK="$GRAM_CACHE/bench-score"; mkdir -p "$WORK"
for m in $MODELS; do rm -f "$WORK/$m".*.jsonl; done

# Data: the real sets, tokenised as the judge sees them.
[ -d "$WORK/data" ] || "$BIN/gram-data" build pipelines/hh-rlhf-harmless.toml pipelines/pandalm.toml \
    pipelines/llmbar.toml --model "$GRAM_SMOLLM2_GGUF" --out "$WORK/data" --max-tokens 1024 --quiet >/dev/null
STAGE2="$WORK/stage2-test.parquet"
"$VENV/bin/python" - "$WORK/data/stage2" "$STAGE2" "$WORK/pairs.parquet" "$PAIRS" <<'PY'
import glob, sys
import pyarrow as pa, pyarrow.parquet as pq
src, stage2, pairs, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(f"{src}/test-*.parquet"))])
rows = t.to_pylist()
seen, keep = {}, []
for r in rows:
    seen.setdefault(r["pair_id"], []).append(r)
ids = [p for p in dict.fromkeys(r["pair_id"] for r in rows) if len(seen[p]) == 2][:n]
both = [r for p in ids for r in seen[p]]
pq.write_table(pa.Table.from_pylist(both, schema=t.schema), stage2)
first = [next(r for r in seen[p] if not r["swapped"]) for p in ids]
pq.write_table(pa.table({k: [r[k] for r in first] for k in ["pair_id", "source", "prompt", "response_a", "response_b", "label"]}), pairs)
print(f"{len(ids)} pairs", file=sys.stderr)
PY

# Models: HF folders for PyTorch, ONNX exports for gram-score.
[ -f "$WORK/llama-40m/model.safetensors" ] || "$BIN/gram-train" init --model-config benches/score/llama-40m.json \
    --tokenizer ../shared/fixtures/smollm2 --out "$WORK/llama-40m" --seed 1 >/dev/null
# Exported every run: the graph changes with gram-export.
"$BIN/gram-export" onnx --model "$WORK/llama-40m" --out "$WORK/llama-40m.onnx" --max-tokens 1024 --overwrite >/dev/null
"$BIN/gram-export" onnx --model "$GRAM_SMOLLM2_GGUF" --out "$WORK/smollm2.onnx" --max-tokens 1024 --overwrite >/dev/null
LABELS=$(python3 -c "import json;m=json.load(open('$WORK/smollm2.onnx/gram-export.json'));print(f\"{m['label_ids']['a']},{m['label_ids']['b']}\")")

"$VENV/bin/python" benches/score/gemm_peak.py --threads "$THREADS" > "$WORK/gemm.json"
run_pair() { # name onnx-dir torch-args...
    local name=$1 onnx=$2; shift 2
    for r in $(seq "$ROUNDS"); do
        rm -f "$WORK/$name.out.parquet"
        # The GEMM rate right before and after this run too (the machine's speed drifts by
        # tens of percent within minutes): each run's efficiency against the better of the two.
        local before after
        before=$("$VENV/bin/python" benches/score/gemm_peak.py --threads "$THREADS")
        "$BIN/gram-score" pairwise --model "$onnx" --input "$WORK/pairs.parquet" --out "$WORK/$name.out.parquet" \
            --quiet --restart --report "$WORK/$name.report.json" >/dev/null
        after=$("$VENV/bin/python" benches/score/gemm_peak.py --threads "$THREADS")
        python3 -c "import json,sys;r=json.load(open(sys.argv[1]));r['gemm_adjacent']=max(json.loads(sys.argv[2])['gemm_gflops'],json.loads(sys.argv[3])['gemm_gflops']);print(json.dumps(r))" \
            "$WORK/$name.report.json" "$before" "$after" >> "$WORK/$name.rust.jsonl"
        "$VENV/bin/python" benches/score/torch_reference.py "$@" --data "$STAGE2" --pairs "$PAIRS" \
            --label-ids "$LABELS" --threads "$THREADS" >> "$WORK/$name.torch.jsonl"
    done
}
case " $MODELS " in *" llama-40m "*) run_pair llama-40m "$WORK/llama-40m.onnx" --model "$WORK/llama-40m" ;; esac
case " $MODELS " in *" smollm2 "*) run_pair smollm2 "$WORK/smollm2.onnx" --model "$(dirname "$GRAM_SMOLLM2_GGUF")" \
    --gguf "$(basename "$GRAM_SMOLLM2_GGUF")" ;; esac

# The GEMM rate moves between runs on a shared machine: measured again after, the higher kept.
"$VENV/bin/python" benches/score/gemm_peak.py --threads "$THREADS" >> "$WORK/gemm.json"

"$VENV/bin/python" - "$WORK" <<'PY'
import json, os, statistics, sys
import pyarrow.parquet as pq
work = sys.argv[1]
gemms = [json.loads(l) for l in open(f"{work}/gemm.json")]
runs = [json.loads(l) for n in ("llama-40m", "smollm2") if os.path.exists(f"{work}/{n}.rust.jsonl")
        for l in open(f"{work}/{n}.rust.jsonl")]
adj = [r["gemm_adjacent"] for r in runs if "gemm_adjacent" in r]
# The best rate of every measurement in the script (start, end, and around each run).
gemm = max([g["gemm_gflops"] for g in gemms] + adj)
rates = ", ".join(f"{g['gemm_gflops']:.1f}" for g in gemms)
print(f"f32 GEMM peak (PyTorch BLAS, {gemms[0]['threads']} threads): {gemm:.1f} GFLOP/s (start, end: {rates}; around runs: {min(adj, default=0):.1f}-{max(adj, default=0):.1f})")
print(f"{'model':<10} {'pairs':>6} {'gram-score pairs/s':>19} {'pytorch pairs/s':>16} {'ratio':>7} {'GFLOP/s':>8} {'of peak':>8} {'of adjacent':>12} {'pytorch GFLOP/s':>16} {'of peak':>8} {'max |score diff|':>17}")
for name, cfg in [("llama-40m", "llama-40m/config.json"), ("smollm2", None)]:
    if not os.path.exists(f"{work}/{name}.torch.jsonl"):
        continue
    rs = [json.loads(l) for l in open(f"{work}/{name}.rust.jsonl")]
    if any("key_columns" not in x["work"] or "gemm_adjacent" not in x for x in rs):
        print(f"{name:<10} (results from an older gram-score; run MODELS={name} again)")
        continue
    ts = [json.loads(l) for l in open(f"{work}/{name}.torch.jsonl")]
    r = statistics.median(x["rows"] / x["seconds"] for x in rs)
    t = statistics.median(x["pairs_per_s"] for x in ts)
    m = json.load(open(f"{work}/{name}.onnx/gram-export.json"))
    c = json.load(open(f"{work}/{cfg}")) if cfg else {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    d = c.get("head_dim", h // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    # What the judge graph computes: every layer but the last on every (padded) position; the
    # last layer's key/value projections on every position, its query, attention row, output
    # projection and MLP on the last position only (one row per sequence).
    layer = 2 * (h * (q + 2 * kv) + q * h + 3 * h * i)
    per_token = (L - 1) * layer + 2 * h * 2 * kv
    per_sequence = 2 * (h * q + q * h + 3 * h * i)
    def done(w):
        return (w["padded_tokens"] * per_token + w["sequences"] * per_sequence
                + w["attention_cells"] * 4 * q * (L - 1) + w["key_columns"] * 4 * q)
    flops = statistics.median(done(x["work"]) / x["seconds"] for x in rs) / 1e9
    # Each run against the GEMM rate measured right before and after it; median over runs.
    adjacent = statistics.median(done(x["work"]) / x["seconds"] / 1e9 / x["gemm_adjacent"] for x in rs)
    # PyTorch's rate by the same accounting, over what it computes: every layer and the
    # vocabulary-wide head at every padded position, the whole width x width score matrix.
    def torch_done(w):
        return (w["padded_tokens"] * (L * layer + 2 * h * c["vocab_size"])
                + w["attention_cells"] * 4 * q * L)
    if all("work" in x for x in ts):
        tf = statistics.median(torch_done(x["work"]) / x["seconds"] for x in ts) / 1e9
        torch_rate = f"{tf:>16.1f} {tf / gemm:>7.0%}"
    else:
        torch_rate = f"{'(older run)':>16} {'':>8}"
    ours = pq.read_table(f"{work}/{name}.out.parquet").column("score_a").to_pylist()
    diff = max(abs(a - b) for a, b in zip(ours, ts[-1]["scores"]))
    print(f"{name:<10} {rs[0]['rows']:>6} {r:>19.2f} {t:>16.2f} {r / t:>6.2f}x {flops:>8.1f} {flops / gemm:>7.0%} {adjacent:>11.0%} {torch_rate} {diff:>17.2e}")
PY
