"""Loss-token counting equals the chat template's generation mask; the cache remembers counts."""

from __future__ import annotations

import random

import pytest

from aloe_cli.errors import AloeError, RecordError
from aloe_cli.tokens import (
    LossTokenCounter,
    TokenCache,
    conversation_key,
    load_counter,
    reference_count,
    tokens_overlapping,
)


@pytest.fixture(scope="module")
def counter(tiny_model_dir):
    return load_counter(str(tiny_model_dir))


def user(*parts):
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]}


def assistant(text, as_string=False):
    return {"role": "assistant", "content": text if as_string else [{"type": "text", "text": text}]}


# Pieces chosen to hit tokenizer edge cases: leading spaces and newlines, multi-byte characters split into
# several byte tokens, text that looks like special tokens, digits.
PIECES = ["The liver", " shows", "\n", "  ", "é", "肝脏", "🙂", "<|im_end|>", "Yes", ".", " 12", "\n\n",
          "(100,200),(300,400)", "<|box_start|>", "x", "lesion", " ", "\t"]


def random_conversations(count, seed=0, pieces=PIECES):
    rng = random.Random(seed)

    def text(n):
        return "".join(rng.choice(pieces) for _ in range(n))

    conversations = []
    for i in range(count):
        messages = [{"role": "system", "content": text(4)}] if i % 5 == 0 else []
        for _ in range(rng.randint(1, 3)):
            messages.append(user(*([None] * rng.randint(0, 2)), text(rng.randint(0, 8))))
            messages.append(assistant(text(rng.randint(0, 10)), as_string=rng.random() < 0.3))
        if i % 7 == 0:
            messages.pop()  # ends with a question: the last answer is missing
        conversations.append(messages)
    return conversations


def test_counts_equal_the_chat_template_generation_mask(counter):
    conversations = random_conversations(300)
    expected = [reference_count(counter.tokenizer, messages) for messages in conversations]
    assert counter.count(conversations) == expected
    assert sum(expected) > 1000 and 0 in expected  # the set covers long answers and answer-less records


def test_answer_tokens_and_end_of_turn_count_prompt_and_images_do_not(counter):
    tokenizer = counter.tokenizer
    answer = "The liver shows a small nodule."
    answer_tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    plain = [user("What does the scan show?"), assistant(answer)]
    with_images = [user(None, None, "What does the scan show? Describe it at length, please."), assistant(answer)]
    assert counter.count([plain, with_images]) == [answer_tokens + 1, answer_tokens + 1]  # + <|im_end|>
    two_turns = plain + [user("And?"), assistant(answer)]
    assert counter.count([two_turns]) == [2 * (answer_tokens + 1)]


def test_identical_answers_are_tokenized_once(tiny_model_dir):
    counter = load_counter(str(tiny_model_dir))
    conversations = [[user(f"Question {i}?"), assistant("Yes.")] for i in range(50)]
    assert len(set(counter.count(conversations))) == 1
    assert counter.stats.tokenized_texts == 1


def test_tokens_overlapping_follows_the_mask_rule():
    offsets = [(0, 2), (2, 5), (5, 6), (5, 6), (6, 9), (9, 9), (9, 12)]
    assert tokens_overlapping(offsets, [(2, 5)]) == 1
    assert tokens_overlapping(offsets, [(3, 6)]) == 3  # a character split into two byte tokens counts both
    assert tokens_overlapping(offsets, [(1, 3), (4, 7)]) == 5  # token (2, 5) is in both spans, counted once
    assert tokens_overlapping(offsets, [(12, 14)]) == 0


def test_a_conversation_the_template_rejects_is_a_record_error(counter):
    strict = LossTokenCounter(counter.tokenizer,
                              "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                              "{% endif %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}",
                              name="strict")
    good = [{"role": "user", "content": "hi"}]
    results = strict.count_each([good, [{"role": "system", "content": "x"}], good])
    assert results[0] == results[2] > 0
    assert isinstance(results[1], RecordError) and results[1].reason == "template_error"


def test_chatml_templates_without_markers_count_the_same_spans(tiny_model_dir, tmp_path, counter):
    from aloe_cli.testing.tiny import CHAT_TEMPLATE

    unmarked = tmp_path / "qwen2vl_unmarked.jinja"
    unmarked.write_text(CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    chatml = load_counter(str(tiny_model_dir), str(unmarked))
    assert chatml.span_rule == "chatml" and counter.span_rule == "generation"
    assert chatml.fingerprint != counter.fingerprint
    # Answers that contain a literal "<|im_end|>" end early under ChatML (the tokenizer reads it as the
    # end-of-turn token), so this comparison leaves special-token look-alikes out.
    clean = [p for p in PIECES if "<|" not in p]
    conversations = random_conversations(150, seed=3, pieces=clean)
    assert chatml.count(conversations) == counter.count(conversations)


def test_templates_that_do_not_say_what_the_loss_sees_are_refused(tiny_model_dir, tmp_path):
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(AloeError, match="no {% generation %} markers and is not ChatML"):
        load_counter(str(tiny_model_dir), str(plain))
    with pytest.raises(AloeError, match="cannot read chat template"):
        load_counter(str(tiny_model_dir), str(tmp_path / "missing.jinja"))
    with pytest.raises(AloeError, match="cannot load tokenizer"):
        load_counter(str(tmp_path / "no-model"))


def test_cache_keys_separate_tokenizers_and_content_and_persist(tmp_path):
    a = [user("q"), assistant("a")]
    b = [user("q"), assistant("b")]
    assert conversation_key("ns1", a) != conversation_key("ns1", b)
    assert conversation_key("ns1", a) != conversation_key("ns2", a)
    assert conversation_key("ns1", a) == conversation_key("ns1", [dict(reversed(list(m.items()))) for m in a])
    path = tmp_path / "sub" / "cache.sqlite"
    with TokenCache(path) as cache:
        cache.put_many([(conversation_key("ns1", a), 7)])
    with TokenCache(path) as cache:
        keys = [conversation_key("ns1", a), conversation_key("ns1", b), conversation_key("ns1", a)]
        assert cache.get_many(keys) == {keys[0]: 7}
        assert (cache.hits, cache.misses) == (2, 1)


def test_fingerprint_changes_with_the_template(counter):
    other = LossTokenCounter(counter.tokenizer, counter.chat_template + " ", name="x")
    assert other.fingerprint != counter.fingerprint
    assert LossTokenCounter(counter.tokenizer, counter.chat_template, name="y",
                            template_kwargs=counter.template_kwargs).fingerprint == counter.fingerprint
