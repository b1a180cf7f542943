"""`powerinfer bench` on a tiny model: the documented JSON schema, llama-bench's test order and list flags,
the weight bytes per token against the file's own tensor sizes, and the markdown table."""
import json

import pytest
from gguf import GGUFReader

from powerinfer.cli import main


@pytest.fixture(scope="module")
def tiny(tiny_llama_gguf):
    return tiny_llama_gguf("Q4_0", activation="relu", d_model=64, n_ff=128)


def test_json_schema_and_order(capsys, tiny):
    code = main(["bench", "-m", str(tiny.path), "-p", "8,16", "-n", "4", "-t", "1,2", "-r", "2", "--json",
                 "--sparsity", "off"])  # the dense path's byte count below
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "powerinfer.bench/1"
    assert {"path", "type", "arch", "size_bytes", "n_params", "n_layer", "d_model", "n_ff", "n_vocab",
            "activation", "bytes_per_token"} <= set(doc["model"])
    assert {"isa", "cpu", "n_cpus", "python", "torch", "powerinfer"} <= set(doc["system"])
    assert doc["settings"]["repetitions"] == 2 and doc["settings"]["warmup"] is True
    assert doc["peak_rss_mib"] > 0
    # llama-bench order: thread counts outer, then the pp tests, then the tg tests
    assert [(r["n_threads"], r["test"]) for r in doc["results"]] == [
        (1, "pp8"), (1, "pp16"), (1, "tg4"), (2, "pp8"), (2, "pp16"), (2, "tg4")]

    # the weight bytes one decode step reads, from the file: every tensor but the embedding, plus one of its rows
    tensors = {t.name: t for t in GGUFReader(str(tiny.path)).tensors}
    emb = tensors["token_embd.weight"]
    expected = sum(int(t.n_bytes) for n, t in tensors.items() if n != "token_embd.weight") + \
        int(emb.n_bytes) // int(emb.shape[1])
    assert doc["model"]["bytes_per_token"] == expected

    for r in doc["results"]:
        assert len(r["samples_ns"]) == len(r["samples_ts"]) == 2
        assert all(ns > 0 for ns in r["samples_ns"])
        n = r["n_prompt"] + r["n_gen"]
        assert r["samples_ts"] == pytest.approx([n * 1e9 / ns for ns in r["samples_ns"]], rel=1e-4)
        assert r["avg_ts"] == pytest.approx(sum(r["samples_ts"]) / 2, rel=1e-4)
        assert min(r["samples_ts"]) - 1e-6 <= r["median_ts"] <= max(r["samples_ts"]) + 1e-6
        assert r["stddev_ts"] >= 0
        assert r["ffn_sparsity"] == 0.0 and r["sparsity_source"] == "dense"
        if r["test"].startswith("tg"):
            assert (r["n_prompt"], r["n_gen"]) == (0, 4)
            assert r["bytes_per_token"] == expected
            assert r["gb_per_s"] == pytest.approx(expected * r["avg_ts"] / 1e9)
        else:
            assert r["n_gen"] == 0 and r["bytes_per_token"] is None and r["gb_per_s"] is None


def test_markdown_table(capsys, tiny):
    assert main(["bench", "-m", str(tiny.path), "-p", "8", "-n", "4", "-t", "1", "-r", "1", "--no-warmup"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model | size | params | threads | test | t/s | median t/s | GB/s | sparsity |"
    rows = [ln.split("|")[1:-1] for ln in lines[2:4]]
    assert [c.strip() for c in rows[0]][3:5] == ["1", "pp8"]
    assert [c.strip() for c in rows[1]][3:5] == ["1", "tg4"]
    assert "±" in rows[1][5] and rows[0][7].strip() == "-" and float(rows[1][7]) > 0
    assert any(ln.startswith("GB/s:") for ln in lines)


@pytest.mark.parametrize("argv, needle", [
    (["-t", "1,x"], "-t/--threads expects comma-separated integers"),
    (["-p", "0", "-n", "0"], "nothing to run"),
    (["-t", "0"], "values must be >= 1"),
    (["-r", "0"], "must be >= 1"),
])
def test_bad_flags_are_one_line_errors(capsys, tiny, argv, needle):
    code = main(["bench", "-m", str(tiny.path), "-p", "4", "-n", "2", *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and needle in lines[0], err


def test_depth(capsys, tiny):
    """-d/--n-depth (llama-bench's): each depth runs every test after that many tokens of context, named
    "pp8 @ d24" in llama-bench's order (threads, then depths, then pp before tg); the tg tests count the KV rows
    they read: every layer's K and V rows 0..pos for pos = depth .. depth+n-1."""
    assert main(["bench", "-m", str(tiny.path), "-p", "8", "-n", "4", "-d", "0,24", "-t", "1", "-r", "1", "--json",
                 "--sparsity", "off"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(r["test"], r["n_depth"]) for r in doc["results"]] == [
        ("pp8", 0), ("tg4", 0), ("pp8 @ d24", 24), ("tg4 @ d24", 24)]
    assert doc["settings"]["n_ctx"] == 24 + 8
    tensors = {t.name: t for t in GGUFReader(str(tiny.path)).tensors}
    n_layer = sum(1 for n in tensors if n.endswith("attn_k.weight"))
    kv_row = int(tensors["blk.0.attn_k.weight"].shape[1]) * 2  # f16 K row of all KV heads (shape is [d, kv_dim])
    for r in doc["results"]:
        if r["n_gen"]:
            rows = r["n_depth"] + (4 + 1) / 2
            assert r["kv_bytes_per_token"] == int(n_layer * 2 * kv_row * rows)
            assert r["read_gb_per_s"] == pytest.approx((r["bytes_per_token"] + r["kv_bytes_per_token"]) *
                                                       r["avg_ts"] / 1e9)
        else:
            assert r["kv_bytes_per_token"] is None and r["read_gb_per_s"] is None
    code = main(["bench", "-m", str(tiny.path), "-p", "4", "-n", "0", "-d", "x"])
    err = capsys.readouterr().err
    assert code == 1 and "-d/--n-depth expects comma-separated integers" in err
