"""Chat templates: where they are found, rendered text and ids equal to transformers' apply_chat_template, errors,
and the sandbox."""

from __future__ import annotations

import datetime
import json

import pytest
import transformers

from llamacli.chat_template import load_chat_template, render_chat, require_chat_template
from llamacli.errors import InputError, TokenizerError
from llamacli.tokenizer import load_tokenizer
from tests.tokenizer_assets import (LLAMA2_TEMPLATE, LLAMA3_TEMPLATE, build_tiny_bpe, build_tiny_sp, mistral_dir,
                                    smollm2_tokenizer_dir, write_json)

SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
U1 = {"role": "user", "content": "Hello there! What's 2+2?"}
A1 = {"role": "assistant", "content": "  4.  "}
U2 = {"role": "user", "content": "And in 中文? 😀"}
A2 = {"role": "assistant", "content": "四"}
U3 = {"role": "user", "content": "Thanks\n\twith tabs and [brackets] {{ not jinja }}"}

CHATS = {
    "1 turn": [U1],
    "2 turns": [U1, A1, U2],
    "3 turns": [U1, A1, U2, A2, U3],
    "system + 1 turn": [SYSTEM, U1],
    "system + 3 turns": [SYSTEM, U1, A1, U2, A2, U3],
    "ends with assistant": [SYSTEM, U1, A1],
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {
        "smollm2": smollm2_tokenizer_dir(),
        "llama3-style": build_tiny_bpe(tmp_path_factory.mktemp("llama3")),
        "llama2-style (Mistral sp)": mistral_dir(tmp_path_factory.mktemp("llama2")),
        "llama2-style (tiny sp)": build_tiny_sp(tmp_path_factory.mktemp("tiny-sp")),
    }


def sentencepiece_reference(folder, text):
    """Ids as Meta's Llama-2 reference builds them: sentencepiece on the text between <s> and </s>."""
    import re

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ids = []
    for part in re.split("(<s>|</s>)", text):
        ids += [1] if part == "<s>" else [2] if part == "</s>" else sp.encode(part)
    return ids


@pytest.mark.parametrize("name", ["smollm2", "llama3-style", "llama2-style (Mistral sp)", "llama2-style (tiny sp)"])
def test_render_and_ids_equal_transformers(folders, name):
    folder = folders[name]
    tok = load_tokenizer(folder)
    template = load_chat_template(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert template is not None and template == ref.chat_template
    for chat_name, messages in CHATS.items():
        for add_generation_prompt in (True, False):
            text = render_chat(template, messages, bos_token=tok.bos_token, eos_token=tok.eos_token,
                               add_generation_prompt=add_generation_prompt)
            expected = ref.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
            assert text == expected, (name, chat_name)
            ids = tok.encode(text, add_special_tokens=False)
            ref_ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                              return_dict=False)
            if name == "llama2-style (tiny sp)":
                # transformers 5 runs a `tokenizers` conversion of the model, which differs from sentencepiece
                # on whitespace runs ("\n\t") with this tiny vocabulary: sentencepiece is the reference here.
                assert ids == sentencepiece_reference(folder, text), (name, chat_name)
            else:
                assert ids == list(ref_ids), (name, chat_name)
            if tok.add_bos:  # the template carries BOS: exactly one at the start, none added twice
                assert ids[0] == tok.bos_id and ids[1] != tok.bos_id


def test_special_tokens_in_rendered_text_map_to_their_ids(folders):
    tok = load_tokenizer(folders["llama3-style"])
    text = render_chat(LLAMA3_TEMPLATE, [U1], bos_token=tok.bos_token, eos_token=tok.eos_token)
    ids = tok.encode(text, add_special_tokens=False)
    header = tok.encode("<|start_header_id|>", add_special_tokens=False)
    assert len(header) == 1 and tok.is_special(header[0])
    assert ids.count(header[0]) == 2 and ids.count(tok.encode("<|eot_id|>", add_special_tokens=False)[0]) == 1
    sp = load_tokenizer(folders["llama2-style (Mistral sp)"])
    text = render_chat(LLAMA2_TEMPLATE, [U1, A1, U2], bos_token="<s>", eos_token="</s>")
    ids = sp.encode(text, add_special_tokens=False)
    assert ids.count(1) == 2 and ids.count(2) == 1 and ids[0] == 1


def test_template_sources(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    assert load_chat_template(folder) is None  # nothing at all
    with pytest.raises(TokenizerError, match="--chat-template FILE, or --raw"):
        require_chat_template(folder)
    write_json(folder / "tokenizer_config.json", {"bos_token": "<s>"})
    assert load_chat_template(folder) is None
    write_json(folder / "tokenizer_config.json", {"chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]})
    assert load_chat_template(folder) == "DEFAULT"
    write_json(folder / "tokenizer_config.json", {"chat_template": "FROM CONFIG"})
    assert load_chat_template(folder) == "FROM CONFIG"
    (folder / "chat_template.jinja").write_text("FROM JINJA FILE")
    assert load_chat_template(folder) == "FROM JINJA FILE" == require_chat_template(folder)
    override = tmp_path / "mine.jinja"
    override.write_text("OVERRIDE {{ messages[0]['content'] }}")
    assert load_chat_template(folder, override_file=override) == "OVERRIDE {{ messages[0]['content'] }}"
    assert render_chat(load_chat_template(folder, override), [U1], bos_token=None, eos_token=None) == (
        "OVERRIDE " + U1["content"])
    with pytest.raises(InputError, match="not found"):
        load_chat_template(folder, override_file=tmp_path / "missing.jinja")
    (folder / "tokenizer_config.json").write_text("{broken")
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: malformed JSON at line 1 column 2"):
        load_chat_template(folder)


def test_raise_exception_becomes_a_clear_error():
    with pytest.raises(TokenizerError, match="Conversation roles must alternate user/assistant"):
        render_chat(LLAMA2_TEMPLATE, [U1, U2], bos_token="<s>", eos_token="</s>")


def test_template_errors_are_tokenizer_errors():
    with pytest.raises(TokenizerError, match="syntax error at line 2"):
        render_chat("ok\n{% if %}", [U1], bos_token=None, eos_token=None)
    with pytest.raises(TokenizerError, match="chat template failed"):
        render_chat("{{ messages[5]['content'].upper() }}", [U1], bos_token=None, eos_token=None)
    with pytest.raises(InputError, match="at least one message"):
        render_chat("x", [], bos_token=None, eos_token=None)


@pytest.mark.parametrize("hostile", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os.system('id') }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{% set ns = namespace(__class__=1) %}",
    "{{ dict.__class__.__subclasses__() }}",
])
def test_sandbox_stops_hostile_templates(hostile):
    with pytest.raises(TokenizerError) as info:
        render_chat(hostile, [U1], bos_token="<s>", eos_token="</s>")
    message = str(info.value)
    assert message.startswith("chat template") and ("unsafe" in message or "not allowed" in message)
    assert "root:" not in str(info.value)


def test_globals_and_tojson_match_transformers(folders):
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ tools | tojson }}|"
        "{{ messages | tojson(indent=2) }}|{{ {'b': '<a&b>', 'a': 'é'} | tojson(sort_keys=True) }}|"
        "{% for m in messages %}{% if m.role == 'user' %}{% continue %}{% endif %}{{ m.role }}{% endfor %}|"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|"
        "{{ dict(x=1) | tojson }}|{{ custom }}|{{ documents }}"
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> in 東京",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [SYSTEM, U1, {"role": "assistant", "content": "x", "tool_calls": None}]
    ours = render_chat(template, messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True,
                       tools=tools, custom="extra var")
    ref = transformers.AutoTokenizer.from_pretrained(str(folders["llama2-style (Mistral sp)"]))
    theirs = ref.apply_chat_template(messages, chat_template=template, tools=tools, tokenize=False,
                                     add_generation_prompt=True, custom="extra var")
    assert ours == theirs
    assert "東京" in ours and "<now>" in ours and "tool_calls" not in ours  # no HTML/ASCII escaping; None dropped


def test_strftime_now():
    year = str(datetime.date.today().year)
    assert render_chat("{{ strftime_now('%Y') }}", [U1], bos_token=None, eos_token=None) in (
        year, str(int(year) + 1))


def test_messages_are_not_modified():
    messages = [dict(U1), {"role": "assistant", "content": None}]
    before = json.dumps(messages)
    render_chat("{% for m in messages %}{{ m.role }}{% endfor %}", messages, bos_token=None, eos_token=None)
    assert json.dumps(messages) == before


# -- the sandbox's bounds on work and memory (issue 15, items 8 and 9) ----------------------------------------

BOMBS = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for x in [1] recursive %}{% if loop.depth < 4 %}{{ loop(range(100000)) }}{% endif %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100) %}" + "A" * 40 + "{% endfor %}{% endfor %}",
    "{{ 'ab ' * 10**7 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{% macro d(s, n) %}{{ d(s ~ s, n - 1) if n else s|length }}{% endmacro %}{{ d('x', 60) }}",
    "{% set ns = namespace(x=3) %}{% for i in range(100) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}",
    "{{ 'x'|center(10**10) }}",
    "{{ 'x'.ljust(10**10) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ ('x' * 1000000).replace('x', 'y' * 1000) }}",
    "{{ (['x' * 1000000] * 1000)|join }}",
    "{% set a = ['x' * 10**6] * 10 %}{% set b = [a,a,a,a,a,a,a,a,a,a] %}{% set c = [b,b,b,b,b,b,b,b,b,b] %}"
    "{{ c|tojson }}",
    "{{ ('\t' * 1000000).expandtabs(1000) }}",
    "{{ ('x\n' * 1000000)|indent('y' * 1000) }}",
]


@pytest.mark.parametrize("bomb", BOMBS)
def test_templates_that_would_hang_or_exhaust_memory_are_stopped(bomb):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TokenizerError, match=r"^chat template was stopped: "):
        render_chat(bomb, [U1], bos_token="<s>", eos_token="</s>")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500, f"the render grew the process by {grown_mb:.0f} MB before it was stopped"


def test_bounds_leave_real_templates_and_long_chats_alone():
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hello there " * 100} for i in range(1001)]
    text = render_chat(LLAMA3_TEMPLATE, chat, bos_token="<s>", eos_token="</s>")
    assert text.count("hello there") == 100 * 1001
    assert render_chat("{{ 'ab' * 1000 }}{{ 2 ** 64 }}", [U1], bos_token="", eos_token="") == "ab" * 1000 + str(2**64)


def test_errors_name_where_the_template_came_from(tmp_path):
    bomb = BOMBS[0]
    override = tmp_path / "t.jinja"
    override.write_text(bomb)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_json(folder / "tokenizer_config.json", {"chat_template": bomb})
    for template, where in [(load_chat_template(folder, override), f"chat template {override} (--chat-template)"),
                            (load_chat_template(folder), f"chat template in {folder / 'tokenizer_config.json'}")]:
        with pytest.raises(TokenizerError) as info:
            render_chat(template, [U1], bos_token="<s>", eos_token="</s>")
        assert str(info.value).startswith(f"{where} was stopped: it did more work than allowed"), str(info.value)


def test_a_template_file_that_is_not_utf8_names_the_file_and_byte(tmp_path):
    bad = tmp_path / "t.jinja"
    bad.write_bytes(b"{{ messages }}\xff")
    with pytest.raises(InputError, match=rf"chat template {bad} is not UTF-8 \(invalid start byte at byte 14\)"):
        load_chat_template(tmp_path, bad)
    with pytest.raises(InputError, match="is a directory"):
        load_chat_template(tmp_path, tmp_path)
