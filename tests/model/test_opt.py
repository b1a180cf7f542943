"""OPT (HF OPTForCausalLM; GGUF `opt` as this package writes it): learned position embeddings (row p + 2 of HF's
table is position p), LayerNorm with bias before attention and before the ReLU MLP, biases on every projection, a
final LayerNorm, a tied head, no RoPE. Tiny random models from transformers, written to PowerInfer GGUF by
`convert`'s writer, run by the C decoder (prefill and decode) and the torch reference against transformers."""
import subprocess
import sys

import pytest

from fixtures.hf_families import TOKENS, c_logits, greedy, hf_logits, opt_model, rel, save
from fixtures.tiny import stepwise_logits
from powerinfer.core.sparse_spec import SparseSpec
from powerinfer.errors import PowerInferError
from powerinfer.formats.loader import load_model
from powerinfer.model.llama import Transformer
from powerinfer.runtime.runner import make_runner


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    model = opt_model()
    return dict(save(model, tmp_path_factory.mktemp("opt"), "opt", ("same", "q8_0")), ref=hf_logits(model))


def test_reads_as_llama_roles(opt):
    for path in (opt["hf"], opt["same"]):
        loaded = load_model(path)
        c, w = loaded.config, loaded.weights
        assert (c.arch, c.norm, c.positions, c.parallel_residual, c.activation, c.ffn_kind, c.tie_embeddings) == \
            ("opt", "layer", "learned", False, "relu", "mlp", True)
        assert tuple(w.pos_embd.shape) == (128, 64)  # the offset rows are left out
        assert all(getattr(w.layers[1], r) is not None for r in ("q_bias", "o_bias", "up_bias", "down_bias"))


def test_torch_reference_matches_transformers(opt):
    loaded = load_model(opt["hf"])
    ours = stepwise_logits(Transformer(loaded.config, loaded.weights), loaded.config, TOKENS, 8, n_ctx=128)
    assert rel(ours, opt["ref"]) < 2e-5  # measured 2e-6


@pytest.mark.parametrize("source", ["same", "hf"])
def test_c_decoder_matches_transformers(opt, source):
    """72 positions, the F32 GGUF written by convert and the HF directory: max rel error ~3e-3 (f16 KV cache and
    attention probabilities, as llama.cpp), top-1 72/72."""
    ours = c_logits(load_model(opt[source]))
    assert rel(ours, opt["ref"]) < 6e-3
    assert (ours.argmax(-1) == opt["ref"].argmax(-1)).all()


def test_greedy_text_c_equals_torch(opt):
    loaded = load_model(opt["same"])
    assert greedy(loaded, "c") == greedy(loaded, "torch")


def test_relu_sparse_equals_dense(opt):
    loaded = load_model(opt["same"])
    spec, stats = SparseSpec.uniform(loaded.config.n_layer, method="relu"), {}
    dense, sparse = c_logits(loaded), c_logits(loaded, spec=spec, stats=stats)
    assert rel(sparse, dense) < 1e-4
    assert stats["sparsity"] > 0.3


def test_context_beyond_the_learned_positions_is_refused(opt):
    with pytest.raises(PowerInferError, match="exceeds the model's 128 learned positions"):
        make_runner(load_model(opt["same"]), n_ctx=256, n_threads=1, compute="c")


def test_info_prints_the_architecture(opt):
    out = subprocess.run([sys.executable, "-m", "powerinfer", "info", "-m", str(opt["q8_0"])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in out.stdout.splitlines() if "  " in line}
    assert rows["architecture"] == "opt" and rows["rope"] == "none (learned position embeddings)"
    assert rows["norm / residual"] == "LayerNorm / sequential" and rows["ffn"] == "mlp with relu"


def test_ram_budget_placement_is_refused(opt):
    """The disk tier's FFN normalises with RMSNorm and adds no biases: an OPT is refused, not run wrong."""
    from powerinfer.settings import PlacementSettings

    with pytest.raises(PowerInferError, match="placements run llama-family models; opt"):
        make_runner(load_model(opt["same"]), 128, 1, placement=PlacementSettings(ram_budget=1.0))
