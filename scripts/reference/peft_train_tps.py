"""LoRA training throughput of PEFT + PyTorch (f32, CPU) in the configuration of `slm lora`.

Same data as slm (text JSONL joined by "\\n\\n", cut into windows of --seq tokens), LM loss on every position,
r/alpha/dropout on q,k,v,o,gate,up,down, AdamW, clipping at 1.0, one optimiser step per --micro-batch sequences.
Tokens/s is measured over steps 2..N (the first step warms up allocators), as bench_lora.sh does for slm.

Usage: python peft_train_tps.py HF_DIR [--data FILE] [--rank 8] [--alpha 16] [--dropout 0.05] [--seq 256]
       [--micro-batch 4] [--steps 6] [--lr 1e-4]; prints one JSON line.
"""
import argparse, json, time
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--data", default="data/lambada_openai.test.jsonl")
ap.add_argument("--rank", type=int, default=8)
ap.add_argument("--alpha", type=float, default=16)
ap.add_argument("--dropout", type=float, default=0.05)
ap.add_argument("--seq", type=int, default=256)
ap.add_argument("--micro-batch", type=int, default=4)
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--lr", type=float, default=1e-4)
a = ap.parse_args()
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(a.model)
need = a.steps * a.micro_batch * a.seq
sep = tok("\n\n", add_special_tokens=False)["input_ids"]
stream = []
for line in open(a.data):
    ids = tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
    if not ids:
        continue
    if stream:
        stream += sep
    stream += ids
    if len(stream) >= need:
        break
windows = torch.tensor(stream[:need]).view(a.steps, a.micro_batch, a.seq)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
cfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, bias="none", task_type="CAUSAL_LM",
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
model = get_peft_model(model, cfg)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
times = []
for s in range(a.steps):
    t = time.perf_counter()
    ids = windows[s]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
timed = times[1:] if len(times) > 1 else times
print(json.dumps({"impl": "peft", "torch_threads": torch.get_num_threads(), "seq": a.seq, "micro_batch": a.micro_batch,
                  "steps": a.steps, "trainable": sum(p.numel() for p in params), "last_loss": round(loss.item(), 4),
                  "tokens_per_s": round(len(timed) * a.micro_batch * a.seq / sum(timed), 1)}))
