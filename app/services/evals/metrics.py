"""Scores of one answer against its reference: BLEU, ROUGE-L and exact match; for rows that ask
for structure, whether the answer is valid JSON and validates against the row's schema, and
whether its tool call is the expected one.

Chinese has no spaces between words, so word-level scores would count a whole sentence as one
word: BLEU uses sacrebleu's ``zh`` tokenizer and ROUGE-L compares characters when the text is
Chinese, as the Chinese evaluation suites (LLaMA-Factory's, C-Eval's) do.
"""
from __future__ import annotations

import json
import re
import string
import unicodedata
from typing import Optional, Sequence

from app.services.core.types import ToolCall
from app.services.records.eval_records import StructureScores, TextScores
from app.services.records.test_sets import ExpectedToolCall

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_PUNCTUATION = set(string.punctuation) | set("，。！？；：、“”‘’（）《》【】…—·")


def is_chinese(text: str) -> bool:
    """Mostly Chinese: a fair share of its letters are CJK ideographs."""
    letters = [c for c in text if not c.isspace() and c not in _PUNCTUATION]
    if not letters:
        return False
    return sum(1 for c in letters if _CJK.match(c)) / len(letters) >= 0.3


def normalize(text: str) -> str:
    """For exact match: NFKC (full-width to half-width), case folded, spaces collapsed, and the
    punctuation at either end dropped, so "Paris." matches "paris"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.split())
    return text.strip("".join(_PUNCTUATION) + " ")


def exact_match(output: str, reference: str) -> float:
    return 1.0 if normalize(output) == normalize(reference) else 0.0


def _units(text: str, chinese: bool) -> list[str]:
    text = normalize(text)
    if chinese:
        return [c for c in text if not c.isspace() and c not in _PUNCTUATION]
    return [w for w in re.findall(r"\w+", text)]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(output: str, reference: str, chinese: Optional[bool] = None) -> float:
    """ROUGE-L F1 (beta 1) on words, or on characters for Chinese."""
    chinese = is_chinese(reference) if chinese is None else chinese
    out, ref = _units(output, chinese), _units(reference, chinese)
    if not out or not ref:
        return 1.0 if out == ref else 0.0
    lcs = _lcs_length(out, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(out), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu_tokenizer(references: Sequence[str]) -> str:
    return "zh" if any(is_chinese(r) for r in references) else "13a"


def sentence_bleu(output: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(output, [reference], tokenize=bleu_tokenizer([reference])).score


def corpus_bleu(outputs: Sequence[str], references: Sequence[str]) -> float:
    """BLEU over the whole set (sacrebleu's corpus score, 0-100): the figure papers report, which
    is not the mean of the sentence scores."""
    import sacrebleu

    if not outputs:
        return 0.0
    return sacrebleu.corpus_bleu(list(outputs), [list(references)], tokenize=bleu_tokenizer(references)).score


def score(output: str, reference: Optional[str]) -> TextScores:
    """The row's scores; None where there is no reference to score against."""
    if reference is None:
        return TextScores(bleu=None, rouge_l=None, exact_match=None)
    return TextScores(
        bleu=round(sentence_bleu(output, reference), 2),
        rouge_l=round(rouge_l(output, reference), 4),
        exact_match=exact_match(output, reference),
    )


def json_scores(output: str, schema: Optional[dict]) -> StructureScores:
    """For a row with a schema: whether the answer is JSON at all, and whether it validates
    against the schema (a constrained answer cut off by the token budget is neither); None for
    a row without one."""
    if schema is None:
        return StructureScores()
    try:
        value = json.loads(output)
    except ValueError:
        return StructureScores(valid_json=0.0, schema_valid=0.0)
    import jsonschema

    try:
        jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
    except jsonschema.ValidationError:
        return StructureScores(valid_json=1.0, schema_valid=0.0)
    return StructureScores(valid_json=1.0, schema_valid=1.0)


def tool_scores(calls: Sequence[ToolCall], expected: Optional[ExpectedToolCall]) -> StructureScores:
    """For a row that expects a call: whether the answer's first call names the expected tool,
    and whether its arguments equal the expected ones as JSON values (key order and spacing
    aside); an answer without a call scores 0 on both. None for a row that expects none."""
    if expected is None:
        return StructureScores()
    if not calls:
        return StructureScores(tool_name_match=0.0, tool_arguments_match=0.0)
    first = calls[0]
    try:
        arguments = json.loads(first.arguments)
    except ValueError:
        arguments = None
    named = first.name == expected.name
    return StructureScores(tool_name_match=1.0 if named else 0.0,
                           tool_arguments_match=1.0 if named and arguments == expected.arguments else 0.0)
