"""`powerinfer perplexity` (llama-perplexity), `compare-logits` and `bench` (llama-bench)."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace

from ..api import LLM
from ..errors import PowerInferError
from ..measure.bench import bench, markdown_header, markdown_row, model_summary
from ..measure.logits import compare, tokens_path
from ..measure.perplexity import n_chunks_for, perplexity, scored_per_chunk
from ..options import BenchOptions, CompareLogitsOptions, PerplexityOptions
from ..prepare.calibrate import calibrate_default
from ..prepare.solve import solve_hot_sets
from ..settings import ModelSettings, SamplingParams, from_namespace
from ..textdata import describe, pydoc_topics, read_text
from . import disk_line, load_model_noted


# -- perplexity ----------------------------------------------------------------------------------------------------

def cmd_perplexity(args) -> int:
    """Perplexity scored exactly like llama.cpp's llama-perplexity: the text is tokenized once (BOS first if the
    model adds one), cut into chunks of -c tokens, each evaluated from an empty context (first token replaced by
    BOS if the model adds one); only the second half of each chunk is scored (the tokens at positions c/2 .. c-1,
    predicted from the logits before them: c - c/2 per chunk). Prints the running PPL per chunk ([1]x,[2]y,...)
    and 'PPL = x +/- err'. Without -f the default evaluation text (English pydoc topics of this Python, eval
    split) is used. With --sparsity every position is scored through single-token decode steps, so the number is
    the sparse model's."""
    opts = from_namespace(PerplexityOptions, args)
    settings = from_namespace(ModelSettings, args, n_ctx=opts.n_ctx)
    settings = replace(settings, n_batch=min(settings.n_batch, opts.n_ctx))
    n_ctx, log = opts.n_ctx, sys.stderr
    if opts.file is not None:
        text, source = read_text(opts.file), opts.file
    else:
        text, source = pydoc_topics("eval"), "default evaluation text (pydoc_data.topics, eval split)"

    llm = LLM(load_model_noted(settings.model, settings.allow_non_finite), settings, SamplingParams())
    tok = llm.tokenizer
    # As llama.cpp: BOS per the model, special-token text in the corpus stays text.
    tokens = tok.encode(text, add_bos=None, parse_special=False)
    bos = tok.bos_id if tok.add_bos else None
    ctx_trained = llm.config.context_length
    if ctx_trained and n_ctx > ctx_trained:
        print(f"warning: -c {n_ctx} exceeds the model's trained context of {ctx_trained}", file=log)
    n_chunk = n_chunks_for(len(tokens), n_ctx, opts.chunks)
    print(f"perplexity: text: {source} ({describe(text)}), {len(tokens)} tokens", file=log)
    if n_chunk <= 0:
        raise PowerInferError(f"the text has {len(tokens)} tokens; one chunk needs {n_ctx} "
                              f"(use a longer text or a smaller -c)")
    print(f"perplexity: {n_chunk} chunks of {n_ctx} tokens, {scored_per_chunk(n_ctx)} scored per chunk "
          f"(positions {n_ctx // 2}..{n_ctx - 2} predict the next token), BOS "
          f"{'replaces each chunk start' if bos is not None else 'not added by this model'}, "
          f"n_batch {llm.runner.n_batch}, threads {llm.runner.n_threads}", file=log)
    if opts.logits_out:
        n_bytes = n_chunk * scored_per_chunk(n_ctx) * llm.config.n_vocab * 4
        print(f"perplexity: --logits-out will write {n_bytes / 2**30:.2f} GiB (float32 logits of every scored "
              f"position; --chunks limits it)", file=log)

    # The running values are llama.cpp's progress line. On a terminal a tqdm bar (stderr) shows speed/ETA and
    # the line is printed at the end; otherwise (logs, pipes) the values stream out as llama.cpp prints them.
    from tqdm import tqdm

    show_bar = sys.stderr.isatty() and n_chunk > 1
    bar = tqdm(total=n_chunk, unit="chunk", file=sys.stderr, desc="perplexity") if show_bar else None
    stream_out = sys.stderr if opts.json else sys.stdout

    # With --ram-budget a long run also says what the disk tier costs, chunk by chunk (counters since the start)
    disk_stats = getattr(llm.runner, "disk_stats", None)

    def on_chunk(i, n, ppl):
        disk = disk_stats() if disk_stats else None
        if bar is not None:
            bar.update(1)
            if disk and disk["tokens"]:
                bar.set_postfix(ppl=f"{ppl:.4f}", disk=f"{disk['bytes_per_token'] / 2**20:.1f}MiB/tok",
                                hit=f"{disk['hit_rate']:.0%}", io_wait=f"{disk['io_wait_ms_per_token']:.0f}ms/tok")
            else:
                bar.set_postfix(ppl=f"{ppl:.4f}")
        else:
            stream_out.write(f"[{i + 1}]{ppl:.4f},")
            stream_out.flush()
            if disk and disk["tokens"]:
                print(f"\nperplexity: chunk {i + 1}/{n}: {disk_line(disk)}", file=log)

    try:
        r = perplexity(llm.runner, tokens, n_ctx, bos_id=bos, max_chunks=opts.chunks, logits_out=opts.logits_out,
                       on_chunk=on_chunk)
    finally:
        if bar is not None:
            bar.close()

    if bar is not None:
        stream_out.write(",".join(f"[{i + 1}]{v:.4f}" for i, v in enumerate(r.running)) + ",")
    stream_out.write("\n")
    if opts.logits_out:
        print(f"perplexity: saved {r.n_tokens_scored} x {llm.config.n_vocab} logits to {opts.logits_out} "
              f"(targets: {tokens_path(opts.logits_out)})", file=log)
    if opts.json:
        print(json.dumps({
            "ppl": r.ppl, "ppl_err": r.ppl_err, "n_tokens_scored": r.n_tokens_scored, "n_chunks": r.n_chunks,
            "n_ctx": r.n_ctx, "text": describe(text), "seconds": round(r.seconds, 3),
            "nll_mean": r.nll_mean, "n_tokens": r.n_tokens, "text_source": source, "running": r.running,
            "model": str(llm.loaded.path), "n_threads": llm.runner.n_threads, "n_batch": llm.runner.n_batch,
            "ffn": llm.sparsity, "ffn_sparsity": llm.runner.ffn_sparsity(),
        }))
        return 0
    print(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}")
    if llm.runner.sparse:
        print(f"perplexity: ffn {llm.sparsity}, {llm.runner.ffn_sparsity():.1%} of FFN neurons skipped per token",
              file=log)
    print(f"perplexity: {r.n_tokens_scored} tokens scored in {r.seconds:.2f} s "
          f"({r.n_chunks * n_ctx / r.seconds:.1f} tokens/s evaluated)", file=log)
    return 0


# -- compare-logits ------------------------------------------------------------------------------------------------

def cmd_compare_logits(args) -> int:
    """Compare two runs scored on the same tokens, each saved with `powerinfer perplexity --logits-out FILE.npy`
    (logits [n_scored, n_vocab] plus FILE.tokens.npy with the targets). Prints top-1 agreement, mean KL(A||B) in
    nats and both perplexities. A is the reference."""
    opts = from_namespace(CompareLogitsOptions, args)
    c = compare(opts.a, opts.b)
    if opts.json:
        print(json.dumps({"a": str(opts.a), "b": str(opts.b), **asdict(c)}))
        return 0
    print(f"compared {c.n_tokens} scored tokens (vocabulary {c.n_vocab})")
    print(f"top-1 agreement  {100 * c.top1_agreement:.2f} %")
    print(f"mean KL(A||B)    {c.kl_mean:.6f} nats (max {c.kl_max:.4f})")
    print(f"PPL A            {c.ppl_a:.4f} +/- {c.ppl_a_err:.5f}   {opts.a}")
    print(f"PPL B            {c.ppl_b:.4f} +/- {c.ppl_b_err:.5f}   {opts.b}")
    return 0


# -- bench ---------------------------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    """Prompt processing (ppN: N tokens from an empty cache) and generation (tgN: N single-token decode steps)
    speed, one untimed warm-up then -r timed repetitions per test and thread count, like llama-bench. Lists are
    comma-separated: -t 1,2 -p 128,512; -d 4096 runs them after 4096 tokens of context. GB/s counts the bytes one
    decode step reads: the weights (all layer matrices + norms + output head + one embedding row; FFN rows scaled by
    1 - sparsity when the runner skips neurons) and the KV-cache rows it attends over; with --sparsity the tg tests
    decode with the sparse FFN. Prints a markdown table, or JSON."""
    opts = from_namespace(BenchOptions, args)
    settings = from_namespace(ModelSettings, args)
    loaded = load_model_noted(settings.model, settings.allow_non_finite)
    model = model_summary(loaded)
    if not opts.json:
        print(markdown_header())

    def on_result(r):
        if not opts.json:
            print(markdown_row(model, r), flush=True)

    # --sparsity S calibrates missing thresholds on first use, as run does.
    doc = bench(loaded, opts, settings.n_batch, settings.sparsity, settings.sparse_method, settings.predictors,
                calibrate=calibrate_default, placement=settings, solve=solve_hot_sets, on_result=on_result,
                log=sys.stderr, cache_types=(settings.cache_type_k, settings.cache_type_v))
    if opts.json:
        print(json.dumps(doc, indent=1))
        return 0
    sparse = any(r["sparsity_source"] == "runner" for r in doc["results"])
    print(f"\nGB/s: {model['bytes_per_token'] / 2**20:.1f} MiB of weights per generated token (layer matrices, norms, "
          f"output head, one embedding row; {'tg: the FFN bytes read' if sparse else 'dense FFN'}) "
          f"plus the KV-cache rows each step attends over, x t/s. "
          f"FFN: {doc['settings']['ffn']}. Peak RSS {doc['peak_rss_mib']:.0f} MiB. "
          f"{opts.repetitions} repetitions{'' if opts.no_warmup else ' after 1 warm-up'}, "
          f"random token ids (seed {opts.seed}).")
    for r in doc["results"]:
        if r["phases_ms_per_token"]:
            phases = ", ".join(f"{k} {v:.3f}" for k, v in r["phases_ms_per_token"].items())
            print(f"{r['test']} t={r['n_threads']}: ms/token by phase: {phases}")
    return 0
