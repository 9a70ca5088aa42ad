"""Byte-exact Zephyr template strings, tokenizer setup and the no-double-BOS rule."""

import copy

import pytest

from zephyr_fast.data.chat import ZEPHYR_CHAT_TEMPLATE, load_tokenizer, render, tokenize_kwargs

CONV = [
    {"role": "system", "content": ""},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "I am doing well, thanks!"},
]


def test_template_matches_alignment_handbook_source():
    # the handbook string, spelled with its literal "\n" escapes as it appears in the YAML recipe
    handbook = (
        "{% for message in messages %}\\n{% if message['role'] == 'user' %}\\n{{ '<|user|>\\n' + message['content'] "
        "+ eos_token }}\\n{% elif message['role'] == 'system' %}\\n{{ '<|system|>\\n' + message['content'] + eos_token }}"
        "\\n{% elif message['role'] == 'assistant' %}\\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\\n"
        "{% endif %}\\n{% if loop.last and add_generation_prompt %}\\n{{ '<|assistant|>' }}\\n{% endif %}\\n{% endfor %}"
    )
    assert ZEPHYR_CHAT_TEMPLATE == handbook.replace("\\n", "\n")


def test_render_conversation_byte_exact():
    assert render(CONV) == "<|system|>\n</s>\n<|user|>\nHow are you?</s>\n<|assistant|>\nI am doing well, thanks!</s>\n"


def test_render_generation_prompt_byte_exact():
    assert render(CONV[:2], add_generation_prompt=True) == "<|system|>\n</s>\n<|user|>\nHow are you?</s>\n<|assistant|>\n"


def test_dpo_completion_renders_after_its_prompt():
    prompt = render(CONV[:2], add_generation_prompt=True)
    full = render(CONV)
    assert full.startswith(prompt[: -len("<|assistant|>\n")])
    assert full[len(prompt) - len("<|assistant|>\n"):] == "<|assistant|>\nI am doing well, thanks!</s>\n"


def test_render_equals_transformers_apply_chat_template(tok, uc_rows):
    for row in uc_rows[:4]:
        msgs = [{"role": "system", "content": ""}] + row["messages"]
        assert render(msgs, tokenizer=tok) == tok.apply_chat_template(msgs, tokenize=False)
        assert render(msgs[:3], add_generation_prompt=True, tokenizer=tok) == tok.apply_chat_template(
            msgs[:3], tokenize=False, add_generation_prompt=True
        )


def test_load_tokenizer_adds_template_and_pad(tok):
    assert tok.chat_template == ZEPHYR_CHAT_TEMPLATE
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok("Hello world")["input_ids"] == [1, 22557, 1526]


def test_load_tokenizer_keeps_existing_template(tmp_path, tok):
    custom = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    t = copy.deepcopy(tok)
    t.chat_template = custom
    t.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).chat_template == custom
    assert load_tokenizer(str(tmp_path), chat_template=ZEPHYR_CHAT_TEMPLATE).chat_template == ZEPHYR_CHAT_TEMPLATE


def test_single_bos_with_zephyr_template(tok):
    ids = tok(render(CONV, tokenizer=tok), **tokenize_kwargs(tok))["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_no_double_bos_when_template_emits_bos(tok):
    t = copy.deepcopy(tok)
    t.chat_template = "{{ bos_token }}" + ZEPHYR_CHAT_TEMPLATE
    kw = tokenize_kwargs(t)
    assert kw == {"add_special_tokens": False}
    ids = t(render(CONV, tokenizer=t), **kw)["input_ids"]
    assert ids[0] == t.bos_token_id and ids.count(t.bos_token_id) == 1


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match="Pass a local path"):
        load_tokenizer("mistralai/Mistral-7B-v0.1")


def test_fast_python_rendering_equals_jinja(tok, uf_rows):
    from zephyr_fast.data.chat import render_fast

    for row in uf_rows[:4]:
        msgs = [{"role": "system", "content": ""}] + row["chosen"]
        for gen in (False, True):
            assert render_fast(msgs, tok, gen) == render(msgs, gen, tokenizer=tok)


def test_hub_id_in_offline_mode_is_a_clear_error():
    # huggingface_hub reads HF_HUB_OFFLINE at import, so this needs a fresh interpreter
    import os
    import subprocess
    import sys

    code = ("from zephyr_fast.data.chat import load_tokenizer\n"
            "try:\n    load_tokenizer('mistralai/Mistral-7B-v0.1-not-cached')\n"
            "except FileNotFoundError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "Pass a local path instead" in out.stdout and "assets/tokenizers" in out.stdout, out.stderr[-2000:]
