"""`TorchRunner`: the torch reference model (model/llama.py) on a device. It is the slow twin the C decoder is
tested against, the path for devices other than the CPU, and what the offline pipeline's probes run; the FFN
backend is picked by name here (sparse/ffn.py), from the runner's `SparseSpec`."""
from __future__ import annotations

import torch

from ..core.sparse_spec import SparseSpec
from ..formats.loader import LoadedModel
from ..model.kvcache import KVCache
from ..model.llama import Transformer
from ..sparse.ffn import ffn_factory
from .runner import CachedSequence, torch_cache_types


class TorchRunner(CachedSequence):
    compute = "torch"

    def __init__(self, loaded: LoadedModel, n_ctx: int, n_threads: int, n_batch: int = 512, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, cache_types: tuple[str, str] | None = None):
        cfg = loaded.config
        super().__init__(cfg, n_ctx, n_threads, n_batch)
        self.device, self.dtype = torch.device(device), dtype
        self.weights = loaded.weights
        self.cache_types = torch_cache_types(cache_types, "the torch model")
        self.kv = KVCache.allocate(cfg.n_layer, self.n_ctx, cfg.n_head_kv * cfg.head_dim, device=self.device,
                                   type_k=self.cache_types[0], type_v=self.cache_types[1])
        self.model = self._build(None)

    def _build(self, spec: SparseSpec | None) -> Transformer:
        if spec is None:
            ffn = ffn_factory("dense")
        elif spec.predictors is not None:
            ffn = ffn_factory("predictor", predictors=spec.predictors)
        elif spec.method == "relu":  # exact zeros: the gate is the oracle
            ffn = ffn_factory("relu")
        else:
            ffn = ffn_factory("threshold", thresholds={site: spec.site(site) for site in ("x", "h")})
        return Transformer(self.config, self.weights, ffn=ffn, dtype=self.dtype).to(self.device)

    def set_sparse(self, spec: SparseSpec | None) -> None:
        if spec is not None:
            spec.check(self.config.n_layer)
        self.model = self._build(spec)
        self.spec = spec

    def _forward(self, ids, all_logits):
        with torch.inference_mode():
            logits = self.model(torch.tensor(ids, dtype=torch.long, device=self.device), self.n_past, self.kv)
        logits = logits.float().cpu().numpy()
        return logits if all_logits else logits[-1]
