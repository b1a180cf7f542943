"""Weights for benchmarks/make_synthetic.py, written fast enough for a file larger than RAM.

* `RandomQ4_0`: Q4_0 blocks written directly from random bits (no floats, no quantizer): each block's 16 nibble
  bytes are raw generator output (uniform nibbles q, value d * (q - 8)) and its f16 scale is +-d with a random
  sign, so the weights are zero-mean with std d * sqrt(21.5). These are blocks a quantizer could have produced
  from a random matrix, and the decoder's work does not depend on their values; they serve every matrix whose
  exact values the sparsity construction does not use (attention, up, down, output head).
* `Matrix`: a random float matrix drawn and quantized chunk by chunk (the matrices whose values matter, and every
  matrix of a type other than Q4_0).
* `LowRankGate`: gate = A @ B of rank r plus the per-neuron channel-0 offsets (a rank r + 1 matrix), and the exact
  activation predictor that goes with it (`exact_predictor`).
* `firing_rates`: per-neuron firing probabilities with locality (a capped power law).
* `tokenizer_metadata`: a copied tokenizer resized to the model's vocabulary.

Every writer streams: it draws and writes chunks of <= CHUNK_VALUES values and keeps nothing else.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import quantize

Q4_0_BLOCK, Q4_0_BYTES = 32, 18
UNIFORM_NIBBLE_MEAN_SQ = 21.5  # E[(q - 8)^2] for q uniform on 0..15: (16^2 - 1) / 12 + 0.5^2
CHUNK_VALUES = 1 << 24  # values drawn (+ quantized) per step: 64 MB of float32
DROP_EVERY = 1 << 30  # bytes written between flush + fadvise(DONTNEED): a >RAM file must not fill the page cache


def random_q4_0(gen: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """uint8 [rows, cols / 32 * 18] of random Q4_0 blocks whose values have standard deviation `std`."""
    n = rows * cols // Q4_0_BLOCK
    words = -(-n * Q4_0_BYTES // 8)
    raw = gen.bit_generator.random_raw(words).view(np.uint8)[:n * Q4_0_BYTES].reshape(n, Q4_0_BYTES)
    scale = raw[:, :2].view(np.uint16)  # random bits: keep the top one as the sign of d
    d = np.float16(std / math.sqrt(UNIFORM_NIBBLE_MEAN_SQ)).view(np.uint16)
    scale &= np.uint16(0x8000)
    scale |= d
    return raw.reshape(rows, cols // Q4_0_BLOCK * Q4_0_BYTES)


def zero_column0_q4_0(blocks: np.ndarray) -> None:
    """Set element 0 of every row to 0 (nibble 8: the low nibble of the first block's first quant byte)."""
    blocks[:, 2] = (blocks[:, 2] & np.uint8(0xF0)) | np.uint8(0x08)


def zero_row_q4_0(blocks: np.ndarray, row: int) -> None:
    """Set every value of one row to 0 (scale 0 in all its blocks)."""
    blocks[row].reshape(-1, Q4_0_BYTES)[:, :2] = 0


class Streamed:
    """Base of the tensors GGUFWriter.write_tensor_data streams: it calls tofile(fout); rows come from chunk()."""

    def __init__(self, rows: int, cols: int, row_bytes: int, bar=None):
        self.rows, self.cols, self.row_bytes, self.bar = rows, cols, row_bytes, bar
        self.nbytes = rows * row_bytes

    def byte_shape(self):
        return (self.rows, self.row_bytes)

    def chunks(self):
        raise NotImplementedError

    def tofile(self, fout) -> None:
        for block in self.chunks():
            block.tofile(fout)
            if self.bar is not None:
                self.bar.update(block.shape[0] * self.cols)
            drop_written(fout)


_written = {}


def drop_written(fout) -> None:
    """Every DROP_EVERY bytes: write back what was written and drop it from the page cache, so writing a file
    larger than RAM neither evicts everything else nor leaves gigabytes of dirty pages behind."""
    pos = fout.tell()
    last = _written.get(id(fout), 0)
    if pos - last >= DROP_EVERY:
        fout.flush()
        os.fdatasync(fout.fileno())
        os.posix_fadvise(fout.fileno(), 0, pos, os.POSIX_FADV_DONTNEED)
        _written[id(fout)] = pos


class RandomQ4_0(Streamed):
    """A Q4_0 matrix of random blocks (`random_q4_0`); `zero_col0` / `zero_row0` zero channel 0 of the input /
    output (the reserved constant channel of make_synthetic's sparsity construction)."""

    def __init__(self, rows, cols, std, seed, zero_col0=False, zero_row0=False, bar=None):
        super().__init__(rows, cols, cols // Q4_0_BLOCK * Q4_0_BYTES, bar)
        self.std, self.seed, self.zero_col0, self.zero_row0 = std, seed, zero_col0, zero_row0

    def chunks(self):
        gen = np.random.Generator(np.random.SFC64(self.seed))
        step = max(1, CHUNK_VALUES // self.cols)
        for r0 in range(0, self.rows, step):
            blocks = random_q4_0(gen, min(step, self.rows - r0), self.cols, self.std)
            if self.zero_col0:
                zero_column0_q4_0(blocks)
            if self.zero_row0 and r0 == 0:
                zero_row_q4_0(blocks, 0)
            yield blocks


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
            drop_written(fout)


class LowRankGate(Streamed):
    """gate = A @ B + offsets e_0^T: A [n_ff, rank] with unit rows, B [rank, d] ~ N(0, 1/d) with column 0 zero, so
    each gate entry is ~ N(0, 1/d) like a full-rank random gate (and each neuron's pre-activation over random
    inputs has the same spread as one), plus column 0 = `offsets` (the per-neuron channel-0 weights). Streamed
    as float32 row chunks quantized by `quantize` (or float32 itself when quantize is None)."""

    def __init__(self, rows, cols, rank, offsets, seed, row_bytes, quantize=None, bar=None):
        super().__init__(rows, cols, row_bytes, bar)
        self.rank, self.offsets, self.seed, self.quantize = rank, np.asarray(offsets, np.float32), seed, quantize

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(A' [n_ff, rank + 1], B' [rank + 1, d]) with A' @ B' = the gate before quantization."""
        gen = np.random.Generator(np.random.SFC64(self.seed))
        a = gen.standard_normal((self.rows, self.rank), dtype=np.float32)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b = gen.standard_normal((self.rank, self.cols), dtype=np.float32)
        b *= np.float32(self.cols ** -0.5)
        b[:, 0] = 0
        e0 = np.zeros((1, self.cols), np.float32)
        e0[0, 0] = 1
        return np.concatenate([a, self.offsets[:, None]], 1), np.concatenate([b, e0], 0)

    def chunks(self):
        a, b = self.factors()
        step = max(1, CHUNK_VALUES // self.cols)
        for r0 in range(0, self.rows, step):
            x = a[r0:r0 + step] @ b
            yield self.quantize(x) if self.quantize is not None else x


def exact_predictor(a: np.ndarray, b: np.ndarray, norm_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PowerInfer's predictor form, logits = fc2 @ relu(fc1 @ r), exact for a gate A' @ B' behind an RMSNorm with
    weight w: fc1 = [B' diag(w); -B' diag(w)], fc2 = [A', -A'] give A' (relu(y) - relu(-y)) = A' y with
    y = B' (w * r), i.e. gate @ (w * r) = rms(r) * the gate pre-activation. rms > 0, so logit >= 0 exactly when the
    (unquantized) gate fires: threshold 0."""
    bw = b * norm_weight[None, :].astype(np.float32)
    return np.concatenate([bw, -bw], 0), np.concatenate([a, -a], 1)


# -- locality ------------------------------------------------------------------------------------------------

HOT_CAP = 0.9  # the hottest neurons fire on at most 90 % of tokens (the power law is capped there)


@functools.lru_cache(maxsize=4)
def power_law(n: int, mean: float, top: float, share: float, cap: float = HOT_CAP) -> tuple[np.ndarray, float]:
    """Firing probabilities p_k = min(cap, c * ((k + 1/2) / n)^-a) of the neurons ranked k = 0..n-1 (hottest first),
    with c and a solved so that mean(p) = `mean` and the top `top` fraction of neurons carries `share` of all
    firings. Returns (p, a). SystemExit when no such law exists (share too high for the cap)."""
    k = max(1, round(top * n))
    if share * mean * n > cap * k or share <= k / n:
        raise SystemExit(f"error: --locality {top:g}:{share:g} is impossible at a mean firing rate of {mean:g} "
                         f"(the top {top:g} of neurons would need to fire more than {cap:g} of the time, or the "
                         f"share is not above uniform)")
    x = (np.arange(n) + 0.5) / n

    def law(a):
        lo, hi = 1e-12, 1e12  # c such that the mean is right (the mean grows with c)
        for _ in range(200):
            c = math.sqrt(lo * hi)
            if np.minimum(cap, c * x ** -a).mean() > mean:
                hi = c
            else:
                lo = c
        return np.minimum(cap, c * x ** -a)

    lo, hi = 0.0, 8.0  # the top share grows with the exponent a
    for _ in range(60):
        a = (lo + hi) / 2
        p = law(a)
        if p[:k].sum() / p.sum() > share:
            hi = a
        else:
            lo = a
    return law(a), a


def firing_rates(n: int, mean: float, top: float, share: float, seed: int) -> tuple[np.ndarray, float]:
    """`power_law` probabilities assigned to the neurons in a random order (hot neurons are scattered through the
    matrix as in trained models). Returns (p per neuron, exponent a)."""
    p, a = power_law(n, float(mean), float(top), float(share))
    return p[np.random.default_rng(seed).permutation(n)], a


def top_share(counts: np.ndarray, order: np.ndarray, top: float) -> float:
    """Share of all firings carried by the first `top` fraction of neurons in `order`."""
    k = max(1, round(top * len(counts)))
    total = counts.sum()
    return float(counts[order[:k]].sum() / total) if total else 0.0


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
