"""Measurement tools users of llama.cpp expect: `perplexity` (llama-perplexity), `bench` (llama-bench) and
`compare-logits` (a run against a run on the same tokens).

Each module is the computation, as plain functions (usable from Python and tests); the subcommands' flag parsing
and printing live in commands/measure.py.
"""
