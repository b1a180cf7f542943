"""compare_llamacpp.py's `Exact` yardstick: the float64 reference model with its float64 KV cache gives every
position's logits, equal to the f32 reference model's to f32 precision (a cache it cannot allocate broke it once)."""
import numpy as np
import torch

from powerinfer.formats.loader import load_model
from powerinfer.model.kvcache import KVCache
from powerinfer.model.llama import Transformer


def test_exact_logits_match_the_f32_reference(tiny_llama_gguf, benchmark_module):
    Exact = benchmark_module("compare_llamacpp").Exact
    loaded = load_model(tiny_llama_gguf("F32").path)
    ids = [1, 5, 9, 2, 7]
    got = Exact(loaded).all_logits(ids)
    assert got.dtype == np.float64 and got.shape == (len(ids), loaded.config.n_vocab)
    cfg = loaded.config
    ref = Transformer(cfg, loaded.weights, dtype=torch.float32)
    kv = KVCache.allocate(cfg.n_layer, len(ids), cfg.n_head_kv * cfg.head_dim, dtype=torch.float32)
    with torch.inference_mode():
        want = ref(torch.tensor(ids), 0, kv).double().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
