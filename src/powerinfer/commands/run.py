"""`powerinfer run` (llama-cli: one prompt, interactive, chat, a batch of prompts), `tokenize` (llama-tokenize) and
`info`."""
from __future__ import annotations

import json
import random
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import fields, replace
from importlib.metadata import version

from ..api import LLM
from ..core.files import atomic_write
from ..errors import PowerInferError
from ..formats.loader import load_model, load_tokenizer
from ..options import InfoOptions, RunOptions, TokenizeOptions
from ..options_llama import ChatOptions, LlamaCompatFlags, unescape
from ..settings import ModelSettings, SamplingParams, from_namespace
from ..textdata import read_text
from . import disk_line, load_model_noted
from .chat import Session, run_conversation, run_text


# -- run -----------------------------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    """Generate text from a prompt, or chat. Example: powerinfer run -p 'The capital of France is' -n 32"""
    chat = from_namespace(ChatOptions, args)
    if chat.version:
        print(f"powerinfer {version('powerinfer')}")
        return 0
    if chat.list_devices:
        return _list_devices()
    notes = from_namespace(LlamaCompatFlags, args).check()
    extra = {}
    if chat.binary_file is not None:
        extra["prompt"] = read_bytes_text(chat.binary_file)
    if chat.interactive_first:
        extra["interactive"] = True
    opts = from_namespace(RunOptions, args, **extra)
    settings, sampling = from_namespace(ModelSettings, args), from_namespace(SamplingParams, args)
    if getattr(args, "n_gpu_layers", None) is not None and settings.vram_budget is None \
            and args.n_gpu_layers.strip() == "0":
        settings.vram_budget = 0.0  # -ngl 0: nothing on the GPU, as llama-cli
    esc = unescape if chat.escapes else (lambda t: t)
    prompt = read_text(opts.file) if opts.file is not None else opts.prompt
    if opts.prompt is not None and chat.binary_file is None:
        prompt = esc(prompt)
    chat.reverse_prompt = [esc(r) for r in chat.reverse_prompt or []]
    chat.in_prefix, chat.in_suffix = esc(chat.in_prefix), esc(chat.in_suffix)
    system = read_text(chat.system_prompt_file) if chat.system_prompt_file else opts.system_prompt
    if system is not None and not chat.system_prompt_file:
        system = esc(system)
    template = read_text(chat.chat_template_file) if chat.chat_template_file else chat.chat_template
    sampling = _grammar_from_files(chat, sampling)
    if opts.prompt_file_batch:
        return _run_batch(opts, settings, sampling, quiet=chat.log_disable)
    quiet = chat.log_disable
    random_seed = sampling.seed < 0 and sampling.temp > 0
    if random_seed:  # a random run says its seed, so it can be repeated with -s (llama-cli logs "sampler seed")
        sampling.seed = random.SystemRandom().randrange(2**32)
    llm = _load(settings, sampling, quiet)
    for line in [] if quiet else notes:
        print(line, file=sys.stderr)

    def report(last):
        if last is not None and not (opts.no_stats or quiet):
            _print_stats(last, llm.runner, llm.settings.verbose, sampling.seed if random_seed else None)

    interactive = opts.interactive or chat.interactive_first
    session = Session(llm, opts, chat, report, shift=chat.context_shift or interactive or opts.conversation)
    if chat.verbose_prompt and prompt:
        ids = llm.tokenizer.encode(prompt, parse_special=True)
        print(f"prompt: {len(ids)} tokens", file=sys.stderr)
        for i in ids:
            print(f"{i:6d} -> {llm.tokenizer.token_bytes(i).decode('utf-8', 'replace')!r}", file=sys.stderr)
    if opts.conversation:
        return run_conversation(session, prompt, system, template, chat.single_turn)
    return run_text(session, prompt, interactive, first_input=chat.interactive_first)


def read_bytes_text(path: str) -> str:
    """-bf: a prompt file byte for byte; bytes that are not UTF-8 become U+FFFD (llama-cli tokenizes them so)."""
    try:
        return read_text(path)
    except PowerInferError as e:
        if "not UTF-8" not in str(e):
            raise
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")


def _grammar_from_files(chat: ChatOptions, sampling: SamplingParams) -> SamplingParams:
    if chat.grammar_file is not None:
        return replace(sampling, grammar=read_text(chat.grammar_file))
    if chat.json_schema_file is not None:
        return replace(sampling, json_schema=read_text(chat.json_schema_file))
    return sampling


def _list_devices() -> int:
    import torch

    print("cpu: the C decoder (RAM tier)")
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB (fast tier: --hot-device cuda:{i})")
    return 0


def _load(settings: ModelSettings, sampling: SamplingParams, quiet: bool = False) -> LLM:
    llm = LLM(load_model_noted(settings.model, settings.allow_non_finite), settings, sampling)
    trained = llm.config.trained_context
    # llama.cpp: "n_ctx_per_seq > n_ctx_train -- possible training context overflow"; for a -c the user chose (the
    # default 4096 on a small test model is not news)
    if llm.runner.n_ctx > trained and settings.n_ctx != ModelSettings.n_ctx:
        print(f"warning: -c {llm.runner.n_ctx} exceeds the model's trained context of {trained} tokens: text past it "
              "comes out degraded", file=sys.stderr)
    if quiet:
        return llm
    if settings.verbose or llm.runner.sparse:
        print(f"ffn: {llm.sparsity}", file=sys.stderr)
    plan = getattr(llm.runner, "plan", None)
    if plan is not None:
        lines = plan.describe(llm.config.n_ff)
        print("\n".join(lines if settings.verbose else lines[:1]), file=sys.stderr)
    return llm


def _print_stats(r, runner=None, verbose=False, seed=None):
    ffn = runner.ffn_stats() if runner is not None else None
    sparse = (f" | ffn sparsity {ffn['sparsity']:.1%}, {ffn['ffn_bytes_per_token'] / 2**20:.2f} of "
              f"{ffn['ffn_dense_bytes'] / 2**20:.2f} MiB FFN weights read per token" if ffn else "")
    print(f"\n[prompt: {r.prompt_tokens} tokens ({r.cached_tokens} cached), {r.prompt_tps:.1f} tok/s | "
          f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
          f"stop: {r.finish_reason}{sparse}{'' if seed is None else f' | seed {seed}'}]", file=sys.stderr)
    tiers = runner.tier_stats() if hasattr(runner, "tier_stats") else None
    if verbose and tiers:
        n_layer = runner.config.n_layer
        print(f"tiers, per token: {tiers['ms_per_token']:.3f} ms = fast tier attention/head/Python "
              f"{tiers['fast_rest_ms']:.3f} + fast-tier FFN {tiers['fast_ffn_ms']:.3f} + CPU tier FFN "
              f"{tiers['cpu_ms']:.3f} + copies {tiers['copies_ms']:.3f} (per layer: copies "
              f"{tiers['copies_ms'] / n_layer * 1e3:.1f} us, CPU tier {tiers['cpu_ms'] / n_layer * 1e3:.1f} us)",
              file=sys.stderr)
    disk = runner.disk_stats() if verbose and hasattr(runner, "disk_stats") else None
    if disk and disk["tokens"]:
        print(disk_line(disk), file=sys.stderr)
    if verbose and ffn:
        print("layer  neurons skipped  input skipped", file=sys.stderr)
        for i, (s, x) in enumerate(zip(ffn["sparsity_per_layer"], ffn["input_sparsity_per_layer"])):
            print(f"{i:5d}  {s:15.1%}  {x:13.1%}", file=sys.stderr)


def _run_batch(opts: RunOptions, settings: ModelSettings, sampling: SamplingParams, quiet: bool = False) -> int:
    """One JSON record per prompt line; a line that fails gets a record with its line number and "error" and the
    batch goes on. A line that starts with '{' is a JSON object: "prompt" and any sampling settings for that line
    ({"prompt": "...", "n_predict": 8, "json_schema": {...}}). Exit status: 0, or the number of failed lines
    (at most 100); 130 when interrupted (the records so far are kept)."""
    jobs = [(n, ln) for n, ln in enumerate(read_text(opts.prompt_file_batch).splitlines(), 1) if ln.strip()]
    if not jobs:
        raise PowerInferError(f"{opts.prompt_file_batch}: no prompts (one prompt per non-empty line)")
    llm = _load(settings, sampling, quiet)
    failed, interrupted = [], False
    # -o: written under a temporary name and renamed at the end (core/files.py: never through a planted link)
    with (atomic_write(opts.output, text=True) if opts.output else nullcontext(sys.stdout)) as out:
        for i, (line_no, line) in enumerate(jobs):
            rec = {"index": i, "line": line_no}
            try:
                prompt, params = _batch_line(line)
                rec["prompt"] = prompt
                pieces, last = [], None
                for r in llm.stream(prompt, **params):
                    pieces.append(r.text)
                    last = r
                rec.update({"completion": "".join(pieces), "prompt_tokens": last.prompt_tokens,
                            "completion_tokens": last.generation_tokens, "finish_reason": last.finish_reason,
                            "prompt_tok_s": round(last.prompt_tps, 2),
                            "generation_tok_s": round(last.generation_tps, 2)})
                status = f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s"
            except KeyboardInterrupt:
                interrupted = True
                break
            except Exception as e:  # noqa: BLE001 -- one bad line must not cost the others their answers
                msg = str(e) if isinstance(e, PowerInferError) else f"{type(e).__name__}: {e}"
                rec.setdefault("prompt", line)
                rec["error"] = " ".join(msg.split())
                failed.append(line_no)
                status = f"error: {rec['error']}"
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            if not quiet:
                print(f"[{i + 1}/{len(jobs)}] line {line_no}: {status}", file=sys.stderr)
    if interrupted:
        print(f"interrupted: {i} of {len(jobs)} prompts done", file=sys.stderr)
        return 130
    if failed:
        shown = ", ".join(map(str, failed[:10])) + (", ..." if len(failed) > 10 else "")
        print(f"error: {len(failed)} of {len(jobs)} prompts failed (line {shown}); their records have "
              f"\"error\"", file=sys.stderr)
        return min(len(failed), 100)
    return 0


_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
_SAMPLING_DEFAULTS = {f.name: f.default for f in fields(SamplingParams)}


def _batch_line(line: str) -> tuple[str, dict]:
    """A batch line's prompt and its own sampling settings."""
    if not line.lstrip().startswith("{"):
        return line, {}
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise PowerInferError(f"a line that starts with '{{' must be a JSON object ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise PowerInferError('a JSON line needs "prompt": a string')
    unknown = sorted(set(obj) - _SAMPLING_FIELDS - {"prompt"})
    if unknown:
        raise PowerInferError(f"unknown setting(s) {', '.join(unknown)}; known: prompt, "
                              f"{', '.join(sorted(_SAMPLING_FIELDS))}")
    for k, v in obj.items():
        default = _SAMPLING_DEFAULTS.get(k)
        if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(v, bool) or not isinstance(v, (int, float))):
            raise PowerInferError(f"{k}: expected a number, got {v!r}")
    return obj.pop("prompt"), obj


# -- tokenize ------------------------------------------------------------------------------------------------------

def cmd_tokenize(args) -> int:
    """Tokenize text with the model's tokenizer (ids equal llama.cpp's)."""
    opts = from_namespace(TokenizeOptions, args)
    settings = from_namespace(ModelSettings, args)
    text = read_text(opts.file) if opts.file is not None else opts.prompt
    tok = load_tokenizer(load_model(settings.model))
    texts = text.split("\n") if opts.lines else [text]
    if opts.lines and texts[-1] == "":
        texts.pop()
    results = [tok.encode(t, add_bos=False if opts.no_bos else None, parse_special=not opts.no_parse_special)
               for t in texts]
    if opts.json:
        print(json.dumps(results if opts.lines else results[0]))
        return 0
    for ids in results:
        for i in ids:
            print(f"{i:6d} -> {tok.token_bytes(i).decode('utf-8', 'replace')!r}")
        if opts.lines:
            print()
    return 0


# -- info ----------------------------------------------------------------------------------------------------------

def cmd_info(args) -> int:
    """Architecture, sizes, tensor types and chat template of a model."""
    opts = from_namespace(InfoOptions, args)
    # info describes a corrupt file too: non-finite tensors are listed (model_facts), not refused
    loaded = load_model(from_namespace(ModelSettings, args).model, allow_non_finite=True)
    rows = model_facts(loaded)
    if opts.json:
        print(json.dumps({k: (v if isinstance(v, (int, float, bool)) else str(v)) for k, v in rows}, indent=1))
        return 0
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    tmpl = loaded.metadata.get("tokenizer.chat_template")
    if tmpl and opts.template:
        print("\n" + tmpl)
    return 0


def _gemma_rows(c) -> list[tuple[str, object]]:
    """Gemma's attention and output options, where the model has them."""
    if not (c.post_norms or c.sliding_window or c.attn_softcap or c.final_softcap or c.embed_scale != 1.0):
        return []
    n_local = sum(c.is_local(i) for i in range(c.n_layer))
    local = f", rope theta {c.rope_local_theta:g}" if c.local_rope() is not None else ""
    return [("attention", f"q scale {c.attn_scale or c.head_dim ** -0.5:.4g}, soft-cap {c.attn_softcap or 'none'}, "
                          f"sliding window {c.sliding_window or 'none'} on {n_local} of {c.n_layer} layers{local}"),
            ("post norms / embedding scale / final soft-cap",
             f"{'yes' if c.post_norms else 'no'} / {c.embed_scale:.4g} / {c.final_softcap or 'none'}")]


def model_facts(loaded) -> list[tuple[str, object]]:
    """(label, value) rows describing a loaded model: what `powerinfer info` prints."""
    c, w = loaded.config, loaded.weights
    tensors = [w.embed_tokens, w.norm] + ([] if w.lm_head is w.embed_tokens else [w.lm_head])
    for lw in w.layers:
        tensors += [t for t in vars(lw).values() if t is not None]
    types = Counter(t.qtype.name for t in tensors)
    n_params = sum(t.rows * t.cols for t in tensors)
    n_bytes = sum(t.nbytes for t in tensors)
    tmpl = loaded.metadata.get("tokenizer.chat_template")
    rows = [
        ("file", str(loaded.path)),
        ("name", c.name or "-"),
        ("architecture", c.arch),
        ("parameters", f"{n_params / 1e6:.1f} M"),
        ("weights in memory", f"{n_bytes / 2**20:.1f} MiB"),
        ("file type", getattr(loaded, "file_type", "-")),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in types.most_common())),
        ("layers", c.n_layer),
        ("d_model / n_ff", f"{c.d_model} / {c.n_ff}"),
        ("heads / kv heads / head dim", f"{c.n_head} / {c.n_head_kv} / {c.head_dim}"),
        ("vocabulary", c.n_vocab),
        ("trained context", c.context_length),
        ("rope", f"theta {c.rope_theta:g}, {c.rope_style} style, scaling {c.rope_scaling.kind}"
                 if c.positions == "rope" else "none (learned position embeddings)"),
        ("norm / residual", f"{'LayerNorm' if c.norm == 'layer' else 'RMSNorm'} / "
                            f"{'parallel attention + FFN' if c.parallel_residual else 'sequential'}"),
        *_gemma_rows(c),
        ("ffn", f"{c.ffn_kind} with {c.activation}"),
        ("tied output head", c.tie_embeddings),
        ("tokenizer", f"{loaded.metadata.get('tokenizer.ggml.model', '-')}"
                      f" (pre: {loaded.metadata.get('tokenizer.ggml.pre', '-')})"),
        ("chat template", f"{len(tmpl)} chars" if tmpl else "none (ChatML fallback)"),
        ("non-finite tensors", ", ".join(loaded.non_finite) if getattr(loaded, "non_finite", None) else "none"),
    ]
    if loaded.powerinfer_gguf or any(lw.down_t is not None for lw in w.layers):
        from ..sparse.predictor import predictors_from_gguf

        preds = predictors_from_gguf(loaded)
        rows += [("PowerInfer GGUF", "yes (PWRI magic)" if loaded.powerinfer_gguf else "no"),
                 ("ffn_down_t", "yes (neuron-major down projection, used by the sparse FFN)"
                  if w.layers[0].down_t is not None else "no"),
                 ("predictors", "none" if preds is None else
                  f"{preds.n_layer} layers, ranks {min(preds.ranks())}..{max(preds.ranks())}, "
                  f"{preds.n_params() / 1e6:.2f} M parameters, logit threshold {preds.threshold:g}")]
    return rows
