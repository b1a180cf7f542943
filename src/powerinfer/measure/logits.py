"""Saved logits and `powerinfer compare-logits A.npy B.npy`: how far apart two runs are on the same tokens.

A logits file is what `powerinfer perplexity --logits-out FILE.npy` writes: float32 [n_scored, n_vocab], row i
the logits that predict target i, with the target ids (int32 [n_scored]) in the sibling `FILE.tokens.npy`.
Comparing a quantized, sparse or other-engine run against a reference run gives
  * top-1 agreement: fraction of rows whose argmax is the same;
  * mean KL(A||B) = mean over rows of sum_v p_A(v) (log p_A(v) - log p_B(v)), in nats (A is the reference,
    as in llama-perplexity's --kl-divergence, which measures KL(base || new));
  * each side's perplexity exp(mean NLL of the targets), with llama-perplexity's +/- error.
Files are memory-mapped and processed in blocks, so a 400 MB file does not need 400 MB of extra memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.files import atomic_path, atomic_write
from ..errors import PowerInferError

_BLOCK_ROWS = 256  # rows per block: 256 x 49152 float64 is ~100 MB per intermediate, bounded for any file size


def tokens_path(logits_path: str | Path) -> Path:
    """The target-ids sidecar of a logits file: run.npy -> run.tokens.npy."""
    p = Path(logits_path)
    return p.with_name((p.name[:-4] if p.name.endswith(".npy") else p.name) + ".tokens.npy")


def ppl_with_error(nll: np.ndarray) -> tuple[float, float]:
    """exp(mean NLL) and llama-perplexity's uncertainty: sd of the NLLs / sqrt(n - 1), times the PPL
    (the first-order error of exp(mean); 0 when there are fewer than two values)."""
    nll = np.asarray(nll, dtype=np.float64)
    n = nll.size
    if n == 0:
        raise ValueError("no scored tokens")
    mean = float(nll.mean())
    ppl = math.exp(mean)
    var = float((nll * nll).mean()) - mean * mean  # llama.cpp's nll2/count - nll^2, not np.var's two-pass form
    err = math.sqrt(var / (n - 1)) * ppl if n > 1 and var > 0 else 0.0
    return ppl, err


def target_nll(logits, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row, in float64 (logits [n, n_vocab] float32, numpy as runners return them
    or a tensor; targets [n])."""
    logp = torch.log_softmax(torch.as_tensor(logits).double(), dim=-1)
    return -logp.gather(1, targets.long().view(-1, 1)).squeeze(1)


class LogitsWriter:
    """Streams scored rows into FILE.npy (an .npy memmap sized up front) and the targets into FILE.tokens.npy."""

    def __init__(self, path: str | Path, n_rows: int, n_vocab: int):
        self.path = Path(path)
        if self.path.suffix != ".npy":
            raise PowerInferError(f"{path}: the logits file must end in .npy (the targets go to NAME.tokens.npy)")
        # written under a fresh temporary name and renamed by close() (core/files.py: never through a planted link)
        self._tmp = atomic_path(self.path)
        tmp = self._tmp.__enter__()
        try:
            self.rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_rows, n_vocab))
        except OSError as e:
            self._tmp.__exit__(type(e), e, e.__traceback__)
            raise PowerInferError(f"{path}: cannot write ({e.strerror})") from None
        self.targets = np.zeros(n_rows, dtype=np.int32)
        self.n = 0

    def add(self, logits: np.ndarray, targets) -> None:
        k = logits.shape[0]
        self.rows[self.n:self.n + k] = np.asarray(logits, dtype=np.float32)
        self.targets[self.n:self.n + k] = np.asarray(targets, dtype=np.int32)
        self.n += k

    def close(self) -> None:
        self.rows.flush()
        del self.rows
        self._tmp.__exit__(None, None, None)
        with atomic_write(tokens_path(self.path)) as fh:
            np.save(fh, self.targets[:self.n])


def open_logits(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(logits memmap [n, n_vocab] float32, targets [n]) of a file written by --logits-out."""
    p = Path(path)
    if not p.is_file():
        raise PowerInferError(f"{p}: no such file")
    tp = tokens_path(p)
    if not tp.is_file():
        raise PowerInferError(f"{p}: its target ids {tp.name} are missing (write both with "
                              f"`powerinfer perplexity --logits-out {p.name}`)")
    try:
        logits = np.load(p, mmap_mode="r")
        targets = np.load(tp)
    except (ValueError, OSError) as e:
        raise PowerInferError(f"{p}: not a .npy logits file ({e})") from None
    if logits.ndim != 2 or logits.dtype != np.float32:
        raise PowerInferError(f"{p}: expected float32 [n_scored, n_vocab], got {logits.dtype} {list(logits.shape)}")
    if targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise PowerInferError(f"{tp}: {targets.shape[0] if targets.ndim == 1 else list(targets.shape)} target ids "
                              f"for {logits.shape[0]} logit rows")
    return logits, targets


@dataclass
class Comparison:
    n_tokens: int
    n_vocab: int
    top1_agreement: float
    kl_mean: float  # nats, KL(A || B)
    kl_max: float
    ppl_a: float
    ppl_a_err: float
    ppl_b: float
    ppl_b_err: float


def compare(a_path: str | Path, b_path: str | Path) -> Comparison:
    a, ta = open_logits(a_path)
    b, tb = open_logits(b_path)
    if a.shape != b.shape:
        raise PowerInferError(f"shapes differ: {a_path} is {list(a.shape)}, {b_path} is {list(b.shape)} "
                              f"(same text, -c and --chunks on both runs?)")
    if not np.array_equal(ta, tb):
        first = int(np.argmax(ta != tb))
        raise PowerInferError(f"target tokens differ (first at row {first}: {ta[first]} vs {tb[first]}); "
                              f"the runs did not score the same text with the same tokenizer")
    n = a.shape[0]
    if n == 0:
        raise PowerInferError(f"{a_path}: no scored tokens")
    agree, kl_sum, kl_max = 0, 0.0, 0.0
    nll_a, nll_b = np.empty(n), np.empty(n)
    for s in range(0, n, _BLOCK_ROWS):
        e = min(n, s + _BLOCK_ROWS)
        la = torch.from_numpy(np.array(a[s:e])).double()
        lb = torch.from_numpy(np.array(b[s:e])).double()
        pa, pb = torch.log_softmax(la, -1), torch.log_softmax(lb, -1)
        kl = (pa.exp() * (pa - pb)).sum(-1)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        t = torch.from_numpy(ta[s:e].astype(np.int64)).view(-1, 1)
        nll_a[s:e] = (-pa.gather(1, t)).squeeze(1).numpy()
        nll_b[s:e] = (-pb.gather(1, t)).squeeze(1).numpy()
    ppl_a, err_a = ppl_with_error(nll_a)
    ppl_b, err_b = ppl_with_error(nll_b)
    return Comparison(n, a.shape[1], agree / n, kl_sum / n, kl_max, ppl_a, err_a, ppl_b, err_b)
