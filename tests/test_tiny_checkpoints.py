"""The tiny random-weight Qwen2.5, Qwen3 and Hunyuan dense checkpoints (scripts/build_tiny_checkpoints):
their configs keep the real models' traits, they load into transformers' own classes, their
tokenizers split text as llama.cpp's copy of the real vocabulary does, their templates render
the real layouts, and each converts with llama.cpp's converter into a GGUF that carries the same
template and end tokens and computes the same logits."""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import pytest

from app.services.backends.llamacpp import internals as llamacpp_internals
from app.services.checkpoints.gguf_metadata import read_gguf_header
from app.services.checkpoints.stop_tokens import gguf_stop_ids, hf_stop_ids_in
from scripts import build_tiny_checkpoints as tiny

NAMES = tiny.NAMES
TEXTS = [
    "Hello world! The quick brown fox jumps over 13 lazy dogs.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "  leading spaces, tabs\tand\nnew lines\n\n  1234567 3.14159 naïve café Ǆ 😀",
    "def f(x):\n    return x ** 2  # 平方",
]
QWEN_SPECIALS = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"


@pytest.fixture(scope="session")
def source(tiny_source):
    return tiny_source


@pytest.fixture(scope="session")
def checkpoints(tiny_checkpoints) -> dict[str, Path]:
    return tiny_checkpoints


def load_json(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text(encoding="utf-8"))


def tensor_shapes(folder: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}


@pytest.fixture(scope="session")
def tokenizers(checkpoints):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(path) for name, path in checkpoints.items()}


@pytest.fixture(scope="session")
def vocab_gguf(source):
    """llama.cpp's own tokenizer over the real Qwen2 vocabulary (no weights)."""
    import llama_cpp

    return llama_cpp.Llama(str(source / "ggml-vocab-qwen2.gguf"), vocab_only=True, verbose=False)


# -- configs -----------------------------------------------------------------------------------------
def test_qwen25_config_keeps_qwen25_traits(checkpoints):
    folder = checkpoints["qwen2.5"]
    config, shapes = load_json(folder, "config.json"), tensor_shapes(folder)
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in shapes
    assert config["rope_parameters"] == {"rope_theta": 1000000.0, "rope_type": "default"}
    assert config["rms_norm_eps"] == 1e-6 and config["hidden_act"] == "silu"
    assert config["use_sliding_window"] is False and config["sliding_window"] is None
    # 16 query heads to 2 key/value heads in Qwen2.5-3B; head_dim implied by hidden / heads
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 1) and "head_dim" not in config
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    attention = "model.layers.0.self_attn."
    assert shapes[attention + "q_proj.bias"] == [8 * head_dim]
    # rows of multiples of 32, so a q8_0 conversion quantises every matrix
    assert config["hidden_size"] % 32 == 0 and config["intermediate_size"] % 32 == 0
    assert shapes[attention + "k_proj.bias"] == shapes[attention + "v_proj.bias"] == [head_dim]
    assert attention + "o_proj.bias" not in shapes
    assert config["vocab_size"] == 151936 and (config["bos_token_id"], config["eos_token_id"]) == (151643, 151645)


def test_qwen3_config_keeps_qwen3_traits(checkpoints):
    folder = checkpoints["qwen3"]
    config, shapes = load_json(folder, "config.json"), tensor_shapes(folder)
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    # an explicit head_dim twice hidden / heads, as Qwen3-0.6B's 128 against 1024 / 16
    assert config["head_dim"] == 2 * config["hidden_size"] // config["num_attention_heads"]
    assert config["attention_bias"] is False and not [key for key in shapes if key.endswith(".bias")]
    attention = "model.layers.0.self_attn."
    assert shapes[attention + "q_norm.weight"] == shapes[attention + "k_norm.weight"] == [config["head_dim"]]
    assert shapes[attention + "q_proj.weight"] == [config["num_attention_heads"] * config["head_dim"], config["hidden_size"]]
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in shapes
    assert config["rope_parameters"]["rope_theta"] == 1000000.0 and config["max_position_embeddings"] == 40960
    assert config["vocab_size"] == 151936 and (config["bos_token_id"], config["eos_token_id"]) == (151643, 151645)


def test_hunyuan_config_keeps_hunyuan_dense_traits(checkpoints, tokenizers):
    folder = checkpoints["hunyuan-dense"]
    config, shapes = load_json(folder, "config.json"), tensor_shapes(folder)
    assert config["architectures"] == ["HunYuanDenseV1ForCausalLM"] and config["model_type"] == "hunyuan_v1_dense"
    assert config["rope_parameters"]["rope_type"] == "dynamic" and config["rope_parameters"]["alpha"] == 1000.0
    assert config["rope_parameters"]["rope_theta"] == 10000.0 and config["max_position_embeddings"] == 32768
    assert config["use_qk_norm"] is True and config["attention_bias"] is False and config["mlp_bias"] is False
    attention = "model.layers.0.self_attn."
    assert shapes[attention + "query_layernorm.weight"] == shapes[attention + "key_layernorm.weight"] == [config["head_dim"]]
    assert config["num_attention_heads"] // config["num_key_value_heads"] == 4  # 16 to 4, as Hunyuan-1.8B
    assert not [key for key in shapes if key.endswith(".bias")]
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in shapes
    tokenizer = tokenizers["hunyuan-dense"]
    assert config["vocab_size"] == len(tokenizer)
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids(tiny.HY_END_OF_ANSWER)
    assert config["eod_token_id"] == tokenizer.convert_tokens_to_ids(tiny.HY_EOD)
    assert config["bos_token_id"] == tokenizer.convert_tokens_to_ids(tiny.HY_BOS) == tokenizer.bos_token_id


@pytest.mark.parametrize("name", NAMES)
def test_loads_into_the_native_class_and_generates(name, checkpoints, tokenizers):
    import torch
    from transformers import AutoModelForCausalLM

    folder = checkpoints[name]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    expected = load_json(folder, "config.json")["architectures"][0]
    assert type(model).__name__ == expected and type(model).__module__.startswith("transformers.models.")
    assert model.dtype == torch.bfloat16
    tokenizer = tokenizers[name]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi"}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model.float()(ids).logits[0, -1]
    assert torch.isfinite(logits).all() and logits.std() > 0.01  # random, not flat
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 4) and int(out.max()) < model.config.vocab_size


# -- tokenizers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_splits_text_as_the_vocab_gguf_does(name, tokenizers, vocab_gguf):
    tokenizer = tokenizers[name]
    texts = TEXTS + ([QWEN_SPECIALS] if name != "hunyuan-dense" else [])
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == vocab_gguf.tokenize(text.encode("utf-8"), add_bos=False, special=True), text
        assert tokenizer.decode(ids) == text


def test_added_tokens_sit_at_the_real_ids(tokenizers):
    qwen25, qwen3 = tokenizers["qwen2.5"], tokenizers["qwen3"]
    assert len(qwen25) == 151665 and len(qwen3) == 151669
    for tokenizer in (qwen25, qwen3):
        assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "<|file_sep|>"]) == \
            [151643, 151644, 151645, 151657, 151664]
        assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert qwen3.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
    assert qwen3("<think>\nok\n</think>", add_special_tokens=False)["input_ids"] == [151667, 198, 562, 198, 151668]
    assert "<think>" not in qwen25.get_vocab()
    hunyuan = tokenizers["hunyuan-dense"]
    ids = hunyuan(tiny.HY_USER + "hi" + tiny.HY_ASSISTANT, add_special_tokens=False)["input_ids"]
    assert ids[0] == hunyuan.convert_tokens_to_ids(tiny.HY_USER) and ids[-1] == hunyuan.convert_tokens_to_ids(tiny.HY_ASSISTANT)
    assert len(ids) == 3


# -- templates and end tokens ------------------------------------------------------------------------
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_qwen_templates_are_the_real_ones(checkpoints, tokenizers, source):
    for name, file in (("qwen2.5", "Qwen-Qwen2.5-7B-Instruct.jinja"), ("qwen3", "Qwen-Qwen3-0.6B.jinja")):
        assert tokenizers[name].chat_template == (source / "templates" / file).read_text(encoding="utf-8")
    rendered = tokenizers["qwen2.5"].apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    qwen3 = tokenizers["qwen3"]
    assert qwen3.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert qwen3.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_hunyuan_template_writes_hunyuan_dense_layout_as_llama_cpp_does(tokenizers):
    import llama_cpp

    tokenizer = tokenizers["hunyuan-dense"]
    chat = [{"role": "system", "content": "Be brief."}, *CHAT]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == (tiny.HY_BOS + "Be brief." + tiny.HY_END_OF_SYSTEM + tiny.HY_USER
                        + "What is the capital of France?" + tiny.HY_ASSISTANT)
    # llama.cpp recognises the template as hunyuan-dense and writes the same turns (it adds BOS
    # when tokenising, not in the text)
    messages = (llama_cpp.llama_chat_message * len(chat))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in chat])
    buffer = ctypes.create_string_buffer(4096)
    length = llama_cpp.llama_chat_apply_template(tokenizer.chat_template.encode(), messages, len(chat), True, buffer, 4096)
    assert buffer.raw[:length].decode("utf-8") == rendered[len(tiny.HY_BOS):]
    # an answer closes with the end-of-answer token, and the next turn follows it
    answered = tokenizer.apply_chat_template(CHAT + [{"role": "assistant", "content": "Paris."}, *CHAT], tokenize=False)
    assert tiny.HY_ASSISTANT + "Paris." + tiny.HY_END_OF_ANSWER + tiny.HY_USER in answered


@pytest.mark.parametrize("name", NAMES)
def test_end_tokens(name, checkpoints, tokenizers):
    tokenizer = tokenizers[name]
    generation, config = load_json(checkpoints[name], "generation_config.json"), load_json(checkpoints[name], "config.json")
    if name == "hunyuan-dense":
        end_of_answer, eod = tokenizer.convert_tokens_to_ids([tiny.HY_END_OF_ANSWER, tiny.HY_EOD])
        assert generation["eos_token_id"] == [end_of_answer, eod]
        assert config["eos_token_id"] == tokenizer.eos_token_id == end_of_answer
    else:
        assert generation["eos_token_id"] == [151645, 151643] and generation["pad_token_id"] == 151643
        assert config["eos_token_id"] == tokenizer.eos_token_id == 151645


# -- the build itself --------------------------------------------------------------------------------
def test_build_is_cached_deterministic_and_leaves_nothing_behind(source, checkpoints, tmp_path):
    first = tiny.build_one("qwen3", tmp_path, source)
    assert first.status == "built" and 4 < first.weights_bytes / 1e6 < 30
    stamp_time = (tmp_path / "qwen3" / tiny.STAMP_NAME).stat().st_mtime_ns
    assert tiny.build_one("qwen3", tmp_path, source).status == "up to date"
    assert (tmp_path / "qwen3" / tiny.STAMP_NAME).stat().st_mtime_ns == stamp_time
    assert tiny.build_one("qwen3", tmp_path, source, force=True).status == "built"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen3"]  # no .partial or .old left
    for file in (checkpoints["qwen3"]).iterdir():
        assert (tmp_path / "qwen3" / file.name).read_bytes() == file.read_bytes(), file.name


def test_a_changed_recipe_is_rebuilt(source, tmp_path):
    tiny.build_one("qwen3", tmp_path, source)
    stamp = tmp_path / "qwen3" / tiny.STAMP_NAME
    stamp.write_text(json.dumps({"recipe_sha256": "an older recipe"}), encoding="utf-8")
    assert tiny.build_one("qwen3", tmp_path, source).status == "built"
    assert json.loads(stamp.read_text(encoding="utf-8"))["recipe_sha256"] != "an older recipe"


def test_missing_sdist_material_says_run_make_setup(tmp_path, capsys):
    with pytest.raises(tiny.TinyBuildError, match="make setup"):
        tiny.build_one("qwen2.5", tmp_path / "out", source=tmp_path / "nowhere")
    assert tiny.main(["--out", str(tmp_path / "out"), "--only", "qwen3", "--source", str(tmp_path / "nowhere")]) == 2
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# -- through llama.cpp -------------------------------------------------------------------------------
# llama.cpp ends generation on more tokens than the HF configs name, by their text
# (llama-vocab.cpp): <|fim_pad|>, <|repo_name|> and <|file_sep|> (FIM tokens) and "</s>",
# which in Qwen's BPE is a plain token (128247) that llama.cpp makes a control token.
LLAMA_CPP_EXTRA_STOPS = {
    "qwen2.5": {128247, 151662, 151663, 151664},
    "qwen3": {128247, 151662, 151663, 151664},
    "hunyuan-dense": {128247},
}


@pytest.fixture(scope="session")
def ggufs(tiny_ggufs):
    return tiny_ggufs


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_converts_to_gguf_with_the_same_template_end_tokens_and_logits(name, checkpoints, tokenizers, ggufs):
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizers[name]
    gguf = llama_cpp.Llama(str(ggufs[name]), n_ctx=256, n_threads=min(2, os.cpu_count() or 1), logits_all=True, verbose=False)
    try:
        assert gguf.metadata["tokenizer.chat_template"] == tokenizer.chat_template
        assert gguf.n_vocab() == load_json(checkpoints[name], "config.json")["vocab_size"]
        vocab = llamacpp_internals.vocab(gguf)
        generation = load_json(checkpoints[name], "generation_config.json")
        # the GGUF declares the generation config's end tokens (the conversion sees to it for Qwen)
        hf_stops = set(hf_stop_ids_in(checkpoints[name]))
        assert hf_stops == set(generation["eos_token_id"])
        assert set(gguf_stop_ids(read_gguf_header(ggufs[name]).metadata)) == hf_stops
        assert {llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)} == hf_stops
        # llama.cpp's own end-of-generation set is wider: it adds tokens by their text
        stops = {i for i in range(gguf.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)}
        assert stops == hf_stops | LLAMA_CPP_EXTRA_STOPS[name]
        # EOS stays the tokenizer's (templates print it as eos_token); Hunyuan's is the end of a document
        assert gguf.token_eos() == (generation["eos_token_id"][1] if name == "hunyuan-dense" else tokenizer.eos_token_id)
        assert gguf.token_bos() == load_json(checkpoints[name], "config.json")["bos_token_id"]

        chat = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "Name three colours."}]
        prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert gguf.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == ids
        gguf.eval(ids)
        gguf_logits = np.array(gguf.scores[: len(ids)])
    finally:
        gguf.close()
    model = AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32)
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits[0].numpy()
    # f16 weights of bf16 numbers are exact; what differs is llama.cpp's f16 arithmetic
    assert np.abs(hf_logits - gguf_logits).max() < 5e-3 * hf_logits.std()
    assert (hf_logits.argmax(-1) == gguf_logits.argmax(-1)).mean() >= 0.9
