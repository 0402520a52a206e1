"""GPU benchmark: `aloe train` tokens/s and MFU on a random-weight model shaped like Qwen2-VL-2B, one GPU.

No download: a Qwen2-VL-2B-shaped config gets random bf16 weights (a
training step's speed does not depend on their values) and the tiny offline
fixture's processor (its tokenizer, with the image limit raised so a 448x448
image is 256 visual tokens, as in Qwen2-VL). Records are one image plus text,
`--seq` tokens in all. The run is the real `aloe train` path (memory-mapped
dataset, collator in worker processes, TRL's SFTTrainer, bf16, gradient
checkpointing, no DeepSpeed on one GPU); tokens/s comes from its log.jsonl,
after `--warmup` steps.

MFU = model FLOPs per second / the card's peak dense bf16 FLOPs, with model
FLOPs per step = 6 x parameters x tokens (forward + backward, matmuls) plus
the attention score and value products (12 x layers x width x sequence per
token), for the language model over every token and the vision tower over
every image patch; the recomputation of gradient checkpointing is not counted
(that would be hardware FLOPs utilisation).

    python benchmarks/train_gpu.py                            # ~4k-token records, micro batch 2, 30 steps
    python benchmarks/train_gpu.py --micro-batch 4 --steps 50 --attn-implementation flash_attention_2
    python benchmarks/train_gpu.py --device cpu --layers 1 --vision-depth 1 --hidden 128 --seq 600 \\
        --steps 3 --warmup 1 --micro-batch 1      # a CPU smoke test of the script (the figures mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Qwen2-VL-2B-Instruct's shapes (config.json of the published checkpoint).
TEXT_2B = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
           "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
           "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}}
VISION_2B = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16,
             "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
IMAGE_SIDE = 448  # (448 / 14)^2 = 1024 patches -> 256 visual tokens
# Peak dense bf16 tensor FLOPs (no sparsity), from the vendors' data sheets.
PEAK_BF16 = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.5e12,
             "H100 NVL": 835.5e12, "GH200": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "A10G": 70e12,
             "L4": 121e12}
WORDS = ("the chest film shows a small nodule in the right upper lobe with mild pleural thickening and no "
         "effusion while the heart size is normal and the bones are intact").split()


def peak_flops(card: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for name, value in PEAK_BF16.items():
        if name.lower() in card.lower():
            return value
    return None


def build_model_folder(scratch: Path, args) -> tuple[Path, dict]:
    """A random-weight Qwen2-VL-2B-shaped checkpoint with the tiny processor; returns it and its shapes."""
    import torch
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from aloe_cli.testing.tiny import build_tiny_qwen2vl

    processor = AutoProcessor.from_pretrained(build_tiny_qwen2vl(scratch / "tiny"))
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": IMAGE_SIDE * IMAGE_SIDE}
    tokenizer = processor.tokenizer
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(TEXT_2B, bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    vision = dict(VISION_2B)
    if args.layers:
        text["num_hidden_layers"] = args.layers
    if args.vision_depth:
        vision["depth"] = args.vision_depth
    if args.hidden:  # smoke tests only: a narrower model
        heads = max(2, args.hidden // 64)
        half = args.hidden // heads // 2  # M-RoPE splits half the head dimension over (t, h, w)
        sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        text.update(hidden_size=args.hidden, intermediate_size=args.hidden * 4, num_attention_heads=heads,
                    num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                            "mrope_section": sections})
        vision.update(hidden_size=args.hidden, embed_dim=128, num_heads=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device("cuda" if args.device == "cuda" else "cpu"):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    folder = scratch / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    shapes = {"text_params": sum(p.numel() for n, p in model.named_parameters() if "visual" not in n),
              "vision_params": sum(p.numel() for n, p in model.named_parameters() if "visual" in n),
              "layers": text["num_hidden_layers"], "width": text["hidden_size"], "vision_layers": vision["depth"],
              "vision_width": vision["embed_dim"]}
    del model
    return folder, shapes


def records(path: Path, tokenizer, count: int, seq: int) -> Path:
    """One 448x448 PNG + question and answer text filling `seq` tokens in all."""
    from PIL import Image

    rng = random.Random(0)
    text_tokens = max(64, seq - (IMAGE_SIDE // 28) ** 2 - 40)

    def text_of(tokens: int) -> str:
        words = [rng.choice(WORDS) for _ in range(tokens)]
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[:tokens]
        return tokenizer.decode(ids)

    images = path.parent / "images"
    images.mkdir()
    with path.open("w") as handle:
        for index in range(count):
            Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), tuple(rng.randrange(256) for _ in range(3))).save(
                images / f"{index}.png")
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text_of(text_tokens // 4)}]},
                {"role": "assistant", "content": text_of(text_tokens - text_tokens // 4)}],
                "images": [f"images/{index}.png"]}) + "\n")
    return path


def flops_per_step(shapes: dict, tokens: float, patches_per_image: int, images: float, seq: float) -> float:
    """Model FLOPs (forward + backward) of one optimizer step, the PaLM way (6N + attention), LM + vision."""
    # The tied embedding matrix counts once: as the LM head's matmul (a lookup costs no FLOPs).
    lm = tokens * (6 * shapes["text_params"] + 12 * shapes["layers"] * shapes["width"] * seq)
    vision = images * patches_per_image * (6 * shapes["vision_params"]
                                           + 12 * shapes["vision_layers"] * shapes["vision_width"] * patches_per_image)
    return lm + vision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=4096, help="tokens per record, image included")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the average")
    parser.add_argument("--workers", type=int, default=8, help="data-loader workers")
    parser.add_argument("--attn-implementation", default=None)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's peak dense bf16 TFLOPs")
    parser.add_argument("--layers", type=int, default=None, help="smoke tests: override the 28 text layers")
    parser.add_argument("--vision-depth", type=int, default=None, help="smoke tests: override the 32 vision blocks")
    parser.add_argument("--hidden", type=int, default=None, help="smoke tests: a narrower model")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (use --device cpu with a small shape for a smoke test)")
        return 1
    from aloe_cli.data.io import read_items
    from aloe_cli.training.config import TrainConfig, resolve
    from aloe_cli.training.trainer import run_training

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        folder, shapes = build_model_folder(scratch, args)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        (scratch / "data").mkdir()
        data = records(scratch / "data" / "records.jsonl", tokenizer, args.micro_batch * (args.steps + 1), args.seq)
        config = TrainConfig(
            input=[str(data)], model=str(folder), output_dir=str(scratch / "run"),
            global_batch_size=args.micro_batch, micro_batch_size=args.micro_batch, max_steps=args.steps,
            learning_rate=1e-5, lr_scheduler="constant", warmup_ratio=0.0, max_length=args.seq + 64,
            dtype="bfloat16" if args.device == "cuda" else "float32", gradient_checkpointing=True, deepspeed="none",
            dataloader_workers=args.workers if args.device == "cuda" else 0, logging_steps=1,
            save_steps=10 * args.steps, attn_implementation=args.attn_implementation)
        config.validate()
        os.environ.pop("WORLD_SIZE", None)
        result = run_training(resolve(config, 1), lambda: read_items(config.input), paths=config.input)
        log = [json.loads(line) for line in (scratch / "run" / "log.jsonl").read_text().splitlines()]
        timed = [line for line in log if "tokens_per_s" in line and line["step"] > args.warmup]
        if not timed:
            raise SystemExit("no timed steps: raise --steps above --warmup")
        tokens_per_s = sum(line["tokens_per_s"] for line in timed) / len(timed)
        tokens_per_step = max(line.get("num_tokens", 0) for line in log) / max(result.global_step, 1)
    seq = tokens_per_step / args.micro_batch
    patches = (IMAGE_SIDE // 14) ** 2
    step_flops = flops_per_step(shapes, tokens_per_step, patches, args.micro_batch, seq)
    achieved = step_flops * tokens_per_s / tokens_per_step
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    peak = peak_flops(card, args.peak_tflops)
    total = (shapes["text_params"] + shapes["vision_params"]) / 1e9
    shape = "random Qwen2-VL-2B shape" + (" (overridden)" if args.layers or args.vision_depth or args.hidden else "")
    print(f"card: {card}; torch {torch.__version__}; model: {shape}, {total:.2f} B parameters "
          f"({shapes['vision_params'] / 1e9:.2f} B vision), {config.dtype}, gradient checkpointing, micro batch "
          f"{args.micro_batch}, ~{seq:.0f} tokens per sample ({(IMAGE_SIDE // 28) ** 2} visual)")
    print(f"tokens/s: {tokens_per_s:,.0f} (mean of steps {args.warmup + 1}-{args.steps}); "
          f"model FLOPs/s: {achieved / 1e12:.1f} TFLOPs")
    if peak:
        print(f"MFU: {achieved / peak * 100:.1f}% of {peak / 1e12:.0f} TFLOPs peak dense bf16 (goal >= 35%)")
    else:
        print("MFU: unknown card; pass --peak-tflops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
