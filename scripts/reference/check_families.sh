#!/usr/bin/env bash
# Depth-pruned exports of each golden/archs family (shortgpt and slm-dp --merge average, one layer) load in
# transformers with the logits of a model built in Python, and slm's perplexity on them matches transformers'
# (issue 14). A reference check, not a test: needs the .venv-ref of venv.sh (PyTorch, transformers 5.24).
# Env: SLM (default target/release/slm; SKIP_BUILD=1 skips `cargo build --release -p slm-cli`).
# Extra arguments go to check_families.py (--families, --work DIR, --keep, --tol).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
py="$(bash scripts/reference/venv.sh)"
if [[ -z "${SLM:-}" && -z "${SKIP_BUILD:-}" ]]; then
  cargo build --release -q -p slm-cli
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$py" scripts/reference/check_families.py --slm "${SLM:-$root/target/release/slm}" "$@"
