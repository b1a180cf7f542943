"""One settings schema: every subcommand's flags come from the fields of settings.py / options.py. Checked on the real
parser: a flag spelling shared by several subcommands is one field (one default, one help text) except the pairs
named below, every flag has help, every --help builds, and the compute functions' defaults are the fields'."""
import argparse
import inspect

import pytest

from powerinfer.cli import COMMANDS, build_parser
from powerinfer.options import (OUTTYPES, SCHEMA, BenchOptions, CalibrateOptions, PerplexityOptions, ProfileOptions,
                                SolveOptions, TextChunks, TrainOptions)
from powerinfer.settings import (DEFAULT_SPARSE_METHOD, SPARSE_METHODS, ModelSettings, from_namespace,
                                 schema_commands)

# Spellings that mean two different things, so they are two fields. Each needs its reason; nothing else may differ.
TWO_MEANINGS = {
    # llama-bench's list-valued flags (N[,N...]) and its token-id seed: bench's own, not run's -p/-n/-t/-s.
    "-p": "run/tokenize: the prompt text; bench: prompt lengths of the pp tests",
    "-n": "run: tokens to generate; bench: decode steps of the tg tests",
    "-t": "one thread count; bench: the list of thread counts to test",
    "--threads": "as -t",
    "-s": "run: the sampling seed (-1 = random); bench: the seed of its random token ids (0, reproducible)",
    "--seed": "as -s",
    # Text chunks (llama-perplexity's customary 512) against the KV cache of a generation or placement (4096).
    "-c": "perplexity/calibrate/profile: tokens per text chunk; run/solve/prepare: the KV cache's context",
    "--ctx-size": "as -c",
    # What calibrate makes the thresholds from (8192, what --sparsity S calibrates on) against what profile counts
    # firings over (16384, more samples for the predictors).
    "--tokens": "calibrate: calibration tokens; profile/prepare: profiled tokens",
    "--target-sparsity": "calibrate: the goal (S or SX,SH, one of two goals); profile/prepare: which hu thresholds "
                         "define firing (default 0.5)",
    "--profile": "bench: switch on the per-phase profiler; train-predictors: the profile directory",
    "-r": "bench: repetitions per test (llama-bench); run: a reverse prompt (llama-cli)",
    "--no-warmup": "bench: skip the warm-up run; run: llama-cli's, accepted with a note (run has no warm-up)",
}


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _actions(p):
    return [a for a in p._actions if not isinstance(a, argparse._HelpAction)]


def test_every_subcommand_is_listed_and_named_by_fields(parsers):
    assert list(parsers) == [name for name, _, _ in COMMANDS]
    assert schema_commands(SCHEMA) == set(parsers)  # no field names a command that does not exist, and vice versa


def test_help_builds_and_every_flag_has_help(parsers):
    for name, p in parsers.items():
        assert p.format_help()
        assert p.description, name  # the cmd_<name> docstring
        for a in _actions(p):
            assert a.help and a.help.strip(), (name, a.option_strings or a.dest)
            assert hasattr(a, "schema_field"), (name, a.option_strings or a.dest)  # built from the schema


def test_a_shared_spelling_is_one_field(parsers):
    by_flag: dict[str, dict[int, tuple]] = {}
    for name, p in parsers.items():
        for a in _actions(p):
            for flag in a.option_strings:
                f = a.schema_field
                entry = by_flag.setdefault(flag, {}).setdefault(id(f), (f, set(), set()))
                entry[1].add(name)
                entry[2].add(a.help)
    for flag, by_field in by_flag.items():
        for f, commands, helps in by_field.values():
            assert len(helps) == 1, (flag, helps)  # the same help text (and shown default) in every command
        if len(by_field) > 1:
            assert flag in TWO_MEANINGS, f"{flag} is defined by {len(by_field)} fields: " + "; ".join(
                f"{f.name} for {sorted(c)}" for f, c, _ in by_field.values())
    stale = [flag for flag in TWO_MEANINGS if len(by_flag.get(flag, {})) < 2]
    assert not stale, f"listed as two meanings but one field (or gone): {stale}"


def test_model_flag_is_defined_once_for_every_command_that_loads_a_model(parsers):
    fields = {id(a.schema_field) for p in parsers.values() for a in _actions(p) if "-m" in a.option_strings}
    assert len(fields) == 1
    assert {n for n, p in parsers.items() if any("-m" in a.option_strings for a in _actions(p))} == \
        set(parsers) - {"compare-logits"}


def test_prepare_reuses_the_steps_fields(parsers):
    """prepare's knobs are profile's, train-predictors' and solve's fields: the same defaults by construction."""
    def field_of(command, flag):
        return next(a.schema_field for a in _actions(parsers[command]) if flag in a.option_strings)

    for flag, step in [("--recall", "train-predictors"), ("--budget", "train-predictors"),
                       ("--epochs", "train-predictors"), ("--tokens", "profile"), ("--target-sparsity", "profile"),
                       ("--text", "profile"), ("--vram-budget", "solve"), ("--cpu-bandwidth", "solve"),
                       ("--gpu-bandwidth", "solve"), ("--align", "solve"), ("-c", "solve"), ("-t", "profile")]:
        assert field_of("prepare", flag) is field_of(step, flag), flag


def test_a_namespace_fills_only_its_commands_fields(parsers):
    """-c on prepare is the KV cache's context (ModelSettings.n_ctx), not ProfileOptions' text chunk."""
    args = build_parser().parse_args(["prepare", "-c", "1024", "--tokens", "64"])
    assert from_namespace(ModelSettings, args).n_ctx == 1024
    prof = from_namespace(ProfileOptions, args)
    assert prof.n_ctx == TextChunks.n_ctx == 512 and prof.tokens == 64


def test_defaults_are_what_the_computation_uses():
    from powerinfer.formats.powerinfer_gguf import OUTTYPES as WRITER_OUTTYPES
    from powerinfer.measure.bench import run_bench
    from powerinfer.measure.perplexity import perplexity
    from powerinfer.prepare.profile import run_profile
    from powerinfer.prepare.solve import solve_model
    from powerinfer.prepare.train import train_layer, train_predictors
    from powerinfer.runtime.runner import make_runner
    from powerinfer.sparse.artifacts import METHODS

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    train = TrainOptions()
    assert (default(train_predictors, "recall"), default(train_predictors, "budget")) == (train.recall, train.budget)
    assert default(train_predictors, "epochs") == default(train_layer, "epochs") == train.epochs
    prof = ProfileOptions()
    assert (default(run_profile, "n_tokens"), default(run_profile, "n_ctx")) == (prof.tokens, prof.n_ctx)
    assert default(solve_model, "n_ctx") == ModelSettings.n_ctx
    assert default(make_runner, "n_batch") == ModelSettings.n_batch
    assert default(perplexity, "max_chunks") == PerplexityOptions.chunks
    assert default(run_bench, "seed") == BenchOptions.seed
    assert ModelSettings.sparse_method == DEFAULT_SPARSE_METHOD == CalibrateOptions.method
    assert SPARSE_METHODS == tuple(METHODS) and OUTTYPES == tuple(WRITER_OUTTYPES)
    # bandwidths: measured unless given, for solve and for prepare alike (one field each)
    assert SolveOptions().cpu_bandwidth is None and SolveOptions().gpu_bandwidth is None


def test_options_check_their_values():
    from powerinfer.errors import PowerInferError

    with pytest.raises(PowerInferError, match="--recall"):
        TrainOptions(recall=1.5)
    with pytest.raises(PowerInferError, match="--vram-budget"):
        ModelSettings(vram_budget=float("nan"))
    with pytest.raises(PowerInferError, match="--hot-device"):
        ModelSettings(hot_device="tpu")
    with pytest.raises(PowerInferError, match="one goal"):
        CalibrateOptions()
    assert CalibrateOptions(target_sparsity="0.2,0.4", method="teal-hu").target == {"x": 0.2, "h": 0.4}
    assert BenchOptions(n_prompt="8,0,16", threads="1,2").prompt_lengths == [8, 16]
