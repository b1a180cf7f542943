"""Structured output (runtime/constrain.py, llguidance): on the bundled model every output under a JSON Schema
validates, a GBNF grammar is obeyed to the letter, and bad grammars are one-line errors before anything runs."""
from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from powerinfer.cli import main
from powerinfer.errors import PowerInferError
from powerinfer.runtime.constrain import Constraint

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
PEOPLE = ["a baker from Lyon", "a retired sailor", "a young programmer", "a violin teacher", "a farmer in Kenya",
          "a nurse in Osaka", "a chess champion", "a carpenter", "a marathon runner", "a librarian",
          "a street musician", "a pilot", "a beekeeper", "a student of physics", "a painter in Madrid",
          "a fisherman", "a chef in Rome", "a mountain guide", "a journalist", "a gardener"]


@pytest.fixture(scope="module")
def llm(bundled_model):
    from powerinfer.api import LLM
    from powerinfer.settings import ModelSettings, SamplingParams

    return LLM(bundled_model, ModelSettings(n_ctx=1024), SamplingParams())


def test_twenty_json_schema_outputs_validate(llm):
    """Sampled (temperature 0.7), not greedy: the grammar, not the model's habits, makes them valid."""
    outputs = []
    for i, who in enumerate(PEOPLE):
        messages = [{"role": "user", "content": f"Invent a person who is {who}. Reply with JSON only."}]
        c = llm.chat(messages, details=True, temp=0.7, seed=i, n_predict=96, json_schema=SCHEMA)
        assert c.finish_reason == "stop", c.text  # the grammar ended it, not the token limit
        outputs.append(json.loads(c.text))
    for obj in outputs:
        jsonschema.validate(obj, SCHEMA)
    assert len({o["name"] for o in outputs}) > 5  # answers, not one canned object


def test_gbnf_grammar_is_obeyed(llm):
    grammar = 'root ::= ("yes" | "no") "." '
    for seed in range(4):
        c = llm.generate("Is the sky blue? Answer:", grammar=grammar, temp=1.0, seed=seed, details=True)
        assert c.text in ("yes.", "no.") and c.finish_reason == "stop"


def test_mask_allows_exactly_the_grammar(llm):
    c = Constraint(llm.tokenizer, llm.config.n_vocab, grammar='root ::= "yes" | "no"')
    allowed = np.flatnonzero(c.allowed()).tolist()
    texts = {llm.tokenizer.token_text(i) for i in allowed}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts), texts
    masked = c.mask(np.zeros(llm.config.n_vocab, dtype=np.float32))
    assert np.flatnonzero(np.isfinite(masked)).tolist() == allowed
    assert c.allows(allowed[0]) and not c.allows(llm.tokenizer.encode(" maybe", add_bos=False)[0])


@pytest.mark.parametrize("argv, needle", [
    (["--grammar", "root ::= foo"], "--grammar"),
    (["--json-schema", "{not json"], "--json-schema: not JSON"),
    (["--json-schema", "[1, 2]"], "--json-schema: expected a JSON object"),
    (["--grammar", "root ::= \"a\"", "-j", "{}"], "not both"),
])
def test_bad_grammar_is_one_line(capsys, argv, needle):
    code = main(["run", "-p", "hi", "-n", "2", *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_grammar_from_the_cli(capsys, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"answer": {"type": "integer"}},
                                  "required": ["answer"], "additionalProperties": False}))
    code = main(["run", "-cnv", "-st", "-p", "What is 2+2? Reply in JSON.", "-jf", str(schema), "--temp", "0",
                 "--no-stats"])
    out = capsys.readouterr().out
    assert code == 0
    assert isinstance(json.loads(out)["answer"], int)


def test_constraint_errors_are_powerinfer_errors(llm):
    with pytest.raises(PowerInferError, match="--json-schema"):
        Constraint(llm.tokenizer, llm.config.n_vocab, json_schema={"type": "no-such-type"})
