"""Render chat messages into prompt text with the checkpoint's Jinja chat template, in a sandbox.

The environment matches transformers' `apply_chat_template` (ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, loopcontrols, its `tojson`, `raise_exception`, `strftime_now`, `dict`, `namespace`), so the
rendered text is the same. Templates come from the Hub and are untrusted: the sandbox keeps them away from
Python internals and files, bounds their work (loop iterations, characters made) and the length of every value
they make, and every failure becomes a `TokenizerError` naming where the template came from.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.runtime
import jinja2.sandbox
import jinja2.utils
import jinja2.visitor

from llamacli.errors import InputError, TokenizerError
from llamacli.text import check_text, decode_text, read_json_file


class ChatTemplate(str):
    """A chat template's text that knows where it came from (error messages name it)."""

    source: str = "chat template"

    def __new__(cls, text: str, source: str):
        self = super().__new__(cls, text)
        self.source = source
        return self


def _source(template) -> str:
    return getattr(template, "source", "chat template")


def _read_template(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"chat template file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"chat template {path} is a directory, not a file") from None
    except OSError as exc:
        raise InputError(f"cannot read chat template {path}: {exc.strerror or exc}") from None
    return ChatTemplate(decode_text(data, f"chat template {path}"), what)


def load_chat_template(folder, override_file=None) -> ChatTemplate | None:
    """The chat template: `override_file`, else chat_template.jinja, else tokenizer_config.json; None if none."""
    if override_file is not None:
        return _read_template(Path(override_file), f"chat template {override_file} (--chat-template)")
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return _read_template(jinja_file, f"chat template {jinja_file}")
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    template = read_json_file(config_file, TokenizerError)
    template = template.get("chat_template") if isinstance(template, dict) else None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use"...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        return None
    check_text(template, f"chat_template in {config_file}", TokenizerError)
    return ChatTemplate(template, f"chat template in {config_file}")


def require_chat_template(folder, override_file=None) -> str:
    """The chat template (as `load_chat_template`), or a TokenizerError that says what to do without one."""
    template = load_chat_template(folder, override_file)
    if template is None:
        raise TokenizerError(f"{folder} has no chat template (no chat_template.jinja, no chat_template in "
                             "tokenizer_config.json): pass --chat-template FILE, or --raw to send the text as is")
    return template


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """The template called raise_exception(message)."""


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # As transformers: no HTML escaping (Jinja's own tojson escapes <, >, &, ') and json.dumps' options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    # `dict` for templates without handing them the type itself (dict.__subclasses__ and friends).
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Jinja's namespace, refusing underscore names so a template cannot plant dunders.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


# -- bounds on the work of a render -----------------------------------------------------------------------
# A template is a program from the Hub: these keep a hostile one from hanging the process or exhausting memory.
# Real chat templates stay far below them (a few loops over the messages, text about the size of the prompt).
MAX_LENGTH = 16_000_000  # characters (or items) of any one value a template makes, its output included
MAX_WORK = 50_000_000  # units of work for one render: a character produced or an item measured is one,
ITERATION = 100  # a loop iteration costs this many (slower than copying 100 characters): 500,000 at most
MAX_INT_BITS = 100_000  # integers a template computes (2 ** 10 ** 9 would take minutes)

_budget: contextvars.ContextVar[list] = contextvars.ContextVar("chat_template_budget")


class _TooMuch(jinja2.exceptions.TemplateError):
    """The template went past a bound of the sandbox."""


def _charge(units: int) -> None:
    left = _budget.get(None)
    if left is None:
        return
    left[0] -= units
    if left[0] < 0:
        raise _TooMuch(f"it did more work than allowed (at most {MAX_WORK // ITERATION:,} loop iterations, "
                       f"{MAX_WORK:,} characters produced)")


def _size(value) -> int:
    """Characters and items `value` stands for (a list counts each element, shared or not); stops past MAX_LENGTH."""
    total, visits, stack = 0, 0, [value]
    while stack and total <= MAX_LENGTH:
        v = stack.pop()
        visits += 1
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple)):
            total += len(v)
            stack.extend(v[:MAX_LENGTH])
        elif isinstance(v, dict):
            total += len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            total += 1
    _charge(visits)
    return total


def _refuse_size(n: int, what: str = "a value") -> None:
    if n > MAX_LENGTH:
        raise _TooMuch(f"{what} would be longer than {MAX_LENGTH:,} characters")


def _made(value):
    """A value the template just made: measured, charged, refused when too long."""
    if isinstance(value, (str, list, tuple, dict)):
        n = _size(value)
        _refuse_size(n)
        _charge(n)
    elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _TooMuch(f"it made an integer of more than {MAX_INT_BITS:,} bits")
    return value


def _check_ints(values) -> None:
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_LENGTH:
            raise _TooMuch(f"it passed {v} where at most {MAX_LENGTH:,} is allowed (a width, count or length)")


def _check_format(fmt) -> None:
    # Widths and precisions in a format string ('%99999999d', '{:>99999999}') allocate that many characters.
    if isinstance(fmt, str):
        _check_ints(int(d) for d in re.findall(r"\d{7,}", fmt))


def _check_operation(name: str, target, args) -> None:
    """Refuse, before it runs, a filter or str method whose result would be too long."""
    _check_ints(args)
    if name in ("format", "format_map", "__mod__"):
        _check_format(target)
        _check_format(args[0] if args else None)
    elif name == "join":  # str.join(items) or the join filter (items|join(sep))
        items, sep = (args[0], target) if isinstance(target, str) else (target, args[0] if args else "")
        if isinstance(items, (list, tuple, str)):
            _refuse_size(_size(items) + len(items) * _size(sep), "a join")
    elif name == "replace" and isinstance(target, str) and len(args) >= 2:
        old, new = args[0], args[1]
        if isinstance(old, str) and isinstance(new, str):
            count = target.count(old) if old else len(target) + 1
            _refuse_size(len(target) + count * (len(new) - len(old)), "a replace")
    elif name == "expandtabs" and isinstance(target, str):
        width = args[0] if args and isinstance(args[0], int) else 8
        _refuse_size(len(target) + target.count("\t") * width, "expandtabs")
    elif name in ("indent", "wordwrap") and isinstance(target, str):
        extra = sum(len(a) for a in args if isinstance(a, str)) + 8
        _refuse_size(len(target) + (target.count("\n") + len(target) // 8 + 1) * extra, name)


def _guard_filter(name: str, func):
    """`func` (a Jinja filter) with its arguments checked and its result measured."""
    passes = jinja2.utils._PassArg.from_obj(func) is not None

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        data = args[1:] if passes else args
        for a in (*data, *kwargs.values()):
            _refuse_size(_size(a), "an argument")
        if data:
            _check_operation(name, data[0], list(data[1:]) + list(kwargs.values()))
        return _made(func(*args, **kwargs))

    return guarded


def _binop_check(operator: str, left, right) -> None:
    sized = (str, list, tuple)
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, sized) and isinstance(n, int):
                _refuse_size(_size(seq) * max(n, 0), "a repetition")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _TooMuch(f"it made an integer of more than {MAX_INT_BITS:,} bits")
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        _refuse_size(_size(left) + _size(right), "a concatenation")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        if right * left.bit_length() > MAX_INT_BITS * 2:
            raise _TooMuch(f"it made an integer of more than {MAX_INT_BITS:,} bits")
    elif operator == "%" and isinstance(left, str):
        _check_format(left)
        _check_ints(right if isinstance(right, tuple) else (right,))


@jinja2.pass_context
def _counted(context, iterable):
    # Every loop runs over this: one unit of work per iteration.
    for item in iterable:
        _charge(ITERATION)
        yield item


@jinja2.pass_context
def _measured(context, value):
    # Every output expression and text block, and every `~` concatenation, goes through this.
    if isinstance(value, (list, tuple, dict)):
        _refuse_size(_size(value), "the output")
        return value
    n = len(value) if isinstance(value, str) else 1
    _refuse_size(n, "a value")
    _charge(n)
    return value


class _Bounded(jinja2.visitor.NodeTransformer):
    """Rewrites a parsed template so that loops, output and `~` go through `_counted` / `_measured`."""

    def _wrap(self, node, name):
        return jinja2.nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = self._wrap(node.iter, "_llamacli_counted")
        return node

    def visit_Output(self, node):
        node = self.generic_visit(node)
        node.nodes = [self._wrap(jinja2.nodes.Const(n.data, lineno=n.lineno) if isinstance(n, jinja2.nodes.TemplateData)
                                 else n, "_llamacli_measured") for n in node.nodes]
        return node

    def visit_Concat(self, node):
        return self._wrap(self.generic_visit(node), "_llamacli_measured")


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """transformers' sandbox, plus bounds on the work and memory of a render."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def _parse(self, source, name, filename):
        return _Bounded().visit(super()._parse(source, name, filename))

    def call_binop(self, context, operator, left, right):
        _binop_check(operator, left, right)
        return _made(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        if isinstance(__obj, jinja2.runtime.LoopContext) and args:  # a recursive loop: loop(children)
            args = (_counted(__context, args[0]), *args[1:])
        method = getattr(__obj, "__wrapped__", __obj)
        target = getattr(method, "__self__", None)
        if isinstance(target, str):
            _check_operation(getattr(method, "__name__", ""), target, list(args) + list(kwargs.values()))
        for a in (*args, *kwargs.values()):
            _refuse_size(_size(a), "an argument")
        return _made(super().call(__context, __obj, *args, **kwargs))


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters["_llamacli_counted"] = _counted
    env.filters["_llamacli_measured"] = _measured
    env.globals.pop("lipsum", None)  # lipsum(n=10**6) writes megabytes of filler
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TokenizerError(f"{_source(template)} has a syntax error at line {exc.lineno}: {exc.message}") from exc


def _plain(value):
    """Rebuild what the template sees out of plain JSON types (as transformers), dropping rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def render_chat(template: str, messages: list[dict], *, bos_token, eos_token, add_generation_prompt=True,
                tools=None, **extra) -> str:
    """Render `messages` with `template`, as transformers' apply_chat_template(tokenize=False) does, within
    the sandbox's bounds on work and length (TokenizerError naming the template when it goes past them)."""
    if not messages:
        raise InputError("a chat needs at least one message")
    for m in messages:
        if not isinstance(m, dict):
            raise InputError(f"a chat message must be an object with 'role' and 'content', got {m!r}")
    # As transformers: keys set to None are dropped (templates test for a key, not for None).
    chat = _plain([{k: v for k, v in m.items() if v is not None} for m in messages])
    compiled = _compile(template)
    variables = _plain({"bos_token": bos_token, "eos_token": eos_token, **extra})
    where = _source(template)
    token = _budget.set([MAX_WORK])
    try:
        text = compiled.render(messages=chat, tools=_plain(tools), documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
        _refuse_size(len(text), "the output")
        return text
    except _TooMuch as exc:
        raise TokenizerError(f"{where} was stopped: {exc}") from None
    except _TemplateRaised as exc:
        raise TokenizerError(f"{where}: {exc.message}") from exc
    except jinja2.exceptions.SecurityError as exc:
        raise TokenizerError(f"{where} tried an unsafe operation and was stopped: {exc}") from exc
    except jinja2.exceptions.TemplateError as exc:
        raise TokenizerError(f"{where} failed: {exc}") from exc
    except TypeError as exc:
        if "no loader" in str(exc):  # {% include %}, {% import %}, {% extends %}: there is no loader, on purpose
            raise TokenizerError(f"{where} tried to include or import a file, which is not allowed") from exc
        raise TokenizerError(f"{where} failed: TypeError: {exc}") from exc
    except MemoryError:
        raise TokenizerError(f"{where} ran out of memory") from None
    except (ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError,
            RecursionError) as exc:
        raise TokenizerError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        _budget.reset(token)
