"""Writing PowerInfer GGUF files (reference/powerinfer.md 2): a GGUF v3 with the magic patched to `PWRI`, every
`blk.N.ffn_down.weight` replaced by its transpose `blk.N.ffn_down_t.weight` (one row per neuron), the
predictors as `blk.N.fc1.weight` [r, d] / `blk.N.fc2.weight` [n_ff, r], and `powerinfer.sparse_threshold`.

Formats (--outtype): `same` copies every tensor as stored, except down_t, which is transposed exactly for
F32/F16/BF16 and requantized to Q8_0 for block formats (a second 4-bit rounding along the other axis would add
as much error as the first; formats/quants.transpose); f32/f16/q8_0/q4_0 convert every 2-D weight. Predictors
are f16, or Q4_0 when the outtype is q4_0 and their shapes allow (upstream's quantizer does the same).
Per-layer predictor thresholds (ours) have no upstream key: they go to `powerinfer.sparse_thresholds` (read by
this package), and upstream readers see `powerinfer.sparse_threshold` = their minimum (more neurons computed:
recall kept, sparsity lower).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from ..core.files import atomic_path
from ..errors import PowerInferError
from . import quants
from .gguf import open_gguf
from .gguf_gemma import GEMMA_ARCHS, default_attn_scale
from .names import GGUF_ATTN_NORM_2, GGUF_QKV, gguf_name

OUTTYPES = {"same": None, "f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}


def _encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.astype(np.float16)
    return quantize(values, qtype)


def _fits(qtype: Q, cols: int) -> bool:
    return qtype in (Q.F32, Q.F16) or cols % 32 == 0


def _add_thresholds(writer: GGUFWriter, predictors) -> None:
    if predictors is None:
        return
    ths = [predictors.threshold_of(i) for i in range(predictors.n_layer)]
    writer.add_float32("powerinfer.sparse_threshold", float(min(ths)))
    if predictors.thresholds is not None:
        writer.add_array("powerinfer.sparse_thresholds", [float(t) for t in ths])


def _finish(writer: GGUFWriter, tmp: Path, predictors, target) -> None:
    """Append the predictors (f16, or Q4_0 for a q4_0 target when the rows allow), write, patch the magic (the
    caller's core.files.atomic_path renames `tmp` over the output)."""
    if predictors is not None:
        pq = Q.Q4_0 if target == Q.Q4_0 else Q.F16
        for i in range(predictors.n_layer):
            for name, m in ((f"blk.{i}.fc1.weight", predictors.fc1[i]), (f"blk.{i}.fc2.weight", predictors.fc2[i])):
                values = m.detach().float().numpy()
                q = pq if _fits(pq, values.shape[1]) else Q.F16
                stored = _encode(values, q)
                writer.add_tensor(name, stored, raw_dtype=q if stored.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(tmp, "r+b") as fh:  # upstream's converters write a GGUF, then patch the magic
        fh.write(b"PWRI")


def _copy_metadata(reader, writer: GGUFWriter, skip: set[str]) -> None:
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in skip:
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(f.name, f.contents(), vtype, f.types[-1])
        else:
            writer.add_key_value(f.name, f.contents(), vtype)


def write_powerinfer_gguf(src: str | Path, out: str | Path, predictors=None, outtype: str = "same",
                          progress: bool | None = None, log=sys.stderr) -> Path:
    """Convert the GGUF `src` (optionally with a sparse.predictor.PredictorSet) into a PowerInfer GGUF."""
    if outtype not in OUTTYPES:
        raise PowerInferError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    src, out = Path(src), Path(out)
    if src.is_dir():
        return _write_from_hf(src, out, predictors, outtype, progress, log)
    reader, _ = open_gguf(src)
    with atomic_path(out) as tmp:
        _write_from_gguf(reader, src, tmp, predictors, outtype, progress, log)
    return out


def _write_from_gguf(reader, src: Path, tmp: Path, predictors, outtype: str, progress, log) -> None:
    from tqdm import tqdm

    target = OUTTYPES[outtype]
    fields = {f.name: f for f in reader.fields.values()}
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    writer = GGUFWriter(str(tmp), arch)
    skip = {"general.architecture", "powerinfer.sparse_threshold", "powerinfer.sparse_thresholds"}
    _copy_metadata(reader, writer, skip)
    if "powerinfer.ffn_activation" not in fields:  # readers take a PWRI file without it for a ReLU model
        from .loader import load_model

        writer.add_string("powerinfer.ffn_activation", load_model(src).config.activation)
    _add_thresholds(writer, predictors)
    report = quants.ConversionReport()
    show = sys.stderr.isatty() if progress is None else progress
    names = {t.name for t in reader.tensors}
    for t in tqdm(reader.tensors, desc="convert", unit="tensor", disable=not show, file=sys.stderr):
        if t.name.endswith(".fc1.weight") or t.name.endswith(".fc2.weight"):
            if predictors is not None:
                continue  # replaced by the given predictors below
        qt = Q(t.tensor_type)
        rows, cols = int(t.shape[-1]) if len(t.shape) > 1 else 1, int(t.shape[0])
        data = np.asarray(t.data)
        if t.name.endswith("ffn_down.weight") and f"{t.name[:-len('ffn_down.weight')]}ffn_down_t.weight" not in names:
            from ..core.tensor import QTensor

            qt_src = QTensor(t.name, qt, (rows, cols), data)
            new = quants.transpose(qt_src, report)  # [n_ff, d]: exact for floats, Q8_0 for block formats
            name = t.name.replace("ffn_down.weight", "ffn_down_t.weight")
            if target is not None and target != new.qtype and _fits(target, new.cols):
                stored = _encode(new.dequantize().numpy().reshape(new.shape), target)
                writer.add_tensor(name, stored, raw_dtype=target if stored.dtype == np.uint8 else None)
            else:
                stored = np.asarray(new.data)
                writer.add_tensor(name, stored, raw_dtype=new.qtype if stored.dtype == np.uint8 else None)
            continue
        if target is not None and len(t.shape) > 1 and qt != target and _fits(target, cols):
            values = quants.to_float(qt, data).reshape(rows, cols)
            stored = _encode(values, target)
            writer.add_tensor(t.name, stored, raw_dtype=target if stored.dtype == np.uint8 else None)
        else:
            writer.add_tensor(t.name, data, raw_dtype=qt if data.dtype == np.uint8 else None)
    _finish(writer, tmp, predictors, target)
    if report:
        print(f"convert: {report}", file=log)


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows (rotate-half pairs) -> GGUF llama order (adjacent pairs), as llama.cpp's converter does."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _write_from_hf(src: Path, out: Path, predictors, outtype: str, progress, log) -> Path:
    """An HF llama, Falcon, OPT or Phi-3 directory (config.json + safetensors, byte-level BPE tokenizer.json) as a
    PowerInfer GGUF with llama.cpp's names and metadata (opt: this package's, formats/gguf.py): llama q/k rows
    permuted to GGUF's RoPE pair order, falcon's and phi3's q/k/v fused as attn_qkv, phi3's gate and up fused as
    ffn_up with its LongRoPE factors, down transposed."""
    from .loader import load_model

    loaded = load_model(src)
    cfg = loaded.config
    if cfg.arch in GEMMA_ARCHS:  # llama.cpp's gemma2/gemma3 names and keys, norms already 1 + w (formats/hf_gemma.py)
        if cfg.rope_scaling.kind not in ("none", "linear"):
            raise PowerInferError(f"{src}: RoPE scaling {cfg.rope_scaling.kind!r} is not written by convert yet")
        with atomic_path(out) as tmp:
            _write_hf_gguf(loaded, src, tmp, predictors, outtype, progress, log)
        return out
    if cfg.arch not in ("llama", "falcon", "opt", "phi3"):
        raise PowerInferError(f"{src}: convert writes llama, falcon, opt and phi3 GGUF from HF directories; this is "
                              f"{cfg.arch}")
    if cfg.arch == "falcon" and not cfg.parallel_residual:
        raise PowerInferError(f"{src}: a Falcon without parallel attention (parallel_attn = false) has no GGUF form")
    if cfg.rope_scaling.kind not in ("none", "longrope"):
        raise PowerInferError(f"{src}: RoPE scaling {cfg.rope_scaling.kind!r} is not written by convert yet")
    with atomic_path(out) as tmp:
        _write_hf_gguf(loaded, src, tmp, predictors, outtype, progress, log)
    return out


class _Rows:
    """Row blocks written as one tensor (falcon's attn_qkv: rows q | k | v)."""

    def __init__(self, parts):
        self.parts, self.qtype = parts, parts[0].qtype
        self.shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])

    def dequantize(self):
        import torch

        return torch.cat([p.dequantize() for p in self.parts])


def _falcon_items(i: int, lw) -> list:
    """llama.cpp's falcon tensors of layer i: attn_norm feeds the MLP (and attention too when there is no
    attn_norm_2, the 7B layout), attn_norm_2 attention (40B); fused attn_qkv; down as ffn_down_t."""
    items = [(gguf_name("input_layernorm", i), lw.post_attention_layernorm, None),
             (gguf_name("input_layernorm_bias", i), lw.post_attention_layernorm_bias, None)]
    if lw.input_layernorm is not lw.post_attention_layernorm:
        items += [(f"blk.{i}.{GGUF_ATTN_NORM_2}.weight", lw.input_layernorm, None),
                  (f"blk.{i}.{GGUF_ATTN_NORM_2}.bias", lw.input_layernorm_bias, None)]
    items.append((f"blk.{i}.{GGUF_QKV}.weight", _Rows([lw.q_proj, lw.k_proj, lw.v_proj]), None))
    if lw.q_bias is not None:
        items.append((f"blk.{i}.{GGUF_QKV}.bias", _Rows([lw.q_bias, lw.k_bias, lw.v_bias]), None))
    items += [(gguf_name("o_proj", i), lw.o_proj, None), (gguf_name("o_bias", i), lw.o_bias, None),
              (gguf_name("up_proj", i), lw.up_proj, None), (gguf_name("up_bias", i), lw.up_bias, None),
              (gguf_name("down_t", i), lw.down_proj, lambda a: np.ascontiguousarray(a.T)),
              (gguf_name("down_bias", i), lw.down_bias, None)]
    return [it for it in items if it[1] is not None]


def _phi3_items(i: int, lw) -> list:
    """llama.cpp's phi3 tensors of layer i: fused attn_qkv (q | k | v) and ffn_up (gate | up), down as ffn_down_t."""
    return [(gguf_name("input_layernorm", i), lw.input_layernorm, None),
            (f"blk.{i}.{GGUF_QKV}.weight", _Rows([lw.q_proj, lw.k_proj, lw.v_proj]), None),
            (gguf_name("o_proj", i), lw.o_proj, None),
            (gguf_name("post_attention_layernorm", i), lw.post_attention_layernorm, None),
            (gguf_name("up_proj", i), _Rows([lw.gate_proj, lw.up_proj]), None),
            (gguf_name("down_t", i), lw.down_proj, lambda a: np.ascontiguousarray(a.T))]


def _gemma_metadata(wr: GGUFWriter, cfg) -> None:
    """Gemma's keys as llama.cpp's converter writes them (formats/gguf_gemma.py reads them back), and the q scale
    where query_pre_attn_scalar differs from the one llama.cpp derives from the model's shape."""
    if cfg.sliding_window:
        wr.add_sliding_window(cfg.sliding_window)
    if cfg.arch == "gemma2":
        wr.add_attn_logit_softcapping(cfg.attn_softcap)
    if cfg.final_softcap or cfg.arch == "gemma2":  # (a gemma2 file without the key means llama.cpp's 30)
        wr.add_final_logit_softcapping(cfg.final_softcap)
    if cfg.rope_scaling.kind == "linear":
        from gguf import RopeScalingType

        wr.add_rope_scaling_type(RopeScalingType.LINEAR)
        wr.add_rope_scaling_factor(cfg.rope_scaling.factor)
    if abs(cfg.attn_scale - default_attn_scale(cfg.arch, cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_dim)) > 1e-7:
        wr.add_float32(f"{cfg.arch}.attention.scale", cfg.attn_scale)


def _write_hf_gguf(loaded, src: Path, tmp: Path, predictors, outtype: str, progress, log) -> None:
    from tqdm import tqdm

    from .hf_tokenizer import metadata_from_hf_dir

    cfg, w = loaded.config, loaded.weights
    target = OUTTYPES[outtype]
    wr = GGUFWriter(str(tmp), cfg.arch)
    wr.add_name(cfg.name or src.name)
    wr.add_block_count(cfg.n_layer)
    wr.add_context_length(cfg.context_length)
    wr.add_embedding_length(cfg.d_model)
    wr.add_feed_forward_length(cfg.n_ff)
    wr.add_head_count(cfg.n_head)
    wr.add_head_count_kv(cfg.n_head_kv)
    if cfg.positions == "rope":
        wr.add_rope_freq_base(cfg.rope_theta)
        wr.add_rope_dimension_count(cfg.rope_dim)
    if cfg.norm == "layer":
        wr.add_layer_norm_eps(cfg.norm_eps)
    else:
        wr.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        wr.add_key_length(cfg.head_dim)
        wr.add_value_length(cfg.head_dim)
    wr.add_string("powerinfer.ffn_activation", cfg.activation)  # PWRI without it would mean ReLU
    if cfg.arch in GEMMA_ARCHS:
        _gemma_metadata(wr, cfg)
    rs = cfg.rope_scaling
    if rs.kind == "longrope":  # llama.cpp's keys and tensors for Phi-3's LongRoPE
        wr.add_rope_scaling_orig_ctx_len(rs.original_context)
        wr.add_rope_scaling_attn_factors(rs.attn_factor)
    template = loaded.metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        wr.add_chat_template(template)
    try:
        tok = metadata_from_hf_dir(src)
    except PowerInferError as e:
        tok = {}
        print(f"convert: no tokenizer written ({e})", file=log)
    for k, v in tok.items():
        if isinstance(v, bool):
            wr.add_bool(k, v)
        elif isinstance(v, int):
            wr.add_uint32(k, v)
        elif isinstance(v, float):
            wr.add_float32(k, v)
        elif isinstance(v, str):
            wr.add_string(k, v)
        elif isinstance(v, (list, tuple)) and v:
            wr.add_array(k, list(v))
    _add_thresholds(wr, predictors)

    def put(name: str, t, transform=None):
        values = t.dequantize().numpy().reshape(t.shape) if len(t.shape) > 1 else \
            t.dequantize().numpy().reshape(-1)
        if transform is not None:
            values = transform(values)
        qt = Q.F32 if values.ndim == 1 else (target or (t.qtype if getattr(t, "qtype", None) in (Q.F32, Q.F16)
                                                         else Q.F16))
        if not _fits(qt, values.shape[-1]):
            qt = Q.F16
        stored = _encode(values, qt) if values.ndim > 1 else np.ascontiguousarray(values, dtype=np.float32)
        wr.add_tensor(name, stored, raw_dtype=qt if stored.dtype == np.uint8 else None)

    items = [(gguf_name("embed_tokens"), w.embed_tokens, None)]
    if w.pos_embd is not None:
        items.append((gguf_name("pos_embd"), w.pos_embd, None))
    transpose = {"down_t": lambda a: np.ascontiguousarray(a.T)}
    # llama.cpp's llama q/k rows are permuted to adjacent RoPE pairs; falcon keeps HF's halves, opt has no RoPE
    permute = {"q_proj": lambda a: _permute_qk(a, cfg.n_head),
               "k_proj": lambda a: _permute_qk(a, cfg.n_head_kv), **transpose} if cfg.arch == "llama" else transpose
    for i, lw in enumerate(w.layers):
        if cfg.arch in ("falcon", "phi3"):
            items += _falcon_items(i, lw) if cfg.arch == "falcon" else _phi3_items(i, lw)
            continue
        for role in ("input_layernorm", "input_layernorm_bias", "q_proj", "q_bias", "k_proj", "k_bias", "v_proj",
                     "v_bias", "o_proj", "o_bias", "post_attention_layernorm", "post_attention_layernorm_bias",
                     "up_proj", "up_bias", "down_t", "down_bias", "gate_proj"):
            t = lw.down_proj if role == "down_t" else getattr(lw, role)
            if t is not None:
                items.append((gguf_name(role, i), t, permute.get(role)))
    if cfg.arch in GEMMA_ARCHS:  # q/k norms (gemma3) and the attention / FFN output norms
        items += [(gguf_name(role, i), getattr(lw, role), None) for i, lw in enumerate(w.layers)
                  for role in ("q_norm", "k_norm", "post_attn_norm", "post_ffn_norm") if getattr(lw, role) is not None]
    items.append((gguf_name("norm"), w.norm, None))
    if w.norm_bias is not None:
        items.append((gguf_name("norm_bias"), w.norm_bias, None))
    if w.lm_head is not w.embed_tokens:
        items.append((gguf_name("lm_head"), w.lm_head, None))
    if rs.kind == "longrope":
        from ..core.tensor import QTensor

        for name, f in (("rope_factors_long.weight", rs.long_factors), ("rope_factors_short.weight", rs.short_factors)):
            items.append((name, QTensor(name, Q.F32, (len(f),), np.array(f, dtype=np.float32)), None))
    show = sys.stderr.isatty() if progress is None else progress
    for name, t, fn in tqdm(items, desc="convert", unit="tensor", disable=not show, file=sys.stderr):
        put(name, t, fn)
    _finish(wr, tmp, predictors, target)
