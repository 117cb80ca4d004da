"""Render chat messages into prompt text with the checkpoint's Jinja chat template, in a sandbox.

The environment matches transformers' `apply_chat_template` (ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, loopcontrols, its `tojson`, `raise_exception`, `strftime_now`, `dict`, `namespace`), so the
rendered text is the same. Templates come from the Hub and are untrusted: the sandbox keeps them away from
Python internals and files, and every failure becomes a `TokenizerError`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils

from llamacli.errors import InputError, TokenizerError


def load_chat_template(folder, override_file=None) -> str | None:
    """The chat template: `override_file`, else chat_template.jinja, else tokenizer_config.json; None if none."""
    if override_file is not None:
        path = Path(override_file)
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"chat template file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read chat template {path}: {exc}") from exc
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise TokenizerError(f"cannot read {config_file}: {exc}") from exc
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use"...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


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


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TokenizerError(f"chat template has a syntax error at line {exc.lineno}: {exc.message}") from exc


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
    """Render `messages` with `template`, as transformers' apply_chat_template(tokenize=False) does."""
    if not messages:
        raise InputError("a chat needs at least one message")
    for m in messages:
        if not isinstance(m, dict):
            raise InputError(f"a chat message must be an object with 'role' and 'content', got {m!r}")
    # As transformers: keys set to None are dropped (templates test for a key, not for None).
    chat = _plain([{k: v for k, v in m.items() if v is not None} for m in messages])
    compiled = _compile(template)
    variables = _plain({"bos_token": bos_token, "eos_token": eos_token, **extra})
    try:
        return compiled.render(messages=chat, tools=_plain(tools), documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
    except _TemplateRaised as exc:
        raise TokenizerError(f"chat template: {exc.message}") from exc
    except jinja2.exceptions.SecurityError as exc:
        raise TokenizerError(f"chat template tried an unsafe operation and was stopped: {exc}") from exc
    except jinja2.exceptions.TemplateError as exc:
        raise TokenizerError(f"chat template failed: {exc}") from exc
    except TypeError as exc:
        if "no loader" in str(exc):  # {% include %}, {% import %}, {% extends %}: there is no loader, on purpose
            raise TokenizerError("chat template tried to include or import a file, which is not allowed") from exc
        raise TokenizerError(f"chat template failed: TypeError: {exc}") from exc
    except (ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError,
            RecursionError) as exc:
        raise TokenizerError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
