"""`powerinfer perplexity` on the real bundled model: llama-perplexity's chunking and scoring convention,
PPL = exp(mean NLL) checked against logits computed independently, and the --logits-out / compare-logits
round trip."""
import json
import math
import re

import numpy as np
import pytest
import torch

import powerinfer
from powerinfer.cli import main
from powerinfer.measure.logits import tokens_path
from powerinfer.measure.perplexity import n_chunks_for, perplexity, scored_per_chunk
from powerinfer.textdata import describe, pydoc_topics

N_CTX = 64


@pytest.fixture(scope="module")
def llm(bundled_model_path):
    return powerinfer.load(str(bundled_model_path), n_ctx=N_CTX, n_threads=1)


@pytest.fixture(scope="module")
def tokens(llm):
    # a short slice of the evaluation text: 4+ chunks of 64 tokens
    return llm.tokenizer.encode(pydoc_topics("eval")[:1500], add_bos=None, parse_special=False)


def test_chunk_and_scored_counts():
    assert n_chunks_for(1000, 128) == 7  # whole chunks only
    assert n_chunks_for(1000, 128, max_chunks=3) == 3
    assert n_chunks_for(1000, 128, max_chunks=50) == 7
    assert n_chunks_for(100, 128) == 0
    assert scored_per_chunk(512) == 256  # logits at 255..510 predict the tokens at 256..511
    assert scored_per_chunk(64) == 32
    assert scored_per_chunk(7) == 4  # first = 3: the tokens at positions 3, 4, 5, 6


def test_ppl_is_exp_mean_nll_of_its_logits_and_targets(llm, tokens, tmp_path):
    """Exact: the scored rows are positions first-1..n_ctx-2 predicting the next token, and PPL is
    exp(mean NLL) of them with llama.cpp's error."""
    out = tmp_path / "l.npy"
    r = perplexity(llm.runner, tokens, N_CTX, logits_out=str(out))
    n_chunk = len(tokens) // N_CTX
    assert n_chunk >= 4
    assert (r.n_chunks, r.n_tokens_scored, r.n_ctx) == (n_chunk, n_chunk * 32, N_CTX)
    want_targets = [tokens[i * N_CTX + j + 1] for i in range(n_chunk) for j in range(N_CTX // 2 - 1, N_CTX - 1)]
    assert np.load(tokens_path(out)).tolist() == want_targets

    logits = torch.from_numpy(np.load(out)).double()
    nll = -torch.log_softmax(logits, -1)[torch.arange(len(want_targets)), torch.tensor(want_targets)].numpy()
    ppl = math.exp(nll.mean())
    assert r.ppl == pytest.approx(ppl, rel=1e-9)
    assert r.running[-1] == pytest.approx(r.ppl, rel=1e-12)
    assert r.running[0] == pytest.approx(math.exp(nll[:32].mean()), rel=1e-9)
    err = ppl * math.sqrt(nll.var() / (len(nll) - 1))  # llama.cpp: sqrt((E[x^2] - E[x]^2) / (n-1)) * ppl
    assert r.ppl_err == pytest.approx(err, rel=1e-6)


def test_ppl_matches_logits_of_whole_chunks(llm, tokens):
    """Independently: every chunk evaluated at once with all logits kept, scored by hand. The tool fills the
    unscored half with one prefill instead, whose numerics may differ slightly from single steps (activation
    quantization), hence the tolerance; a misaligned position would change the PPL many times over."""
    runner = llm.runner
    r = perplexity(runner, tokens, N_CTX)
    nll = []
    for i in range(r.n_chunks):
        chunk = tokens[i * N_CTX:(i + 1) * N_CTX]
        runner.truncate(0)
        logits = torch.from_numpy(runner.eval(chunk, all_logits=True)).double()
        for j in range(N_CTX // 2 - 1, N_CTX - 1):
            nll.append(-(torch.log_softmax(logits[j], -1)[chunk[j + 1]]).item())
    assert len(nll) == r.n_tokens_scored
    assert r.ppl == pytest.approx(math.exp(np.mean(nll)), rel=2e-2)


def test_bos_replaces_each_chunk_start(llm, tokens):
    bos = llm.tokenizer.bos_id
    r = perplexity(llm.runner, tokens, N_CTX, bos_id=bos, max_chunks=2)
    assert r.n_chunks == 2
    # what the cache holds after the last chunk: BOS, then the chunk's own tokens (the last one is only a target)
    start = N_CTX
    assert llm.runner.tokens == [bos] + tokens[start + 1:start + N_CTX - 1]


def test_cli_default_text_json_and_logits_roundtrip(capsys, tmp_path, bundled_model_path):
    out = tmp_path / "run.npy"
    code = main(["perplexity", "-m", str(bundled_model_path), "-c", str(N_CTX), "-t", "1", "--chunks", "2",
                 "--json", "--logits-out", str(out)])
    cap = capsys.readouterr()
    assert code == 0
    assert "default evaluation text" in cap.err
    doc = json.loads(cap.out)
    assert {"ppl", "ppl_err", "n_tokens_scored", "n_chunks", "n_ctx", "text", "seconds"} <= set(doc)
    assert (doc["n_chunks"], doc["n_ctx"], doc["n_tokens_scored"]) == (2, N_CTX, 2 * 32)
    assert doc["text"] == describe(pydoc_topics("eval"))
    assert re.search(r"\[1\][\d.]+,\[2\][\d.]+,", cap.err)  # the running values go to stderr with --json

    logits = np.load(out)
    targets = np.load(tokens_path(out))
    assert logits.shape == (64, 49152) and logits.dtype == np.float32
    assert targets.shape == (64,)
    nll = -torch.log_softmax(torch.from_numpy(logits).double(), -1)[torch.arange(64), torch.from_numpy(targets).long()]
    assert math.exp(nll.mean().item()) == pytest.approx(doc["ppl"], rel=1e-9)

    code = main(["compare-logits", str(out), str(out), "--json"])
    cmp = json.loads(capsys.readouterr().out)
    assert code == 0
    assert cmp["top1_agreement"] == 1.0
    assert cmp["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert cmp["ppl_a"] == pytest.approx(doc["ppl"], rel=1e-9) and cmp["ppl_b"] == cmp["ppl_a"]
    assert cmp["ppl_a_err"] == pytest.approx(doc["ppl_err"], rel=1e-9)


def test_cli_text_output_like_llama_perplexity(capsys, tmp_path, bundled_model_path):
    text = tmp_path / "t.txt"
    text.write_text(pydoc_topics("eval")[:1500], encoding="utf-8")
    code = main(["perplexity", "-m", str(bundled_model_path), "-f", str(text), "-c", str(N_CTX), "-t", "1",
                 "--chunks", "3"])
    cap = capsys.readouterr()
    assert code == 0
    assert re.search(r"^\[1\][\d.]+,\[2\][\d.]+,\[3\][\d.]+,$", cap.out, re.M), cap.out
    m = re.search(r"^Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)$", cap.out, re.M)
    assert m and float(m.group(1)) > 1
    last = float(re.findall(r"\[3\]([\d.]+),", cap.out)[0])
    assert last == pytest.approx(float(m.group(1)), abs=1e-4)


def test_too_short_text_is_one_line_error(capsys, tmp_path, bundled_model_path):
    text = tmp_path / "short.txt"
    text.write_text("Too short.", encoding="utf-8")
    code = main(["perplexity", "-m", str(bundled_model_path), "-f", str(text), "-c", str(N_CTX), "-t", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        f"error: the text has 3 tokens; one chunk needs {N_CTX} (use a longer text or a smaller -c)"]
