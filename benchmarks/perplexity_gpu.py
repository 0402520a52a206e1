"""GPU benchmark: `aloe perplexity` tokens/s on a random-weight model shaped like Qwen2-VL-2B.

No download: the model is built from a Qwen2-VL-2B-shaped config with random
bf16 weights directly on the GPU (the throughput of a forward pass does not
depend on the weight values), and the processor is the tiny offline fixture's
(its tokenizer, with the image pixel limit raised so a 448x448 image becomes
256 visual tokens, as in Qwen2-VL). Each record is one image plus text,
about `--tokens` tokens in all; records are scored through the real
`PerplexityStage` (chat template, processor, length-sorted batches, answer-only
NLL). Needs only torch, transformers and this package.

    python benchmarks/perplexity_gpu.py                           # bf16, batch 16, ~1k-token records
    python benchmarks/perplexity_gpu.py --records 512 --attn-implementation flash_attention_2
    python benchmarks/perplexity_gpu.py --device cpu --dtype float32 --layers 1 --vision-depth 1 \\
        --records 4 --batch-size 2 --tokens 300                  # a quick CPU smoke test of the script

Prints the card, the model size, and tokens/s (all input tokens, and the
scored answer tokens) for batch `--batch-size`, plus batch 1 on a subset as
a reference measured in the same run.
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import sys
import tempfile
import time
from pathlib import Path

# Qwen2-VL-2B-Instruct's shapes (config.json of the published checkpoint).
TEXT_2B = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
           "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
           "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}}
VISION_2B = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16,
             "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
IMAGE_SIDE = 448  # -> (448 / 28)^2 = 256 visual tokens
WORDS = ("the chest film shows a small nodule in the right upper lobe with mild pleural thickening and no "
         "effusion while the heart size is normal and the bones are intact").split()


def processor_with_real_pixel_limits(scratch: Path):
    from transformers import AutoProcessor

    from aloe_cli.modeling.tiny import build_tiny_qwen2vl

    processor = AutoProcessor.from_pretrained(build_tiny_qwen2vl(scratch / "tiny"))
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": IMAGE_SIDE * IMAGE_SIDE}
    return processor


def random_model(processor, args):
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from aloe_cli.modeling.loading import resolve_attn_implementation, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    attn = resolve_attn_implementation(args.attn_implementation, device, dtype)
    tokenizer = processor.tokenizer
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = {**TEXT_2B, "num_hidden_layers": args.layers or TEXT_2B["num_hidden_layers"],
            "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {**VISION_2B, "depth": args.vision_depth or VISION_2B["depth"]}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval(), device, dtype, attn


def synthetic_records(tokenizer, count: int, target_tokens: int, seed: int = 0) -> list[dict]:
    """One 448x448 image + a question and an answer whose text fills the rest of `target_tokens`."""
    from PIL import Image

    rng = random.Random(seed)
    text_tokens = max(32, target_tokens - (IMAGE_SIDE // 28) ** 2 - 40)  # 40: the template's own tokens
    records = []
    for index in range(count):
        image = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), tuple(rng.randrange(256) for _ in range(3)))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        question = _text_of_tokens(tokenizer, rng, text_tokens // 3)
        answer = _text_of_tokens(tokenizer, rng, text_tokens - text_tokens // 3)
        user = [{"type": "image"}, {"type": "text", "text": question}]
        records.append({"id": str(index), "source": "bench",
                        "images": ["data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()],
                        "messages": [{"role": "user", "content": user},
                                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
    return records


def _text_of_tokens(tokenizer, rng: random.Random, tokens: int) -> str:
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < tokens:
        words.extend(rng.choice(WORDS) for _ in range(16))
    ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[:tokens]
    return tokenizer.decode(ids)


def measure(loaded, records: list[dict], batch_size: int, lengths: dict[str, int]) -> dict:
    """Seconds, answer tokens and peak memory for scoring `records`; input tokens from `lengths`."""
    import copy

    import torch

    from aloe_cli.data.io import Item
    from aloe_cli.filters.perplexity import PerplexityConfig, PerplexityStage

    stage = PerplexityStage(lambda: loaded, PerplexityConfig(batch_size=batch_size), model_name="random-2b")
    items = [Item(copy.deepcopy(record), record["id"], "bench") for record in records]
    window = stage.runner_batch_size()
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for begin in range(0, len(items), window):
        stage.annotate(items[begin:begin + window])
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    failed = [item for item in items if item.error is not None]
    if failed:
        raise SystemExit(f"{len(failed)} record(s) failed, first: {failed[0].error}")
    peak = torch.cuda.max_memory_allocated() / 2**30 if loaded.device.type == "cuda" else None
    return {"seconds": elapsed, "records": len(items), "input_tokens": sum(lengths[r["id"]] for r in records),
            "answer_tokens": stage.counters.tokens, "peak_gib": peak}


def count_input_tokens(loaded, records: list[dict]) -> dict[str, int]:
    """Sequence length of every record (image tokens included), from the same encoder the stage uses."""
    from aloe_cli.filters.perplexity import ConversationEncoder

    encoder = ConversationEncoder(loaded.processor)
    conversations = [encoder.conversation(record, None) for record in records]
    return {record["id"]: encoded.length for record, encoded in zip(records, encoder.encode_many(conversations))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1024, help="approximate tokens per record, image included")
    parser.add_argument("--baseline-records", type=int, default=32, help="records for the batch-1 reference")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attn-implementation", default=None)
    parser.add_argument("--layers", type=int, default=None, help="override the 28 text layers (smoke tests)")
    parser.add_argument("--vision-depth", type=int, default=None, help="override the 32 vision blocks")
    args = parser.parse_args(argv)

    import torch

    from aloe_cli.modeling.loading import LoadedModel, ModelSpec

    with tempfile.TemporaryDirectory() as scratch:
        processor = processor_with_real_pixel_limits(Path(scratch))
    model, device, dtype, attn = random_model(processor, args)
    loaded = LoadedModel(ModelSpec("random Qwen2-VL-2B shape", device=args.device, dtype=args.dtype), model,
                         processor, device, dtype, attn)
    records = synthetic_records(processor.tokenizer, args.records, args.tokens)
    lengths = count_input_tokens(loaded, records)

    measure(loaded, records[:args.batch_size], args.batch_size, lengths)  # warm-up: kernels, allocator
    batched = measure(loaded, records, args.batch_size, lengths)
    single = measure(loaded, records[:args.baseline_records], 1, lengths)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"card: {card}; torch {torch.__version__}; model: random Qwen2-VL-2B shape, {params:.2f} B parameters, "
          f"{str(dtype).replace('torch.', '')}, {attn}")
    print(f"records: {len(records)} x ~{sum(lengths.values()) / len(lengths):.0f} tokens "
          f"({(IMAGE_SIDE // 28) ** 2} visual)")
    for label, result in ((f"batch {args.batch_size}", batched), ("batch 1", single)):
        print(f"{label:>9}: {result['input_tokens'] / result['seconds']:10.0f} tokens/s, "
              f"{result['answer_tokens'] / result['seconds']:9.0f} answer tokens/s, "
              f"{result['records'] / result['seconds']:7.1f} records/s"
              + (f", peak {result['peak_gib']:.1f} GiB" if result["peak_gib"] is not None else ""))
    ratio = (batched["input_tokens"] / batched["seconds"]) / (single["input_tokens"] / single["seconds"])
    print(f"batch {args.batch_size} vs batch 1: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
