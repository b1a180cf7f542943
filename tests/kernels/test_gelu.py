"""Both GELU forms through the C decoder against transformers: HF "gelu" is the erf form (ModelConfig "gelu"),
"gelu_pytorch_tanh" the tanh approximation (ModelConfig "gelu_tanh", ggml_gelu).

The forms differ by at most 4.7e-4 (at |x| = 2.7), which moves these tiny models' logits by ~2e-4 of their
scale: less than the C decoder's own difference from transformers (~3e-4, its f16 KV cache and f16 attention
probabilities), so the full-model comparison cannot tell the forms apart. With o_proj zeroed, attention adds
nothing and every remaining step is float32 (F32 weights are not quantized): C then matches transformers to
~4e-7, and the wrong form is 400x further away.
"""
from __future__ import annotations

import dataclasses

import pytest
import numpy as np
import torch

from fixtures.tiny import hf_logits
from kernel_helpers import ISAS
from powerinfer.errors import ModelFormatError
from powerinfer.formats.loader import load_model
from powerinfer.kernels import bind_decoder
from powerinfer.runtime.runner import make_runner

TOKENS = torch.tensor([4, 8, 15, 16, 23, 42, 0, 95, 7, 3, 60, 11])
FORMS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}  # HF hidden_act -> ModelConfig.activation
OTHER = {"gelu_pytorch_tanh": "gelu", "gelu": "gelu_pytorch_tanh"}


def _rel(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)  # runners' logits are numpy
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("hidden_act", list(FORMS))
def test_gelu_model_matches_transformers(tiny_hf_dir, hidden_act):
    path, tiny = tiny_hf_dir(arch="llama", activation=hidden_act)
    loaded = load_model(path)
    assert loaded.config.activation == FORMS[hidden_act]
    ref = hf_logits(tiny, TOKENS)
    for n_batch in (512, 1):  # one prefill chunk; token-by-token decode steps
        ours = make_runner(loaded, 64, 2, n_batch=n_batch).eval(TOKENS.tolist(), all_logits=True)
        assert _rel(ours, ref) < 1e-3  # measured 3.3e-4 for both forms
        assert np.array_equal(np.asarray(ours).argmax(-1), np.asarray(ref).argmax(-1))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hidden_act", list(FORMS))
def test_gelu_form_is_exact_without_attention(tiny_gguf, tmp_path, use_isa, isa, hidden_act):
    use_isa(isa)
    tiny = tiny_gguf(arch="llama", activation=hidden_act)
    tiny = dataclasses.replace(tiny, hf_state={k: torch.zeros_like(v) if "o_proj" in k else v
                                               for k, v in tiny.hf_state.items()})
    loaded = load_model(tiny.save_hf_dir(tmp_path / hidden_act))
    ref = hf_logits(tiny, TOKENS)
    other = hf_logits(dataclasses.replace(tiny, spec=dataclasses.replace(tiny.spec, activation=OTHER[hidden_act])),
                      TOKENS)
    assert _rel(other, ref) > 1e-4  # the test can see a swapped form (measured 1.8e-4)
    ours = make_runner(loaded, 64, 2).eval(TOKENS.tolist(), all_logits=True)
    assert _rel(ours, ref) < 1e-5  # measured 3e-7 ... 4.4e-7
    assert np.array_equal(np.asarray(ours).argmax(-1), np.asarray(ref).argmax(-1))


def test_unsupported_activation_is_a_model_format_error(tiny_hf_dir):
    loaded = load_model(tiny_hf_dir(arch="llama")[0])
    cfg = dataclasses.replace(loaded.config, activation="gelu_quick")
    with pytest.raises(ModelFormatError, match="'gelu_quick'") as e:
        bind_decoder(cfg, loaded.weights, None, None, None)
    assert "\n" not in str(e.value)
