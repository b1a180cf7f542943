"""Threshold calibration: the thresholds give the target sparsity on the calibration tokens (every layer, every
site), S=0 is dense, and `powerinfer calibrate` writes an artifact tied to the model (target and PPL-bound modes)."""
import json

import pytest
import torch

from powerinfer.sparse.ffn import ffn_factory
from powerinfer.cli import main
from powerinfer.formats.loader import load_model
from powerinfer.model.kvcache import KVCache
from powerinfer.model.llama import Transformer
from powerinfer.prepare.calibrate import calibrate, threshold_model
from powerinfer.prepare.calibration_text import chunks_of
from powerinfer.sparse.artifacts import Thresholds, load_thresholds, model_fingerprint, text_sha256
from powerinfer.sparse.stats import ffn_stats, summarize_stats
from powerinfer.textdata import pydoc_topics


def _run(model, chunks):
    """The ordinary forward pass over each chunk from an empty cache; per-layer stats summary."""
    cfg = model.config
    for s in ffn_stats(model):
        s.reset()
    cache = KVCache.allocate(cfg.n_layer, max(map(len, chunks)), cfg.n_head_kv * cfg.head_dim)
    with torch.inference_mode():
        for c in chunks:
            model(torch.tensor(c), 0, cache)
    return summarize_stats(ffn_stats(model))


@pytest.mark.parametrize("method,sites", [("hu", ["h"]), ("teal", ["x"]), ("teal-hu", ["x", "h"])])
def test_thresholds_give_the_target_on_calibration_tokens(tiny_llama_gguf, method, sites):
    loaded = load_model(tiny_llama_gguf("Q8_0", n_layer=4).path)
    g = torch.Generator().manual_seed(0)
    chunks = chunks_of(torch.randint(0, 96, (256,), generator=g).tolist(), 256, 64)
    values, summary = calibrate(threshold_model(loaded), chunks, method, 0.5, progress=False)
    assert sorted(values) == sorted(sites) and all(len(v) == 4 for v in values.values())
    # A fresh model built from the thresholds, run the ordinary way over the same tokens.
    th = Thresholds(method, 0.5, values, "0" * 16, {})
    s = _run(Transformer(loaded.config, loaded.weights, ffn=ffn_factory("threshold", thresholds=th)), chunks)
    for site in sites:
        per_layer = s[f"sparsity_{site}"]["per_layer"]
        assert all(abs(v - 0.5) <= 0.02 for v in per_layer), (site, per_layer)
        assert per_layer == pytest.approx(summary[f"sparsity_{site}"]["per_layer"], abs=1e-9)
    assert s["bytes_fraction"] < 1


def test_target_zero_is_dense(tiny_llama_gguf):
    loaded = load_model(tiny_llama_gguf("F32").path)
    values, summary = calibrate(threshold_model(loaded), [list(range(40))], "teal-hu", 0.0, progress=False)
    assert values == {"x": [0.0, 0.0], "h": [0.0, 0.0]}
    assert summary["bytes_fraction"] == 1.0


@pytest.mark.slow  # ~18 s: calibrates thresholds on the bundled 135M model
def test_bundled_model_target_on_calibration_tokens(bundled_model):
    """The real SmolLM2: 256 calibration tokens, S = 0.5 on |silu(g)*u|, every one of its 30 layers."""
    from powerinfer.formats.loader import load_tokenizer

    tokens = load_tokenizer(bundled_model).encode(pydoc_topics("calib")[:4000], add_bos=None, parse_special=False)
    chunks = chunks_of(tokens, 256, 256)
    model = threshold_model(bundled_model)
    values, _ = calibrate(model, chunks, "hu", 0.5, progress=False)
    per_layer = _run(model, chunks)["sparsity_h"]["per_layer"]
    assert len(per_layer) == 30 and all(abs(v - 0.5) <= 0.02 for v in per_layer)
    # baselines.md 5.1: thresholds grow with depth (0.017-0.034 in layers 0-3, 0.23 in layer 29)
    assert values["h"][29] > 3 * max(values["h"][:4])


@pytest.fixture
def calib_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(pydoc_topics("calib")[:3000], encoding="utf-8")
    return p


def test_cli_writes_an_artifact(tiny_text_gguf, calib_file, tmp_path, capsys):
    out = tmp_path / "th.json"
    code = main(["calibrate", "-m", str(tiny_text_gguf), "--target-sparsity", "0.5", "--text", str(calib_file),
                 "--tokens", "256", "-c", "64", "-t", "1", "-o", str(out)])
    assert code == 0
    assert f"wrote {out}" in capsys.readouterr().out
    th = load_thresholds(out, model_fingerprint(load_model(tiny_text_gguf)))
    assert (th.method, th.target_sparsity, th.n_layer) == ("hu", 0.5, 3)
    assert th.calibration["n_tokens"] == 256 and th.calibration["n_ctx"] == 64
    assert th.calibration["text_sha256"] == text_sha256(calib_file.read_text(encoding="utf-8"))
    assert all(abs(a - 0.5) <= 0.02 for a in th.achieved["h"])


def test_cli_ppl_bound_search(tiny_text_gguf, calib_file, tmp_path, capsys):
    ev = tmp_path / "eval.txt"
    ev.write_text(pydoc_topics("eval")[:3000], encoding="utf-8")
    out = tmp_path / "th.json"
    code = main(["calibrate", "-m", str(tiny_text_gguf), "--max-ppl-increase", "2%", "--method", "teal",
                 "--text", str(calib_file), "--tokens", "128", "-c", "64", "--eval-file", str(ev),
                 "--eval-tokens", "128", "-t", "1", "-o", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    th = load_thresholds(out, model_fingerprint(load_model(tiny_text_gguf)))
    e = th.evaluation
    assert summary["evaluation"] == e and e["max_ppl_increase"] == 0.02
    assert 3 <= len(e["probes"]) <= 5 and e["n_scored"] == 64  # 2 chunks of 64, second halves scored
    for p in e["probes"]:
        assert p["ok"] == (p["ppl"] <= e["ppl_dense"] * 1.02)
    ok = [p["target"] for p in e["probes"] if p["ok"]]
    assert th.target_sparsity == e["chosen"] == max(ok, default=0.0)
    # bisection: every probe above the chosen point failed, every probe below it passed
    assert all(p["ok"] == (p["target"] <= e["chosen"]) for p in e["probes"])


def test_cli_per_site_targets(tiny_text_gguf, calib_file, tmp_path, capsys):
    code = main(["calibrate", "-m", str(tiny_text_gguf), "--method", "teal-hu", "--target-sparsity", "0.2,0.4",
                 "--text", str(calib_file), "--tokens", "128", "-c", "64", "-t", "1", "--cache-dir", str(tmp_path)])
    assert code == 0
    fp = model_fingerprint(load_model(tiny_text_gguf))
    th = load_thresholds(tmp_path / fp / "thresholds-teal-hu-x0.20-h0.40.json", fp)
    assert th.target_sparsity == {"x": 0.2, "h": 0.4}
    assert all(abs(a - 0.2) <= 0.02 for a in th.achieved["x"]) and all(abs(a - 0.4) <= 0.02 for a in th.achieved["h"])


@pytest.mark.parametrize("argv,needle", [
    (["--max-ppl-increase", "3"], "percentage"),
    (["--target-sparsity", "1.5"], "[0, 1)"),
    (["--target-sparsity", "0.2,0.4"], "teal-hu"),
])
def test_cli_bad_values_are_one_line_errors(tiny_text_gguf, capsys, argv, needle):
    assert main(["calibrate", "-m", str(tiny_text_gguf), *argv]) == 1
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_cli_needs_exactly_one_goal(capsys):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--target-sparsity", "0.5", "--max-ppl-increase", "0.03"])
    assert e.value.code == 2
