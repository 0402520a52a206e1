"""Loss-token counting equals the training chat template's generation mask; the cache remembers counts.

The counter reads tokenizer.json with `tokenizers` and renders the template
with jinja2 itself; every count here is checked against transformers'
`apply_chat_template(..., return_assistant_tokens_mask=True)` on the tiny
offline model, with its own marked template or, for the released-style
checkpoint without markers, with aloe's Qwen2-VL training template
(transformers is imported by the tests only). tests/test_loss_agreement.py
holds the same counts equal to the labels TRL trains on.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest

from aloe_cli.errors import AloeError, RecordError
from aloe_cli.modeling.chat_template import QWEN2_VL, training_chat_template
from aloe_cli.modeling.loss_tokens import LossTokenCounter, load_counter, tokens_overlapping
from aloe_cli.modeling.token_cache import TokenCache, conversation_key
from oracles import reference_count
from support import aloe, chat, read_jsonl, scan, write_jsonl


@pytest.fixture(scope="module")
def counter(tiny_model_dir):
    return load_counter(str(tiny_model_dir))


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    """The reference: transformers' fast tokenizer of the same checkpoint."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def released_counter(tiny_released_model_dir):
    return load_counter(str(tiny_released_model_dir))


@pytest.fixture(scope="module")
def hf_released(tiny_released_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_released_model_dir))


def reference_counts(hf_tokenizer, conversations, chat_template=None):
    return [reference_count(hf_tokenizer, messages, chat_template) for messages in conversations]


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


def test_counts_equal_the_chat_template_generation_mask(counter, hf_tokenizer):
    conversations = random_conversations(300)
    expected = reference_counts(hf_tokenizer, conversations)
    assert counter.count(conversations) == expected
    assert sum(expected) > 1000 and 0 in expected  # the set covers long answers and answer-less records


def test_rendered_text_equals_transformers(counter, hf_tokenizer):
    conversations = random_conversations(60, seed=1) + [CASES[name] for name in sorted(CASES)]
    texts, _ = counter.render(conversations)
    assert texts == [hf_tokenizer.apply_chat_template(messages, tokenize=False) for messages in conversations]


def system(text):
    return {"role": "system", "content": text}


CASES = {
    "multi_turn": [user("What is shown?"), assistant("A chest X-ray."), user("Any effusion?"),
                   assistant("No.", as_string=True), user("And the heart?"), assistant("Cardiomegaly.")],
    "system_message": [system("You are a careful radiologist."), user("Which organ?"), assistant("The liver.")],
    "system_with_parts": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                          user("Organ?"), assistant("Liver.")],
    "images": [user(None, None, "Compare the two scans."), assistant("The second shows a new nodule."),
               user(None, "And this one?"), assistant("Unchanged.")],
    "image_only_question": [user(None), assistant("A CT of the abdomen.")],
    "other_placeholders": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                                        {"type": "video"}, {"type": "text", "text": "What moves?"}]},
                           assistant("The heart.")],
    "unicode": [user("肝脏有病变吗？ Ist die Leber auffällig?"),
                assistant("是的，肝右叶见一低密度灶 🙂 — Läsion, ½ cm, café, e\u0301, عربى, 👩‍⚕️, 𝔸.")],
    "line_breaks": [user("Line one\r\nline two\n\n"), assistant("\n  Indented\tanswer\n\n")],
    "special_look_alikes": [user("<|im_start|>assistant\nfake"),
                            assistant("<|object_ref_start|>lesion<|object_ref_end|><|box_start|>(10,20),(30,40)"
                                      "<|box_end|> and <|im_end|> inside")],
    "empty_answer": [user("Say nothing."), assistant("")],
    "ends_with_a_question": [user("Q1?"), assistant("A1."), user("Q2?")],
    "reasoning_field": [user("Why?"), {"role": "assistant", "content": "Because.", "reasoning": "Think first."}],
    "none_values": [user("Q?"), {"role": "assistant", "content": "A.", "tool_calls": None}],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_named_cases_equal_transformers(counter, hf_tokenizer, name):
    messages = CASES[name]
    assert counter.count([messages]) == reference_counts(hf_tokenizer, [messages])


def test_answer_tokens_and_end_of_turn_count_prompt_and_images_do_not(counter):
    tokenizer = counter.tokenizer
    answer = "The liver shows a small nodule."
    answer_tokens = len(tokenizer.encode(answer, add_special_tokens=False).ids)
    plain = [user("What does the scan show?"), assistant(answer)]
    with_images = [user(None, None, "What does the scan show? Describe it at length, please."), assistant(answer)]
    # + <|im_end|> and the newline after it: the answer's whole generation block
    assert counter.count([plain, with_images]) == [answer_tokens + 2, answer_tokens + 2]
    two_turns = plain + [user("And?"), assistant(answer)]
    assert counter.count([two_turns]) == [2 * (answer_tokens + 2)]


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


def test_a_released_template_without_markers_counts_with_the_family_training_template(
        released_counter, counter, hf_released):
    assert released_counter.chat_template == QWEN2_VL.training_text()
    assert released_counter.fingerprint != counter.fingerprint
    conversations = random_conversations(200, seed=3) + [CASES[name] for name in sorted(CASES)]
    expected = reference_counts(hf_released, conversations, QWEN2_VL.training_text())
    assert released_counter.count(conversations) == expected and sum(expected) > 1000
    # The tiny model's own markers span the same tokens (content + "<|im_end|>\n"), special look-alikes included.
    assert counter.count(conversations) == expected


def test_the_training_template_writes_the_released_text(hf_released):
    conversations = random_conversations(80, seed=8) + [CASES[name] for name in sorted(CASES)]
    training = QWEN2_VL.training_text()
    for options in ({}, {"add_vision_id": True}, {"add_generation_prompt": True}):
        released = [hf_released.apply_chat_template(m, tokenize=False, **options) for m in conversations]
        assert released == [hf_released.apply_chat_template(m, tokenize=False, chat_template=training, **options)
                            for m in conversations]


def test_the_training_template_is_the_own_one_when_it_has_markers_else_the_family_one(tiny_model_dir):
    from aloe_cli.modeling.tiny import CHAT_TEMPLATE

    assert training_chat_template(CHAT_TEMPLATE) == CHAT_TEMPLATE
    assert training_chat_template(QWEN2_VL.released_text() + "\n") == QWEN2_VL.training_text()
    customised = QWEN2_VL.released_text().replace("You are a helpful assistant.", "You are a radiologist.")
    with pytest.raises(AloeError, match="has no {% generation %} markers and is not a released template"):
        training_chat_template(customised)


# A template written against the rest of transformers' environment: tojson, namespace, loop controls,
# raise_exception, special-token variables, a generation block that ends after the end-of-turn token.
FEATURE_TEMPLATE = (
    "{% set ns = namespace(turns=0) %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'system' %}{% continue %}{% endif %}"
    "{% set ns.turns = ns.turns + 1 %}"
    "<|im_start|>{{ message['role'] }} {{ ns.turns }}\n"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') %}{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ text | trim }}{% if message.get('meta') %} {{ message['meta'] | tojson }}{% endif %}"
    "{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}\n"
    "{% if ns.turns >= 6 %}{% break %}{% endif %}"
    "{% endfor %}"
)


def test_a_template_using_the_rest_of_the_environment_counts_like_transformers(tiny_model_dir, hf_tokenizer):
    counter = load_counter(str(tiny_model_dir), FEATURE_TEMPLATE)
    conversations = random_conversations(120, seed=4)
    conversations.append([user("q"), {"role": "assistant", "content": "a", "meta": {"lang": "fr", "é": [1, "<b>"]}}])
    expected = reference_counts(hf_tokenizer, conversations, FEATURE_TEMPLATE)
    assert counter.count(conversations) == expected and sum(expected) > 500
    texts, _ = counter.render(conversations[-1:])
    assert texts == [hf_tokenizer.apply_chat_template(conversations[-1], chat_template=FEATURE_TEMPLATE,
                                                      tokenize=False)]
    [error] = counter.count_each([[{"role": "tool", "content": "x"}]])
    assert isinstance(error, RecordError) and "unknown role tool" in error.message


def test_templates_cannot_escape_the_sandbox(tiny_model_dir):
    escape = "{{ messages.__class__.__mro__ }}{% generation %}x{% endgeneration %}"
    [error] = load_counter(str(tiny_model_dir), escape).count_each([[user("q")]])
    assert isinstance(error, RecordError) and error.reason == "template_error"
    with pytest.raises(AloeError, match="does not compile"):
        load_counter(str(tiny_model_dir), "{% generation %}{{ x }")


# ----------------------------------------------------------------------------- what is read from a checkpoint

def checkpoint_variant(tiny_model_dir, folder, edit_config=None, template_in="chat_template.jinja"):
    """A copy of the tiny tokenizer files with the chat template stored in `template_in`."""
    folder.mkdir()
    shutil.copy(tiny_model_dir / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    template = (tiny_model_dir / "chat_template.jinja").read_text()
    if template_in == "chat_template.jinja":
        (folder / "chat_template.jinja").write_text(template)
    elif template_in == "tokenizer_config.json":
        config["chat_template"] = template
    elif template_in == "chat_template.json":
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (edit_config or (lambda config: None))(config)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_the_tiny_checkpoint_keeps_its_template_in_chat_template_jinja(tiny_model_dir):
    assert (tiny_model_dir / "chat_template.jinja").is_file() and (tiny_model_dir / "tokenizer.json").is_file()
    assert "chat_template" not in json.loads((tiny_model_dir / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("template_in", ["tokenizer_config.json", "chat_template.json"])
def test_the_template_is_found_where_the_checkpoint_keeps_it(tiny_model_dir, tmp_path, counter, template_in):
    folder = checkpoint_variant(tiny_model_dir, tmp_path / "variant", template_in=template_in)
    other = load_counter(str(folder))
    assert other.chat_template == counter.chat_template
    conversations = random_conversations(40, seed=6)
    assert other.count(conversations) == counter.count(conversations)


def test_the_jinja_file_wins_over_the_config_template(tiny_model_dir, tmp_path, counter):
    def stale(config):
        config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    folder = checkpoint_variant(tiny_model_dir, tmp_path / "variant", stale)
    assert load_counter(str(folder)).chat_template == counter.chat_template


def add_tokens_and_named_specials(config):
    config["added_tokens_decoder"] = {
        "1030": {"content": "lesion", "lstrip": False, "rstrip": False, "normalized": True, "single_word": False,
                 "special": False},
        "1031": {"content": "<think>", "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                 "special": False}}
    config["bos_token"] = {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "rstrip": False,
                           "normalized": False, "single_word": False, "special": True}
    config["image_token"] = "<|image_pad|>"
    config["extra_special_tokens"] = config["extra_special_tokens"] + ["<tag>"]


def split_special_tokens(config):
    config["split_special_tokens"] = True


@pytest.mark.parametrize("edit", [add_tokens_and_named_specials, split_special_tokens])
def test_added_and_special_tokens_of_the_config_are_handled_like_transformers(tiny_model_dir, tmp_path, edit):
    from transformers import AutoTokenizer

    folder = checkpoint_variant(tiny_model_dir, tmp_path / "variant", edit)
    counter, reference = load_counter(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    assert counter.template_kwargs == reference.special_tokens_map
    pieces = PIECES + ["lesion", " lesions", "<think>", "<tag>", "<|endoftext|>"]
    conversations = random_conversations(200, seed=7, pieces=pieces)
    conversations.append([user("q"), assistant("<think>lesion<tag>Yes<|im_end|>")])
    assert counter.count(conversations) == reference_counts(reference, conversations)


def test_templates_that_do_not_say_what_the_loss_sees_are_refused(tiny_model_dir, tmp_path, counter):
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(AloeError, match="no {% generation %} markers and is not a released template"):
        load_counter(str(tiny_model_dir), str(plain))
    # ChatML alone is not enough: only a released template's family says which training template applies.
    chatml = tmp_path / "chatml.jinja"
    chatml.write_text(QWEN2_VL.released_text().replace("helpful", "careful"))
    with pytest.raises(AloeError, match="chatml.jinja' has no {% generation %} markers"):
        load_counter(str(tiny_model_dir), str(chatml))
    with pytest.raises(AloeError, match="inside {% generation %} blocks"):
        LossTokenCounter(counter.tokenizer, QWEN2_VL.released_text(), name="unmarked")
    with pytest.raises(AloeError, match="chat template not found"):
        load_counter(str(tiny_model_dir), str(tmp_path / "missing.jinja"))
    with pytest.raises(AloeError, match="cannot load tokenizer"):
        load_counter(str(tmp_path / "no-model"))
    (tmp_path / "slow-only").mkdir()
    with pytest.raises(AloeError, match="has no tokenizer.json"):
        load_counter(str(tmp_path / "slow-only"))
    template_less = checkpoint_variant(tiny_model_dir, tmp_path / "template-less", template_in=None)
    with pytest.raises(AloeError, match="has no chat template"):
        load_counter(str(template_less))


def fake_hub_cache(cache, repo_id, folder, files):
    """The layout huggingface_hub's cache has after downloading `files` of `repo_id` at one commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:
        shutil.copy(folder / name, snapshot / name)


def test_a_hub_id_is_read_from_the_hugging_face_cache_offline(tiny_model_dir, tmp_path):
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "acme/tiny-vl", tiny_model_dir, ["tokenizer.json", "tokenizer_config.json",
                                                           "chat_template.jinja"])
    data = write_jsonl(tmp_path / "a.jsonl", [chat("Which organ?", "The liver.", domain="medical")])
    args = ["mix", "-i", str(data), "--share", "medical/text=1", "--no-cache", "--dry-run", "--report",
            str(tmp_path / "r.json"), "--tokenizer"]
    # A cached snapshot is read without asking the Hub (the tests have no network, and need no HF_HUB_OFFLINE).
    proc = aloe(*args, "acme/tiny-vl", env={"HF_HUB_CACHE": str(cache)}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    from_hub = json.loads((tmp_path / "r.json").read_text())
    assert from_hub["read"] == 1 and from_hub["cells"]["medical/text"]["tokens_available"] > 0
    proc = aloe(*args, str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    assert from_hub["cells"] == json.loads((tmp_path / "r.json").read_text())["cells"]
    proc = aloe(*args, "acme/not-downloaded", env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aloe: error: cannot load tokenizer 'acme/not-downloaded'"), \
        proc.stderr


def test_mix_counts_without_importing_torch_or_transformers(tiny_released_model_dir, released_counter, tmp_path):
    """The real `aloe mix` counting path, on the checkpoint that needs the shipped training template."""
    records = [chat("Which organ?", "Liver.", id="a", domain="medical"),
               chat("Describe the scan.", "A small nodule in the right lobe.", ["scan.png"], id="b",
                    domain="medical")]
    data = write_jsonl(tmp_path / "in.jsonl", records)
    scan(0).save(tmp_path / "scan.png")  # mix checks the image's header (with Pillow: no torch either)
    output = tmp_path / "out.jsonl"
    proc = aloe("mix", "-i", str(data), "--tokenizer", str(tiny_released_model_dir), "--share",
                "medical/multimodal=0.5", "--share", "medical/text=0.5", "--no-cache", "-o", str(output),
                env={"PYTHONPROFILEIMPORTTIME": "1"})  # python lists every module it imports on stderr
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "tokenizers" in imported and "jinja2" in imported  # the counting path ran...
    assert not imported & {"torch", "transformers"}  # ...without torch or transformers
    written = {record["id"]: record["aloe"]["mix"]["loss_tokens"] for record in read_jsonl(output)}
    assert [written[r["id"]] for r in records] == released_counter.count([r["messages"] for r in records])


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
