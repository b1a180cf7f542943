"""The rest of llama-cli's flags, so a llama-cli command line runs unchanged (docs/llama-cli-flags.md is the table).

Three kinds, each a schema field of `powerinfer run` (settings.option, like every flag):
  ChatOptions        flags that do what llama-cli does here: the interactive session (commands/chat.py), prompt
                     escapes, display, chat templates, grammar files;
  LlamaCompatFlags   flags that are accepted and have no effect here: `NOTES` says why, in the one line printed
                     when one is given (and nothing when the value is llama-cli's neutral one, e.g. --mirostat 0);
                     flags that would change the model itself (LoRA, control vectors, hub downloads) are refused
                     with one line instead (`REFUSED`), since ignoring them would give the user another model.
llama-cli's multi-letter short flags (-ngl, -fa, -ctk, -no-cnv, ...) are registered as option strings of their own,
so argparse matches them whole: unregistered, `-ngl 99` would parse as `-n gl`. Spellings and defaults follow
llama.cpp's common/arg.cpp.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, fields

from .errors import PowerInferError
from .settings import option

RUN = ("run",)


def _run(default, *flags, **kw):
    return option(default, *flags, commands=RUN, group="llama-cli compatibility", **kw)


@dataclass
class ChatOptions:
    """Interactive session, display and input knobs of llama-cli that act here."""

    interactive_first: bool = option(False, "-if", "--interactive-first", commands=RUN,
                                     help="interactive mode that waits for your input before generating")
    single_turn: bool = option(False, "-st", "--single-turn", commands=RUN,
                               help="-cnv: answer the first message (-p) and exit")
    no_conversation: bool = option(False, "-no-cnv", "--no-conversation", commands=RUN,
                                   help="plain completion of the prompt (already the default here: chat needs -cnv)")
    reverse_prompt: list[str] | None = option(None, "-r", "--reverse-prompt", metavar="TEXT", action="append",
                                              commands=RUN,
                                              help="-i: hand control back to you when TEXT is generated "
                                                   "(repeatable); -cnv: end the reply there")
    in_prefix: str = option("", "--in-prefix", metavar="TEXT", commands=RUN,
                            help="-i: text put before each of your inputs (shown and given to the model)")
    in_suffix: str = option("", "--in-suffix", metavar="TEXT", commands=RUN,
                            help="-i: text put after each of your inputs (shown and given to the model)")
    in_prefix_bos: bool = option(False, "--in-prefix-bos", commands=RUN,
                                 help="-i: start each of your inputs with the BOS token")
    multiline_input: bool = option(False, "-mli", "--multiline-input", commands=RUN,
                                   help="each input goes on until a line that ends with '/' (without: a line "
                                        "that ends with '\\' continues on the next)")
    keep: int = option(0, "--keep", metavar="N", commands=RUN,
                       help="tokens of the start of the context kept when a full context is shifted (-1 = the "
                            "whole initial prompt; a BOS token is kept too)")
    context_shift: bool = option(False, "--context-shift", commands=RUN,
                                 help="when the context is full, drop the older half (after --keep) and go on; "
                                      "on by default in -i and -cnv, where a single prompt stops instead")
    no_context_shift: bool = option(False, "--no-context-shift", commands=RUN,
                                    help="-i/-cnv: end the reply when the context is full instead of shifting it")
    escape: bool = option(False, "-e", "--escape", commands=RUN,
                          help="process escapes (\\n, \\t, \\', \\\", \\\\, \\xNN) in -p, -r, --in-prefix, "
                               "--in-suffix and -sys (the default, as llama-cli)")
    no_escape: bool = option(False, "--no-escape", commands=RUN, help="take -p and the others literally")
    color: str | None = option(None, "-co", "--color", metavar="on|off|auto", nargs="?", const="on",
                               choices=("on", "off", "auto"), commands=RUN,
                               help="colour the prompt and your input apart from the model's text (auto: when "
                                    "stdout is a terminal)")
    no_display_prompt: bool = option(False, "--no-display-prompt", commands=RUN,
                                     help="do not print the prompt before the generated text")
    verbose_prompt: bool = option(False, "--verbose-prompt", commands=RUN,
                                  help="print the prompt's tokens (id -> text) before generating")
    special: bool = option(False, "-sp", "--special", commands=RUN,
                           help="print special tokens (e.g. <|im_end|>) in the output")
    chat_template: str | None = option(None, "--chat-template", metavar="JINJA|chatml", commands=RUN,
                                       help="-cnv: this chat template instead of the model's (Jinja text, or "
                                            "'chatml')")
    chat_template_file: str | None = option(None, "--chat-template-file", metavar="FILE", commands=RUN,
                                            help="-cnv: the chat template from a Jinja file")
    system_prompt_file: str | None = option(None, "-sysf", "--system-prompt-file", metavar="FILE", commands=RUN,
                                            help="-cnv: the system message from a file")
    binary_file: str | None = option(None, "-bf", "--binary-file", metavar="FILE", commands=RUN,
                                     help="the prompt from a file, taken byte for byte (invalid UTF-8 becomes "
                                          "U+FFFD)")
    grammar_file: str | None = option(None, "--grammar-file", metavar="FILE", commands=RUN,
                                      help="--grammar from a file (GBNF)")
    json_schema_file: str | None = option(None, "-jf", "--json-schema-file", metavar="FILE", commands=RUN,
                                          help="--json-schema from a file")
    log_disable: bool = option(False, "--log-disable", commands=RUN,
                               help="print only the generated text: no notes, no timing line")
    version: bool = option(False, "--version", commands=RUN, help="print the version and exit")
    list_devices: bool = option(False, "--list-devices", commands=RUN,
                                help="print the devices a fast tier could use and exit")

    def __post_init__(self):
        if self.keep < -1:
            raise PowerInferError(f"--keep must be >= -1 (-1 = the whole prompt), got {self.keep}")
        if self.context_shift and self.no_context_shift:
            raise PowerInferError("give --context-shift or --no-context-shift, not both")
        if self.chat_template is not None and self.chat_template_file is not None:
            raise PowerInferError("give --chat-template or --chat-template-file, not both")

    @property
    def escapes(self) -> bool:
        return not self.no_escape


# -- accepted with a note ----------------------------------------------------------------------------------------

def _note(default, *flags, metavar="X", **kw):
    return _run(default, *flags, metavar=metavar, help="llama-cli's; accepted, no effect here (see "
                "docs/llama-cli-flags.md)", **kw)


def _refused(*flags, metavar="X", **kw):
    return _run(None, *flags, metavar=metavar, help="llama-cli's; refused here with the reason (see "
                "docs/llama-cli-flags.md)", **kw)


def _switch(*flags):
    return _run(False, *flags, help="llama-cli's; accepted, no effect here (see docs/llama-cli-flags.md)")


_CPU = "the C decoder runs on -t threads and reads the weights as loaded"
_SAMPLER = ("not implemented here: sampling is penalties -> top-k -> top-p -> min-p -> temperature (llama.cpp's "
            "default chain)")

# field -> (values that mean "off" in llama-cli, so no note is needed, why it has no effect here)
NOTES: dict[str, tuple[tuple, str]] = {
    # -ngl 0 is not "off" but acts: it means --vram-budget 0 (commands/run.py), so it gets no note either
    "n_gpu_layers": (("0",), "the GPU gets what --vram-budget allows, attention first and then the most often "
                             "firing FFN neurons (upstream PowerInfer's rule), not whole layers; -ngl 0 means "
                             "--vram-budget 0"),
    "flash_attn": (("off",), "attention is one fused C kernel per layer here; there is no other kernel to pick"),
    "no_kv_offload": ((), "the KV cache lives on the fast tier only when --vram-budget places attention there"),
    "mlock": ((), "the weights stay mapped from the file; the OS keeps what decoding reads resident"),
    "no_mmap": ((), "GGUF tensors are read through the file's memory map (gguf-py); there is no copying loader"),
    "numa": ((), "one NUMA node is assumed; use numactl to place the process"),
    "ubatch_size": ((), "prompt chunks are -b tokens; the C prefill has no separate micro-batch"),
    "threads_batch": ((), "prompt and generation both run on -t threads"),
    "cpu_mask": ((), "threads are not pinned here; use taskset"),
    "cpu_range": ((), "threads are not pinned here; use taskset"),
    "cpu_strict": (("0",), "threads are not pinned here; use taskset"),
    "prio": (("0",), "the process priority is left as started; use nice"),
    "poll": ((), "worker threads wait on a condition variable; there is no polling level"),
    "split_mode": (("none", "layer"), "one device runs the fast tier; there is nothing to split"),
    "tensor_split": ((), "one device runs the fast tier; there is nothing to split"),
    "main_gpu": (("0",), "the fast tier's device is --hot-device (cuda or cuda:N)"),
    "device": (("none", "cpu"), "the fast tier's device is --hot-device (cuda or cuda:N)"),
    "no_warmup": ((), "there is no warm-up run to skip"),
    "no_perf": ((), "the timing line is --no-stats here"),
    "simple_io": ((), "input is read with readline when stdin is a terminal, plain lines otherwise"),
    "log_colors": ((), "log lines are plain"),
    "log_prefix": ((), "log lines are plain"),
    "log_timestamps": ((), "log lines are plain"),
    "log_file": ((), "notes and the timing line go to stderr; redirect it (2> FILE)"),
    "verbosity": ((), "one level of detail: --verbose"),
    "prompt_cache": ((), "the KV cache is not saved to disk; within a run the cached prefix of the previous "
                         "prompt is reused"),
    "prompt_cache_all": ((), "the KV cache is not saved to disk"),
    "prompt_cache_ro": ((), "the KV cache is not saved to disk"),
    "rope_scaling": ((), "RoPE settings are read from the model file"),
    "rope_scale": ((), "RoPE settings are read from the model file"),
    "rope_freq_base": (("0",), "RoPE settings are read from the model file"),
    "rope_freq_scale": (("0",), "RoPE settings are read from the model file"),
    "yarn_orig_ctx": (("0",), "RoPE settings are read from the model file"),
    "jinja": ((), "chat templates are always rendered with Jinja here (sandboxed, as transformers does)"),
    "reasoning_format": (("none",), "the reply is printed as generated; thinking is not split out"),
    "reasoning_budget": (("-1",), "the reply is printed as generated; thinking is not limited"),
    "mirostat": (("0",), _SAMPLER),
    "mirostat_lr": ((), _SAMPLER),
    "mirostat_ent": ((), _SAMPLER),
    "typical": (("1", "1.0"), _SAMPLER),
    "top_nsigma": (("-1", "-1.0"), _SAMPLER),
    "xtc_probability": (("0", "0.0"), _SAMPLER),
    "xtc_threshold": ((), _SAMPLER),
    "dry_multiplier": (("0", "0.0"), _SAMPLER),
    "dry_base": ((), _SAMPLER),
    "dry_allowed_length": ((), _SAMPLER),
    "dry_penalty_last_n": ((), _SAMPLER),
    "dry_sequence_breaker": ((), _SAMPLER),
    "dynatemp_range": (("0", "0.0"), _SAMPLER),
    "dynatemp_exp": ((), _SAMPLER),
    "samplers": ((), _SAMPLER),
    "sampling_seq": ((), _SAMPLER),
    "logit_bias": ((), "per-token logit biases are not implemented here; a grammar (--grammar) can forbid tokens"),
    "defrag_thold": ((), "the KV cache is one contiguous sequence; there is nothing to defragment"),
    "grp_attn_n": (("1",), "self-extend is not implemented; a full context is shifted (--keep)"),
    "grp_attn_w": ((), "self-extend is not implemented; a full context is shifted (--keep)"),
    "dump_kv_cache": ((), "the KV cache is not dumped"),
    "override_tensor": ((), "tensor placement is the solver's (--vram-budget, powerinfer solve)"),
    "cpu_moe": ((), "mixture-of-experts models are not supported here; dense models have no experts"),
    "n_cpu_moe": ((), "mixture-of-experts models are not supported here; dense models have no experts"),
    "hf_token": ((), "nothing is downloaded, so no token is needed"),
}

# field -> why it is refused: it would change the model or fetch one, and ignoring it would answer with another.
REFUSED: dict[str, str] = {
    "hf_repo": "models are not downloaded at run time; download the GGUF file and give it with -m FILE",
    "hf_file": "models are not downloaded at run time; download the GGUF file and give it with -m FILE",
    "model_url": "models are not downloaded at run time; download the GGUF file and give it with -m FILE",
    "lora": "LoRA adapters are not supported; merge the adapter into the model and convert it to GGUF",
    "lora_scaled": "LoRA adapters are not supported; merge the adapter into the model and convert it to GGUF",
    "control_vector": "control vectors are not supported",
    "control_vector_scaled": "control vectors are not supported",
    "override_kv": "model metadata overrides are not supported; edit the GGUF with gguf-py's gguf_set_metadata",
    "model_draft": "speculative decoding with a draft model is not supported",
}


@dataclass
class LlamaCompatFlags:
    """llama-cli flags accepted for compatibility (NOTES) or refused with a reason (REFUSED)."""

    n_gpu_layers: str | None = _note(None, "-ngl", "--gpu-layers", "--n-gpu-layers", metavar="N")
    flash_attn: str | None = _note(None, "-fa", "--flash-attn", metavar="on|off|auto", nargs="?", const="on")
    no_kv_offload: bool = _switch("-nkvo", "--no-kv-offload")
    mlock: bool = _switch("--mlock")
    no_mmap: bool = _switch("--no-mmap")
    numa: str | None = _note(None, "--numa", metavar="TYPE")
    ubatch_size: str | None = _note(None, "-ub", "--ubatch-size", metavar="N")
    threads_batch: str | None = _note(None, "-tb", "--threads-batch", metavar="N")
    cpu_mask: str | None = _note(None, "-C", "--cpu-mask", metavar="M")
    cpu_range: str | None = _note(None, "-Cr", "--cpu-range", metavar="LO-HI")
    cpu_strict: str | None = _note(None, "--cpu-strict", metavar="0|1")
    prio: str | None = _note(None, "--prio", metavar="N")
    poll: str | None = _note(None, "--poll", metavar="0..100")
    split_mode: str | None = _note(None, "-sm", "--split-mode", metavar="none|layer|row")
    tensor_split: str | None = _note(None, "-ts", "--tensor-split", metavar="N0,N1,...")
    main_gpu: str | None = _note(None, "-mg", "--main-gpu", metavar="I")
    device: str | None = _note(None, "-dev", "--device", metavar="LIST")
    no_warmup: bool = _switch("--no-warmup")
    no_perf: bool = _switch("--no-perf")
    simple_io: bool = _switch("--simple-io")
    log_colors: bool = _switch("--log-colors")
    log_prefix: bool = _switch("--log-prefix")
    log_timestamps: bool = _switch("--log-timestamps")
    log_file: str | None = _note(None, "--log-file", metavar="FILE")
    verbosity: str | None = _note(None, "-lv", "--verbosity", "--log-verbosity", metavar="N")
    prompt_cache: str | None = _note(None, "--prompt-cache", metavar="FILE")
    prompt_cache_all: bool = _switch("--prompt-cache-all")
    prompt_cache_ro: bool = _switch("--prompt-cache-ro")
    rope_scaling: str | None = _note(None, "--rope-scaling", metavar="none|linear|yarn")
    rope_scale: str | None = _note(None, "--rope-scale", metavar="N")
    rope_freq_base: str | None = _note(None, "--rope-freq-base", metavar="N")
    rope_freq_scale: str | None = _note(None, "--rope-freq-scale", metavar="N")
    yarn_orig_ctx: str | None = _note(None, "--yarn-orig-ctx", metavar="N")
    jinja: bool = _switch("--jinja")
    reasoning_format: str | None = _note(None, "--reasoning-format", metavar="FORMAT")
    reasoning_budget: str | None = _note(None, "--reasoning-budget", metavar="N")
    mirostat: str | None = _note(None, "--mirostat", metavar="0|1|2")
    mirostat_lr: str | None = _note(None, "--mirostat-lr", metavar="N")
    mirostat_ent: str | None = _note(None, "--mirostat-ent", metavar="N")
    typical: str | None = _note(None, "--typical", metavar="P")
    top_nsigma: str | None = _note(None, "--top-nsigma", metavar="N")
    xtc_probability: str | None = _note(None, "--xtc-probability", metavar="P")
    xtc_threshold: str | None = _note(None, "--xtc-threshold", metavar="T")
    dry_multiplier: str | None = _note(None, "--dry-multiplier", metavar="N")
    dry_base: str | None = _note(None, "--dry-base", metavar="N")
    dry_allowed_length: str | None = _note(None, "--dry-allowed-length", metavar="N")
    dry_penalty_last_n: str | None = _note(None, "--dry-penalty-last-n", metavar="N")
    dry_sequence_breaker: list[str] | None = _note(None, "--dry-sequence-breaker", metavar="TEXT", action="append")
    dynatemp_range: str | None = _note(None, "--dynatemp-range", metavar="N")
    dynatemp_exp: str | None = _note(None, "--dynatemp-exp", metavar="N")
    samplers: str | None = _note(None, "--samplers", metavar="LIST")
    sampling_seq: str | None = _note(None, "--sampling-seq", "--sampler-seq", metavar="SEQ")
    logit_bias: list[str] | None = _note(None, "-l", "--logit-bias", metavar="ID(+/-)BIAS", action="append")
    defrag_thold: str | None = _note(None, "-dt", "--defrag-thold", metavar="N")
    grp_attn_n: str | None = _note(None, "-gan", "--grp-attn-n", metavar="N")
    grp_attn_w: str | None = _note(None, "-gaw", "--grp-attn-w", metavar="N")
    dump_kv_cache: bool = _switch("-dkvc", "--dump-kv-cache")
    override_tensor: list[str] | None = _note(None, "-ot", "--override-tensor", metavar="PATTERN=TYPE",
                                              action="append")
    cpu_moe: bool = _switch("-cmoe", "--cpu-moe")
    n_cpu_moe: str | None = _note(None, "-ncmoe", "--n-cpu-moe", metavar="N")
    hf_token: str | None = _note(None, "-hft", "--hf-token", metavar="TOKEN")
    # refused
    hf_repo: str | None = _refused("-hf", "-hfr", "--hf-repo", metavar="USER/MODEL")
    hf_file: str | None = _refused("-hff", "--hf-file", metavar="FILE")
    model_url: str | None = _refused("-mu", "--model-url", metavar="URL")
    lora: list[str] | None = _refused("--lora", metavar="FILE", action="append")
    lora_scaled: list[str] | None = _refused("--lora-scaled", metavar=("FILE", "SCALE"), nargs=2,
                                                action="append")
    control_vector: list[str] | None = _refused("--control-vector", metavar="FILE", action="append")
    control_vector_scaled: list[str] | None = _refused("--control-vector-scaled", metavar=("FILE", "SCALE"),
                                                    nargs=2, action="append")
    override_kv: list[str] | None = _refused("--override-kv", metavar="KEY=TYPE:VALUE", action="append")
    model_draft: str | None = _refused("-md", "--model-draft", metavar="FILE")

    def given(self) -> list[tuple[str, str, object]]:
        """(field name, its first flag, value) of every flag that was given."""
        out = []
        for f in fields(self):
            v = getattr(self, f.name)
            if v not in (None, False, []):
                out.append((f.name, f.metadata["flags"][0], v))
        return out

    def check(self) -> list[str]:
        """Raise for a refused flag; return the note lines for the others (none for llama-cli's "off" values)."""
        notes = []
        for name, flag, value in self.given():
            if name in REFUSED:
                raise PowerInferError(f"{flag}: {REFUSED[name]}")
            neutral, why = NOTES[name]
            if isinstance(value, str) and value.strip().lower() in neutral:
                continue
            shown = "" if value is True else " " + " ".join(value if isinstance(value, list) else [str(value)])
            notes.append(f"note: {flag}{shown} has no effect here: {why}")
        return notes


def unescape(text: str) -> str:
    """llama.cpp's string_process_escapes: \\n \\r \\t \\' \\" \\\\ \\xNN (two hex digits); any other
    backslash is kept."""
    out, i = [], 0
    simple = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\"}
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt in simple:
                out.append(simple[nxt])
                i += 2
                continue
            if nxt == "x" and len(text) >= i + 4 and all(ch in string.hexdigits for ch in text[i + 2:i + 4]):
                out.append(chr(int(text[i + 2:i + 4], 16)))
                i += 4
                continue
        out.append(c)
        i += 1
    return "".join(out)
