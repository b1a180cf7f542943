"""FFN backends chosen by name (STYLE 2): importing this module registers every backend (dense, relu,
threshold, predictor) in sparse/base.py's registry. Each is tested against "dense".
"""
from __future__ import annotations

from ..model.ffn import DenseFFN, FFNWeights, activation_fn, ffn_hidden
from . import predictor_ffn, relu, threshold  # noqa: F401  (they register themselves)
from .base import ffn_factory, ffn_names, make_ffn, register_ffn

__all__ = ["DenseFFN", "FFNWeights", "activation_fn", "ffn_hidden", "ffn_factory", "ffn_names", "make_ffn",
           "register_ffn"]
