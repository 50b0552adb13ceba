#!/usr/bin/env bash
# The user install, as README "Install" says it, from a wheel: build the wheel, install it (not editable) in a fresh
# venv with torch's CPU build first and then the wheel with the adapters' extras, then run `xgenmm chat` on an image
# with a random checkpoint and import both adapters, from outside the source tree (so only the wheel can answer).
# Fast: pip's cache is reused and torch comes from the local wheel (as in .ci/setup); TORCH_INSTALL overrides it,
# e.g. TORCH_INSTALL="torch --index-url https://download.pytorch.org/whl/cpu" (the README's line) elsewhere.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON_BIN="${PYTHON:-python3}"
TORCH_INSTALL="${TORCH_INSTALL:-torch==2.13.0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/xgenmm-wheel-smoke.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)
step() { echo "[wheel-smoke] $1 ($(( $(date +%s) - start ))s)"; }

"$PYTHON_BIN" -m venv "$WORK/venv"
V="$WORK/venv/bin"
step "building the wheel"
"$V/pip" wheel --quiet --no-deps -w "$WORK/dist" "$REPO"
WHEEL="$(ls "$WORK"/dist/xgenmm-*.whl)"
step "installing torch first: $TORCH_INSTALL"
# shellcheck disable=SC2086
"$V/pip" install --quiet --no-compile $TORCH_INSTALL   # --no-compile: byte-compiling torch is most of the time
step "installing $(basename "$WHEEL")[langchain,llamaindex]"
"$V/pip" install --quiet --no-compile "$WHEEL[langchain,llamaindex]"
"$V/pip" check

cd "$WORK"
step "xgenmm chat on an image (random checkpoint)"
HF_HUB_OFFLINE=1 "$V/xgenmm" make-random-checkpoint --preset tiny "$WORK/ckpt" >/dev/null
answer="$(HF_HUB_OFFLINE=1 "$V/xgenmm" chat --model "$WORK/ckpt" --device cpu --max-tokens 8 \
  --image "$REPO/examples/images/house.png" "What is in this image?")"
[ -n "$answer" ] || { echo "[wheel-smoke] xgenmm chat printed nothing" >&2; exit 1; }
step "importing both adapters from the installed wheel"
"$V/python" - "$WORK/venv" <<'PY'
import sys
import langchain_xgenmm, llamaindex_xgenmm, xgenmm
from langchain_xgenmm import ChatXGenMM, XGenMMImageLoader, XGenMMImageQATool
from llama_index.llms.xgenmm import XGenMM
from llama_index.readers.xgenmm import XGenMMImageReader

for module in (xgenmm, langchain_xgenmm, llamaindex_xgenmm):
    assert module.__file__.startswith(sys.argv[1]), f"{module.__name__} imported from {module.__file__}, not the wheel"
print("adapters import from the wheel:", xgenmm.__version__, ChatXGenMM.__name__, XGenMM.__name__)
PY
step "done"
