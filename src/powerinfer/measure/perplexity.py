"""`powerinfer perplexity`: perplexity scored exactly like llama.cpp's `llama-perplexity` (tools/perplexity,
default mode, `perplexity()`), so numbers are comparable with the ones llama.cpp users quote.

Convention:
  * the whole text is tokenized once, special-token text left as text (llama.cpp's `common_tokenize(ctx, text,
    add_special=true, parse_special=false)`), with a BOS first when the model adds one;
  * n_chunk = min(--chunks, n_tokens // n_ctx); chunk i is tokens[i*n_ctx : (i+1)*n_ctx], evaluated from an
    empty KV cache; when the model adds BOS, the chunk's first token is replaced by BOS for the evaluation
    (the original id stays the target, though position 0 is never scored);
  * only the second half is scored: with first = n_ctx // 2, the tokens at positions first .. n_ctx-1 are
    predicted from the logits at first-1 .. n_ctx-2, i.e. n_ctx - first predictions per chunk (256 for -c 512).
    Checked against llama.cpp: its own logits (llama-cpp-python 0.3.36, SmolLM2 Q4_1, eval split, -c 512,
    8 chunks) scored this way give 13.9437, and `llama-perplexity` reports 13.9418 on the same text
    (reference/baselines.md 3.3); scoring one position fewer per chunk (255) gives 13.9219, 0.14% off;
  * PPL = exp(mean NLL) over all scored tokens; the running value after each chunk is printed as
    `[1]17.1700,[2]14.4300,...`; the final line is `PPL = x +/- err` with err = PPL * sqrt((E[nll^2] - E[nll]^2)
    / (count - 1)), llama.cpp's first-order error of the mean.
Differences from llama.cpp: it refuses texts shorter than 2 * n_ctx tokens, this tool needs one chunk
(n_ctx tokens); llama.cpp packs several chunks into one batch when -b > -c, here chunks run one after another
(the scores do not depend on it).

Positions 0..first-1 only fill the cache (one prefill, no logits); the scored positions are evaluated with
all logits kept. `--logits-out FILE.npy` saves those rows (float32 [n_scored, n_vocab]) and the target ids
(FILE.tokens.npy) for `powerinfer compare-logits` (measure/logits.py).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import PowerInferError
from .logits import LogitsWriter, ppl_with_error, target_nll

DEFAULT_CTX = 512  # llama-perplexity's customary -c; baselines.md's reference numbers use it


def n_chunks_for(n_tokens: int, n_ctx: int, max_chunks: int = -1) -> int:
    """llama.cpp's n_chunk: whole chunks of n_ctx tokens in the text, capped by --chunks when >= 0."""
    n = n_tokens // n_ctx
    return n if max_chunks < 0 else min(max_chunks, n)


def scored_per_chunk(n_ctx: int) -> int:
    """Predictions scored per chunk: the tokens at positions n_ctx//2 .. n_ctx-1."""
    return n_ctx - n_ctx // 2


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float
    nll_mean: float
    n_tokens_scored: int
    n_chunks: int
    n_ctx: int
    n_tokens: int  # tokens in the whole text (some may be left over after the last whole chunk)
    seconds: float
    running: list[float] = field(default_factory=list)  # PPL after each chunk, as llama.cpp prints it


def perplexity(runner, tokens: list[int], n_ctx: int, *, bos_id: int | None = None, max_chunks: int = -1,
               logits_out: str | None = None,
               on_chunk: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """Score `tokens` llama-perplexity style on `runner` (runtime.runner.Runner or anything with its
    truncate/eval API). `bos_id` (None: no replacement) is put at each chunk's position 0 for evaluation.
    `on_chunk(i, n_chunk, running_ppl)` is called after every chunk (progress, running output)."""
    if n_ctx < 3:
        raise PowerInferError(f"--ctx-size must be >= 3 to score anything (the second half is scored), got {n_ctx}")
    if n_ctx > runner.n_ctx:
        raise PowerInferError(f"-c {n_ctx} is larger than the runner's context of {runner.n_ctx}")
    n_chunk = n_chunks_for(len(tokens), n_ctx, max_chunks)
    if n_chunk <= 0:
        raise PowerInferError(f"the text has {len(tokens)} tokens; one chunk needs {n_ctx} "
                              f"(use a longer text or a smaller -c)")
    first = n_ctx // 2
    per_chunk = scored_per_chunk(n_ctx)
    writer = LogitsWriter(logits_out, n_chunk * per_chunk, runner.config.n_vocab) if logits_out else None
    nll = np.empty(n_chunk * per_chunk, dtype=np.float64)
    running = []
    t0 = time.perf_counter()
    try:
        for i in range(n_chunk):
            chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
            targets = torch.tensor(chunk[first:], dtype=torch.long)
            if bos_id is not None:
                chunk[0] = bos_id
            runner.truncate(0)  # every chunk starts from an empty context, like llama_memory_clear
            if first > 1:
                runner.eval(chunk[:first - 1])  # positions 0..first-2 only fill the cache; no logits needed
            logits = runner.eval(chunk[first - 1:n_ctx - 1], all_logits=True)  # row k predicts chunk[first + k]
            nll[i * per_chunk:(i + 1) * per_chunk] = target_nll(logits, targets).numpy()
            if writer is not None:
                writer.add(logits, targets.numpy())
            running.append(float(np.exp(nll[:(i + 1) * per_chunk].mean())))
            if on_chunk is not None:
                on_chunk(i, n_chunk, running[-1])
    finally:
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - t0
    ppl, err = ppl_with_error(nll)
    return PerplexityResult(ppl, err, float(nll.mean()), nll.size, n_chunk, n_ctx, len(tokens), seconds, running)


# -- CLI ---------------------------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser(
        "perplexity", help="perplexity of a text, scored like llama-perplexity",
        description="Perplexity scored exactly like llama.cpp's llama-perplexity: the text is tokenized once "
                    "(BOS first if the model adds one), cut into chunks of -c tokens, each evaluated from an empty "
                    "context (first token replaced by BOS if the model adds one); only the second half of each chunk "
                    "is scored (the tokens at positions c/2 .. c-1, predicted from the logits before them: c - c/2 per chunk). Prints "
                    "the running PPL per chunk ([1]x,[2]y,...) and 'PPL = x +/- err'. Without -f the default "
                    "evaluation text (English pydoc topics of this Python, eval split) is used.")
    p.add_argument("-m", "--model", metavar="PATH", help="GGUF file or HF directory (default: the bundled model)")
    p.add_argument("-f", "--file", metavar="FILE",
                   help="UTF-8 text to score (default: the built-in evaluation text, pydoc_data.topics eval split)")
    p.add_argument("-c", "--ctx-size", dest="n_ctx", type=int, default=DEFAULT_CTX, metavar="N",
                   help=f"tokens per chunk; the second half of each is scored (default: {DEFAULT_CTX})")
    p.add_argument("-b", "--batch-size", dest="n_batch", type=int, default=None, metavar="N",
                   help="prompt tokens per prefill call (default: the -c value)")
    p.add_argument("-t", "--threads", dest="n_threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: all available cores)")
    p.add_argument("--chunks", type=int, default=-1, metavar="N",
                   help="score at most N chunks (default: -1, every whole chunk of the text)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object {ppl, ppl_err, n_tokens_scored, n_chunks, n_ctx, text, seconds, ...} "
                        "instead of the llama.cpp-style lines")
    from ..runtime.sparsity import add_sparsity_arguments

    add_sparsity_arguments(p, "; when on, every position is scored through single-token decode steps, so the "
                              "number is the sparse model's")
    p.add_argument("--logits-out", metavar="FILE.npy",
                   help="save the scored positions' logits (float32 [n_scored, n_vocab]) to FILE.npy and their "
                        "target ids to FILE.tokens.npy, for `powerinfer compare-logits`")
    p.set_defaults(func=func)


def func(args) -> int:
    from .. import load
    from ..textdata import describe, pydoc_topics, read_text

    if args.n_ctx <= 0:
        raise PowerInferError(f"--ctx-size must be > 0, got {args.n_ctx}")
    if args.file is not None:
        text, source = read_text(args.file), args.file
    else:
        text, source = pydoc_topics("eval"), "default evaluation text (pydoc_data.topics, eval split)"
    log = sys.stderr

    settings = {"n_ctx": args.n_ctx, "n_batch": args.n_batch or args.n_ctx, "sparsity": args.sparsity,
                "sparse_method": args.sparse_method, "predictors": args.predictors}
    if args.n_threads is not None:
        settings["n_threads"] = args.n_threads
    llm = load(args.model, **settings)
    report = llm.loaded.conversion_report
    if report:
        print(f"note: converted at load: {report}", file=log)
    tok = llm.tokenizer
    # As llama.cpp: BOS per the model, special-token text in the corpus stays text.
    tokens = tok.encode(text, add_bos=None, parse_special=False)
    bos = tok.bos_id if tok.add_bos else None
    ctx_trained = llm.config.context_length
    if ctx_trained and args.n_ctx > ctx_trained:
        print(f"warning: -c {args.n_ctx} exceeds the model's trained context of {ctx_trained}", file=log)

    n_chunk = n_chunks_for(len(tokens), args.n_ctx, args.chunks)
    print(f"perplexity: text: {source} ({describe(text)}), {len(tokens)} tokens", file=log)
    if args.chunks == 0:
        raise PowerInferError("--chunks 0: nothing to score")
    if n_chunk <= 0:
        raise PowerInferError(f"the text has {len(tokens)} tokens; one chunk needs {args.n_ctx} "
                              f"(use a longer text or a smaller -c)")
    print(f"perplexity: {n_chunk} chunks of {args.n_ctx} tokens, {scored_per_chunk(args.n_ctx)} scored per chunk "
          f"(positions {args.n_ctx // 2}..{args.n_ctx - 2} predict the next token), BOS "
          f"{'replaces each chunk start' if bos is not None else 'not added by this model'}, "
          f"n_batch {llm.runner.n_batch}, threads {llm.runner.n_threads}", file=log)

    if args.logits_out:
        n_bytes = n_chunk * scored_per_chunk(args.n_ctx) * llm.config.n_vocab * 4
        print(f"perplexity: --logits-out will write {n_bytes / 2**30:.2f} GiB (float32 logits of every scored "
              f"position; --chunks limits it)", file=log)

    # The running values are llama.cpp's progress line. On a terminal a tqdm bar (stderr) shows speed/ETA and
    # the line is printed at the end; otherwise (logs, pipes) the values stream out as llama.cpp prints them.
    from tqdm import tqdm

    show_bar = sys.stderr.isatty() and n_chunk > 1
    bar = tqdm(total=n_chunk, unit="chunk", file=sys.stderr, desc="perplexity") if show_bar else None
    stream_out = sys.stderr if args.json else sys.stdout

    def on_chunk(i, n, ppl):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ppl=f"{ppl:.4f}")
        else:
            stream_out.write(f"[{i + 1}]{ppl:.4f},")
            stream_out.flush()

    try:
        r = perplexity(llm.runner, tokens, args.n_ctx, bos_id=bos, max_chunks=args.chunks,
                       logits_out=args.logits_out, on_chunk=on_chunk)
    finally:
        if bar is not None:
            bar.close()
    if bar is not None:
        stream_out.write(",".join(f"[{i + 1}]{v:.4f}" for i, v in enumerate(r.running)) + ",")
    stream_out.write("\n")
    if args.logits_out:
        from .logits import tokens_path

        print(f"perplexity: saved {r.n_tokens_scored} x {llm.config.n_vocab} logits to {args.logits_out} "
              f"(targets: {tokens_path(args.logits_out)})", file=log)
    if args.json:
        print(json.dumps({
            "ppl": r.ppl, "ppl_err": r.ppl_err, "n_tokens_scored": r.n_tokens_scored, "n_chunks": r.n_chunks,
            "n_ctx": r.n_ctx, "text": describe(text), "seconds": round(r.seconds, 3),
            "nll_mean": r.nll_mean, "n_tokens": r.n_tokens, "text_source": source, "running": r.running,
            "model": str(llm.loaded.path), "n_threads": llm.runner.n_threads, "n_batch": llm.runner.n_batch,
            "ffn": llm.sparsity, "ffn_sparsity": llm.runner.ffn_sparsity(),
        }))
    else:
        print(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}")
        if llm.runner.sparse:
            print(f"perplexity: ffn {llm.sparsity}, {llm.runner.ffn_sparsity():.1%} of FFN neurons skipped per "
                  f"token", file=log)
        print(f"perplexity: {r.n_tokens_scored} tokens scored in {r.seconds:.2f} s "
              f"({r.n_chunks * args.n_ctx / r.seconds:.1f} tokens/s evaluated)", file=log)
    return 0
