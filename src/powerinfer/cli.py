"""`powerinfer` command line, with llama.cpp's flag spellings: every subcommand's flags come from the one settings
schema (settings.py, options.py), and each subcommand is a `cmd_<name>` of commands/.

Every user error ends as one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import inspect
import os
import sys
import threading
from importlib.metadata import version

from .errors import PowerInferError
from .options import SCHEMA
from .settings import add_command_arguments

class _Command:
    """`cmd_<name>` of a commands/ module, imported when the command runs or its --help is shown: `powerinfer run`
    does not import the other commands' modules (19 modules, 25-65 ms of its start)."""

    def __init__(self, module: str, func: str):
        self.module, self.func = module, func

    def resolve(self):
        return getattr(importlib.import_module(f".commands.{self.module}", __package__), self.func)

    def __call__(self, args) -> int:
        return self.resolve()(args)


# name, cmd_<name>(args) -> int (its docstring is the --help description), the line in `powerinfer --help`
COMMANDS = [
    ("run", _Command("run", "cmd_run"), "generate text (like llama-cli)"),
    ("tokenize", _Command("run", "cmd_tokenize"), "print token ids (like llama-tokenize)"),
    ("info", _Command("run", "cmd_info"), "describe a model file"),
    ("perplexity", _Command("measure", "cmd_perplexity"), "perplexity of a text, scored like llama-perplexity"),
    ("compare-logits", _Command("measure", "cmd_compare_logits"),
     "compare two saved logits files (top-1 agreement, KL, perplexities)"),
    ("bench", _Command("measure", "cmd_bench"), "measure prompt and generation speed (like llama-bench)"),
    ("calibrate", _Command("prepare", "cmd_calibrate"),
     "calibrate per-layer activation thresholds for the sparse FFN (SwiGLU/GeGLU models)"),
    ("profile", _Command("prepare", "cmd_profile"), "count how often every FFN neuron fires (activation locality)"),
    ("train-predictors", _Command("prepare", "cmd_train_predictors"),
     "train per-layer activation predictors from a profile"),
    ("solve", _Command("prepare", "cmd_solve"), "place hot FFN neurons on the fast tier (GPU) under a VRAM budget"),
    ("convert", _Command("prepare", "cmd_convert"), "write a PowerInfer GGUF (PWRI, ffn_down_t, fc1/fc2 predictors)"),
    ("prepare", _Command("prepare", "cmd_prepare"),
     "run the offline pipeline: thresholds, profile, predictors, placement"),
    ("serve", _Command("serve", "cmd_serve"), "serve the model over HTTP: OpenAI-compatible API and a web chat page "
     "(like llama-server)"),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    # a subcommand's description is its cmd's docstring, read (and its module imported) only when help is shown
    @property
    def description(self):
        d = self.__dict__.get("_description")
        return inspect.getdoc(d.resolve()) if isinstance(d, _Command) else d

    @description.setter
    def description(self, value):
        self.__dict__["_description"] = value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="powerinfer", description="Fast local LLM inference that computes only the FFN neurons "
                "that fire (PowerInfer). Reads GGUF models; flags follow llama.cpp.")
    p.add_argument("--version", action="version", version=f"powerinfer {version('powerinfer')}",
                   help="print the version and exit (also `powerinfer run --version`, llama-cli's spelling)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, cmd, summary in COMMANDS:
        doc = cmd if isinstance(cmd, _Command) else inspect.getdoc(cmd)
        sp = sub.add_parser(name, help=summary, description=doc)
        add_command_arguments(sp, name, SCHEMA)
        sp.set_defaults(func=cmd)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except PowerInferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def entry() -> None:
    """The `powerinfer` program (console script, `python -m powerinfer`): main(), then the process ends without the
    interpreter's teardown. Tearing down torch's modules took 1.4-1.6 s after `powerinfer run -n 1` had printed its
    token, more than loading the model (`python -c "import torch"` exits 1.6 s after its last line on a loaded 2-core
    host: benchmarks/startup_bench.py). What an ordinary exit does that matters still happens: non-daemon threads are
    joined, atexit handlers run, stdout and stderr are flushed, and the exit status is main's (or SystemExit's)."""
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (| head): nothing more can reach it
            pass
    os._exit(code & 0xFF)
