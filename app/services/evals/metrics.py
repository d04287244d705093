"""Scores of one answer against its reference: BLEU, ROUGE-L and exact match.

Chinese has no spaces between words, so word-level scores would count a whole sentence as one
word: BLEU uses sacrebleu's ``zh`` tokenizer and ROUGE-L compares characters when the text is
Chinese, as the Chinese evaluation suites (LLaMA-Factory's, C-Eval's) do.
"""
from __future__ import annotations

import re
import string
import unicodedata
from typing import Optional, Sequence

from app.services.records.eval_records import TextScores

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
