"""Prefill's multi-token K-quant dots (kernels/csrc/kquant.h: pi_kq_rows_tokens) against the one-token kernel.

Each super-block is unpacked once per 4 tokens, but every token's f32 terms are formed and summed in the one-token
kernel's order, so `matmul` over n tokens must equal n `matvec` calls bit for bit: on every ISA, for every token
count 1..9 (full groups of 4 and each tail), rows split over threads, and a matrix taller than one L2 row tile.
Activations include a zero, an outlier and an all-zero token (a block scale of 0) so the per-token scale and block
sums are read from the right token; a token read from its neighbour's slot would change the dot by O(1).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernel_helpers import ISAS, KQUANTS, make_qtensor
from powerinfer import kernels
from powerinfer.kernels import reference as R

ids = lambda q: q.name  # noqa: E731


def _tokens(rng, n, cols):
    xs = rng.standard_normal((n, cols)).astype(np.float32)
    xs[:, 3] = 0.0
    xs[:, 5] *= 20
    if n > 2:
        xs[2] = 0.0
    return torch.from_numpy(xs)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", KQUANTS, ids=ids)
def test_multi_token_equals_single_token(use_isa, isa, qtype):
    use_isa(isa)
    rng = np.random.default_rng(int(qtype) * 13 + 5)
    # 45 rows of 3 super-blocks: odd 4-row units per thread; 200 rows of 11: rows in 8 + 3 super-block chunks
    # (kquant.h: PI_KQ_KC), their sums carried between chunks, over several row tiles
    for rows, cols in ((45, 768), (200, 2816)):
        w = make_qtensor(qtype, rows, cols, rng, 0.1)
        xs = _tokens(rng, 9, cols)
        single = torch.stack([kernels.matvec(w, xs[t], 1) for t in range(9)])
        terms = R.block_terms(w, xs[:1])
        assert ((single[0].double() - terms.sum(-1)).abs() / terms.abs().sum(-1)).max() <= 4e-6
        for n_tok in range(1, 10):
            for n_threads in (1, 2):
                y = kernels.matmul(w, xs[:n_tok], n_threads)
                assert torch.equal(y, single[:n_tok]), (n_tok, n_threads, (y - single[:n_tok]).abs().max().item())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", KQUANTS, ids=ids)
def test_multi_token_across_row_tiles(use_isa, isa, qtype):
    """2,100 rows of one super-block (144-210 B): more than one 128 KiB row tile per thread."""
    use_isa(isa)
    rng = np.random.default_rng(int(qtype) * 17 + 3)
    w = make_qtensor(qtype, 2100, 256, rng, 0.1)
    xs = _tokens(rng, 6, 256)
    y = kernels.matmul(w, xs, 2)
    for t in range(6):
        assert torch.equal(y[t], kernels.matvec(w, xs[t], 1)), t
