#!/usr/bin/env bash
# Runs every test of GRAM-rs on a fresh machine: setup (idempotent), then the whole suite.
# Build outputs go to a cache outside the clone ($CARGO_TARGET_DIR, default
# ~/.cache/gram-rs/target) so that later runs reuse them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
source "${GRAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gram-rs}/env.sh"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# The Vulkan loader (wgpu tests on lavapipe) complains without a runtime dir; give it one.
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "$XDG_RUNTIME_DIR" ]; then
    XDG_RUNTIME_DIR="$(mktemp -d)"; chmod 700 "$XDG_RUNTIME_DIR"; export XDG_RUNTIME_DIR
fi
start=$(date +%s)
cargo build --tests --bins
built=$(date +%s)
cargo test --no-fail-fast -- --nocapture --test-threads 2
echo "[test.sh] build $((built - start)) s, tests $(( $(date +%s) - built )) s"
