"""The tiny offline Qwen2-VL fixture behaves like a real Qwen2-VL checkpoint."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from aloe_cli.modeling.tiny import (  # noqa: E402 (after the importorskip guards)
    CHAT_TEMPLATE,
    MAX_PIXELS,
    MERGE_SIZE,
    MIN_PIXELS,
    PATCH_SIZE,
    SPECIAL_TOKENS,
    build_tiny_qwen2vl,
    main,
)

pytestmark = pytest.mark.slow

ASSISTANT_1 = "The chest X-ray shows a small nodule."
ASSISTANT_2 = "No, there is no abnormality in the heart."


def _image(size=(64, 64), color=(120, 30, 200)):
    return Image.new("RGB", size, color)


def _vision_chat(image):
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "What does this show?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": ASSISTANT_1}]},
    ]


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return transformers.AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return transformers.AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()


def test_loads_with_auto_classes(processor, model):
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert model.dtype == torch.float32
    tok = processor.tokenizer
    for special in SPECIAL_TOKENS:
        # Each special token must be a single, unsplittable id.
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    assert tok.pad_token == "<|endoftext|>"
    assert tok.eos_token == "<|im_end|>"
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.text_config.vocab_size == len(tok)
    assert processor.chat_template == CHAT_TEMPLATE
    assert tok.chat_template == CHAT_TEMPLATE


def test_forward_with_image_gives_logits_and_finite_loss(processor, model):
    inputs = processor.apply_chat_template(
        _vision_chat(_image()), tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
    batch, seq_len = inputs["input_ids"].shape
    assert out.logits.shape == (batch, seq_len, model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss)
    # Random weights: the loss should sit near that of a uniform guess.
    assert abs(out.loss.item() - math.log(len(processor.tokenizer))) < 1.0


def test_assistant_mask_covers_answers_and_end_of_turn(processor):
    tok = processor.tokenizer
    messages = [
        {"role": "user", "content": "What does this chest X-ray show?"},
        {"role": "assistant", "content": ASSISTANT_1},
        {"role": "user", "content": [{"type": "text", "text": "Is the heart normal?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": ASSISTANT_2}]},
    ]
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    masked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(masked) == f"{ASSISTANT_1}<|im_end|>\n{ASSISTANT_2}<|im_end|>\n"
    # The full render is Qwen2-VL's format, default system prompt included.
    assert tok.decode(ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat does this chest X-ray show?<|im_end|>\n"
        f"<|im_start|>assistant\n{ASSISTANT_1}<|im_end|>\n"
        "<|im_start|>user\nIs the heart normal?<|im_end|>\n"
        f"<|im_start|>assistant\n{ASSISTANT_2}<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_processor_assistant_mask_survives_image_expansion(processor):
    # The processor expands <|image_pad|> after templating; the mask must follow.
    out = processor.apply_chat_template(
        _vision_chat(_image()), tokenize=True, return_dict=True, return_tensors="pt",
        return_assistant_tokens_mask=True,
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0].bool()
    assert processor.tokenizer.decode(ids[mask]) == f"{ASSISTANT_1}<|im_end|>\n"


@pytest.mark.parametrize(
    ("size", "expected_tokens"),
    [
        # 64x64 rounds to 56x56 (multiples of patch*merge = 28): 4x4 patches -> 2x2 tokens.
        ((64, 64), 4),
        # 500x500 is capped by MAX_PIXELS to 112x112: 8x8 patches -> 4x4 tokens.
        ((500, 500), 16),
        # 20x20 is raised to MIN_PIXELS, 56x56.
        ((20, 20), 4),
    ],
)
def test_image_expands_to_expected_number_of_pad_tokens(processor, size, expected_tokens):
    assert (MIN_PIXELS, MAX_PIXELS, PATCH_SIZE, MERGE_SIZE) == (56 * 56, 112 * 112, 14, 2)
    inputs = processor.apply_chat_template(
        _vision_chat(_image(size)), tokenize=True, return_dict=True, return_tensors="pt"
    )
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_pad).sum()) == expected_tokens
    grid = inputs["image_grid_thw"][0]
    assert int(grid.prod()) // MERGE_SIZE**2 == expected_tokens
    assert inputs["pixel_values"].shape[0] == int(grid.prod())


def test_greedy_generate_runs(processor, model):
    messages = _vision_chat(_image())[:1]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
    )
    prompt_len = inputs["input_ids"].shape[1]
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        first = model.generate(**inputs, **kwargs)
        second = model.generate(**inputs, **kwargs)
    assert first.shape == (1, prompt_len + 4)
    assert torch.equal(first, second)  # greedy decoding is deterministic
    assert isinstance(processor.batch_decode(first[:, prompt_len:])[0], str)


def test_trl_sft_assistant_only_loss_runs(tiny_model_dir, processor, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    # TRL warns (and the model never learns to stop) unless <|im_end|> is masked in.
    assert is_chat_template_stop_token_trained(processor)

    colors = [(200, 20, 20), (20, 200, 20), (20, 20, 200), (200, 200, 20)]
    records = [
        {
            "messages": [
                {"role": "user", "content": f"Describe finding {i}."},
                {"role": "assistant", "content": f"Finding {i} shows a small nodule."},
            ],
            "images": [_image((64 + 8 * i, 64), c)],
        }
        for i, c in enumerate(colors)
    ]
    dataset = datasets.Dataset.from_list(records)

    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        assistant_only_loss=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)

    # The collator's labels keep exactly the assistant answer + "<|im_end|>\n".
    batch = trainer.data_collator([dict(dataset[0]), dict(dataset[1])])
    for row, labels in enumerate(batch["labels"]):
        kept = labels[labels != -100]
        assert processor.tokenizer.decode(kept) == f"Finding {row} shows a small nodule.<|im_end|>\n"

    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    result = trainer.train()
    assert result.global_step == 3
    assert math.isfinite(result.training_loss)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # Training actually updated the weights (both the language model and the vision tower).
    changed = {k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert any("visual" in k for k in changed)
    assert any("language_model" in k for k in changed)


def test_the_released_template_variant_is_qwen2_vl_s_own_without_markers(tiny_released_model_dir):
    from aloe_cli.modeling.chat_template import has_generation_markers

    released = transformers.AutoProcessor.from_pretrained(tiny_released_model_dir)
    assert released.chat_template == released.tokenizer.chat_template != CHAT_TEMPLATE
    assert not has_generation_markers(released.chat_template)
    trl_templates = pytest.importorskip("trl.chat_template_utils")
    # TRL knows it by its text as Qwen2-VL's released template, and swaps in its training template for it.
    assert trl_templates.get_training_chat_template(released) == trl_templates.qwen2_5_vl_training_chat_template
    with pytest.raises(ValueError, match="template"):
        build_tiny_qwen2vl(tiny_released_model_dir.parent / "bad", template="other")


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_same_seed_builds_identical_weights(tiny_model_dir, tmp_path):
    again = build_tiny_qwen2vl(tmp_path / "again", seed=0)
    a, b = _weights(tiny_model_dir), _weights(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in a.values())
    assert (tiny_model_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()

    other = _weights(build_tiny_qwen2vl(tmp_path / "other", seed=1))
    assert any(not torch.equal(a[k], other[k]) for k in a)


def test_build_leaves_global_rng_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_qwen2vl(tmp_path / "rng", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_cli_prints_path_on_stdout(tmp_path, capsys):
    out_dir = tmp_path / "cli"
    assert main([str(out_dir), "--seed", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out_dir)
    assert "building" in captured.err
    assert (out_dir / "config.json").is_file()
    assert (out_dir / "model.safetensors").is_file()
