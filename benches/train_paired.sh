#!/usr/bin/env bash
# Training step speed of two gram-train binaries side by side: a change against the commit before
# it, on the same machine in the same minutes. Each round runs `gram-train bench` of both
# binaries (alternating which goes first), on the configs of benches/train_speed.sh; it prints
# each side's median tokens/s and the median of the per-round ratios NEW/OLD. Run by hand:
#
#   git worktree add /tmp/old HEAD~1 && (cd /tmp/old && cargo build --bins) # the old binary
#   cp "$CARGO_TARGET_DIR/debug/gram-train" /tmp/gram-train.old            # copy it aside
#   cargo build --bins                                                      # the new one
#   bash benches/train_paired.sh /tmp/gram-train.old "$CARGO_TARGET_DIR/debug/gram-train" [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
OLD="$1"; NEW="$2"; ROUNDS="${3:-5}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
run() { # side binary name config batch seq stage
    "$2" bench --model-config "$4" --batch-size "$5" --seq-len "$6" --stage "$7" --steps 8 --warmup 2 \
        >> "$WORK/$3.$1.jsonl"
}
for r in $(seq "$ROUNDS"); do
    for case in "llama-1.5m benches/train/llama-1.5m.json 8 256 finetune" \
                "llama-40m benches/train/llama-40m.json 8 256 finetune" \
                "llama-40m-s1 benches/train/llama-40m.json 8 256 pretrain"; do
        # shellcheck disable=SC2086
        set -- $case
        if (( r % 2 )); then run old "$OLD" "$@"; run new "$NEW" "$@"; else run new "$NEW" "$@"; run old "$OLD" "$@"; fi
    done
done
python3 - "$WORK" <<'PY'
import json, statistics, sys
work = sys.argv[1]
print(f"{'case':<14} {'old tok/s':>10} {'new tok/s':>10} {'new/old (median of rounds)':>27} {'range':>14}")
for name in ["llama-1.5m", "llama-40m", "llama-40m-s1"]:
    old = [json.loads(l)["tokens_per_s"] for l in open(f"{work}/{name}.old.jsonl")]
    new = [json.loads(l)["tokens_per_s"] for l in open(f"{work}/{name}.new.jsonl")]
    ratios = [n / o for n, o in zip(new, old)]
    print(f"{name:<14} {statistics.median(old):>10.0f} {statistics.median(new):>10.0f} "
          f"{statistics.median(ratios):>26.3f}x {min(ratios):>6.3f}-{max(ratios):.3f}")
PY
