"""Hostile chat templates: what a stranger's model file can put in `tokenizer.chat_template`.

Each entry is (name, template, expect): expect "refused" (a one-line PowerInferError), "ok" (renders; it is
hostile-looking but harmless or bounded), or "either". The first six are the ones that hung the interpreter, took
7.5 GB or ended in a traceback before the render was bounded (formats/template_sandbox.py); the escape attempts
must never render anything from outside the sandbox (checked against FORBIDDEN). Run directly, this prints one line
per template with its time and outcome and the process's peak RSS: `python tests/formats/hostile_templates.py`.
"""
from __future__ import annotations

BIG = "10**9"
DOUBLE = "{% set ns = namespace(s='ab', l=[1, 2]) %}"

TEMPLATES: list[tuple[str, str, str]] = [
    # -- reported: hangs, aborts, tracebacks -----------------------------------------------------------------
    ("center 10^9", "{{ 'a'|center(10**9) }}", "refused"),
    ("printf width filter", "{{ '%1000000000d'|format(1) }}", "refused"),
    ("lipsum 10^6", "{{ lipsum(10**6) }}", "refused"),
    ("nested range loops", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "refused"),
    ("str.format width", "{{ '{0:>1000000000}'.format(1) }}", "refused"),
    ("string repeat 10^8", "{{ 'a' * 10**8 }}", "refused"),
    # -- size amplification -----------------------------------------------------------------------------------
    ("ljust", "{{ 'a'.ljust(10**9) }}", "refused"),
    ("rjust", "{{ 'a'.rjust(10**9) }}", "refused"),
    ("center method", "{{ 'a'.center(10**9) }}", "refused"),
    ("zfill", "{{ '1'.zfill(10**9) }}", "refused"),
    ("expandtabs", "{{ ('\\t' * 1000).expandtabs(10**7) }}", "refused"),
    ("int times string", "{{ 10**8 * 'ab' }}", "refused"),
    ("list repeat", "{{ ([1] * 10**8)|length }}", "refused"),
    ("printf width operator", "{{ '%1000000000d' % 1 }}", "refused"),
    ("printf precision", "{{ '%.1000000000f' % 1.5 }}", "refused"),
    ("printf star width", "{{ '%*d' % (10**9, 1) }}", "refused"),
    ("format filter precision", "{{ '%.999999999f'|format(2.5) }}", "refused"),
    ("str.format precision", "{{ '{:.1000000000f}'.format(1.0) }}", "refused"),
    ("str.format nested width", "{{ '{0:{1}}'.format(1, 10**9) }}", "refused"),
    ("format_map width", "{{ '{x:>999999999}'.format_map({'x': 1}) }}", "refused"),
    ("indent width", "{{ ('a\\n' * 1000)|indent(10**7) }}", "refused"),
    ("indent string", "{{ ('a\\n' * 100000)|indent('x' * 1000) }}", "refused"),
    ("wordwrap wrapstring", "{{ ('ab ' * 2000)|wordwrap(1, wrapstring='x' * 100000) }}", "refused"),
    ("replace empty", "{{ ('a' * 1000)|replace('', 'x' * 100000) }}", "refused"),
    ("replace method", "{{ ('a' * 1000).replace('a', 'b' * 100000) }}", "refused"),
    ("replace doubling", DOUBLE + "{% for i in range(40) %}{% set ns.s = ns.s|replace('a', 'aa') %}{% endfor %}"
     "{{ ns.s|length }}", "refused"),
    ("concat doubling", DOUBLE + "{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
     "refused"),
    ("plus doubling", DOUBLE + "{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
     "refused"),
    ("list doubling", DOUBLE + "{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
     "refused"),
    ("join doubling", DOUBLE + "{% for i in range(60) %}{% set ns.s = [ns.s, ns.s]|join %}{% endfor %}"
     "{{ ns.s|length }}", "refused"),
    ("join separator", "{{ range(100000)|join('x' * 100000) }}", "refused"),
    ("join method", "{{ ('x' * 100000).join(range(100000)|map('string')|list) }}", "refused"),
    ("batch fill", "{{ [1]|batch(10**9, 'x')|list|length }}", "refused"),
    ("slice count", "{{ [1]|slice(10**9)|list|length }}", "refused"),
    ("tojson indent", "{{ messages|tojson(indent=10**9) }}", "refused"),
    ("lipsum words", "{{ lipsum(1, max=10**9) }}", "refused"),
    ("power tower", "{{ 2 ** (2 ** 30) }}", "refused"),
    ("big int squaring", "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
     "{% endfor %}{{ ns.n > 0 }}", "refused"),
    ("range 10^9", "{{ range(10**9)|length }}", "refused"),
    ("output flood", "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "refused"),
    # -- time ------------------------------------------------------------------------------------------------
    ("triple loop", "{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}"
     "{% endfor %}{% endfor %}{% endfor %}", "refused"),
    ("loop over long string", "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
     "refused"),
    ("exponential macro", "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}"
     "{{ f(0) }}", "refused"),
    ("exponential macro concat", "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) ~ f(n + 1) }}{% endif %}{% endmacro %}"
     "{{ f(0) }}", "refused"),
    ("infinite recursion", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "refused"),
    ("heavy loop body", "{% for i in range(100000) %}{% set x = range(100000)|list|sort %}{% endfor %}", "refused"),
    ("map in loop", "{% for i in range(100000) %}{% set x = range(100000)|map('string')|join %}{% endfor %}",
     "refused"),
    ("cycler loop", "{% set c = cycler(1, 2) %}{% for a in range(100000) %}{% for b in range(100000) %}"
     "{% set x = c.next() %}{% endfor %}{% endfor %}", "refused"),
    ("striptags backtracking", "{{ ('<' * 100000)|striptags }}", "refused"),
    ("urlize long", "{{ ('a.' * 100000)|urlize }}", "refused"),
    ("wordwrap long word", "{{ ('x' * 100000)|wordwrap(1) }}", "refused"),
    ("recursive loop", "{% for m in messages * 100000 recursive %}{% for n in messages * 100000 %}{% endfor %}"
     "{% endfor %}", "refused"),
    ("deep nesting", "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "refused"),
    ("huge template", "{{ 'x' }}" * 300000, "refused"),
    # -- memory ----------------------------------------------------------------------------------------------
    ("many big strings", "{{ range(100000)|map('center', 1000000)|list|length }}", "refused"),
    ("accumulating list", "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}"
     "{% set ns.l = ns.l + [('x' * 1000000)|lower] %}{% endfor %}{{ ns.l|length }}", "refused"),
    ("dict of big strings", "{% set ns = namespace(d={}) %}{% for i in range(100000) %}"
     "{% set ns.d = dict(ns.d, **{i|string: 'y' * 1000000 ~ i}) %}{% endfor %}", "refused"),
    ("print shared references", "{% set d = {'k': 'x' * 3000000} %}{{ [d] * 200000 }}", "refused"),
    ("string filter shared", "{% set d = ['y' * 3000000] %}{{ ([d] * 200000)|string|length }}", "refused"),
    ("tojson shared", "{% set d = ['y' * 3000000] %}{{ ([d] * 200000)|tojson|length }}", "refused"),
    ("concat shared", "{% set d = ['y' * 3000000] %}{{ (([d] * 200000) ~ 'x')|length }}", "refused"),
    ("printf shared", "{% set d = ['y' * 3000000] %}{{ ('%s' % ([d] * 200000,))|length }}", "refused"),
    ("split flood", "{{ ('ab ' * 1300000).split()|length }}", "refused"),
    ("sort flood", "{{ ('ab' * 2000000)|list|sort|length }}", "refused"),
    # -- escapes: must never reach anything outside the sandbox --------------------------------------------
    ("class mro", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "refused"),
    ("attr filter", "{{ ''|attr('__class__') }}", "either"),
    ("cycler globals", "{{ cycler.__init__.__globals__.os.popen('id').read() }}", "refused"),
    ("joiner globals", "{{ joiner.__init__.__globals__ }}", "refused"),
    ("namespace globals", "{{ namespace.__init__.__globals__.sys.modules.os.popen('id').read() }}", "refused"),
    ("lipsum globals", "{{ lipsum.__globals__['os'].popen('id').read() }}", "refused"),
    ("raise_exception globals", "{{ raise_exception.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
     "refused"),
    ("strftime globals", "{{ strftime_now.__globals__.datetime }}", "refused"),
    ("self context", "{{ self._TemplateReference__context }}", "either"),
    ("self init", "{{ self.__init__.__globals__ }}", "refused"),
    ("format attribute", "{{ '{0.__class__.__base__}'.format('') }}", "refused"),
    ("format_map attribute", "{{ '{x.__class__}'.format_map({'x': ''}) }}", "either"),
    ("printf repr", "{{ '%r'|format(messages) }}", "ok"),
    ("list append", "{% set x = messages.append({'role': 'x'}) %}{{ messages|length }}", "refused"),
    ("dict update", "{% set x = messages[0].update({'role': 'x'}) %}{{ messages[0].role }}", "refused"),
    ("include file", "{% include '/etc/passwd' %}", "refused"),
    ("import module", "{% import 'os' as os %}{{ os }}", "refused"),
    ("extends file", "{% extends '/etc/passwd' %}", "refused"),
    ("config object", "{{ config.items() }}", "either"),
    ("request object", "{{ request.application.__globals__ }}", "either"),
    ("int class", "{{ (1).__class__.__base__.__subclasses__() }}", "refused"),
    ("range internals", "{{ range.__self__ }}", "either"),
    ("loop internals", "{% for x in messages %}{{ loop._iterator }}{% endfor %}", "either"),
]

# text that appears only if something outside the sandbox was reached
FORBIDDEN = ("root:", "uid=", "<class", "<module", "<function", "__builtins__", "os.popen", "Environment object")


def render(template: str) -> tuple[str, str, float]:
    """(outcome "ok"/"refused", text or the error line, seconds) for one template."""
    import time

    from powerinfer.errors import PowerInferError
    from powerinfer.formats.chat import render_chat

    t0 = time.perf_counter()
    try:
        out = render_chat(template, [{"role": "user", "content": "hi"}])
        return "ok", out, time.perf_counter() - t0
    except PowerInferError as e:
        return "refused", str(e), time.perf_counter() - t0


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, which starts afresh at exec (ru_maxrss carries the size of the process
    that forked us: 979 MiB under a long pytest run, before a single template)."""
    import resource

    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> int:
    import json
    import sys

    rows = []
    for name, template, expect in TEMPLATES:
        outcome, text, seconds = render(template)
        rows.append({"name": name, "expect": expect, "outcome": outcome, "seconds": round(seconds, 4),
                     "text": text[:300], "text_len": len(text),
                     "peak_rss": peak_rss()})
        if "--json" not in sys.argv:
            print(f"{seconds:7.3f} s  {outcome:8s} {name:28s} {' '.join(text.split())[:110]}")
    peak = peak_rss()
    if "--json" in sys.argv:
        print(json.dumps({"rows": rows, "peak_rss": peak}))
    else:
        print(f"{len(rows)} templates, slowest {max(r['seconds'] for r in rows):.3f} s, "
              f"peak RSS {peak / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
