"""One entry point for every model source: a GGUF file, an HF safetensors directory, or (None) the bundled model."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelFormatError
from ..core.config import ModelConfig
from ..core.weights import ModelWeights
from .quants import ConversionReport
from ..core.tensor import QTensor


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: ModelWeights
    metadata: dict  # GGUF key/values as plain Python values; for HF dirs a few GGUF-style keys + "hf.config"
    path: Path  # the GGUF file, or the HF directory (where its tokenizer files are)
    file_type: str  # e.g. "Q4_1 (Q4_1 210, F32 61, Q8_0 1)"
    conversion_report: ConversionReport = field(default_factory=ConversionReport)  # empty: nothing converted
    powerinfer_gguf: bool = False  # a PowerInfer (PWRI magic) file
    extra_tensors: dict[str, QTensor] = field(default_factory=dict)  # tensors not in `weights` (fc1/fc2, ...)

    @property
    def is_gguf(self) -> bool:
        return self.path.is_file()


def load_model(path: str | Path | None = None) -> LoadedModel:
    """Load a GGUF file or an HF directory; None loads the bundled SmolLM2-135M-Instruct Q4_1."""
    if path is None:
        from .bundled import bundled_model_path

        path = bundled_model_path()
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file or directory")
    if path.is_dir():
        from .hf import describe_dtypes, load_hf

        config, weights, metadata = load_hf(path)
        return LoadedModel(config, weights, metadata, path, describe_dtypes(weights))
    from .gguf import load_gguf

    m = load_gguf(path)
    return LoadedModel(m.config, m.weights, m.metadata, path, m.file_type, m.conversion_report,
                       m.powerinfer_gguf, m.extra_tensors)


def load_tokenizer(loaded: LoadedModel):
    """The model's tokenizer (`formats.tokenizer.Tokenizer`): from the GGUF metadata, or an HF directory's files."""
    from .tokenizer import Tokenizer

    meta = loaded.metadata
    if "tokenizer.ggml.model" not in meta and loaded.path.is_dir():
        from .hf_tokenizer import metadata_from_hf_dir

        meta = {**meta, **metadata_from_hf_dir(loaded.path)}
    return Tokenizer.from_gguf_metadata(meta)
