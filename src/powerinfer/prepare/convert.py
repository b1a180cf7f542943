"""`powerinfer convert`: write a PowerInfer GGUF (formats/powerinfer_gguf.py) from a GGUF and predictors."""
from __future__ import annotations

import sys
from pathlib import Path

from ..formats.powerinfer_gguf import write_powerinfer_gguf
from ..sparse.predictor import PredictorSet


def convert_model(model: str | None, output: str, predictors: str | None = None, outtype: str = "same",
                  log=sys.stderr) -> tuple[Path, PredictorSet | None]:
    """The GGUF file or HF directory `model` (None: the bundled model) with `predictors` (ours from
    train-predictors, or an upstream directory of model_N.pt; None: the model's cached ones if any, else none)
    written to `output` in PowerInfer's layout, 2-D weights as `outtype`. Returns the file and the predictors."""
    from ..formats.bundled import bundled_model_path
    from ..formats.loader import load_model
    from ..sparse.artifacts import model_fingerprint
    from .train import default_predictors_path

    src = Path(model).expanduser() if model else bundled_model_path()
    loaded = load_model(src)
    fp = model_fingerprint(loaded)
    preds = None
    if predictors:
        p = Path(predictors).expanduser()
        preds = PredictorSet.from_upstream_dir(p, loaded.config) if p.is_dir() else \
            PredictorSet.load(p, fp, loaded.config)
    elif default_predictors_path(fp).is_file():
        preds = PredictorSet.load(default_predictors_path(fp), fp, loaded.config)
        print(f"convert: predictors {default_predictors_path(fp)}", file=log)
    return write_powerinfer_gguf(src, Path(output).expanduser(), preds, outtype), preds
