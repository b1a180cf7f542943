"""One entry point for every model source: a GGUF file, an HF safetensors directory, or (None) the bundled model."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelFormatError, PowerInferError, one_line
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
    non_finite: list[str] = field(default_factory=list)  # tensors holding NaN/inf (loaded with allow_non_finite)

    @property
    def is_gguf(self) -> bool:
        return self.path.is_file()

    @property
    def has_predictors(self) -> bool:
        """The file carries PowerInfer predictors (`blk.N.fc1.weight` / `blk.N.fc2.weight`; sparse/predictor.py's
        predictors_from_gguf reads and checks them)."""
        return "blk.0.fc1.weight" in self.extra_tensors


def load_model(path: str | Path | None = None, allow_non_finite: bool = False) -> LoadedModel:
    """Load a GGUF file or an HF directory; None loads the bundled SmolLM2-135M-Instruct Q4_1.

    Every tensor is checked for NaN/inf (formats/finite.py): ModelFormatError names the first one, unless
    `allow_non_finite` (--allow-non-finite), which loads the model and lists them in `non_finite`."""
    if path is None:
        from .bundled import bundled_model_path

        path = bundled_model_path()
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file or directory")
    if path.is_dir():
        from .hf import describe_dtypes, load_hf

        config, weights, metadata = load_hf(path)
        loaded = LoadedModel(config, weights, metadata, path, describe_dtypes(weights))
    else:
        from .gguf import load_gguf

        m = load_gguf(path)
        loaded = LoadedModel(m.config, m.weights, m.metadata, path, m.file_type, m.conversion_report,
                             m.powerinfer_gguf, m.extra_tensors)
    from .finite import nonfinite_tensors

    loaded.non_finite = nonfinite_tensors(loaded.weights)
    if loaded.non_finite and not allow_non_finite:
        more = f" (and {len(loaded.non_finite) - 1} more tensors)" if len(loaded.non_finite) > 1 else ""
        raise ModelFormatError(f"{path}: tensor {loaded.non_finite[0]} holds NaN or infinite values{more}; the file "
                               "is corrupt (--allow-non-finite loads it anyway)")
    return loaded


def load_tokenizer(loaded: LoadedModel):
    """The model's tokenizer (`formats.tokenizer.Tokenizer`): from the GGUF metadata, or an HF directory's files."""
    from .tokenizer import Tokenizer

    meta = loaded.metadata
    if "tokenizer.ggml.model" not in meta and loaded.path.is_dir():
        from .hf_tokenizer import metadata_from_hf_dir

        meta = {**meta, **metadata_from_hf_dir(loaded.path)}
    try:
        tok = Tokenizer.from_gguf_metadata(meta)
    except PowerInferError:
        raise
    except Exception as e:  # metadata of the wrong types or shapes (a hostile or corrupt file)
        raise ModelFormatError(f"{loaded.path}: unreadable tokenizer metadata ({type(e).__name__}: "
                               f"{one_line(e)})") from None
    if tok.vocab_size > loaded.config.n_vocab:
        # token ids index the embedding rows: a longer vocabulary would read past them
        raise ModelFormatError(f"{loaded.path}: the tokenizer has {tok.vocab_size} tokens but the embedding has "
                               f"{loaded.config.n_vocab} rows")
    return tok
