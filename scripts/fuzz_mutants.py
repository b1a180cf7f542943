"""Seeds and mutations of scripts/fuzz_gguf.py (the harness that runs them): small valid model files and artifacts
written fresh, and the ways a mutant is made from them. `mutant(seeds, base_seed, i)` is deterministic."""
from __future__ import annotations

import json
import math
import random
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HOSTILE_TEMPLATES = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'a'|center(10**9) }}", "{{ '{0:>1000000000}'.format(1) }}", "{{ 'a' * 10**8 }}", "{{ lipsum(10**6) }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ '%1000000000d'|format(1) }}", "{{ messages[0]['content'] * 10**7 }}", "{% for m in messages %}",
]


# -- seeds --------------------------------------------------------------------------------------------------------

def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what gguf byte-level BPE vocabularies store)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _bpe_vocab(n_merges: int = 96) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a tiny byte-level BPE trained on the calibration text's first 20 KB."""
    from powerinfer.textdata import pydoc_topics

    table = _byte_chars()
    words = Counter(tuple(table[b] for b in w.encode()) for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+",
                                                                             pydoc_topics("calib")[:20000]))
    tokens, merges = [table[b] for b in range(256)], []
    for _ in range(n_merges):
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        new = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    return tokens + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], merges


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
          + " " * 160)  # room for same-length hostile templates


def write_seed_model(path: Path, pwri: bool, seed: int = 0) -> Path:
    """A small valid llama GGUF (pwri: PowerInfer's layout: ReLU, ffn_down_t, fc1/fc2 predictors, PWRI magic)."""
    from gguf import GGMLQuantizationType as Q, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    # ~3.5 MB: large enough that the memory allowance (2 x the file) is above interpreter noise (a deep
    # recursion's frames take ~1.4 MB), small enough to run ~15 mutants a second
    d, n_layer, n_head, n_head_kv, n_ff, rank = 256, 4, 8, 4, 768, 64
    hd = d // n_head
    tokens, merges = _bpe_vocab()
    v = len(tokens)
    w = GGUFWriter(str(path), "llama")
    w.add_name("fuzz-seed")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(7)
    if pwri:
        w.add_string("powerinfer.ffn_activation", "relu")
        w.add_float32("powerinfer.sparse_threshold", 0.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([1] * (v - 3) + [3, 3, 3])
    w.add_token_merges(merges)
    w.add_bos_token_id(v - 3)
    w.add_eos_token_id(v - 1)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def mat(rows, cols, scale=None):
        return (rng.standard_normal((rows, cols)) * (scale or cols ** -0.5)).astype(np.float32)

    def put(name, values, qtype):
        stored = values if qtype == Q.F32 else values.astype(np.float16) if qtype == Q.F16 else \
            quantize(values, qtype)
        w.add_tensor(name, stored, raw_dtype=qtype if stored.dtype == np.uint8 else None)

    put("token_embd.weight", mat(v, d, 1.0), Q.Q8_0)
    for i in range(n_layer):
        put(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32), Q.F32)
        put(f"blk.{i}.attn_q.weight", mat(d, d), Q.Q4_0)
        put(f"blk.{i}.attn_k.weight", mat(n_head_kv * hd, d), Q.Q4_1)
        put(f"blk.{i}.attn_v.weight", mat(n_head_kv * hd, d), Q.Q8_0)
        put(f"blk.{i}.attn_output.weight", mat(d, d), Q.F16)
        put(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32), Q.F32)
        put(f"blk.{i}.ffn_gate.weight", mat(n_ff, d), Q.Q8_0)
        put(f"blk.{i}.ffn_up.weight", mat(n_ff, d), Q.Q4_0)
        if pwri:
            put(f"blk.{i}.ffn_down_t.weight", mat(n_ff, d), Q.F16)
            put(f"blk.{i}.fc1.weight", mat(rank, d), Q.F16)
            put(f"blk.{i}.fc2.weight", mat(n_ff, rank), Q.F16)
        else:
            put(f"blk.{i}.ffn_down.weight", mat(d, n_ff), Q.Q8_0)
    put("output_norm.weight", np.ones(d, np.float32), Q.F32)
    put("output.weight", mat(v, d), Q.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if pwri:
        with open(path, "r+b") as fh:
            fh.write(b"PWRI")
    return path


@dataclass
class Seed:
    name: str
    kind: str  # gguf | json | safetensors: how it is mutated
    data: bytes  # the valid file
    model: Path  # the model the run uses (the mutant itself for gguf seeds)
    argv: list[str]  # extra CLI flags
    target: str = ""  # where an artifact mutant goes, relative to the child's HOME ("" = a model file)
    layout: list = field(default_factory=list)  # header integer fields of gguf seeds: (offset, width, what)
    data_ranges: list = field(default_factory=list)  # (offset, nbytes, qtype) of tensor data
    kv_bytes: int = 0  # the KV cache a run of the clean model allocates (f16 K and V, every layer)


def gguf_layout(path: Path) -> tuple[list[tuple[int, int, str]], list[tuple[int, int, str]]]:
    """Every integer field of the header ((offset, bytes, what)) and every tensor's data ((offset, nbytes, type))."""
    from gguf import GGUFReader, GGUFValueType

    raw = bytearray(path.read_bytes())
    magic = bytes(raw[:4])
    raw[:4] = b"GGUF"  # gguf-py reads GGUF only; the layout is the same
    tmp = path.with_suffix(".layout.tmp")
    tmp.write_bytes(bytes(raw))
    try:
        r = GGUFReader(tmp)
        base = r.data.ctypes.data
        fields = [(8, 8, "n_tensors"), (16, 8, "n_kv")]
        for f in r.fields.values():
            if f.name.startswith("GGUF."):
                continue
            offs = [p.ctypes.data - base for p in f.parts]
            fields.append((offs[0], 8, "key_len"))
            fields.append((offs[2], 4, "value_type"))
            t = f.types[0]
            if t == GGUFValueType.STRING:
                fields.append((offs[3], 8, "string_len"))
            elif t == GGUFValueType.ARRAY:
                fields.append((offs[3], 4, "array_type"))
                fields.append((offs[4], 8, "array_len"))
                if f.types[-1] == GGUFValueType.STRING:
                    for k in range(5, min(len(offs), 5 + 2 * 8), 2):  # the first few element lengths
                        fields.append((offs[k], 8, "string_len"))
            else:
                fields.append((offs[3], f.parts[3].nbytes, f"value_{t.name.lower()}"))
        ranges = []
        for t in r.tensors:
            offs = [p.ctypes.data - base for p in t.field.parts]
            fields += [(offs[0], 8, "name_len"), (offs[2], 4, "n_dims")]
            fields += [(offs[3] + 8 * k, 8, "dim") for k in range(len(t.shape))]
            fields += [(offs[4], 4, "tensor_type"), (offs[5], 8, "tensor_offset")]
            ranges.append((t.data_offset, int(t.n_bytes), t.tensor_type.name))
        return fields, ranges
    finally:
        tmp.unlink()
        assert magic in (b"GGUF", b"PWRI")


def make_seeds(work: Path, n_ctx: int) -> list[Seed]:
    import powerinfer
    from powerinfer.formats.loader import load_model
    from powerinfer.sparse.artifacts import Thresholds, default_thresholds_path, model_fingerprint
    from powerinfer.sparse.predictor import PredictorSet

    dense = write_seed_model(work / "seed.gguf", pwri=False)
    pwri = write_seed_model(work / "seed.pwri.gguf", pwri=True, seed=1)
    seeds = []
    for path, name, argv in ((dense, "gguf", ["--sparsity", "off"]), (pwri, "pwri", ["--sparsity", "auto"])):
        layout, ranges = gguf_layout(path)
        seeds.append(Seed(name, "gguf", path.read_bytes(), path, argv, layout=layout, data_ranges=ranges))
    loaded = load_model(dense)
    fp = model_fingerprint(loaded)
    th_rel = default_thresholds_path(fp, "hu", 0.5, "home/.cache/powerinfer")
    th = Thresholds("hu", 0.5, {"h": [0.02] * loaded.config.n_layer}, fp, {"text": "fuzz", "n_tokens": 0})
    th_path = th.save(work / "thresholds.json")
    seeds.append(Seed("thresholds", "json", th_path.read_bytes(), dense, ["--sparsity", "0.5"],
                      target=str(Path(*th_rel.parts[1:]))))
    lp = load_model(pwri)
    cfg = lp.config
    rng = np.random.default_rng(2)
    import torch

    ps = PredictorSet([torch.from_numpy(rng.standard_normal((16, cfg.d_model)).astype(np.float32))
                       for _ in range(cfg.n_layer)],
                      [torch.from_numpy(rng.standard_normal((cfg.n_ff, 16)).astype(np.float32))
                       for _ in range(cfg.n_layer)], 0.0, {"fingerprint": model_fingerprint(lp)})
    pred = ps.save(work / "predictors.safetensors")
    seeds.append(Seed("predictors", "safetensors", pred.read_bytes(), pwri,
                      ["--sparsity", "auto", "--predictors", "{target}"], target="predictors.safetensors"))
    for s in seeds:
        c = load_model(s.model).config
        s.kv_bytes = 2 * 2 * c.n_layer * n_ctx * c.n_head_kv * c.head_dim
    del powerinfer
    return seeds


# -- mutations ----------------------------------------------------------------------------------------------------

EXTREMES = [0, 1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 33, 255, 256, 1023, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1,
            2**32, 2**32 + 1, 2**40, 2**48, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def _put_int(data: bytearray, off: int, width: int, value: int) -> None:
    if 0 <= off and off + width <= len(data):
        data[off:off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")


def _int_value(rng: random.Random, cur: int, width: int) -> int:
    choice = rng.random()
    if choice < 0.45:
        return rng.choice(EXTREMES)
    if choice < 0.75:
        return cur + rng.choice([-64, -32, -8, -2, -1, 1, 2, 8, 32, 64, cur, -cur])
    if choice < 0.85:
        return cur * rng.choice([2, 4, 16, 1024])
    return rng.getrandbits(8 * width)


def mutate_gguf(seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(seed.data)
    header_end = min(o for o, _, _ in seed.data_ranges) if seed.data_ranges else len(data)
    op = rng.choices(["field", "bitflip", "bytes", "truncate", "nonfinite", "chunk", "template", "shape", "type",
                      "multi"], weights=[30, 14, 8, 8, 10, 6, 4, 8, 6, 6])[0]
    if op == "multi":  # several field mutations at once
        for _ in range(rng.randint(2, 5)):
            off, width, what = rng.choice(seed.layout)
            _put_int(data, off, width, _int_value(rng, int.from_bytes(data[off:off + width], "little"), width))
        return bytes(data), "multi"
    if op in ("field", "shape", "type"):
        fields = seed.layout
        if op == "shape":
            fields = [f for f in fields if f[2] in ("dim", "n_dims")]
        elif op == "type":
            fields = [f for f in fields if f[2] in ("tensor_type", "value_type", "array_type")]
        off, width, what = rng.choice(fields)
        cur = int.from_bytes(data[off:off + width], "little")
        if op == "type":
            value = rng.choice([rng.randrange(0, 40), rng.getrandbits(32), cur + 1, cur - 1])
        elif op == "shape":
            value = rng.choice([cur * 2, cur // 2, cur + 32, max(cur - 32, 0), cur + 1, 0, 1, 2**32, 2**63])
        else:
            value = _int_value(rng, cur, width)
        _put_int(data, off, width, value)
        return bytes(data), f"{op}:{what}"
    if op == "bitflip":
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(header_end) if rng.random() < 0.6 else rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        return bytes(data), "bitflip"
    if op == "bytes":
        pos = rng.randrange(len(data))
        n = rng.randint(1, 16)
        data[pos:pos + n] = bytes(rng.getrandbits(8) for _ in range(n))
        return bytes(data), "bytes"
    if op == "truncate":
        cut = rng.randrange(header_end + 64) if rng.random() < 0.7 else rng.randrange(len(data))
        return bytes(data[:cut]), "truncate"
    if op == "chunk":
        a = rng.randrange(header_end)
        b = min(len(data), a + rng.randint(1, 256))
        if rng.random() < 0.5:
            del data[a:b]
            return bytes(data), "chunk:delete"
        data[a:a] = data[a:b]
        return bytes(data), "chunk:duplicate"
    if op == "template":
        i = bytes(data).find(CHATML[:40].encode())
        t = rng.choice(HOSTILE_TEMPLATES).encode()
        if i >= 0 and len(t) <= len(CHATML):
            data[i:i + len(CHATML)] = t.ljust(len(CHATML))
        return bytes(data), "template"
    # nonfinite: NaN/inf/huge in tensor data (floats directly; block formats through their f16 scale)
    off, nbytes, qtype = rng.choice(seed.data_ranges)
    pos = off + rng.randrange(max(1, nbytes // 2)) * 2 if qtype != "F32" else off + rng.randrange(nbytes // 4) * 4
    if qtype in ("Q8_0", "Q4_0", "Q4_1"):
        block = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]
        pos = off + rng.randrange(nbytes // block) * block
    value = rng.choice(["nan", "inf", "-inf", "huge"])
    if qtype == "F32":
        data[pos:pos + 4] = struct.pack("<f", {"nan": math.nan, "inf": math.inf, "-inf": -math.inf,
                                               "huge": 3e38}[value])
    else:
        data[pos:pos + 2] = struct.pack("<e", {"nan": math.nan, "inf": math.inf, "-inf": -math.inf,
                                               "huge": 65504.0}[value])
    return bytes(data), f"nonfinite:{value}"


def _json_mutation(rng: random.Random, doc):
    """A type-swapped, emptied, nested or out-of-range version of a JSON document (in place on a copy)."""
    swaps = [None, 0, -1, 1e308, float("nan"), float("inf"), "x", "", [], {}, [[[]]], True, 2**70, [0.0] * 3,
             {"h": "x"}, {"h": [None]}, {"q": [0.1]}]

    def walk(node, depth=0):
        keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) \
            else []
        if not keys:
            return
        k = rng.choice(keys)
        if isinstance(node[k], (dict, list)) and rng.random() < 0.6 and depth < 6:
            walk(node[k], depth + 1)
        elif rng.random() < 0.15 and isinstance(node, dict):
            del node[k]
        else:
            node[k] = rng.choice(swaps)

    walk(doc)
    return doc


def mutate_artifact(seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(seed.data)
    ops = ["bitflip", "bytes", "truncate", "chunk"] + (["json"] * 4 + ["nest"] if seed.kind == "json" else
                                                       ["header"] * 4 + ["headerlen"] * 2 + ["reshape"] * 3)
    op = rng.choice(ops)
    if op == "reshape":  # a well-formed predictor file (right fingerprint) whose shapes do not fit the model
        return _reshaped_predictors(seed.data, rng)
    if op == "json":
        doc = _json_mutation(rng, json.loads(seed.data))
        return json.dumps(doc, allow_nan=True).encode(), "json:types"
    if op == "nest":
        depth = rng.choice([100, 5000, 100000])
        return ("[" * depth + "]" * depth).encode() if rng.random() < 0.5 else \
            seed.data.replace(b'"values"', b'"values": ' + b"[" * depth + b"]" * depth + b', "x"', 1), "json:nest"
    if op in ("header", "headerlen"):  # safetensors: u64 header length, then a JSON header
        n = int.from_bytes(data[:8], "little")
        if op == "headerlen":
            _put_int(data, 0, 8, _int_value(rng, n, 8))
            return bytes(data), "safetensors:header_len"
        header = json.loads(data[8:8 + n])
        name = rng.choice([k for k in header if k != "__metadata__"])
        entry = header[name]
        what = rng.choice(["shape", "dtype", "offsets", "metadata"])
        if what == "shape":
            entry["shape"] = rng.choice([[entry["shape"][0], entry["shape"][1] + 32], entry["shape"][::-1],
                                         [entry["shape"][0] * 2, entry["shape"][1] // 2], [0, 16], [1, 2**40]])
        elif what == "dtype":
            entry["dtype"] = rng.choice(["F16", "I64", "BOOL", "U8", "F64", "BF16", "X9"])
        elif what == "offsets":
            a, b = entry["data_offsets"]
            entry["data_offsets"] = rng.choice([[a, b + 4], [b, a], [0, 2**40], [a + 2, b + 2]])
        else:
            meta = json.loads(header["__metadata__"]["powerinfer"])
            header["__metadata__"]["powerinfer"] = json.dumps(_json_mutation(rng, meta))
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        return len(blob).to_bytes(8, "little") + blob + bytes(data[8 + n:]), f"safetensors:{what}"
    if op == "bitflip":
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data), "bitflip"
    if op == "bytes":
        pos = rng.randrange(len(data))
        data[pos:pos + 4] = bytes(rng.getrandbits(8) for _ in range(4))
        return bytes(data), "bytes"
    if op == "truncate":
        return bytes(data[:rng.randrange(len(data))]), "truncate"
    a = rng.randrange(len(data))
    del data[a:a + rng.randint(1, 64)]
    return bytes(data), "chunk:delete"


def _reshaped_predictors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    from safetensors.numpy import load, save

    n = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + n]).get("__metadata__")
    tensors = load(data)
    name = rng.choice(sorted(tensors))
    t = tensors[name]
    r, c = t.shape
    shape = rng.choice([(r, c + 32), (r, c // 2), (r + 8, c), (max(r - 8, 1), c), (c, r), (r, 1), (1, c)])
    tensors[name] = np.resize(t, shape).astype(t.dtype)
    if rng.random() < 0.3:  # sometimes drop a layer or add one past the model's
        layer = name.split(".")[1]
        if rng.random() < 0.5:
            tensors = {k: v for k, v in tensors.items() if k.split(".")[1] != layer}
        else:
            tensors.update({k.replace(f"layers.{layer}.", "layers.99."): v for k, v in tensors.items()
                            if k.split(".")[1] == layer})
    return save(tensors, metadata=metadata), f"predictors:reshape {list(t.shape)}->{list(shape)}"


def mutant(seeds: list[Seed], base_seed: int, i: int) -> tuple[Seed, bytes, str]:
    rng = random.Random(f"{base_seed}:{i}")
    seed = seeds[i % len(seeds)]
    data, what = (mutate_gguf if seed.kind == "gguf" else mutate_artifact)(seed, rng)
    return seed, data, what
