"""GGUF-style tokenizer metadata from an HF directory's `tokenizer.json` (+ `tokenizer_config.json`).

The same mapping llama.cpp's converter performs (tokens by id, merges, token types, a pre-tokenizer name),
so one `Tokenizer` class serves GGUF files and HF directories. Byte-level BPE only; SentencePiece HF
tokenizers are refused with advice to convert the model to GGUF.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import ModelFormatError

log = logging.getLogger(__name__)

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # GGUF tokenizer.ggml.token_type values


def _pre_name(pre_tokenizer: dict | None) -> str:
    """The llama.cpp pre-tokenizer family that an HF pre_tokenizer spec describes."""
    text = json.dumps(pre_tokenizer or {})
    if r"\\p{N}{1,3}" in text:
        return "llama-bpe"
    if '"Punctuation"' in text and "[0-9][0-9][0-9]" in text:
        # Falcon: punctuation runs, GPT-2's byte-level regex, digits in threes (llama.cpp's "falcon" regexes)
        return "falcon"
    if ('"Digits"' in text and '"individual_digits": true' in text) or r'"Regex": "\\p{N}"' in text:
        return "smollm"  # digits split one by one, then GPT-2's regex: the SmolLM / StarCoder family
    if r"\\p{N}" in text and '"Split"' in text:
        return "qwen2"
    if '"ByteLevel"' in text and '"use_regex": true' in text:
        return "gpt-2"
    log.warning("the HF pre-tokenizer is not one llama.cpp names; using its default regex")
    return "default"


def _template_adds_bos(post_processor) -> bool | None:
    procs = post_processor.get("processors", [post_processor]) if isinstance(post_processor, dict) else []
    for proc in procs:
        single = proc.get("single", []) if isinstance(proc, dict) and proc.get("type") == "TemplateProcessing" else []
        if len(single) > 1 and isinstance(single[0], dict) and single[0].get("SpecialToken", {}).get("id"):
            return True
    return None


def metadata_from_hf_dir(path: Path) -> dict:
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelFormatError(f"{path}: no tokenizer.json (a byte-level BPE tokenizer is needed; "
                               "or convert the model to GGUF)")
    spec = json.loads(tok_file.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ModelFormatError(f"{tok_file}: only byte-level BPE tokenizers are read from HF directories; "
                               "convert this model to GGUF (llama.cpp's convert_hf_to_gguf.py)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for text, t in added.items():
        vocab[text] = t["id"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [_USER_DEFINED] * n  # holes in the id range become unused placeholders, as llama.cpp does
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = _NORMAL
    for text, t in added.items():
        types[t["id"]] = _CONTROL if t.get("special") else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}

    def token_id(key):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if isinstance(v, str) else None

    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_name(spec.get("pre_tokenizer")),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    # gguf-py's SpecialVocab: tokenizer_config's add_bos_token, else a TemplateProcessing post-processor that puts a
    # special token first (Llama 3's tokenizer.json has no add_bos_token), else the pre-tokenizer's default
    add_bos = cfg.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _template_adds_bos(spec.get("post_processor"))
    if add_bos is not None:
        meta["tokenizer.ggml.add_bos_token"] = add_bos
    for key, gguf_key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                          ("pad_token", "padding")):
        i = token_id(key)
        if i is not None:
            meta[f"tokenizer.ggml.{gguf_key}_token_id"] = i
    return meta
