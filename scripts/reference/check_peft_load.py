"""Checks that PEFT loads an adapter written by `slm lora` onto the base HF model and gives the logits of slm's
merged model (`slm lora ... --merge` writes OUT/merged).

Usage: python check_peft_load.py BASE_HF_DIR ADAPTER_DIR [MERGED_DIR]   (MERGED_DIR defaults to ADAPTER_DIR/merged)
Prints max |logit difference| per prompt (PEFT unmerged vs slm merged, and PEFT's own merge_and_unload vs slm).
"""
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base_dir, adapter_dir = sys.argv[1], sys.argv[2]
merged_dir = sys.argv[3] if len(sys.argv) > 3 else f"{adapter_dir}/merged"
tok = AutoTokenizer.from_pretrained(base_dir)
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
peft = PeftModel.from_pretrained(base, adapter_dir).eval()
merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
n_lora = sum(1 for n, _ in peft.named_parameters() if "lora_" in n)
print(f"PEFT loaded {n_lora} LoRA tensors; scaling {peft.peft_config['default'].lora_alpha / peft.peft_config['default'].r}")
prompts = ["The capital of France is", "Below is an instruction that describes a task.\n\n### Response:\n",
           "She opened the door and saw"]
worst = 0.0
with torch.no_grad():
    delta = max((p.abs().max().item() for n, p in peft.named_parameters() if "lora_B" in n), default=0.0)
    print(f"max |lora_B| = {delta:.3e} (0 would make the check vacuous)")
    for p in prompts:
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        a = peft(ids).logits[0]
        b = merged(ids).logits[0]
        d = (a - b).abs().max().item()
        worst = max(worst, d)
        print(f"{p[:30]!r}: max|PEFT - slm merged| = {d:.2e}, argmax equal = {bool((a.argmax(-1) == b.argmax(-1)).all())}")
    own = peft.merge_and_unload()
    for p in prompts[:1]:
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        d = (own(ids).logits[0] - merged(ids).logits[0]).abs().max().item()
        print(f"PEFT merge_and_unload vs slm merged: {d:.2e}")
print(f"worst max|dlogit| = {worst:.2e}", "OK" if worst <= 1e-3 else "MISMATCH")
