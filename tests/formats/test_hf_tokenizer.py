"""An HF directory's tokenizer.json gives the same ids as the GGUF vocabulary (llama.cpp's golden ids)."""
import json

import pytest

from powerinfer.errors import ModelFormatError
from powerinfer.formats.hf_tokenizer import metadata_from_hf_dir
from powerinfer.formats.tokenizer import Tokenizer

# SmolLM2's own tokenizer.json pre-tokenizer (reference/baselines.md section 4)
SMOLLM2_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory, bundled_model_path):
    gguf_tok = Tokenizer.from_gguf_file(bundled_model_path)
    d = tmp_path_factory.mktemp("hf_tok")
    gguf_tok._hf.save(str(d / "tokenizer.json"))
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = SMOLLM2_PRE
    spec["added_tokens"] = [{"id": i, "content": gguf_tok.token_text(i), "special": True} for i in range(17)]
    (d / "tokenizer.json").write_text(json.dumps(spec))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}))
    return d


def test_hf_dir_tokenizer_matches_llama_cpp(hf_tokenizer_dir):
    golden = json.load(open(__file__.rsplit("/", 2)[0] + "/data/smollm2_tokenizer_golden.json"))["ids"]
    meta = metadata_from_hf_dir(hf_tokenizer_dir)
    assert meta["tokenizer.ggml.pre"] == "smollm"
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.bos_id == 1 and tok.eos_id == 2 and not tok.add_bos
    mismatches = [t for t, ids in golden.items() if tok.encode(t, add_bos=False) != ids]
    assert not mismatches, mismatches[:3]


def test_sentencepiece_hf_tokenizer_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(ModelFormatError, match="GGUF"):
        metadata_from_hf_dir(tmp_path)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        metadata_from_hf_dir(tmp_path)
