#!/usr/bin/env python
"""Write a synthetic GGUF (llama, qwen3 or falcon): random weights in a real model's shape, for speed work without
downloads.

    python benchmarks/make_synthetic.py --shape 7b --type Q4_0 --activation relu --sparsity 0.9 -o relu7b.gguf
    python benchmarks/make_synthetic.py --shape custom --d-model 64 --n-ff 256 --n-layer 2 --vocab 2048 \
        --type Q8_0 --sparsity 0.8 -o tiny.gguf
    python benchmarks/make_synthetic.py --shape 7b --sparsity 0.9 --locality 0.26:0.8 --gate-rank 64 \
        -o /work/models/relu7b-loc.gguf      # + relu7b-loc.predictors.safetensors (exact predictors)
    python benchmarks/make_synthetic.py --shape qwen3-8b --activation silu -o qwen3-8b.gguf
    python benchmarks/make_synthetic.py --shape falcon-7b --activation gelu -o falcon-7b.gguf

Shapes: `7b` is Llama-2-7B / ReluLLaMA-7B (d 4096, ff 11008, 32 layers, 32 heads, vocab 32000), `46b` is
Llama-2-70B's layer shape with 54 of its 80 layers (d 8192, ff 28672, 64/8 heads, vocab 32000; 46.7 B parameters,
26.3 GB = 24.5 GiB in Q4_0: more than the 23.5 GiB of RAM of the machines this project measures on, and small
enough that its neuron-bundle file still fits beside it on their 68 GB of free disk), `smollm2` is
SmolLM2-135M (d 576, ff 1536, 30 layers, 9/3 heads, vocab 49152, tied head), `custom` a tiny default
(d 64, ff 256, 2 layers) for tests; any --d-model/--n-ff/... flag overrides the shape's value. Those are llama
files; `qwen3-8b` (d 4096, ff 12288, 36 layers, 32/8 heads of 128, vocab 151936, rope base 1e6, eps 1e-6) writes the
`qwen3` family (per-head q/k RMSNorms) and `falcon-7b` (d 4544, ff 18176, 32 layers, 71 heads, 1 K/V head, vocab
65024) the `falcon` family (fused QKV, one shared LayerNorm with bias, parallel attention and MLP, ungated MLP:
--activation gelu for Falcon-7B, relu for ReluFalcon); --arch picks the family for any shape (e.g. a tiny qwen3 with
--shape custom --arch qwen3). Names and keys are llama.cpp's (benchmarks/synthetic_arch.py).
Quality is irrelevant, but the file is a complete model: the tokenizer (vocabulary, merges, special ids, chat
template) is copied from the bundled SmolLM2 GGUF, truncated (merges whose parts or result fall outside are
dropped) or padded with unused tokens to --vocab, so the engine tokenizes and generates with it. ReLU files
carry `powerinfer.ffn_activation = "relu"`. Weights are streamed to the file in chunks of <= 16 M values, so
memory stays at one chunk (plus the verification below, which holds one layer in float32), and written pages are
dropped from the page cache every GiB. In Q4_0, the matrices whose values the sparsity construction does not use
(attention, up, down, output head) are random Q4_0 blocks written straight from a random generator (uniform
nibbles, a +-d scale of random sign: benchmarks/synthetic_blocks.py), which is what makes a >RAM file take minutes;
the embedding and the gates are drawn as floats and quantized (gguf.quants.quantize). Other types draw every
matrix as floats.

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
  * R grows slowly through the layers (each FFN adds ~0.1 of the embedding's rms, attention less), so gamma_L
    first follows that analytic growth, then is calibrated (layers past --verify-layers keep the analytic value):
    the torch reference model (powerinfer.model.llama, one layer at a time, weights as quantized in the file) runs
    a few tokens of calibration text, and gamma_L is set by bisection so that S of the per-(token, neuron) gates
    are <= 0; the value is patched into the file's ffn_norm.
  * verification: fresh tokens (eval text) through the same reference layers; the script prints the measured
    fraction of relu(gate) == 0 per layer, and runs the compiled decoder once to show the file loads (skipped for
    a file larger than half the available memory).
Without --sparsity a ReLU model has its natural ~50 % zeros (gate pre-activations are symmetric).

Locality (--locality TOP:SHARE, with --sparsity): real ReLU models do not fire their neurons uniformly; PowerInfer
(arXiv 2312.12456, reference/powerinfer.md 8.2) measured 26 % of OPT-30B's neurons carrying 80 % of the activations
(43 % for ReGLU LLaMA-70B) and describes the firing as a power law. Here neuron k of a layer (ranked hottest first,
ranks assigned in a random order per layer) fires with probability p_k = min(0.9, c ((k + 1/2) / n_ff)^-a), with c and
a solved so that mean(p) = 1 - S and the top TOP of neurons carry SHARE of the firings (0.26:0.8 gives a = 1.29 at
S = 0.9: p from 0.012 to the 0.9 cap). Each neuron gets its own channel-0 gate weight -B s z_k / z_max,
z_k = Phi^-1(1 - p_k) (hot neurons: positive), so it fires iff N(0,1) > z_k; the per-layer gamma (analytic with z_max,
then calibrated by bisection on the measured zero fraction) keeps the mean at S. The verification prints the
realised share of firings carried by the designed top TOP of neurons (and by the measured top TOP, which a few
tokens overstate). --activation-counts writes the designed rates as the activation counts `powerinfer profile`
writes, so a placement (--ram-budget, --vram-budget) keeps the designed hot neurons without running the model.

Low-rank gates and exact predictors (--gate-rank R): gate = A @ B (A [n_ff, R] unit rows, B [R, d] ~ N(0, 1/d),
channel 0 excluded) plus the channel-0 offsets, a rank R + 1 matrix with the entry distribution of a random one.
Next to the model the script writes FILE.predictors.safetensors in the `powerinfer train-predictors` format, bound
to the model's fingerprint: PowerInfer's predictor relu(r @ fc1.T) @ fc2.T >= 0 on the pre-norm residual r with
fc1 = [B' diag(w); -B' diag(w)], fc2 = [A', -A'] (w the ffn_norm weight) equals rms(r) times the gate's
pre-activation, so it predicts relu(gate) > 0 exactly, up to the gate's quantization (the verification prints the
recall and precision against the quantized gate; F32 gates make it exact). At rank 64 on the 7b shape the
predictors are 130 x (4096 + 11008) x 32 float32 = 252 MB.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_arch import ARCHS, GATED, head_tensors, layer_tensors, write_hparams  # noqa: E402
from synthetic_blocks import (LowRankGate, Matrix, RandomQ4_0, Streamed, firing_rates,  # noqa: E402
                              tokenizer_metadata, top_share)
from synthetic_verify import (DESIGN_TOKENS, engine_smoke, mem_available, run_layers,  # noqa: E402
                              write_activation_counts, write_predictors)

SHAPES = {
    "7b": dict(d_model=4096, n_ff=11008, n_layer=32, n_head=32, n_head_kv=32, vocab=32000, ctx=4096,
               rope_theta=10000.0, tie=False),
    "46b": dict(d_model=8192, n_ff=28672, n_layer=54, n_head=64, n_head_kv=8, vocab=32000, ctx=4096,
                rope_theta=10000.0, tie=False),
    "smollm2": dict(d_model=576, n_ff=1536, n_layer=30, n_head=9, n_head_kv=3, vocab=49152, ctx=8192,
                    rope_theta=100000.0, tie=True),
    "custom": dict(d_model=64, n_ff=256, n_layer=2, n_head=4, n_head_kv=2, vocab=49152, ctx=2048,
                   rope_theta=10000.0, tie=False),
    "qwen3-8b": dict(d_model=4096, n_ff=12288, n_layer=36, n_head=32, n_head_kv=8, vocab=151936, ctx=40960,
                     rope_theta=1e6, tie=False, eps=1e-6, arch="qwen3"),
    "falcon-7b": dict(d_model=4544, n_ff=18176, n_layer=32, n_head=71, n_head_kv=1, vocab=65024, ctx=2048,
                      rope_theta=10000.0, tie=False, arch="falcon"),
}
TYPES = {"Q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0), "Q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
         "Q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0), "F16": (Q.F16, LlamaFileType.MOSTLY_F16),
         "F32": (Q.F32, LlamaFileType.ALL_F32)}
CONST = 4.0  # channel-0 constant of the residual stream: the block max of a N(0,1) row, so quantized exactly
GATE_B = 4.0  # |gate[:, 0]| in units of the gate's std: the block max again (Q4_0 keeps its block max exact)
ALPHA = 0.1  # rms of each layer's attention / FFN contribution, relative to the embedding's rms of 1
LOCALITY_DEFAULT = "0.26:0.8"  # PowerInfer's OPT-30B figure (module docstring)


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
    locality: tuple[float, float] | None = None  # (TOP, SHARE): the top TOP of neurons carry SHARE of firings
    gate_rank: int | None = None
    arch: str = "llama"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def constant_channel(self) -> bool:
        return self.sparsity is not None

    def rates(self, layer: int) -> np.ndarray | None:
        """Designed firing probability of each neuron of `layer` (None: uniform)."""
        if self.locality is None:
            return None
        return firing_rates(self.n_ff, 1 - self.sparsity, *self.locality, seed=(self.seed, 1, layer))[0]

    def thresholds(self, layer: int) -> np.ndarray:
        """z_k per neuron (fires iff N(0,1) > z_k at the designed gamma)."""
        p = self.rates(layer)
        if p is None:
            return np.full(self.n_ff, statistics.NormalDist().inv_cdf(self.sparsity))
        import torch

        return torch.special.ndtri(torch.from_numpy(1 - p)).numpy()


# -- weights ------------------------------------------------------------------------------------------------

def _mean_sq(f) -> float:
    """E[f(Z)^2], Z ~ N(0,1), by quadrature (sizes the down projection so its output has rms ALPHA)."""
    z = np.linspace(-12, 12, 48001)
    return float(np.sum(f(z) ** 2 * np.exp(-z * z / 2)) * (z[1] - z[0]) / math.sqrt(2 * math.pi))


ACTS = {"relu": lambda z: np.maximum(z, 0), "silu": lambda z: z / (1 + np.exp(-z)),
        "gelu": lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))}  # tanh form


def _relu_shift_mean_sq(z: np.ndarray) -> float:
    """mean over z of E[relu(Z - z)^2], Z ~ N(0,1): (1 + z^2)(1 - Phi(z)) - z phi(z) in closed form."""
    z = np.asarray(z, np.float64)
    tail = 0.5 * np.vectorize(math.erfc)(z / math.sqrt(2))
    return float(np.mean((1 + z * z) * tail - z * np.exp(-z * z / 2) / math.sqrt(2 * math.pi)))


def analytic_gamma(spec: Spec, layer: int) -> float:
    # |h_rest| grows by ~ALPHA^2 of the embedding's energy per FFN before FFN `layer`; attention adds far less (its
    # output averages value rows over positions): on the 7b shape the calibrated gamma is 0.95-1.08x this at every
    # layer with no trend (counting attention like an FFN drifted to 10% high by layer 30). The coldest neuron's channel-0 weight
    # is -B s, so z_max sets gamma (every neuron's z without locality).
    z = float(spec.thresholds(layer).max())
    r = math.sqrt(spec.d_model - 1) * math.sqrt(1 + layer * ALPHA ** 2)
    return z * r / (GATE_B * CONST)


def gate_offsets(spec: Spec, layer: int) -> np.ndarray:
    """Channel-0 gate weight of each neuron: -B s z_k / z_max (all -B s without locality; 0 without sparsity)."""
    if not spec.constant_channel:
        return np.zeros(spec.n_ff, np.float32)
    z = spec.thresholds(layer)
    return (-GATE_B / math.sqrt(spec.d_model) * z / z.max()).astype(np.float32)


def tensor_plan(spec: Spec, bar) -> list[tuple[str, object]]:
    """(GGUF name, streamed matrix | float32 vector) in file order."""
    d, ff, hd = spec.d_model, spec.n_ff, spec.head_dim
    const = spec.constant_channel
    seeds = iter(np.random.SeedSequence(spec.seed).spawn(10 + 9 * spec.n_layer))
    fast = spec.qtype == Q.Q4_0  # random blocks where the values do not matter (module docstring)

    def mat(rows, cols, std, fix=None):
        return Matrix(rows, cols, spec.qtype, std, next(seeds), fix, bar)

    def blocks(rows, cols, std, fix=None, zero_col0=False, zero_row0=False):
        if not fast:
            return mat(rows, cols, std, fix)
        return RandomQ4_0(rows, cols, std, next(seeds), zero_col0=const and zero_col0,
                          zero_row0=const and zero_row0, bar=bar)

    def embed_fix(x, r0):
        if const:  # rest: a random direction of norm sqrt(d-1); channel 0: the constant
            x[:, 0] = 0
            x *= math.sqrt(d - 1) / np.linalg.norm(x, axis=1, keepdims=True)
            x[:, 0] = CONST

    def zero_row0(x, r0):
        if const and r0 == 0:
            x[0] = 0

    def up_fix(x, r0):
        if const:
            x[:, 0] = 0

    def gate(layer):
        offsets = gate_offsets(spec, layer)
        if spec.gate_rank:
            quant = None if spec.qtype == Q.F32 else (lambda x: quantize(x, spec.qtype))
            row_bytes = d // GGML_QUANT_SIZES[spec.qtype][0] * GGML_QUANT_SIZES[spec.qtype][1]
            return LowRankGate(ff, d, spec.gate_rank, offsets, next(seeds), row_bytes, quant, bar)

        def gate_fix(x, r0):
            if const:
                x[:, 0] = offsets[r0:r0 + len(x)]
        return mat(ff, d, d ** -0.5, gate_fix)

    def vec(channel0=None):
        v = np.ones(d, dtype=np.float32)
        if const and channel0 is not None:
            v[0] = channel0
        return v

    def down_std(layer):  # each FFN adds rms ALPHA to the residual (the activations' mean square in closed form)
        if const:
            ms = _relu_shift_mean_sq(spec.thresholds(layer))
        else:
            ms = _mean_sq(ACTS[spec.activation])
        return ALPHA / math.sqrt(ff * ms)

    plan = [("token_embd.weight", mat(spec.vocab, d, 1.0, embed_fix))]
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        plan += layer_tensors(spec, p, dict([
            (p + "attn_norm.weight", vec(0.0)),
            (p + "attn_q.weight", blocks(spec.n_head * hd, d, d ** -0.5)),
            (p + "attn_k.weight", blocks(spec.n_head_kv * hd, d, d ** -0.5)),
            (p + "attn_v.weight", blocks(spec.n_head_kv * hd, d, d ** -0.5)),
            (p + "attn_output.weight", blocks(d, spec.n_head * hd, ALPHA * d ** -0.5, zero_row0, zero_row0=True)),
            (p + "ffn_norm.weight", vec(analytic_gamma(spec, i) if const else None)),
            (p + "ffn_gate.weight", gate(i)),
            (p + "ffn_up.weight", blocks(ff, d, d ** -0.5, up_fix, zero_col0=True)),
            (p + "ffn_down.weight", blocks(d, ff, down_std(i), zero_row0, zero_row0=True)),
        ]), blocks)
    plan += head_tensors(spec, vec(0.0))
    if not spec.tie:
        plan.append(("output.weight", blocks(spec.vocab, d, d ** -0.5)))
    return plan


# -- writing ------------------------------------------------------------------------------------------------

def write(spec: Spec, out: Path, name: str) -> None:
    from tqdm import tqdm

    from powerinfer.formats.bundled import bundled_model_path

    reader = GGUFReader(str(bundled_model_path()))
    src = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tok = tokenizer_metadata(src, spec.vocab)
    w = GGUFWriter(str(out), spec.arch)
    w.add_name(name)
    w.add_file_type(TYPES[spec.qtype.name][1])
    w.add_vocab_size(spec.vocab)
    write_hparams(w, spec)
    w.add_quantization_version(2)
    if spec.activation == "relu":
        w.add_string("powerinfer.ffn_activation", "relu")
    if spec.sparsity is not None:
        w.add_float32("powerinfer.synthetic.sparsity", spec.sparsity)
    w.add_uint32("powerinfer.synthetic.seed", spec.seed)
    if spec.locality is not None:
        w.add_string("powerinfer.synthetic.locality", f"top {spec.locality[0]:g} of neurons carry {spec.locality[1]:g} "
                     "of firings (capped power law)")
    if spec.gate_rank:
        w.add_uint32("powerinfer.synthetic.gate_rank", spec.gate_rank)
    for k, v in tok.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
        else:
            w.add_string(k, v)

    bar = tqdm(unit="val", unit_scale=True, desc=f"writing {out.name}", file=sys.stderr, mininterval=1.0)
    plan = tensor_plan(spec, bar)
    bar.reset(total=sum(t.rows * t.cols for _, t in plan if isinstance(t, (Matrix, Streamed))))
    for tname, t in plan:
        if isinstance(t, (Matrix, Streamed)):
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[
                                     __doc__.index("How --sparsity"):])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True,
                    help="7b (Llama-2-7B/ReluLLaMA-7B), 46b, smollm2 (SmolLM2-135M), custom (tiny defaults), "
                         "qwen3-8b or falcon-7b")
    ap.add_argument("--arch", choices=ARCHS, help="model family (default: the shape's; llama for the llama shapes)")
    for flag, key, help_ in (("--d-model", "d_model", "hidden size"), ("--n-ff", "n_ff", "FFN neurons per layer"),
                             ("--n-layer", "n_layer", "layers"), ("--n-head", "n_head", "attention heads"),
                             ("--n-head-kv", "n_head_kv", "key/value heads (GQA)"),
                             ("--vocab", "vocab", "vocabulary size (tokenizer truncated or padded to it)"),
                             ("--ctx", "ctx", "trained context length written to the metadata")):
        ap.add_argument(flag, dest=key, type=int, metavar="N", help=f"{help_} (default: the shape's)")
    ap.add_argument("--type", default="Q4_0", choices=list(TYPES), help="type of every matrix (default: Q4_0)")
    ap.add_argument("--activation", default="relu", choices=list(ACTS),
                    help="FFN activation: relu (ReLU-family, exact zeros), silu (SwiGLU; llama, qwen3) or gelu "
                         "(falcon's ungated MLP) (default: relu)")
    ap.add_argument("--sparsity", type=float, metavar="S",
                    help="make S (0 < S < 1) of the FFN neurons inactive per token (relu only; see below)")
    ap.add_argument("--locality", nargs="?", const=LOCALITY_DEFAULT, metavar="TOP:SHARE",
                    help="per-neuron firing rates on a power law: the top TOP of each layer's neurons carry SHARE of "
                         f"its firings (with --sparsity; bare flag: {LOCALITY_DEFAULT}, PowerInfer's OPT-30B figure)")
    ap.add_argument("--gate-rank", type=int, metavar="R",
                    help="low-rank gates (rank R + 1 with the channel-0 offsets) and their exact predictors written "
                         "to FILE.predictors.safetensors")
    ap.add_argument("--predictors-out", metavar="FILE", help="where --gate-rank writes the predictors")
    ap.add_argument("--activation-counts", nargs="?", const="", metavar="DIR",
                    help="with --locality: write the designed firing rates as activation counts (activation_N.pt, "
                         "the layout `powerinfer profile` writes and placements read) to DIR (bare flag: the "
                         "model's default profile directory, ~/.cache/powerinfer/<fingerprint>/profile/activation)")
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
    shape["arch"] = a.arch or shape.get("arch", "llama")
    problems = []
    gated = shape["arch"] in GATED
    if a.activation == ("silu" if not gated else "gelu"):
        problems.append(f"--activation {a.activation} does not fit {shape['arch']} (its FFN is "
                        f"{'gated: relu or silu' if gated else 'an ungated MLP: relu or gelu'})")
    if a.sparsity is not None and not gated:
        problems.append(f"--sparsity steers the FFN gate; {shape['arch']} has none")
    locality = None
    if a.locality is not None:
        try:
            top, share = (float(v) for v in a.locality.split(":"))
            if not (0 < top < 1 and 0 < share < 1):
                raise ValueError
            locality = (top, share)
        except ValueError:
            problems.append(f"--locality takes TOP:SHARE, two fractions in (0, 1), got {a.locality!r}")
        if a.sparsity is None:
            problems.append("--locality needs --sparsity (the mean firing rate)")
    if a.gate_rank is not None and not 1 <= a.gate_rank < shape["d_model"]:
        problems.append(f"--gate-rank must be in [1, d_model), got {a.gate_rank}")
    if a.activation_counts is not None and a.locality is None:
        problems.append("--activation-counts needs --locality (without it every neuron has the same rate)")
    if a.predictors_out and not a.gate_rank:
        problems.append("--predictors-out needs --gate-rank (only low-rank gates have exact predictors)")
    spec = Spec(qtype=TYPES[a.type][0], activation=a.activation, sparsity=a.sparsity, seed=a.seed,
                locality=locality if a.sparsity is not None else None, gate_rank=a.gate_rank, **shape)
    block = GGML_QUANT_SIZES[spec.qtype][0]
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
    if spec.locality is not None:
        spec.rates(0)  # SystemExit now when the law cannot exist

    out = Path(a.output)
    name = f"synthetic-{a.shape} {a.type} {a.activation}" + (f" s{a.sparsity:g}" if a.sparsity is not None else "")
    t0 = time.perf_counter()
    write(spec, out, name)
    took = time.perf_counter() - t0
    size = out.stat().st_size
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {name}, d {spec.d_model}, ff {spec.n_ff}, "
          f"{spec.n_layer} layers, vocab {spec.vocab}) in {took:.1f} s: {size / 1e6 / took:.0f} MB/s")
    if spec.locality is not None:
        _, exponent = firing_rates(spec.n_ff, 1 - spec.sparsity, *spec.locality, seed=0)
        p = spec.rates(0)
        print(f"locality: p_k = min(0.9, c (k/n)^-{exponent:.3f}); firing rates {p.min():.4f}..{p.max():.4f}, "
              f"mean {p.mean():.4f}; designed share of the top {spec.locality[0]:g}: "
              f"{top_share(p, np.argsort(-p, kind='stable'), spec.locality[0]):.3f}")

    from powerinfer.formats.tokenizer import Tokenizer
    from powerinfer.textdata import pydoc_topics

    tok = Tokenizer.from_gguf_file(out)
    calib = tok.encode(pydoc_topics("calib"), add_bos=False)[:a.calib_tokens] if a.sparsity is not None else []
    held = tok.encode(pydoc_topics("eval"), add_bos=False)[:a.verify_tokens]
    gates = [t for name, t in tensor_plan(spec, None) if name.endswith("ffn_gate.weight")] if spec.gate_rank else None
    t1 = time.perf_counter()
    # falcon's MLP has no gate to measure (the reference layers run gated, sequential-residual blocks)
    layers = run_layers(out, calib, held, a.sparsity, a.verify_layers, gates) if (calib or held) and gated else []
    n_checked = min(spec.n_layer, a.verify_layers or spec.n_layer)
    if calib:
        print(f"calibrated ffn_norm[0] of {n_checked} layers on {len(calib)} calibration tokens (pydoc topics, "
              f"calib split) in {time.perf_counter() - t1:.1f} s")
    if gates is not None:
        t1 = time.perf_counter()
        pred_path = Path(a.predictors_out) if a.predictors_out else out.with_suffix(".predictors.safetensors")
        preds = write_predictors(gates, out, pred_path)
        print(f"wrote {pred_path} ({pred_path.stat().st_size / 2**20:.1f} MiB, exact predictors of rank "
              f"{2 * (spec.gate_rank + 1)}, fingerprint {preds.meta['fingerprint']}) in {time.perf_counter() - t1:.1f} s")
    if spec.locality is not None and a.activation_counts is not None:
        where = write_activation_counts([spec.rates(i) for i in range(spec.n_layer)], out, a.activation_counts)
        print(f"wrote {where}/activation_0..{spec.n_layer - 1}.pt: the designed firing rates x {DESIGN_TOKENS:,} "
              "tokens (no text was run; the measured share of the designed top neurons is printed below)")
    if layers:
        fr = [st.zero_fraction for st in layers]
        per_tok = [t for st in layers for t in st.per_token]
        what = "relu(gate) == 0" if a.activation == "relu" else "gate <= 0 (silu has no exact zeros)"
        print(f"measured on {len(held)} held-out tokens (eval split), {len(layers)} layers, fraction {what}: "
              f"mean {statistics.fmean(fr):.4f}, per layer min {min(fr):.4f} max {max(fr):.4f}, "
              f"per token min {min(per_tok):.4f} max {max(per_tok):.4f}"
              + (f" (target {a.sparsity})" if a.sparsity is not None else ""))
        if spec.locality is not None:
            top = spec.locality[0]
            designed = [top_share(st.fired, np.argsort(-spec.rates(i), kind="stable"), top)
                        for i, st in enumerate(layers)]
            measured = [top_share(st.fired, np.argsort(-st.fired, kind="stable"), top) for st in layers]
            print(f"locality: the designed top {top:g} of neurons carry {statistics.fmean(designed):.3f} of the "
                  f"firings (per layer {min(designed):.3f}..{max(designed):.3f}; target {spec.locality[1]:g}); the "
                  f"measured top {top:g} carry {statistics.fmean(measured):.3f} (biased up on few tokens)")
        if gates is not None:
            rec, prec = [st.recall for st in layers], [st.precision for st in layers]
            print(f"predictors (threshold 0) against the file's {a.type} gate: recall {statistics.fmean(rec):.4f} "
                  f"(per layer min {min(rec):.4f}), precision {statistics.fmean(prec):.4f} "
                  f"(min {min(prec):.4f})")
    if held:
        avail = mem_available()
        if size > avail / 2:
            print(f"engine run skipped: the file ({size / 2**30:.1f} GiB) is more than half the available memory "
                  f"({avail / 2**30:.1f} GiB)")
        else:
            print(engine_smoke(out, pydoc_topics("eval")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
