"""Builds tiny random-weight checkpoints of Qwen2.5, Qwen3 and Hunyuan dense, offline.

Each one keeps every architectural trait of the real model's config and is shrunk only in width
and depth (2 layers), so the tester's paths for these families (transformers, PEFT, the llama.cpp
converter, llama.cpp itself) can be exercised end to end in seconds, without the hub:

* ``qwen2.5``: Qwen2.5's config shrunk in width (hidden 64, 8 query heads to 1 key/value head as
  Qwen2.5-3B's 16 to 2, head_dim 8 = hidden / heads, intermediate 352 as 0.5B's 4864 / 896 rounded
  up to a multiple of 32), bias on q/k/v only, tied embeddings, rope_theta 1e6, rms_norm_eps 1e-6,
  no sliding window; the real tokenizer and template (that of every Qwen2.5 Instruct size).
* ``qwen3``: Qwen3-0.6B's config (hidden 64, 4 heads to 2 as 16 to 8, an explicit head_dim 32 that
  is twice hidden / heads as 128 is to 1024 / 16), q/k RMSNorm before the rotary embedding, no
  attention bias, tied embeddings, rope_theta 1e6; the real tokenizer and template.
* ``hunyuan-dense``: Hunyuan-1.8B-Instruct's config (HunYuanDenseV1ForCausalLM, hidden 64, 4 heads
  to 1 as 16 to 4, explicit head_dim, q/k RMSNorm *after* the rotary embedding, NTK-alpha rope
  written as rope_scaling type "dynamic" with alpha 1000 on rope_theta 1e4 and 32k positions,
  rms_norm_eps 1e-5, no biases, tied embeddings). Its tokenizer and template are stand-ins, below.

The tokenizers come from the vocab-only GGUFs and the chat templates from ``models/templates/``
that the llama-cpp-python sdist vendors (``make setup`` extracts them beside the converter). The
Qwen2 vocab GGUF is the byte-level BPE that Qwen2, Qwen2.5 and Qwen3 share (pre-tokenizer
"qwen2"; ``ggml-vocab-qwen35.gguf`` is the same vocabulary with Qwen3.5's pre-tokenizer, not
Qwen3's), but it carries only three special tokens; the added tokens each family puts after the
151,643 BPE tokens (Qwen2.5: 22, Qwen3: 26 with ``<think>``/``</think>``) are written here at their
real ids, marked special or not as the real ``tokenizer_config.json`` marks them.

Hunyuan dense stand-in: neither the sdist nor any package we can install ships Hunyuan dense's
tokenizer (a 120,818-token BPE with DeepSeek-V3's pre-tokenizer and ``<｜hy_…｜>`` specials) or
its Jinja template. ``templates/tencent-Hy3.jinja`` is Tencent's template for Hy3, a different
model (HYV3 MoE) whose ``<｜hy_User:opensource｜>`` family of tokens exists in no vocabulary we
have. So the checkpoint uses the Qwen2 BPE (the only vocab GGUF whose pre-tokenizer the
converter recognises, and a Chinese/English one) plus Hunyuan dense's own turn tokens appended
after it, with a template that writes Hunyuan dense's turn layout as llama.cpp's built-in
``hunyuan-dense`` template does for tencent/Hunyuan-4B-Instruct (src/llama-chat.cpp in the same
sdist): ``[system]<｜hy_place▁holder▁no▁3｜><｜hy_User｜>[user]<｜hy_Assistant｜>[answer]
<｜hy_place▁holder▁no▁2｜>``, starting with the BOS token as Hunyuan's HF templates do. The token
spellings are Hunyuan's; their ids are not (the real ones lie above 120,000). As in the real
configs, ``eos_token_id`` is the end of an answer (``<｜hy_place▁holder▁no▁2｜>``) and
``eod_token_id`` the end of a document, and generation_config.json names both, end of answer
first, which is how llama.cpp's converter picks the EOT and EOS tokens of a Hunyuan dense GGUF.

Sizes (bf16, tied embeddings): 9.8-9.9M parameters, 20 MB of weights each; the 151k-token
vocabulary is nearly all of it, and each tokenizer.json adds 11 MB. All three are 64 wide: at 32
(tried first) a hidden state has too few directions to make every one of 151k random embeddings
the greedy pick, so a LoRA could not teach Qwen3 its ``</think>`` or Hunyuan a word starting
" Z" (measured: the loss stopped at 2.2-2.4 whatever the steps, rank or learning rate). Every matrix has rows of a multiple of 32, so a q8_0 conversion really quantises them
(llama.cpp's converter keeps a tensor whose rows do not fit q8_0's 32-wide blocks in f16, which
is why Qwen2.5 is 64 wide: 0.5B's own 14:2 grouping divided down gives rows of 56).

Weights are initialised by transformers from a fixed seed, in fp32, then the biases and norm
weights (zeros and ones by default) are drawn at random too, so that a converter which drops,
swaps or misplaces one of them changes the outputs; stored as bf16, as the real checkpoints
are. The final norm's weights are drawn around ``FINAL_NORM_SCALE`` (20) rather than 1: with
transformers' 0.02 init and tied embeddings, a 64-wide model's logits would spread by about 0.15
(a trained model's by several units), every answer would be nearly uniform over the vocabulary
(a loss that cannot fall below ~11) and a fine-tune could tip the greedy pick only by a hair that
bf16 or q8_0 rounding undoes. At 20 they spread by about 3, and a LoRA that learns one fact
drives its loss to ~0.001 in 30 steps. A uniform scale of the logits changes no greedy pick of
the random model itself. The same inputs give the same bytes. A folder is rebuilt only when its recipe (config,
tokens, template, vocab file, this script, library versions) differs from the one recorded in
its ``tiny_recipe.json``; it is built beside its final place under a hidden ``.partial`` name
and renamed when complete.

    python -m scripts.build_tiny_checkpoints [--out models/tiny] [--only NAME] [--force] [--source DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from config.settings import Settings
from scripts.convert_to_gguf import ConvertError, converter_dir, staged, staging_path

log = logging.getLogger("build_tiny_checkpoints")

SEED = 1234
STAMP_NAME = "tiny_recipe.json"
# Drawn for the biases and the norm weights (around 1), on top of transformers' own init.
BIAS_STD = 0.02
NORM_STD = 0.1
# The final norm's weights are drawn around this instead of 1, for logits that spread as a trained
# model's do (see the module docstring).
FINAL_NORM_SCALE = 20.0
FINAL_NORM = "model.norm.weight"

# Qwen2.5's and Qwen3's added tokens, in id order from 151643 (the end of the BPE vocabulary),
# each with the "special" flag of the real tokenizer_config.json.
QWEN25_ADDED = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
QWEN3_ADDED = QWEN25_ADDED + (
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)

HY_BOS = "<｜hy_begin▁of▁sentence｜>"
HY_EOD = "<｜hy_end▁of▁sentence｜>"
HY_PAD = "<｜hy_pad｜>"
HY_USER = "<｜hy_User｜>"
HY_ASSISTANT = "<｜hy_Assistant｜>"
HY_END_OF_ANSWER = "<｜hy_place▁holder▁no▁2｜>"
HY_END_OF_SYSTEM = "<｜hy_place▁holder▁no▁3｜>"
HUNYUAN_ADDED = tuple((token, True) for token in (
    HY_BOS, HY_EOD, HY_PAD, HY_USER, HY_ASSISTANT, HY_END_OF_ANSWER, HY_END_OF_SYSTEM))

# BOS comes from the variable, not spelled out: llama.cpp tells Hunyuan dense's layout from
# Hunyuan VL's by the literal BOS, which only the VL template contains.
HUNYUAN_DENSE_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages and messages[0]['role'] == 'system' %}\n"
    "    {{- messages[0]['content'] + '" + HY_END_OF_SYSTEM + "' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {{- '" + HY_USER + "' + message['content'] }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- '" + HY_ASSISTANT + "' + message['content'] + '" + HY_END_OF_ANSWER + "' }}\n"
    "    {%- elif not (message['role'] == 'system' and loop.first) %}\n"
    "        {{- raise_exception('Hunyuan dense takes one leading system message, then user and assistant turns') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '" + HY_ASSISTANT + "' }}\n"
    "{%- endif %}\n"
)


class TinyBuildError(Exception):
    """A checkpoint cannot be built; the message is one line a user can act on."""


@dataclass(frozen=True)
class Recipe:
    """One tiny checkpoint. Token ids in ``config``/``generation`` are written as token texts
    (resolved against the built tokenizer), so one table says both what and where."""

    name: str
    reference: str  # the real checkpoint whose config this follows
    vocab_gguf: str  # in the sdist's vendor/llama.cpp/models/
    added_tokens: tuple  # (text, special) appended after the BPE vocabulary, in id order
    tokenizer: dict  # special token roles (texts) and tokenizer_config settings
    config: dict
    generation: dict
    template_file: Optional[str] = None  # in models/templates/, else template_text
    template_text: Optional[str] = None
    vocab_size: Optional[int] = None  # the embedding rows; None: as many as the tokenizer has tokens
    stand_in: str = ""
    real_ids: dict = field(default_factory=dict)  # token -> id in the real tokenizer, checked


QWEN_TOKENIZER = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                  "model_max_length": 131072}

RECIPES = {
    "qwen2.5": Recipe(
        name="qwen2.5",
        reference="Qwen/Qwen2.5-0.5B-Instruct",
        vocab_gguf="ggml-vocab-qwen2.gguf",
        template_file="Qwen-Qwen2.5-7B-Instruct.jinja",  # the one template of every Qwen2.5 Instruct size
        added_tokens=QWEN25_ADDED,
        tokenizer=QWEN_TOKENIZER,
        vocab_size=151936,
        config={
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "hidden_size": 64, "intermediate_size": 352, "num_hidden_layers": 2,
            "num_attention_heads": 8, "num_key_value_heads": 1,
            "hidden_act": "silu", "max_position_embeddings": 32768, "initializer_range": 0.02,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
            "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 2,
            "attention_dropout": 0.0, "use_cache": True,
            "bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>",
        },
        generation={
            "bos_token_id": "<|endoftext|>", "pad_token_id": "<|endoftext|>",
            "eos_token_id": ["<|im_end|>", "<|endoftext|>"],
            "do_sample": True, "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
        },
        real_ids={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|file_sep|>": 151664},
    ),
    "qwen3": Recipe(
        name="qwen3",
        reference="Qwen/Qwen3-0.6B",
        vocab_gguf="ggml-vocab-qwen2.gguf",
        template_file="Qwen-Qwen3-0.6B.jinja",
        added_tokens=QWEN3_ADDED,
        tokenizer=QWEN_TOKENIZER,
        vocab_size=151936,
        config={
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "attention_bias": False, "hidden_act": "silu", "max_position_embeddings": 40960,
            "initializer_range": 0.02, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
            "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": 2, "attention_dropout": 0.0, "use_cache": True,
            "bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>",
        },
        generation={
            "bos_token_id": "<|endoftext|>", "pad_token_id": "<|endoftext|>",
            "eos_token_id": ["<|im_end|>", "<|endoftext|>"],
            "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
        },
        real_ids={"<|endoftext|>": 151643, "<|im_end|>": 151645, "<think>": 151667, "</think>": 151668},
    ),
    "hunyuan-dense": Recipe(
        name="hunyuan-dense",
        reference="tencent/Hunyuan-1.8B-Instruct",
        vocab_gguf="ggml-vocab-qwen2.gguf",
        template_text=HUNYUAN_DENSE_TEMPLATE,
        added_tokens=HUNYUAN_ADDED,
        tokenizer={"eos_token": HY_END_OF_ANSWER, "pad_token": HY_PAD, "bos_token": HY_BOS,
                   "model_max_length": 32768},
        config={
            "architectures": ["HunYuanDenseV1ForCausalLM"], "model_type": "hunyuan_v1_dense",
            "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
            "attention_bias": False, "mlp_bias": False, "use_qk_norm": True, "use_rotary_pos_emb": True,
            "norm_type": "rms", "hidden_act": "silu", "max_position_embeddings": 32768,
            "initializer_range": 0.02, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0, "beta_fast": 32, "beta_slow": 1,
                             "mscale": 1.0, "mscale_all_dim": 1.0},
            "tie_word_embeddings": True, "attention_dropout": 0.0, "use_cache": True, "pretraining_tp": 1,
            "bos_token_id": HY_BOS, "eos_token_id": HY_END_OF_ANSWER, "eod_token_id": HY_EOD, "pad_token_id": HY_PAD,
        },
        generation={
            "bos_token_id": HY_BOS, "pad_token_id": HY_PAD, "eos_token_id": [HY_END_OF_ANSWER, HY_EOD],
            "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
        },
        stand_in=("tokenizer: the Qwen2 BPE of ggml-vocab-qwen2.gguf plus Hunyuan dense's turn tokens, "
                  "as Hunyuan dense's own vocabulary ships nowhere we can install from; template: Hunyuan "
                  "dense's turn layout as llama.cpp's built-in hunyuan-dense template writes it, as its "
                  "Jinja template ships nowhere either (tencent-Hy3.jinja is Hy3's, with Hy3's tokens)"),
    ),
}
NAMES = tuple(RECIPES)


# -- where the material is -------------------------------------------------------------------------
def default_source() -> Path:
    """The sdist's vendor/llama.cpp/models, as ``make setup`` extracts it beside the converter."""
    return converter_dir() / "models"


def default_out() -> Path:
    return Settings().models_dir / "tiny"


def _material(source: Path, relative: str) -> Path:
    path = source / relative
    if not path.is_file():
        raise TinyBuildError(
            f"{path} is missing (llama.cpp's vocab GGUFs and chat templates from the llama-cpp-python sdist); "
            f"run `make setup`, which extracts them into {source}"
        )
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def template_of(recipe: Recipe, source: Path) -> str:
    if recipe.template_text is not None:
        return recipe.template_text
    # Read as bytes: the file is the hub's template verbatim, trailing newline included.
    return _material(source, f"templates/{recipe.template_file}").read_bytes().decode("utf-8")


def recipe_digest(recipe: Recipe, source: Path) -> str:
    """What decides the bytes of a build: change any of it and the checkpoint is rebuilt."""
    import tokenizers
    import torch
    import transformers

    parts = {
        "recipe": asdict(recipe),
        "template": _sha256(template_of(recipe, source).encode("utf-8")),
        "vocab": _sha256(_material(source, recipe.vocab_gguf).read_bytes()),
        "script": _sha256(Path(__file__).read_bytes()),
        "seed": SEED,
        "versions": [torch.__version__, transformers.__version__, tokenizers.__version__],
    }
    return _sha256(json.dumps(parts, sort_keys=True, ensure_ascii=True).encode("ascii"))


def read_stamp(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_current(folder: Path, digest: str) -> bool:
    stamp = read_stamp(folder)
    return bool(stamp) and stamp.get("recipe_sha256") == digest and (folder / "config.json").is_file()


# -- the tokenizer ---------------------------------------------------------------------------------
def build_tokenizer(recipe: Recipe, source: Path):
    """The BPE vocabulary and merges of the vocab GGUF, in the tokenizer class of the family, with
    the recipe's added tokens at the ids that follow the BPE tokens and the chat template set."""
    from tokenizers import AddedToken
    from transformers.integrations.gguf.gguf_tokenizer_mapping import get_gguf_tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    gguf = _material(source, recipe.vocab_gguf)
    # The same reading of the file as AutoTokenizer.from_pretrained(gguf_file=...) does; the
    # tokenizer is then built as the family's own tokenizer.json describes it (NFC, its split
    # regex, byte-level BPE), which the GGUF route does not reproduce in full.
    _, tokens, _ = get_gguf_tokenizer(str(gguf))
    if tokens.get("pre_tokenizer_type") != "qwen2" or tokens.get("tokenizer_type") != "gpt2":
        raise TinyBuildError(f"{gguf.name} is not the Qwen2 byte-level BPE "
                             f"(tokenizer {tokens.get('tokenizer_type')!r}, pre {tokens.get('pre_tokenizer_type')!r})")
    # NORMAL tokens only: the file's CONTROL tokens are the three Qwen specials, and its
    # USER_DEFINED [PAD...] entries fill the embedding rows no token uses.
    vocab = {token: index for index, (token, kind) in enumerate(zip(tokens["tokens"], tokens["token_type"])) if kind == 1}
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise TinyBuildError(f"{gguf.name}: the BPE tokens do not take ids 0..{len(vocab) - 1}")
    merges = [tuple(merge.split(" ")) for merge in tokens["merges"]]
    settings = dict(recipe.tokenizer)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None,
                               pad_token=None, clean_up_tokenization_spaces=False,
                               model_max_length=settings.pop("model_max_length"))
    tokenizer.add_tokens([AddedToken(text, special=special, normalized=False) for text, special in recipe.added_tokens])
    # As Qwen's tokenizer_config.json lists them: every special added token but the padding one.
    extra = [text for text, special in recipe.added_tokens if special and text != settings.get("pad_token")]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    for role, text in settings.items():
        setattr(tokenizer, role, text)
    tokenizer.chat_template = template_of(recipe, source)

    _check_token_ids(recipe, tokenizer, tokens, len(vocab))
    return tokenizer


def _check_token_ids(recipe: Recipe, tokenizer, gguf_tokens: dict, n_bpe: int) -> None:
    """Each added token at the id it should have; the GGUF's own specials where the family has them."""
    for offset, (text, _) in enumerate(recipe.added_tokens):
        if tokenizer.convert_tokens_to_ids(text) != n_bpe + offset:
            raise TinyBuildError(f"{recipe.name}: {text} got id {tokenizer.convert_tokens_to_ids(text)}, not {n_bpe + offset}")
    for text, expected in recipe.real_ids.items():
        if tokenizer.convert_tokens_to_ids(text) != expected:
            raise TinyBuildError(f"{recipe.name}: {text} has id {tokenizer.convert_tokens_to_ids(text)}; the real tokenizer has {expected}")
    if not recipe.stand_in:
        for index, (text, kind) in enumerate(zip(gguf_tokens["tokens"], gguf_tokens["token_type"])):
            if kind == 3 and tokenizer.convert_tokens_to_ids(text) != index:
                raise TinyBuildError(f"{recipe.name}: the vocab GGUF has {text} at {index}, the tokenizer at "
                                     f"{tokenizer.convert_tokens_to_ids(text)}")


def _resolve(value, tokenizer):
    """A token text (or a list of them) as its id."""
    if isinstance(value, list):
        return [_resolve(item, tokenizer) for item in value]
    if isinstance(value, str):
        token_id = tokenizer.convert_tokens_to_ids(value)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != value:
            raise TinyBuildError(f"{value} is not a token of the tokenizer")
        return token_id
    return value


ID_KEYS = ("bos_token_id", "eos_token_id", "eod_token_id", "pad_token_id")


# -- the model -------------------------------------------------------------------------------------
def build_model(recipe: Recipe, tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    fields = {key: _resolve(value, tokenizer) if key in ID_KEYS else value for key, value in recipe.config.items()}
    fields["vocab_size"] = recipe.vocab_size or len(tokenizer)
    if fields["vocab_size"] < len(tokenizer):
        raise TinyBuildError(f"{recipe.name}: vocab_size {fields['vocab_size']} < {len(tokenizer)} tokens")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.dtype = torch.bfloat16  # as the real checkpoints are stored

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if type(model).__name__ != recipe.config["architectures"][0]:
        raise TinyBuildError(f"{recipe.name}: transformers built {type(model).__name__}, "
                             f"not {recipe.config['architectures'][0]}")
    _randomise_biases_and_norms(model)
    model = model.to(torch.bfloat16)
    generation = {key: _resolve(value, tokenizer) if key in ID_KEYS else value for key, value in recipe.generation.items()}
    model.generation_config = GenerationConfig(**generation)
    return model


def _randomise_biases_and_norms(model) -> None:
    import torch

    generator = torch.Generator().manual_seed(SEED + 1)
    parameters = dict(model.named_parameters())
    if FINAL_NORM not in parameters:
        raise TinyBuildError(f"{type(model).__name__} has no {FINAL_NORM}")
    with torch.no_grad():
        for name, parameter in sorted(parameters.items()):
            if name.endswith(".bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * BIAS_STD)
            elif "norm" in name and name.endswith(".weight"):
                scale = FINAL_NORM_SCALE if name == FINAL_NORM else 1.0
                parameter.copy_(scale * (1.0 + torch.randn(parameter.shape, generator=generator) * NORM_STD))


# -- one checkpoint --------------------------------------------------------------------------------
@dataclass
class Built:
    name: str
    path: Path
    status: str  # "built" or "up to date"
    weights_bytes: int
    folder_bytes: int
    parameters: int


def _facts(name: str, path: Path, status: str) -> Built:
    from safetensors import safe_open

    weights = sorted(path.glob("*.safetensors"))
    parameters = 0
    for file in weights:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                count = 1
                for dim in handle.get_slice(key).get_shape():
                    count *= dim
                parameters += count
    return Built(name, path, status, sum(p.stat().st_size for p in weights),
                 sum(p.stat().st_size for p in path.iterdir() if p.is_file()), parameters)


def build_one(name: str, out_dir: Path, source: Optional[Path] = None, force: bool = False) -> Built:
    """Builds ``out_dir/name`` unless its recorded recipe is the current one (or ``force``)."""
    if name not in RECIPES:
        raise TinyBuildError(f"unknown checkpoint {name!r}; choose one of {', '.join(NAMES)}")
    recipe = RECIPES[name]
    source = Path(source) if source is not None else default_source()
    target = Path(out_dir) / name
    digest = recipe_digest(recipe, source)
    if not force and is_current(target, digest):
        log.info("%s is up to date (%s)", target, STAMP_NAME)
        return _facts(name, target, "up to date")

    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(recipe, source)
    model = build_model(recipe, tokenizer)
    with staged(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        stamp = {
            "recipe_sha256": digest,
            "reference": recipe.reference,
            "vocab_gguf": recipe.vocab_gguf,
            "chat_template": recipe.template_file or "built in (scripts/build_tiny_checkpoints.py)",
            "stand_in": recipe.stand_in or None,
            "seed": SEED,
        }
        (staging / STAMP_NAME).write_text(json.dumps(stamp, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _replace_dir(staging, target)
    built = _facts(name, target, "built")
    log.info("built %s: %s, %.2fM parameters, %.1f MB of weights, %.1f MB in all, in %.1f s", target,
             recipe.config["architectures"][0], built.parameters / 1e6, built.weights_bytes / 1e6,
             built.folder_bytes / 1e6, time.perf_counter() - started)
    return built


def _replace_dir(staging: Path, target: Path) -> None:
    """Puts the finished folder in place; an old one is moved aside first and dropped after, so
    ``target`` is at every moment either the old checkpoint, absent, or the new one."""
    old = staging_path(target, ".old") if target.exists() else None
    if old is not None:
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_all(out_dir: Path, names=NAMES, source: Optional[Path] = None, force: bool = False) -> list[Built]:
    # Everything is on disk; a missing file must fail, not turn into a hub download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return [build_one(name, out_dir, source, force) for name in names]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where the checkpoint folders go (default models/tiny)")
    parser.add_argument("--only", choices=NAMES, action="append", help="build this one only (repeatable)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the recorded recipe is current")
    parser.add_argument("--source", type=Path, default=None,
                        help="the sdist's vendor/llama.cpp/models folder (default: beside the converter make setup extracts)")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        results = build_all(args.out or default_out(), args.only or NAMES, args.source, args.force)
    except (TinyBuildError, ConvertError) as exc:
        log.error("%s", exc)
        return 2
    for built in results:
        print(f"{built.name:14} {built.status:10} {built.parameters / 1e6:5.2f}M params  "
              f"{built.weights_bytes / 1e6:5.1f} MB weights  {built.folder_bytes / 1e6:5.1f} MB  {built.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
