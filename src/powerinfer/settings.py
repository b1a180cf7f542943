"""One settings schema (STYLE 6): the same fields drive CLI flags (llama.cpp spellings) and the Python API.

Every flag of every subcommand is a dataclass field made with `option()`: its metadata carries the flags, the
help text, the metavar and `commands`, the subcommands it applies to (llama.cpp's common/arg.cpp does the same
with `set_examples`). `add_command_arguments` builds a subcommand's argparse options from those fields, so one
flag spelling has one definition, one default and one help text wherever it appears. This module holds the
machinery and the two settings an `LLM` is made from (`ModelSettings`, `SamplingParams`); the tools' own knobs
are the option dataclasses of options.py. `powerinfer.load(path, **settings)` validates keyword names against
the same fields. Defaults follow llama.cpp's `llama-cli` (sampling: temp 0.8, top-k 40, top-p 0.95, min-p 0.05,
no repeat penalty).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, dataclass, field, fields

from .errors import PowerInferError


DEFAULT_SPARSE_METHOD = "hu"
SPARSE_METHODS = ("hu", "teal", "teal-hu")  # sparse.artifacts.METHODS' names (tests/test_settings_schema.py)

# Subcommands that load a model (all but compare-logits).
LOADS_MODEL = ("run", "tokenize", "info", "perplexity", "bench", "calibrate", "profile", "train-predictors", "solve",
               "convert", "prepare", "serve")
GENERATES = ("run", "serve")  # subcommands that generate text: the sampling flags


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


def option(default, *flags, help: str, commands: tuple[str, ...], metavar: str | None = None,
           group: str | None = None, required: tuple[str, ...] = (), one_of: str | None = None, **argparse_kw):
    """A dataclass field that is also a command-line flag.

    flags: the spellings ("-m", "--model"; one name without dashes makes a positional argument);
    commands: the subcommands that have the flag; required: those of them where it must be given;
    one_of: a name shared by fields of which a command needs exactly one (an argparse mutually exclusive group);
    group: a help section title; argparse_kw: action="append", nargs, choices or type where the annotation is
    not enough."""
    return field(default=default, metadata=dict(flags=flags, help=help, commands=tuple(commands), metavar=metavar,
                                                group=group, required=tuple(required), one_of=one_of,
                                                argparse=argparse_kw))


MAX_THREADS = 4096  # past this a -t value is a typo (2^31 ended in an OverflowError); the C pool caps at 64


def default_threads() -> int:
    # llama.cpp defaults to the number of physical cores; os.cpu_count() counts logical CPUs, and on SMT
    # machines half of them is the better guess (the second hyper-thread adds little to a memory-bound decode).
    n = os.cpu_count() or 1
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    return max(1, n)


# KV cache data types (-ctk/-ctv): what the attention kernels read, of llama.cpp's list (common/arg.cpp
# kv_cache_types: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1).
KV_CACHE_TYPES = ("f32", "f16", "q8_0")
_LLAMA_KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


def parse_cache_type(text, flag: str) -> str:
    """-ctk/-ctv: one of KV_CACHE_TYPES (case-insensitive, as llama.cpp compares ggml type names)."""
    t = str(text).strip().lower()
    if t in KV_CACHE_TYPES:
        return t
    if t in _LLAMA_KV_CACHE_TYPES:
        raise PowerInferError(f"{flag} {text}: not supported by these attention kernels (use {', '.join(KV_CACHE_TYPES)})")
    raise PowerInferError(f"{flag}: unknown cache type {text!r} (allowed: {', '.join(KV_CACHE_TYPES)})")


# Subcommands that run or place a model on tiers.
PLACES = ("run", "perplexity", "bench", "solve", "prepare", "serve")


@dataclass
class PlacementSettings:
    """Where weights live (DESIGN, "Tiers and placement"): the fast tier's budget and device, and upstream
    PowerInfer's switches for its placement file (<model>.generated.gpuidx, reference/powerinfer.md 2.6-2.7)."""

    vram_budget: float | None = option(None, "--vram-budget", metavar="GiB", commands=PLACES, required=("solve",),
                                       help="fast-tier (GPU) budget in GiB: attention, its KV cache, norms, "
                                            "predictors and the output head go there first, then the most often "
                                            "firing FFN neurons; the rest run on the CPU (default: free CUDA memory "
                                            "minus 256 MiB when CUDA is present, else none)")
    ram_budget: float | None = option(None, "--ram-budget", metavar="GiB",
                                      commands=("run", "perplexity", "bench", "serve"),
                                      help="RAM budget in GiB for models larger than memory: attention, norms, the "
                                           "output head, predictors, the KV cache and the activity test's inputs "
                                           "stay resident, then a neuron cache and the most often firing FFN "
                                           "neurons; the other neurons are read from a neuron-bundle file when "
                                           "they fire (default: everything in RAM)")
    hot_device: str | None = option(None, "--hot-device", metavar="DEVICE", commands=PLACES,
                                    help="torch device of the fast tier (default: cuda when present); `cpu` runs "
                                         "the same hybrid code with the fast tier on the CPU")
    reset_gpu_index: bool = option(False, "--reset-gpu-index", commands=PLACES,
                                   help="solve the placement again even if a cached one is up to date")
    disable_gpu_index: bool = option(False, "--disable-gpu-index", commands=PLACES,
                                     help="place no FFN neurons on the fast tier (dense parts still go there); "
                                          "no placement file is read or written")

    def __post_init__(self):
        if self.vram_budget is not None and not (math.isfinite(self.vram_budget) and self.vram_budget >= 0):
            raise PowerInferError(f"--vram-budget must be a finite number of GiB >= 0, got {self.vram_budget}")
        if self.ram_budget is not None and not (math.isfinite(self.ram_budget) and self.ram_budget > 0):
            raise PowerInferError(f"--ram-budget must be a finite number of GiB > 0, got {self.ram_budget}")
        if self.hot_device is not None:
            self.hot_device = self.hot_device.strip().lower()
            if not self.hot_device.split(":")[0] in ("cpu", "cuda"):
                raise PowerInferError(f"--hot-device: expected cpu, cuda or cuda:N, got {self.hot_device!r}")


@dataclass
class ModelSettings(PlacementSettings):
    """How the model is loaded and run (fixed for the lifetime of an `LLM`)."""

    model: str | None = option(None, "-m", "--model", metavar="PATH", commands=LOADS_MODEL,
                               help="GGUF file or HF model directory (default: the bundled SmolLM2-135M-Instruct "
                                    "Q4_1)")
    # perplexity, calibrate and profile have their own -c: text chunks of 512 (options.TextChunks).
    n_ctx: int = option(4096, "-c", "--ctx-size", metavar="N", commands=("run", "solve", "prepare", "serve"),
                        help="context size in tokens (0 = the model's trained context); the KV cache is allocated "
                             "for it")
    # bench has its own -t: a list of thread counts to test (options.BenchOptions).
    n_threads: int = option(0, "-t", "--threads", metavar="N",
                            commands=("run", "perplexity", "calibrate", "profile", "train-predictors", "prepare",
                                      "serve"),
                            help="CPU threads (default: all available cores)")
    n_batch: int = option(512, "-b", "--batch-size", metavar="N", commands=("run", "perplexity", "bench", "serve"),
                          help="prompt tokens processed per prefill call")
    cache_type_k: str = option("f16", "-ctk", "--cache-type-k", metavar="TYPE",
                               commands=("run", "perplexity", "bench", "serve"),
                               help="KV cache data type for K: f32, f16 (default) or q8_0 (32-value blocks with an f16 "
                                    "scale, 0.53x f16's bytes; q is quantized to q8_0 for q.K, as llama.cpp does)")
    cache_type_v: str = option("f16", "-ctv", "--cache-type-v", metavar="TYPE",
                               commands=("run", "perplexity", "bench", "serve"),
                               help="KV cache data type for V: f32, f16 (default) or q8_0 (rows dequantized for the "
                                    "product with unrounded f32 probabilities, as llama.cpp's flash attention, which "
                                    "it requires for a quantized V; no -fa needed here)")
    sparsity: str = option("auto", "--sparsity", metavar="auto|off|S",
                           commands=("run", "perplexity", "bench", "serve"),
                           help="neuron-sparse FFN: off = dense; auto (default) = the fastest measured setting "
                                "within 3%% perplexity (exact skipping of zero activations on ReLU-family models, "
                                "with a PowerInfer GGUF's own predictors as upstream does; dense on SwiGLU models); "
                                "S in (0,1) = skip that fraction of FFN neurons per layer with "
                                "thresholds calibrated on first use (about a minute for small models) and cached")
    sparse_method: str = option(DEFAULT_SPARSE_METHOD, "--sparse-method", metavar="NAME",
                                commands=("run", "perplexity", "bench", "serve"),
                                help="threshold criterion for SwiGLU models: hu = |act(gate)*up| per neuron, "
                                     "teal = |x| per FFN input channel, teal-hu = both")
    predictors: str | None = option(None, "--predictors", metavar="FILE",
                                    commands=("run", "perplexity", "bench", "convert", "serve"),
                                    help="activation predictors, a file from `powerinfer train-predictors`: for the "
                                         "sparse FFN (PowerInfer GGUF files use their own by default); for convert, "
                                         "the ones to embed, also an upstream directory of model_N.pt (default: the "
                                         "model's cached predictors if any, else none)")
    verbose: bool = option(False, "-v", "--verbose", "--log-verbose", commands=GENERATES,
                           help="print load details and per-layer FFN sparsity / bytes read after generation")
    allow_non_finite: bool = option(False, "--allow-non-finite", commands=("run", "perplexity", "serve"),
                                    help="load and run a model whose weights hold NaN/inf or whose logits overflow "
                                         "(refused by default: the file is corrupt); NaN logits are never sampled")

    def __post_init__(self):
        super().__post_init__()
        if self.n_threads <= 0:
            self.n_threads = default_threads()
        if self.n_threads > MAX_THREADS:
            raise PowerInferError(f"--threads {self.n_threads}: at most {MAX_THREADS} (the decoder uses up to 64)")
        if self.n_ctx < 0:
            raise PowerInferError(f"--ctx-size must be >= 0, got {self.n_ctx}")
        self.sparsity = parse_sparsity(self.sparsity)
        self.cache_type_k = parse_cache_type(self.cache_type_k, "--cache-type-k")
        self.cache_type_v = parse_cache_type(self.cache_type_v, "--cache-type-v")
        if self.n_batch <= 0:
            raise PowerInferError(f"--batch-size must be > 0, got {self.n_batch}")


def _sampling(default, *flags, **kw):
    return option(default, *flags, commands=GENERATES, group="sampling", **kw)


@dataclass
class SamplingParams:
    """Per-request generation settings."""

    n_predict: int = _sampling(-1, "-n", "--predict", "--n-predict", metavar="N",
                               help="tokens to generate (-1 = until end-of-generation or the context is full)")
    temp: float = _sampling(0.8, "--temp", metavar="T", help="temperature; 0 = greedy (always the most likely token)")
    top_k: int = _sampling(40, "--top-k", metavar="K", help="keep only the K most likely tokens (0 = off)")
    top_p: float = _sampling(0.95, "--top-p", metavar="P",
                             help="nucleus sampling: keep the smallest set with cumulative probability >= P "
                                  "(1.0 = off)")
    min_p: float = _sampling(0.05, "--min-p", metavar="P",
                             help="drop tokens with probability < P times the top token's (0 = off)")
    repeat_penalty: float = _sampling(1.0, "--repeat-penalty", metavar="X",
                                      help="penalise tokens seen in the last --repeat-last-n tokens (1.0 = off)")
    repeat_last_n: int = _sampling(64, "--repeat-last-n", metavar="N",
                                   help="window for the repeat/presence/frequency penalties (0 = off, -1 = context "
                                        "size)")
    presence_penalty: float = _sampling(0.0, "--presence-penalty", metavar="X",
                                        help="subtract X from the logit of every token present in the window "
                                             "(0 = off)")
    frequency_penalty: float = _sampling(0.0, "--frequency-penalty", metavar="X",
                                         help="subtract X times its count in the window from a token's logit "
                                              "(0 = off)")
    # bench has its own -s: the seed of its random token ids (options.BenchOptions).
    seed: int = _sampling(-1, "-s", "--seed", metavar="N", help="random seed (-1 = a random seed)")
    ignore_eos: bool = _sampling(False, "--ignore-eos", help="keep generating past end-of-generation tokens")
    stop: list[str] = _sampling(None, "--stop", metavar="TEXT", action="append",
                                help="stop when TEXT is generated (repeatable); the stop text is not returned")
    # Structured output (runtime/constrain.py): the sampler only sees tokens the grammar allows.
    grammar: str | None = _sampling(None, "--grammar", metavar="GBNF",
                                    help="constrain the output to a GBNF grammar (llama.cpp's format, e.g. "
                                         "'root ::= \"yes\" | \"no\"')")
    json_schema: str | dict | None = _sampling(None, "-j", "--json-schema", metavar="SCHEMA",
                                               help="constrain the output to JSON valid under this JSON Schema "
                                                    "(e.g. '{}' for any JSON object)")

    def __post_init__(self):
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):  # one stop string, not its characters
            self.stop = [self.stop]
        if not all(isinstance(t, str) for t in self.stop):
            raise PowerInferError(f"stop: expected a string or a list of strings, got {self.stop!r}")
        for name in ("temp", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):  # NaN passes every comparison below
                raise PowerInferError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if self.grammar is not None and self.json_schema is not None:
            raise PowerInferError("give --grammar or --json-schema, not both")
        if isinstance(self.json_schema, str):
            try:
                self.json_schema = json.loads(self.json_schema)
            except ValueError as e:
                raise PowerInferError(f"--json-schema: not JSON ({e})") from None
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, bool)):
            raise PowerInferError(f"--json-schema: expected a JSON object, got {self.json_schema!r}")
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


# -- argparse from the schema --------------------------------------------------------------------------------

_SCALARS = {"int": int, "float": float}


def _value_type(f):
    """int or float from the annotation ("int", "float | None"), else str."""
    names = f.type.replace(" ", "").split("|") if isinstance(f.type, str) else [f.type.__name__]
    return next((_SCALARS[n] for n in names if n in _SCALARS), str)


def _argparse_kwargs(f, command: str) -> dict:
    md = f.metadata
    default = None if f.default is MISSING else f.default
    # The default is shown unless it means "nothing" (None, an off switch, 0, an empty list).
    kw = dict(help=md["help"] + (f" (default: {default})" if default not in (None, [], False) else ""),
              **md["argparse"])
    positional = not md["flags"][0].startswith("-")
    if f.type in ("bool", bool):
        kw["action"] = "store_true"
    else:
        kw["metavar"] = md["metavar"]
        if kw.get("action") != "append" and "type" not in kw:
            kw["type"] = _value_type(f)
    if not positional:
        kw["dest"] = f.name
        kw["default"] = None  # None = "not given", so the dataclass default applies (from_namespace)
        if command in md["required"]:
            kw["required"] = True
    return kw


def add_command_arguments(parser, command: str, schema) -> None:
    """Add to `parser` every field of the `schema` dataclasses whose `commands` include `command`, once each (an
    inherited field is the same field), in schema order. Each argparse action keeps its field as `schema_field`,
    which is how tests check that a flag spelling has one definition."""
    seen, dests, sections, exclusive = set(), {}, {}, {}
    for cls in schema:
        for f in fields(cls):
            md = f.metadata
            if "flags" not in md or command not in md["commands"] or id(f) in seen:
                continue
            seen.add(id(f))
            if f.name in dests:  # one namespace per command: two fields of one name would overwrite each other
                raise ValueError(f"{command}: {cls.__name__}.{f.name} and {dests[f.name]}.{f.name} share a name")
            dests[f.name] = cls.__name__
            where = parser
            if md["one_of"]:
                if md["one_of"] not in exclusive:
                    exclusive[md["one_of"]] = parser.add_mutually_exclusive_group(required=True)
                where = exclusive[md["one_of"]]
            elif md["group"]:
                if md["group"] not in sections:
                    sections[md["group"]] = parser.add_argument_group(md["group"])
                where = sections[md["group"]]
            action = where.add_argument(*md["flags"], **_argparse_kwargs(f, command))
            action.schema_field = f


def schema_commands(schema) -> set[str]:
    """Every subcommand some field of `schema` names."""
    return {c for cls in schema for f in fields(cls) if "flags" in f.metadata for c in f.metadata["commands"]}


def from_namespace(cls, ns, **extra):
    """Build `cls` from parsed args, keeping dataclass defaults for flags that were not given. With `ns.command`
    set (a subcommand's namespace), only the fields that are that subcommand's flags are read: -c on prepare is
    ModelSettings.n_ctx, not the text chunks of ProfileOptions."""
    command = getattr(ns, "command", None)
    names = {f.name for f in fields(cls) if f.init and (command is None or command in f.metadata.get("commands", ()))}
    given = {k: v for k, v in vars(ns).items() if k in names and v is not None}
    given.update(extra)
    return cls(**given)
