"""Loads an HF directory written by `slm export` in transformers and compares its logits with the golden file.

Usage: python check_hf_load.py EXPORTED_DIR [GOLDEN_SAFETENSORS]
Prints the max |logit difference| per prompt and whether the token ids agree.
"""
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

d = sys.argv[1]
golden = sys.argv[2] if len(sys.argv) > 2 else "golden/smollm2_logits.safetensors"
meta = json.load(open(golden.replace(".safetensors", ".json")))
g = load_file(golden)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(d)
print("loaded", type(model).__name__, "layers", model.config.num_hidden_layers, "params", sum(p.numel() for p in model.parameters()))
worst = 0.0
for p in meta["prompts"]:
    i = p["index"]
    ids = tok(p["prompt"], add_special_tokens=False)["input_ids"]
    same = ids == g[f"ids_{i}"].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([g[f"ids_{i}"].tolist()])).logits[0]
    diff = (logits - g[f"logits_{i}"]).abs().max().item()
    worst = max(worst, diff)
    print(f"prompt {i}: ids equal={same} max|dlogit|={diff:.2e} argmax_last={logits[-1].argmax().item()} (golden {p['argmax_last']})")
print(f"worst max|dlogit| = {worst:.2e}")
