"""What runs on the C decoder never imports torch (#17: torch's import was 0.9 s and 177 MiB of `powerinfer run`'s
1.5 s and 398 MiB on the bundled model): `run`, and the API's generation with everything the sampler chain and the
engine add (penalties, temperature, logprobs, a JSON schema, a context shift). A fresh interpreter per check, since
this test process has torch loaded."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from powerinfer.runtime.runner import _fast_tier_possible
from powerinfer.settings import ModelSettings

# With a GPU driver loaded, a plain run asks torch.cuda for a fast tier (runtime/runner.py), as it should.
no_gpu = pytest.mark.skipif(_fast_tier_possible(ModelSettings()), reason="a GPU driver is loaded: run looks for CUDA")


def _torch_loaded_after(code: str) -> str:
    probe = textwrap.dedent(code) + "\nimport sys\nprint('torch loaded:', 'torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


@no_gpu
def test_run_never_imports_torch(bundled_model_path):
    line = _torch_loaded_after(f"""
        from powerinfer.cli import main
        assert main(["run", "-m", {str(bundled_model_path)!r}, "-p", "Hi", "-n", "4", "--temp", "0.7", "-s", "1"]) == 0
    """)
    assert line == "torch loaded: False"


@no_gpu
def test_api_generation_never_imports_torch(bundled_model_path):
    line = _torch_loaded_after(f"""
        import powerinfer
        llm = powerinfer.load({str(bundled_model_path)!r}, n_ctx=64)
        c = llm.generate("The sky is", n_predict=4, temp=0.8, seed=3, repeat_penalty=1.2, logprobs=3, details=True)
        assert len(c.tokens) == 4 and len(c.top_logprobs[0]) == 3
        c = llm.generate("Answer in JSON:", n_predict=12, temp=0, json_schema={{"type": "object"}}, details=True)
        assert c.text.startswith("{{")
        llm.runner.truncate(0)
        llm.runner.eval(list(range(1, 60)))
        assert llm.runner.shift(4, 20)  # the KV cache's key shift (numpy RoPE)
    """)
    assert line == "torch loaded: False"


@no_gpu
def test_exact_relu_sparse_decode_and_the_disk_tier_never_import_torch(tiny_llama_gguf):
    """PowerInfer's own case: a ReLU model's neuron-sparse decode (SparseFFN's copies and counters are numpy), from
    RAM and with cold neurons read from disk (--ram-budget)."""
    path = str(tiny_llama_gguf("Q8_0", activation="relu").path)
    line = _torch_loaded_after(f"""
        from powerinfer.formats.loader import load_model
        from powerinfer.runtime.runner import make_runner
        from powerinfer.runtime.sparsity import apply_sparsity
        from powerinfer.settings import ModelSettings

        loaded = load_model({path!r})
        for budget in (None, 0.00025):  # GiB: the dense parts and a neuron cache, the rest of the FFN on disk
            runner = make_runner(loaded, 64, 2, placement=ModelSettings(model={path!r}, ram_budget=budget))
            assert "relu" in apply_sparsity(runner, loaded, "auto") and runner.sparse
            logits = runner.eval([1, 2, 3])
            for _ in range(8):
                logits = runner.eval([int(logits.argmax())])
            assert 0.0 < runner.ffn_sparsity() < 1.0 and runner.ffn_stats()["ffn_bytes_per_token"] > 0
            assert budget is None or sum(len(d) for d in runner.plan.disk) > 0  # neurons on disk
    """)
    assert line == "torch loaded: False"


def test_ngl_0_looks_for_no_gpu(bundled_model_path):
    """-ngl 0 (--vram-budget 0) puts nothing on a fast tier, so nothing asks torch.cuda for one, GPU or not."""
    line = _torch_loaded_after(f"""
        from powerinfer.cli import main
        assert main(["run", "-m", {str(bundled_model_path)!r}, "-p", "Hi", "-n", "2", "-ngl", "0"]) == 0
    """)
    assert line == "torch loaded: False"
