"""`CRunner`: the compiled CPU decoder (kernels/). One C call per decode step (`Decoder.step` runs every layer
and the output head), one per prompt chunk (`Decoder.prefill`); weights and the KV cache are bound once
(DESIGN decision 3: torch-eager glue costs 120-230 us per layer).

Its buffers, KV cache and RoPE tables are numpy arrays and its logits numpy float32, so a process that decodes with
it never imports torch (#17: torch's import took 0.9 s and 177 MiB of `powerinfer run`'s 1.5 s and 398 MiB on the
bundled model), dense or sparse (predictors excepted: the trained ones are torch modules, sparse/predictor.py)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .. import _C
from ..core.sparse_spec import SparseSpec
from ..core.tensor import row_bytes
from ..errors import PowerInferError
from ..formats.loader import LoadedModel
from ..formats.pages import available_memory, release_file_pages
from ..kernels.arrays import address
from ..kernels.decoder import PACK_ALL, bind_decoder
from ..kernels.sparse_ffn import Kept, SparseFFN
from ..model.kvcache import KVCache
from ..model.rope import rope_tables
from .runner import CachedSequence


class CRunner(CachedSequence):
    compute = "c"
    device = "cpu"

    def __init__(self, loaded: LoadedModel, n_ctx: int, n_threads: int, n_batch: int = 512,
                 pack_ffn: int = PACK_ALL, cache_types: tuple[str, str] | None = None):
        cfg = loaded.config
        super().__init__(cfg, n_ctx, n_threads, n_batch)
        self.weights, self.loaded = loaded.weights, loaded
        if cache_types is not None:  # -ctk/-ctv (a subclass may have set self.cache_types before)
            self.cache_types = tuple(cache_types)
        self.kv = KVCache.allocate_arrays(cfg.n_layer, self.n_ctx, cfg.n_head_kv * cfg.head_dim,
                                          type_k=self.cache_types[0], type_v=self.cache_types[1])
        # the RoPE tables live on in the decoder, which holds every array it reads (dec._keep)
        cos, sin = rope_tables(cfg, self.n_ctx)
        local = cfg.local_rope()  # gemma3's local layers rotate with their own base
        rope_local = rope_tables(local, self.n_ctx) if local is not None else None
        # One copy of the model (#17): the decoder packs every block-format matrix (and copies every K-quant one,
        # byte for byte) into its own arenas, so each layer's file pages are given back once the next layer is
        # bound, and all of them after the head (7B Q4_0 at -c 4096: peak RSS 7.7 GB -> 4.3 GB at load). What is
        # still read in place (embedding rows, F16/F32 matrices, the sparse FFN's row gathers) faults back in
        # from the page cache when used.
        self.decoder = bind_decoder(cfg, loaded.weights, self.kv, cos, sin, n_threads, pack_ffn,
                                    lambda i: release_file_pages(loaded), rope_local=rope_local)
        release_file_pages(loaded)
        self._x = np.empty((self.n_batch, cfg.d_model), dtype=np.float32)
        self._embed_base = address(loaded.weights.embed_tokens.data)
        self._logits = np.empty(cfg.n_vocab, dtype=np.float32)
        # the buffers' addresses, taken once (numpy's .ctypes.data costs about 1 us a call)
        self._x_addr, self._logits_addr = address(self._x), address(self._logits)
        self._x_row = self._x.strides[0]
        self._sparse: SparseFFN | None = None
        self._last_step = False
        self.reset_ffn_stats()

    # -- neuron-sparse FFN ---------------------------------------------------------------------------------
    def set_sparse(self, spec: SparseSpec | None) -> None:
        """Compute only the FFN neurons that fire in decode steps (None: dense). Prompt chunks of up to 8 tokens
        run the sparse FFN over the union of their tokens' active neurons; longer ones are prefilled dense
        (batched matmuls read each weight once per 4 tokens). Evals that return every position's logits
        (perplexity) run token by token so every position sees the sparse FFN."""
        if spec is not None:
            spec.check(self.config.n_layer)
            if self._sparse is None:
                self._sparse = SparseFFN(self.decoder, self.config, self.weights,
                                                 use_panels=_memory_is_tight(self.weights))
            self._sparse.on(spec)
            release_file_pages(self.loaded)  # the pages the neuron-major copies were made from
        elif self._sparse is not None:
            self._sparse.off()
        self.spec = spec
        self.reset_ffn_stats()

    def reset_ffn_stats(self) -> None:
        self._ffn_steps = 0
        self._ffn_kept = np.zeros((len(Kept._fields), self.config.n_layer), dtype=np.int64)  # Kept's totals

    def _record_ffn(self) -> None:
        if self._sparse is None or not self.sparse:
            return
        self._add_kept(self._sparse.kept())

    def _add_kept(self, step: Kept) -> None:
        """Add one decode step's counts to the totals since reset_ffn_stats()."""
        self._ffn_kept += np.asarray(step)
        self._ffn_steps += 1

    def ffn_sparsity(self) -> float:
        """Fraction of FFN neurons skipped per decode step since reset_ffn_stats() (0 when dense)."""
        if not self._ffn_steps:
            return 0.0
        cfg = self.config
        return 1.0 - float(Kept(*self._ffn_kept).neurons.sum()) / (self._ffn_steps * cfg.n_layer * cfg.n_ff)

    def ffn_stats(self) -> dict | None:
        """Per-layer averages over the decode steps since reset_ffn_stats(): sparsity (neurons skipped), input
        sparsity (channels skipped), FFN weight bytes read per token; None when dense or nothing ran."""
        if not self.sparse or not self._ffn_steps or self._sparse is None:
            return None
        cfg, n = self.config, self._ffn_steps
        mean = Kept(*(self._ffn_kept / n))
        layer_bytes = self._sparse.bytes_per_layer(mean)
        dense = sum(t.nbytes for lw in self.weights.layers for t in (lw.gate_proj, lw.up_proj, lw.down_proj)
                    if t is not None)
        return {"steps": n, "sparsity": 1.0 - float(mean.neurons.sum()) / (cfg.n_layer * cfg.n_ff),
                "sparsity_per_layer": (1.0 - mean.neurons / cfg.n_ff).tolist(),
                "input_sparsity_per_layer": (1.0 - mean.inputs / cfg.d_model).tolist(),
                "ffn_bytes_per_token": float(layer_bytes.sum()), "ffn_dense_bytes": dense}

    def last_ffn_layers(self) -> list[int] | None:
        """Neurons each layer computed in the last sparse decode step (None when dense)."""
        if not self.sparse or self._sparse is None:
            return None
        return self._sparse.kept().neurons.tolist()

    def last_ffn(self) -> tuple[float, int] | None:
        """(sparsity, FFN weight bytes read) of the last eval if it was a sparse decode step, else None."""
        if not self.sparse or self._sparse is None or not self._last_step:
            return None
        kept = self._sparse.kept()
        return (1.0 - float(kept.neurons.sum()) / (self.config.n_layer * self.config.n_ff),
                int(self._sparse.bytes_per_layer(kept).sum()))

    # -- forward ----------------------------------------------------------------------------------------
    def _forward(self, ids, all_logits):
        self._last_step = len(ids) == 1 and not all_logits
        pos = self.n_past
        if all_logits and self.sparse:  # one decode step per token, so every position sees the sparse FFN
            out = np.empty((len(ids), self.config.n_vocab), dtype=np.float32)
            for i, tok in enumerate(ids):
                self._embed_into([tok])
                self.decoder.step(self._x_addr, pos + i, address(out[i]))
                self._record_ffn()
            return out
        if all_logits:
            # Batched like llama.cpp's logits_all: prefill each chunk, then the output head on every row.
            out = np.empty((len(ids), self.config.n_vocab), dtype=np.float32)
            for start in range(0, len(ids), self.n_batch):
                chunk = ids[start:start + self.n_batch]
                self._embed_into(chunk)
                self.decoder.prefill(self._x_addr, len(chunk), pos + start, 0)
                for i in range(len(chunk)):
                    self.decoder.head(self._x_addr + i * self._x_row, address(out[start + i]))
            return out
        if len(ids) == 1:
            self._embed_into(ids)
            self.decoder.step(self._x_addr, pos, self._logits_addr)
            self._record_ffn()
            return self._logits
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            last = start + len(chunk) == len(ids)
            self._embed_into(chunk)
            self.decoder.prefill(self._x_addr, len(chunk), pos + start, self._logits_addr if last else 0)
        return self._logits

    def _embed_into(self, ids) -> None:
        # One row of the (usually quantized) embedding table per token, dequantized by the C kernel.
        emb = self.weights.embed_tokens
        qtype = int(emb.qtype)
        for i, tok in enumerate(ids):
            _C.dequantize(qtype, self._embed_base + tok * emb.row_bytes, emb.cols, self._x_addr + i * self._x_row)

    def set_threads(self, n: int) -> None:
        try:
            self.decoder.set_threads(n)
        except MemoryError as e:  # threads or buffers refused: the decoder keeps its old threads (kernels/csrc)
            raise PowerInferError(str(e)) from None
        self.n_threads = n


def _memory_is_tight(weights) -> bool:
    """Whether the sparse FFN's down_t should be neuron panels (the down's own bytes) rather than Q8_0 copies (1.9x a
    Q4_0 down's bytes): when those copies would take more than a quarter of the memory available now. Panels cost
    decode speed where few neurons fire (one Q4_0 7B down, 10% active, one thread: 1.4-1.9x the Q8_0 axpy's time,
    about 2% of a decode step; at 100% active they are faster), so they are the choice only when memory is short:
    a 7B Q4_0 ReLU model's copies are 1.5 GB against its 0.8 GB of panels."""
    extra = sum(lw.down_proj.cols * row_bytes(GGMLQuantizationType.Q8_0, lw.down_proj.rows)  # [n_ff, d] Q8_0
                for lw in weights.layers if lw.down_t is None and lw.down_proj.rows % 32 == 0)
    return extra > available_memory() / 4
