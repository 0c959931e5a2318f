#!/usr/bin/env python3
"""Research probe for issue 4 (not part of the tests): replace removed layers by a linear map fitted on calibration
activations (the ReplaceMe idea), no retraining.

Each run [a, b] of removed layers is replaced by a 576x576 matrix T applied to the MLP output of the kept layer
below it (layer a-1) and folded into that layer's down_proj (W' = T^T W), so the pruned model is a plain Llama.
With h the pruned stream after layer a-1's attention, M that layer's MLP output and Y the dense stream entering
layer b+1 (calibration windows, position 0, the attention sink, left out), runs are fitted bottom-up:

  ls RIDGE  : min ||M T - (Y - h)||^2 + lambda ||T - I||^2, lambda = RIDGE * trace(M^T M) / 576 (closed form)
  diag RIDGE: T diagonal (one scale per hidden channel), the same least squares channel by channel
  lrK RIDGE : T = I + the rank-K truncation (SVD) of (T_ls - I), e.g. lr32
  cos LR    : min mean(1 - cos(M T + h, Y)) from T = I with Adam (learning rate LR, STEPS steps, default 300)

T = I is plain deletion (the ShortGPT model when the runs are ShortGPT's). Writes an HF directory to evaluate with
`slm eval`. Calibration: CAL windows of 128 tokens (default 16) drawn (seed 1234) from the joined LAMBADA texts.
  target/release/slm export models/SmolLM2-135M-Instruct.Q4_1.gguf --out out/smollm2-f32
  CAL=256 .venv-ref/bin/python scripts/reference/linear_replace_probe.py out/smollm2-f32 '[[3,7],[12,17],[25,26]]' ls 0.0001 out/x-sg13-ls
  target/release/slm eval out/x-sg13-ls --tasks wikitext2-128 --limit 40
"""
import copy, json, os, random, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../data/")
torch.set_num_threads(2)
torch.manual_seed(0)
MD, RUNS, MODE, PARAM, OUT = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5]
tok = AutoTokenizer.from_pretrained(MD)
base = AutoModelForCausalLM.from_pretrained(MD, dtype=torch.float32).eval()
L = base.config.num_hidden_layers
CAL = int(os.environ.get("CAL", "16"))
lam = [json.loads(l)["text"] for l in open(DATA + "lambada_openai.test.jsonl")]
ids = tok("\n\n".join(lam[:3000]))["input_ids"]
rng = random.Random(1234)
cal = torch.tensor([ids[s:s + 128] for s in [rng.randrange(0, len(ids) - 128) for _ in range(CAL)]])


@torch.no_grad()
def dense_inputs(layer):
    """The dense stream entering `layer` on the calibration windows."""
    return torch.cat([base(cal[i:i + 16], output_hidden_states=True).hidden_states[layer] for i in range(0, CAL, 16)])


@torch.no_grad()
def capture(model, j):
    """Layer j's stream after attention (input of its post-attention norm) and its MLP output."""
    layer, got = model.model.layers[j], {"h": [], "m": []}
    hooks = [layer.post_attention_layernorm.register_forward_pre_hook(lambda mod, a: got["h"].append(a[0])),
             layer.mlp.register_forward_hook(lambda mod, a, o: got["m"].append(o))]
    for i in range(0, CAL, 16):
        model(cal[i:i + 16])
    for h in hooks:
        h.remove()
    return torch.cat(got["h"]), torch.cat(got["m"])


def fit(M, H, Y):
    M, H, Y = [x[:, 1:].reshape(-1, x.shape[-1]).double() for x in (M, H, Y)]
    C = M.shape[1]
    I = torch.eye(C, dtype=torch.float64)
    if MODE == "diag":
        m2 = (M * M).sum(0)
        lam = PARAM * m2.mean()
        return torch.diag(((M * (Y - H)).sum(0) + lam) / (m2 + lam))
    if MODE == "ls" or MODE.startswith("lr"):
        G = M.T @ M
        lam = PARAM * G.trace() / C
        T = torch.linalg.solve(G + lam * I, M.T @ (Y - H) + lam * I)
        if MODE == "ls":
            return T
        k = int(MODE[2:])
        U, S, V = torch.linalg.svd(T - I)
        return I + U[:, :k] @ torch.diag(S[:k]) @ V[:k]
    assert MODE == "cos", MODE
    M, H, Y = M.float(), H.float(), Y.float()
    T = torch.eye(C, requires_grad=True)
    opt = torch.optim.Adam([T], lr=PARAM)
    for step in range(int(os.environ.get("STEPS", "300"))):
        loss = (1 - torch.nn.functional.cosine_similarity(M @ T + H, Y, dim=1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return T.detach().double()


keep = [i for i in range(L) if not any(a <= i <= b for a, b in RUNS)]
model = copy.deepcopy(base)
model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
for j, layer in enumerate(model.model.layers):
    layer.self_attn.layer_idx = j
model.config.num_hidden_layers = len(keep)
for a, b in sorted(RUNS):
    j = keep.index(a - 1)
    H, M = capture(model, j)
    Y = dense_inputs(b + 1)
    T = fit(M, H, Y)
    before = (1 - torch.nn.functional.cosine_similarity((M + H)[:, 1:], Y[:, 1:], dim=-1)).mean().item()
    after = (1 - torch.nn.functional.cosine_similarity((M @ T.float() + H)[:, 1:], Y[:, 1:], dim=-1)).mean().item()
    print(f"run [{a},{b}] on layer {a - 1}: 1 - cos {before:.4f} -> {after:.4f}", flush=True)
    w = model.model.layers[j].mlp.down_proj.weight
    w.data = (T.T.float() @ w.data).contiguous()
model.save_pretrained(OUT, safe_serialization=True)
tok.save_pretrained(OUT)
print("wrote", OUT)
