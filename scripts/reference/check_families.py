"""Depth-pruned exports of each family load in transformers with the logits of a model built in Python (issue 14).

A reference script, not a test. For every family under golden/archs/ (tiny random HF models, no tokenizer):

1. the dense directory loads in transformers and reproduces golden.safetensors' logits (sanity);
2. `slm depth` prunes one layer of a temporary copy of it (with a byte-level tokenizer.json added for the
   calibration text): `--method shortgpt` (a layer deleted) and `--method slm-dp --merge average` (two layers
   fused, so merged biases, q/k norms and Gemma-3's extra norms are exercised);
3. each output loads in transformers as the family's own model_type/architecture with one layer fewer, no missing
   or unexpected weights, and its logits on golden ids_0..2 match those of a reference built here independently:
   the dense model in transformers with the layer deleted, or with the window that slm_plan.json names replaced by
   the element-wise mean of its layers (every parameter), the attention type of a fused window being global unless
   all its layers are sliding;
4. slm's own forward pass on the export is compared with transformers' through the one number slm prints:
   `slm eval OUT --tasks wikitext2-128 --limit N` against the same perplexity computed in transformers.

Prints one table row per family and method, exits 1 on any failure.

Usage: python check_families.py [--slm BIN] [--families a,b] [--work DIR] [--keep] [--tol 1e-4]
(scripts/reference/check_families.sh makes the venv and runs it.)
"""
import argparse, copy, json, math, os, shutil, subprocess, sys, tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

torch.set_num_threads(1)
hf_logging.disable_progress_bar()
ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["llama3", "llama_headdim", "mistral", "qwen2", "qwen3", "gemma3"]
MODEL_TYPE = {"llama3": "llama", "llama_headdim": "llama", "mistral": "mistral", "qwen2": "qwen2",
              "qwen3": "qwen3", "gemma3": "gemma3_text"}
ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
METHODS = [("shortgpt", []), ("slm-dp", ["--merge", "average"])]
# Config keys that may differ between the export and the reference without changing the model.
CONFIG_NOISE = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures",
                "num_hidden_layers", "layer_types", "use_cache", "output_attentions", "output_hidden_states",
                "return_dict", "_attn_implementation_autoset", "_commit_hash", "chunk_size_feed_forward"}


def byte_level_tokenizer(path):
    """256 byte tokens (ids 0..255, below every family's vocab_size 512), no merges, no specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))


def load(d):
    model, info = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def logits(model, ids):
    with torch.no_grad():
        return model(ids[None]).logits[0]


def patch_config(out, dense_dir, dst):
    """A copy of `out` whose config.json has the dense config's int type back where slm wrote an integral float
    (what transformers' strict config classes refuse); the keys changed, or None when there is nothing to change."""
    cfg, dense_cfg = json.load(open(out / "config.json")), json.load(open(dense_dir / "config.json"))
    changed = []
    for k, v in cfg.items():
        if isinstance(v, float) and v.is_integer() and isinstance(dense_cfg.get(k), int) \
                and not isinstance(dense_cfg.get(k), bool):
            cfg[k] = int(v)
            changed.append(f"{k} {v!r}->{int(v)}")
    if not changed:
        return None
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(out, dst)
    json.dump(cfg, open(dst / "config.json", "w"), indent=2)
    return ", ".join(changed)


def windows_from_plan(plan):
    """The kept windows [lo, hi] of the dense layers, from the plan's merges and removed layers alone."""
    n, merges, removed = plan["num_layers"], [tuple(m) for m in plan["merges"]], set(plan["removed"])
    out, i = [], 0
    while i < n:
        m = next((m for m in merges if m[0] == i), None)
        if m:
            out.append([m[0], m[1]])
            i = m[1] + 1
        else:
            if i not in removed:
                out.append([i, i])
            i += 1
    return out


def fuse(tensors, names, op):
    """One layer's parameters from a window's (dense order), by slm's operator definitions (slm-depth merge.rs)."""
    out = {}
    for name in names:
        ts = [t[name] for t in tensors]
        norm = "norm" in name
        if op == "average":  # every parameter, norms included; summed in window order, then divided
            acc = ts[0].clone()
            for t in ts[1:]:
                acc = acc + t
            out[name] = acc / len(ts)
        elif op == "delete":
            out[name] = ts[0]
        elif op == "top":
            out[name] = ts[-1]
        elif op == "reference":
            out[name] = ts[0] if norm else ts[-1]
        elif op == "paper":
            acc = ts[0].clone()
            if not norm:
                for t in ts[1:]:
                    acc = acc + (t - ts[0])
            out[name] = acc
        else:
            raise ValueError(f"operator {op} not modelled here")
    return out


def reference(dense, windows, op):
    """The dense model with its layers replaced by `windows` (each fused with `op`), built in transformers."""
    cfg = copy.deepcopy(dense.config)
    cfg.num_hidden_layers = len(windows)
    dense_types = getattr(dense.config, "layer_types", None)
    if dense_types is not None:
        cfg.layer_types = [
            "sliding_attention" if all(dense_types[k] == "sliding_attention" for k in range(lo, hi + 1))
            else "full_attention"
            for lo, hi in windows
        ]
    sd = dense.state_dict()
    per_layer = [{} for _ in range(dense.config.num_hidden_layers)]
    rest = {}
    for name, t in sd.items():
        if name.startswith("model.layers."):
            idx, sub = name[len("model.layers."):].split(".", 1)
            per_layer[int(idx)][sub] = t
        else:
            rest[name] = t
    names = list(per_layer[0])
    new = dict(rest)
    for i, (lo, hi) in enumerate(windows):
        for sub, t in fuse(per_layer[lo:hi + 1], names, op if hi > lo else "delete").items():
            new[f"model.layers.{i}.{sub}"] = t
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(new, strict=False)
    assert not unexpected and not [m for m in missing if m != "lm_head.weight"], (missing, unexpected)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def tf_wikitext_ppl(model, tok_json, windows):
    """transformers' perplexity by check_pruned_ppl.py's protocol (non-overlapping 128-token windows)."""
    rows = [json.loads(l)["text"] for l in open(ROOT / "data/wikitext-2-raw-v1.test.jsonl", encoding="utf-8")]
    text = "\n\n".join(rows)[: 64 * 128 * windows]  # byte-level, no merges: a prefix's tokens are a prefix
    ids = Tokenizer.from_file(str(tok_json)).encode(text, add_special_tokens=False).ids
    if model.config.model_type.startswith("gemma"):  # slm's LmEvalEncoder, as lm-eval: Gemma text starts with BOS
        ids = [model.config.bos_token_id] + ids
    assert len(ids) >= 128 * windows
    nll = 0.0
    with torch.no_grad():
        for w in range(windows):
            x = torch.tensor([ids[w * 128:(w + 1) * 128]])
            logp = torch.log_softmax(model(x).logits[0, :-1], -1)
            nll -= logp.gather(1, x[0, 1:, None]).sum().item()
    return math.exp(nll / (127 * windows))


def slm_wikitext_ppl(slm, d, windows, work):
    res = work / f"eval-{d.name}.json"
    subprocess.run([slm, "eval", str(d), "--tasks", "wikitext2-128", "--limit", str(windows), "--batch-size", "1",
                    "--data-dir", str(ROOT / "data"), "--output-path", str(res), "--force"],
                   check=True, capture_output=True, text=True)
    return json.load(open(res))["results"]["wikitext2-128"]["perplexity,none"]


def ppl_check(args, d, model, work, problems):
    """slm's wikitext2-128 perplexity on `d` against transformers' on `model` (loaded from `d`)."""
    try:
        p_slm = slm_wikitext_ppl(args.slm, d, args.ppl_windows, work)
    except subprocess.CalledProcessError as e:
        problems.append(f"slm eval failed: {e.stderr.strip().splitlines()[-1:]}")
        return "-"
    p_tf = tf_wikitext_ppl(model, d / "tokenizer.json", args.ppl_windows)
    rel = abs(p_slm - p_tf) / p_tf
    if rel > args.tol:
        problems.append(f"wikitext2-128 perplexity slm {p_slm} vs transformers {p_tf} (rel {rel:.1e})")
    return f"{p_slm:.4f}/{p_tf:.4f} ({rel:.0e})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slm", default=os.environ.get("SLM", str(ROOT / "target/release/slm")))
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--work", help="work directory (default: a temporary one, removed unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--tol", type=float, default=1e-4, help="max |logit difference| (default 1e-4)")
    ap.add_argument("--ppl-windows", type=int, default=4, help="wikitext2-128 windows for slm vs transformers")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="slm-check-families-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    for fam in args.families.split(","):
        src = ROOT / "golden/archs" / fam
        golden = load_file(str(src / "golden.safetensors"))
        ids = [golden[f"ids_{k}"] for k in range(3)]
        dense, _ = load(src)
        dense_diff = max((logits(dense, ids[k]) - golden[f"logits_{k}"]).abs().max().item() for k in range(3))
        n_dense = dense.config.num_hidden_layers
        drow = {"family": fam, "method": "dense", "before": n_dense, "after": n_dense, "windows": "all",
                "types": ",".join(t.split("_")[0][0] for t in getattr(dense.config, "layer_types", None) or []) or "-",
                "dw": float("nan"), "dlogit": dense_diff, "vs_dense": 0.0, "ppl": "-", "notes": [], "info": []}
        rows.append(drow)
        if dense_diff > args.tol:
            drow["notes"].append(f"dense transformers vs golden logits {dense_diff:.2e} > {args.tol:g}")
        # A copy with a tokenizer for the calibration text; slm writes nothing into golden/.
        copy_dir = work / fam
        shutil.rmtree(copy_dir, ignore_errors=True)
        copy_dir.mkdir()
        for f in ("config.json", "model.safetensors"):
            shutil.copy(src / f, copy_dir / f)
        byte_level_tokenizer(copy_dir / "tokenizer.json")
        drow["ppl"] = ppl_check(args, copy_dir, dense, work, drow["notes"])
        failures += [f"{fam}/dense: {p}" for p in drow["notes"]]
        for method, extra in METHODS:
            out = work / f"{fam}-{method}"
            cmd = [args.slm, "depth", str(copy_dir), "--out", str(out), "--force", "--method", method, *extra,
                   "--target-layers", "1", "--samples", "4", "--seq-len", "16",
                   "--calib", str(ROOT / "data/lambada_openai.test.jsonl")]
            row = {"family": fam, "method": method + (f" {extra[1]}" if extra else ""), "before": n_dense,
                   "after": "-", "windows": "-", "types": "-", "dw": float("nan"), "dlogit": float("nan"),
                   "vs_dense": float("nan"), "ppl": "-", "notes": [], "info": []}
            rows.append(row)
            problems = []
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                problems.append(f"slm depth failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
                failures += [f"{fam}/{method}: {p}" for p in problems]
                row["notes"] = problems
                continue
            plan = json.load(open(out / "slm_plan.json"))
            raw_cfg = json.load(open(out / "config.json"))
            windows = windows_from_plan(plan["plan"])
            if windows != plan["kept_layers"]:
                problems.append(f"kept_layers {plan['kept_layers']} != windows of merges/removed {windows}")
            op = plan["plan"]["operator"]
            row["windows"] = " ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in windows) + f" ({op})"
            want_type = MODEL_TYPE[fam]
            if raw_cfg.get("model_type") != want_type or raw_cfg.get("architectures") != [ARCH[want_type]]:
                problems.append(f"config says {raw_cfg.get('model_type')} {raw_cfg.get('architectures')}")
            try:
                exp, info = load(out)
            except Exception as e:  # noqa: BLE001 - reported, then measured on a patched copy
                problems.append(f"transformers cannot load the export: {type(e).__name__}: "
                                f"{' '.join(str(e).split())[:160]}")
                patched = patch_config(out, src, work / f"{fam}-{method}-patched")
                if not patched:
                    row["notes"] += problems
                    failures += [f"{fam}/{method}: {p}" for p in problems]
                    continue
                row["info"].append(f"measured on a copy with config.json patched: {patched}")
                exp, info = load(work / f"{fam}-{method}-patched")
            row["after"] = exp.config.num_hidden_layers
            if exp.config.num_hidden_layers != n_dense - 1 or plan["layers_after"] != n_dense - 1:
                problems.append(f"{exp.config.num_hidden_layers} layers, expected {n_dense - 1}")
            if type(exp).__name__ != ARCH[want_type]:
                problems.append(f"transformers built {type(exp).__name__}")
            bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
            if bad:
                problems.append(f"loading info {bad}")
            ref = reference(dense, windows, op)
            ref_types = getattr(ref.config, "layer_types", None)
            exp_types = getattr(exp.config, "layer_types", None)
            if ref_types is not None:
                row["types"] = ",".join(t.split("_")[0][0] for t in exp_types or [])
                if list(exp_types or []) != list(ref_types):
                    problems.append(f"layer_types {exp_types}, expected {ref_types}")
            ecfg, rcfg = exp.config.to_dict(), ref.config.to_dict()
            cdiff = sorted(k for k in set(ecfg) | set(rcfg) if k not in CONFIG_NOISE and ecfg.get(k) != rcfg.get(k))
            if cdiff:
                row["info"].append("config differs from dense on " +
                                    ", ".join(f"{k}={ecfg.get(k)!r} (dense {rcfg.get(k)!r})" for k in cdiff))
            esd, rsd = exp.state_dict(), ref.state_dict()
            if set(esd) != set(rsd):
                problems.append(f"weight names differ: {sorted(set(esd) ^ set(rsd))}")
            else:
                row["dw"] = max((esd[k] - rsd[k]).abs().max().item() for k in esd)
            row["dlogit"] = max((logits(exp, ids[k]) - logits(ref, ids[k])).abs().max().item() for k in range(3))
            if not row["dlogit"] <= args.tol:
                problems.append(f"max|dlogit| export vs reference {row['dlogit']:.2e} > {args.tol:g}")
            row["vs_dense"] = max((logits(exp, ids[k]) - logits(dense, ids[k])).abs().max().item() for k in range(3))
            row["ppl"] = ppl_check(args, out, exp, work, problems)
            row["notes"] += problems
            failures += [f"{fam}/{method}: {p}" for p in problems]

    hdr = (f"{'family':<14} {'method':<15} {'layers':<6} {'kept windows':<16} {'types':<6} {'max|dW|':>9} "
           f"{'max|dlogit|':>11} {'vs dense':>9} {'ppl slm/transformers (rel)':<30} result")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ok = not r["notes"]
        print(f"{r['family']:<14} {r['method']:<15} {str(r['before']) + '->' + str(r['after']):<6} "
              f"{r['windows']:<16} {r['types']:<6} {r['dw']:>9.2e} {r['dlogit']:>11.2e} {r['vs_dense']:>9.2e} "
              f"{r['ppl']:<30} {'pass' if ok else 'FAIL'}")
        for n in r["notes"]:
            print(f"    problem: {n}")
        for n in r["info"]:
            print(f"    note: {n}")
    print(f"tolerance {args.tol:g} (logits absolute, perplexity relative). max|dlogit| on golden ids_0..2: dense rows "
          f"transformers vs golden.safetensors, pruned rows the export vs the Python-built reference, both in "
          f"transformers; max|dW|: their weights; vs dense: the export vs the dense model (how much the prune "
          f"changed). ppl: wikitext2-128, {args.ppl_windows} windows of the byte-level tokenizer, `slm eval` vs "
          f"transformers on the same directory. types: s(liding)/f(ull) per layer")
    if args.keep or args.work:
        print(f"outputs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"{len(failures)} failure(s):")
        for f in failures:
            print("  " + f)
        sys.exit(1)
    print("all passed")


if __name__ == "__main__":
    main()
