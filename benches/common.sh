# Sourced by the bench scripts (from the repository root): setup (idempotent), the cache's
# environment, the binaries (dev profile: every dependency at opt-level 3, see Cargo.toml), and
# bench_venv for the Python side of a comparison.
bash scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
source "${GRAM_CACHE:-$HOME/.cache/gram-rs}/env.sh"
cargo build --bins -q
BIN="$CARGO_TARGET_DIR/debug"

# bench_venv VENV "MODULES" PIP_ARGS...: makes sure VENV's python imports MODULES (comma list),
# creating the venv and installing PIP_ARGS (wheels from the cache first) when it does not.
bench_venv() {
    local venv=$1 modules=$2
    shift 2
    "$venv/bin/python" -c "import $modules" 2>/dev/null && return 0
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" -q install --find-links "$GRAM_CACHE/wheels" "$@"
}

# shipped_judge_and_pairs WORK N "PROMPT A B": the shared sets built into WORK/data (SmolLM2
# tokenisation, once), N of their held-out pairs taken evenly across the test split into
# WORK/pairs.parquet (one order each; the prompt and the two responses under the three column
# names given), and the shipped judge (exports/gram-smollm2-135m-lora over the SmolLM2 GGUF)
# compiled into WORK/judge. Needs $VENV with pyarrow.
shipped_judge_and_pairs() {
    local work=$1 n=$2 names=$3
    [ -d "$work/data" ] || "$BIN/gram-data" build pipelines/hh-rlhf-harmless.toml pipelines/pandalm.toml \
        pipelines/llmbar.toml --model "$GRAM_SMOLLM2_GGUF" --out "$work/data" --max-tokens 1024 --quiet >/dev/null
    "$VENV/bin/python" - "$work/data/stage2" "$work/pairs.parquet" "$n" "$names" <<'PY'
import glob, sys
import pyarrow as pa, pyarrow.parquet as pq
src, out, n, names = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split()
rows = [r for f in sorted(glob.glob(f"{src}/test-*.parquet")) for r in pq.read_table(f).to_pylist() if not r["swapped"]]
rows = [rows[i * len(rows) // n] for i in range(min(n, len(rows)))]
pq.write_table(pa.table({name: [r[k] for r in rows] for name, k in zip(names, ["prompt", "response_a", "response_b"])}), out)
PY
    "$BIN/gram-export" onnx --model exports/gram-smollm2-135m-lora --base "$GRAM_SMOLLM2_GGUF" \
        --out "$work/judge" --max-tokens 1024 --overwrite >/dev/null
}
