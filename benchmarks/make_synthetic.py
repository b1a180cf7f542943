#!/usr/bin/env python
"""Write a synthetic llama GGUF: random weights in a real model's shape, for speed work without downloads.

    python benchmarks/make_synthetic.py --shape 7b --type Q4_0 --activation relu --sparsity 0.9 -o relu7b.gguf
    python benchmarks/make_synthetic.py --shape custom --d-model 64 --n-ff 256 --n-layer 2 --vocab 2048 \
        --type Q8_0 --sparsity 0.8 -o tiny.gguf

Shapes: `7b` is Llama-2-7B / ReluLLaMA-7B (d 4096, ff 11008, 32 layers, 32 heads, vocab 32000), `smollm2` is
SmolLM2-135M (d 576, ff 1536, 30 layers, 9/3 heads, vocab 49152, tied head), `custom` a tiny default
(d 64, ff 256, 2 layers) for tests; any --d-model/--n-ff/... flag overrides the shape's value.
Quality is irrelevant, but the file is a complete model: the tokenizer (vocabulary, merges, special ids, chat
template) is copied from the bundled SmolLM2 GGUF, truncated (merges whose parts or result fall outside are
dropped) or padded with unused tokens to --vocab, so the engine tokenizes and generates with it. ReLU files
carry `powerinfer.ffn_activation = "relu"`. Weights are drawn and quantized (gguf.quants.quantize) in row
chunks of <= 16 M values and streamed to the file, so memory stays at one chunk (a 7B file needs ~1.4 GB,
mostly for the verification below).

How --sparsity S makes S of the FFN neurons inactive per token, for real (ReLU only):
  * channel 0 of the residual stream is reserved as a constant: every embedding row has h[0] = C (4.0), its
    other channels a random direction of norm sqrt(d-1); row 0 of every attention output and FFN down
    projection is zero, so no layer changes h[0]. The attention and output norms have weight 0 on channel 0
    (attention and logits never see it).
  * the FFN input is u = RMSNorm(h) * w with w[0] = gamma_L. Gate row j has random weights N(0, s^2) on
    channels 1.. and -B*s (B = 4) on channel 0 (the largest entry of its block, so Q4_0/Q8_0 store it
    exactly); the up projection has 0 there. For one token, the random part of gate_j . u is ~ N(0, s^2 |u_rest|^2)
    across neurons, and the channel-0 part is -B s gamma_L C / rms. With gamma_L = z * R / (B * C),
    z = Phi^-1(S) and R = |h_rest|, neuron j fires iff N(0,1) > z: a fraction 1 - S per token.
  * R grows slowly through the layers (each attention/FFN adds ~0.1 of the embedding's rms), so gamma_L first
    follows that analytic growth, then is calibrated: the torch reference model (powerinfer.model.llama, one
    layer at a time, weights as quantized in the file) runs a few tokens of calibration text, and gamma_L is set
    to the S-quantile of the per-(token, neuron) gamma at which each gate crosses zero (closed form, no
    search); the value is patched into the file's ffn_norm.
  * verification: fresh tokens (eval text) through the same reference layers; the script prints the measured
    fraction of relu(gate) == 0 per layer, and runs the compiled decoder once to show the file loads.
Without --sparsity a ReLU model has its natural ~50 % zeros (gate pre-activations are symmetric).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFReader, GGUFWriter, LlamaFileType
from gguf.quants import quantize

SHAPES = {
    "7b": dict(d_model=4096, n_ff=11008, n_layer=32, n_head=32, n_head_kv=32, vocab=32000, ctx=4096,
               rope_theta=10000.0, tie=False),
    "smollm2": dict(d_model=576, n_ff=1536, n_layer=30, n_head=9, n_head_kv=3, vocab=49152, ctx=8192,
                    rope_theta=100000.0, tie=True),
    "custom": dict(d_model=64, n_ff=256, n_layer=2, n_head=4, n_head_kv=2, vocab=49152, ctx=2048,
                   rope_theta=10000.0, tie=False),
}
TYPES = {"Q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0), "Q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
         "Q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0), "F16": (Q.F16, LlamaFileType.MOSTLY_F16),
         "F32": (Q.F32, LlamaFileType.ALL_F32)}
CONST = 4.0  # channel-0 constant of the residual stream: the block max of a N(0,1) row, so quantized exactly
GATE_B = 4.0  # |gate[:, 0]| in units of the gate's std: the block max again (Q4_0 keeps its block max exact)
ALPHA = 0.1  # rms of each layer's attention / FFN contribution, relative to the embedding's rms of 1
CHUNK_VALUES = 1 << 24  # values drawn + quantized per step (64 MB of float32)


@dataclass(frozen=True)
class Spec:
    d_model: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    vocab: int
    ctx: int
    rope_theta: float
    tie: bool
    qtype: Q
    activation: str
    sparsity: float | None
    seed: int
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def constant_channel(self) -> bool:
        return self.sparsity is not None


# -- weights ------------------------------------------------------------------------------------------------

def _mean_sq(f) -> float:
    """E[f(Z)^2], Z ~ N(0,1), by quadrature (sizes the down projection so its output has rms ALPHA)."""
    z = np.linspace(-12, 12, 48001)
    return float(np.sum(f(z) ** 2 * np.exp(-z * z / 2)) * (z[1] - z[0]) / math.sqrt(2 * math.pi))


def analytic_gamma(spec: Spec, layer: int) -> float:
    # |h_rest| grows by ~ALPHA^2 of the embedding's energy per contribution (two per layer) before FFN `layer`
    z = statistics.NormalDist().inv_cdf(spec.sparsity)
    r = math.sqrt(spec.d_model - 1) * math.sqrt(1 + (2 * layer + 1) * ALPHA ** 2)
    return z * r / (GATE_B * CONST)


class Matrix:
    """A random matrix drawn and quantized chunk by chunk as GGUFWriter.write_tensor_data writes it."""

    def __init__(self, rows, cols, qtype, std, seed, fix=None, bar=None):
        self.rows, self.cols, self.qtype, self.std = rows, cols, qtype, std
        self.seed, self.fix, self.bar = seed, fix, bar
        block, size = GGML_QUANT_SIZES[qtype]
        self.row_bytes = cols // block * size
        self.nbytes = rows * self.row_bytes

    def byte_shape(self):
        return (self.rows, self.row_bytes)

    def tofile(self, fout) -> None:
        rng = np.random.default_rng(self.seed)
        step = max(1, CHUNK_VALUES // self.cols)
        for r0 in range(0, self.rows, step):
            x = rng.standard_normal((min(step, self.rows - r0), self.cols), dtype=np.float32)
            x *= self.std
            if self.fix is not None:
                self.fix(x, r0)
            q = quantize(x, self.qtype) if self.qtype != Q.F32 else x
            q.tofile(fout)
            if self.bar is not None:
                self.bar.update(x.size)


def tensor_plan(spec: Spec, bar) -> list[tuple[str, object]]:
    """(GGUF name, Matrix | float32 vector) in file order."""
    d, ff, hd = spec.d_model, spec.n_ff, spec.head_dim
    const = spec.constant_channel
    seeds = iter(np.random.SeedSequence(spec.seed).spawn(10 + 9 * spec.n_layer))

    def mat(rows, cols, std, fix=None):
        return Matrix(rows, cols, spec.qtype, std, next(seeds), fix, bar)

    def embed_fix(x, r0):
        if const:  # rest: a random direction of norm sqrt(d-1); channel 0: the constant
            x[:, 0] = 0
            x *= math.sqrt(d - 1) / np.linalg.norm(x, axis=1, keepdims=True)
            x[:, 0] = CONST

    def zero_row0(x, r0):
        if const and r0 == 0:
            x[0] = 0

    def gate_fix(x, r0):
        if const:
            x[:, 0] = -GATE_B / math.sqrt(d)

    def up_fix(x, r0):
        if const:
            x[:, 0] = 0

    def vec(channel0=None):
        v = np.ones(d, dtype=np.float32)
        if const and channel0 is not None:
            v[0] = channel0
        return v

    act = (lambda z: np.maximum(z - statistics.NormalDist().inv_cdf(spec.sparsity), 0)) if const else \
        (lambda z: np.maximum(z, 0)) if spec.activation == "relu" else (lambda z: z / (1 + np.exp(-z)))
    down_std = ALPHA / math.sqrt(ff * _mean_sq(act))
    plan = [("token_embd.weight", mat(spec.vocab, d, 1.0, embed_fix))]
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", vec(0.0)),
            (p + "attn_q.weight", mat(spec.n_head * hd, d, d ** -0.5)),
            (p + "attn_k.weight", mat(spec.n_head_kv * hd, d, d ** -0.5)),
            (p + "attn_v.weight", mat(spec.n_head_kv * hd, d, d ** -0.5)),
            (p + "attn_output.weight", mat(d, spec.n_head * hd, ALPHA * d ** -0.5, zero_row0)),
            (p + "ffn_norm.weight", vec(analytic_gamma(spec, i) if const else None)),
            (p + "ffn_gate.weight", mat(ff, d, d ** -0.5, gate_fix)),
            (p + "ffn_up.weight", mat(ff, d, d ** -0.5, up_fix)),
            (p + "ffn_down.weight", mat(d, ff, down_std, zero_row0)),
        ]
    plan.append(("output_norm.weight", vec(0.0)))
    if not spec.tie:
        plan.append(("output.weight", mat(spec.vocab, d, d ** -0.5)))
    return plan


# -- tokenizer ----------------------------------------------------------------------------------------------

def _byte_chars() -> list[str]:
    """The 256 characters GPT-2 byte-level BPE uses for raw bytes (every text must fall back to them)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def tokenizer_metadata(src: dict, vocab: int) -> dict:
    """The source tokenizer's GGUF keys, resized to `vocab` tokens."""
    tokens = list(src["tokenizer.ggml.tokens"])
    types = list(src["tokenizer.ggml.token_type"])
    merges = list(src["tokenizer.ggml.merges"])
    index = {t: i for i, t in enumerate(tokens)}
    need = 1 + max(index[c] for c in _byte_chars() if c in index)  # (SmolLM2 lacks a few control bytes)
    if vocab < need:
        raise SystemExit(f"error: --vocab {vocab} is too small for the copied tokenizer (its byte tokens "
                         f"need >= {need})")
    if vocab < len(tokens):
        tokens, types = tokens[:vocab], types[:vocab]
        kept = set(tokens)

        def ok(m):
            a, b = m.split(" ", 1)
            return a in kept and b in kept and a + b in kept

        merges = [m for m in merges if ok(m)]
    else:
        # padding like llama.cpp's converter pads a vocabulary: unused tokens, unreachable by the merges
        tokens += [f"<|synthetic_pad_{i}|>" for i in range(vocab - len(tokens))]
        types += [5] * (vocab - len(types))  # gguf TokenType.UNUSED
    md = {k: v for k, v in src.items() if k.startswith("tokenizer.") and not k.endswith("_token_id")}
    md.update({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
               "tokenizer.ggml.merges": merges})
    for k, v in src.items():
        if k.startswith("tokenizer.ggml.") and k.endswith("_token_id") and int(v) < vocab:
            md[k] = int(v)
    return md


def _source_tokenizer() -> dict:
    from powerinfer.formats.bundled import bundled_model_path

    reader = GGUFReader(str(bundled_model_path()))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


# -- writing ------------------------------------------------------------------------------------------------

def write(spec: Spec, out: Path, name: str) -> None:
    from tqdm import tqdm

    tok = tokenizer_metadata(_source_tokenizer(), spec.vocab)
    w = GGUFWriter(str(out), "llama")
    w.add_name(name)
    w.add_file_type(TYPES[spec.qtype.name][1])
    w.add_vocab_size(spec.vocab)
    w.add_context_length(spec.ctx)
    w.add_embedding_length(spec.d_model)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.eps)
    w.add_quantization_version(2)
    if spec.activation == "relu":
        w.add_string("powerinfer.ffn_activation", "relu")
    if spec.sparsity is not None:
        w.add_float32("powerinfer.synthetic.sparsity", spec.sparsity)
    w.add_uint32("powerinfer.synthetic.seed", spec.seed)
    for k, v in tok.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
        else:
            w.add_string(k, v)

    n_values = spec.vocab * spec.d_model * (1 if spec.tie else 2) + spec.n_layer * (
        2 * spec.d_model * spec.n_head * spec.head_dim + 2 * spec.d_model * spec.n_head_kv * spec.head_dim
        + 3 * spec.d_model * spec.n_ff)
    bar = tqdm(total=n_values, unit="val", unit_scale=True, desc=f"writing {out.name}", file=sys.stderr,
               mininterval=1.0)
    plan = tensor_plan(spec, bar)
    for tname, t in plan:
        if isinstance(t, Matrix):
            if spec.qtype == Q.F32:
                w.add_tensor_info(tname, (t.rows, t.cols), np.dtype(np.float32), t.nbytes)
            else:
                w.add_tensor_info(tname, t.byte_shape(), np.dtype(np.uint8), t.nbytes, raw_dtype=spec.qtype)
        else:
            w.add_tensor_info(tname, t.shape, t.dtype, t.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, t in plan:
        w.write_tensor_data(t)  # a Matrix streams its chunks through tofile()
    w.close()
    bar.close()


# -- calibration and verification with the torch reference model ---------------------------------------

def _embed_rows(qt, ids):
    from powerinfer.core.tensor import QTensor

    rows = np.asarray(qt.data)[np.asarray(ids)]
    return QTensor(qt.name, qt.qtype, (len(ids), qt.cols), rows).dequantize()


def run_layers(path: Path, ids: list[int], calibrate: float | None, n_layers: int | None):
    """Push `ids` through the reference layers of the file, one layer in memory at a time. Returns per layer
    (fraction of relu(gate) == 0 over all tokens, per-token fractions). With `calibrate` = S, each layer's
    ffn_norm[0] is first set (and patched into the file) so that exactly S of the gates are <= 0 on `ids`."""
    import torch
    import torch.nn.functional as F

    from powerinfer.formats.loader import load_model
    from powerinfer.model.kvcache import KVCache
    from powerinfer.model.llama import Block
    from powerinfer.model.rope import rope_tables
    from powerinfer.sparse.ffn import make_ffn

    loaded = load_model(path)
    cfg = loaded.config
    n = cfg.n_layer if n_layers is None else min(cfg.n_layer, n_layers)
    patch = GGUFReader(str(path), "r+") if calibrate is not None else None
    norms = {t.name: t for t in patch.tensors} if patch is not None else {}
    cache = KVCache.allocate(cfg.n_layer, len(ids), cfg.n_head_kv * cfg.head_dim)
    cos, sin = rope_tables(cfg, len(ids))
    x = _embed_rows(loaded.weights.embed_tokens, ids)
    out = []
    with torch.inference_mode():
        for i in range(n):
            lw = loaded.weights.layers[i]
            block = Block(lw, cfg, i, make_ffn("dense", lw, cfg), torch.float32)
            h = x + block.attn(block.input_layernorm(x), 0, cache, cos, sin)
            gate_w = block.ffn.gate_proj
            if calibrate is not None:
                norm = block.post_attention_layernorm
                norm.weight[0] = 1.0
                unit = norm(h)  # channel 0: C / rms per token; rest: the normalized random part
                g_rest = F.linear(unit[:, 1:], gate_w[:, 1:])
                # gate_j = g_rest_j + gate_w[j, 0] * gamma * unit_0 crosses zero at gamma* = g_rest / (-w0 * unit_0)
                cross = g_rest / (-gate_w[:, 0][None, :] * unit[:, :1])
                gamma = float(torch.quantile(cross.flatten().double(), calibrate))
                norm.weight[0] = gamma
                norms[f"blk.{i}.ffn_norm.weight"].data[0] = gamma
            u = block.post_attention_layernorm(h)
            zero = (F.linear(u, gate_w) <= 0).float()  # relu(gate) == 0
            out.append((float(zero.mean()), zero.mean(1).tolist()))
            x = h + block.ffn(u)
            del block
    if patch is not None:
        patch.data.flush()
        del patch
    return out


def engine_smoke(path: Path, text: str) -> str:
    """The compiled decoder loads the file and computes finite logits for a few tokens of `text`."""
    import torch

    import powerinfer

    llm = powerinfer.load(str(path), n_ctx=64, n_threads=1)
    ids = llm.tokenizer.encode(text)[:16]
    logits = llm.runner.eval(ids)
    if not torch.isfinite(logits).all():
        raise SystemExit("error: the engine produced non-finite logits for the synthetic model")
    return f"engine ({llm.runner.compute}) ran {len(ids)} tokens, logits finite"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[
                                     __doc__.index("How --sparsity"):])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True,
                    help="7b (Llama-2-7B/ReluLLaMA-7B), smollm2 (SmolLM2-135M) or custom (tiny defaults)")
    for flag, key, help_ in (("--d-model", "d_model", "hidden size"), ("--n-ff", "n_ff", "FFN neurons per layer"),
                             ("--n-layer", "n_layer", "layers"), ("--n-head", "n_head", "attention heads"),
                             ("--n-head-kv", "n_head_kv", "key/value heads (GQA)"),
                             ("--vocab", "vocab", "vocabulary size (tokenizer truncated or padded to it)"),
                             ("--ctx", "ctx", "trained context length written to the metadata")):
        ap.add_argument(flag, dest=key, type=int, metavar="N", help=f"{help_} (default: the shape's)")
    ap.add_argument("--type", default="Q4_0", choices=list(TYPES), help="type of every matrix (default: Q4_0)")
    ap.add_argument("--activation", default="relu", choices=["relu", "silu"],
                    help="FFN activation: relu (ReLU-family, exact zeros) or silu (SwiGLU) (default: relu)")
    ap.add_argument("--sparsity", type=float, metavar="S",
                    help="make S (0 < S < 1) of the FFN neurons inactive per token (relu only; see below)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    ap.add_argument("--calib-tokens", type=int, default=64, metavar="N",
                    help="calibration text tokens for the per-layer gamma (default: 64; 0 keeps the analytic value)")
    ap.add_argument("--verify-tokens", type=int, default=32, metavar="N",
                    help="held-out tokens for the printed sparsity measurement (default: 32; 0 skips it)")
    ap.add_argument("--verify-layers", type=int, metavar="N",
                    help="calibrate/measure only the first N layers (default: all)")
    ap.add_argument("-o", "--output", required=True, metavar="FILE.gguf", help="output file")
    a = ap.parse_args(argv)

    shape = dict(SHAPES[a.shape])
    for key in ("d_model", "n_ff", "n_layer", "n_head", "n_head_kv", "vocab", "ctx"):
        if getattr(a, key) is not None:
            shape[key] = getattr(a, key)
    spec = Spec(qtype=TYPES[a.type][0], activation=a.activation, sparsity=a.sparsity, seed=a.seed, **shape)
    block = GGML_QUANT_SIZES[spec.qtype][0]
    problems = []
    if a.sparsity is not None and not 0 < a.sparsity < 1:
        problems.append(f"--sparsity must be in (0, 1), got {a.sparsity}")
    if a.sparsity is not None and a.activation != "relu":
        problems.append("--sparsity needs --activation relu (SwiGLU has no exact zeros to control)")
    if spec.d_model % spec.n_head or spec.head_dim % 2:
        problems.append(f"--d-model {spec.d_model} must be n_head x an even head size")
    if spec.n_head % spec.n_head_kv:
        problems.append(f"--n-head {spec.n_head} must be a multiple of --n-head-kv {spec.n_head_kv}")
    if spec.d_model % block or spec.n_ff % block:
        problems.append(f"{a.type} needs --d-model and --n-ff to be multiples of {block}")
    if problems:
        ap.error("; ".join(problems))

    out = Path(a.output)
    name = f"synthetic-{a.shape} {a.type} {a.activation}" + (f" s{a.sparsity:g}" if a.sparsity is not None else "")
    t0 = time.perf_counter()
    write(spec, out, name)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {name}, d {spec.d_model}, ff {spec.n_ff}, "
          f"{spec.n_layer} layers, vocab {spec.vocab}) in {time.perf_counter() - t0:.1f} s")

    from powerinfer.formats.tokenizer import Tokenizer
    from powerinfer.textdata import pydoc_topics

    tok = Tokenizer.from_gguf_file(out)
    if a.sparsity is not None and a.calib_tokens > 0:
        ids = tok.encode(pydoc_topics("calib"), add_bos=False)[:a.calib_tokens]
        run_layers(out, ids, a.sparsity, a.verify_layers)
        print(f"calibrated ffn_norm[0] of {min(spec.n_layer, a.verify_layers or spec.n_layer)} layers on "
              f"{len(ids)} calibration tokens (pydoc topics, calib split)")
    if a.verify_tokens > 0:
        ids = tok.encode(pydoc_topics("eval"), add_bos=False)[:a.verify_tokens]
        layers = run_layers(out, ids, None, a.verify_layers)
        fr = [f for f, _ in layers]
        per_tok = [t for _, ts in layers for t in ts]
        what = "relu(gate) == 0" if a.activation == "relu" else "gate <= 0 (silu has no exact zeros)"
        print(f"measured on {len(ids)} held-out tokens (eval split), {len(layers)} layers, fraction {what}: "
              f"mean {statistics.fmean(fr):.4f}, per layer min {min(fr):.4f} max {max(fr):.4f}, "
              f"per token min {min(per_tok):.4f} max {max(per_tok):.4f}"
              + (f" (target {a.sparsity})" if a.sparsity is not None else ""))
        print(engine_smoke(out, pydoc_topics("eval")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
