"""Offline pipeline that drives the runtime (DESIGN, "Layers"): calibrate thresholds (calibrate.py); later,
profile neuron firing, train predictors, solve placement, convert/export upstream layouts.

Each module exposes its computation as functions plus `add_parser(sub)` / `func(args)` for its CLI subcommand.
"""
