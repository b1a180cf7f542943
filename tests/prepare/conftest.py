"""A tiny llama that can read text: the tiny SwiGLU fixture with SmolLM2's vocabulary size, rewritten with the
bundled model's tokenizer keys, so `powerinfer calibrate` runs end to end in a second."""
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter


def _copy_fields(reader, writer, keep):
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or not keep(name):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), vtype, sub)


@pytest.fixture(scope="session")
def tiny_text_gguf(tiny_llama_gguf, bundled_model_path, tmp_path_factory):
    tiny = tiny_llama_gguf("F32", n_vocab=49152, n_layer=3, tie_embeddings=True)
    path = tmp_path_factory.mktemp("tiny_text") / "tiny-llama-smollm2-tokenizer.gguf"
    src, tok = GGUFReader(str(tiny.path)), GGUFReader(str(bundled_model_path))
    writer = GGUFWriter(str(path), "llama")
    _copy_fields(src, writer, lambda n: True)
    _copy_fields(tok, writer, lambda n: n.startswith("tokenizer."))
    for t in src.tensors:
        writer.add_tensor(t.name, t.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
