#!/usr/bin/env bash
# gram-train on a real GPU through wgpu, by hand (CI has no GPU):
#   1. parity: the stage-2 run of the lavapipe test (tests/tests/it/train.rs,
#      wgpu_stage2_steps_match_the_cpu_where_a_device_exists) on the CPU and on wgpu, same
#      tiny model and data, and the largest loss difference (target <= 1e-3); 2 steps as in the
#      test, then 20 steps to see how far the two drift;
#   2. speed: `gram-train bench --backend wgpu` beside PyTorch eager on CUDA
#      (benches/train/torch_reference.py --device cuda), the configs of benches/train_speed.sh.
#
#   GRAM_TRAIN=path/to/gram-train TASK=dir bash benches/gpu_check.sh [OUT]
#
# TASK holds `tiny/` (a model folder) and `data/` (its `gram-data build` output): the test's
# train-task folder, kept with TMPDIR=dir cargo test --test it -- wgpu_stage2. Without GRAM_TRAIN
# the workspace's debug build is used. Prints one line per result; exits non-zero when no
# wgpu device is found or the 2-step losses differ by more than 1e-3.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${GRAM_TRAIN:-${CARGO_TARGET_DIR:-target}/debug/gram-train}"
TASK="${TASK:?TASK must name a folder with tiny/ and data/}"
OUTDIR="${1:-/tmp/gram-gpu-check}"
mkdir -p "$OUTDIR"
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    XDG_RUNTIME_DIR="$(mktemp -d)"; chmod 700 "$XDG_RUNTIME_DIR"; export XDG_RUNTIME_DIR
fi
PY="${PYTHON:-python3}"

losses() { # run dir -> JSON list of the train losses
    "$PY" -c 'import json,sys; print(json.dumps([json.loads(l)["loss"] for l in open(sys.argv[1]) if json.loads(l).get("split")=="train"]))' "$1/metrics.jsonl"
}
status=0
for steps in 2 20; do
    for backend in cpu wgpu; do
        t0=$(date +%s.%N)
        if ! "$BIN" finetune --model "$TASK/tiny" --data "$TASK/data" --out "$OUTDIR/s$steps-$backend" \
            --quiet --overwrite --max-steps "$steps" --lr 1e-3 --batch-size 2 --log-every 1 \
            --max-valid 2 --backend "$backend"; then
            echo "[gpu-check] finetune on $backend failed"; exit 1
        fi
        echo "[gpu-check] $steps steps on $backend: $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s"
    done
    "$PY" - "$(losses "$OUTDIR/s$steps-cpu")" "$(losses "$OUTDIR/s$steps-wgpu")" "$steps" <<'PY' || status=1
import json, sys
cpu, gpu, steps = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
assert len(cpu) == len(gpu) == steps, (len(cpu), len(gpu))
d = max(abs(a - b) for a, b in zip(cpu, gpu))
print(f"[gpu-check] {steps} steps: cpu {[round(x, 6) for x in cpu[:4]]}... wgpu {[round(x, 6) for x in gpu[:4]]}... max |diff| {d:.2e}")
sys.exit(1 if steps == 2 and d > 1e-3 else 0)
PY
done

bench() { # name config batch seq
    local r t
    r=$("$BIN" bench --backend wgpu --model-config "$2" --batch-size "$3" --seq-len "$4" --steps 8 --warmup 3)
    t=$("$PY" benches/train/torch_reference.py --device cuda --model-config "$2" --batch-size "$3" \
        --seq-len "$4" --steps 8 --warmup 3)
    "$PY" - "$1" "$r" "$t" <<'PY'
import json, sys
name, r, t = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"[gpu-check] {name:<11} {r['batch_size']}x{r['seq_len']:<5} gram-train wgpu {r['tokens_per_s']:>10.0f} tok/s"
      f"  pytorch cuda {t['tokens_per_s']:>10.0f} tok/s  ratio {r['tokens_per_s'] / t['tokens_per_s']:.2f}x")
PY
}
bench llama-1.5m benches/train/llama-1.5m.json 8 256
bench llama-40m benches/train/llama-40m.json 8 256
exit $status
