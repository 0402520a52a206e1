"""Build a tiny, random-weight Qwen2-VL checkpoint entirely offline.

This is a *test fixture*: the weights are random, so the model says nothing
meaningful. It exists so that the model-backed code paths (processor, chat
template, forward pass, generation, TRL SFT) can be exercised on a CPU in a few
seconds without reaching a model hub. Nothing in aloe should ever fall back to
it silently.

Its chat template is `template="marked"` (default): Qwen2-VL's, with
`{% generation %}` markers of its own, or `template="released"`: the text
Qwen2-VL checkpoints ship, without markers (what training replaces with the
family's training template).

Usage::

    python -m aloe_cli.modeling.tiny OUT_DIR [--seed N] [--template marked|released]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

__all__ = [
    "CHAT_TEMPLATE",
    "MAX_PIXELS",
    "MERGE_SIZE",
    "MIN_PIXELS",
    "PATCH_SIZE",
    "SPECIAL_TOKENS",
    "TEMPLATES",
    "build_tiny_qwen2vl",
    "chat_template_text",
    "main",
]

# Qwen2-VL's special tokens, in the same order as the real checkpoint so that
# they get consecutive ids right after the ordinary vocabulary (as in Qwen2-VL).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Small pixel budget: with patch 14 and merge 2 one token covers 28x28 pixels,
# so an image becomes between 4 (56x56) and 16 (112x112) tokens.
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112

# Qwen2-VL's chat template, rewritten with {% generation %} markers around each
# assistant turn's content and the "<|im_end|>\n" that closes it: the span
# training templates of the family mark (the model learns to stop), written
# here independently of aloe's own training template so that "the model's own
# template with markers" is a distinct case in the tests.
# The content is first rendered into a variable because a {% generation %}
# block cannot be opened and closed in two separate {% if %} blocks. The
# newline is written as {{ '\n' }} because transformers renders templates with
# trim_blocks=True, which would eat a literal newline after a block tag.
TEMPLATES = ("marked", "released")
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% set content %}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endset %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ content }}<|im_end|>{{ '\\n' }}{% endgeneration %}"
    "{% else %}"
    "{{ content }}<|im_end|>{{ '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Plain English words for the tokenizer corpus (see _corpus).
_ENGLISH_WORDS = (
    "about above across after again against almost along already also always among another answer "
    "around asked away back because become before began behind being below between both bring build "
    "called came carry cause certain change children city close cold common complete could country "
    "course cover current dark deep different direction distance during early earth enough even every "
    "example family father field figure final follow food force form found friend front full general "
    "given going good great green ground group grow half hand happened hard head hear help high himself "
    "hold home horse hours house however hundred idea important inside island itself just keep kind "
    "knew know land language large later learn leave left less letter life light likely line list "
    "little live long look machine made main make many mark matter mean measure might mind minute "
    "money month more morning most mother mountain move much music must name near need never next "
    "night north nothing notice number often once only open order other outside over page paper part "
    "people perhaps person picture piece place plant play point position possible power present "
    "problem product pulled question quickly rather reached read ready really reason record remember "
    "report rest result right river road rock room round rule same science second seen sentence "
    "several shape short should show side simple since single size slowly small something sometimes "
    "sound south space special stand start state still stood story street strong study such sudden "
    "summer surface system table take talk teacher tell test than themselves there thing think "
    "third those though thought thousand three through together told toward travel tree true turn "
    "under understand until upon usually value very voice walk warm watch water weather week weight "
    "where whether which while white whole why wind window winter within without woman wonder word "
    "work world would write wrote year young"
)


def _corpus() -> list[str]:
    """A thousand-odd English/medical sentences, generated deterministically.

    The text only has to give BPE enough distinct words to fill a vocabulary of
    a couple of thousand entries (common words, medical terms, punctuation,
    digits, the chat template's fixed strings); what it says does not matter.
    """
    modalities = ["chest X-ray", "CT scan", "MRI", "ultrasound", "fundus photograph", "dermoscopy image",
                  "histology slide", "mammogram", "PET scan", "echocardiogram", "angiogram", "radiograph",
                  "endoscopy image", "colonoscopy frame", "OCT scan", "bone scan", "pathology slide"]
    findings = ["a small nodule", "no acute abnormality", "a pleural effusion", "cardiomegaly",
                "a fracture of the left radius", "a mass in the right lobe", "mild edema",
                "signs of pneumonia", "a well-defined lesion", "normal anatomy", "calcifications",
                "an enlarged lymph node", "diabetic retinopathy", "a melanoma", "atelectasis",
                "pneumothorax", "consolidation", "hemorrhage", "an aneurysm", "a stenosis", "hydronephrosis",
                "a cyst", "fibrosis", "emphysema", "osteoporosis", "an infarct", "a tumour", "inflammation",
                "scoliosis", "a hernia", "gallstones", "cirrhosis", "macular degeneration", "glaucoma",
                "a polyp", "an ulcer", "metastases", "a thrombus", "an abscess", "bronchiectasis"]
    regions = ["the chest", "the abdomen", "the brain", "the knee", "the liver", "the lung", "the heart",
               "the spine", "the kidney", "the retina", "the skin", "the breast", "the pancreas", "the colon",
               "the stomach", "the bladder", "the prostate", "the thyroid", "the hip", "the shoulder",
               "the pelvis", "the skull", "the aorta", "the spleen", "the femur", "the wrist", "the ankle"]
    adjectives = ["mild", "moderate", "severe", "acute", "chronic", "bilateral", "unilateral", "diffuse",
                  "focal", "benign", "malignant", "stable", "progressive", "subtle", "marked", "irregular"]
    questions = ["What does this {m} show?", "Is there any abnormality in {r}?",
                 "Describe the findings in this {m}.", "Which organ is shown in the image?",
                 "What is the most likely diagnosis?", "Is {f} visible here?",
                 "Where is the {a} lesion located?", "How would you grade the {a} changes in {r}?",
                 "Can you see {f} on this {m}?", "Compare this {m} with the previous study."]
    answers = ["The {m} shows {f}.", "There is {f} in {r}.", "The image of {r} shows {f}.",
               "Findings are consistent with {f}.", "No, there is no abnormality in {r}.",
               "Yes, {f} is visible.", "The changes in {r} are {a}.", "There is {a} involvement of {r}.",
               "Impression: {a} {f}, follow-up recommended.", "The {m} of {r} is unremarkable."]
    rng = random.Random(0)  # fixed: the tokenizer must not depend on the weight seed
    lines = [
        "You are a helpful assistant.",
        "The quick brown fox jumps over the lazy dog.",
        "Patient age 45, blood pressure 120/80 mmHg, heart rate 72 bpm, temperature 37.5 C.",
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10 25 100 2024; symbols: ( ) [ ] { } < > | / - + = % & * # @ ! ? : ;",
        "system user assistant",
    ]
    for _ in range(1200):
        m, f, r, a = rng.choice(modalities), rng.choice(findings), rng.choice(regions), rng.choice(adjectives)
        lines.append(rng.choice(questions).format(m=m, f=f, r=r, a=a))
        lines.append(rng.choice(answers).format(m=m, f=f, r=r, a=a))

    # Templated sentences reuse a few hundred words, which caps what BPE can
    # learn; medical compounds (prefix + suffix) and plain English words add
    # enough distinct material to fill ~2000 vocabulary entries.
    prefixes = ["cardio", "neuro", "gastro", "hepato", "nephro", "osteo", "dermato", "pneumo", "angio",
                "arthro", "broncho", "cerebro", "colo", "cysto", "encephalo", "hemato", "hystero", "laryngo",
                "myo", "oncho", "ophthalmo", "oto", "pancreato", "pharyngo", "procto", "pyelo", "rhino",
                "spleno", "thoraco", "thyro", "uro", "vaso", "chole", "mammo", "masto", "leuko", "lympho"]
    suffixes = ["logy", "logist", "pathy", "itis", "oma", "ectomy", "otomy", "ostomy", "scopy", "graphy",
                "gram", "megaly", "algia", "plasty", "rrhage", "genic", "lysis", "sclerosis", "spasm"]
    compounds = [p + s for p in prefixes for s in suffixes]
    rng.shuffle(compounds)
    english = _ENGLISH_WORDS.split()
    for i in range(0, len(compounds), 6):
        lines.append("The " + ", ".join(compounds[i:i + 6]) + " department reviewed the case.")
    for i in range(0, len(english), 8):
        words = english[i:i + 8]
        lines.append(" ".join(words).capitalize() + ".")
        lines.append(" ".join(w.upper() if j % 3 == 0 else w for j, w in enumerate(words)) + "!")
    return lines


def _build_tokenizer(vocab_size: int, chat_template: str):
    """Train a byte-level BPE on the corpus and wrap it as Qwen2's tokenizer class."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    # Same normaliser / pre-tokeniser pipeline as Qwen2's tokenizer, so the
    # learned merges are valid for the Qwen2Tokenizer wrapper below.
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        # Leave room for the special tokens, which are appended after training.
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        special_tokens=[],
        show_progress=False,
    )
    raw.train_from_iterator(_corpus(), trainer=trainer)

    model_json = json.loads(raw.to_str())["model"]
    vocab: dict[str, int] = dict(model_json["vocab"])
    # vocab_size is a promise to the caller (it sizes the embedding matrix).
    if len(vocab) != vocab_size - len(SPECIAL_TOKENS):
        raise RuntimeError(f"BPE learned {len(vocab)} tokens, expected {vocab_size - len(SPECIAL_TOKENS)}")
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    # Special tokens get explicit consecutive ids after the learned vocabulary,
    # so the ids are fixed and can be written into the model config.
    base = len(vocab)
    for offset, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = base + offset

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,  # byte-level BPE can encode anything; an unk would hide bugs
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=4096,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.chat_template = chat_template
    # Guard against the wrapper silently renumbering the special tokens.
    for tok in SPECIAL_TOKENS:
        if tokenizer.convert_tokens_to_ids(tok) != vocab[tok]:
            raise RuntimeError(f"special token {tok} did not keep id {vocab[tok]}")
    return tokenizer


def _build_processor(tokenizer, chat_template: str):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    common = {
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
    }
    image_processor = Qwen2VLImageProcessor(**common)
    # The processor expects a video processor too; give it the same budget.
    video_processor = Qwen2VLVideoProcessor(**common)
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


def _build_config(tokenizer):
    from transformers import Qwen2VLConfig

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    hidden_size = 64
    num_heads = 4
    head_dim = hidden_size // num_heads  # 16
    # M-RoPE splits the rotary half-dimension (head_dim / 2 = 8) between the
    # temporal, height and width position ids; the sections must sum to it.
    mrope_section = [2, 3, 3]
    assert sum(mrope_section) == head_dim // 2
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": num_heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "use_sliding_window": False,
        "tie_word_embeddings": False,
    }
    vision_config = {
        "depth": 1,
        "embed_dim": 32,
        "num_heads": 2,  # vision head_dim 16
        "mlp_ratio": 2,
        # The patch merger projects vision features straight into the LM's
        # embedding space, so this must equal the text hidden size.
        "hidden_size": hidden_size,
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def chat_template_text(template: str) -> str:
    """The tiny model's chat template: "marked" (CHAT_TEMPLATE) or "released" (Qwen2-VL's, no markers)."""
    if template == "marked":
        return CHAT_TEMPLATE
    if template == "released":
        from aloe_cli.modeling.chat_template import QWEN2_VL

        return QWEN2_VL.released_text()
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def build_tiny_qwen2vl(out_dir: str | Path, *, seed: int = 0, vocab_size: int = 1024,
                       template: str = "marked") -> Path:
    """Build a tiny random-weight Qwen2-VL model + processor into ``out_dir``.

    The result loads with ``AutoProcessor.from_pretrained(out_dir)`` and
    ``AutoModelForImageTextToText.from_pretrained(out_dir)``. The same ``seed``
    always yields the same weights; the tokenizer does not depend on ``seed``.
    ``template`` picks the chat template (see `chat_template_text`).
    Returns ``out_dir`` as a :class:`Path`.
    """
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    if not 512 <= vocab_size <= 2048:
        # Below 512 the 256 byte symbols leave almost no merges; above ~2700
        # the built-in corpus runs out of pairs to merge.
        raise ValueError(f"vocab_size must be within [512, 2048], got {vocab_size}")
    chat_template = chat_template_text(template)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(vocab_size, chat_template)
    processor = _build_processor(tokenizer, chat_template)
    config = _build_config(tokenizer)

    # fork_rng so that building a fixture does not perturb the caller's global
    # RNG stream (tests that seed torch themselves stay reproducible).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()

    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    # Stop on either end-of-turn or end-of-text, like the real instruct model.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )

    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aloe_cli.modeling.tiny",
        description="Build a tiny random-weight Qwen2-VL test fixture (offline, CPU, seconds).",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="weight-initialisation seed (default 0)")
    parser.add_argument("--template", choices=TEMPLATES, default="marked",
                        help="chat template: marked (generation markers, default) or released (Qwen2-VL's, none)")
    args = parser.parse_args(argv)

    print(f"building tiny Qwen2-VL fixture (seed={args.seed}, {args.template} template) in {args.out_dir} ...",
          file=sys.stderr)
    path = build_tiny_qwen2vl(args.out_dir, seed=args.seed, template=args.template)
    # stdout carries only the path, so scripts can capture it.
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
