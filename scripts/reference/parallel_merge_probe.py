#!/usr/bin/env python3
"""Research probe for issue 4 (not part of the tests): fusing a window of layers by running them in parallel.

The window's layers are run on the same input: their attention heads and MLP channels are concatenated into one
wide layer (each layer's RMSNorm weight folded into its q/k/v and gate/up columns), which computes the sum of the
layers' attention and MLP outputs exactly. "concat-prune" then keeps the 3 KV groups and 1536 MLP channels (one
layer's width) whose outputs carry the most energy on the calibration windows (position 0, the attention sink,
excluded), so the fused layer has the parameters of one layer.

  pairs W   : for every window of W layers, the calibration KL (dense vs the model with that window fused) of
              delete / top / parallel (no pruning) / concat-prune.
  dp N CAP  : local window costs (1 - token cosine of the fused layer's output with the dense stream after the
              window) for top and concat-prune, the DP of `slm depth --method slm-dp` with the cheaper operator per
              window, for each cap up to CAP; prints each plan's calibration KL and WikiText-2 PPL (first 40
              windows of 128 tokens).

Needs torch + transformers (.venv-ref) and an f32 HF export of the default model:
  target/release/slm export models/SmolLM2-135M-Instruct.Q4_1.gguf --out out/smollm2-f32
  .venv-ref/bin/python scripts/reference/parallel_merge_probe.py out/smollm2-f32 16 pairs 2
  .venv-ref/bin/python scripts/reference/parallel_merge_probe.py out/smollm2-f32 16 dp 13 8
Calibration here: CAL windows of 128 tokens drawn (seed 1234) from the joined LAMBADA texts, not slm's sampler.
"""
import json, random, sys, math, time, os, torch
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../data/")
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(2)
torch.manual_seed(0)
MD = sys.argv[1]
tok = AutoTokenizer.from_pretrained(MD)
model = AutoModelForCausalLM.from_pretrained(MD, torch_dtype=torch.float32).eval()
L = model.config.num_hidden_layers
layers = model.model.layers

def windows_from_text(text, n, seq, seed, random_pick=True):
    ids = tok(text, return_tensors=None)["input_ids"]
    if random_pick:
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            s = rng.randrange(0, len(ids) - seq)
            out.append(ids[s:s+seq])
        return torch.tensor(out)
    return torch.tensor([ids[i*seq:(i+1)*seq] for i in range(n)])

lam = [json.loads(l)["text"] for l in open(DATA + "lambada_openai.test.jsonl")]
CAL_N = int(sys.argv[2])
cal = windows_from_text("\n\n".join(lam[:3000]), CAL_N, 128, 1234)
wt = [json.loads(l) for l in open(DATA + "wikitext-2-raw-v1.test.jsonl")]
wt_text = "\n\n".join(r["text"] if isinstance(r, dict) else r for r in wt)
wt_ids = tok(wt_text[:400000])["input_ids"]
ev = torch.tensor([wt_ids[i*128:(i+1)*128] for i in range(80)])

# recipe: list of (attn_src, mlp_src) per output layer; src = layer index or None (skip sublayer)
@torch.no_grad()
def nll(recipe, ids, bs=16):
    tot, n = 0.0, 0
    for i in range(0, ids.shape[0], bs):
        b = ids[i:i+bs]
        lg = run(recipe, b)[:, :-1].float()
        lp = torch.log_softmax(lg, -1)
        t = b[:, 1:]
        tot += -lp.gather(-1, t.unsqueeze(-1)).sum().item(); n += t.numel()
    return tot / n


@torch.no_grad()
def kl(recipe, ids=cal, ref=None, bs=16):
    ref = dense_lp_cal if ref is None else ref
    tot = 0.0
    for i in range(0, ids.shape[0], bs):
        lp = torch.log_softmax(run(recipe, ids[i:i+bs]).float(), -1)
        r = ref[i:i+bs]
        tot += (r.exp() * (r - lp)).sum(-1).sum().item()
    return tot / (ids.shape[0] * ids.shape[1])

def ppl(recipe, lo=0, hi=40):
    return math.exp(nll(recipe, ev[lo:hi]))

# concat-prune prototype: parallel merge of a window, then keep the most important units
import torch.nn.functional as F
class Merged:
    def __init__(self, ids, keep_heads=None, keep_ch=None):
        H, KV, D = 9, 3, 64
        qs, ks, vs, os_, gs, us, ds = [], [], [], [], [], [], []
        for k in ids:
            l = layers[k]; gi = l.input_layernorm.weight; gp = l.post_attention_layernorm.weight
            a = l.self_attn
            qs.append(a.q_proj.weight * gi); ks.append(a.k_proj.weight * gi); vs.append(a.v_proj.weight * gi); os_.append(a.o_proj.weight)
            gs.append(l.mlp.gate_proj.weight * gp); us.append(l.mlp.up_proj.weight * gp); ds.append(l.mlp.down_proj.weight)
        self.q = torch.cat(qs); self.k = torch.cat(ks); self.v = torch.cat(vs); self.o = torch.cat(os_, 1)
        self.g = torch.cat(gs); self.u = torch.cat(us); self.d = torch.cat(ds, 1)
        self.nkv = KV * len(ids); self.rep = H // KV; self.D = D
        self.eps = layers[0].input_layernorm.variance_epsilon
        if keep_heads is not None: self.keep(keep_heads, keep_ch)
    def keep(self, kv_groups, ch):
        D, rep = self.D, self.rep
        kvr = torch.cat([torch.arange(g*D, (g+1)*D) for g in kv_groups])
        qr = torch.cat([torch.arange((g*rep+j)*D, (g*rep+j+1)*D) for g in kv_groups for j in range(rep)])
        self.q = self.q[qr]; self.o = self.o[:, qr]; self.k = self.k[kvr]; self.v = self.v[kvr]; self.nkv = len(kv_groups)
        ch = torch.as_tensor(ch); self.g = self.g[ch]; self.u = self.u[ch]; self.d = self.d[:, ch]
    def norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    def attn_parts(self, x, pe):
        B, T, _ = x.shape; D = self.D; nkv = self.nkv; nq = nkv * self.rep
        h = self.norm(x)
        q = (h @ self.q.T).view(B, T, nq, D).transpose(1, 2)
        k = (h @ self.k.T).view(B, T, nkv, D).transpose(1, 2)
        v = (h @ self.v.T).view(B, T, nkv, D).transpose(1, 2)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        cos, sin = pe
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(self.rep, 1); v = v.repeat_interleave(self.rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # B, nq, T, D
        return o  # per-head outputs before o_proj
    def __call__(self, x, pe, mask):
        B, T, _ = x.shape
        o = self.attn_parts(x, pe).transpose(1, 2).reshape(B, T, -1)
        x = x + o @ self.o.T
        h = self.norm(x)
        a = F.silu(h @ self.g.T) * (h @ self.u.T)
        return x + a @ self.d.T
    @torch.no_grad()
    def scores(self, x, pe):
        # importance of each kv group (its 3 q heads through o) and each channel: E||contribution||^2
        B, T, _ = x.shape; D = self.D
        o = self.attn_parts(x, pe)  # B,nq,T,D
        nq = o.shape[1]
        contrib = []
        for hq in range(nq):
            c = o[:, hq] @ self.o[:, hq*D:(hq+1)*D].T  # B,T,d
            contrib.append(c)
        gs = []
        for g in range(self.nkv):
            c = sum(contrib[g*self.rep + j] for j in range(self.rep))
            gs.append(c[:, 1:].pow(2).sum().item())
        x2 = x + torch.stack(contrib).sum(0)
        h = self.norm(x2)
        a = F.silu(h @ self.g.T) * (h @ self.u.T)
        ch = (a[:, 1:].pow(2).sum((0, 1))) * self.d.pow(2).sum(0)
        return torch.tensor(gs), ch

@torch.no_grad()
def run_items(recipe, ids, stop_before=None):
    # recipe items: (a, m) tuples as before or Merged objects; returns logits, or the hidden input of item stop_before
    x = model.model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    pe = model.model.rotary_emb(x, pos)
    from transformers.masking_utils import create_causal_mask
    mask = create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos)
    for idx, it in enumerate(recipe):
        if idx == stop_before: return x, pe
        if isinstance(it, Merged):
            x = it(x, pe, mask); continue
        a, m = it
        if a is not None:
            lay = layers[a]; o, _ = lay.self_attn(lay.input_layernorm(x), position_embeddings=pe, attention_mask=mask); x = x + o
        if m is not None:
            lay = layers[m]; x = x + lay.mlp(lay.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x))
run = lambda recipe, ids: run_items(recipe, ids)

dense = [(i, i) for i in range(L)]
with torch.no_grad():
    dense_lp_cal = torch.log_softmax(torch.cat([run(dense, cal[i:i+16]) for i in range(0, cal.shape[0], 16)]).float(), -1)


def units_for(merged, x, pe):
    gs, cs = merged.scores(x, pe)
    return sorted(torch.argsort(gs, descending=True)[:3].tolist()), sorted(torch.argsort(cs, descending=True)[:1536].tolist())


def pairs(W):
    for lo in range(1, L - W):
        hi = lo + W - 1
        ids = list(range(lo, hi + 1))
        base = [(i, i) for i in range(lo)]
        rest = [(i, i) for i in range(hi + 1, L)]
        full = Merged(ids)
        rec = base + [full] + rest
        kg, kc = units_for(full, *run_items(rec, cal, stop_before=lo))
        print(f"[{lo},{hi}] delete {kl(base + [(lo, lo)] + rest):.4f} top {kl(base + [(hi, hi)] + rest):.4f} "
              f"parallel {kl(rec):.4f} concat-prune {kl(base + [Merged(ids, kg, kc)] + rest):.4f}", flush=True)


@torch.no_grad()
def dense_states(ids):
    from transformers.masking_utils import create_causal_mask
    x = model.model.embed_tokens(ids); pos = torch.arange(ids.shape[1]).unsqueeze(0); pe = model.model.rotary_emb(x, pos)
    mask = create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos)
    hs = [x]
    for l in layers:
        o, _ = l.self_attn(l.input_layernorm(x), position_embeddings=pe, attention_mask=mask); x = x + o
        x = x + l.mlp(l.post_attention_layernorm(x)); hs.append(x)
    return hs, pe, mask


@torch.no_grad()
def dp(N, MAXW):
    from functools import lru_cache
    HS, PE, MASK = dense_states(cal)
    def one(i, x):
        l = layers[i]; o, _ = l.self_attn(l.input_layernorm(x), position_embeddings=PE, attention_mask=MASK); x = x + o
        return x + l.mlp(l.post_attention_layernorm(x))
    def cost(a, b):
        return (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()).item()
    fused = {}
    costs = {}
    for W in range(2, MAXW + 1):
        for lo in range(0, L - W):
            hi = lo + W - 1
            full = Merged(list(range(lo, hi + 1)))
            kg, kc = units_for(full, HS[lo], PE)
            fused[(lo, hi)] = Merged(list(range(lo, hi + 1)), kg, kc)
            costs[(lo, hi)] = {"top": cost(one(hi, HS[lo]), HS[hi + 1]), "concat": cost(fused[(lo, hi)](HS[lo], PE, MASK), HS[hi + 1])}
    top = L - 2
    for cap in range(2, MAXW + 1):
        @lru_cache(None)
        def f(i, r):
            if r == 0: return (0.0, ())
            if i >= top: return (float("inf"), ())
            best = f(i + 1, r)
            for hi in range(i + 1, min(top, i + min(r, cap - 1)) + 1):
                c = costs[(i, hi)]; op = min(c, key=c.get)
                v, p = f(hi + 1, r - (hi - i)); v += c[op]
                if v < best[0]: best = (v, ((i, hi, op),) + p)
            return best
        v, plan = f(0, N)
        rec = []; i = 0
        while i < L:
            w = [p for p in plan if p[0] == i]
            if w:
                lo, hi, op = w[0]; rec.append((hi, hi) if op == "top" else fused[(lo, hi)]); i = hi + 1
            else:
                rec.append((i, i)); i += 1
        print(cap, round(v, 4), list(plan), "kl", round(kl(rec), 4), "ppl40", round(ppl(rec), 1), flush=True)


if sys.argv[3] == "pairs":
    pairs(int(sys.argv[4]))
else:
    dp(int(sys.argv[4]), int(sys.argv[5]))
