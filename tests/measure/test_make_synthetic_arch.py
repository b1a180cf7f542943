"""benchmarks/make_synthetic.py --arch qwen3 / falcon: the files carry the family's tensors and keys as gguf-py's
tables (llama.cpp's own) name them, this project reads them as that family, and, where llama-cpp-python is installed,
llama.cpp loads them and computes the same logits as the C decoder."""
import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGUFReader

import powerinfer
from powerinfer.model.kvcache import KVCache
from powerinfer.model.llama import Transformer
from powerinfer.sparse.ffn import make_ffn
from powerinfer.textdata import pydoc_topics

TINY = ["--shape", "custom", "--d-model", "128", "--n-ff", "512", "--n-layer", "2", "--n-head", "4",
        "--n-head-kv", "2", "--vocab", "1024", "--verify-tokens", "0"]
TEXT = "The quick brown fox jumps over the lazy dog, again and again."


@pytest.fixture(scope="module")
def files(make_synthetic, tmp_path_factory):
    d = tmp_path_factory.mktemp("arch")
    out = {}
    for arch, act, extra in (("qwen3", "silu", []), ("falcon", "gelu", ["--n-head-kv", "1"])):
        out[arch] = d / f"{arch}.gguf"
        assert make_synthetic([*TINY, *extra, "--arch", arch, "--type", "Q8_0", "--activation", act,
                               "-o", str(out[arch])]) == 0
    return out


def _names_and_keys(path):
    r = GGUFReader(str(path))
    return {t.name for t in r.tensors}, {k: f.contents() for k, f in r.fields.items()}


def _expected_names(arch: gguf.MODEL_ARCH, n_layer: int, per_layer: dict, top: dict) -> set[str]:
    """Tensor names (name -> suffixes) after checking that gguf-py's table lists each for the family."""
    table = {gguf.TENSOR_NAMES[k] for k in gguf.MODEL_TENSORS[arch]}
    missing = [n for n in [*(f"blk.{{bid}}.{n}" for n in per_layer), *top] if n not in table]
    assert not missing, f"not {arch.name} tensors in llama.cpp's table: {missing}"
    return {f"blk.{i}.{n}{sfx}" for i in range(n_layer) for n, sfxs in per_layer.items() for sfx in sfxs} | \
        {f"{n}{sfx}" for n, sfxs in top.items() for sfx in sfxs}


def test_qwen3_tensors_keys_and_config(files):
    names, md = _names_and_keys(files["qwen3"])
    w = [".weight"]
    layer = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm", "ffn_norm",
             "ffn_gate", "ffn_up", "ffn_down")
    want = _expected_names(gguf.MODEL_ARCH.QWEN3, 2, dict.fromkeys(layer, w),
                           dict.fromkeys(("token_embd", "output_norm", "output"), w))
    assert names == want
    assert md["general.architecture"] == "qwen3"
    assert (md["qwen3.attention.key_length"], md["qwen3.attention.value_length"]) == (32, 32)
    assert "qwen3.rope.dimension_count" not in md  # llama.cpp's Qwen3 converter does not write it

    llm = powerinfer.load(str(files["qwen3"]), n_ctx=64, n_threads=1)
    c = llm.config
    assert (c.arch, c.qk_norm, c.rope_style, c.activation, c.ffn_kind, c.n_head_kv, c.head_dim) == \
        ("qwen3", True, "neox", "silu", "glu", 2, 32)
    assert (c.rope_theta, c.norm_eps) == (10000.0, 1e-5)


def test_qwen3_8b_shape_keys(make_synthetic, tmp_path):
    # the real shape's keys, on two layers of a narrow copy (the full file is 4.7 GB)
    out = tmp_path / "q8b.gguf"
    assert make_synthetic(["--shape", "qwen3-8b", "--d-model", "256", "--n-ff", "512", "--n-layer", "1",
                           "--n-head", "2", "--n-head-kv", "1", "--vocab", "1024", "--activation", "silu",
                           "--verify-tokens", "0", "-o", str(out)]) == 0
    _, md = _names_and_keys(out)
    assert (md["qwen3.rope.freq_base"], md["qwen3.context_length"]) == (1e6, 40960)
    assert md["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)


def test_falcon_tensors_keys_and_config(files):
    names, md = _names_and_keys(files["falcon"])
    w, wb = [".weight"], [".weight", ".bias"]
    want = _expected_names(gguf.MODEL_ARCH.FALCON, 2, dict(attn_norm=wb, attn_qkv=w, attn_output=w, ffn_up=w,
                                                           ffn_down=w),
                           dict(token_embd=w, output_norm=wb, output=w))
    assert names == want
    assert (md["general.architecture"], md["falcon.tensor_data_layout"], md["falcon.attention.head_count_kv"]) == \
        ("falcon", "jploski", 1)
    assert "falcon.attention.layer_norm_epsilon" in md and "falcon.rope.freq_base" not in md
    r = GGUFReader(str(files["falcon"]))
    qkv = next(t for t in r.tensors if t.name == "blk.0.attn_qkv.weight")
    assert list(qkv.shape) == [128, (4 + 2) * 32]  # gguf-py lists [cols, rows]: rows q | k | v

    llm = powerinfer.load(str(files["falcon"]), n_ctx=64, n_threads=1)
    c = llm.config
    assert (c.arch, c.norm, c.parallel_residual, c.activation, c.ffn_kind, c.n_head_kv) == \
        ("falcon", "layer", True, "gelu_tanh", "mlp", 1)


@pytest.mark.parametrize("arch, tol", [("qwen3", 1e-4), ("falcon", 1e-2)])
def test_llama_cpp_loads_and_agrees(files, arch, tol):
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = llama_cpp.Llama(str(files[arch]), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    assert ref.metadata["general.architecture"] == arch
    llm = powerinfer.load(str(files[arch]), n_ctx=64, n_threads=1)
    ids = llm.tokenizer.encode(TEXT, add_bos=False)
    assert ids == ref.tokenize(TEXT.encode(), add_bos=False)
    ref.eval(ids)
    theirs = np.asarray(ref.scores[:len(ids)], np.float64)
    ours = np.stack([np.asarray(llm.runner.eval([t]), np.float64).reshape(-1) for t in ids])
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    # measured on these files: max rel error 1.1e-7 (qwen3) and 3.7e-3 (falcon), top-1 equal at every position
    assert rel < tol, rel
    assert (ours.argmax(1) == theirs.argmax(1)).all()


def test_qwen3_sparse_relu_construction(make_synthetic, tmp_path):
    # the --sparsity construction works through qwen3's per-head q/k norms: measured independently on held-out text
    out = tmp_path / "qs.gguf"
    assert make_synthetic([*TINY, "--arch", "qwen3", "--type", "Q4_0", "--sparsity", "0.8", "-o", str(out)]) == 0
    llm = powerinfer.load(str(out), n_ctx=128, n_threads=1)
    cfg = llm.config
    assert (cfg.arch, cfg.activation) == ("qwen3", "relu")
    ids = llm.tokenizer.encode(pydoc_topics("eval")[5000:8000], add_bos=False)[:64]
    zeros = []

    def ffn(lw, c, **kw):
        inner = make_ffn("dense", lw, c, **kw)

        class Recorder(torch.nn.Module):
            def forward(self, x):
                zeros.append((F.linear(x, inner.gate_proj) <= 0).float().mean().item())
                return inner(x)
        return Recorder()

    model = Transformer(cfg, llm.loaded.weights, ffn=ffn)
    with torch.inference_mode():
        model(torch.tensor(ids), 0, KVCache.allocate(cfg.n_layer, len(ids), cfg.n_head_kv * cfg.head_dim))
    assert len(zeros) == 2 and all(abs(z - 0.8) < 0.04 for z in zeros), zeros


@pytest.mark.parametrize("argv, message", [
    (["--arch", "falcon", "--sparsity", "0.5"], "--sparsity steers the FFN gate; falcon has none"),
    (["--arch", "falcon", "--activation", "silu"], "--activation silu does not fit falcon"),
    (["--arch", "qwen3", "--activation", "gelu"], "--activation gelu does not fit qwen3"),
])
def test_family_errors(make_synthetic, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        make_synthetic(["--shape", "custom", *argv, "-o", str(tmp_path / "x.gguf")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()[-1]) > 0
