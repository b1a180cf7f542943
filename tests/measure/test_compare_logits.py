"""`powerinfer compare-logits` on hand-made logits files: agreement, KL and PPL against values computed by
hand, and one-line errors when the runs are not comparable."""
import json
import math

import numpy as np
import pytest

from powerinfer.cli import main
from powerinfer.measure.logits import compare, tokens_path


def save(path, logits, targets):
    np.save(path, np.asarray(logits, dtype=np.float32))
    np.save(tokens_path(path), np.asarray(targets, dtype=np.int32))
    return path


@pytest.fixture
def ab(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 11)).astype(np.float32)  # > one 256-row block
    t = rng.integers(0, 11, 300)
    b = a + rng.standard_normal((300, 1)).astype(np.float32)  # a per-row shift: the same distribution
    return save(tmp_path / "a.npy", a, t), a, t, b


def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_shifted_logits_are_the_same_distribution(tmp_path, ab):
    pa, a, t, b = ab
    c = compare(pa, save(tmp_path / "b.npy", b, t))
    assert c.top1_agreement == 1.0
    assert c.kl_mean == pytest.approx(0.0, abs=1e-6)
    nll = -log_softmax(a)[np.arange(300), t]
    assert c.ppl_a == pytest.approx(math.exp(nll.mean()), rel=1e-9)
    assert c.ppl_b == pytest.approx(c.ppl_a, rel=1e-5)


def test_kl_and_agreement_against_hand_computation(tmp_path, ab):
    pa, a, t, _ = ab
    b = a.copy()
    b[:60] = b[:60, ::-1]  # reversed rows: a different argmax (and distribution) in those 60 rows
    c = compare(pa, save(tmp_path / "b.npy", b, t))
    la, lb = log_softmax(a), log_softmax(b)
    kl = (np.exp(la) * (la - lb)).sum(-1)
    assert c.kl_mean == pytest.approx(kl.mean(), rel=1e-9)
    assert c.kl_max == pytest.approx(kl.max(), rel=1e-9)
    assert c.top1_agreement == pytest.approx((a.argmax(-1) == b.argmax(-1)).mean())
    assert c.top1_agreement < 1.0


def test_cli_json(capsys, tmp_path, ab):
    pa, a, t, b = ab
    pb = save(tmp_path / "b.npy", b, t)
    assert main(["compare-logits", str(pa), str(pb), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n_tokens"] == 300 and doc["n_vocab"] == 11 and doc["top1_agreement"] == 1.0


def one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_different_tokens_shapes_and_missing_sidecar(capsys, tmp_path, ab):
    pa, a, t, _ = ab
    t2 = t.copy()
    t2[7] = (t2[7] + 1) % 11
    other = save(tmp_path / "other.npy", a, t2)
    assert "target tokens differ (first at row 7" in one_line_error(capsys, ["compare-logits", str(pa), str(other)])
    short = save(tmp_path / "short.npy", a[:10], t[:10])
    assert "shapes differ" in one_line_error(capsys, ["compare-logits", str(pa), str(short)])
    lone = tmp_path / "lone.npy"
    np.save(lone, a)
    assert "lone.tokens.npy are missing" in one_line_error(capsys, ["compare-logits", str(pa), str(lone)])
