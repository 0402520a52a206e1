"""VLMEvalKit's exact-matching path, re-implemented: the numbers that sit beside published baselines.

Every rule here follows VLMEvalKit at one pinned commit, `VLMEVALKIT_COMMIT` (the only place it is written
in code); each function names the VLMEvalKit function it follows. The path, for a model of the Qwen2-VL
family evaluated with `judge exact_matching` (no LLM answer matching):

- Reading: the benchmark TSV is read with pandas (`vlmeval.smp.file.load`: `pd.read_csv(sep='\\t')`), so
  NA-like strings (`None`, `NA`, `N/A`, `null`, `nan`, empty, ...) are missing, whitespace is kept, and a
  column's type is inferred as a whole (an integer option column with one missing cell prints `3.0`).
  Predictions go through VLMEvalKit's prediction file (xlsx), so an NA-like answer is read back as `nan`.
- Prompt: `Qwen2VLPromptMixin.build_prompt` where `Qwen2VLPromptMixin.use_custom_prompt` says so for the
  dataset name, else the dataset class's own `build_prompt` (a name VLMEvalKit does not know is a custom
  dataset: multiple choice when it has options, else the bare question).
- Extraction: `can_infer` (multiple choice) and `YOrN_Extraction` (yes/no), quirks included.
- Metric: the mean of hits, per split, category and l2-category (`report_acc`; yes/no `default_rating`);
  MMMU's questions without options are scored as a choice between their answer and 'Other Answers'.
"""

from __future__ import annotations

import re
import string
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

VLMEVALKIT_COMMIT = "e8e78f05f3080fe28154f2130321f17951c3be94"
VLMEVALKIT_REPOSITORY = "https://github.com/open-compass/VLMEvalKit"

# pandas' default NA strings (pandas._libs.parsers.STR_NA_VALUES; a test holds this equal to pandas'):
# read_csv and read_excel turn a cell that is exactly one of these into NaN.
NA_STRINGS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})
OPTION_COLUMNS = tuple("ABCDEFGHIJ")
TEXT_COLUMNS = ("index", "question", "hint", *OPTION_COLUMNS, "answer", "category", "l2-category", "split")

# Dataset name -> VLMEvalKit's DATASET_TYPE, for the names whose prompt aloe reproduces (from the classes'
# supported_datasets at the pinned commit). Any other name is a custom dataset to VLMEvalKit.
DATASET_TYPES = {
    **dict.fromkeys(("MMMU_DEV_VAL", "MMMU_TEST", "GMAI-MMBench_VAL", "GMAI-MMBench_TEST", "PathMMU_VAL",
                     "PathMMU_TEST", "OmniMedVQA", "MedXpertQA_MM_test", "MMBench_DEV_EN", "MMBench_TEST_EN",
                     "MMBench_DEV_EN_V11", "MMBench_TEST_EN_V11", "MMStar", "AI2D_TEST", "ScienceQA_VAL",
                     "ScienceQA_TEST", "SEEDBench_IMG"), "MCQ"),
    **dict.fromkeys(("MME", "HallusionBench", "POPE", "AMBER"), "Y/N"),
    **dict.fromkeys(("OCRVQA_TEST", "OCRVQA_TESTCORE", "TextVQA_VAL", "DocVQA_VAL", "DocVQA_TEST", "InfoVQA_VAL",
                     "InfoVQA_TEST", "ChartQA_TEST", "GQA_TestDev_Balanced"), "VQA"),
}
MMMU_NAMES = frozenset({"MMMU_DEV_VAL", "MMMU_TEST"})
# Qwen2VLPromptMixin.use_custom_prompt: the yes/no sets it prompts itself (MME keeps its own prompt), and
# the VQA sets it leaves to the dataset.
MIXIN_YORN = frozenset({"HallusionBench", "POPE"})
MIXIN_VQA_EXCLUDED = frozenset({"MMVet", "ChartQAPro", "ChartQAPro_CoT", "ChartQAPro_PoT", "ChartMuseum"})

MCQ_PROMPT = "Please select the correct answer from the options above."  # also the mixin's English one
MCQ_PROMPT_ZH = "请直接回答选项字母。"
YORN_PROMPT = " Please answer yes or no."
VQA_PROMPT = "\nPlease try to answer the question with short words or phrases if possible."
VQA_DATASET_PROMPT = "\nAnswer the question using a single word or phrase."
AMBER_PROMPT = "\nPlease answer yes or no."
_CJK = re.compile("[\u4e00-\u9fff]")


@dataclass(frozen=True)
class VlmFields:
    """An item's fields as VLMEvalKit holds them: each value as it prints (None: missing)."""

    question: str | None
    hint: str | None
    options: dict[str, str]  # letter -> text, missing options left out
    answer: str | None


def cell_text(value) -> str | None:
    """A value pandas read, as VLMEvalKit prints it in an f-string (None when pandas holds it as missing)."""
    if value is None:
        return None
    try:
        if value != value:  # NaN
            return None
    except (TypeError, ValueError):
        pass
    return f"{value}"


def na_cell(text: str | None) -> str | None:
    """One text cell read on its own with pandas' NA rule (for JSONL items and predictions)."""
    if text is None or text in NA_STRINGS:
        return None
    return text


def read_tsv_fields(path: str) -> list[dict[str, str | None]] | None:
    """The text columns of a VLMEvalKit TSV as pandas reads them (`vlmeval.smp.file.load`), one dict per
    row; None when pandas cannot read the file at all. pandas is imported here only."""
    try:
        import pandas as pd
    except ImportError:
        from aloe_cli.errors import AloeError
        raise AloeError("reading a TSV as VLMEvalKit does needs pandas: pip install 'aloe-cli[vlmevalkit]'") from None
    try:
        with warnings.catch_warnings():  # pandas' DtypeWarning on a large mixed column: its reading is the point
            warnings.simplefilter("ignore")
            frame = pd.read_csv(path, sep="\t", usecols=lambda column: column in TEXT_COLUMNS)
    except Exception:  # noqa: BLE001 - any parser failure means VLMEvalKit could not read it either
        return None
    columns = list(frame.columns)
    return [{column: cell_text(value) for column, value in zip(columns, row)}
            for row in frame.itertuples(index=False, name=None)]


def fields_from_row(row: Mapping[str, str | None]) -> VlmFields:
    options = {letter: row[letter] for letter in OPTION_COLUMNS if row.get(letter) is not None}
    return VlmFields(row.get("question"), row.get("hint"), options, row.get("answer"))


# ----------------------------------------------------------------------------- prompts

def dataset_type(name: str | None) -> str | None:
    """`DATASET_TYPE(name, default=None)`: the known type, VQA for a name containing 'openended', else None."""
    if not name:
        return None
    if name in DATASET_TYPES:
        return DATASET_TYPES[name]
    return "VQA" if "openended" in name.lower() else None


def uses_mixin_prompt(name: str | None) -> bool:
    """`Qwen2VLPromptMixin.use_custom_prompt`."""
    kind = dataset_type(name)
    if name in MMMU_NAMES:
        return True
    if kind == "MCQ":
        return "LEGO" not in name
    if kind == "Y/N":
        return name in MIXIN_YORN
    return kind == "VQA" and name not in MIXIN_VQA_EXCLUDED


def _mcq_body(fields: VlmFields) -> str:
    """The text `ImageMCQDataset.build_prompt` and the mixin's `_build_mcq_prompt` share, up to the options."""
    prompt = f"Hint: {fields.hint}\n" if fields.hint is not None else ""
    prompt += f"Question: {fields.question if fields.question is not None else 'nan'}\n"  # NaN prints as nan
    if fields.options:
        prompt += "Options:\n" + "".join(f"{letter}. {text}\n" for letter, text in fields.options.items())
    return prompt


def prompt(fields: VlmFields, name: str | None, kind: str) -> str:
    """The text VLMEvalKit sends a Qwen2-VL model for this item of dataset `name` (images go before it).

    `kind` (mcq, yesno, open) stands in for the dataset class VLMEvalKit picks for a custom TSV."""
    question = fields.question if fields.question is not None else "nan"
    if uses_mixin_prompt(name):
        dtype = dataset_type(name)
        if name in MMMU_NAMES or dtype == "MCQ":
            # _build_mmmu_prompt / _build_mcq_prompt; MMMU keeps the English sentence, MCQ switches on CJK
            text = _mcq_body(fields)
            if fields.options:
                chinese = name not in MMMU_NAMES and _CJK.search(text)
                text += MCQ_PROMPT_ZH if chinese else (MCQ_PROMPT + " \n" if name in MMMU_NAMES else MCQ_PROMPT)
            return text.rstrip()
        if dtype == "Y/N":  # _build_yorn_prompt
            return f"{question}{YORN_PROMPT}"
        return f"{question}{VQA_PROMPT}"  # _build_vqa_prompt
    dtype = dataset_type(name) or {"mcq": "MCQ"}.get(kind)
    if dtype == "MCQ":  # ImageMCQDataset.build_prompt (also CustomMCQDataset, CustomTextMCQDataset)
        text = _mcq_body(fields)
        return text + (MCQ_PROMPT + " \n" if fields.options else "")
    if dtype == "Y/N":  # ImageYORNDataset.build_prompt
        return f"{question}{AMBER_PROMPT}" if name == "AMBER" else f"{question}"
    if dtype == "VQA":  # ImageVQADataset.build_prompt
        return f"{question}{VQA_DATASET_PROMPT}"
    return f"{question}"  # ImageBaseDataset.build_prompt (CustomVQADataset)


# ----------------------------------------------------------------------------- answer extraction

def prediction_as_read(prediction: str | None) -> str:
    """The prediction as VLMEvalKit's evaluation sees it: written to the xlsx prediction file, read back with
    pandas (an NA-like answer becomes NaN) and passed through `str()`."""
    return "nan" if prediction is None or prediction in NA_STRINGS else prediction


_OPTION_PUNCTUATION = ".()[],:;!*#{}"
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def can_infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """`vlmeval.utils.matching_util.can_infer_option` (VERBOSE unset): the option letter the answer names."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(refusal in answer for refusal in _REFUSALS):
        return "Z"
    words = answer
    for char in _OPTION_PUNCTUATION:
        words = words.replace(char, " ")
    splits = words.split()
    named = [letter for letter in choices if letter in splits]
    if len(named) == 1:
        # the one letter named counts only when its first mention is among the last four words
        if splits.index(named[0]) > len(splits) - 5:
            return named[0]
    elif not named and "Z" in splits:
        return "Z"
    verbose = _VERBOSE_ANSWER.search(answer)  # "The correct answer is **B**": letters A-D only
    if verbose and verbose.group(1).upper() in choices:
        return verbose.group(1).upper()
    return None


def can_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """`can_infer_text`: the one option whose text occurs in the answer (both lower-cased); never for an
    answer longer than twice the options' total length."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(text)) for text in choices.values()):
        return None
    found = [letter for letter, text in choices.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


def can_infer(answer: str, choices: Mapping[str, str]) -> str | None:
    """`can_infer`: by letter, else by option text. None when it cannot read the answer; `Z` is a refusal."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?<!\d)\.(?!\d)")


def process_punctuation(text: str) -> str:
    """`vlmeval.smp.misc.process_punctuation`: a mark next to a space (or any mark, in a text with a digit
    comma) is deleted, otherwise it becomes a space; then at most 32 lone periods are deleted (its
    `sub(..., re.UNICODE)` passes the flag as the count)."""
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def yorn_extraction(output: str) -> str:
    """`YOrN_Extraction`: 'Yes', 'No' or 'Unknown' from the lower-cased words of the answer."""
    words = process_punctuation(output.lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "yes" not in words and "no" in words:
        return "No"
    return "Unknown"


# ----------------------------------------------------------------------------- verdicts

@dataclass(frozen=True)
class Verdict:
    extracted: str | None  # what VLMEvalKit read (None: it could not read the answer)
    correct: bool


def reformulates_open(name: str | None) -> bool:
    """`mcq_vanilla_eval` applies `MMMU_preproc` to a dataset whose name contains 'MMMU'."""
    return name is not None and "MMMU" in name


def mmmu_reference(answer: str | None) -> str:
    """`mcq_vanilla_eval` for MMMU: a reference that is not one capital letter becomes 'A'."""
    return answer if answer is not None and len(answer) == 1 and answer in string.ascii_uppercase else "A"


def mcq_verdict(prediction: str | None, options: Mapping[str, str], answer: str | None,
                dataset: str | None = None) -> Verdict:
    """`eval_vanilla` under exact matching: the hit is `can_infer(...) == GT` (an unread answer is 'Z')."""
    extracted = can_infer(prediction_as_read(prediction), dict(options))
    reference = mmmu_reference(answer) if reformulates_open(dataset) else answer
    return Verdict(extracted, extracted is not None and extracted == reference)


def mmmu_open_verdict(prediction: str | None, answer: str | None) -> Verdict:
    """`MMMU_preproc`: an MMMU question without options (asked as it is) is scored as a choice between its
    answer (A) and 'Other Answers' (B), against `mmmu_reference(answer)`."""
    choices = {"A": answer if answer is not None else "nan", "B": OTHER_ANSWERS}
    return mcq_verdict(prediction, choices, answer, "MMMU")


OTHER_ANSWERS = "Other Answers"


def yesno_verdict(prediction: str | None, answer: str | None, name: str | None = None) -> Verdict:
    """`ImageYORNDataset.evaluate` under exact matching: `answer == extracted`, as written in the TSV
    ('yes' never equals 'Yes'), except AMBER, which compares lower-cased."""
    extracted = yorn_extraction(prediction_as_read(prediction))
    if name is not None and "AMBER" in name and answer is not None:
        correct = answer.lower() == extracted.lower()
    else:
        correct = answer == extracted
    return Verdict(None if extracted == "Unknown" else extracted, correct)


SPLIT_NONE = "none"  # report_acc's split for a benchmark without a `split` column


__all__ = ["DATASET_TYPES", "NA_STRINGS", "OTHER_ANSWERS", "SPLIT_NONE", "VLMEVALKIT_COMMIT", "VLMEVALKIT_REPOSITORY",
           "Verdict", "VlmFields", "can_infer", "can_infer_option", "can_infer_text", "cell_text", "dataset_type",
           "fields_from_row", "mcq_verdict", "mmmu_open_verdict", "mmmu_reference", "na_cell", "prediction_as_read",
           "process_punctuation", "prompt", "read_tsv_fields", "reformulates_open", "uses_mixin_prompt",
           "yesno_verdict", "yorn_extraction"]
