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
