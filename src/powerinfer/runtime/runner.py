"""One forward step over the placement tiers. Owns the KV cache, buffers, threads and devices (STYLE 5).

CPU tier: the compiled decoder (kernels/), one C call per token for decode and one per prompt chunk for
prefill, weights bound once. A tier on another device (CUDA for the hot tier) runs the torch model
(model/llama.py) on that device; the same code runs here with the device set to "cpu", which is how it is
tested on machines without a GPU.
"""
from __future__ import annotations

import torch

from .. import _C, kernels
from ..errors import ContextOverflowError
from ..formats.loader import LoadedModel
from ..model.kvcache import KVCache
from ..model.rope import rope_tables


class Runner:
    def __init__(self, loaded: LoadedModel, n_ctx: int, n_threads: int, n_batch: int = 512,
                 device: str = "cpu", compute: str = "auto"):
        cfg = loaded.config
        self.config = cfg
        self.n_ctx = n_ctx or cfg.context_length
        self.n_batch = n_batch
        self.n_threads = n_threads
        self.device = torch.device(device)
        # "c": the compiled CPU decoder; "torch": the reference model on `device` (the GPU path).
        self.compute = compute if compute != "auto" else ("c" if self.device.type == "cpu" else "torch")
        kv_dim = cfg.n_head_kv * cfg.head_dim
        self.kv = KVCache.allocate(cfg.n_layer, self.n_ctx, kv_dim, device=self.device)
        self.tokens: list[int] = []  # what the KV cache holds, position by position
        self.weights = loaded.weights
        self._sparse = None
        self.sparse_label = None
        self._last_step = False
        self.reset_ffn_stats()
        if self.compute == "c":
            self.rope_cos, self.rope_sin = rope_tables(cfg, self.n_ctx)
            self.decoder = kernels.bind_decoder(cfg, loaded.weights, self.kv, self.rope_cos, self.rope_sin,
                                                n_threads)
            self._x = torch.empty(n_batch, cfg.d_model, dtype=torch.float32)
            emb = loaded.weights.embed_tokens
            self._embed_base = emb.data.__array_interface__["data"][0]
            self._logits = torch.empty(cfg.n_vocab, dtype=torch.float32)
        else:
            from ..model.llama import Transformer

            self.model = Transformer(cfg, loaded.weights).to(self.device)

    # -- neuron-sparse FFN ---------------------------------------------------------------------------------
    def set_sparse(self, thresholds: list[dict[str, float]] | None, label: str = "sparse", predictors=None) -> None:
        """Compute only the FFN neurons that fire in decode steps (None: dense). `thresholds`: per layer
        {"h": t_h, "x": t_x} (sparse/threshold.py); all zeros skip exactly the zero activations, which is the
        exact path of ReLU-family models (sparse/relu.py). Prompt chunks of up to 8 tokens run the sparse FFN over
        the union of their tokens' active neurons; longer ones are prefilled dense (batched matmuls read each
        weight once per 4 tokens). Evals that return every position's logits (perplexity) run token by token so
        every position sees the sparse FFN.
        `predictors` (sparse.predictor.PredictorSet): only the neurons they predict read their gate/up rows."""
        cfg = self.config
        if thresholds is not None and len(thresholds) != cfg.n_layer:
            raise ValueError(f"{len(thresholds)} layers of thresholds for a {cfg.n_layer}-layer model")
        if self.compute == "c":
            if self._sparse is None:
                self._sparse = kernels.SparseFFN(self.decoder, cfg, self.weights)
            if thresholds is None:
                self._sparse.off()
            else:
                self._sparse.on(thresholds, predictors)
        else:
            from ..model.llama import Transformer

            if thresholds is None:
                self.model = Transformer(cfg, self.weights).to(self.device)
            elif predictors is not None:
                self.model = Transformer(cfg, self.weights, ffn="predictor",
                                         ffn_options={"predictors": predictors}).to(self.device)
            else:
                values = {site: [float(t.get(site, 0.0)) for t in thresholds] for site in ("x", "h")}
                self.model = Transformer(cfg, self.weights, ffn="threshold",
                                         ffn_options={"thresholds": values}).to(self.device)
        self.sparse_label = label if thresholds is not None else None
        self.reset_ffn_stats()

    @property
    def sparse(self) -> bool:
        return self.sparse_label is not None

    def reset_ffn_stats(self) -> None:
        self._ffn_steps = 0
        self._ffn_kept = torch.zeros(3, self.config.n_layer, dtype=torch.int64)
        self._ffn_bytes = 0

    def _record_ffn(self) -> None:
        if self._sparse is None or not self.sparse:
            return
        kept = self._sparse.kept()
        self._ffn_kept += kept
        self._ffn_steps += 1

    def ffn_sparsity(self) -> float:
        """Fraction of FFN neurons skipped per decode step since reset_ffn_stats() (0 when dense)."""
        if not self._ffn_steps:
            return 0.0
        return 1.0 - self._ffn_kept[0].sum().item() / (self._ffn_steps * self.config.n_layer * self.config.n_ff)

    def ffn_stats(self) -> dict | None:
        """Per-layer averages over the decode steps since reset_ffn_stats(): sparsity (neurons skipped), input
        sparsity (channels skipped), FFN weight bytes read per token; None when dense or nothing ran."""
        if not self.sparse or not self._ffn_steps or self._sparse is None:
            return None
        cfg, n = self.config, self._ffn_steps
        mean = self._ffn_kept.double() / n
        layer_bytes = self._sparse.bytes_per_layer(mean).double()
        dense = sum(t.nbytes for lw in self.weights.layers for t in (lw.gate_proj, lw.up_proj, lw.down_proj)
                    if t is not None)
        return {"steps": n, "sparsity": 1.0 - mean[0].sum().item() / (cfg.n_layer * cfg.n_ff),
                "sparsity_per_layer": (1.0 - mean[0] / cfg.n_ff).tolist(),
                "input_sparsity_per_layer": (1.0 - mean[1] / cfg.d_model).tolist(),
                "ffn_bytes_per_token": layer_bytes.sum().item(), "ffn_dense_bytes": dense}

    def last_ffn(self) -> tuple[float, int] | None:
        """(sparsity, FFN weight bytes read) of the last eval if it was a sparse decode step, else None."""
        if not self.sparse or self._sparse is None or not self._last_step:
            return None
        kept = self._sparse.kept()
        return (1.0 - kept[0].sum().item() / (self.config.n_layer * self.config.n_ff),
                int(self._sparse.bytes_per_layer(kept).sum()))

    # -- cache bookkeeping -------------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> None:
        """Forget cached positions >= n (their K/V rows are overwritten by the next eval)."""
        del self.tokens[n:]

    def reuse_prefix(self, ids: list[int]) -> int:
        """Keep the longest cached prefix of `ids` (at least one token is always left to evaluate)."""
        n = 0
        limit = min(len(self.tokens), len(ids) - 1)
        while n < limit and self.tokens[n] == ids[n]:
            n += 1
        self.truncate(n)
        return n

    # -- forward ----------------------------------------------------------------------------------------
    def eval(self, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Append `ids` at the end of the cache; logits of the last token ([n_vocab]) or of all ([n, n_vocab]).

        The last-token logits are a buffer the next `eval` overwrites (no per-token copy of the vocabulary).
        """
        if not ids:
            raise ValueError("eval needs at least one token")
        if self.n_past + len(ids) > self.n_ctx:
            raise ContextOverflowError(
                f"{self.n_past + len(ids)} tokens do not fit in the context of {self.n_ctx} (raise -c/--ctx-size)")
        bad = [t for t in ids if not 0 <= t < self.config.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.n_vocab - 1})")
        self._last_step = len(ids) == 1 and not all_logits
        if self.compute == "torch":
            out = self._eval_torch(ids, all_logits)
        else:
            out = self._eval_c(ids, all_logits)
        self.tokens.extend(ids)
        return out

    def _eval_torch(self, ids, all_logits):
        with torch.inference_mode():
            logits = self.model(torch.tensor(ids, dtype=torch.long, device=self.device), self.n_past, self.kv)
        logits = logits.float().cpu()
        return logits if all_logits else logits[-1]

    def _eval_c(self, ids, all_logits):
        pos = self.n_past
        if all_logits and self.sparse:  # one decode step per token, so every position sees the sparse FFN
            out = torch.empty(len(ids), self.config.n_vocab, dtype=torch.float32)
            for i, tok in enumerate(ids):
                self._embed_into([tok])
                self.decoder.step(self._x.data_ptr(), pos + i, out[i].data_ptr())
                self._record_ffn()
            return out
        if all_logits:
            # Batched like llama.cpp's logits_all: prefill each chunk, then the output head on every row.
            out = torch.empty(len(ids), self.config.n_vocab, dtype=torch.float32)
            for start in range(0, len(ids), self.n_batch):
                chunk = ids[start:start + self.n_batch]
                self._embed_into(chunk)
                self.decoder.prefill(self._x.data_ptr(), len(chunk), pos + start, 0)
                for i in range(len(chunk)):
                    self.decoder.head(self._x[i].data_ptr(), out[start + i].data_ptr())
            return out
        if len(ids) == 1:
            self._embed_into(ids)
            self.decoder.step(self._x.data_ptr(), pos, self._logits.data_ptr())
            self._record_ffn()
            return self._logits
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            last = start + len(chunk) == len(ids)
            self._embed_into(chunk)
            self.decoder.prefill(self._x.data_ptr(), len(chunk), pos + start,
                                 self._logits.data_ptr() if last else 0)
        return self._logits

    def _embed_into(self, ids) -> None:
        # One row of the (usually quantized) embedding table per token, dequantized by the C kernel.
        emb = self.weights.embed_tokens
        for i, tok in enumerate(ids):
            _C.dequantize(int(emb.qtype), self._embed_base + tok * emb.row_bytes, emb.cols, self._x[i].data_ptr())

    def set_threads(self, n: int) -> None:
        self.n_threads = n
        if self.compute == "c":
            self.decoder.set_threads(n)
