"""Scores and test-set parsing, without a model: the metrics against hand-computed values, and
every kind of bad test file refused with its line."""
from __future__ import annotations

import json

import pytest

from app.services.evals import metrics as eval_metrics
from app.services.records.eval_store import EvalStore, atomic_write
from app.services.records.test_sets import InvalidTestSet, parse_test_set


def test_exact_match_forgives_case_spacing_width_and_end_punctuation():
    assert eval_metrics.exact_match("  Paris. ", "paris") == 1.0
    assert eval_metrics.exact_match("ＰＡＲＩＳ", "Paris") == 1.0  # full-width letters
    assert eval_metrics.exact_match("北京。", "北京") == 1.0
    assert eval_metrics.exact_match("Paris, France", "Paris") == 0.0


def test_rouge_l_is_the_lcs_f1_on_words_and_on_characters_for_chinese():
    # LCS of "the cat sat" and "the cat sat down" is 3 words: P = 1, R = 3/4, F1 = 6/7
    assert eval_metrics.rouge_l("the cat sat", "the cat sat down") == pytest.approx(6 / 7)
    assert eval_metrics.rouge_l("completely different", "the cat") == 0.0
    # Chinese compares characters: 今天天气 vs 今天天气很好 -> LCS 4, P = 1, R = 4/6
    assert eval_metrics.rouge_l("今天天气", "今天天气很好") == pytest.approx(2 * (4 / 6) / (1 + 4 / 6))
    # word level would see one "word" each and score 0
    assert eval_metrics.rouge_l("今天天气", "今天天气很好", chinese=False) == 0.0


def test_bleu_uses_the_zh_tokenizer_for_chinese():
    import sacrebleu

    assert eval_metrics.bleu_tokenizer(["今天天气很好"]) == "zh"
    assert eval_metrics.bleu_tokenizer(["the weather is fine"]) == "13a"
    out, ref = "今天天气很好啊", "今天天气很好"
    assert eval_metrics.sentence_bleu(out, ref) == pytest.approx(sacrebleu.sentence_bleu(out, [ref], tokenize="zh").score)
    assert eval_metrics.sentence_bleu(out, ref) > 30  # a whitespace tokenizer would give near 0
    assert eval_metrics.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)


def test_rows_without_reference_are_not_scored():
    assert eval_metrics.score("anything", None).model_dump() == {"bleu": None, "rouge_l": None, "exact_match": None}


def test_jsonl_and_csv_give_the_same_rows():
    jsonl = '{"prompt": "Hi", "reference": "Hello"}\n\n{"prompt": "Q2", "system": "Be brief.", "reference": null}\n'
    csv = 'prompt,system,reference\nHi,,Hello\nQ2,Be brief.,\n'
    from_jsonl = parse_test_set(jsonl.encode(), "set.jsonl")
    from_csv = parse_test_set(csv.encode(), "set.csv")
    assert [r.model_dump() for r in from_jsonl] == [r.model_dump() for r in from_csv] == [
        {"index": 0, "prompt": "Hi", "system": None, "reference": "Hello"},
        {"index": 1, "prompt": "Q2", "system": "Be brief.", "reference": None},
    ]
    # no name: sniffed; a UTF-8 BOM (Excel's CSV) is not part of the first column's name
    assert parse_test_set(("\ufeff" + csv).encode("utf-8"))[0].prompt == "Hi"
    # Alpaca-style rows, as LLaMA-Factory datasets are written
    alpaca = parse_test_set(b'{"instruction": "Translate", "input": "chat", "output": "cat"}', "a.jsonl")
    assert alpaca[0].prompt == "Translate\n\nchat" and alpaca[0].reference == "cat"


@pytest.mark.parametrize(
    ("data", "name", "line", "says"),
    [
        (b"", "t.jsonl", None, "empty"),
        (b"  \n\n", "t.csv", None, "empty"),
        (b'{"prompt": "a"}\n{"prompt": "b"\n', "t.jsonl", 2, "not valid JSON"),
        (b'{"prompt": "a"}\n\n{"question": "b"}\n', "t.jsonl", 3, "no prompt column (found: question)"),
        (b'{"prompt": "a"}\n["b"]\n', "t.jsonl", 2, "not an object"),
        (b'{"prompt": ""}\n', "t.jsonl", 1, "the prompt is empty"),
        (b'{"prompt": "a", "reference": 4}\n', "t.jsonl", 1, "reference must be text"),
        (b"question,answer\nq,a\n", "t.csv", 1, "no prompt column in the header (found: question, answer)"),
        (b"prompt,reference\nq,a\nq2,a2,extra\n", "t.csv", 3, "3 fields where the header has 2"),
        (b"prompt,reference\n", "t.csv", None, "no rows"),
        (b'{"prompt": "caf\xe9"}\n', "t.jsonl", 1, "not UTF-8"),
    ],
)
def test_bad_test_sets_are_refused_naming_the_line(data, name, line, says):
    with pytest.raises(InvalidTestSet) as caught:
        parse_test_set(data, name)
    assert caught.value.line == line
    assert says in caught.value.message
    if line:
        assert caught.value.message.startswith(f"line {line}: ")
        assert caught.value.details().line == line


def test_size_and_row_limits():
    data = "".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(10)).encode()
    with pytest.raises(InvalidTestSet, match="the limit is 100"):
        parse_test_set(data, "t.jsonl", max_bytes=100)
    with pytest.raises(InvalidTestSet, match="10 rows; the limit is 5"):
        parse_test_set(data, "t.jsonl", max_rows=5)


def test_atomic_write_never_leaves_a_torn_file(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    atomic_write(path, '{"state": "running"}')

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", crash)
    with pytest.raises(OSError):
        atomic_write(path, '{"state": "done", "lots": "' + "x" * 100000 + '"}')
    assert json.loads(path.read_text()) == {"state": "running"}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no temporary left behind


def test_eval_ids_from_urls_cannot_leave_the_results_folder(tmp_path):
    from app.services.core.errors import NotFound

    store = EvalStore(tmp_path / "evals")
    for bad in ("../../etc", "..", "a/b", "", "x" * 3):
        with pytest.raises(NotFound):
            store.read_meta(bad)
