"""Chat template renders are bounded (formats/template_sandbox.py): the hostile set of hostile_templates.py, each
render within 2 s, refused with one line or rendered harmlessly, nothing from outside the sandbox, bounded memory;
and templates that stay in bounds render exactly as before, long conversations included."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from powerinfer.errors import PowerInferError
from powerinfer.formats.chat import CHATML_TEMPLATE, render_chat

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from hostile_templates import FORBIDDEN, TEMPLATES  # noqa: E402


@pytest.fixture(scope="module")
def hostile_run():
    # a fresh interpreter, so its peak RSS (VmHWM) is the renders' alone (~295 MiB measured, most of it the 128 MiB
    # growth allowance hit by the memory cases)
    out = subprocess.run([sys.executable, str(HERE / "hostile_templates.py"), "--json"], capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout)


def test_hostile_set_is_large(hostile_run):
    assert len(hostile_run["rows"]) == len(TEMPLATES) >= 61


@pytest.mark.parametrize("i", range(len(TEMPLATES)), ids=[t[0] for t in TEMPLATES])
def test_hostile_template(hostile_run, i):
    row = hostile_run["rows"][i]
    assert row["seconds"] <= 2.0, row
    if row["expect"] != "either":
        assert row["outcome"] == row["expect"], row
    if row["outcome"] == "refused":
        assert "\n" not in row["text"] and row["text"].startswith(("the model's chat template", "the chat template"))
    else:
        assert not any(f in row["text"] for f in FORBIDDEN), row


def test_hostile_set_memory_is_bounded(hostile_run):
    peaks = [(r["name"], r["peak_rss"] >> 20) for r in hostile_run["rows"]]
    assert hostile_run["peak_rss"] < 512 * 2**20, peaks


def test_long_conversation_renders_in_bounds():
    # 2000 messages of 2.2 KB: 4.4 MB of prompt, past the fixed 4 MiB allowance, inside "twice the input"
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} " + "word " * 440}
                for i in range(2000)]
    out = render_chat(CHATML_TEMPLATE, messages)
    assert len(out) > 4 * 2**20 and out.count("<|im_start|>") == 2001


def test_template_output_past_bound_is_one_line():
    with pytest.raises(PowerInferError, match=r"^the model's chat template was stopped: the chat template's output "
                                              r"passed [\d,]+ characters$"):
        render_chat("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", [{"role": "user", "content": "hi"}])


def test_non_text_template_is_refused():
    with pytest.raises(PowerInferError, match="chat template is a list, not text"):
        render_chat(["{{ 1 }}"], [{"role": "user", "content": "hi"}])
