"""Structured output on the bundled model: 20 chat prompts answered under a JSON Schema (each output validated with
`jsonschema`), and decode speed with the grammar mask against the same generations without it, in one run.

    python benchmarks/grammar_bench.py            # the bundled model, 20 prompts, 2 rounds
    python benchmarks/grammar_bench.py -m model.gguf -t 2 --rounds 3

For each prompt: the constrained generation (temperature 0.7, seed = prompt index, at most 96 tokens), then the
unconstrained generation of the same prompt with the same number of tokens (ignore_eos), alternating, so both see
the same load. Decode tok/s is (tokens - 1) / time from the first to the last token (the first comes out of the
prefill), summed over the prompts; the ratio is constrained / unconstrained. The grammar engine is llguidance
(runtime/constrain.py).
"""
from __future__ import annotations

import argparse
import json
import sys

import jsonschema

import powerinfer

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


def prompts() -> list[list[dict]]:
    return [[{"role": "user", "content": f"Invent a person who is {who}. Reply with JSON only: name, age, city "
                                         f"and up to three hobbies."}] for who in PEOPLE]


def run(llm, rounds: int) -> dict:
    valid, outputs = 0, []
    t_on = t_off = 0.0
    n_on = n_off = 0
    for rnd in range(rounds):
        for i, messages in enumerate(prompts()):
            c = llm.chat(messages, details=True, temp=0.7, seed=i, n_predict=96, json_schema=SCHEMA)
            if rnd == 0:
                try:
                    jsonschema.validate(json.loads(c.text), SCHEMA)
                    valid += 1
                except (ValueError, jsonschema.ValidationError) as e:
                    print(f"prompt {i}: invalid: {e}\n{c.text}", file=sys.stderr)
                outputs.append(c.text)
            free = llm.chat(messages, details=True, temp=0.7, seed=i, n_predict=c.completion_tokens,
                            ignore_eos=True)
            if c.completion_tokens > 1 and free.completion_tokens == c.completion_tokens:
                t_on += c.generation_seconds
                n_on += c.completion_tokens - 1
                t_off += free.generation_seconds
                n_off += free.completion_tokens - 1
    on, off = n_on / t_on, n_off / t_off
    return {"prompts": len(PEOPLE), "valid": valid, "decode_tok_s_grammar": round(on, 2),
            "decode_tok_s_free": round(off, 2), "ratio": round(on / off, 3), "tokens_compared": n_on,
            "rounds": rounds, "examples": outputs[:3]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    llm = powerinfer.load(a.model, n_threads=a.threads, n_ctx=1024)
    print(json.dumps(run(llm, a.rounds), indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
