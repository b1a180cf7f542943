"""Tokenizer built from GGUF metadata whose ids equal llama.cpp's.

What llama.cpp does (src/llama-vocab.cpp, src/unicode.cpp) is the specification here:
  * vocab load: default special ids per vocab type, `tokenizer.ggml.*` overrides, special tokens found by their
    text (EOT/EOM/FIM) and the end-of-generation set, control tokens named "unused";
  * encoding: special tokens are cut out of the text first (longest first, `tokenizer_st_partition`), then every
    remaining fragment goes through the vocab's session: byte-level BPE after a list of pre-tokenizer regexes
    chosen by `tokenizer.ggml.pre` ("gpt2"), or the SentencePiece score-ordered merge with a space prefix and
    byte fallback ("llama");
  * decoding: `token_to_piece` per token (control tokens only when asked for), the first space dropped when the
    vocab adds a space prefix.
The merging itself runs in HF `tokenizers` (DESIGN decision 5): a BPE model whose merges are the GGUF merges
(gpt2), or for SPM one merge per split of every token ranked by that token's score, which is the pair llama.cpp's
SPM session merges next -- except among different tokens of equal score, where a small heap-based copy of
llama.cpp's loop takes over. scripts/tokenizer_parity.py measures all of this against llama.cpp.
"""
from __future__ import annotations

import codecs
import heapq
import logging
from typing import Any, Iterable, Mapping

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from ..errors import ModelFormatError, PowerInferError

log = logging.getLogger(__name__)


class Attr:
    """Token attribute bits, llama.h `llama_token_attr` (GGUF stores the coarser `token_type`). Plain ints:
    IntFlag arithmetic costs ~1 µs per operation, which adds up over a 250k-token vocabulary."""
    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8


# gguf TokenType value -> attribute; any other value is UNDEFINED, as in llama.cpp
_TYPE_TO_ATTR = {1: Attr.NORMAL, 2: Attr.UNKNOWN, 3: Attr.CONTROL, 4: Attr.USER_DEFINED, 5: Attr.UNUSED, 6: Attr.BYTE}
_SPECIAL = Attr.CONTROL | Attr.UNKNOWN      # hidden unless special=True, matched only when parse_special
_PARSED = _SPECIAL | Attr.USER_DEFINED      # cut out of the text before the tokenizer model runs
_C_SPACE = " \t\n\v\f\r"                    # C isspace(): what llama.cpp's LSTRIP/RSTRIP strip
_SPM_SPACE = "\u2581"                        # SentencePiece's visible space "▁"
_MAX_TIED_SPM = 256                         # beyond this many score-tied tokens, skip the substring pre-check

# -- pre-tokenizers ----------------------------------------------------------------------------------------
# Regex lists as llama.cpp applies them (each regex splits the pieces the previous one left; text between
# matches stays a piece of its own, which is HF Split's "isolated" behaviour). The patterns are the models' own
# tokenizer.json regexes in the form llama.cpp runs them: llama.cpp evaluates \p{..} classes on a "collapsed"
# text where every non-ASCII letter/number/... is one representative byte, so e.g. tekken's `(?=[\p{L}])[^a-z]`
# means "a letter other than ASCII a-z" -- written here unchanged, Oniguruma gives the same result on real text.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SEED_CODER = _CONTRACTIONS + (r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                               r"|\s+(?!\S)|\s+")
_UPPER = r"((?=[\p{L}])([^a-z]))"           # llama.cpp's stand-in for [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]
_LOWER = r"((?=[\p{L}])([^A-Z]))"           # ... and for [\p{Ll}\p{Lm}\p{Lo}\p{M}]
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"
_CJK = r"[一-龥ࠀ-一가-퟿]+"
# DeepSeek-LLM's letter class (its tokenizer.json): a subset of the cased letters (Lu/Ll/Lt) -- Latin, Greek,
# Cyrillic, Armenian capitals, Georgian, Cherokee, letterlike symbols, ... As code points, because several of
# them (U+1FBE, U+2126 OHM, U+212A KELVIN, ...) turn into other characters under NFC normalisation of a source file.
_DEEPSEEK_LETTER_RANGES = (
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF),
    (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377), (0x37B, 0x37D), (0x37F, 0x37F), (0x386, 0x386),
    (0x388, 0x38A), (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F), (0x531, 0x556),
    (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B),
    (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D),
    (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4),
    (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB),
    (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102), (0x2107, 0x2107), (0x210A, 0x2113),
    (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126), (0x2128, 0x2128), (0x212A, 0x212D),
    (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149), (0x214E, 0x214E), (0x2183, 0x2184),
    (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B),
    (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17),
    (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104D3), (0x104D8, 0x104FB),
    (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF), (0x1E900, 0x1E943))
_DEEPSEEK_LETTERS = "".join(f"{chr(a)}-{chr(b)}" for a, b in _DEEPSEEK_LETTER_RANGES)

_PRE_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt2": [_GPT2],
    "llama3": [_LLAMA3],
    "starcoder": [r"\p{N}", _GPT2],         # digits one by one, then GPT-2
    "qwen2": [_QWEN2],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    "deepseek-llm": [r"[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+", r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", _CJK,
                     r"\p{N}+"],
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"],
    "deepseek-v3": [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
                    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "bloom": [_BLOOM],
    "viking": [_BLOOM, r"\p{N}"],
    "tekken": [_TEKKEN],
    "gpt-4o": [_GPT4O],
    "seed-coder": [_SEED_CODER],
}
# tokenizer.ggml.pre -> (regex family, ignore_merges, default add_bos), llama.cpp's llama_vocab::impl::load
_PRE_TYPES: dict[str, tuple[str, bool, bool]] = {
    "default": ("default", False, False),
    **{n: ("llama3", True, True) for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                                           "midm-2.0", "lfm2")},
    **{n: ("llama3", False, False) for n in ("dbrx", "smaug-bpe", "chatglm-bpe", "glm4")},
    **{n: ("gpt2", False, False) for n in ("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "jina-v2-es",
                                           "jina-v2-de", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt",
                                           "olmo", "jais", "exaone4", "gigachat", "a.x-4.0", "mellum",
                                           "trillion", "granite-docling")},
    **{n: ("starcoder", False, False) for n in ("starcoder", "refact", "command-r", "smollm", "codeshell",
                                                "exaone", "minerva-7b")},
    **{n: ("qwen2", False, False) for n in ("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez", "hunyuan")},
    "falcon": ("falcon", False, False),
    "deepseek-llm": ("deepseek-llm", False, False),
    "deepseek-coder": ("deepseek-coder", False, False),
    "deepseek-v3": ("deepseek-v3", False, False),
    **{n: ("bloom", False, False) for n in ("bloom", "poro-chat", "gpt3-finnish")},
    "viking": ("viking", False, False),
    "tekken": ("tekken", True, True),
    **{n: ("gpt-4o", False, False) for n in ("gpt-4o", "llama4")},
    "seed-coder": ("seed-coder", False, False),
}
SUPPORTED_PRE = tuple(sorted(_PRE_TYPES))

# -- special tokens found by their text (llama.cpp: "auto-detect special tokens by text") --------------------
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_TEXTS = frozenset(("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
                        "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
                        "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
                        "<｜end▁of▁sentence｜>", "[e~["))
_ID_KEYS = ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask", "fim_pre", "fim_suf", "fim_mid",
            "fim_pad", "fim_rep", "fim_sep")
_DEPRECATED_FIM_KEYS = {"prefix": "fim_pre", "suffix": "fim_suf", "middle": "fim_mid"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


class Tokenizer:
    """Text <-> ids for a GGUF vocabulary ("gpt2" byte-level BPE or "llama" SentencePiece), as llama.cpp."""

    def __init__(self, meta: Mapping[str, Any]):
        model = meta.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ModelFormatError("the model has no tokenizer" if model is None else
                                   f"tokenizer model {model!r} is not supported (supported: 'gpt2' byte-level BPE, "
                                   "'llama' SentencePiece)")
        self.model = model
        self.is_spm = model == "llama"
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelFormatError("the model's tokenizer has no token list (tokenizer.ggml.tokens)")
        n = len(tokens)
        # llama.cpp renames empty tokens instead of rejecting the file
        self._text = [(t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)) or f"[EMPTY_{i}]"
                      for i, t in enumerate(tokens)]
        self._ids: dict[str, int] = {}
        for i, t in enumerate(self._text):
            if self._ids.setdefault(t, i) != i:
                log.warning("duplicate token %r (ids %d and %d); text lookups use the first", t, self._ids[t], i)
        types = meta.get("tokenizer.ggml.token_type")
        scores = meta.get("tokenizer.ggml.scores")
        for key, values in (("token_type", types), ("scores", scores)):
            if values is not None and len(values) < n:
                raise ModelFormatError(f"tokenizer.ggml.{key} has {len(values)} entries for {n} tokens")
        self._attr = ([_TYPE_TO_ATTR.get(int(t), Attr.UNDEFINED) for t in types[:n]] if types is not None
                      else [Attr.NORMAL] * n)
        self._scores = [float(s) for s in scores[:n]] if scores is not None else [0.0] * n

        pre = "default"
        ignore_merges = False
        if self.is_spm:
            self.add_bos, self.add_space_prefix = True, True
            ids = {"bos": 1, "eos": 2, "unknown": 0}
        else:
            pre = meta.get("tokenizer.ggml.pre") or ""
            if not pre:
                log.warning("the model names no pre-tokenizer (tokenizer.ggml.pre): using llama.cpp's default "
                            "regex; generation quality may suffer")
                pre = "default"
            elif pre not in _PRE_TYPES:
                log.warning("pre-tokenizer %r is unknown: using llama.cpp's default regex (ids may differ from "
                            "the model's own tokenizer); known: %s", pre, ", ".join(SUPPORTED_PRE))
            self._pre_family, ignore_merges, self.add_bos = _PRE_TYPES.get(pre, ("default", False, False))
            self.add_space_prefix = False
            ids = {"bos": 11, "eos": 11}        # llama.cpp's gpt2 defaults when the file names none
            if pre in ("chatglm-bpe", "glm4"):
                ids["bos"] = None
        self.pre = pre
        self.add_eos = False
        self.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", self.add_space_prefix))

        # special ids: defaults out of range are dropped, explicit keys win when in range
        ids = {k: (v if v is not None and v < n else None) for k, v in ids.items()}
        for key in _ID_KEYS + tuple(_DEPRECATED_FIM_KEYS):
            value = meta.get(f"tokenizer.ggml.{key}_token_id")
            if value is None:
                continue
            if not 0 <= int(value) < n:
                log.warning("special token %s = %s is outside the vocabulary; ignored", key, value)
                continue
            ids[_DEPRECATED_FIM_KEYS.get(key, key)] = int(value)
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", self.add_bos))
        self.add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", self.add_eos))
        self._special_ids = ids
        self._eog = self._find_special_by_text(ids, str(meta.get("general.name") or ""))

        # llama.cpp's special-token cache: longest text (in bytes) first
        self._special_cache = sorted(
            ((i, self._text[i], self._attr[i]) for i in range(n)
             if self._attr[i] & _PARSED),
            key=lambda e: -len(e[1].encode()))
        self._pieces: list[bytes | None] = [None] * n
        self._hf = self._build_spm() if self.is_spm else self._build_bpe(meta, _PRE_REGEXES[self._pre_family],
                                                                         ignore_merges)

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """`meta` maps GGUF keys to plain python values (`{key: field.contents()}`)."""
        return cls(meta)

    @classmethod
    def from_gguf_file(cls, path) -> "Tokenizer":
        import gguf

        reader = gguf.GGUFReader(str(path))
        return cls({k: f.contents() for k, f in reader.fields.items()
                    if k.startswith("tokenizer.") or k.startswith("general.")})

    def _find_special_by_text(self, ids: dict, model_name: str) -> frozenset[int]:
        """EOT/EOM/FIM ids and the end-of-generation set by token text, as llama.cpp (its hash-map order picks
        among several candidates of one kind; here the lowest id does)."""
        attr = self._attr

        def mark_control(i: int) -> None:
            # llama.cpp overrides the type of control-looking tokens stored as normal ones
            attr[i] |= Attr.CONTROL

        for kind, texts in (("eot", _EOT_TEXTS), ("eom", ("<|eom_id|>",)), *_FIM_TEXTS.items()):
            if ids.get(kind) is None:
                found = [self._ids[t] for t in texts if t in self._ids]
                if found:
                    ids[kind] = min(found)
                    mark_control(ids[kind])
        for i, t in enumerate(self._text):
            if attr[i] & Attr.CONTROL and "unused" in t:
                attr[i] |= Attr.UNUSED
        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids.get(k) is not None}
        for t in _EOG_TEXTS:
            if t in self._ids:
                eog.add(self._ids[t])
                mark_control(self._ids[t])
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):   # gpt-oss: always rendered
            if t in self._ids:
                attr[self._ids[t]] = Attr.USER_DEFINED
        eog |= {ids[k] for k in ("eos", "eot", "eom") if ids.get(k) is not None}
        texts = {self._text[i] for i in eog}
        # o200k_harmony / solar-open: "<|end|>" ends a message, not the generation
        if "<|end|>" in texts and texts & {"<|call|>", "<|calls|>"} and texts & {"<|return|>", "<|flush|>"}:
            end = self._ids["<|end|>"]
            eog.discard(end)
            attr[end] = Attr.USER_DEFINED
        # llama.cpp strips the whitespace after Phi-3's special tokens (its other strip rules are for BERT models)
        if "phi-3" in model_name.lower() or "phi3" in model_name.lower():
            for i in range(len(attr)):
                if attr[i] & _PARSED:
                    attr[i] |= Attr.RSTRIP
            if "</s>" in self._ids:
                attr[self._ids["</s>"]] |= Attr.RSTRIP
            for t in ("<unk>", "<s>", "<|endoftext|>"):
                if t in self._ids:
                    attr[self._ids[t]] &= ~Attr.RSTRIP
        return frozenset(eog)

    def _build_bpe(self, meta: Mapping[str, Any], regexes: list[str], ignore_merges: bool) -> HFTokenizer:
        raw = meta.get("tokenizer.ggml.merges")
        if raw is None:
            raise ModelFormatError("the model's BPE tokenizer has no merges (tokenizer.ggml.merges)")
        merges, dropped = [], 0
        for m in raw:
            m = m.decode("utf-8", "replace") if isinstance(m, bytes) else m
            cut = m.find(" ", 1)                 # llama.cpp splits at the first space after the first char
            a, b = (m[:cut], m[cut + 1:]) if cut > 0 else ("", "")
            if a in self._ids and b in self._ids and a + b in self._ids:
                merges.append((a, b))
            else:
                dropped += 1
        if dropped:
            log.warning("%d BPE merges refer to tokens outside the vocabulary; ignored", dropped)
        hf = HFTokenizer(models.BPE(vocab=self._ids, merges=merges, ignore_merges=ignore_merges))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return hf

    def _build_spm(self) -> HFTokenizer | None:
        # llama.cpp's SPM session starts from single characters and repeatedly merges the adjacent pair whose
        # concatenation is a vocab token with the highest score, the leftmost one on equal scores. As BPE merges:
        # every split (a, b) of a token t, ranked by t's score. A part may be a single character that is not
        # itself a token (a vocab with "▁Æ" but no "Æ"): such characters get ids past the vocabulary so they can
        # still merge, and `_spm_encode` turns any left unmerged into byte tokens, as llama.cpp's resegment does.
        # BPE ranks cannot express "leftmost among equal scores", so text that could produce a token whose score
        # another mergeable token shares goes through `_spm_exact` instead (measured on a vocabulary with all
        # scores equal, as gguf-py writes for HF-only llama tokenizers: 397/508 strings matched without this).
        vocab = dict(self._ids)
        ranked, score_count = [], {}
        for i, t in enumerate(self._text):
            mergeable = False
            for cut in range(1, len(t)):
                a, b = t[:cut], t[cut:]
                for part in (a, b):
                    if len(part) == 1 and part not in vocab:
                        vocab[part] = len(vocab)
                if a in vocab and b in vocab:
                    ranked.append((-self._scores[i], i, cut, a, b))
                    mergeable = True
            if mergeable:
                score_count[self._scores[i]] = score_count.get(self._scores[i], 0) + 1
        ranked.sort()
        tied = {self._text[i] for _, i, *_ in ranked if score_count[self._scores[i]] > 1}
        self._spm_tied = sorted(tied, key=len)
        if len(tied) > _MAX_TIED_SPM:
            return None                  # nearly every merge ties: the exact path does all the work
        self._spm_chars = {i: t.encode() for t, i in vocab.items() if i >= len(self._text)}
        model = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], byte_fallback=True)
        return HFTokenizer(model)   # no pre-tokenizer: llama.cpp runs SPM over the whole fragment

    def _spm_encode(self, text: str) -> list[int]:
        if self._hf is None or any(t in text for t in self._spm_tied):
            return self._spm_exact(text)
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if not any(i in self._spm_chars for i in ids):
            return ids
        out = []
        for i in ids:
            out += [self._byte_token(b) for b in self._spm_chars[i]] if i in self._spm_chars else [i]
        return out

    def _spm_exact(self, text: str) -> list[int]:
        """llama.cpp's SPM session step by step: a heap of adjacent pairs whose concatenation is a token,
        highest score first, leftmost on ties; stale pairs are recognised by their changed lengths."""
        n = len(text)
        start, length = list(range(n)), [1] * n
        nxt, prv = [*range(1, n), -1], list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                piece = text[start[left]:start[right] + length[right]]
                tid = self._ids.get(piece)
                if tid is not None:
                    heapq.heappush(heap, (-self._scores[tid], left, right, len(piece)))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not length[left] or not length[right] or length[left] + length[right] != size:
                continue
            length[left] += length[right]
            length[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        out, i = [], 0 if n else -1
        while i >= 0:
            piece = text[start[i]:start[i] + length[i]]
            tid = self._ids.get(piece)
            out += [tid] if tid is not None else [self._byte_token(b) for b in piece.encode()]
            i = nxt[i]
        return out

    def _byte_token(self, byte: int) -> int:
        """llama.cpp byte_to_token for SPM: "<0xXX>", else the byte as a one-character token."""
        tid = self._ids.get(f"<0x{byte:02X}>", self._ids.get(chr(byte)))
        if tid is None:
            raise PowerInferError(f"the vocabulary has no token for byte 0x{byte:02X}")
        return tid

    # -- properties -----------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._text)

    @property
    def bos_id(self) -> int | None:
        return self._special_ids.get("bos")

    @property
    def eos_id(self) -> int | None:
        return self._special_ids.get("eos")

    @property
    def eot_id(self) -> int | None:
        return self._special_ids.get("eot")

    @property
    def unk_id(self) -> int | None:
        return self._special_ids.get("unknown")

    @property
    def pad_id(self) -> int | None:
        return self._special_ids.get("padding")

    @property
    def eog_ids(self) -> frozenset[int]:
        """Tokens that end generation (llama.cpp's `llama_vocab_is_eog`)."""
        return self._eog

    def token_text(self, token_id: int) -> str:
        """The token as stored in the vocabulary (byte-level or ▁-escaped)."""
        return self._text[token_id]

    def token_attr(self, token_id: int) -> int:
        return self._attr[token_id]

    def token_id(self, text: str) -> int | None:
        """Id of the vocabulary entry spelled exactly `text` (e.g. "<|im_end|>"), else None."""
        return self._ids.get(text)

    # -- encode -----------------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True,
               add_eos: bool | None = None) -> list[int]:
        """Token ids of `text`. `add_bos`/`add_eos` None follow the model (`tokenizer.ggml.add_bos_token`, ...);
        with `parse_special` control tokens written in the text (e.g. "<|im_start|>") become their ids,
        user-defined tokens always do (llama.cpp's `special` flag)."""
        add_bos = self.add_bos if add_bos is None else add_bos
        add_eos = self.add_eos if add_eos is None else add_eos
        if not isinstance(text, str):
            raise PowerInferError(f"text to tokenize must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: Python's stand-ins for invalid UTF-8 in argv or files
            raise PowerInferError(f"the text is not valid Unicode (character {e.start} is a lone surrogate; invalid "
                                  "UTF-8 in a command-line argument?)") from None
        out: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise PowerInferError("this model has no BOS token; encode with add_bos=False")
            out.append(self.bos_id)
        prev_special = True                      # SPM prefixes a space to the text and after every special token
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            if self.is_spm:
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                out += self._spm_encode(frag.replace(" ", _SPM_SPACE))
            else:
                out += self._hf.encode(frag, add_special_tokens=False).ids
            prev_special = False
        if add_eos:
            if self.eos_id is None:
                raise PowerInferError("this model has no EOS token; encode with add_eos=False")
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special-token texts out of `text`, longest token first (llama.cpp `tokenizer_st_partition`)."""
        frags: list[str | int] = [text] if text else []
        for tid, piece, attr in self._special_cache:
            if (not parse_special and attr & _SPECIAL) or piece not in text:
                continue
            out: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or piece not in frag:
                    out.append(frag)
                    continue
                start = 0
                while (hit := frag.find(piece, start)) >= 0:
                    left = frag[start:hit]
                    if attr & Attr.LSTRIP:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        out.append(left)
                    out.append(tid)
                    start = hit + len(piece)
                    if attr & Attr.RSTRIP:
                        while start < len(frag) and frag[start] in _C_SPACE:
                            start += 1
                if start < len(frag):
                    out.append(frag[start:])
            frags = out
        return frags

    # -- decode -----------------------------------------------------------------------------------------------

    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes a token stands for (llama.cpp `token_to_piece`); control/unknown tokens give their text only
        with `special`, unused and undefined tokens give nothing."""
        if not 0 <= token_id < len(self._text):
            raise IndexError(f"token id {token_id} is outside the vocabulary (0..{len(self._text) - 1})")
        attr = self._attr[token_id]
        if attr & _SPECIAL and not special:
            return b""
        piece = self._pieces[token_id]
        if piece is None:
            text = self._text[token_id]
            if attr & (_SPECIAL | Attr.USER_DEFINED):
                piece = text.encode()
            elif attr & Attr.NORMAL:
                if self.is_spm:
                    piece = text.replace(_SPM_SPACE, " ").encode()
                else:
                    # characters outside GPT-2's byte table (rare hand-added tokens) pass through as UTF-8;
                    # llama.cpp writes an "[UNK_BYTE_..]" marker there instead
                    piece = b"".join(bytes((_CHAR_TO_BYTE[c],)) if c in _CHAR_TO_BYTE else c.encode() for c in text)
            elif attr & Attr.BYTE:
                try:
                    piece = bytes((int(text[3:5], 16),))
                except ValueError:  # a byte token not spelled <0xXX> (a corrupt vocabulary): its text
                    piece = text.encode()
            else:
                piece = b""
            self._pieces[token_id] = piece
        return piece

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        """Text of `ids` (invalid UTF-8 becomes U+FFFD). As llama.cpp's detokenize, a vocab that adds a space
        prefix drops one leading space of the first token; unlike it, no clean-up of spaces before punctuation
        (so decode(encode(s)) == s)."""
        pieces = [self.token_bytes(i, special) for i in ids]
        if self.add_space_prefix and pieces and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]
        return b"".join(pieces).decode("utf-8", "replace")


class StreamDecoder:
    """Token-by-token text for streaming: `push` returns only complete UTF-8 characters and keeps the bytes of
    a character split across tokens until it is complete; `flush` returns what is left (invalid bytes as
    U+FFFD). Control tokens are hidden unless `special` (llama.cpp's llama-cli/server default); no leading space
    is dropped, since generated text continues the prompt."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < self.tokenizer.vocab_size:
            return ""  # an embedding row past the vocabulary (padded models): no text, as HF tokenizers decode it
        return self._utf8.decode(self.tokenizer.token_bytes(token_id, self.special))

    def flush(self) -> str:
        tail = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return tail
