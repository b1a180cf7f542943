"""Measurement tools users of llama.cpp expect: `perplexity` (llama-perplexity), `bench` (llama-bench) and
`compare-logits` (a run against a run on the same tokens).

Each module exposes the computation as functions (usable from Python and tests) plus `add_parser(sub)`, which
registers its CLI subcommand, and `func(args) -> int`, which runs it.
"""
