"""`DiskRunner`: the C decoder with a RAM budget (`--ram-budget`): the dense parts and the hot FFN neurons in RAM,
the other neurons in a neuron-bundle file read when they fire (DESIGN "Tiers and placement"; runtime/
disk_placement.py says what stays resident, runtime/neuron_bundles.py what the file holds, kernels/csrc/disk.c
how a step reads it). Still one C call per token: the reads happen inside it, per layer, right after the layer's
active set is known.

The placement depends on the activation rule (with predictors the gate rows move to disk), so it is made when
the rule is set (`set_sparse`, which the API calls at load). A prompt is evaluated one decode step per token (the
batched prefill reads every FFN row). The model file's and the bundle file's pages are dropped from the page cache
when the tier is set up, so the first tokens read from the disk, not from memory the budget does not count.
"""
from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path

import numpy as np

from gguf import GGMLQuantizationType as Q

from .. import kernels
from ..core.sparse_spec import SparseSpec
from ..core.tensor import row_bytes
from ..errors import PowerInferError
from ..formats.pages import drop_file_cache, release_file_pages
from ..sparse.artifacts import DEFAULT_CACHE_DIR, model_fingerprint
from .c_runner import CRunner
from .disk_placement import RamPlan, plan_ram
from .neuron_bundles import bundle_path, check_bundles, device_block, fill_bundles, layer_rows, write_bundles

# Reader threads: parallel reads give 2.5-3x one reader's throughput here (8 threads 488-516 MB/s, 32 threads
# 765 MB/s buffered; reference/hybrid.md 5.3); they block in pread, so they cost no CPU while waiting. On a 4-layer
# 7B-shaped synthetic at 0.3 GiB (~1,600 bundles a token): 8 readers 503 MB/s while waiting, 32 readers 632-638.
IO_THREADS = 32


class DiskRunner(CRunner):
    compute = "c"

    def __init__(self, loaded, n_ctx: int, n_threads: int, n_batch: int, ram_budget: float, solve=None,
                 log=sys.stderr, cache_dir: Path | None = None, gate_resident: bool = True,
                 cache_types: tuple[str, str] | None = None):
        cfg = loaded.config
        if cache_types is not None:  # -ctk/-ctv, read by CRunner's allocation
            self.cache_types = tuple(cache_types)
        if cfg.ffn_kind == "mlp" and gate_resident:
            gate_resident = False  # an act(up) MLP has no gate: its activity needs predictors (set_sparse says so)
        pack = kernels.PACK_GATE if gate_resident else 0
        # the packed copies are the resident ones (CRunner gives each layer's file pages back once it is packed)
        super().__init__(loaded, n_ctx, n_threads, n_batch, pack_ffn=pack)
        self.ram_budget, self.solve, self.log = ram_budget, solve, log
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / model_fingerprint(loaded)
        self.plan: RamPlan | None = None
        self.bundles: Path | None = None
        self.bundle_bytes = 0
        self._gate_resident = gate_resident
        self._kept_counts = kernels.KeptCounts(self.decoder, cfg.n_layer)
        self._disk_tokens = 0
        self._t_disk = time.perf_counter()

    # -- the placement, made with the activation rule ------------------------------------------------------
    def set_sparse(self, spec: SparseSpec | None) -> None:
        cfg = self.config
        if spec is None:
            raise PowerInferError("--ram-budget needs the sparse FFN (--sparsity auto on a ReLU model, or "
                                  "predictors): the dense FFN reads every neuron of every layer")
        spec.check(cfg.n_layer)
        if any(th.x > 0 for th in spec.layers):
            raise PowerInferError("--ram-budget does not combine with input-channel thresholds (teal methods): they "
                                  "read input-major copies of the whole FFN")
        preds = spec.predictors
        exact_relu = cfg.activation == "relu" and cfg.ffn_kind != "mlp"
        if preds is None and not exact_relu:
            raise PowerInferError("--ram-budget without predictors needs a gated ReLU model (its gate rows decide "
                                  f"which neurons fire); this model's FFN is {cfg.activation} {cfg.ffn_kind}: pass "
                                  "--predictors")
        gate_resident = preds is None
        plan = plan_ram(self.loaded, self.ram_budget, self.n_ctx, gate_resident, preds, self.solve, self.log,
                        device_block(self.cache_dir))
        self.decoder.disk_close()
        if gate_resident != self._gate_resident:
            self.decoder.set_pack_ffn(kernels.PACK_GATE if gate_resident else 0)
            self._gate_resident = gate_resident
        binder = kernels.SparseFFN(self.decoder, cfg, self.weights)
        binder.bind_predictors(preds)
        self._pred_keep = binder._pred_keep
        self._open(plan)
        for il, th in enumerate(spec.layers):
            lay, where, off = plan.layouts[il], self._where[il], self._off[il]
            self.decoder.disk_layer(il, where.ctypes.data, off.ctypes.data, lay.bundle_bytes, lay.gate_qtype,
                                    lay.gate_off, lay.up_qtype, lay.up_off, lay.down_qtype, lay.down_off,
                                    float(th.h))
        # Everything resident is a copy now: the model file's pages leave this process and the page cache.
        release_file_pages(self.loaded)
        drop_file_cache(self.loaded.path)
        drop_file_cache(self.bundles)
        self.plan, self.spec = plan, spec
        self.reset_ffn_stats()

    def _open(self, plan: RamPlan) -> None:
        cfg = self.config
        fp = model_fingerprint(self.loaded)
        path = bundle_path(self.cache_dir, self.loaded.path)
        offsets = None
        if path.is_file():
            try:
                offsets = check_bundles(path, fp, plan)
            except PowerInferError as e:
                if "another placement" not in str(e):  # another model's, truncated or corrupt: the user decides
                    raise
                print(f"note: {e}: writing them again", file=self.log)  # a new budget: the cache follows it
        if offsets is None:
            size = write_bundles(path, self.loaded, fp, plan, log=self.log)
            print(f"neuron bundles: {path}, {size / 2**30:.3f} GiB on disk ({size / self.model_file_bytes():.1%} of the "
                  "model file)", file=self.log)
            offsets = check_bundles(path, fp, plan)
        self.bundles, self.bundle_bytes = path, path.stat().st_size
        n_res = sum(len(r) for r in plan.resident)
        base = self.decoder.disk_open(str(path), plan.slot_bytes, n_res, plan.cache_slots, IO_THREADS, True)
        arena = np.frombuffer((ctypes.c_uint8 * (n_res * plan.slot_bytes)).from_address(base), dtype=np.uint8) \
            if n_res else np.zeros(0, dtype=np.uint8)
        arena = arena.reshape(n_res, plan.slot_bytes)
        self._where, self._off, slot = [], [], 0
        for il in range(cfg.n_layer):
            res, dsk, lay = plan.resident[il], plan.disk[il], plan.layouts[il]
            where = np.full(cfg.n_ff, -1, dtype=np.int32)
            off = np.full(cfg.n_ff, -1, dtype=np.int64)
            where[res] = np.arange(slot, slot + len(res), dtype=np.int32)
            off[dsk] = offsets[il] + np.arange(len(dsk), dtype=np.int64) * lay.bundle_bytes
            if len(res):
                fill_bundles(arena[slot:slot + len(res)], layer_rows(self.weights.layers[il]), res, lay)
                release_file_pages(self.loaded)
            slot += len(res)
            self._where.append(where)
            self._off.append(off)

    def model_file_bytes(self) -> int:
        try:
            return max(1, Path(self.loaded.path).stat().st_size)
        except OSError:
            return 1

    # -- forward: one decode step per token ------------------------------------------------------------------
    def _forward(self, ids, all_logits):
        if self.plan is None:  # no FFN is bound until the placement exists: the decoder would read unset layers
            raise PowerInferError("--ram-budget places the FFN when the sparse rule is set: call set_sparse(spec) "
                                  "before eval (powerinfer.load and the commands do)")
        self._last_step = len(ids) == 1 and not all_logits
        out = np.empty((len(ids), self.config.n_vocab), dtype=np.float32) if all_logits else None
        for i, tok in enumerate(ids):
            self._embed_into([tok])
            dst = kernels.address(out[i]) if all_logits else (self._logits_addr if i == len(ids) - 1 else 0)
            self.decoder.step(self._x_addr, self.n_past + i, dst)
            self._record_ffn()
            self._disk_tokens += 1
        err = self.decoder.disk_stats()["error"]
        if err:
            import os

            raise PowerInferError(f"{self.bundles}: reading neuron bundles failed ({os.strerror(err)})")
        return out if all_logits else self._logits

    # -- statistics -----------------------------------------------------------------------------------------
    def _kept(self) -> kernels.Kept:
        return self._kept_counts.read()

    def _record_ffn(self) -> None:
        self._add_kept(self._kept())

    def reset_ffn_stats(self) -> None:
        super().reset_ffn_stats()
        if getattr(self, "plan", None) is not None:
            self.decoder.disk_stats(True)
        self._disk_tokens = 0

    def _layer_bytes(self, kept: kernels.Kept) -> np.ndarray:
        """FFN weight bytes each layer read (from RAM or disk) with these counts: gate (the dense matrix, or the
        candidates' rows), the up rows of neurons that can fire and the kept neurons' down_t rows."""
        w = self.weights.layers
        gate = np.array([lw.gate_proj.nbytes if self._gate_resident and lw.gate_proj is not None else 0
                         for lw in w], dtype=np.float64)
        row = lambda t: np.array([getattr(lw, t).row_bytes if getattr(lw, t) is not None else 0  # noqa: E731
                                  for lw in w], dtype=np.float64)
        down = np.array([row_bytes(Q(lay.down_qtype), self.config.d_model) for lay in self.plan.layouts],
                        dtype=np.float64)
        neurons, _, up_rows, gate_rows = (np.asarray(k, dtype=np.float64) for k in kept)
        return gate + gate_rows * row("gate_proj") + up_rows * row("up_proj") + neurons * down

    def ffn_stats(self) -> dict | None:
        if not self._ffn_steps:
            return None
        cfg, n = self.config, self._ffn_steps
        mean = kernels.Kept(*(self._ffn_kept / n))
        dense = sum(t.nbytes for lw in self.weights.layers for t in (lw.gate_proj, lw.up_proj, lw.down_proj)
                    if t is not None)
        return {"steps": n, "sparsity": 1.0 - float(mean.neurons.sum()) / (cfg.n_layer * cfg.n_ff),
                "sparsity_per_layer": (1.0 - mean.neurons / cfg.n_ff).tolist(),
                "input_sparsity_per_layer": [0.0] * cfg.n_layer,
                "ffn_bytes_per_token": float(self._layer_bytes(mean).sum()), "ffn_dense_bytes": dense}

    def last_ffn_layers(self) -> list[int] | None:
        return self._kept().neurons.tolist() if self._ffn_steps else None

    def last_ffn(self) -> tuple[float, int] | None:
        if not self._last_step:
            return None
        kept = self._kept()
        cfg = self.config
        return (1.0 - float(kept.neurons.sum()) / (cfg.n_layer * cfg.n_ff), int(self._layer_bytes(kept).sum()))

    def disk_stats(self) -> dict | None:
        """Per token since reset_ffn_stats(): bytes read from the bundle file, reads (preadv calls) and bundles,
        the neuron cache's hit rate over disk neurons that fired, and the seconds the step waited for reads."""
        s = self.decoder.disk_stats()
        if s is None:
            return None
        n = max(1, self._disk_tokens)
        fired = s["hits"] + s["misses"]
        return {"tokens": self._disk_tokens, "bytes_per_token": s["bytes"] / n, "reads_per_token": s["reads"] / n,
                "bundles_per_token": s["bundles"] / n, "cache_hits": s["hits"], "cache_misses": s["misses"],
                "hit_rate": s["hits"] / fired if fired else 1.0, "resident_fired_per_token": s["resident"] / n,
                "io_wait_ms_per_token": s["wait_ns"] / n / 1e6,
                "read_rate_mb_s": s["bytes"] / s["wait_ns"] * 1e3 if s["wait_ns"] else None,
                "o_direct": bool(s["direct"]), "bundle_file": str(self.bundles), "bundle_file_bytes": self.bundle_bytes,
                "budget_bytes": self.plan.budget, "resident_bytes": self.plan.used}
