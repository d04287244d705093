"""LoRA training and merging on the real SmolLM2-135M-Instruct checkpoint: data loading, label
masking, one codename adapter trained for the module, and merges checked against it."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config.settings import PROJECT_ROOT, Settings
from scripts.merge_lora import MergeError, merge
from scripts.sft_data import IGNORE_INDEX, DatasetError, NoTargetTokens, load_sft_dataset, tokenize_for_sft
from scripts.train_lora import TrainError, default_out_dir, train
from tests.support.adapters import QUESTION, answer_for, ask, make_codename, train_codename_adapter

BASE_NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def base() -> Path:
    path = Settings().models_dir / BASE_NAME
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} is missing; make setup builds it (scripts/build_default_checkpoint.py)")
    return path.resolve()


@pytest.fixture(scope="module")
def tokenizer(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def write(path: Path, records, jsonl: bool) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- data formats


def test_alpaca_json_with_system_input_and_history(tmp_path):
    record = {
        "system": "Be brief.",
        "history": [["Hi", "Hello!"]],
        "instruction": "Translate to French:",
        "input": "cat",
        "output": "chat",
    }
    [messages] = load_sft_dataset(write(tmp_path / "a.json", [record], jsonl=False))
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Translate to French:\ncat"},
        {"role": "assistant", "content": "chat"},
    ]


def test_sharegpt_jsonl(tmp_path):
    records = [
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                           {"from": "user", "value": "Q2"}, {"from": "assistant", "value": "A2"}]},
        {"system": "Top-level system", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    ]
    first, second = load_sft_dataset(write(tmp_path / "s.jsonl", records, jsonl=True))
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in first] == ["S", "Q1", "A1", "Q2", "A2"]
    assert second[0] == {"role": "system", "content": "Top-level system"}


def test_openai_messages_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "o.jsonl"
    record = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]}
    path.write_text("\n" + json.dumps(record) + "\n\n", encoding="utf-8")
    assert load_sft_dataset(path) == [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]]


GOOD = {"instruction": "Q", "output": "A"}


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.jsonl", json.dumps(GOOD) + "\n{not json\n", ["line 2", "record [1]", "invalid JSON"]),
        ("bad.json", json.dumps([GOOD, {"instruction": "Q"}]), ["record [1]", "without 'output'"]),
        ("bad.json", json.dumps({"instruction": "Q", "output": "A"}), ["must be a list"]),
        ("bad.json", json.dumps([{"prompt": "Q", "completion": "A"}]), ["record [0]", "unknown record format", "completion"]),
        ("bad.jsonl", json.dumps(GOOD) + "\n" + json.dumps({"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]}),
         ["line 2 (record [1])", "conversations[1]", "'bot'"]),
        ("bad.jsonl", json.dumps({"messages": [{"role": "user", "content": "Q"}]}), ["line 1", "last turn is the user's"]),
        ("bad.jsonl", json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}),
         ["turn 1", "expected an assistant turn, got user"]),
        ("bad.json", json.dumps([{"instruction": "Q", "output": 3}]), ["record [0]", "'output' must be a string"]),
        ("bad.json", json.dumps([{"instruction": "Q", "output": "  "}]), ["record [0]", "'output' is empty"]),
        ("bad.json", json.dumps([]), ["no records"]),
        ("bad.csv", "instruction,output\n", [".jsonl"]),
    ],
)
def test_bad_data_names_the_record(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        load_sft_dataset(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message


# --------------------------------------------------------------------------- label masking


def labelled_spans(example) -> list[list[int]]:
    """The runs of consecutive labelled tokens, checking each label equals its input token."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(label)
    if current:
        spans.append(current)
    return spans


def test_labels_are_the_answer_and_its_end_of_turn(tokenizer):
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer_for("Zorvaxel")}]
    example = tokenize_for_sft(tokenizer, messages, max_len=512)
    assert len(example["input_ids"]) == len(example["labels"]) == len(example["attention_mask"])
    [span] = labelled_spans(example)
    assert tokenizer.decode(span) == "The codename is Zorvaxel.<|im_end|>"
    # The input is exactly the rendered template: the default system prompt included, unlabelled.
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == rendered
    assert "<|im_start|>system" in rendered


def test_multi_turn_labels_every_assistant_turn(tokenizer):
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"},
        {"role": "assistant", "content": "Green."},
        {"role": "user", "content": "Snow?"},
        {"role": "assistant", "content": "White."},
    ]
    example = tokenize_for_sft(tokenizer, messages, max_len=512)
    assert [tokenizer.decode(s) for s in labelled_spans(example)] == ["Blue.<|im_end|>", "Green.<|im_end|>", "White.<|im_end|>"]


def test_truncation(tokenizer):
    messages = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one two three four five six seven"}]
    full = tokenize_for_sft(tokenizer, messages, max_len=512)
    prompt_len = full["labels"].index(next(label for label in full["labels"] if label != IGNORE_INDEX))
    cut = tokenize_for_sft(tokenizer, messages, max_len=prompt_len + 2)
    assert cut["input_ids"] == full["input_ids"][: prompt_len + 2]
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 2
    with pytest.raises(NoTargetTokens, match="max_len"):
        tokenize_for_sft(tokenizer, messages, max_len=prompt_len)


def test_a_template_that_is_not_prefix_stable_is_refused(base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    # Each rendering starts with the number of messages, so earlier tokens change as turns are added.
    tokenizer.chat_template = (
        "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    with pytest.raises(DatasetError, match="prefix-stable"):
        tokenize_for_sft(tokenizer, messages, max_len=512)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def codename() -> str:
    return make_codename()


@pytest.fixture(scope="module")
def trained(base, codename, tmp_path_factory):
    out = tmp_path_factory.mktemp("saves") / BASE_NAME / "lora" / "codename"
    return train_codename_adapter(base, out, codename)


@pytest.mark.slow
def test_training_writes_a_complete_adapter(trained, base):
    out = trained.out
    assert out.is_dir() and out.name == "codename"
    assert len(trained.losses) == 30
    assert trained.first_loss == trained.losses[0] and trained.final_loss == trained.losses[-1]
    assert trained.final_loss < trained.first_loss / 10, trained.losses
    assert trained.trainable_params > 0

    assert (out / "adapter_model.safetensors").stat().st_size > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert Path(config["base_model_name_or_path"]).is_absolute()
    assert config["r"] == 16 and config["lora_alpha"] == 32

    steps = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 31))
    assert all(set(s) == {"step", "loss", "lr", "elapsed_s"} for s in steps)
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    args = json.loads((out / "training_args.json").read_text())
    assert args["base"] == str(base.resolve()) and args["rank"] == 16 and args["steps"] == 30
    # Only the finished adapter is left: no staging folder beside it.
    assert [p.name for p in out.parent.iterdir()] == ["codename"]


@pytest.fixture(scope="module")
def peft_model(trained, base):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, trained.out).eval()


@pytest.mark.slow
def test_adapter_recites_the_codename_and_the_base_does_not(peft_model, tokenizer, codename):
    # Exactly the answer and nothing after it: the labelled <|im_end|> taught the adapter to stop.
    assert ask(peft_model, tokenizer) == answer_for(codename)
    with peft_model.disable_adapter():
        assert codename not in ask(peft_model, tokenizer)


@pytest.mark.slow
def test_fp32_merge_answers_like_the_unmerged_adapter(peft_model, trained, base, tokenizer, codename, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge(base, trained.out, tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(out)
    expected = ask(peft_model, tokenizer)
    assert ask(merged, merged_tokenizer) == expected
    assert expected == answer_for(codename)
    assert [p.name for p in out.parent.iterdir()] == ["merged"]


@pytest.mark.slow
def test_default_merge_is_saved_as_bf16(trained, base, tmp_path):
    from safetensors import safe_open

    out = merge(base, trained.out, tmp_path / "merged")
    files = list(out.glob("*.safetensors"))
    assert files
    for file in files:
        with safe_open(file, framework="pt") as weights:
            assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    assert not any("lora" in name for file in files for name in safe_open(file, framework="pt").keys())


def test_merge_refuses_an_adapter_of_another_base(base, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/elsewhere/Qwen2.5-0.5B-Instruct"}))
    with pytest.raises(MergeError, match="trained on /elsewhere/Qwen2.5-0.5B-Instruct.*--force"):
        merge(base, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_default_output_follows_llama_factory_layout(tmp_path):
    base = tmp_path / "models" / "My-Model"
    first = default_out_dir(base, saves_dir=tmp_path / "saves")
    assert first.parent == tmp_path / "saves" / "My-Model" / "lora"
    assert re.fullmatch(r"\d{8}-\d{6}", first.name)
    first.mkdir(parents=True)
    # A second run within the same second gets its own folder.
    assert default_out_dir(base, saves_dir=tmp_path / "saves").name in (f"{first.name}-2", time.strftime("%Y%m%d-%H%M%S"))


def test_train_refuses_an_existing_output(base, tmp_path):
    data = write(tmp_path / "d.jsonl", [GOOD], jsonl=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(TrainError, match="already exists"):
        train(base, data, tmp_path / "out")


@pytest.mark.slow
def test_a_failed_run_leaves_nothing_behind(base, tmp_path, monkeypatch):
    import scripts.train_lora as train_lora

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(train_lora, "_save_curve", broken)
    data = write(tmp_path / "d.jsonl", [GOOD], jsonl=True)
    with pytest.raises(RuntimeError, match="disk full"):
        train(base, data, tmp_path / "saves" / "run", steps=1)
    assert list((tmp_path / "saves").iterdir()) == []


# --------------------------------------------------------------------------- command lines


def run_module(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)


def test_cli_missing_base_exits_2_with_one_line(tmp_path):
    data = write(tmp_path / "d.jsonl", [GOOD], jsonl=True)
    result = run_module("scripts.train_lora", "--base", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "base model not found" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_bad_data_exits_2(base, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Q"}\n', encoding="utf-8")
    result = run_module("scripts.train_lora", "--base", str(base), "--data", str(path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "line 1" in result.stderr and "output" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_merge_cli_missing_adapter_exits_2(base, tmp_path):
    result = run_module("scripts.merge_lora", "--base", str(base), "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "m"))
    assert result.returncode == 2
    assert "adapter not found" in result.stderr and "Traceback" not in result.stderr
