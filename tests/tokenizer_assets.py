"""Tokenizer folders for the tokenizer / chat-template tests: tiny trained ones and real ones (SmolLM2, Mistral).

Tiny ones are trained in a temp folder per test session (well under a second); SmolLM2's tokenizer.json is
built once with transformers' GGUF loader and cached next to the other test assets.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from tests.assets import cache_dir, mistral_tokenizer_model, smollm2_gguf

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello again, world. How are you today?",
    "  Leading spaces, trailing spaces  and\ttabs\nnew lines\n\n",
    "Numbers: 0 1 2 3 12 123 1234 3.14159 2024-06-01",
    "中文字符测试，日本語のテキスト，한국어 텍스트",
    "Emoji: 😀 🎉 👍🏽 👨‍👩‍👧 and accents: café naïve résumé Ünïcödé straße",
    "def main():\n    print('hi')\n    return [x for x in range(10)]",
] * 20

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Meta's Llama-2-chat template (as in meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def build_tiny_bpe(folder: Path, *, with_template: bool = True) -> Path:
    """A byte-level BPE tokenizer.json (GPT-2/Llama-3 style) with Llama-3 special tokens and BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=LLAMA3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": False}
    if with_template:
        config["chat_template"] = LLAMA3_TEMPLATE
    write_json(folder / "tokenizer_config.json", config)
    return folder


def build_tiny_sp(folder: Path, *, legacy: bool = True) -> Path:
    """A small SentencePiece BPE model with byte fallback (Llama style ids: unk 0, <s> 1, </s> 2)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, remove_extra_whitespaces=False,
        user_defined_symbols=[], unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": legacy,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": LLAMA2_TEMPLATE})
    return folder


def mistral_dir(folder: Path, *, legacy: bool = True, template: str | None = LLAMA2_TEMPLATE) -> Path:
    """Mistral-7B v0.1's tokenizer.model with a Llama-style tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mistral_tokenizer_model(), folder / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "legacy": legacy, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if template is not None:
        config["chat_template"] = template
    write_json(folder / "tokenizer_config.json", config)
    return folder


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2-135M-Instruct's tokenizer.json + tokenizer_config.json + chat template, built once from its GGUF."""
    target = cache_dir() / "smollm2-tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    import transformers

    gguf = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=str(gguf))
    tmp = target.with_name(target.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
