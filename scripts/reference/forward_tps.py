"""Forward-pass throughput of transformers (f32, CPU) on the same input as slm's forward_tps.

Usage: python forward_tps.py HF_DIR [--batch 16] [--seq 128] [--iters 5]; prints one JSON line.
"""
import argparse, json, time
import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--iters", type=int, default=5)
a = ap.parse_args()
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
vocab = model.config.vocab_size
ids = torch.tensor([[(7919 * (b * a.seq + t) + 13) % vocab for t in range(a.seq)] for b in range(a.batch)])
with torch.inference_mode():
    model(ids)
    times = []
    for _ in range(a.iters):
        t = time.perf_counter()
        model(ids).logits
        times.append(time.perf_counter() - t)
times.sort()
med = times[len(times) // 2]
print(json.dumps({"impl": "transformers", "torch_threads": torch.get_num_threads(), "batch": a.batch, "seq": a.seq,
                  "median_s": round(med, 4), "tokens_per_s": round(a.batch * a.seq / med, 1)}))
