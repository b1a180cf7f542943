#!/usr/bin/env python
"""Token-id parity of powerinfer's tokenizer with llama.cpp (through llama-cpp-python).

    python scripts/tokenizer_parity.py [-m MODEL] [--variants] [--write-golden FILE] [--check-golden FILE]

Tokenizes ~400 deterministic strings (prose, code, many scripts, emoji sequences, whitespace runs, numbers,
special-token look-alikes) with llama.cpp and with powerinfer and prints how many id lists are identical, the
first mismatches, and decode round trips. `--variants` also relabels the model's vocabulary with other
`tokenizer.ggml.pre` values and rebuilds it as a SentencePiece ("llama") vocabulary, writing vocab-only GGUFs
that llama.cpp loads, so every pre-tokenizer family is checked against llama.cpp, not only the model's own.
`--write-golden` stores llama.cpp's ids (tests/formats/test_tokenizer.py checks them without llama.cpp);
`--check-golden` compares powerinfer against a stored golden file instead of a live llama.cpp.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

# one name per regex family llama.cpp implements (plus llama-bpe for ignore_merges + add_bos)
VARIANT_PRES = ("default", "gpt-2", "llama-bpe", "dbrx", "qwen2", "falcon", "deepseek-llm", "deepseek-coder",
                "deepseek-v3", "bloom", "viking", "tekken", "gpt-4o", "seed-coder")
SPM_VARIANT = "spm"

PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "I'm sure they'll say it's fine, but we've seen what you'd do; don't worry.",
    "IT'S LOUD AND THEY'RE SHOUTING, AREN'T THEY? I'LL WAIT.",
    "O'Neil's dog's bone wasn't where Ma'am said it'd be.",
    "PowerInfer exploits activation locality: hot neurons on the GPU, cold ones on the CPU.",
    "In 1969, Apollo 11 landed on the Moon; 600 million people watched.",
    "Mr. Smith paid $1,234.56 for 3 items (about 411.52 each) on 2024-03-15 at 10:30am.",
    "She said, \"Well... I don't know.\" Then she left -- quietly.",
    "e.g. i.e. etc. vs. Dr. St. No. 5",
    "Large language models (LLMs) predict the next token given the previous ones.",
    "What is the capital of France? Answer in one paragraph.",
    "Once upon a time, in a land far, far away, there lived a king who loved numbers like 7, 77 and 777.",
    "   Indented sentence with three leading spaces.",
    "Trailing spaces are tricky   ",
    "camelCaseWords and snake_case_words and kebab-case-words and SCREAMING_CASE",
    "URLs: https://example.com/path?query=1&x=y#frag and mailto:someone@example.org",
    "Version 3.11.7, build 2.13.0+cpu, hash 5b23fe8a",
]
CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tprint(i ** 2)  # squares\n",
    "class Foo(Bar):\n    \"\"\"Doc.\"\"\"\n\n    def __init__(self, x: int = 0) -> None:\n        self.x = x\n",
    "#include <stdio.h>\nint main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}\n",
    "const f = (x) => x?.y ?? 0;\nlet s = `template ${f(1)}`;\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!(\"{:?}\", v);\n}\n",
    "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hi\") }\n",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
    "<div class=\"x\"><p>Hello &amp; goodbye</p><br/></div>",
    "#!/bin/bash\nfor f in *.txt; do echo \"$f\" | wc -l; done 2>&1 >/dev/null",
    "{\"key\": [1, 2.5, true, null], \"nested\": {\"a\": \"b\"}}",
    "\\begin{equation} E = mc^2 \\quad \\int_0^\\infty e^{-x^2} dx = \\frac{\\sqrt{\\pi}}{2} \\end{equation}",
    "x+=1;y-=2;z*=3;w/=4;a%=5;b<<=1;c>>=2;d&=e|f^g;",
    "    if (a != b && c == d || !e) { return; }",
    "import numpy as np\narr = np.zeros((3, 4), dtype=np.float32)\narr[1:, ::2] = -1.0e-3\n",
]
UNICODE = [
    "你好，世界！今天天气很好。", "我爱自然语言处理和机器学习。", "日本語のテキスト：ひらがな、カタカナ、漢字。",
    "東京は日本の首都です。", "한국어 텍스트입니다. 안녕하세요!", "مرحبا بالعالم، كيف حالك؟",
    "العربية لغة جميلة ١٢٣٤٥", "שלום עולם, מה שלומך?", "नमस्ते दुनिया, आप कैसे हैं?", "हिन्दी में लिखा गया वाक्य १२३।",
    "Привет, мир! Как дела?", "Съешь же ещё этих мягких французских булок.", "Γειά σου Κόσμε! Καλημέρα.",
    "Ελληνικά: αβγδεζηθ ΑΒΓΔ", "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่าง", "வணக்கம் உலகம்", "გამარჯობა მსოფლიო",
    "Բարեւ աշխարհ", "Xin chào thế giới, tiếng Việt có dấu.", "İstanbul'da ılık bir gün; ĞÜŞÖÇ ğüşöç",
    "Straße, Größe, Maß; ÄÖÜ äöü ß ẞ", "Ça va? Très bien, merci. Où est l'hôtel?", "café vs cafe\u0301 (NFC vs NFD)",
    "ñandú, pingüino, ¿qué? ¡sí!", "Ångström, Øre, Æsir, Þórr, ðe", "ǅemal ǈubljana ǋegoš (titlecase digraphs)",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝐁𝐨𝐥𝐝", "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ　１２３", "Ⅻ Ⅷ ½ ¾ ² ³ ① ② ⑩ ٣ ۴ ৫ ๖",
    # escapes: these characters change under NFC normalisation of a source file
    "\u00b5 vs \u03bc, K vs \u212a (Kelvin), \u03a9 vs \u2126 (Ohm), \u1fbe \u1fd3 \u1f7d \u1fdb \u212b",
    "ℌello ℭode ℵ₀ ∞ ∑ ∫ √ ≠ ≤ ≥ ± × ÷",
    "中文English混合mixed文本text", "한国語Mix日本語", "∀x∈ℝ: x²≥0", "Ā ā Ă ă Ą ą Ć ć Ĉ ĉ",
]
EMOJI = [
    "😀", "😀😃😄", "I love it ❤️!", "👍🏽 thumbs up with skin tone", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 rainbow flag",
    "🇫🇷🇯🇵🇺🇸 flags", "🧑🏿‍💻 technologist", "1️⃣ 2️⃣ #️⃣ keycaps", "🤷‍♀️🤦🏻‍♂️", "🐍 Python 🦀 Rust 🐹 Go",
    "emoji at end 🎉", "🎉emoji at start", "a😀b😃c", "©®™ ☀☁☂ ✓✗ ★☆", "🏴󠁧󠁢󠁳󠁣󠁴󠁿 Scotland",
]
SPACES = [
    " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", " \n", "\n ", " \n ", "\t\n\t",
    "  \n  \n", "a  b", "a   b", "a\tb", "a \tb", "a\t b", "a\n\nb", "a \n b", "a\n\n   3", "a\n\n  3", "x \n\n\n y",
    "word\u00a0nbsp", "ideographic\u3000space", "em\u2003space", "zero\u200bwidth", "line\u2028sep", "vt\x0bff\x0c",
    "fs\x1cgs\x1drs\x1eus\x1f", "nel\x85next", "   leading", "trailing   ", "\t\tindented\n\t\t\tmore",
    "  \t  mixed \t whitespace \t  ", "end\n", "\nstart", "many    spaces     between      words",
]
NUMBERS = [
    "1", "12", "123", "1234", "12345", "123456", "1234567", "12345678901234567890", "3.14159265358979",
    "1,000,000", "-42", "+7", "0x1F", "0b1010", "1e-10", "6.022e23", "2024-03-15", "12:34:56", "$99.99",
    "50%", "#1", "v2", "A1B2C3", "100km/h", "3rd 21st 2nd", "007", " 123", "  456", "a1", "1a", "1 2 3",
    "3.0.0-rc1", "192.168.0.1", "+1 (555) 123-4567",
]
PUNCT = [
    ".", "...", "!!!", "?!", "—", "–", "«quoted»", "“smart quotes”", "‘single’", "(parens)", "[brackets]",
    "{braces}", "@#$%^&*", "~`|\\", "<>", "::", "->", "=>", "!=", "==", "...?!", "''", "'", "\"", "'s", "'ll",
    " 's", "''quoted''", "¿¡", "、。，", "・", "§¶†‡", "…", "``code``", "<<>>", "/*", "*/", "//", "#!",
]
SPECIAL = [
    "<|im_start|>", "<|im_end|>", "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n", "<|im_start", "im_end|>", "< |im_end| >", "<|IM_START|>",
    "<|endoftext|>", "<|im_start|><|im_end|>", "<<|im_end|>>", "<|im_start|>>", "text<|im_end|>text",
    " <|im_end|> ", "<|im_end|>\n\n", "<repo_name>", "<reponame>x", "<file_sep>", "<jupyter_code>print(1)",
    "<s>", "</s>", "<unk>", "<0x41>", "[INST] hi [/INST]", "<|eot_id|>", "<|im_start|>user", "<|im_end|",
    "|im_end|>", "<|im_end|><|im_end|>", "a<|endoftext|>b<|im_start|>c",
]
LONG = (
    "Section 1.2 -- Results\n\nWe measured 12,345 tokens/s (±3.2%) on 2 cores; see Table 4.\n"
    "    def f(x):\n        return x**2  # O(n²)\n\n"
    "中文段落：模型在 95% 的情况下给出正确答案。\nالنتائج: ١٢٣ نقطة.\n"
    "Emoji 🎉🎉 and a flag 🇩🇪; spaces   and\ttabs\n\n\n<|im_end|> done."
)
SEPARATORS = ["", " ", "\n", "  ", "\t", " \n", "\n\n", ", "]


def parity_strings() -> list[str]:
    """The test strings: every group verbatim, then seeded random mixtures (deterministic across runs)."""
    base = PROSE + CODE + UNICODE + EMOJI + SPACES + NUMBERS + PUNCT + SPECIAL + [LONG, ""]
    rng = random.Random(20240315)
    out = list(base)
    pool = PROSE + CODE + UNICODE + EMOJI + NUMBERS + PUNCT + SPECIAL + SPACES
    for _ in range(160):
        parts = rng.sample(pool, rng.randint(2, 4))
        out.append("".join(p + rng.choice(SEPARATORS) for p in parts))
    for s in rng.sample(PROSE + UNICODE + NUMBERS + PUNCT, 40):     # leading / trailing space variants
        out += [" " + s, s + " ", "  " + s + "\n"]
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def variant_strings(strings: list[str]) -> list[str]:
    """Smaller set for the relabelled vocabularies (keeps the golden file small): every third string."""
    return strings[::3]


# -- vocabularies -------------------------------------------------------------------------------------------

def read_metadata(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def relabel_metadata(meta: dict, pre: str) -> dict:
    return {**meta, "tokenizer.ggml.pre": pre}


def synthetic_spm_metadata(meta: dict) -> dict:
    """A SentencePiece ("llama") vocabulary made from a byte-level BPE one: <unk> <s> </s>, 256 byte tokens,
    the BPE model's control tokens, then every normal token that is valid UTF-8, spaces as ▁."""
    from powerinfer.formats.tokenizer import _CHAR_TO_BYTE

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    seen = set(tokens)
    for i, (t, ty) in enumerate(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"])):
        if ty == 3:
            text = t
        else:
            try:
                text = bytes(_CHAR_TO_BYTE[c] for c in t).decode("utf-8").replace(" ", "\u2581")
            except (KeyError, UnicodeDecodeError):
                continue
        if text in seen or not text:
            continue
        seen.add(text)
        tokens.append(text)
        types.append(3 if ty == 3 else 1)
        # distinct scores in an order unrelated to the ids, so a merge ranking by id could not pass by luck
        scores.append(0.0 if ty == 3 else -float(i * 7919 % 65521))
    keep = ("general.", "llama.")
    out = {k: v for k, v in meta.items() if k.startswith(keep)}
    out.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0})
    return out


def write_vocab_gguf(meta: dict, path: Path) -> None:
    """A tensor-less GGUF that llama.cpp opens with vocab_only=True."""
    import gguf

    w = gguf.GGUFWriter(str(path), str(meta.get("general.architecture", "llama")))
    for k, v in meta.items():
        if k == "general.architecture":
            continue
        if k == "tokenizer.ggml.scores":
            w.add_array(k, [float(x) for x in v])
        elif k == "tokenizer.ggml.token_type":
            w.add_token_types([int(x) for x in v])
        elif isinstance(v, list):
            w.add_array(k, v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v) if v >= 0 else w.add_int32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_string(k, str(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -- comparison ---------------------------------------------------------------------------------------------

def dump_one_item_per_line(payload: dict) -> str:
    """JSON with one string / id list per line, so that a changed tokenization shows up as a one-line diff."""
    def dumps(v):
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"))

    def block(items: list[str], open_: str, close: str) -> str:
        return open_ + "\n" + ",\n".join(items) + "\n" + close

    def value_text(v) -> str:
        if isinstance(v, dict):
            return block([f"{dumps(k)}:{value_text(x)}" for k, x in v.items()], "{", "}")
        if isinstance(v, list) and v and isinstance(v[0], (list, str)):
            return block([dumps(x) for x in v], "[", "]")
        return dumps(v)

    return value_text(payload) + "\n"


def dedupe_variants(variants: dict[str, list]) -> dict[str, list | str]:
    """Variants whose ids equal an earlier one's name it instead of repeating the lists (smaller golden file)."""
    out: dict[str, list | str] = {}
    for name, ids in variants.items():
        out[name] = next((prev for prev, v in out.items() if v == ids), ids)
    return out


def llama_cpp_ids(path, strings: list[str]) -> dict[str, list[int]]:
    from llama_cpp import Llama

    llm = Llama(str(path), vocab_only=True, verbose=False)
    # llama-cpp-python's add_bos is llama.cpp's add_special: BOS/EOS only where the model asks for them,
    # which is what powerinfer's add_bos=None/add_eos=None do
    return {s: llm.tokenize(s.encode(), add_bos=True, special=True) for s in strings}


def compare(tok, expected: dict[str, list[int]], label: str, show: int = 5) -> tuple[int, int]:
    same, bad = 0, []
    for s, ids in expected.items():
        ours = tok.encode(s)
        if ours == ids:
            same += 1
        else:
            bad.append((s, ours, ids))
    print(f"{label}: {same} / {len(expected)} identical")
    for s, ours, ids in bad[:show]:
        print(f"  MISMATCH {s[:70]!r}\n    ours     {ours[:24]} {[tok.token_text(i) for i in ours[:12]]}\n"
              f"    llama.cpp {ids[:24]} {[tok.token_text(i) for i in ids[:12]]}")
    return same, len(expected)


def round_trips(tok, strings: list[str], label: str) -> int:
    bad = [s for s in strings if tok.decode(tok.encode(s, add_bos=False, add_eos=False)) != s]
    # expected failures: characters the vocabulary has no token for (dropped, as by llama.cpp), and for SPM the
    # space llama.cpp puts before text that follows a special token
    lost = [s for s in bad if any(not tok.encode(c, add_bos=False, add_eos=False, parse_special=False) for c in s)]
    after_special = [s for s in bad if s not in lost and tok.is_spm and any(isinstance(f, int)
                                                                            for f in tok._partition(s, True))]
    other = [s for s in bad if s not in lost and s not in after_special]
    print(f"{label}: decode(encode(s)) == s for {len(strings) - len(bad)} / {len(strings)}; of the rest "
          f"{len(lost)} hold characters the vocabulary cannot encode, {len(after_special)} have SPM text after a "
          f"special token, {len(other)} other" + (f": {[o[:40] for o in other[:3]]}" if other else ""))
    return len(strings) - len(bad)


def main(argv=None) -> int:
    from powerinfer.formats.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF file (default: the bundled SmolLM2)")
    ap.add_argument("--variants", action="store_true",
                    help="also check the vocabulary relabelled with other pre-tokenizers and as SentencePiece")
    ap.add_argument("--write-golden", metavar="FILE", help="store llama.cpp's ids as JSON")
    ap.add_argument("--check-golden", metavar="FILE", help="compare against a stored golden file (no llama.cpp)")
    args = ap.parse_args(argv)
    if args.model is None:
        from powerinfer.formats.bundled import bundled_model_path
        args.model = str(bundled_model_path())
    meta = read_metadata(args.model)
    strings = parity_strings()
    ok = True

    if args.check_golden:
        golden = json.loads(Path(args.check_golden).read_text())
        tok = Tokenizer.from_gguf_metadata(meta)
        same, total = compare(tok, golden["ids"], Path(args.model).name)
        ok &= same == total
        for name, id_lists in golden.get("variants", {}).items():
            vmeta = synthetic_spm_metadata(meta) if name == SPM_VARIANT else relabel_metadata(meta, name)
            if isinstance(id_lists, str):           # stored once under the first variant with the same ids
                id_lists = golden["variants"][id_lists]
            expected = dict(zip(golden["variant_texts"], id_lists))
            same, total = compare(Tokenizer.from_gguf_metadata(vmeta), expected, f"variant {name}")
            ok &= same == total
        return 0 if ok else 1

    tok = Tokenizer.from_gguf_metadata(meta)
    print(f"{len(strings)} strings; model {Path(args.model).name} ({tok.model}, pre={tok.pre}, "
          f"add_bos={tok.add_bos})")
    ids = llama_cpp_ids(args.model, strings)
    same, total = compare(tok, ids, "llama.cpp parity")
    ok &= same == total
    round_trips(tok, strings, "round trip")
    variants: dict[str, dict[str, list[int]]] = {}
    if args.variants:
        sub = variant_strings(strings)
        with tempfile.TemporaryDirectory() as tmp:
            for name in (*VARIANT_PRES, SPM_VARIANT):
                vmeta = synthetic_spm_metadata(meta) if name == SPM_VARIANT else relabel_metadata(meta, name)
                path = Path(tmp) / f"{name}.gguf"
                write_vocab_gguf(vmeta, path)
                try:
                    variants[name] = llama_cpp_ids(path, sub)
                except Exception as e:      # an older llama.cpp may not know a newer pre-tokenizer name
                    print(f"variant {name}: llama.cpp refused it ({e}); skipped")
                    continue
                vtok = Tokenizer.from_gguf_metadata(vmeta)
                same, total = compare(vtok, variants[name], f"variant {name}", show=3)
                ok &= same == total
                if name == SPM_VARIANT:
                    round_trips(vtok, sub, "variant spm round trip")
    if args.write_golden:
        import llama_cpp

        payload = {"about": "token ids from llama.cpp (llama-cpp-python tokenize(add_bos=True, special=True)) "
                            "for scripts/tokenizer_parity.py's strings; variants: the same vocabulary relabelled "
                            "with other tokenizer.ggml.pre values or rebuilt as SentencePiece, ids listed in "
                            "the order of variant_texts (a name instead of lists: same ids as that variant)",
                   "model": Path(args.model).name, "llama_cpp_python": llama_cpp.__version__,
                   "ids": ids, "variant_texts": variant_strings(strings),
                   "variants": dedupe_variants({name: list(v.values()) for name, v in variants.items()})}
        text = dump_one_item_per_line(payload)
        assert json.loads(text) == payload
        Path(args.write_golden).write_text(text)
        print(f"wrote {args.write_golden} ({len(text) / 1024:.0f} KiB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
