"""A jinja2 ImmutableSandboxedEnvironment whose renders are bounded in time, output and memory.

Chat templates come inside model files, i.e. from strangers. jinja2's sandbox stops attribute and file escapes but
not resource use (its docs say so): `{{ 'a'|center(10**9) }}`, `'%1000000000d'|format(1)`, `lipsum(10**6)` and
two nested `range(100000)` loops ran for minutes, `'{0:>1000000000}'.format(1)` took 7.5 GB and killed the
interpreter. Here:

* time: a deadline checked at every call, attribute and item lookup, intercepted operator, filter and loop
  iteration (every `{% for %}` iterable is wrapped at parse time), so no loop or recursion runs past it;
* size: operations that multiply their input (`*`, `**`, `%` and `+` on strings and lists, `~`, format widths
  and precisions in `%`/`format`/`str.format`, center/ljust/rjust/zfill/indent/wordwrap/replace/join, batch,
  slice, tojson indent, lipsum) are refused *before* they build a value past MAX_CHARS characters / MAX_ITEMS
  items; every filter and call result is checked after; filters whose regular expressions or wrapping are
  superlinear (striptags, urlize, wordwrap) take at most SUPERLINEAR_CHARS characters;
* memory: the process's resident set may grow by at most MAX_RSS_GROWTH during a render (checked every
  RSS_CHECK_S at the same points), which bounds what many in-bound operations add up to;
* output: the rendered text is refused past MAX_CHARS.

A refusal raises TemplateLimit (one line). Nothing is changed for templates that stay in bounds: the sandbox is
jinja2's ImmutableSandboxedEnvironment, with transformers' extensions and globals (formats/chat.py).
"""
from __future__ import annotations

import gc
import math
import os
import re
import threading
import time
from functools import update_wrapper

from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace, generate_lorem_ipsum
from markupsafe import Markup

RENDER_SECONDS = 1.0  # legit chat templates render in well under 10 ms, even over long conversations
# A string or the output may hold this much plus twice the text passed in (messages, tools): the template's own text
# is small, so a prompt is about the size of its messages. 4 MiB is about 1M tokens.
BASE_CHARS = 4 * 2**20
MAX_CHARS = BASE_CHARS  # the bound outside a render (compile-time folding)
MAX_ITEMS = 2**18  # lists a template builds: range() stops at 100000; sorting 2^18 strings takes ~0.2 s
MAX_INT_BITS = 1 << 16  # integers a template computes (a 20000-digit number is no prompt)
MAX_RSS_GROWTH = 128 * 2**20
RSS_CHECK_S = 0.002
SUPERLINEAR_CHARS = 8192  # striptags/urlize regexes backtrack quadratically on '<' * n; textwrap slices long words
MAX_TEMPLATE_CHARS = 2**20  # real templates are 1-40 KB; compiling is not bounded by the render deadline
MAX_JSON_INDENT = 16

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# printf conversions: %(key)flags width .precision length type
_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?.", re.S)
# a str.format spec: [[fill]align][sign][z][#][0][width][grouping][.precision][type]
_SPEC = re.compile(r"^(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?[a-zA-Z%]?$", re.S)


class TemplateLimit(Exception):
    """A render exceeded a bound (time, size, memory); the message is one line."""


def _rss() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _size(value) -> int:
    """Characters of a string, items of a list/tuple/dict/set; 0 for anything else."""
    if isinstance(value, (str, list, tuple, dict, set, frozenset, bytes)):
        return len(value)
    return 0


def _spec_width(digits: str | None, what: str) -> None:
    if digits and (digits == "*" or len(digits) > 7 or int(digits) > MAX_CHARS):
        raise TemplateLimit(f"{what} asks for a field of {digits} characters (at most {MAX_CHARS:,})")


class _Render(threading.local):
    deadline: float | None = None
    rss0: int | None = None
    next_rss: float = 0.0
    max_chars: int = MAX_CHARS


def text_size(value, limit: int) -> int:
    """About how many characters str(value) has, walking containers (shared references count each time they are
    printed, as str() does) and stopping as soon as the count passes `limit`: str() of a list of a million
    references to one large dict is a single C call that no deadline can interrupt, so it is sized first."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, Namespace):
            stack.append(v._Namespace__attrs)
        elif isinstance(v, int):
            total += v.bit_length() * 3 // 10 + 2
        else:
            total += 32
        if total > limit:
            break
    return total


class _BoundedFormatter(SandboxedFormatter):
    """str.format / format_map with the sandbox's attribute checks and bounded field widths and precisions."""

    def format_field(self, value, format_spec: str):
        self._env.tick()
        m = _SPEC.match(format_spec)
        if m is None:
            raise TemplateLimit(f"str.format spec {format_spec[:40]!r} is not one this sandbox reads")
        _spec_width(m.group(1), "str.format")
        _spec_width(m.group(2), "str.format")
        self._env.check_text(value, "str.format")
        return super().format_field(value, format_spec)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with the bounds of the module doc. Render with `render(template, **vars)`."""

    intercepted_binops = frozenset(["*", "**", "%", "+"])

    def __init__(self, *args, **kwargs):
        super().__init__(*args, finalize=self._finalize, **kwargs)
        self._render = _Render()
        self.globals["lipsum"] = self._lipsum
        for name, f in list(self.filters.items()):
            self.filters[name] = self.bounded_filter(name, f)
        self.filters["pi_loop_iter"] = _LoopIter(self)
        self.filters["pi_concat"] = self._concat

    # -- time and memory -----------------------------------------------------------------------------------
    def tick(self) -> None:
        r = self._render
        if r.deadline is None:
            return
        now = time.monotonic()
        if now > r.deadline:
            raise TemplateLimit(f"the chat template ran past its {RENDER_SECONDS:g} s limit")
        if r.rss0 is not None and now >= r.next_rss:
            r.next_rss = now + RSS_CHECK_S
            rss = _rss()
            if rss is not None and rss - r.rss0 > MAX_RSS_GROWTH:
                raise TemplateLimit(f"the chat template used more than {MAX_RSS_GROWTH // 2**20} MiB of memory")

    def render(self, template, **variables) -> str:
        """Render `template` (from `from_string`) within the bounds; TemplateLimit when one is exceeded."""
        r = self._render
        if r.deadline is not None:  # a render inside a render (a global calling back): keep the outer bounds
            return self._collect(template, variables)
        r.max_chars = BASE_CHARS + 2 * text_size(variables, 1 << 40)
        r.deadline = time.monotonic() + RENDER_SECONDS
        r.rss0, r.next_rss = _rss(), 0.0
        failed = True
        try:
            out = self._collect(template, variables)
            failed = False
            return out
        finally:
            r.deadline = r.rss0 = None
            r.max_chars = MAX_CHARS
            if failed:
                # A stopped render's frames and template context form reference cycles holding what it built (up to
                # MAX_RSS_GROWTH): free them now, not at some later collection, so hostile renders do not add up
                # (the hostile set with automatic collection off: 292 MiB peak with this, 448 MiB without). Costs
                # ~90 ms, on refused renders only.
                gc.collect()

    def _collect(self, template, variables) -> str:
        out, n, cap = [], 0, self._render.max_chars
        for piece in template.generate(**variables):
            n += len(piece)
            if n > cap:
                raise TemplateLimit(f"the chat template's output passed {cap:,} characters")
            out.append(piece)
            self.tick()
        return "".join(out)

    def _finalize(self, value):
        """Every {{ expression }}: sized before it is turned into text."""
        self.check_text(value, "an expression")
        return value

    def check_text(self, value, what: str) -> None:
        """Refuse a value whose text (str(value)) would pass the bound, before it is made."""
        cap = self._render.max_chars
        if not isinstance(value, (str, int, float, bool, type(None))) and text_size(value, cap) > cap:
            raise TemplateLimit(f"{what} would print a {type(value).__name__} of more than {cap:,} characters")

    # -- sizes ---------------------------------------------------------------------------------------------
    def _check(self, value, what: str):
        if _size(value) > (self._render.max_chars if isinstance(value, (str, bytes)) else MAX_ITEMS):
            raise TemplateLimit(f"{what} made a value of {_size(value):,} "
                                f"{'characters' if isinstance(value, (str, bytes)) else 'items'}")
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
            raise TemplateLimit(f"{what} made a {value.bit_length():,}-bit integer")
        return value

    def _predict(self, n: int, what: str) -> None:
        if n > self._render.max_chars:
            raise TemplateLimit(f"{what} would make {n:,} characters (at most {self._render.max_chars:,})")

    def call_binop(self, context, operator, left, right):
        self.tick()
        if operator == "*":
            for seq, k in ((left, right), (right, left)):
                if _size(seq) and isinstance(k, int):
                    n, what = _size(seq) * max(k, 0), f"'*' repeating a {type(seq).__name__}"
                    if isinstance(seq, str):
                        self._predict(n, what)
                    elif n > MAX_ITEMS:
                        raise TemplateLimit(f"{what} would make {n:,} items (at most {MAX_ITEMS:,})")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateLimit("'*' of integers past 65536 bits")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 and \
                    right * math.log2(abs(left)) > MAX_INT_BITS:
                raise TemplateLimit(f"'**' would make an integer of about {right * math.log2(abs(left)):,.0f} bits")
        elif operator == "%" and isinstance(left, str):
            for width, precision in _PRINTF.findall(left):
                _spec_width(width, "'%' formatting")
                _spec_width(precision, "'%' formatting")
            self.check_text(right, "'%' formatting")
        elif operator == "+" and isinstance(left, str) and isinstance(right, str):
            self._predict(len(left) + len(right), "'+'")
        elif operator == "+" and _size(left) and _size(right) and len(left) + len(right) > MAX_ITEMS:
            raise TemplateLimit(f"'+' would make {len(left) + len(right):,} items (at most {MAX_ITEMS:,})")
        return self._check(super().call_binop(context, operator, left, right), f"'{operator}'")

    def getattr(self, obj, attribute):
        self.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.tick()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        __self.tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and not isinstance(__obj, type):
            __self._check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        return __self._check(super().call(__context, __obj, *args, **kwargs),
                             getattr(__obj, "__name__", "a call"))

    def _check_str_method(self, s: str, name: str, args, kwargs) -> None:
        n = len(s)
        if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
            self._predict(args[0], f"str.{name}")
        elif name == "expandtabs":
            tab = args[0] if args else kwargs.get("tabsize", 8)
            if isinstance(tab, int):
                self._predict(n + s.count("\t") * max(tab, 0), "str.expandtabs")
        elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            hits = s.count(args[0]) if args[0] else n + 1
            self._predict(n + hits * len(args[1]), "str.replace")
        elif name == "join" and args and isinstance(args[0], (list, tuple, range, dict, set, frozenset, str)):
            items = args[0]
            self._predict(text_size(list(items), self._render.max_chars) + max(len(items) - 1, 0) * n, "str.join")
        elif name == "join" and args:
            raise TemplateLimit("str.join takes a list here (use |list first)")

    def wrap_str_format(self, value):
        if not (callable(value) and getattr(value, "__name__", None) in ("format", "format_map")
                and isinstance(getattr(value, "__self__", None), str) and not isinstance(value.__self__, Markup)):
            return super().wrap_str_format(value)
        f_self, is_map = value.__self__, value.__name__ == "format_map"
        formatter = _BoundedFormatter(self)

        def wrapper(*args, **kwargs):
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                args, kwargs = (), args[0]
            return self._check(formatter.vformat(f_self, args, kwargs), "str.format")

        return update_wrapper(wrapper, value)

    # -- filters and globals ---------------------------------------------------------------------------------
    def bounded_filter(self, name: str, f):
        """`f` as a filter that ticks the deadline, runs the pre-check of `name` (if any) and checks the result."""
        pre = _PRE_CHECKS.get(name)
        passes = getattr(f, "jinja_pass_arg", None) is not None

        def bounded(*args, **kwargs):
            self.tick()
            if pre is not None:
                i = 1 if passes else 0
                if len(args) > i:  # a pre-check may hand back the value materialized (join of a generator)
                    args = (*args[:i], pre(self, args[i], args[i + 1:], kwargs), *args[i + 1:])
            return self._check(f(*args, **kwargs), f"the {name} filter")

        return update_wrapper(bounded, f)

    def _concat(self, items):
        self._predict(text_size(items, self._render.max_chars), "'~'")
        return "".join(str(x) for x in items)

    def _lipsum(self, n=5, html=True, min=20, max=100):
        if not all(isinstance(v, int) for v in (n, min, max)) or n > 100 or max > 1000 or min > max:
            raise TemplateLimit("lipsum takes at most 100 paragraphs of at most 1000 words")
        return generate_lorem_ipsum(n, html, min, max)

    # -- parse-time rewrites ----------------------------------------------------------------------------------
    def _parse(self, source, name, filename):
        if len(source) > MAX_TEMPLATE_CHARS:
            raise TemplateLimit(f"the chat template has {len(source):,} characters (at most {MAX_TEMPLATE_CHARS:,})")
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):  # every loop ticks the deadline once per item
            loop.iter = nodes.Filter(loop.iter, "pi_loop_iter", [], [], None, None, lineno=loop.lineno)
        _rewrite_concat(tree)
        return tree


def _rewrite_concat(node: nodes.Node) -> None:
    """`a ~ b` joins without a hook (jinja compiles it to str_join): make it the size-checked pi_concat filter."""
    for field, value in node.iter_fields():
        if isinstance(value, nodes.Concat):
            value = _concat_filter(value)
            setattr(node, field, value)
        elif isinstance(value, list):
            value = [(_concat_filter(v) if isinstance(v, nodes.Concat) else v) for v in value]
            setattr(node, field, value)
        for child in (value if isinstance(value, list) else [value]):
            if isinstance(child, nodes.Node):
                _rewrite_concat(child)


def _concat_filter(c: nodes.Concat) -> nodes.Filter:
    return nodes.Filter(nodes.List(list(c.nodes), lineno=c.lineno), "pi_concat", [], [], None, None, lineno=c.lineno)


class _LoopIter:
    """The pi_loop_iter filter: yields the loop's items, ticking the deadline before each."""

    def __init__(self, env: BoundedSandbox):
        self.env = env

    def __call__(self, iterable):
        tick = self.env.tick
        if isinstance(iterable, (str, list, tuple, range, dict)):
            return _Ticking(iterable, tick)
        return (tick() or x for x in iterable)


class _Ticking:
    """A sized iterable (loop.length keeps working) that ticks per item."""

    def __init__(self, seq, tick):
        self.seq, self.tick = seq, tick

    def __len__(self):
        return len(self.seq)

    def __iter__(self):
        for x in self.seq:
            self.tick()
            yield x


# -- filter pre-checks: (env, value, args, kwargs) -> value, refusing before the work is done --------------------

def _arg(args, kwargs, i, name, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _pre_center(env, value, args, kwargs):
    width = _arg(args, kwargs, 0, "width", 80)
    if isinstance(width, int):
        env._predict(width, "the center filter")
    return value


def _pre_indent(env, value, args, kwargs):
    width = _arg(args, kwargs, 0, "width", 4)
    unit = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    s = str(value)
    env._predict(len(s) + (s.count("\n") + 1) * max(unit, 0), "the indent filter")
    return value


def _pre_format(env, value, args, kwargs):
    for width, precision in _PRINTF.findall(str(value)):
        _spec_width(width, "the format filter")
        _spec_width(precision, "the format filter")
    return value


def _pre_replace(env, value, args, kwargs):
    old, new = _arg(args, kwargs, 0, "old", None), _arg(args, kwargs, 1, "new", None)
    if isinstance(old, str) and isinstance(new, str):
        s = str(value)
        hits = s.count(old) if old else len(s) + 1
        env._predict(len(s) + hits * len(new), "the replace filter")
    return value


def _pre_join(env, value, args, kwargs):
    sep = _arg(args, kwargs, 0, "d", "")
    if not isinstance(value, (list, tuple, str)):  # a range, a generator: the size is known only once listed
        value = [env.tick() or x for x in value]
        env._check(value, "the join filter")
    # with attribute=, each item is reduced to a part of itself: its whole text bounds that part's
    env._predict(text_size(value, env._render.max_chars) + max(len(value) - 1, 0) * len(str(sep)),
                 "the join filter")
    return value


def _pre_text(env, value, args, kwargs):
    env.check_text(value, "a string/pprint/tojson filter")
    return value


def _pre_superlinear(env, value, args, kwargs):
    if len(str(value)) > SUPERLINEAR_CHARS:
        raise TemplateLimit(f"striptags/urlize/wordwrap take at most {SUPERLINEAR_CHARS} characters")
    return value


def _pre_wordwrap(env, value, args, kwargs):
    _pre_superlinear(env, value, args, kwargs)
    width = _arg(args, kwargs, 0, "width", 79)
    wrap = _arg(args, kwargs, 2, "wrapstring", None)
    if isinstance(width, int) and width >= 1 and isinstance(wrap, str):
        n = len(str(value))
        env._predict(n + (n // width + 1) * len(wrap), "the wordwrap filter")
    return value


def _pre_count(name, i, default):
    def check(env, value, args, kwargs):
        n = _arg(args, kwargs, i, name, default)
        if isinstance(n, int) and n > MAX_ITEMS:
            raise TemplateLimit(f"{name} = {n:,} (at most {MAX_ITEMS:,})")
        return value
    return check


def _pre_items(env, value, args, kwargs):
    """list/sort/unique of a string or a container: at most MAX_ITEMS items (one C call each, so sized first)."""
    if _size(value) > MAX_ITEMS:
        raise TemplateLimit(f"a list/sort filter over {_size(value):,} items (at most {MAX_ITEMS:,})")
    return value


def _pre_tojson(env, value, args, kwargs):
    _pre_text(env, value, args, kwargs)
    indent = _arg(args, kwargs, 1, "indent", None)
    if isinstance(indent, str) and len(indent) > MAX_JSON_INDENT or isinstance(indent, int) and indent > MAX_JSON_INDENT:
        raise TemplateLimit(f"tojson indent past {MAX_JSON_INDENT}")
    return value


_PRE_CHECKS = {"center": _pre_center, "indent": _pre_indent, "format": _pre_format, "replace": _pre_replace,
               "join": _pre_join, "striptags": _pre_superlinear, "urlize": _pre_superlinear,
               "wordwrap": _pre_wordwrap, "batch": _pre_count("linecount", 0, 1), "slice": _pre_count("slices", 0, 1),
               "tojson": _pre_tojson, "string": _pre_text, "pprint": _pre_text, "list": _pre_items,
               "unique": _pre_items, "sort": _pre_items, "dictsort": _pre_items}
