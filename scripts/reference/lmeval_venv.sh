#!/usr/bin/env bash
# Adds lm-evaluation-harness 0.4.13 (the version the golden files in golden/ were made with) to
# .venv-ref, for scripts/bench_eval.sh. Idempotent. Creates .venv-ref first via venv.sh when needed, and keeps
# its torch / transformers (and their tokenizers, safetensors, huggingface_hub) at the versions already installed
# by passing them to pip as constraints. Only PyPI is needed. Prints the venv's python path on stdout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="$(bash "$root/scripts/reference/venv.sh")"
lmeval_version="0.4.13"
if ! "$py" - "$lmeval_version" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
import accelerate, datasets, lm_eval, lm_eval.models.huggingface  # noqa: F401  (HFLM needs accelerate)
sys.exit(0 if version("lm_eval") == sys.argv[1] else 1)
PY
then
  constraints="$(mktemp)"
  trap 'rm -f "$constraints"' EXIT
  "$py" - > "$constraints" <<'PY'
from importlib.metadata import version, PackageNotFoundError
for name in ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
PY
  # lm-eval's "hf" extra would also pull peft (imported lazily, only for adapters); install its core plus accelerate.
  "$py" -m pip install -q --disable-pip-version-check -c "$constraints" "lm-eval==$lmeval_version" accelerate >&2
fi
echo "$py"
