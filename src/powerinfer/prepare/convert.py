"""`powerinfer convert`: write a PowerInfer GGUF (formats/powerinfer_gguf.py) from a GGUF and predictors."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import PowerInferError
from ..formats.powerinfer_gguf import OUTTYPES, write_powerinfer_gguf


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="write a PowerInfer GGUF (PWRI, ffn_down_t, fc1/fc2 predictors)",
                       description="Convert a GGUF model plus predictors (ours from `powerinfer train-predictors`, "
                                   "or an upstream predictor directory of model_N.pt files) into PowerInfer's GGUF "
                                   "layout, readable by upstream PowerInfer and by powerinfer.")
    p.add_argument("-m", "--model", metavar="PATH",
                   help="GGUF file or HF llama-family directory (default: the bundled model)")
    p.add_argument("--predictors", metavar="FILE_OR_DIR",
                   help="predictor file (.safetensors from train-predictors) or upstream directory (model_N.pt); "
                        "default: the model's cached predictors if any, else none (ffn_down_t only)")
    p.add_argument("--outtype", choices=list(OUTTYPES), default="same",
                   help="2-D weight format: same keeps each tensor's (down_t: exact for floats, Q8_0 for block "
                        "formats); f32 | f16 | q8_0 | q4_0 convert every matrix (default: same)")
    p.add_argument("-o", "--output", metavar="OUT.powerinfer.gguf", required=True, help="file to write")
    p.set_defaults(func=func)


def func(args) -> int:
    from ..formats.bundled import bundled_model_path
    from ..formats.loader import load_model
    from ..sparse.artifacts import model_fingerprint
    from ..sparse.predictor import PredictorSet
    from .train import default_predictors_path

    src = Path(args.model).expanduser() if args.model else bundled_model_path()
    loaded = load_model(src)
    fp = model_fingerprint(loaded)
    preds = None
    if args.predictors:
        p = Path(args.predictors).expanduser()
        preds = PredictorSet.from_upstream_dir(p) if p.is_dir() else PredictorSet.load(p, fp)
    elif default_predictors_path(fp).is_file():
        preds = PredictorSet.load(default_predictors_path(fp), fp)
        print(f"convert: predictors {default_predictors_path(fp)}", file=sys.stderr)
    if preds is not None and preds.n_layer != loaded.config.n_layer:
        raise PowerInferError(f"{preds.n_layer} predictor layers for a {loaded.config.n_layer}-layer model")
    out = write_powerinfer_gguf(src, Path(args.output).expanduser(), preds, args.outtype)
    ranks = "none" if preds is None else f"{preds.n_layer} layers, ranks {min(preds.ranks())}..{max(preds.ranks())}"
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; predictors: {ranks})")
    return 0
