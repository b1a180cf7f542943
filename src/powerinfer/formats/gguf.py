"""GGUF model files -> ModelConfig + ModelWeights, through gguf-py's GGUFReader (DESIGN decision 5).

Tensors stay in the memory-mapped file (QTensor.data is a read-only view of it); only types the kernels do
not read are converted, once, by formats/quants.py. Accepts PowerInfer's `PWRI` magic (PowerInfer
converters write a normal GGUF, then overwrite the first 4 bytes; reference/powerinfer.md section 2.1).
Tensor names and metadata keys follow llama.cpp (`blk.N.attn_q.weight`, `{arch}.block_count`, ...).
"""
from __future__ import annotations

import math
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType as Q, GGUFReader, GGUFValueType, LlamaFileType
from gguf.gguf_reader import ReaderField

from ..errors import ModelFormatError, one_line
from ..core.config import ModelConfig, RopeScaling
from ..core.weights import LayerWeights, ModelWeights
from . import quants
from .gguf_phi3 import phi3_layer, phi3_rope_scaling
from .gguf_gemma import GEMMA_ARCHS, gemma_config
from .names import GGUF_ATTN_NORM_2, GGUF_QKV, gguf_name
from ..core.tensor import QTensor

PWRI_MAGIC = b"PWRI"
SUPPORTED_ARCHS = ("llama", "bamboo", "qwen2", "qwen3", "falcon", "opt", "phi3")
SUPPORTED_ARCHS += GEMMA_ARCHS  # Gemma's options are read by formats/gguf_gemma.py
# falcon (llama.cpp's names) and opt (this package's, in llama.cpp's conventions: position_embd, .bias tensors)
# use LayerNorm with bias; falcon runs attention and MLP in parallel from one fused attn_qkv (rows q | k | v)
# ModelConfig names, as powerinfer.ffn_activation stores them: "gelu" is erf, "gelu_tanh" is ggml_gelu. None of
# SUPPORTED_ARCHS uses GELU in llama.cpp; one that did would default to "gelu_tanh", llama.cpp's form.
ACTIVATIONS = ("silu", "relu", "gelu", "gelu_tanh")
FFN_KINDS = ("glu", "dglu", "mlp")


# ggml's limits (ggml.h GGML_MAX_DIMS; gguf.cpp refuses deeper tensors and unaligned offsets as well).
MAX_DIMS = 4
# Smallest encodings in bytes, for bounding counts read from the header by the bytes left in the file before
# anything is allocated: a key/value is a u64 key length, a u32 type and at least one byte of value; a tensor
# info is a u64 name length, u32 n_dims, u32 type and u64 offset; an array element is its scalar size (a
# string: its u64 length; a nested array: u32 type + u64 count).
_MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES = 13, 24
_MIN_ITEM_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}


_U64 = struct.Struct("<Q")


class _StringParts(Sequence):
    """gguf-py's parts of a string-array field (key length, key, value type, item type, count, then each string's
    u64 length and bytes), made on access from the offsets `_Reader._string_array` found."""

    def __init__(self, raw_itype, alen, mv: memoryview, starts: list[int], ends: list[int]):
        self.head = [raw_itype, alen]  # the key's three parts are put in front by _Reader._build_fields
        self.mv, self.starts, self.ends = mv, starts, ends

    def __len__(self):
        return len(self.head) + 2 * len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        if i < len(self.head):
            return self.head[i]
        k, is_bytes = divmod(i - len(self.head), 2)
        start = self.starts[k]
        return self.mv[start:self.ends[k]] if is_bytes else self.mv[start - 8:start].cast("Q")

    def strings(self, index_or_slice=slice(None)):
        mv, starts, ends = self.mv, self.starts, self.ends
        if isinstance(index_or_slice, slice):
            return [str(mv[a:b], "utf-8") for a, b in zip(starts[index_or_slice], ends[index_or_slice])]
        return str(mv[starts[index_or_slice]:ends[index_or_slice]], "utf-8")


class _StringArrayField(ReaderField):
    """A ReaderField of an array of strings whose contents() decodes straight from the map (same values and
    errors as gguf-py's: a string that is not UTF-8 raises UnicodeDecodeError)."""
    __slots__ = ()

    def contents(self, index_or_slice=slice(None)):
        return self.parts.strings(index_or_slice)


class _Reader(GGUFReader):
    """GGUFReader that accepts the PWRI magic and trusts no size in the header: every read is checked against
    the file's length (a count or length past the end is a ModelFormatError before anything is allocated),
    arrays of numbers are read as one view instead of one numpy object per element (gguf-py's loop turned a
    header claiming 2^40 bytes into tens of GB of objects), and every tensor's type, dimensions, alignment and
    byte range are checked before it is mapped.

    The hooks are GGUFReader's private helpers (`_get`, `_get_field_parts`, `_build_fields`,
    `_build_tensor_info`, `_build_tensors`); gguf-py has kept them since 0.10, and overriding them avoids copying a
    multi-GB file just to patch four bytes.
    """

    def __init__(self, path: Path, pwri: bool):
        self._pwri = pwri
        self._path = path
        super().__init__(path, "r")

    def _get(self, offset, dtype, count=1, override_order=None):
        if self._pwri and offset == 0 and override_order == "<":
            return np.array([GGUF_MAGIC], dtype="<u4")  # the magic check: present PWRI as GGUF
        order = self.byte_order if override_order is None else override_order
        if order == "S" or (order == "<" and sys.byteorder != "little"):
            self._need(offset, np.dtype(dtype).itemsize * int(count))
            return super()._get(offset, dtype, count, override_order)
        # Same bytes as GGUFReader._get, sliced from a plain ndarray view of the map: np.memmap's Python-level
        # __getitem__/__array_finalize__ ran for each of the ~250k vocabulary reads of SmolLM2's header
        # (3.3-4.6 s -> about 1 s).
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dtype = np.dtype(dtype)
        count = int(count)
        self._need(offset, dtype.itemsize * count)
        return plain[offset:offset + dtype.itemsize * count].view(dtype)[:count]

    def _need(self, offset: int, nbytes: int, what: str = "") -> None:
        size = len(self.data)
        if offset < 0 or nbytes < 0 or offset + nbytes > size:
            raise ModelFormatError(f"{self._path}: corrupt or truncated GGUF header: {what or 'a field'} needs "
                                   f"bytes {offset:,}..{offset + nbytes:,} but the file has {size:,}")

    def _build_tensor_info(self, offs, count):
        self._need(offs, int(count) * _MIN_TENSOR_INFO_BYTES, f"{int(count):,} tensor infos")
        return super()._build_tensor_info(offs, count)

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        n, offs = int(alen[0]), orig_offs + 12
        try:
            itype = GGUFValueType(int(raw_itype[0]))
        except ValueError:
            raise ModelFormatError(f"{self._path}: metadata array of unknown type {int(raw_itype[0])}") from None
        nptype = self.gguf_scalar_to_np.get(itype)
        item = np.dtype(nptype).itemsize if nptype is not None else _MIN_ITEM_BYTES[itype]
        self._need(offs, n * item, f"an array of {n:,} {itype.name} values")
        if itype == GGUFValueType.STRING and n and self.byte_order != "S" and sys.byteorder == "little":
            return self._string_array(orig_offs, raw_itype, alen, n)
        if nptype is None or n == 0:  # nested arrays: gguf-py's walk, now bounded
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offs, nptype, n)  # one view of the whole array (ReaderField.contents() flattens parts)
        return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [GGUFValueType.ARRAY, itype]

    def _string_array(self, orig_offs, raw_itype, alen, n):
        """An array of n strings: one pass over the length prefixes (bounded by the file), the strings themselves
        decoded only when `contents()` asks (`_StringArrayField`). gguf-py makes two numpy views per string, and
        its layout (item type, count, then each string's length and bytes as separate parts) as memoryview slices
        still cost 0.4-0.7 s of SmolLM2's start for the ~98k strings of its tokens and merges (this pass: 8 ms)."""
        self._get(orig_offs, np.uint8)  # the map as a plain ndarray (self._plain), every read below bounded by it
        mv = memoryview(self._plain)
        size = len(mv)
        unpack = _U64.unpack_from
        offs = orig_offs + 12
        starts, ends = [0] * n, [0] * n
        for i in range(n):
            if offs + 8 > size:
                self._need(offs, 8, f"an array of {n:,} STRING values")
            (length,) = unpack(mv, offs)
            end = offs + 8 + length
            if end > size:
                self._need(offs + 8, length, f"an array of {n:,} STRING values")
            starts[i], ends[i] = offs + 8, end
            offs = end
        parts = _StringParts(raw_itype, alen, mv, starts, ends)
        return offs - orig_offs, parts, range(3, 2 * n + 2, 2), [GGUFValueType.ARRAY, GGUFValueType.STRING]

    def _build_fields(self, offs, count):
        self._need(offs, int(count) * _MIN_KV_BYTES, f"{int(count):,} metadata key/values")
        # gguf-py's loop (GGUFReader._build_fields), except that a string array's parts stay a `_StringParts`:
        # its `parts += field_parts` would make a numpy view of every string of the vocabulary again
        for _ in range(count):
            orig_offs = offs
            kv_klen, kv_kdata = self._get_str(offs)
            offs += int(kv_klen.nbytes + kv_kdata.nbytes)
            raw_kv_type = self._get(offs, np.uint32)
            offs += int(raw_kv_type.nbytes)
            head = [kv_klen, kv_kdata, raw_kv_type]
            field_size, field_parts, field_idxs, field_types = self._get_field_parts(offs, raw_kv_type[0])
            name = str(bytes(kv_kdata), encoding="utf-8")
            if isinstance(field_parts, _StringParts):
                field_parts.head = head + field_parts.head
                field = _StringArrayField(orig_offs, name, field_parts, range(6, 6 + 2 * len(field_parts.starts), 2),
                                          field_types)
            else:
                field = ReaderField(orig_offs, name, head + field_parts, [i + len(head) for i in field_idxs],
                                    field_types)
            self._push_field(field, skip_sum=True)
            offs += field_size
        return offs

    def _get_tensor_info_field(self, orig_offs):
        name_len = int(self._get(orig_offs, np.uint64)[0])
        n_dims = int(self._get(orig_offs + 8 + name_len, np.uint32)[0])
        if n_dims > MAX_DIMS:
            raise ModelFormatError(f"{self._path}: a tensor at byte {orig_offs:,} has {n_dims} dimensions "
                                   f"(at most {MAX_DIMS})")
        return super()._get_tensor_info_field(orig_offs)

    def _build_tensors(self, start_offs, fields):
        size = len(self.data)
        alignment = int(self.alignment)
        for f in fields:
            name = bytes(f.parts[1]).decode("utf-8", "replace")
            raw_type = int(f.parts[4][0])
            try:
                qtype = Q(raw_type)
            except ValueError:
                raise ModelFormatError(f"{self._path}: tensor {name} has unknown GGML type {raw_type} "
                                       "(newer than this gguf-py, or a corrupt file)") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            dims = [int(x) for x in f.parts[3]]
            if not dims or max(dims) >= 1 << 62:  # (empty tensors are legal: a .gpuidx bucket of no neurons)
                raise ModelFormatError(f"{self._path}: tensor {name} has dimensions {dims} (expected 1 to "
                                       f"{MAX_DIMS} sizes below 2^62)")
            if dims[0] % block:
                raise ModelFormatError(f"{self._path}: tensor {name} has rows of {dims[0]} values, not whole "
                                       f"{qtype.name} blocks of {block}")
            n_elems = math.prod(dims)  # Python ints: no int64 wrap-around on hostile dimensions
            offset = int(f.parts[5][0])
            if offset % alignment:
                raise ModelFormatError(f"{self._path}: tensor {name} has offset {offset:,}, not a multiple of the "
                                       f"alignment {alignment}")
            end = start_offs + offset + n_elems // block * type_size
            if end > size:
                raise ModelFormatError(f"{self._path}: truncated GGUF: tensor {name} ends at byte {end:,} "
                                       f"but the file has {size:,} bytes")
        super()._build_tensors(start_offs, fields)


@dataclass
class GGUFModel:
    config: ModelConfig
    weights: ModelWeights
    metadata: dict
    file_type: str
    conversion_report: quants.ConversionReport
    powerinfer_gguf: bool  # PWRI magic: a PowerInfer sparse model file
    extra_tensors: dict[str, QTensor] = field(default_factory=dict)  # not mapped to weights (fc1/fc2, ...)


def open_gguf(path: str | Path) -> tuple[GGUFReader, bool]:
    """(reader, is_pwri). ModelFormatError for missing, non-GGUF, truncated or corrupt files."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file")
    if path.is_dir():
        raise ModelFormatError(f"{path}: is a directory, expected a .gguf file")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise ModelFormatError(f"{path}: not a regular file, expected a .gguf file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read ({e.strerror})") from None
    if magic not in (b"GGUF", PWRI_MAGIC):
        raise ModelFormatError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF' or b'PWRI')")
    try:
        return _Reader(path, magic == PWRI_MAGIC), magic == PWRI_MAGIC
    except ModelFormatError:
        raise
    except (MemoryError, RecursionError):
        raise ModelFormatError(f"{path}: corrupt GGUF header (more structure than the file can hold)") from None
    except Exception as e:  # gguf-py's own checks (version, duplicate keys, alignment) and cut or invalid text
        raise ModelFormatError(f"{path}: corrupt or truncated GGUF header ({type(e).__name__}: "
                               f"{one_line(e)})") from None


def read_metadata(reader: GGUFReader) -> dict:
    """All key/value pairs as plain Python values (str, int, float, bool, lists); ModelFormatError names a key
    whose value cannot be read (a string that is not UTF-8, a value of an unknown type)."""
    out = {}
    for key, f in reader.fields.items():
        try:
            out[key] = f.contents()
        except Exception as e:
            raise ModelFormatError(f"{getattr(reader, '_path', 'GGUF')}: metadata key {one_line(key, 80)!r} is "
                                   f"unreadable ({type(e).__name__}: {one_line(e)})") from None
    return out


def reader_tensor(t) -> QTensor:
    """A GGUFReader tensor as a QTensor: torch-order shape, typed arrays for F32/F16/BF16 (no copy)."""
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    data = t.data
    if t.tensor_type == Q.BF16:
        data = data.view(np.uint16).reshape(shape)  # gguf-py maps BF16 as raw bytes
    return QTensor(t.name, Q(t.tensor_type), shape, data)


def load_gguf(path: str | Path) -> GGUFModel:
    path = Path(path)
    reader, pwri = open_gguf(path)
    md = read_metadata(reader)
    tensors = {t.name: reader_tensor(t) for t in reader.tensors}
    config = _config(path, md, tensors, pwri).check(str(path))
    report = quants.ConversionReport()
    if config.ffn_kind == "mlp" and "powerinfer.ffn_kind" not in md:
        # mlp was inferred from blk.0 having no gate: gates in other layers mean a corrupt file (a flipped bit in
        # blk.0's name made an MLP of a SwiGLU model: found by scripts/fuzz_gguf.py, seed 5, mutant 789)
        stray = next((n for n in (gguf_name("gate_proj", i) for i in range(config.n_layer)) if n in tensors), None)
        if stray is not None:
            raise ModelFormatError(f"{path}: tensor {stray} in a model whose FFN has no gate "
                                   f"({gguf_name('gate_proj', 0)} is missing)")
    weights, used = _weights(path, config, tensors, report)
    extra = {n: t for n, t in tensors.items() if n not in used}
    return GGUFModel(config, weights, md, _file_type(md, tensors), report, pwri, extra)


# -- config ---------------------------------------------------------------------------------------------

def _f32(x) -> float:
    # GGUF stores these as float32; print back the decimal the converter wrote (1e-05, not 9.99999974e-06).
    return float(f"{float(x):.7g}")


def _config(path: Path, md: dict, tensors: dict[str, QTensor], pwri: bool) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelFormatError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

    def key(name, default=None, kind=int):
        value = md.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelFormatError(f"{path}: missing metadata key {arch}.{name}")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
            isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise ModelFormatError(f"{path}: metadata key {arch}.{name} is {one_line(repr(value), 60)}, "
                                   f"expected {'a number' if kind is float else 'an integer'}")
        return value

    if "token_embd.weight" not in tensors:
        raise ModelFormatError(f"{path}: missing tensor token_embd.weight")
    if len(tensors["token_embd.weight"].shape) != 2:
        raise ModelFormatError(f"{path}: tensor token_embd.weight has shape "
                               f"{list(tensors['token_embd.weight'].shape)}, expected [n_vocab, d_model]")
    d_model = key("embedding_length")
    n_head = key("attention.head_count")
    if n_head < 1:
        raise ModelFormatError(f"{path}: {arch}.attention.head_count = {n_head} (must be >= 1)")
    head_dim = key("attention.key_length", d_model // n_head)

    # The FFN activation is a property of the model: an explicit key wins; PowerInfer's PWRI files are
    # ReLU-family llamas (ReluLLaMA, ProSparse); Bamboo is dReLU (relu(gate) * relu(up)); llama.cpp runs falcon's
    # MLP with ggml_gelu (tanh form); OPT is ReLU.
    activation = "relu" if pwri or arch in ("bamboo", "opt") else "gelu_tanh" if arch == "falcon" else "silu"
    ffn_kind = "dglu" if arch == "bamboo" else "glu"
    if "blk.0.ffn_gate.weight" not in tensors and arch != "phi3":  # phi3's gate is the first half of ffn_up
        ffn_kind = "mlp"
    activation = md.get("powerinfer.ffn_activation", activation)
    ffn_kind = md.get("powerinfer.ffn_kind", ffn_kind)
    activation, ffn_kind = (v if isinstance(v, str) else repr(v) for v in (activation, ffn_kind))
    if activation not in ACTIVATIONS:
        raise ModelFormatError(f"{path}: unsupported powerinfer.ffn_activation {activation!r} "
                               f"(supported: {', '.join(ACTIVATIONS)})")
    if ffn_kind not in FFN_KINDS:
        raise ModelFormatError(f"{path}: unsupported powerinfer.ffn_kind {ffn_kind!r} "
                               f"(supported: {', '.join(FFN_KINDS)})")

    layer_norm = arch in ("falcon", "opt")
    config = ModelConfig(
        arch=arch if arch in ("qwen2", "qwen3", "falcon", "opt", "phi3") else "llama",
        n_vocab=tensors["token_embd.weight"].rows,
        d_model=d_model,
        n_layer=key("block_count"),
        n_head=n_head,
        n_head_kv=key("attention.head_count_kv", n_head),
        head_dim=head_dim,
        n_ff=key("feed_forward_length"),
        norm_eps=_f32(key("attention.layer_norm_epsilon" if layer_norm else "attention.layer_norm_rms_epsilon", 1e-5,
                          float)),
        rope_theta=_f32(key("rope.freq_base", 10000.0, float)),
        rope_dim=key("rope.dimension_count", head_dim),
        # llama.cpp's converter permutes llama q/k rows so that rotation pairs are adjacent; qwen2/3 are not.
        rope_style="neox" if arch in ("qwen2", "qwen3", "falcon", "phi3") else "norm",
        rope_scaling=_rope_scaling(path, arch, md, tensors),
        context_length=key("context_length", 4096),
        activation=activation,
        ffn_kind=ffn_kind,
        tie_embeddings="output.weight" not in tensors,
        attn_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        norm="layer" if layer_norm else "rms",
        parallel_residual=arch == "falcon",
        positions="learned" if arch == "opt" else "rope",
        name=str(md.get("general.name", "")),
    )
    return gemma_config(path, config, md) if arch in GEMMA_ARCHS else config


def _rope_scaling(path: Path, arch: str, md: dict, tensors: dict[str, QTensor]) -> RopeScaling:
    def number(key: str, default, kind=float):
        v = md.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
            raise ModelFormatError(f"{path}: metadata key {key} is {one_line(repr(v), 60)}, expected a number")
        return kind(v)

    kind = md.get(f"{arch}.rope.scaling.type", "none")
    kind = kind if isinstance(kind, str) else repr(kind)
    factor = number(f"{arch}.rope.scaling.factor", 1.0)
    if kind == "none" and f"{arch}.rope.scale_linear" in md:  # pre-2024 GGUF spelling
        kind, factor = "linear", number(f"{arch}.rope.scale_linear", 1.0)
    orig = number(f"{arch}.rope.scaling.original_context_length", 0, int)
    attn_factor = number(f"{arch}.rope.scaling.attn_factor", 1.0)
    if "rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors:
        return phi3_rope_scaling(path, tensors, orig, attn_factor)
    if "rope_freqs.weight" in tensors:
        # Llama 3.1+: llama.cpp's converter bakes the llama3 scaling into per-frequency divisors.
        t = tensors["rope_freqs.weight"]
        quants.target_type(t.qtype, t.name, str(path))
        if len(t.shape) != 1 or t.shape[0] > 4096:
            raise ModelFormatError(f"{path}: tensor rope_freqs.weight has shape {list(t.shape)}, expected "
                                   "[rope_dim/2]")
        freq = t.dequantize().tolist()
        return RopeScaling(kind="llama3", factor=max(freq), original_context=orig, freq_factors=tuple(freq),
                           attn_factor=attn_factor)
    if kind not in ("none", "linear", "yarn", "llama3") and factor != 1.0:
        raise ModelFormatError(f"{path}: unsupported RoPE scaling {kind!r} (supported: linear, yarn, llama3)")
    if kind not in ("linear", "yarn", "llama3"):
        kind = "none"
    return RopeScaling(kind=kind, factor=factor, original_context=orig, attn_factor=attn_factor)


def _file_type(md: dict, tensors: dict[str, QTensor]) -> str:
    counts: dict[str, int] = {}
    for t in tensors.values():
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    ft = md.get("general.file_type")
    try:
        name = LlamaFileType(ft).name.removeprefix("MOSTLY_") if ft is not None else "unknown"
    except ValueError:
        name = f"type {ft}"
    return f"{name} ({', '.join(f'{n} {k}' for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))})"


# -- weights --------------------------------------------------------------------------------------------

def _weights(path: Path, cfg: ModelConfig, tensors: dict[str, QTensor], report) -> tuple[ModelWeights, set]:
    used: set[str] = set()
    todo: list[QTensor] = []
    transposed: set[str] = set()

    def get(name: str, shape: tuple[int, ...], optional: bool = False) -> QTensor | None:
        t = tensors.get(name)
        if t is None:
            if optional:
                return None
            raise ModelFormatError(f"{path}: missing tensor {name}")
        if t.shape != shape:
            raise ModelFormatError(f"{path}: tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
        quants.target_type(t.qtype, name, str(path))  # unreadable types fail now, before any work
        used.add(name)
        if quants.needs_conversion(t.qtype):
            todo.append(t)
        return t

    d, ff, v = cfg.d_model, cfg.n_ff, cfg.n_vocab
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    embed = get(gguf_name("embed_tokens"), (v, d))
    norm = get(gguf_name("norm"), (d,))
    lm_head = embed if cfg.tie_embeddings else get(gguf_name("lm_head"), (v, d))
    pos_embd = None
    if cfg.positions == "learned":
        t = tensors.get(gguf_name("pos_embd"))
        if t is None or len(t.shape) != 2 or t.shape[1] != d:
            raise ModelFormatError(f"{path}: missing tensor {gguf_name('pos_embd')} [n_positions, {d}]")
        pos_embd = get(t.name, t.shape)
    shapes = dict(input_layernorm=(d,), q_proj=(q_dim, d), k_proj=(kv_dim, d), v_proj=(kv_dim, d),
                  o_proj=(d, q_dim), post_attention_layernorm=(d,), gate_proj=(ff, d), up_proj=(ff, d),
                  q_bias=(q_dim,), k_bias=(kv_dim,), v_bias=(kv_dim,), q_norm=(cfg.head_dim,),
                  k_norm=(cfg.head_dim,))
    optional = dict(gate_proj=cfg.ffn_kind == "mlp", q_bias=not cfg.attn_bias, k_bias=not cfg.attn_bias,
                    v_bias=not cfg.attn_bias, q_norm=not cfg.qk_norm, k_norm=not cfg.qk_norm)
    if cfg.norm == "layer":  # falcon / opt: biases where the file has them
        shapes.update(input_layernorm_bias=(d,), post_attention_layernorm_bias=(d,), o_bias=(d,), up_bias=(ff,),
                      down_bias=(d,))
        optional.update(dict.fromkeys(("input_layernorm_bias", "post_attention_layernorm_bias", "o_bias", "up_bias",
                                       "down_bias", "q_bias", "k_bias", "v_bias"), True))
    if cfg.post_norms:  # Gemma: norms of the attention and FFN outputs (post_attention_norm, post_ffw_norm)
        shapes.update(post_attn_norm=(d,), post_ffn_norm=(d,))
    layers = []
    for i in range(cfg.n_layer):
        fused = _falcon_layer(cfg, i, tensors, get, todo) if cfg.arch == "falcon" else \
            phi3_layer(cfg, i, tensors, get, todo) if cfg.arch == "phi3" else {}
        if gguf_name("down_t", i) in tensors:  # PowerInfer stores down_proj transposed (neuron-major)
            down = get(gguf_name("down_t", i), (ff, d))
            transposed.add(down.name)
        else:
            down = get(gguf_name("down_proj", i), (d, ff))
        # an act(up) MLP (powerinfer.ffn_kind = mlp) reads no gate, even where the file has one: the C decoder
        # binds a gate exactly when the FFN is gated
        layer = {role: (fused[role] if role in fused else None if role == "gate_proj" and cfg.ffn_kind == "mlp" else
                        get(gguf_name(role, i), shape, optional=optional.get(role, False)))
                 for role, shape in shapes.items()}
        layers.append(dict(layer, down_proj=down, down_t=down if down.name in transposed else None))
    used.update(n for n in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
                if n in tensors)

    converted = _convert(todo, report)

    def native(t: QTensor | None) -> QTensor | None:
        if t is None:
            return None
        t = converted.get(t.name, t)
        return quants.transpose(t, report) if t.name in transposed else t

    layer_norm = cfg.norm == "layer"
    weights = ModelWeights(
        embed_tokens=native(embed),
        layers=[LayerWeights(**{k: (converted.get(t.name, t) if k == "down_t" and t is not None else native(t))
                                for k, t in layer.items()}) for layer in layers],
        norm=native(norm),
        lm_head=None,
        norm_bias=native(get(gguf_name("norm_bias"), (d,), optional=True)) if layer_norm else None,
        pos_embd=native(pos_embd),
    )
    weights.lm_head = weights.embed_tokens if cfg.tie_embeddings else native(lm_head)
    return weights, used


def _falcon_layer(cfg: ModelConfig, i: int, tensors: dict[str, QTensor], get, todo: list) -> dict:
    """Falcon's layer i in LayerWeights roles: attn_qkv split into q, k, v row views of the one buffer (and its bias);
    the 40B layout's attn_norm_2 feeds attention and attn_norm the MLP (llama.cpp's build_falcon), the 7B layout
    has attn_norm only, shared."""
    d, hd = cfg.d_model, cfg.head_dim
    sizes = (cfg.n_head * hd, cfg.n_head_kv * hd, cfg.n_head_kv * hd)
    out = {}
    for suffix, roles, shape in ((".weight", ("q_proj", "k_proj", "v_proj"), (sum(sizes), d)),
                                 (".bias", ("q_bias", "k_bias", "v_bias"), (sum(sizes),))):
        t = get(f"blk.{i}.{GGUF_QKV}{suffix}", shape, optional=suffix == ".bias")
        if t is None:
            out.update(dict.fromkeys(roles))
            continue
        todo[:] = [x for x in todo if x is not t]  # the row views are converted instead of the whole
        start = 0
        for role, n in zip(roles, sizes):
            part = QTensor(f"{t.name}[{role[0]}]", t.qtype, (n, *shape[1:]), t.data[start:start + n])
            if quants.needs_conversion(part.qtype):
                todo.append(part)
            out[role] = part
            start += n
    norm2 = f"blk.{i}.{GGUF_ATTN_NORM_2}"
    mlp_w, mlp_b = get(gguf_name("input_layernorm", i), (d,)), get(gguf_name("input_layernorm_bias", i), (d,), True)
    if f"{norm2}.weight" in tensors:
        out.update(input_layernorm=get(f"{norm2}.weight", (d,)), input_layernorm_bias=get(f"{norm2}.bias", (d,), True))
    else:
        out.update(input_layernorm=mlp_w, input_layernorm_bias=mlp_b)
    out.update(post_attention_layernorm=mlp_w, post_attention_layernorm_bias=mlp_b)
    return out


def _convert(todo: list[QTensor], report) -> dict[str, QTensor]:
    """Convert non-native tensors once, with a progress bar when it takes more than a few seconds."""
    total = sum(int(np.prod(t.shape)) for t in todo)
    bar = None
    if total >= quants.PROGRESS_MIN_VALUES:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="val", unit_scale=True, desc="converting to native types", leave=False)
    out = {}
    for t in todo:
        out[t.name] = quants.convert_tensor(t, report)
        if bar is not None:
            bar.update(int(np.prod(t.shape)))
    if bar is not None:
        bar.close()
    return out
