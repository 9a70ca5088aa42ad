"""Chat generation: template + generation prompt, left padding, greedy = manual argmax, stop at </s>."""

import pytest
import torch

from tests.model.helpers import tiny_model
from zephyr_fast.data.chat import load_tokenizer
from zephyr_fast.data.preference import build_dpo_examples
from zephyr_fast.data.sft import with_empty_system
from zephyr_fast.model import generate
from zephyr_fast.model.generate import prompt_texts
from zephyr_fast.model.attention import attention_implementation

CONVS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1 2 3"},
     {"role": "user", "content": "Again"}],
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="module")
def model():
    return tiny_model("mistral", seed=18, vocab_size=32000, hidden_size=32, num_hidden_layers=1)


def _manual_greedy(model, tokenizer, conv, n):
    text = tokenizer.apply_chat_template(with_empty_system(conv), tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, 1] != tokenizer.bos_token_id  # exactly one BOS
    out = []
    with torch.no_grad(), attention_implementation(model, "sdpa"):
        for _ in range(n):
            nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            if nxt == tokenizer.eos_token_id:
                break
            out.append(int(nxt))
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_greedy_batched_left_padded_equals_one_by_one_manual(model, tokenizer):
    tokenizer.padding_side = "right"  # generate must switch to left padding itself
    got = generate(model, tokenizer, CONVS, max_new_tokens=6, batch_size=2)
    assert got == [_manual_greedy(model, tokenizer, c, 6) for c in CONVS]
    assert all(len(tokenizer(g, add_special_tokens=False)["input_ids"]) > 0 for g in got)
    assert model.training and model.config._attn_implementation == "zephyr_sdpa_segments"  # restored
    assert tokenizer.padding_side == "right"  # restored


def test_sampling_is_seeded(model, tokenizer):
    a = generate(model, tokenizer, CONVS[:2], max_new_tokens=5, do_sample=True, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, tokenizer, CONVS[:2], max_new_tokens=5, do_sample=True, temperature=1.0, top_p=0.9, seed=3)
    assert a == b and len(a) == 2


def test_stops_at_eos(tokenizer):
    model = tiny_model("mistral", seed=19, vocab_size=32000, hidden_size=32, num_hidden_layers=1)
    with torch.no_grad():  # make </s> the argmax everywhere: only its head row is non-zero and aligned
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:  # residual stream = token embedding only
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.abs_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id] = 1.0
    assert generate(model, tokenizer, CONVS, max_new_tokens=20) == ["", "", ""]
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokenizer, CONVS, max_new_tokens=0)


def test_prompt_is_rendered_exactly_as_training_renders_it(tokenizer):
    """Training prepends an empty system turn (auto_insert_empty_system_msg); generation must too."""
    for conv in CONVS:
        row = {"chosen": conv + [{"role": "assistant", "content": "yes"}],
               "rejected": conv + [{"role": "assistant", "content": "no"}]}
        (ex,), _ = build_dpo_examples([row], tokenizer, max_length=512, max_prompt_length=256)
        (text,) = prompt_texts(tokenizer, [conv])
        assert tokenizer(text)["input_ids"] == ex["prompt_ids"]
        assert text.startswith("<|system|>\n" + conv[0]["content"] * (conv[0]["role"] == "system") + "</s>\n")
        assert text.endswith("<|assistant|>\n")
    (plain,) = prompt_texts(tokenizer, [CONVS[0]], add_empty_system=False)
    assert plain.startswith("<|user|>")
