"""Offline pipeline that drives the runtime (DESIGN, "Layers"): calibrate thresholds (calibrate.py), profile neuron
firing (profile.py), train predictors (train.py), solve placement (solve.py), convert/export upstream layouts
(convert.py), and all of it for one model (pipeline.py).

Each module is the computation, as plain functions that take an option dataclass (options.py) or plain arguments;
the subcommands' flag parsing and printing live in commands/prepare.py.
"""
