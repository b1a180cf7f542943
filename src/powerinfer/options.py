"""The tools' own knobs: one small dataclass per subcommand, each field a flag declared with `settings.option`, so
`--help` text, metavars and defaults come from here (settings.py builds the parsers; cli.py lists the commands).

A flag that several subcommands share is one field, declared once in a one-field base class (`FileInput` for -f,
`OutputPath` for -o, ...) that their option classes inherit; `powerinfer prepare` reuses the fields of profile,
train-predictors and solve (their `commands` name it). Where one spelling means two things, it is two fields, and
tests/test_settings_schema.py names each such pair with its reason.

Each class checks its values in `__post_init__` with one-line errors that name the flag, like `ModelSettings`:
whatever can be checked from the values alone. Limits that come from the computation (solve's group size, the
model's context) are checked where it runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import PowerInferError
from .settings import ModelSettings, SamplingParams, SPARSE_METHODS, default_threads, option
from .options_llama import ChatOptions, LlamaCompatFlags

OUTTYPES = ("same", "f32", "f16", "q8_0", "q4_0")  # formats.powerinfer_gguf.OUTTYPES' names (the schema test)


# -- flags several subcommands share ------------------------------------------------------------------------------

@dataclass
class PromptInput:
    prompt: str | None = option(None, "-p", "--prompt", commands=("run", "tokenize"),
                                help="prompt text (tokenize: the text to tokenize)")


@dataclass
class FileInput:
    file: str | None = option(None, "-f", "--file", metavar="FILE", commands=("run", "tokenize", "perplexity"),
                              help="read the text from FILE (UTF-8): run's prompt, the text to tokenize, or the text "
                                   "perplexity scores (perplexity's default: the built-in evaluation text, "
                                   "pydoc_data.topics eval split)")


@dataclass
class TextChunks:
    # llama-perplexity's customary -c 512 (reference/baselines.md's numbers use it); calibration sees the contexts
    # PPL is scored in. run and solve's -c is the KV cache's context (ModelSettings.n_ctx).
    n_ctx: int = option(512, "-c", "--ctx-size", metavar="N", commands=("perplexity", "calibrate", "profile"),
                        help="tokens per chunk of text, each evaluated from an empty context (perplexity scores the "
                             "second half of each)")


@dataclass
class CalibrationText:
    text: list[str] | None = option(None, "--text", metavar="FILE", nargs="+",
                                    commands=("calibrate", "profile", "prepare"),
                                    help="UTF-8 calibration text(s), joined by blank lines (default: the built-in "
                                         "calibration text, pydoc_data.topics calib split)")


@dataclass
class OutputPath:
    output: str | None = option(None, "-o", "--output", metavar="PATH", required=("convert",),
                                commands=("run", "calibrate", "profile", "train-predictors", "solve", "convert"),
                                help="where to write the result: run --prompt-file-batch: the JSONL (default: "
                                     "stdout); calibrate: the thresholds JSON; profile: a directory; "
                                     "train-predictors: the predictor file; solve: the .gpuidx (its .placement.json "
                                     "goes beside it); convert: the PowerInfer GGUF. Default: under "
                                     "~/.cache/powerinfer/<fingerprint>/")


@dataclass
class JsonOutput:
    json: bool = option(False, "--json",
                        commands=("tokenize", "info", "perplexity", "compare-logits", "bench", "calibrate"),
                        help="print the result as JSON instead of text (tokenize: the ids, a list of lists with "
                             "--lines; perplexity: one object {ppl, ppl_err, n_tokens_scored, n_chunks, n_ctx, text, "
                             "seconds, ...}; bench: the schema in powerinfer.measure.bench's docstring)")


# -- run, tokenize, info ------------------------------------------------------------------------------------------

@dataclass
class RunOptions(PromptInput, FileInput, OutputPath):
    interactive: bool = option(False, "-i", "--interactive", commands=("run",),
                               help="after the output, read more text from stdin and continue (Ctrl-D to quit)")
    conversation: bool = option(False, "-cnv", "--conversation", commands=("run",),
                                help="chat using the model's chat template; -p, if given, is the first user message")
    system_prompt: str | None = option(None, "-sys", "--system-prompt", metavar="TEXT", commands=("run",),
                                       help="system message for -cnv")
    prompt_file_batch: str | None = option(None, "--prompt-file-batch", metavar="FILE", commands=("run",),
                                           help="generate for every non-empty line of FILE and write one JSON object "
                                                "per line (JSONL)")
    no_stats: bool = option(False, "--no-stats", commands=("run",),
                            help="do not print the timing line after the output")

    def __post_init__(self):
        if self.prompt is not None and self.file is not None:
            raise PowerInferError("give the prompt with -p or -f, not both")
        if self.prompt is None and self.file is None and not (self.prompt_file_batch or self.conversation
                                                              or self.interactive):
            raise PowerInferError("no prompt: give one with -p TEXT or -f FILE, or chat with -cnv / -i")


@dataclass
class TokenizeOptions(PromptInput, FileInput, JsonOutput):
    lines: bool = option(False, "--lines", commands=("tokenize",),
                         help="tokenize every line of the input separately")
    no_bos: bool = option(False, "--no-bos", commands=("tokenize",), help="never add a BOS token")
    no_parse_special: bool = option(False, "--no-parse-special", commands=("tokenize",),
                                    help="treat special-token text such as <|im_end|> as plain text")

    def __post_init__(self):
        if (self.prompt is None) == (self.file is None):
            raise PowerInferError("give the text with exactly one of -p TEXT or -f FILE")


@dataclass
class InfoOptions(JsonOutput):
    template: bool = option(False, "--template", commands=("info",), help="also print the chat template")


# -- measuring ----------------------------------------------------------------------------------------------------

@dataclass
class PerplexityOptions(FileInput, TextChunks, JsonOutput):
    chunks: int = option(-1, "--chunks", metavar="N", commands=("perplexity",),
                         help="score at most N chunks (-1 = every whole chunk of the text)")
    logits_out: str | None = option(None, "--logits-out", metavar="FILE.npy", commands=("perplexity",),
                                    help="save the scored positions' logits (float32 [n_scored, n_vocab]) to FILE.npy "
                                         "and their target ids to FILE.tokens.npy, for `powerinfer compare-logits`")

    def __post_init__(self):
        if self.n_ctx <= 0:
            raise PowerInferError(f"--ctx-size must be > 0, got {self.n_ctx}")
        if self.chunks == 0:
            raise PowerInferError("--chunks 0: nothing to score")


@dataclass
class CompareLogitsOptions(JsonOutput):
    a: str | None = option(None, "a", metavar="A.npy", commands=("compare-logits",),
                           help="reference logits file (its targets are read from A.tokens.npy)")
    b: str | None = option(None, "b", metavar="B.npy", commands=("compare-logits",),
                           help="logits file to compare against A (same shape and targets)")


def _int_list(flag: str, text: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise PowerInferError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise PowerInferError(f"{flag} expects non-negative integers, got {text!r}")
    return vals


@dataclass
class BenchOptions(JsonOutput):
    """llama-bench's flags. -p, -n and -t take lists (N[,N...]) here, so they are not run's -p/-n/-t; -s seeds the
    random token ids (0: the same ids every run), not sampling."""

    n_prompt: str = option("128", "-p", "--n-prompt", metavar="N[,N...]", commands=("bench",),
                           help="prompt lengths for the pp tests; 0 skips them")
    n_gen: str = option("128", "-n", "--n-gen", metavar="N[,N...]", commands=("bench",),
                        help="decode steps for the tg tests; 0 skips them")
    threads: str | None = option(None, "-t", "--threads", metavar="N[,N...]", commands=("bench",),
                                 help="thread counts to test (default: all available cores)")
    n_depth: str = option("0", "-d", "--n-depth", metavar="N[,N...]", commands=("bench",),
                          help="context depth (llama-bench -d): N tokens already in the KV cache before each test, "
                               "so pp and tg are measured at that depth; tests are named pp512 @ d4096")
    repetitions: int = option(5, "-r", "--repetitions", metavar="N", commands=("bench",),
                              help="timed repetitions per test")
    no_warmup: bool = option(False, "--no-warmup", commands=("bench",), help="skip the untimed warm-up repetition")
    seed: int = option(0, "-s", "--seed", metavar="N", commands=("bench",),
                       help="seed of the random token ids (default: 0, the same ids every run)")
    profile: bool = option(False, "--profile", commands=("bench",),
                           help="after each tg test, one more untimed repetition with the decoder's per-phase "
                                "profiler; prints ms per token by phase")
    # The lists the flags hold, parsed once.
    prompt_lengths: list[int] = field(init=False, repr=False, default_factory=list)
    gen_lengths: list[int] = field(init=False, repr=False, default_factory=list)
    thread_counts: list[int] = field(init=False, repr=False, default_factory=list)
    depths: list[int] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self):
        self.prompt_lengths = [n for n in _int_list("-p/--n-prompt", self.n_prompt) if n > 0]
        self.gen_lengths = [n for n in _int_list("-n/--n-gen", self.n_gen) if n > 0]
        self.thread_counts = _int_list("-t/--threads", self.threads) if self.threads else [default_threads()]
        self.depths = _int_list("-d/--n-depth", self.n_depth)
        if any(t == 0 for t in self.thread_counts):
            raise PowerInferError("-t/--threads values must be >= 1")
        if self.repetitions < 1:
            raise PowerInferError(f"-r/--repetitions must be >= 1, got {self.repetitions}")
        if not self.prompt_lengths and not self.gen_lengths:
            raise PowerInferError("nothing to run: -p and -n are both 0")


# -- the offline pipeline -----------------------------------------------------------------------------------------

def parse_target(text, method: str) -> float | dict[str, float]:
    """--target-sparsity: "S" for every site, or "SX,SH" for teal-hu's input and neuron sites."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise PowerInferError(f"--target-sparsity: expected a number such as 0.5 (or SX,SH for teal-hu), "
                              f"got {text!r}") from None
    if not all(0 <= v < 1 for v in values):
        raise PowerInferError(f"--target-sparsity must be in [0, 1), got {text}")
    if len(values) == 1:
        return values[0]
    if method != "teal-hu" or len(values) != 2:
        raise PowerInferError(f"--target-sparsity {text}: two values (input site, neuron site) need --method teal-hu")
    return {"x": values[0], "h": values[1]}


def parse_fraction(text) -> float:
    """--max-ppl-increase: '0.03' or '3%' -> 0.03; a bare number above 1 is refused as ambiguous."""
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise PowerInferError(f"--max-ppl-increase: expected a fraction such as 0.03 or a percentage such as 3%, "
                              f"got {text!r}") from None
    if not t.endswith("%") and v > 1:
        raise PowerInferError(f"--max-ppl-increase {text}: a fraction (0.03) or a percentage with % (3%)")
    if v < 0:
        raise PowerInferError(f"--max-ppl-increase must be >= 0, got {text}")
    return v


@dataclass
class CalibrateOptions(CalibrationText, TextChunks, OutputPath, JsonOutput):
    """What `powerinfer calibrate` does; also what `--sparsity S` calibrates with on first use (its defaults)."""

    # Not profile's --target-sparsity: here the goal of the calibration, "S" or "SX,SH", one of two goals.
    target_sparsity: str | None = option(None, "--target-sparsity", metavar="S", commands=("calibrate",),
                                         one_of="goal",
                                         help="fraction of entries to skip per layer, e.g. 0.5; for teal-hu also "
                                              "SX,SH (input site, neuron site), e.g. 0.2,0.4")
    max_ppl_increase: str | None = option(None, "--max-ppl-increase", metavar="P", commands=("calibrate",),
                                          one_of="goal",
                                          help="largest S whose PPL is at most (1+P) x dense PPL; P as 0.03 or 3%%. "
                                               "For teal-hu S is the neuron site's sparsity, the input site's is S/2")
    method: str = option("hu", "--method", commands=("calibrate",), choices=SPARSE_METHODS,
                         help="hu: |act(gate)*up| per neuron, skips down rows; teal: |x| per FFN input channel, "
                              "skips gate/up columns; teal-hu: both")
    # 16 chunks of 512; quantiles over 8192 x 1536 entries per layer are stable to < 0.001. Not profile's --tokens.
    tokens: int = option(8192, "--tokens", metavar="N", commands=("calibrate",),
                         help="calibrate on the first N tokens of the text")
    eval_file: str | None = option(None, "--eval-file", metavar="FILE", commands=("calibrate",),
                                   help="evaluation text for --max-ppl-increase / --eval-ppl (default: the built-in "
                                        "evaluation text, pydoc_data.topics eval split, disjoint from the calibration "
                                        "text)")
    # 8 chunks of 512 = 2048 scored predictions per probe.
    eval_tokens: int = option(4096, "--eval-tokens", metavar="N", commands=("calibrate",),
                              help="score the first N tokens of the evaluation text, in -c chunks")
    eval_ppl: bool = option(False, "--eval-ppl", commands=("calibrate",),
                            help="with --target-sparsity: also measure PPL against dense on the evaluation text")
    cache_dir: str | None = option(None, "--cache-dir", metavar="DIR", commands=("calibrate",),
                                   help="root of the default artifact path (default: ~/.cache/powerinfer)")
    # The goal, parsed: the per-site target (float, or {site: S} for teal-hu) or the PPL bound.
    target: float | dict[str, float] | None = field(init=False, default=None, repr=False)
    max_increase: float | None = field(init=False, default=None, repr=False)

    def __post_init__(self):
        if self.n_ctx < 3:
            raise PowerInferError(f"--ctx-size must be >= 3, got {self.n_ctx}")
        if self.tokens <= 0:
            raise PowerInferError(f"--tokens must be > 0, got {self.tokens}")
        if (self.target_sparsity is None) == (self.max_ppl_increase is None):
            raise PowerInferError("give one goal: --target-sparsity S or --max-ppl-increase P")
        if self.target_sparsity is not None:
            self.target = parse_target(self.target_sparsity, self.method)
        else:
            self.max_increase = parse_fraction(self.max_ppl_increase)
        if self.evaluate and self.eval_tokens < self.n_ctx:
            raise PowerInferError(f"--eval-tokens {self.eval_tokens} is less than one chunk of -c {self.n_ctx}")

    @property
    def evaluate(self) -> bool:
        """Whether PPL is measured on the evaluation text (the search, or --eval-ppl)."""
        return self.max_increase is not None or self.eval_ppl


@dataclass
class ProfileOptions(CalibrationText, TextChunks, OutputPath):
    tokens: int = option(16384, "--tokens", metavar="N", commands=("profile", "prepare"),
                         help="profile the first N tokens")
    # Not calibrate's --target-sparsity: here which cached (or now calibrated) hu thresholds define firing.
    target_sparsity: float = option(0.5, "--target-sparsity", metavar="S", commands=("profile", "prepare"),
                                    help="SwiGLU models: the thresholds (hu at S) that define firing; calibrated if "
                                         "not cached")

    def __post_init__(self):
        if self.tokens <= 0 or self.n_ctx < 3:
            raise PowerInferError("--tokens must be > 0 and --ctx-size >= 3")
        if not 0 <= self.target_sparsity < 1:
            raise PowerInferError(f"--target-sparsity must be in [0, 1), got {self.target_sparsity}")


@dataclass
class TrainOptions(OutputPath):
    profile: str | None = option(None, "--profile", metavar="DIR", commands=("train-predictors",),
                                 help="profile directory (default: the model's cached profile)")
    recall: float = option(0.95, "--recall", commands=("train-predictors", "prepare"),
                           help="held-out recall target per layer")
    # The paper's bound on the predictors' total size (reference/powerinfer.md 4).
    budget: float = option(0.10, "--budget", commands=("train-predictors", "prepare"),
                           help="largest total predictor size, as a fraction of the model's parameters")
    epochs: int = option(12, "--epochs", commands=("train-predictors", "prepare"),
                         help="training epochs per rank")

    def __post_init__(self):
        if not 0 < self.recall <= 1 or not 0 < self.budget <= 1 or self.epochs < 1:
            raise PowerInferError("--recall and --budget must be in (0, 1], --epochs >= 1")


@dataclass
class SolveOptions(OutputPath):
    activation: str | None = option(None, "--activation", metavar="DIR", commands=("solve",),
                                    help="directory of activation_N.pt (default: the model's cached profile, "
                                         "~/.cache/powerinfer/<fingerprint>/profile/activation)")
    gpu_bandwidth: float | None = option(None, "--gpu-bandwidth", metavar="GB/s", commands=("solve", "prepare"),
                                         help="fast-tier read bandwidth (default: measured on CUDA, else 900)")
    cpu_bandwidth: float | None = option(None, "--cpu-bandwidth", metavar="GB/s", commands=("solve", "prepare"),
                                         help="slow-tier read bandwidth (default: measured)")
    predictor_bytes: int | None = option(None, "--predictor-bytes", metavar="N", commands=("solve",),
                                         help="bytes of predictors to place (default: the model file's fc1/fc2, else "
                                              "the cached predictors of `powerinfer train-predictors` as f16, else "
                                              "none)")
    # upstream's CUDA transpose-GEMM needs multiples of 32 neurons per layer
    align: int = option(32, "--align", metavar="N", commands=("solve", "prepare"),
                        help="place neurons in groups of N (a divisor of 256; 32: upstream's CUDA path needs "
                             "multiples of 32 per layer; 1 = finest)")

    def __post_init__(self):
        for name in ("gpu_bandwidth", "cpu_bandwidth"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise PowerInferError(f"--{name.replace('_', '-')} must be > 0 GB/s, got {v}")


@dataclass
class ConvertOptions(OutputPath):
    outtype: str = option("same", "--outtype", commands=("convert",), choices=OUTTYPES,
                          help="2-D weight format: same keeps each tensor's (down_t: exact for floats, Q8_0 for block "
                               "formats); f32 | f16 | q8_0 | q4_0 convert every matrix")


@dataclass
class PrepareOptions:
    """prepare's own flag; the rest are profile's, train-predictors' and solve's fields."""

    force: bool = option(False, "--force", commands=("prepare",), help="redo every step")


# -- serving ------------------------------------------------------------------------------------------------------

@dataclass
class ServeOptions:
    """llama-server's spellings where it has the flag (--host, --port, --api-key, -a/--alias, -to/--timeout,
    --no-webui, --sse-ping-interval); --max-queue is Ollama's OLLAMA_MAX_QUEUE."""

    host: str = option("127.0.0.1", "--host", metavar="ADDR", commands=("serve",),
                       help="address to listen on; anything but loopback lets other machines connect (set --api-key)")
    port: int = option(8080, "--port", metavar="N", commands=("serve",),
                       help="TCP port (0 = any free port; the address is printed at start)")
    api_key: str | None = option(None, "--api-key", metavar="KEY", commands=("serve",),
                                 help="require `Authorization: Bearer KEY` (or `X-Api-Key: KEY`) on every route but "
                                      "/health, /v1/models and the chat page (default: $POWERINFER_API_KEY, else "
                                      "no key)")
    alias: str | None = option(None, "-a", "--alias", metavar="NAME", commands=("serve",),
                               help="model name in responses and /v1/models (default: the model file's name)")
    max_queue: int = option(64, "--max-queue", metavar="N", commands=("serve",),
                            help="requests that may wait while one generates; more are refused with 503 and "
                                 "retry-after")
    timeout: float = option(600.0, "-to", "--timeout", metavar="SEC", commands=("serve",),
                            help="seconds a client may take to send its request")
    sse_ping_interval: float = option(30.0, "--sse-ping-interval", metavar="SEC", commands=("serve",),
                                      help="send an SSE comment line after SEC seconds without a token, so proxies "
                                           "and clients keep a stream open through a long prompt (0 = never)")
    no_webui: bool = option(False, "--no-webui", commands=("serve",), help="do not serve the chat page at /")

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise PowerInferError(f"--port must be in 0..65535, got {self.port}")
        if self.max_queue < 0:
            raise PowerInferError(f"--max-queue must be >= 0, got {self.max_queue}")
        if not self.timeout > 0:
            raise PowerInferError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.sse_ping_interval < 0:
            raise PowerInferError(f"--sse-ping-interval must be >= 0, got {self.sse_ping_interval}")


# Every dataclass whose fields are flags, in the order their flags appear in --help.
SCHEMA = (ModelSettings, PromptInput, FileInput, TextChunks, CalibrationText, RunOptions, TokenizeOptions, InfoOptions,
          PerplexityOptions, CompareLogitsOptions, BenchOptions, CalibrateOptions, ProfileOptions, TrainOptions,
          SolveOptions, ConvertOptions, PrepareOptions, ServeOptions, OutputPath, JsonOutput, SamplingParams, ChatOptions,
          LlamaCompatFlags)
