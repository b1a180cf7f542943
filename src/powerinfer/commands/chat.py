"""`powerinfer run`'s generation loops, as llama-cli's: one prompt, interactive text (-i, -if) and chat (-cnv).

What a llama-cli user relies on (llama.cpp examples/main/main.cpp and its README):
  * Ctrl-C while the model writes stops the reply and returns to the prompt with everything so far kept; Ctrl-C
    (or Ctrl-D) at the prompt ends the session;
  * the input line is edited with readline (arrows, history) when stdin is a terminal; a pasted block is one
    input (readline's bracketed paste); a line that ends with '\\' goes on on the next line, one that ends with
    '/' hands control back without a newline; with -mli every line goes on until one that ends with '/';
  * a full context is shifted (runtime/context_shift.py, --keep) instead of ending the session;
  * -i: what the model reads is exactly what the screen shows: the prompt, the replies, --in-prefix, your line
    with its newline, --in-suffix; a reverse prompt (-r) hands control back once it is on the screen; an empty
    line lets the model go on;
  * -cnv: the chat template renders each turn; only the new turn's tokens are evaluated (the earlier ones stay in
    the KV cache); /bye, /clear, /regen and /help are commands, not messages; empty input is ignored.
"""
from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from ..api import LLM
from ..errors import PowerInferError
from ..formats.chat import CHATML_TEMPLATE, render_chat
from ..formats.tokenizer import StreamDecoder
from ..runtime.context_shift import stream_shifting

COMMANDS_HELP = """commands:
  /bye, /exit    end the chat (Ctrl-D and Ctrl-C at the prompt do too)
  /clear         forget the conversation (the system message stays)
  /regen         answer the last message again
  /help, /?      this list
  A line that ends with '\\' goes on on the next line; Ctrl-C while the model writes stops the reply."""

_GREEN, _YELLOW, _RESET = "\x1b[1;32m", "\x1b[33m", "\x1b[0m"


class Interrupts:
    """Ctrl-C while generating sets `hit` (the loop stops the reply at the next token); a second one before the
    reply has stopped raises KeyboardInterrupt, so a long prompt chunk cannot trap the user."""

    def __init__(self):
        self.hit = False
        self._prev = None

    def __enter__(self):
        self.hit = False
        try:
            self._prev = signal.signal(signal.SIGINT, self._on)
        except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
            self._prev = None
        return self

    def _on(self, *_):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
        return False


class LineReader:
    """Input lines: readline's editor and history on a terminal, plain lines from a pipe. `read()` returns the
    text of one input (continuation lines joined with newlines) and whether it ended with '/', or None at the end
    (Ctrl-D, Ctrl-C, end of the pipe)."""

    def __init__(self, multiline: bool = False, color: bool = False):
        self.tty = sys.stdin.isatty()
        self.multiline = multiline
        self.color = color
        if self.tty:
            try:
                import readline  # importing it is what gives input() the line editor
            except ImportError:  # Python built without it: plain input
                pass
            else:
                # CPython turns readline's bracketed paste off (bpo-42819, for its REPL); on, a pasted block with
                # newlines is inserted as text and sent with one Enter, instead of one message per line
                readline.parse_and_bind("set enable-bracketed-paste on")

    def _line(self, prompt: str) -> str | None:
        try:
            if self.color and self.tty:
                # \001..\002 tell readline the colour codes take no columns
                return input(f"{prompt}\001{_GREEN}\002")
            return input(prompt)
        except (EOFError, KeyboardInterrupt):
            print()
            return None
        finally:
            if self.color and self.tty:
                sys.stdout.write(_RESET)
                sys.stdout.flush()

    def read(self, prompt: str = "") -> tuple[str, bool] | None:
        parts = []
        while True:
            line = self._line(prompt if not parts else "")
            if line is None:
                return None if not parts else ("\n".join(parts), False)
            if line.endswith("/"):
                parts.append(line[:-1])
                return "\n".join(parts), True
            if line.endswith("\\") and not self.multiline:
                parts.append(line[:-1])
                continue
            parts.append(line)
            if not self.multiline:
                return "\n".join(parts), False


class Session:
    """One run's generation state: the LLM, the tokens in its context, and how replies are shown."""

    def __init__(self, llm: LLM, opts, chat, report: Callable[[object], None], shift: bool, out=None):
        self.llm, self.opts, self.chat, self.report = llm, opts, chat, report
        self.shift = shift and not chat.no_context_shift
        self.out = out or sys.stdout
        self.color = chat.color == "on" or (chat.color == "auto" and self.out.isatty())
        self.ids: list[int] = []  # the tokens the model has read so far (after any shift)
        self.keep = 0  # tokens kept at the start of a shifted context
        self.reverse = [r for r in (chat.reverse_prompt or []) if r]

    def write(self, text: str, color: str | None = None) -> None:
        if color and self.color:
            text = f"{color}{text}{_RESET}"
        self.out.write(text)
        self.out.flush()

    def set_keep(self, first_prompt_tokens: int) -> None:
        """--keep N as llama-cli counts it: -1 = the whole first prompt, else N plus a BOS token if there is one."""
        n = self.chat.keep
        bos = self.llm.tokenizer.bos_id
        has_bos = bool(self.ids) and bos is not None and self.ids[0] == bos
        self.keep = first_prompt_tokens if n < 0 else min(n + int(has_bos), first_prompt_tokens)

    def generate(self, n_predict: int | None = None, stop_on_reverse: bool = True, **params) -> tuple[str, object]:
        """Stream a reply to the tokens in `self.ids` onto the screen; (its text, the last Response). Ctrl-C stops
        it (finish_reason "cancelled"); a reverse prompt stops it once shown ("reverse prompt")."""
        llm = self.llm
        n_ctx = llm.runner.n_ctx
        n = llm.defaults.n_predict if n_predict is None else n_predict
        decoder = StreamDecoder(llm.tokenizer, special=True) if self.chat.special else None

        def start(ids, want):
            return llm.stream(ids, n_predict=want, **params)

        if self.shift:
            responses = stream_shifting(start, self.ids, n_ctx, self.keep, n, on_shift=self._shifted,
                                        runner=llm.runner)
        else:
            responses = self._plain(start, n)
        pieces, last, tail = [], None, ""
        window = max((len(s) for s in self.reverse), default=0) + 16
        with Interrupts() as intr:
            try:
                for r in responses:
                    last = r
                    text = r.text if decoder is None else (decoder.push(r.token) if r.token is not None else "")
                    if text:
                        pieces.append(text)
                        self.write(text)
                    if intr.hit:
                        last.finish_reason = "cancelled"
                        break
                    if stop_on_reverse and self.reverse and text:
                        tail = (tail + text)[-window:]
                        if any(s in tail for s in self.reverse):
                            last.finish_reason = "reverse prompt"
                            break
            finally:
                responses.close()
        return "".join(pieces), last

    def _plain(self, start, n):
        """A generation that ends at a full context (finish_reason "context"), tracking its tokens like
        stream_shifting does."""
        responses = start(list(self.ids), n)
        try:
            for r in responses:
                if r.token is not None:
                    self.ids.append(r.token)
                yield r
        finally:
            responses.close()

    def _shifted(self, dropped: int) -> None:
        if self.llm.settings.verbose:
            print(f"\n[context full: dropped {dropped} tokens after the first {self.keep}]", file=sys.stderr)

    def tokenize(self, text: str, add_bos: bool | None = False, parse_special: bool = False) -> list[int]:
        return self.llm.tokenizer.encode(text, add_bos=add_bos, parse_special=parse_special)


# -- one prompt, and -i ------------------------------------------------------------------------------------------

def run_text(session: Session, prompt: str | None, interactive: bool, first_input: bool) -> int:
    """llama-cli without -cnv: print the prompt and continue it; with -i, hand control back at a reverse prompt,
    end-of-generation or the token limit, and append your input (with --in-prefix/--in-suffix) to the text."""
    chat, llm = session.chat, session.llm
    reader = LineReader(chat.multiline_input, session.color) if interactive else None
    if prompt is not None:
        session.ids = session.tokenize(prompt, add_bos=None, parse_special=True)
        if not session.ids:
            raise PowerInferError("the prompt is empty (and the model adds no BOS token); give some text")
        session.set_keep(len(session.ids))
        if not chat.no_display_prompt:
            session.write(prompt, _YELLOW)
    screen_line = prompt.rsplit("\n", 1)[-1] if prompt else ""
    pending = prompt is not None and not first_input
    while True:
        if pending:
            try:
                reply, last = session.generate()
            except PowerInferError:
                session.write("\n")  # end the echoed text's line, so the error starts a line of its own
                raise
            session.report(last)
            screen_line = (screen_line + reply).rsplit("\n", 1)[-1]
            if not interactive:
                break
            if last.finish_reason == "stop" and session.reverse:
                # end of generation in -i: llama-cli writes the first reverse prompt and waits for input
                inject = session.reverse[0]
                session.write(inject)
                session.ids += session.tokenize(inject)
                screen_line = (screen_line + inject).rsplit("\n", 1)[-1]
        if not interactive:
            break
        if reader.tty:  # readline redraws its prompt from column 0: give it the line as the screen has it
            session.write("\r")
            got = reader.read(screen_line + chat.in_prefix)
        else:
            session.write(chat.in_prefix)
            got = reader.read("")
        if got is None:
            return 0
        line, no_newline = got
        if not line and not no_newline:
            pending = bool(session.ids)  # an empty line lets the model go on
            continue
        text = chat.in_prefix + line + ("" if no_newline else "\n") + chat.in_suffix
        if chat.in_suffix:
            session.write(chat.in_suffix)
        bos = [llm.tokenizer.bos_id] if chat.in_prefix_bos and llm.tokenizer.bos_id is not None else []
        if not session.ids:
            session.ids = bos + session.tokenize(text, add_bos=None if not bos else False)
            session.set_keep(len(session.ids))
        else:
            session.ids += bos + session.tokenize(text)
        screen_line = text.rsplit("\n", 1)[-1]
        pending = True
    session.write("\n")
    return 0


# -- -cnv --------------------------------------------------------------------------------------------------------

def run_conversation(session: Session, first_message: str | None, system: str | None, template: str | None,
                     single_turn: bool) -> int:
    llm, chat = session.llm, session.chat
    tok = llm.tokenizer
    if template is not None and template.strip().lower() == "chatml":
        template = CHATML_TEMPLATE
    template = template if template is not None else llm.loaded.metadata.get("tokenizer.chat_template")

    def piece(i):
        return "" if i is None else tok.token_bytes(i).decode("utf-8", "replace")

    def render(messages):
        return render_chat(template, messages, add_generation_prompt=True, bos_token=piece(tok.bos_id),
                           eos_token=piece(tok.eos_id))

    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    fed: str | None = ""  # the rendered text that session.ids stands for; None when they no longer match
    interactive = not single_turn and (sys.stdin.isatty() or first_message is None)
    reader = LineReader(chat.multiline_input, session.color)
    pending = first_message
    first = True
    while True:
        if pending is None:
            got = reader.read("> ")
            if got is None:
                return 0
            line = got[0]
            word = line.strip().split(maxsplit=1)[0].lower() if line.strip() else ""
            if word in ("/bye", "/exit", "/quit"):
                return 0
            if word in ("/help", "/?"):
                print(COMMANDS_HELP)
                continue
            if word == "/clear":
                messages, session.ids, fed = list(base), [], ""
                print("(the conversation is cleared)")
                continue
            if word == "/regen":
                if len(messages) < 2 or messages[-1]["role"] != "assistant":
                    print("(nothing to answer again)")
                    continue
                messages.pop()
                pending, fed = messages.pop()["content"], None
            elif word.startswith("/") and len(word) > 1 and "/" not in word[1:]:
                print(f"(unknown command {word}; /help lists the commands)")
                continue
            elif not line.strip():
                continue  # empty input is not a message
            else:
                pending = line
        messages.append({"role": "user", "content": pending})
        pending = None
        prompt = render(messages)
        if fed is not None and session.ids and prompt.startswith(fed):
            session.ids += session.tokenize(prompt[len(fed):], parse_special=True)
        else:  # first turn, /regen, or a template that rewrites earlier turns: the whole prompt again
            session.ids = llm.chat_text_ids(prompt)
        if first:  # --keep -1: the whole first prompt (system message and first turn) survives shifts
            session.set_keep(len(session.ids))
            first = False
        reply, last = session.generate(stop=session.reverse, stop_on_reverse=False)
        session.write("\n")
        session.report(last)
        messages.append({"role": "assistant", "content": reply})
        # the tokens now hold the prompt and the reply; a stop string's text is in the tokens but not the reply
        fed = prompt + reply if last.finish_reason != "stop" or not session.reverse else None
        if not interactive:
            return 0
