"""Loads an HF directory written by `slm` (e.g. `slm depth`) in transformers and prints its WikiText-2 perplexity
on the first N non-overlapping 128-token windows (test rows joined with "\n\n"), to compare with
`slm eval DIR --tasks wikitext2-128 --limit N`.

Usage: python check_pruned_ppl.py DIR [N] [DATA_DIR]"""
import json, math, sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

d = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
data = sys.argv[3] if len(sys.argv) > 3 else "data"
torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(d)
rows = [json.loads(l)["text"] for l in open(f"{data}/wikitext-2-raw-v1.test.jsonl", encoding="utf-8")]
ids = tok("\n\n".join(rows), add_special_tokens=False)["input_ids"]
nll, count = 0.0, 0
with torch.no_grad():
    for w in range(n):
        x = torch.tensor([ids[w * 128:(w + 1) * 128]])
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
        nll -= logp.gather(1, x[0, 1:, None]).sum().item()
        count += 127
print(json.dumps({"layers": model.config.num_hidden_layers, "windows": n, "perplexity": math.exp(nll / count)}))
