"""The command line's glue (DESIGN, "Layers": the top). One `cmd_<name>(args) -> int` per subcommand, in three
steps: parse (the option dataclasses of settings.py / options.py from argparse's namespace; one-line
`PowerInferError`s), compute (plain functions of measure/, prepare/ and the API, which tests and `powerinfer
prepare` call too), report (printing). A cmd's docstring is its `--help` description.

  run.py      run, tokenize, info (chat.py: run's generation loops, one prompt, -i and -cnv, as llama-cli's)
  measure.py  perplexity, compare-logits, bench
  prepare.py  calibrate, profile, train-predictors, solve, convert, prepare
  serve.py    serve (the HTTP server itself is the server/ package)
"""
from __future__ import annotations

import sys


def disk_line(disk: dict) -> str:
    """The disk tier's counters per step (runtime/disk_runner.py `disk_stats`) in one line: what run --verbose prints
    at the end and perplexity prints after each chunk."""
    rate = f", {disk['read_rate_mb_s']:.0f} MB/s while waiting" if disk["read_rate_mb_s"] else ""
    return (f"disk tier, per step ({disk['tokens']} steps): {disk['bytes_per_token'] / 2**20:.2f} MiB read "
            f"({disk['bundles_per_token']:.0f} neuron bundles in {disk['reads_per_token']:.0f} reads), neuron cache "
            f"hit rate {disk['hit_rate']:.1%}, I/O wait {disk['io_wait_ms_per_token']:.2f} ms "
            f"({'O_DIRECT' if disk['o_direct'] else 'buffered'}{rate})")


def load_model_noted(path, allow_non_finite: bool = False):
    """formats.loader.load_model, saying on stderr what was converted at load and which non-finite tensors
    --allow-non-finite let through (the commands that run the model and report its numbers: run, perplexity, bench,
    calibrate, serve)."""
    from ..formats.loader import load_model as load

    loaded = load(path, allow_non_finite=allow_non_finite)
    if loaded.conversion_report:
        print(f"note: converted at load: {loaded.conversion_report}", file=sys.stderr)
    if loaded.non_finite:
        print(f"warning: {len(loaded.non_finite)} tensors hold NaN or infinite values ({', '.join(loaded.non_finite[:3])}"
              f"{', ...' if len(loaded.non_finite) > 3 else ''}); running anyway (--allow-non-finite)", file=sys.stderr)
    return loaded
