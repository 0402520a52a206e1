"""Read the answer a model committed to out of its free text: an option letter, or yes / no.

Exact matching misreads realistic answers ("The answer is (B).", "**B**", "b) effusion", the option's
text without its letter, "No, there is no effusion"). The rules, in order (docs/eval.md lists them with
examples):

1. Clean up: Unicode compatibility forms (full-width letters and brackets), markdown emphasis, code
   marks, `\\boxed{}`, `<answer>` tags, chat special tokens.
2. Empty output: unanswered.
3. An explicit statement ("the answer is B", "Answer: (C)", "I choose D", "答案是B", "la respuesta es
   B", ...). A "final answer" statement wins over earlier ones; statements naming different letters, or
   one followed by "or C" / "and C", are unanswered.
4. The reply is only a letter ("B", "(b)", "Option B.") or starts with one ("B. Effusion because ...",
   "C) ...", "D - ...").
5. Letters referred to anywhere ("option C", "(C)", "it's C.", "C is correct"), except those the text
   rejects ("not A", "A is incorrect", "rather than A"). One letter: that one; several: unanswered.
6. The text of exactly one option, as whole words (the longest wins when one option's text contains
   another's); rejected mentions do not count.
7. Otherwise unanswered, and the rule says why: a refusal, "none of the above" (when that is not an
   option), several options, or nothing recognisable.

A repeated list of the options ("A. ...\\nB. ...") is set aside before steps 4-6, so echoing the options
is not mistaken for an answer. Nothing is ever guessed: an unanswered item is wrong.

Yes/no answers follow the same idea: an explicit statement, then a leading yes/no word in any of the
supported languages ("No, there is no effusion" is No; "yes and no" is unanswered), then refusals, then
yes/no words anywhere, then statements with a clear negation ("There is no effusion") or affirmation
("There is a small effusion"); a text with both is unanswered.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

LETTERS = "ABCDEFGHIJ"
YES, NO = "yes", "no"


@dataclass(frozen=True)
class Extraction:
    """What an answer commits to (`value`: a letter, "yes", "no", or None) and the rule that decided."""

    value: str | None
    rule: str

    @property
    def answered(self) -> bool:
        return self.value is not None


# ----------------------------------------------------------------------------- clean-up

_SPECIAL_TOKENS = re.compile(r"<\|[a-z_]+\|>")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_LATEX_TEXT = re.compile(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}")
_TAGS = re.compile(r"</?(?:answer|final_answer|option|choice|b|strong|em)>", re.IGNORECASE)
_EMPHASIS = re.compile(r"(\*\*|__|\*|`+|~~)")
_HEADINGS = re.compile(r"^\s{0,3}(?:#{1,6}|>)\s*", re.MULTILINE)
_SPACES = re.compile(r"[ \t\u00a0]+")


def clean(text: str | None) -> str:
    """The answer without markup that carries no meaning (never changes which letter it names)."""
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", text)
    text = _SPECIAL_TOKENS.sub(" ", text)
    text = _BOXED.sub(r" \1 ", text)
    text = _LATEX_TEXT.sub(r"\1", text)
    text = _TAGS.sub(" ", text)
    text = _EMPHASIS.sub("", text)
    text = _HEADINGS.sub("", text)
    text = text.replace("\u2019", "'").replace("\u2013", "-").replace("\u2014", "-")
    return _SPACES.sub(" ", text).strip()


def _plain(text: str) -> str:
    """Lower case, punctuation as spaces: for comparing option texts."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w%+\-/.]+|[.](?!\d)", " ", text)  # a period is kept only inside a number
    return " ".join(text.split())


# ----------------------------------------------------------------------------- multiple choice

_L = r"[\(\[]?([A-Ja-j])[\)\]]?(?![\w'])"  # a letter, maybe in brackets, not the start of a word
_CONNECTOR = r"\s*(?:would\s+be|should\s+be|must\s+be|will\s+be|is|:|=|-)\s*(?:option|choice|letter)?\s*:?\s*"
_STATEMENTS = [
    # English: "the (final) (correct|best) answer is B", "Answer: (C)", "correct option: D", "I choose B"
    r"\b(?P<final>final\s+)?(?:correct\s+|right\s+|best\s+|most\s+likely\s+|most\s+appropriate\s+)?answer"
    + _CONNECTOR + _L,
    r"\b(?:correct|right|best)\s+(?:option|choice|letter)" + _CONNECTOR + _L,
    r"\b(?:i\s+(?:would\s+|will\s+|'d\s+)?(?:choose|pick|select|go\s+with)|my\s+(?:final\s+)?choice\s+is|"
    r"i\s+think\s+it\s+is|i\s+think\s+it's)\s+(?:option\s+|choice\s+)?" + _L,
    r"\b(?:option|choice)\s+" + _L + r"\s+is\s+(?:the\s+)?(?:correct|right|best|answer)",
    # Chinese, Spanish, French, German, Italian, Portuguese
    r"(?:答案|正确答案|正确选项|答)\s*(?:是|为|应为|应该是)?\s*[:：]?\s*(?:选项)?\s*" + _L,
    r"选(?:择)?\s*" + _L,
    r"\brespuesta(?:\s+correcta)?\s+es\s+(?:la\s+)?(?:opci[oó]n\s+)?" + _L,
    r"\br[ée]ponse(?:\s+correcte)?\s+est\s+(?:la\s+)?(?:l'option\s+|option\s+)?" + _L,
    r"\bAntwort\s+(?:ist|lautet)\s*:?\s+(?:Option\s+)?" + _L,
    r"\brisposta(?:\s+corretta)?\s+[èe]\s+(?:la\s+)?(?:opzione\s+)?" + _L,
    r"\bresposta(?:\s+correta)?\s+[ée]\s+(?:a\s+)?(?:alternativa\s+|op[çc][ãa]o\s+)?" + _L,
]
_STATEMENT_RES = [re.compile(pattern, re.IGNORECASE) for pattern in _STATEMENTS]
_ALTERNATIVE_AFTER = re.compile(r"^\s*(?:,|/|or|and|&|或|o|ou|oder)\s*(?:option\s+)?[\(\[]?[A-J][\)\]]?(?![\w'])",
                                re.IGNORECASE)
_LIST_LINE = re.compile(r"^\s*[\(\[]?([A-J])[\)\].:]\s+\S")
_WHOLE_LETTER = re.compile(r"^(?:(?:option|choice|answer|letter)\s*[:\-]?\s*)?[\(\[{]?([A-Ja-j])[\)\]}]?[.!:]?$",
                           re.IGNORECASE)
_LEADING_LETTER = re.compile(r"^[\(\[]?([A-Ja-j])(?:[\)\]]|\.(?=\s|$)(?!\s*[a-z])|:(?=\s|$)|\s*-\s)")
# Letters listed together ("A or B", "A, C and D", "B/C"): all of them are named.
_LIST_SEPARATOR = r"\s*(?:,|/|&|\bor\b|\band\b|,\s*and|,\s*or)\s*(?:option\s+)?"


@functools.lru_cache(maxsize=64)
def _letter_list(letters: str) -> re.Pattern:
    one = rf"[\(\[]?[{letters}][\)\]]?"
    return re.compile(rf"(?<![\w']){one}(?:{_LIST_SEPARATOR}{one})+(?![\w'])")


_ARTICLE_VERBS = r"(?:is|was|would|seems|appears|looks|should|could|fits|matches|best|correct|answers)\b"
_MENTIONS = re.compile(
    r"(?:\b(?:option|choice|letter|answer|opci[oó]n|opzione|选项)\s*[\(\[]?(?P<kw>[A-J])[\)\]]?(?![\w']))"
    r"|(?:[\(\[](?P<br>[A-J])[\)\]])"
    r"|(?:(?<![\w'])(?P<bare>[A-J])(?![\w'])(?=\s*(?:\.(?!\s*[a-z])|[):,;!?]|$)|\s+" + _ARTICLE_VERBS + r"))"
    r"|(?:(?<=\bis\s)|(?<=\bbe\s)|(?<='s\s))(?P<after_verb>[B-J])(?![\w'])",
)
_NEGATION_BEFORE = re.compile(
    r"(?:\bnot|n't|\bno|\brather\s+than|\binstead\s+of|\bexcept|\bexclude|\bexcluding|\beliminate|\brule\s+out|"
    r"\bruled\s+out|\bunlike|\bneither|\bnor|\bagainst)\s+(?:\w+\s+){0,2}(?:option\s+|choice\s+)?[\(\[]?$",
    re.IGNORECASE)
_NEGATION_AFTER = re.compile(
    r"^[\)\]]?\s*(?:is|are|seems|seem|would\s+be|looks|look)?\s*(?:both\s+|all\s+|also\s+|clearly\s+|definitely\s+)?"
    r"(?:not\s+(?:correct|right|the\s+answer)|incorrect|wrong|unlikely|excluded|ruled\s+out|"
    r"can\s+be\s+(?:excluded|ruled\s+out)|not)\b", re.IGNORECASE)
_REFUSAL = re.compile(
    r"\b(?:i\s*(?:'m|am)\s+(?:sorry|unable|not\s+able)|i\s+(?:cannot|can't|can\s+not|could\s+not|couldn't)|"
    r"(?:cannot|can't|can\s+not|impossible\s+to|unable\s+to|not\s+possible\s+to)\s+"
    r"(?:be\s+)?(?:determine|determined|tell|say|answer|assess|see|know|identify|provide|view)|"
    r"not\s+sure|uncertain|insufficient\s+(?:information|detail)|no\s+image|without\s+(?:the|an|more)\s+"
    r"(?:image|information|context)|as\s+an\s+ai|not\s+a\s+(?:doctor|radiologist)|consult\s+a)"
    r"|无法|不能确定|不确定|抱歉|no\s+(?:puedo|es\s+posible)|je\s+ne\s+peux\s+pas", re.IGNORECASE)
_NONE_OF_THE_ABOVE = re.compile(r"\b(?:none\s+of\s+(?:the\s+)?(?:above|these|the\s+options|them)|"
                                r"no\s+(?:correct\s+)?(?:option|answer)\s+(?:is\s+)?(?:correct|fits|applies))\b",
                                re.IGNORECASE)


def extract_choice(text: str | None, options: Mapping[str, str]) -> Extraction:
    """The option letter `text` commits to, among `options` ({letter: option text})."""
    letters = {letter.upper() for letter in options}
    cleaned = clean(text)
    if not cleaned:
        return Extraction(None, "empty")
    stated = _stated_letter(cleaned, options, letters)
    if stated is not None:
        return stated
    whole = _WHOLE_LETTER.match(cleaned.strip(" \"'"))
    if whole and whole.group(1).upper() in letters:
        return Extraction(whole.group(1).upper(), "letter_only")
    body = _without_option_list(cleaned, letters)
    leading = _leading_letter(body, options, letters)
    if leading is not None:
        return leading
    mentioned = _mentioned_letters(_mask_option_texts(body, options), letters)
    if len(mentioned) == 1:
        return Extraction(mentioned.pop(), "letter_mention")
    if len(mentioned) > 1:
        return Extraction(None, "several_options")
    by_text = _options_by_text(body, options)
    if len(by_text) == 1:
        return Extraction(by_text[0], "option_text")
    if len(by_text) > 1:
        return Extraction(None, "several_options")
    if _REFUSAL.search(cleaned):
        return Extraction(None, "refusal")
    if _NONE_OF_THE_ABOVE.search(cleaned):
        return Extraction(None, "none_of_the_above")
    if not body:
        return Extraction(None, "options_repeated")
    return Extraction(None, "no_answer")


def _stated_letter(text: str, options: Mapping[str, str], letters: set[str]) -> Extraction | None:
    stated: list[tuple[int, str, bool]] = []  # (position, letter, is a "final answer")
    for pattern in _STATEMENT_RES:
        for match in pattern.finditer(text):
            raw = match.group(match.lastindex)
            letter = raw.upper()
            if letter not in letters or _article(raw, text, match.end(), options):
                continue
            if _ALTERNATIVE_AFTER.match(text[match.end():]):
                return Extraction(None, "several_options")
            final = "final" in pattern.groupindex and bool(match.group("final"))
            stated.append((match.start(), letter, final))
    if not stated:
        return None
    finals = [entry for entry in stated if entry[2]]
    if finals:
        return Extraction(max(finals)[1], "final_answer_statement")
    if len({letter for _, letter, _ in stated}) == 1:
        return Extraction(stated[0][1], "answer_statement")
    return Extraction(None, "conflicting_statements")


def _article(raw: str, text: str, end: int, options: Mapping[str, str]) -> bool:
    """'a' / 'A' / 'i' followed by a word is English ('the answer is a cyst', 'Answer: A large effusion'),
    unless the words are that option's own text ('Answer: A pleural effusion' with A = 'Pleural effusion')."""
    if raw not in "aAiI" or re.match(r"\s+[A-Za-z]", text[end:]) is None:
        return False
    return not _starts_with_option(text[end:], options, raw.upper())


def _without_option_list(text: str, letters: set[str]) -> str:
    """Drop echoed option lists: two or more lines that start with different option markers."""
    lines = text.splitlines()
    listed = {m.group(1) for line in lines if (m := _LIST_LINE.match(line)) and m.group(1) in letters}
    if len(listed) < 2:
        return text
    return "\n".join(line for line in lines if not _LIST_LINE.match(line)).strip()


def _leading_letter(text: str, options: Mapping[str, str], letters: set[str]) -> Extraction | None:
    if _letter_list("".join(sorted(letters))).match(text):
        return None  # "A or B ...": the mention scan sees every letter
    match = _LEADING_LETTER.match(text)
    if match is not None:
        raw = match.group(1)
        if raw.upper() in letters and not (raw.islower() and match.group(0)[-1:].isspace()):
            return Extraction(raw.upper(), "leading_letter")
        return None
    word = re.match(r"^([A-J])\s+(.+)", text, re.DOTALL)  # "B Pleural effusion": the option's own text follows
    if word and word.group(1) in letters and _starts_with_option(word.group(2), options, word.group(1)):
        return Extraction(word.group(1), "leading_letter")
    return None


def _starts_with_option(rest: str, options: Mapping[str, str], letter: str) -> bool:
    option = _plain(str(options.get(letter, options.get(letter.lower(), ""))))
    return bool(option) and _plain(rest).startswith(option)


def _mentioned_letters(text: str, letters: set[str]) -> set[str]:
    found: set[str] = set()
    masked = text
    for match in _letter_list("".join(sorted(letters))).finditer(text):
        if not _rejected(text, match.start(), match.end()):
            found.update(re.findall(r"[A-J]", match.group(0)))
        masked = masked[:match.start()] + " " * (match.end() - match.start()) + masked[match.end():]
    for match in _MENTIONS.finditer(masked):
        letter = next(group for group in match.groups() if group)
        if letter in letters and not _rejected(masked, match.start(), match.end()):
            found.add(letter)
    return found


def _mask_option_texts(text: str, options: Mapping[str, str]) -> str:
    """Blank out option texts so a letter inside one ('Hepatitis B', 'Type C') is not read as a choice."""
    forms = [form for value in options.values() for form in _option_forms(value)]
    for option in sorted(forms, key=len, reverse=True):
        if len(option) > 1:
            pattern = r"(?<!\w)" + re.escape(option).replace(r"\ ", r"\s+") + r"(?!\w)"
            text = re.sub(pattern, lambda m: "~" * len(m.group(0)), text, flags=re.IGNORECASE)
    return text


def _rejected(text: str, start: int, end: int) -> bool:
    before = re.split(r"[.;!?\n]", text[max(0, start - 40):start])[-1]
    return bool(_NEGATION_BEFORE.search(before) or _NEGATION_AFTER.match(text[end:end + 40]))


def _option_forms(option: object) -> list[str]:
    """An option's text, and for a binomial name its abbreviation ('Escherichia coli' -> 'E. coli')."""
    text = " ".join(str(option).split())
    words = text.split(" ")
    forms = [text] if text else []
    binomial = len(words) == 2 and len(words[0]) > 2 and words[0].istitle() and words[1].islower()
    if binomial:
        forms.append(f"{words[0][0]}. {words[1]}")
    return forms


def _options_by_text(text: str, options: Mapping[str, str]) -> list[str]:
    plain = f" {_plain(text)} "
    spans: list[tuple[int, int, str]] = []
    forms = [(letter.upper(), _plain(form)) for letter, option in options.items() for form in _option_forms(option)]
    for letter, value in forms:
        for match in re.finditer(re.escape(f" {value} "), plain) if value else ():
            start, end = match.start() + 1, match.end() - 1
            if not _rejected(plain, start, end):
                spans.append((start, end, letter))
    # An option whose text sits inside a longer matched option's text is not named by itself.
    kept = [s for s in spans if not any(o[0] <= s[0] and s[1] <= o[1] and (o[1] - o[0]) > (s[1] - s[0])
                                        for o in spans)]
    return sorted({letter for _, _, letter in kept})


# ----------------------------------------------------------------------------- yes / no

_YES_WORDS = (r"yes|yeah|yep|yup|affirmative|correct|true|positive|present|indeed|absolutely|definitely|certainly|"
              r"sí|si|oui|ja|sim|是的|是|对|有")
_NO_WORDS = r"no|nope|negative|incorrect|false|absent|non|nein|não|nao|不是|否|不|没有|无"
_YES_RE = re.compile(rf"^(?:{_YES_WORDS})$", re.IGNORECASE)
_NO_RE = re.compile(rf"^(?:{_NO_WORDS})$", re.IGNORECASE)
_YN_STATEMENT = re.compile(r"\b(?:answer|respuesta|réponse|antwort|risposta|resposta)\s*(?:is|es|est|ist|è|é|:)?\s*"
                           r"[:\-]?\s*\(?(yes|no|sí|si|oui|non|ja|nein|sim|não)\b|答案\s*(?:是|为)?\s*[:：]?\s*(是|否)",
                           re.IGNORECASE)
_YN_FIRST = re.compile(r"^\W*(是的|不是|没有|是(?!否)|否|不(?!确定|能|清楚)|对(?!比|称)|有|无(?!法)"
                       r"|[^\W\d_]+(?![\w-]))", re.IGNORECASE)
_EMPHATIC_NOT = re.compile(r"^\W*(?:absolutely|definitely|certainly|of\s+course|surely)\s+not\b", re.IGNORECASE)
_YN_BOTH = re.compile(r"^\W*(?:yes\s*(?:and|or|/|,)\s*no|no\s*(?:and|or|/|,)\s*yes)\b", re.IGNORECASE)
_NOT_A_NO = re.compile(r"^\W*no\s+(?:doubt|question|wonder)\b", re.IGNORECASE)
_YES_ANYWHERE = re.compile(r"\b(?:yes|yeah)\b", re.IGNORECASE)
_NO_ANYWHERE = re.compile(r"\b(?:no|nope)\b(?=\s*(?:[,.!;:]|$))", re.IGNORECASE)  # "no" said as an answer
_IDIOMS = re.compile(r"\bno\s+(?:doubt|question|wonder)\b,?", re.IGNORECASE)
_CLAUSES = re.compile(r"[,;.!?\n]|\bbut\b|\bhowever\b|\bwhile\b|\bwhereas\b", re.IGNORECASE)
_NEGATED = re.compile(
    r"\b(?:not|no|none|without|absent|negative\s+for|free\s+of|ruled\s+out|unremarkable|never)\b|n't\b",
    re.IGNORECASE)
_AFFIRMED = re.compile(
    r"\b(?:there\s+(?:is|are|appears?\s+to\s+be|seems?\s+to\s+be)|(?:is|are)\s+(?:present|seen|visible|noted|"
    r"evident|identified|observed|shown)|shows?|demonstrates?|reveals?|positive\s+for|consistent\s+with|"
    r"suggestive\s+of|it\s+(?:is|does)|this\s+is)\b", re.IGNORECASE)


def extract_yesno(text: str | None) -> Extraction:
    """"yes", "no" or None for a yes/no question's answer."""
    cleaned = clean(text)
    if not cleaned:
        return Extraction(None, "empty")
    statement = _YN_STATEMENT.search(cleaned)
    if statement:
        return Extraction(_polarity(next(g for g in statement.groups() if g)), "answer_statement")
    if _YN_BOTH.match(cleaned):
        return Extraction(None, "both")
    if _EMPHATIC_NOT.match(cleaned):
        return Extraction(NO, "leading_word")
    first = _YN_FIRST.match(cleaned)
    if first and not _NOT_A_NO.match(cleaned):
        polarity = _polarity(first.group(1))
        if polarity is not None:
            return Extraction(polarity, "leading_word")
    if _REFUSAL.search(cleaned):
        return Extraction(None, "refusal")
    yes, no = bool(_YES_ANYWHERE.search(cleaned)), bool(_NO_ANYWHERE.search(cleaned))
    if yes != no:
        return Extraction(YES if yes else NO, "yes_no_word")
    if yes and no:
        return Extraction(None, "both")
    return _statement_polarity(_IDIOMS.sub(" ", cleaned))


def _statement_polarity(text: str) -> Extraction:
    """Each clause is negated ("there is no effusion"), affirmed ("there is a mass") or neither."""
    polarities = set()
    for clause in _CLAUSES.split(text):
        if _NEGATED.search(clause):
            polarities.add(NO)
        elif _AFFIRMED.search(clause):
            polarities.add(YES)
    if len(polarities) == 1:
        value = polarities.pop()
        return Extraction(value, "negated_statement" if value == NO else "affirmed_statement")
    return Extraction(None, "mixed_statement" if polarities else "no_answer")


def _polarity(word: str) -> str | None:
    if _YES_RE.match(word):
        return YES
    if _NO_RE.match(word):
        return NO
    return None


def normalize_yesno(answer: object) -> str | None:
    """A reference answer as "yes"/"no" (accepts Yes, TRUE, y, 1, ...); None when it is neither."""
    value = str(answer).strip().strip(".").lower()
    if value in ("yes", "y", "true", "1"):
        return YES
    if value in ("no", "n", "false", "0"):
        return NO
    return None


__all__ = ["Extraction", "LETTERS", "NO", "YES", "clean", "extract_choice", "extract_yesno", "normalize_yesno"]
