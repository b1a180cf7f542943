"""`powerinfer` command line, with llama.cpp's flag spellings (settings.py holds the flags and their help).

Every user error ends as one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import PowerInferError
from .textdata import read_text
from .settings import ModelSettings, SamplingParams, add_arguments, from_namespace


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _load(args):
    from .api import LLM
    from .formats.loader import load_model

    settings = from_namespace(ModelSettings, args)
    loaded = load_model(settings.model)
    report = getattr(loaded, "conversion_report", None)
    if report:
        print(f"note: converted at load: {report}", file=sys.stderr)
    llm = LLM(loaded, settings, from_namespace(SamplingParams, args))
    if settings.verbose or llm.runner.sparse:
        print(f"ffn: {llm.sparsity}", file=sys.stderr)
    return llm


def _print_stats(r, runner=None, verbose=False):
    ffn = runner.ffn_stats() if runner is not None else None
    sparse = (f" | ffn sparsity {ffn['sparsity']:.1%}, {ffn['ffn_bytes_per_token'] / 2**20:.2f} of "
              f"{ffn['ffn_dense_bytes'] / 2**20:.2f} MiB FFN weights read per token" if ffn else "")
    print(f"\n[prompt: {r.prompt_tokens} tokens ({r.cached_tokens} cached), {r.prompt_tps:.1f} tok/s | "
          f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
          f"stop: {r.finish_reason}{sparse}]", file=sys.stderr)
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


# -- run -----------------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    if args.prompt is not None and args.file is not None:
        raise PowerInferError("give the prompt with -p or -f, not both")
    prompt = read_text(args.file) if args.file is not None else args.prompt
    if args.prompt_file_batch:
        return _run_batch(args)
    if args.conversation:
        return _run_conversation(args, prompt)
    if prompt is None and not args.interactive:
        raise PowerInferError("no prompt: give one with -p TEXT or -f FILE, or chat with -cnv / -i")
    llm = _load(args)
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
            if not args.no_stats:
                _print_stats(last, llm.runner, llm.settings.verbose)
        if not args.interactive:
            break
        try:
            text = (text or "") + input("\n> ") + "\n"
        except EOFError:
            break
    print()
    return 0


def _run_conversation(args, first_message: str | None) -> int:
    llm = _load(args)
    messages = []
    if args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
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
        if not args.no_stats:
            _print_stats(last, llm.runner, llm.settings.verbose)
        messages.append({"role": "assistant", "content": reply})
        if not interactive:
            return 0


def _run_batch(args) -> int:
    lines = [ln for ln in read_text(args.prompt_file_batch).splitlines() if ln.strip()]
    if not lines:
        raise PowerInferError(f"{args.prompt_file_batch}: no prompts (one prompt per non-empty line)")
    llm = _load(args)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
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
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


# -- tokenize ------------------------------------------------------------------------------------------

def cmd_tokenize(args) -> int:
    from .formats.loader import load_model, load_tokenizer

    if (args.prompt is None) == (args.file is None):
        raise PowerInferError("give the text with exactly one of -p TEXT or -f FILE")
    text = read_text(args.file) if args.file is not None else args.prompt
    loaded = load_model(args.model)
    tok = load_tokenizer(loaded)
    add_bos = False if args.no_bos else None
    parse_special = not args.no_parse_special
    if args.lines:
        texts = text.split("\n")
        if texts and texts[-1] == "":
            texts.pop()
    else:
        texts = [text]
    results = [tok.encode(t, add_bos=add_bos, parse_special=parse_special) for t in texts]
    if args.json:
        print(json.dumps(results if args.lines else results[0]))
    else:
        for ids in results:
            for i in ids:
                print(f"{i:6d} -> {tok.token_bytes(i).decode('utf-8', 'replace')!r}")
            if args.lines:
                print()
    return 0


# -- info ----------------------------------------------------------------------------------------------

def cmd_info(args) -> int:
    from collections import Counter

    from .formats.loader import load_model

    loaded = load_model(args.model)
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
        from .sparse.predictor import predictors_from_gguf

        preds = predictors_from_gguf(loaded)
        rows += [("PowerInfer GGUF", "yes (PWRI magic)" if loaded.powerinfer_gguf else "no"),
                 ("ffn_down_t", "yes (neuron-major down projection, used by the sparse FFN)"
                  if w.layers[0].down_t is not None else "no"),
                 ("predictors", "none" if preds is None else
                  f"{preds.n_layer} layers, ranks {min(preds.ranks())}..{max(preds.ranks())}, "
                  f"{preds.n_params() / 1e6:.2f} M parameters, logit threshold {preds.threshold:g}")]
    if args.json:
        print(json.dumps({k: (v if isinstance(v, (int, float, bool)) else str(v)) for k, v in rows}, indent=1))
    else:
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        if tmpl and args.template:
            print("\n" + tmpl)
    return 0


# -- parser --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="powerinfer", description="Fast local LLM inference that computes only the FFN neurons "
                "that fire (PowerInfer). Reads GGUF models; flags follow llama.cpp.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="generate text (like llama-cli)",
                         description="Generate text from a prompt, or chat. Example: "
                                     "powerinfer run -p 'The capital of France is' -n 32")
    add_arguments(run, ModelSettings)
    g = run.add_argument_group("prompt")
    g.add_argument("-p", "--prompt", help="prompt text")
    g.add_argument("-f", "--file", metavar="FILE", help="read the prompt from FILE")
    g.add_argument("-i", "--interactive", action="store_true",
                   help="after the output, read more text from stdin and continue (Ctrl-D to quit)")
    g.add_argument("-cnv", "--conversation", action="store_true",
                   help="chat using the model's chat template; -p, if given, is the first user message")
    g.add_argument("-sys", "--system-prompt", metavar="TEXT", help="system message for -cnv")
    g.add_argument("--prompt-file-batch", metavar="FILE",
                   help="generate for every non-empty line of FILE and write one JSON object per line (JSONL)")
    g.add_argument("-o", "--output", metavar="FILE", help="with --prompt-file-batch: write the JSONL to FILE")
    g.add_argument("--no-stats", action="store_true", help="do not print the timing line after the output")
    add_arguments(run.add_argument_group("sampling"), SamplingParams)
    run.set_defaults(func=cmd_run)

    tok = sub.add_parser("tokenize", help="print token ids (like llama-tokenize)",
                         description="Tokenize text with the model's tokenizer (ids equal llama.cpp's).")
    tok.add_argument("-m", "--model", metavar="PATH", help="GGUF file (default: the bundled model)")
    tok.add_argument("-p", "--prompt", help="text to tokenize")
    tok.add_argument("-f", "--file", metavar="FILE", help="read the text from FILE")
    tok.add_argument("--lines", action="store_true", help="tokenize every line of the input separately")
    tok.add_argument("--json", action="store_true", help="print ids as JSON (a list, or a list of lists with --lines)")
    tok.add_argument("--no-bos", action="store_true", help="never add a BOS token")
    tok.add_argument("--no-parse-special", action="store_true",
                     help="treat special-token text such as <|im_end|> as plain text")
    tok.set_defaults(func=cmd_tokenize)

    info = sub.add_parser("info", help="describe a model file", description="Architecture, sizes, tensor "
                          "types and chat template of a model.")
    info.add_argument("-m", "--model", metavar="PATH", help="GGUF file or HF directory (default: the bundled model)")
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.add_argument("--template", action="store_true", help="also print the chat template")
    info.set_defaults(func=cmd_info)

    from .measure import bench, logits, perplexity
    perplexity.add_parser(sub)
    logits.add_parser(sub)
    bench.add_parser(sub)
    from .prepare import calibrate, convert, pipeline, profile, solve, train
    for command in (calibrate, profile, train, solve, convert, pipeline):
        command.add_parser(sub)
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
