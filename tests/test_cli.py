"""CLI behaviour: bad input gives one clear line on stderr and a non-zero exit, never a traceback."""
import json
import subprocess
import sys

import pytest
from gguf import GGUFWriter

from powerinfer.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    assert code not in (0, None)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_model_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "-m", str(tmp_path / "nope.gguf"), "-p", "hi")
    assert_one_line_error(code, err, "nope.gguf", "no such file")


def test_not_a_gguf(capsys, tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"this is not a model" * 10)
    code, _, err = run_cli(capsys, "run", "-m", str(p), "-p", "hi")
    assert_one_line_error(code, err, "model.gguf")


def test_truncated_gguf(capsys, tmp_path, tiny_llama_gguf):
    data = tiny_llama_gguf("Q8_0").path.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: len(data) * 2 // 3])
    code, _, err = run_cli(capsys, "info", "-m", str(p))
    assert_one_line_error(code, err, "cut.gguf")


def test_unsupported_architecture(capsys, tmp_path):
    p = tmp_path / "mamba.gguf"
    w = GGUFWriter(str(p), "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, _, err = run_cli(capsys, "info", "-m", str(p))
    assert_one_line_error(code, err, "mamba")


def test_prompt_longer_than_context(capsys):
    code, out, err = run_cli(capsys, "run", "-c", "16", "-p", "word " * 100, "-n", "4")
    assert_one_line_error(code, err, "context")
    assert out.endswith("\n")  # the echoed prompt's line is ended before the error


def test_empty_prompt_is_explained(capsys, tmp_path):
    # SmolLM2 adds no BOS token, so an empty prompt leaves nothing to continue from
    code, _, err = run_cli(capsys, "run", "-p", "", "-n", "4")
    assert_one_line_error(code, err, "prompt is empty")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run_cli(capsys, "run", "-f", str(empty), "-n", "4")
    assert_one_line_error(code, err, "prompt is empty")


def test_prompt_file_missing(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "-f", str(tmp_path / "prompt.txt"))
    assert_one_line_error(code, err, "prompt.txt")


def test_no_prompt_is_explained(capsys):
    code, _, err = run_cli(capsys, "run", "-n", "4")
    assert_one_line_error(code, err, "-p")


def test_unknown_flag_real_entry_point():
    r = subprocess.run([sys.executable, "-m", "powerinfer", "run", "--bogus-flag"], capture_output=True, text=True)
    assert r.returncode == 2
    assert_one_line_error(r.returncode, r.stderr, "--bogus-flag")


def test_help_documents_every_flag():
    r = subprocess.run([sys.executable, "-m", "powerinfer", "run", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ["-m", "-p", "-f", "-n", "-c", "-t", "-b", "--temp", "--top-k", "--top-p", "--min-p",
                 "--repeat-penalty", "--repeat-last-n", "--seed", "--ignore-eos", "--interactive",
                 "--conversation", "--system-prompt", "--prompt-file-batch"]:
        assert flag in r.stdout, flag


def test_run_greedy_prints_prompt_and_continuation(capsys):
    code, out, err = run_cli(capsys, "run", "-p", "The capital of France is", "-n", "8", "--temp", "0")
    assert code == 0
    assert out.startswith("The capital of France is")
    assert "Paris" in out
    assert "tok/s" in err


def test_tokenize_json_and_lines(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "tokenize", "-p", "Hello world", "--json")
    assert code == 0 and json.loads(out) == [19556, 905]
    f = tmp_path / "lines.txt"
    f.write_text("Hello world\nHello\n")
    code, out, _ = run_cli(capsys, "tokenize", "-f", str(f), "--lines", "--json")
    assert code == 0 and json.loads(out) == [[19556, 905], [19556]]


def test_info_json(capsys):
    code, out, _ = run_cli(capsys, "info", "--json")
    info = json.loads(out)
    assert code == 0
    assert info["architecture"] == "llama" and info["layers"] == 30 and info["vocabulary"] == 49152


def test_prompt_file_batch_writes_jsonl(capsys, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("The capital of France is\n\nOne, two, three,\n")
    out_file = tmp_path / "out.jsonl"
    code, _, _ = run_cli(capsys, "run", "--prompt-file-batch", str(f), "-o", str(out_file), "-n", "6",
                         "--temp", "0")
    recs = [json.loads(ln) for ln in out_file.read_text().splitlines()]
    assert code == 0 and [r["prompt"] for r in recs] == ["The capital of France is", "One, two, three,"]
    assert all(r["completion_tokens"] >= 1 for r in recs)


@pytest.mark.parametrize("argv, needle", [
    (["--top-p", "2"], "--top-p must be in [0, 1]"),
    (["--min-p", "-0.5"], "--min-p must be in [0, 1]"),
    (["--top-k", "-3"], "--top-k must be >= 0"),
    (["--repeat-penalty", "0"], "--repeat-penalty must be > 0"),
    (["--repeat-last-n", "-5"], "--repeat-last-n must be >= -1"),
    (["-c", "-5"], "--ctx-size must be >= 0"),
    (["-b", "0"], "--batch-size must be > 0"),
    (["--sparsity", "2"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "abc"], "expected auto, off or a fraction"),
])
def test_bad_setting_is_one_line(capsys, argv, needle):
    code, _, err = run_cli(capsys, "run", "-p", "hi", "-n", "2", *argv)
    assert_one_line_error(code, err, needle)


def test_powerinfer_gguf_runs_sparse_with_its_own_predictors_by_default(capsys, tiny_gguf):
    """Upstream runs a PowerInfer GGUF with its predictors; so does `run` with no sparsity flag."""
    from gguf import GGMLQuantizationType as Q

    pwri = tiny_gguf(activation="relu", qtype=Q.F16, n_layer=2, n_ff=128, pwri=True, ffn_down_t=True, predictors=True,
                     tokenizer=True, n_vocab=300)
    assert main(["run", "-m", str(pwri.path), "-p", "hello", "-n", "4", "--temp", "0", "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "the file's predictors" in err and "ffn sparsity" in err


def test_hybrid_run_prints_placement_and_tier_split(capsys, tiny_gguf):
    from gguf import GGMLQuantizationType as Q

    relu = tiny_gguf(activation="relu", qtype=Q.F32, n_layer=2, n_ff=256, context_length=128, tokenizer=True,
                     n_vocab=300)
    assert main(["run", "-m", str(relu.path), "-p", "hello", "-n", "6", "--temp", "0", "--verbose", "-c", "64",
                 "--hot-device", "cpu", "--vram-budget", "0.05", "--reset-gpu-index"]) == 0
    err = capsys.readouterr().err
    assert "placement: fast tier cpu" in err and "hot neurons" in err and "tiers, per token:" in err
