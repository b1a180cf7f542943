"""`powerinfer bench -d/--n-depth` on the bundled SmolLM2: the context is filled once, untimed, before the tests at
that depth; every repetition (warm-up and timed) starts from exactly that cache; the table names the tests
"tg16 @ d512"; bad depths are one-line errors."""
import numpy as np
import pytest

from powerinfer.cli import main
from powerinfer.measure import bench as B
from powerinfer.runtime.runner import make_runner

DEPTH = 512


class Recording:
    """The real runner, with each eval's starting position, token ids and returned logits written down."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def eval(self, ids, all_logits=False):
        start = self.runner.n_past
        out = self.runner.eval(ids, all_logits)
        self.calls.append((start, list(ids), out.copy()))
        return out


def test_depth_is_filled_before_every_repetition(bundled_model):
    """One fill of DEPTH random ids (BOS first) from an empty cache, then the pp and tg calls of the warm-up and of
    both timed repetitions all start at position DEPTH; the last tg step's logits equal the same ids decoded after
    a fresh evaluation of the fill, so the timed steps attend over the filled cache, restored to DEPTH each time."""
    runner = make_runner(bundled_model, DEPTH + 8, 2)
    rec = Recording(runner)
    bos = B.random_ids_bos(bundled_model.metadata)
    results = B.run_bench(rec, bundled_model.weights, [B.Test("pp", 8, DEPTH), B.Test("tg", 4, DEPTH)], [2], 2,
                        bos_id=bos)
    assert [r["test"] for r in results] == [f"pp8 @ d{DEPTH}", f"tg4 @ d{DEPTH}"]
    assert [r["n_depth"] for r in results] == [DEPTH, DEPTH]

    fill_start, fill, _ = rec.calls[0]
    assert fill_start == 0 and len(fill) == DEPTH
    assert bos is None or fill[0] == bos
    rest = [(start, len(ids)) for start, ids, _ in rec.calls[1:]]
    # warm-up + 2 repetitions each: pp evaluates its 8 ids in one call, tg one id per call
    assert rest == [(DEPTH, 8)] * 3 + [(DEPTH + i, 1) for i in range(4)] * 3
    tg_ids = [ids[0] for _, ids, _ in rec.calls[-4:]]
    assert bos is None or tg_ids[0] != bos  # ids at depth continue the context: no second BOS

    runner.truncate(0)
    runner.eval(fill)
    for tok in tg_ids:
        fresh = runner.eval([tok])
    for last in (-1, -5, -9):  # the last step of the second and first timed repetitions and of the warm-up
        assert np.array_equal(rec.calls[last][2], fresh)


def test_table_names_tests_at_depth(capsys):
    assert main(["bench", "-p", "16", "-n", "16", "-d", f"0,{DEPTH}", "-t", "2", "-r", "1", "--no-warmup"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in lines[2:6]]
    assert [r[4] for r in rows] == ["pp16", "tg16", f"pp16 @ d{DEPTH}", f"tg16 @ d{DEPTH}"]
    # GB/s counts the K/V rows a step reads: at the same speed, more bytes at depth 512 than at depth 0
    gb = {r[4]: float(r[7]) for r in rows if r[4].startswith("tg")}
    ts = {r[4]: float(r[6]) for r in rows if r[4].startswith("tg")}
    assert gb[f"tg16 @ d{DEPTH}"] / ts[f"tg16 @ d{DEPTH}"] > gb["tg16"] / ts["tg16"]


@pytest.mark.parametrize("depth, needle", [
    ("-1", "-d/--n-depth expects non-negative integers, got '-1'"),
    (",", "-d/--n-depth expects non-negative integers, got ','"),
    ("512,x", "-d/--n-depth expects comma-separated integers, got '512,x'"),
    ("100000000", "(-d 100000000 plus the longest test); lower -d/--n-depth"),
])
def test_bad_depths_are_one_line_errors(capsys, depth, needle):
    code = main(["bench", "-p", "0", "-n", "4", "-t", "1", "-r", "1", f"-d={depth}"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(err) == 1 and needle in err[0], err
