"""`HybridRunner`: a placement over two tiers (DESIGN, "Tiers and placement"). The fast tier is the torch model
on a device (runtime/placement.py says what goes there): embeddings, attention with its KV cache, norms, the
output head and each layer's hot FFN neurons; the CPU tier computes the cold neurons with the C decoder's FFN
(sparse/hybrid.py). With `--hot-device cpu` the same code runs with the fast tier on the CPU."""
from __future__ import annotations

import time

import torch

from ..core.sparse_spec import LayerThresholds, SparseSpec
from ..formats.loader import LoadedModel
from ..formats.pages import release_file_pages
from ..model.kvcache import KVCache
from ..model.llama import Transformer
from ..sparse.hybrid import CpuTier, HybridFFN, TierTimes
from .placement import TierPlan
from .runner import CachedSequence, torch_cache_types


class HybridRunner(CachedSequence):
    compute = "hybrid"

    def __init__(self, loaded: LoadedModel, n_ctx: int, n_threads: int, n_batch: int, plan: TierPlan,
                 cache_types: tuple[str, str] | None = None):
        cfg = loaded.config
        cache_types = torch_cache_types(cache_types, "the fast tier (--vram-budget)")
        super().__init__(cfg, n_ctx, n_threads, n_batch)
        self.plan, self.device, self.weights = plan, plan.device, loaded.weights
        cold = any(len(h) < cfg.n_ff for h in plan.hot)
        self.cpu = CpuTier(cfg, loaded.weights, plan.hot, n_threads, self.device, self.n_batch) if cold else None
        self.cache_types = cache_types
        self.kv = KVCache.allocate(cfg.n_layer, self.n_ctx, cfg.n_head_kv * cfg.head_dim, device=self.device,
                                   type_k=cache_types[0], type_v=cache_types[1])

        def ffn(lw, config, dtype, layer):
            return HybridFFN(lw, config, plan.hot[layer], self.cpu, dtype, layer)

        self.model = Transformer(cfg, loaded.weights, ffn=ffn, dtype=plan.dtype).to(self.device)
        self.ffns: list[HybridFFN] = [block.ffn for block in self.model.layers]
        # Everything the fast tier needs is copied out of the model file: its pages leave this process, and the
        # CPU tier faults back in only the rows it computes (its cold neurons).
        release_file_pages(loaded)
        self.reset_ffn_stats()

    def set_sparse(self, spec: SparseSpec | None) -> None:
        """The activation rule on both tiers (None: dense, i.e. only exact zeros skipped)."""
        if spec is not None:
            spec.check(self.config.n_layer)
        for il, f in enumerate(self.ffns):
            f.set_rule(spec.layers[il] if spec is not None else LayerThresholds(),
                       spec.predictors if spec is not None else None)
        if self.cpu is not None:
            self.cpu.set_spec(spec)
        self.spec = spec
        self.reset_ffn_stats()

    def _forward(self, ids, all_logits):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(ids), self.n_batch):  # host buffers hold n_batch tokens
                chunk = ids[start:start + self.n_batch]
                logits = self.model(torch.tensor(chunk, dtype=torch.long, device=self.device),
                                    self.n_past + start, self.kv)
                out = logits.float().cpu() if all_logits or start + len(chunk) == len(ids) else None
                if all_logits:
                    parts = out if start == 0 else torch.cat([parts, out])
        self._seconds += time.perf_counter() - t0
        self._tokens += len(ids)
        return (parts if all_logits else out[-1]).numpy()

    def set_threads(self, n: int) -> None:
        self.n_threads = n
        if self.cpu is not None:
            self.cpu.dec.set_threads(n)

    # -- FFN neurons computed, on both tiers -----------------------------------------------------------------
    def last_ffn_layers(self) -> list[int]:
        """Neurons each layer computed for the last token (hot + cold)."""
        hot = torch.stack([f.last_kept for f in self.ffns]).cpu()
        cold = self.cpu.last_kept if self.cpu is not None else torch.zeros_like(hot)
        return (hot + cold).tolist()

    def last_ffn_tiers(self) -> tuple[list[int], list[int]]:
        """(hot, cold) neurons each layer computed for the last token: the fast tier's and the CPU's."""
        hot = torch.stack([f.last_kept for f in self.ffns]).cpu().tolist()
        return hot, (self.cpu.last_kept.tolist() if self.cpu is not None else [0] * len(hot))

    def _kept_fraction(self, per_layer: torch.Tensor, tokens: int) -> float:
        return per_layer.sum().item() / (tokens * self.config.n_layer * self.config.n_ff)

    def ffn_sparsity(self) -> float:
        """Fraction of FFN neurons skipped per token since reset_ffn_stats() (both tiers; 0 before any token)."""
        if not self._tokens:
            return 0.0
        total = torch.stack([f.kept_total for f in self.ffns]).cpu()
        if self.cpu is not None:
            total = total + self.cpu.kept_total
        return 1.0 - self._kept_fraction(total, self._tokens)

    def last_ffn(self) -> tuple[float, int] | None:
        """(sparsity, FFN weight bytes read) of the last token: the fast tier reads its hot rows whole, the CPU
        tier the rows of the cold neurons it computed."""
        if not self._tokens:
            return None
        kept = torch.tensor(self.last_ffn_layers())
        hot_bytes = sum(f.n_hot * b for f, b in zip(self.ffns, self.plan.neuron_bytes))
        cold_bytes = int(self.cpu.last_bytes.sum()) if self.cpu is not None else 0
        return 1.0 - self._kept_fraction(kept, 1), hot_bytes + cold_bytes

    # -- per-tier time ------------------------------------------------------------------------------------
    def reset_ffn_stats(self) -> None:
        self._seconds, self._tokens = 0.0, 0
        for f in getattr(self, "ffns", []):
            f.kept_total.zero_()
        if self.cpu is not None:
            self.cpu.times = TierTimes()
            self.cpu.kept_total.zero_()

    def tier_stats(self) -> dict | None:
        """Per-token milliseconds since reset: total, the CPU tier's C calls, copies across the boundary, the fast
        tier's FFN ops, and the rest (attention, head and Python) on the fast tier's side."""
        if not self._tokens:
            return None
        t = self.cpu.times if self.cpu is not None else TierTimes()
        per = 1e3 / self._tokens
        rest = self._seconds - t.cpu - t.copies - t.fast_ffn
        return {"tokens": self._tokens, "ms_per_token": self._seconds * per, "cpu_ms": t.cpu * per,
                "copies_ms": t.copies * per, "fast_ffn_ms": t.fast_ffn * per, "fast_rest_ms": rest * per}
