"""`powerinfer run` (llama-cli: one prompt, interactive, chat, a batch of prompts), `tokenize` (llama-tokenize) and
`info`."""
from __future__ import annotations

import json
import sys
from collections import Counter
from contextlib import nullcontext

from ..api import LLM
from ..core.files import atomic_write
from ..errors import PowerInferError
from ..formats.loader import load_model, load_tokenizer
from ..options import InfoOptions, RunOptions, TokenizeOptions
from ..settings import ModelSettings, SamplingParams, from_namespace
from ..textdata import read_text
from . import load_model_noted


# -- run -----------------------------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    """Generate text from a prompt, or chat. Example: powerinfer run -p 'The capital of France is' -n 32"""
    opts = from_namespace(RunOptions, args)
    settings, sampling = from_namespace(ModelSettings, args), from_namespace(SamplingParams, args)
    prompt = read_text(opts.file) if opts.file is not None else opts.prompt
    if opts.prompt_file_batch:
        return _run_batch(opts, settings, sampling)
    if opts.conversation:
        return _run_conversation(_load(settings, sampling), opts, prompt)
    llm = _load(settings, sampling)
    text = prompt  # None: interactive, waiting for the first line; "" goes to the engine (BOS or a clear error)
    while True:
        if text is not None:
            if text is prompt:
                sys.stdout.write(text)
                sys.stdout.flush()
            try:
                reply, last = _echo(llm.stream(text))
            except PowerInferError:
                print()  # end the echoed prompt's line, so the error starts a line of its own
                raise
            text += reply  # the next turn re-uses all of this from the KV cache
            if not opts.no_stats:
                _print_stats(last, llm.runner, llm.settings.verbose)
        if not opts.interactive:
            break
        try:
            text = (text or "") + input("\n> ") + "\n"
        except EOFError:
            break
    print()
    return 0


def _load(settings: ModelSettings, sampling: SamplingParams) -> LLM:
    llm = LLM(load_model_noted(settings.model), settings, sampling)
    if settings.verbose or llm.runner.sparse:
        print(f"ffn: {llm.sparsity}", file=sys.stderr)
    plan = getattr(llm.runner, "plan", None)
    if plan is not None:
        lines = plan.describe(llm.config.n_ff)
        print("\n".join(lines if settings.verbose else lines[:1]), file=sys.stderr)
    return llm


def _print_stats(r, runner=None, verbose=False):
    ffn = runner.ffn_stats() if runner is not None else None
    sparse = (f" | ffn sparsity {ffn['sparsity']:.1%}, {ffn['ffn_bytes_per_token'] / 2**20:.2f} of "
              f"{ffn['ffn_dense_bytes'] / 2**20:.2f} MiB FFN weights read per token" if ffn else "")
    print(f"\n[prompt: {r.prompt_tokens} tokens ({r.cached_tokens} cached), {r.prompt_tps:.1f} tok/s | "
          f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
          f"stop: {r.finish_reason}{sparse}]", file=sys.stderr)
    tiers = runner.tier_stats() if hasattr(runner, "tier_stats") else None
    if verbose and tiers:
        n_layer = runner.config.n_layer
        print(f"tiers, per token: {tiers['ms_per_token']:.3f} ms = fast tier attention/head/Python "
              f"{tiers['fast_rest_ms']:.3f} + fast-tier FFN {tiers['fast_ffn_ms']:.3f} + CPU tier FFN "
              f"{tiers['cpu_ms']:.3f} + copies {tiers['copies_ms']:.3f} (per layer: copies "
              f"{tiers['copies_ms'] / n_layer * 1e3:.1f} us, CPU tier {tiers['cpu_ms'] / n_layer * 1e3:.1f} us)",
              file=sys.stderr)
    if verbose and ffn:
        print("layer  neurons skipped  input skipped", file=sys.stderr)
        for i, (s, x) in enumerate(zip(ffn["sparsity_per_layer"], ffn["input_sparsity_per_layer"])):
            print(f"{i:5d}  {s:15.1%}  {x:13.1%}", file=sys.stderr)


def _echo(responses) -> tuple[str, object]:
    """Write streamed text to stdout as it comes; return all of it and the final response."""
    pieces, last = [], None
    for r in responses:
        if r.text:
            pieces.append(r.text)
            sys.stdout.write(r.text)
            sys.stdout.flush()
        last = r
    return "".join(pieces), last


def _run_conversation(llm: LLM, opts: RunOptions, first_message: str | None) -> int:
    messages = []
    if opts.system_prompt:
        messages.append({"role": "system", "content": opts.system_prompt})
    pending = first_message
    interactive = sys.stdin.isatty() or first_message is None
    while True:
        if pending is None:
            try:
                pending = input("> ")
            except EOFError:
                print()
                return 0
        messages.append({"role": "user", "content": pending})
        pending = None
        reply, last = _echo(llm.stream_chat(messages))
        print()
        if not opts.no_stats:
            _print_stats(last, llm.runner, llm.settings.verbose)
        messages.append({"role": "assistant", "content": reply})
        if not interactive:
            return 0


def _run_batch(opts: RunOptions, settings: ModelSettings, sampling: SamplingParams) -> int:
    lines = [ln for ln in read_text(opts.prompt_file_batch).splitlines() if ln.strip()]
    if not lines:
        raise PowerInferError(f"{opts.prompt_file_batch}: no prompts (one prompt per non-empty line)")
    llm = _load(settings, sampling)
    # -o: written under a temporary name and renamed at the end (core/files.py: never through a planted link)
    with (atomic_write(opts.output, text=True) if opts.output else nullcontext(sys.stdout)) as out:
        for i, prompt in enumerate(lines):
            pieces, last = [], None
            for r in llm.stream(prompt):
                pieces.append(r.text)
                last = r
            rec = {"index": i, "prompt": prompt, "completion": "".join(pieces),
                   "prompt_tokens": last.prompt_tokens, "completion_tokens": last.generation_tokens,
                   "finish_reason": last.finish_reason,
                   "prompt_tok_s": round(last.prompt_tps, 2), "generation_tok_s": round(last.generation_tps, 2)}
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            print(f"[{i + 1}/{len(lines)}] {last.generation_tokens} tokens, "
                  f"{last.generation_tps:.1f} tok/s", file=sys.stderr)
    return 0


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
    loaded = load_model(from_namespace(ModelSettings, args).model)
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
        ("rope", f"theta {c.rope_theta:g}, {c.rope_style} style, scaling {c.rope_scaling.kind}"),
        ("ffn", f"{c.ffn_kind} with {c.activation}"),
        ("tied output head", c.tie_embeddings),
        ("tokenizer", f"{loaded.metadata.get('tokenizer.ggml.model', '-')}"
                      f" (pre: {loaded.metadata.get('tokenizer.ggml.pre', '-')})"),
        ("chat template", f"{len(tmpl)} chars" if tmpl else "none (ChatML fallback)"),
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
