"""One settings schema (STYLE 6): the same fields drive CLI flags (llama.cpp spellings) and the Python API.

Each field carries its flags and help text in `metadata`; cli.py builds argparse from them and
`powerinfer.load(path, **settings)` validates keyword names against them. Defaults follow llama.cpp's
`llama-cli` (sampling: temp 0.8, top-k 40, top-p 0.95, min-p 0.05, no repeat penalty).
"""
from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields

from .errors import PowerInferError


DEFAULT_SPARSE_METHOD = "hu"


def parse_sparsity(text: str | float | None) -> str | float:
    """--sparsity: 'auto' | 'off' | a float in [0, 1) (runtime/sparsity.py says what each means)."""
    if text is None:
        return "off"
    t = str(text).strip().lower()
    if t in ("auto", "off"):
        return t
    try:
        v = float(t)
    except ValueError:
        raise PowerInferError(f"--sparsity: expected auto, off or a fraction such as 0.5, got {text!r}") from None
    if not 0 <= v < 1:
        raise PowerInferError(f"--sparsity must be in [0, 1), got {text}")
    return v


def _opt(default, *flags, help, group="model", metavar=None, **kw):
    return field(default=default, metadata=dict(flags=flags, help=help, group=group, metavar=metavar, **kw))


def default_threads() -> int:
    # llama.cpp defaults to the number of physical cores; os.cpu_count() counts logical CPUs, and on SMT
    # machines half of them is the better guess (the second hyper-thread adds little to a memory-bound decode).
    n = os.cpu_count() or 1
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    return max(1, n)


@dataclass
class ModelSettings:
    """How the model is loaded and run (fixed for the lifetime of an `LLM`)."""

    model: str | None = _opt(None, "-m", "--model", metavar="PATH",
                             help="GGUF file or HF model directory (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    n_ctx: int = _opt(4096, "-c", "--ctx-size", metavar="N",
                      help="context size in tokens (0 = the model's trained context); the KV cache is allocated for it")
    n_threads: int = _opt(0, "-t", "--threads", metavar="N",
                          help="CPU threads for decode and prefill (default: all available cores)")
    n_batch: int = _opt(512, "-b", "--batch-size", metavar="N",
                        help="prompt tokens processed per prefill call")
    sparsity: str = _opt("off", "--sparsity", metavar="auto|off|S",
                         help="neuron-sparse FFN for generation: off = dense; auto = the fastest measured setting "
                              "within 3%% perplexity (exact skipping of zero activations on ReLU-family models, "
                              "dense on SwiGLU models); S in (0,1) = skip that fraction of FFN neurons per layer "
                              "with thresholds calibrated on first use (about a minute for small models) and cached")
    sparse_method: str = _opt("hu", "--sparse-method", metavar="NAME",
                              help="threshold criterion for SwiGLU models: hu = |act(gate)*up| per neuron "
                                   "(default), teal = |x| per FFN input channel, teal-hu = both")
    predictors: str | None = _opt(None, "--predictors", metavar="FILE",
                                  help="activation predictors for the sparse FFN (a file from `powerinfer "
                                       "train-predictors`); PowerInfer GGUF files use their own by default")
    verbose: bool = _opt(False, "--verbose", action="store_true",
                         help="print load details and per-layer FFN sparsity / bytes read after generation")

    def __post_init__(self):
        if self.n_threads <= 0:
            self.n_threads = default_threads()
        if self.n_ctx < 0:
            raise PowerInferError(f"--ctx-size must be >= 0, got {self.n_ctx}")
        self.sparsity = parse_sparsity(self.sparsity)
        if self.n_batch <= 0:
            raise PowerInferError(f"--batch-size must be > 0, got {self.n_batch}")


@dataclass
class SamplingParams:
    """Per-request generation settings."""

    n_predict: int = _opt(-1, "-n", "--n-predict", metavar="N", group="sampling",
                          help="tokens to generate (-1 = until end-of-generation or the context is full)")
    temp: float = _opt(0.8, "--temp", metavar="T", group="sampling",
                       help="temperature; 0 = greedy (always the most likely token)")
    top_k: int = _opt(40, "--top-k", metavar="K", group="sampling",
                      help="keep only the K most likely tokens (0 = off)")
    top_p: float = _opt(0.95, "--top-p", metavar="P", group="sampling",
                        help="nucleus sampling: keep the smallest set with cumulative probability >= P (1.0 = off)")
    min_p: float = _opt(0.05, "--min-p", metavar="P", group="sampling",
                        help="drop tokens with probability < P times the top token's (0 = off)")
    repeat_penalty: float = _opt(1.0, "--repeat-penalty", metavar="X", group="sampling",
                                 help="penalise tokens seen in the last --repeat-last-n tokens (1.0 = off)")
    repeat_last_n: int = _opt(64, "--repeat-last-n", metavar="N", group="sampling",
                              help="window for the repeat/presence/frequency penalties (0 = off, -1 = context size)")
    presence_penalty: float = _opt(0.0, "--presence-penalty", metavar="X", group="sampling",
                                   help="subtract X from the logit of every token present in the window (0 = off)")
    frequency_penalty: float = _opt(0.0, "--frequency-penalty", metavar="X", group="sampling",
                                    help="subtract X times its count in the window from a token's logit (0 = off)")
    seed: int = _opt(-1, "-s", "--seed", metavar="N", group="sampling",
                     help="random seed (-1 = a random seed)")
    ignore_eos: bool = _opt(False, "--ignore-eos", group="sampling",
                            help="keep generating past end-of-generation tokens")
    stop: list[str] = _opt(None, "--stop", metavar="TEXT", group="sampling", action="append",
                           help="stop when TEXT is generated (repeatable); the stop text is not returned")

    def __post_init__(self):
        if self.stop is None:
            self.stop = []
        if self.temp < 0:
            self.temp = 0.0
        for name in ("top_p", "min_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise PowerInferError(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
        if self.top_k < 0:
            raise PowerInferError(f"--top-k must be >= 0, got {self.top_k}")
        if self.repeat_penalty <= 0:
            raise PowerInferError(f"--repeat-penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise PowerInferError(f"--repeat-last-n must be >= -1 (-1 = context size), got {self.repeat_last_n}")


def field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def split_settings(kwargs: dict) -> tuple[ModelSettings, SamplingParams]:
    """Validate keyword settings (API) into the two dataclasses; unknown names are an error."""
    m_names, s_names = field_names(ModelSettings), field_names(SamplingParams)
    unknown = set(kwargs) - m_names - s_names
    if unknown:
        raise PowerInferError(f"unknown setting(s): {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(m_names | s_names))}")
    return (ModelSettings(**{k: v for k, v in kwargs.items() if k in m_names}),
            SamplingParams(**{k: v for k, v in kwargs.items() if k in s_names}))


def add_arguments(parser, cls, skip=()):
    """Add one argparse option per dataclass field, with its llama.cpp spelling and help."""
    for f in fields(cls):
        if f.name in skip or "flags" not in f.metadata:
            continue
        md = f.metadata
        default = None if f.default is MISSING else f.default
        kw = dict(dest=f.name, help=md["help"] + (f" (default: {default})" if default not in (None, [], False) else ""))
        if f.type in ("bool", bool):
            kw["action"] = "store_true"
        elif md.get("action") == "append":
            kw["action"] = "append"
            kw["metavar"] = md.get("metavar")
        else:
            kw["type"] = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            kw["metavar"] = md.get("metavar")
        kw["default"] = None  # None = "not given", so the dataclass default applies
        parser.add_argument(*md["flags"], **kw)


def from_namespace(cls, ns, **extra):
    """Build `cls` from parsed args, keeping dataclass defaults for flags that were not given."""
    names = field_names(cls)
    given = {k: v for k, v in vars(ns).items() if k in names and v is not None}
    given.update(extra)
    return cls(**given)
