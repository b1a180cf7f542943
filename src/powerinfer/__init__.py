"""powerinfer: LLM inference that computes only the FFN neurons that fire (PowerInfer, arXiv 2312.12456)."""
__version__ = "0.1.0"


def load(path=None, **settings):
    """Load a model (GGUF file or HF directory; the bundled SmolLM2 when `path` is None) -> `LLM`."""
    from .api import load as _load

    return _load(path, **settings)
