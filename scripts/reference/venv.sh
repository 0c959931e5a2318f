#!/usr/bin/env bash
# Makes .venv-ref (transformers + PyTorch, CPU use) for the reference checks and benchmarks. Not needed by tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="$root/.venv-ref"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import torch, transformers" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "torch==2.15.0" "transformers==5.24.0" safetensors numpy gguf
fi
# PEFT for the LoRA checks (check_peft_load.py, peft_train_tps.py).
if ! "$venv/bin/python" -c "import peft" 2>/dev/null; then
  "$venv/bin/pip" install -q --disable-pip-version-check peft
fi
echo "$venv/bin/python"
