"""Which ids end an answer (app/services/checkpoints/stop_tokens.py): the rule for each checkpoint
format, how a GGUF header lays out a generation config's ids, and the embedded default model's
GGUF and checkpoint agreeing on them."""
from __future__ import annotations

import json

import pytest

from app.services.checkpoints.gguf_metadata import read_gguf_header
from app.services.checkpoints.stop_tokens import (
    GGUF_STOP_KEYS,
    gguf_declared,
    gguf_end_tokens,
    gguf_stop_ids,
    hf_stop_ids,
    hf_stop_ids_in,
)
from scripts import convert_to_gguf


def test_hf_rule_takes_the_first_source_that_names_an_id():
    assert hf_stop_ids([151645, 151643], 151645, 151645) == (151645, 151643)
    assert hf_stop_ids(2, [0, 2], 0) == (2,)  # not merged with the config's or the tokenizer's
    assert hf_stop_ids(None, 7, 9) == (7,) and hf_stop_ids([], None, 9) == (9,)
    assert hf_stop_ids([5, 5, 6]) == (5, 6) and hf_stop_ids(None) == ()
    assert hf_stop_ids([True, -1, "x", 3]) == (3,)  # only ids


def test_hf_rule_reads_the_files_of_a_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert hf_stop_ids_in(tmp_path) == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 2]}))
    assert hf_stop_ids_in(tmp_path) == (4, 2)
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": 8}}))
    assert hf_stop_ids_in(tmp_path) == (8,)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 11, "content": "<|im_end|>"}]}))
    assert hf_stop_ids_in(tmp_path) == (11,)


def test_gguf_rule_is_the_declared_eos_eot_and_eom():
    metadata = {GGUF_STOP_KEYS["eos"]: 151645, GGUF_STOP_KEYS["eot"]: 151643, "tokenizer.ggml.padding_token_id": 151643}
    assert gguf_stop_ids(metadata) == (151645, 151643)
    assert gguf_declared(metadata) == {"eos": 151645, "eot": 151643, "eom": None}
    assert gguf_stop_ids({GGUF_STOP_KEYS["eos"]: 2, GGUF_STOP_KEYS["eot"]: 2}) == (2,)
    assert gguf_stop_ids({}) == ()


@pytest.mark.parametrize("wanted, declared, layout, left_out", [
    # Qwen2.5 / Qwen3: the converter declares the tokenizer's EOS only; <|endoftext|> becomes the EOT
    ([151645, 151643], {"eos": 151645}, {"eos": 151645, "eot": 151643, "eom": None}, []),
    # Hunyuan dense: llama.cpp's converter declares both already (EOS = end of document)
    ([151648, 151644], {"eos": 151644, "eot": 151648}, {"eos": 151644, "eot": 151648, "eom": None}, []),
    # SmolLM2: one id, declared
    ([2], {"eos": 2}, {"eos": 2, "eot": None, "eom": None}, []),
    # an EOS the generation config does not name is replaced, a stray EOT dropped
    ([7], {"eos": 3, "eot": 4}, {"eos": 7, "eot": None, "eom": None}, []),
    # more than three: the header has no room for the fourth
    ([1, 2, 3, 4], {"eos": 2}, {"eos": 2, "eot": 1, "eom": 3}, [4]),
])
def test_a_generation_configs_ids_laid_out_in_a_gguf_header(wanted, declared, layout, left_out):
    got, rest = gguf_end_tokens(wanted, declared)
    assert (got, rest) == (layout, left_out)
    assert set(gguf_stop_ids({GGUF_STOP_KEYS[r]: t for r, t in got.items() if t is not None})) == set(wanted) - set(left_out)


def test_the_default_gguf_and_its_checkpoint_stop_on_the_same_ids(default_gguf, default_hf_checkpoint):
    """scripts/build_default_checkpoint.py writes the GGUF's declared ids into the checkpoint."""
    assert gguf_stop_ids(read_gguf_header(default_gguf).metadata) == hf_stop_ids_in(default_hf_checkpoint) == (2,)


def test_an_unknown_architecture_from_the_converters_own_words():
    """When TEXT_MODEL_MAP cannot be read, the converter's own failure line says the same thing."""
    reason = convert_to_gguf.failure_reason(["Model FooBarForCausalLM is not supported"], [], 1)
    assert reason.startswith("llama.cpp's converter (llama-cpp-python ") and "does not know architecture FooBarForCausalLM" in reason
