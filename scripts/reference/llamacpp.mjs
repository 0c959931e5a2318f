#!/usr/bin/env node
// llama.cpp through node-llama-cpp's prebuilt CPU binaries (installed by llamacpp_setup.sh into .llamacpp/).
//
//   node llamacpp.mjs logits MODEL.gguf '[1,504,3458]'|@ids.json OUT.npy [--threads 2] [--kv-f32]
//     One batch of all the tokens, logits at every position: float32 [tokens, vocab] .npy. --kv-f32 keeps the
//     KV cache in f32 (llama.cpp's default is f16, which alone moves logits by ~1e-2).
//   node llamacpp.mjs timing MODEL.gguf [--prompt 128] [--gen 128] [--threads 2]
//     Batch 1: a prompt of P tokens in one decode call, then G greedy one-token decodes; prints JSON with prompt
//     and decode tokens/s (wall clock, after a one-token warm-up that pages the weights in).
//   node llamacpp.mjs compare A.npy B.npy
//     max |A - B| and the share of positions whose argmax agrees, as JSON.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "../..");

function usage() {
  console.error("usage: llamacpp.mjs logits MODEL.gguf IDS OUT.npy [--threads N] [--kv-f32]\n" +
    "       llamacpp.mjs timing MODEL.gguf [--prompt 128] [--gen 128] [--threads 2]\n" +
    "       llamacpp.mjs compare A.npy B.npy");
  process.exit(2);
}

const argv = process.argv.slice(2);
const opt = (name, def) => {
  const i = argv.indexOf(name);
  if (i < 0) return def;
  const v = Number(argv[i + 1]);
  argv.splice(i, 2);
  return v;
};
const flag = (name) => {
  const i = argv.indexOf(name);
  if (i >= 0) argv.splice(i, 1);
  return i >= 0;
};

function readNpy(file) {
  const b = fs.readFileSync(file);
  if (b.toString("latin1", 0, 6) !== "\x93NUMPY") throw new Error(`${file}: not a .npy`);
  const major = b[6];
  const hl = major === 1 ? b.readUInt16LE(8) : b.readUInt32LE(8);
  const start = (major === 1 ? 10 : 12) + hl;
  const header = b.toString("latin1", major === 1 ? 10 : 12, start);
  if (!header.includes("'<f4'") || header.includes("'fortran_order': True")) throw new Error(`${file}: not C-order float32`);
  const shape = header.match(/\(([^)]*)\)/)[1].split(",").filter((s) => s.trim()).map(Number);
  const data = new Float32Array(b.buffer.slice(b.byteOffset + start, b.byteOffset + b.length));
  return { shape, data };
}

function writeNpy(file, data, shape) {
  let dict = `{'descr': '<f4', 'fortran_order': False, 'shape': (${shape.join(", ")}${shape.length === 1 ? "," : ""}), }`;
  const total = Math.ceil((10 + dict.length + 1) / 64) * 64;
  dict = dict + " ".repeat(total - 10 - dict.length - 1) + "\n";
  const head = Buffer.alloc(10);
  head.write("\x93NUMPY\x01\x00", 0, "latin1");
  head.writeUInt16LE(dict.length, 8);
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, Buffer.concat([head, Buffer.from(dict, "latin1"), Buffer.from(data.buffer, data.byteOffset, data.byteLength)]));
  fs.renameSync(tmp, file);
}

const threads = opt("--threads", 2);
const nPrompt = opt("--prompt", 128);
const nGen = opt("--gen", 128);
const kvF32 = flag("--kv-f32");
const [mode, ...rest] = argv;

if (mode === "compare") {
  const [a, b] = rest.map(readNpy);
  if (!a || !b || a.shape.join() !== b.shape.join()) throw new Error(`shapes differ: ${a?.shape} vs ${b?.shape}`);
  const [n, v] = a.shape;
  let maxd = 0, agree = 0;
  for (let i = 0; i < n; i++) {
    let ia = 0, ib = 0;
    for (let j = 0; j < v; j++) {
      const k = i * v + j;
      maxd = Math.max(maxd, Math.abs(a.data[k] - b.data[k]));
      if (a.data[k] > a.data[i * v + ia]) ia = j;
      if (b.data[k] > b.data[i * v + ib]) ib = j;
    }
    if (ia === ib) agree++;
  }
  console.log(JSON.stringify({ positions: n, vocab: v, max_abs_diff: maxd, argmax_agreement: agree / n }));
  process.exit(0);
}

const modelPath = rest[0];
if (!["logits", "timing"].includes(mode) || !modelPath) usage();
const { getLlama, LlamaLogLevel } = await import(path.join(root, ".llamacpp/node_modules/node-llama-cpp/dist/index.js"));
const llama = await getLlama({
  gpu: false, build: "never", maxThreads: threads,
  logLevel: process.env.LLAMA_LOG ? LlamaLogLevel.debug : LlamaLogLevel.error,
});
const model = await llama.loadModel({ modelPath, gpuLayers: 0, useMmap: true });

if (mode === "logits") {
  const [, idsArg, outPath] = rest;
  if (!idsArg || !outPath) usage();
  const ids = JSON.parse(idsArg.startsWith("@") ? fs.readFileSync(idsArg.slice(1), "utf8") : idsArg);
  const n = ids.length;
  const size = Math.max(n, 16);
  const kv = kvF32 ? { experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32" } : {};
  const context = await model.createContext({ contextSize: size, batchSize: size, threads, flashAttention: false, ...kv });
  // Every position asks for its logits: a Map token -> raw logit (llama_get_logits_ith; the greedy chain
  // applies no penalty or temperature).
  const res = await context.getSequence().controlledEvaluate(ids.map((t) => [t, { generateNext: { logits: true } }]));
  const v = res[0].next.logits.size;
  const out = new Float32Array(n * v);
  res.forEach((r, i) => {
    if (r.next.logits.size !== v) throw new Error(`position ${i}: ${r.next.logits.size} logits, expected ${v}`);
    for (const [tok, x] of r.next.logits) out[i * v + tok] = x;
  });
  writeNpy(outPath, out, [n, v]);
  await context.dispose();
} else {
  const context = await model.createContext({
    contextSize: nPrompt + nGen + 8, batchSize: Math.max(nPrompt, 1), threads, flashAttention: false,
  });
  const seq = context.getSequence();
  const prompt = Array.from({ length: nPrompt }, (_, i) => 100 + ((i * 7919) % 20000));
  {
    const warm = await model.createContext({ contextSize: 16, batchSize: 16, threads });
    await warm.getSequence().controlledEvaluate([[prompt[0], { generateNext: { token: true } }]]);
    await warm.dispose();
  }
  const t0 = performance.now();
  const r = await seq.controlledEvaluate(prompt.map((t, i) => (i === nPrompt - 1 ? [t, { generateNext: { token: true } }] : t)));
  const t1 = performance.now();
  let tok = r[nPrompt - 1].next.token;
  for (let i = 0; i < nGen; i++) {
    const o = await seq.controlledEvaluate([[tok, { generateNext: { token: true } }]]);
    tok = o[0].next.token;
  }
  const t2 = performance.now();
  console.log(JSON.stringify({
    model: path.basename(modelPath), threads, prompt_tokens: nPrompt, decode_tokens: nGen,
    prompt_tok_s: +(nPrompt / ((t1 - t0) / 1000)).toFixed(2), decode_tok_s: +(nGen / ((t2 - t1) / 1000)).toFixed(2),
  }));
  await context.dispose();
}
await model.dispose();
await llama.dispose();
