"""RoPE tables: the layout the C decoder reads, the two rotation styles against each other, and the numpy rotation
(the KV cache's key shift) against the torch model's."""
import math

import numpy as np
import torch

from fixtures.tiny import permute_qk
from powerinfer.core.config import ModelConfig, RopeScaling
from powerinfer.model.llama import apply_rope
from powerinfer.model.rope import rope_angles, rope_inv_freq, rope_tables, rotate


def _config(**kw):
    base = dict(arch="llama", n_vocab=10, d_model=64, n_layer=1, n_head=4, n_head_kv=2, head_dim=16, n_ff=32)
    return ModelConfig(**{**base, **kw})


def test_tables_layout_and_values():
    cfg = _config(rope_theta=500.0)
    cos, sin = rope_tables(cfg, 40)
    assert cos.shape == sin.shape == (40, 8) and cos.dtype == np.float32 and cos.flags.c_contiguous
    # Row = position, column i = frequency theta^(-2i/d) (RoFormer eq. 15).
    pos, i = 37, 3
    angle = pos * 500.0 ** (-2 * i / 16)
    assert math.isclose(cos[pos, i].item(), math.cos(angle), abs_tol=1e-6)
    assert math.isclose(sin[pos, i].item(), math.sin(angle), abs_tol=1e-6)
    c2, s2 = rope_angles(cfg, [pos])
    assert np.array_equal(c2[0], cos[pos]) and np.array_equal(s2[0], sin[pos])


def test_norm_style_on_permuted_rows_equals_neox_on_hf_rows():
    # GGUF llama rows are permuted so that adjacent pairs rotate; the result must be the same vectors, permuted.
    cfg = _config()
    cos, sin = map(torch.from_numpy, rope_tables(cfg, 8))
    x = torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(0))  # [T, heads, head_dim]
    perm = torch.from_numpy(permute_qk(np.arange(64), 4))  # row order of the whole q projection
    neox = apply_rope(x, cos, sin, "neox").reshape(8, 64)
    norm = apply_rope(x.reshape(8, 64)[:, perm].reshape(8, 4, 16), cos, sin, "norm").reshape(8, 64)
    torch.testing.assert_close(norm, neox[:, perm])


def test_rotation_preserves_norm_and_partial_rope_keeps_the_tail():
    cfg = _config(rope_dim=8)
    cos, sin = map(torch.from_numpy, rope_tables(cfg, 5))
    x = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(1))
    for style in ("norm", "neox"):
        y = apply_rope(x, cos, sin, style)
        torch.testing.assert_close(y[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1))
        assert torch.equal(y[..., 8:], x[..., 8:])


def test_numpy_rotation_equals_the_torch_models():
    # the key shift (runtime/runner.py) rotates cached keys with `rotate`; the model rotated them with apply_rope
    for rope_dim in (16, 8):
        cfg = _config(rope_dim=rope_dim)
        cos, sin = rope_tables(cfg, 6)
        x = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(rope_dim))
        for style in ("norm", "neox"):
            want = apply_rope(x, torch.from_numpy(cos), torch.from_numpy(sin), style)
            assert np.array_equal(rotate(x.numpy(), cos, sin, style), want.numpy()), (rope_dim, style)


def test_scalings():
    plain = rope_inv_freq(_config())
    linear = rope_inv_freq(_config(rope_scaling=RopeScaling(kind="linear", factor=4.0)))
    np.testing.assert_allclose(linear, plain / 4.0, rtol=1e-15)
    factors = tuple(float(f) for f in np.linspace(1, 8, 8))
    baked = rope_inv_freq(_config(rope_scaling=RopeScaling(kind="llama3", factor=8.0, freq_factors=factors)))
    np.testing.assert_allclose(baked, plain / np.array(factors), rtol=1e-15)
    # llama3 formula: highest frequencies untouched, lowest divided by the full factor.
    l3 = rope_inv_freq(_config(context_length=64, rope_scaling=RopeScaling(kind="llama3", factor=8.0, original_context=64)))
    assert l3[0] == plain[0] and math.isclose(l3[-1].item(), plain[-1].item() / 8.0, rel_tol=1e-12)
    # yarn: same interpolation at the low-frequency end, and cos/sin carry mscale = 1 + 0.1 ln(factor).
    yarn = _config(context_length=64, rope_scaling=RopeScaling(kind="yarn", factor=4.0, original_context=64))
    assert math.isclose(rope_inv_freq(yarn)[-1].item(), plain[-1].item() / 4.0, rel_tol=1e-12)
    cos, _ = rope_tables(yarn, 1)
    np.testing.assert_allclose(cos[0], np.full(8, 1 + 0.1 * math.log(4.0), dtype=np.float32), rtol=1e-6)
