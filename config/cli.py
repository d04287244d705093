"""run.py's command line, generated from the settings model: every field is a flag with the
field's description, type, choices and bounds, as llama-cpp-python generates its server's CLI
from its settings. Nested sections give ``--<section>-<field>`` (``--llamacpp-n-batch``); a field
may also declare a short flag (``Field(..., json_schema_extra={"flag": "--port"})``), and fields
that share one (``--n-ctx`` on the llama.cpp, transformers and remote sections) are set together.

Flags beat the environment, which beats the defaults.
"""
from __future__ import annotations

import argparse
import enum
import json
import types
import typing
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo

from config.settings import Settings

ENV_PREFIX = "MODEL_TEST_"


class LeafField(typing.NamedTuple):
    path: tuple[str, ...]  # ("llamacpp", "n_ctx")
    info: FieldInfo

    @property
    def long_flag(self) -> str:
        return "--" + "-".join(self.path).replace("_", "-")

    @property
    def short_flag(self) -> Optional[str]:
        extra = self.info.json_schema_extra
        return extra.get("flag") if isinstance(extra, dict) else None

    @property
    def env(self) -> str:
        return ENV_PREFIX + "__".join(part.upper() for part in self.path)


def leaf_fields(model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()) -> Iterator[LeafField]:
    for name, info in model.model_fields.items():
        section = info.annotation if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel) else None
        if section is not None:
            yield from leaf_fields(section, prefix + (name,))
        else:
            yield LeafField(prefix + (name,), info)


def _unwrap_optional(annotation: Any) -> Any:
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _bounds(info: FieldInfo) -> str:
    low = high = None
    for item in info.metadata:
        if isinstance(item, (Ge, Gt)):
            low = f"{'>=' if isinstance(item, Ge) else '>'} {getattr(item, 'ge', getattr(item, 'gt', None))}"
        if isinstance(item, (Le, Lt)):
            high = f"{'<=' if isinstance(item, Le) else '<'} {getattr(item, 'le', getattr(item, 'lt', None))}"
    return ", ".join(filter(None, [low, high]))


def _default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return "computed at start-up"
    if info.default is None:
        return "unset"
    return str(info.default)


def _argument(info: FieldInfo) -> dict:
    """argparse keywords for a field's type. Choices a field still accepts under an old name
    (``json_schema_extra={"old_choices": ...}``) are taken and left out of the help."""
    annotation = _unwrap_optional(info.annotation)
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = list(typing.get_args(annotation))
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        old = list(extra.get("old_choices", []))
        shown = {"metavar": "{" + ",".join(choices) + "}"} if old else {}
        return {"choices": choices + old, "type": type(choices[0]), **shown}
    if annotation in (int, float):
        return {"type": annotation, "metavar": "N" if annotation is int else "X"}
    if annotation in (str, SecretStr):
        return {"type": str}
    if annotation is Path:
        return {"type": str, "metavar": "PATH"}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"choices": [member.value for member in annotation]}
    return {"type": json.loads, "metavar": "JSON"}  # lists and mappings


class Flag(typing.NamedTuple):
    """One command-line flag: its names, where its value goes, its help, and argparse's keywords."""

    names: tuple[str, ...]
    dest: str  # "section/field", several joined by "|" for a flag that sets them together
    help: str
    group: str  # the settings section it is listed under ("" for the top level)
    options: dict


def _help_text(leaf: LeafField) -> str:
    bounds = _bounds(leaf.info)
    return " ".join(filter(None, [
        leaf.info.description or "",
        f"[{bounds}]" if bounds else "",
        f"(default: {_default_text(leaf.info)}; env {leaf.env})",
    ])).replace("%", "%%")


def flags() -> list[Flag]:
    """Every flag run.py takes: one per setting, and one per short flag shared by several sections."""
    leaves = list(leaf_fields())
    owners: dict[str, list[LeafField]] = defaultdict(list)
    for leaf in leaves:
        # a section class used twice (remote, judge_endpoint) keeps its short flags for its first use
        if leaf.short_flag and all(other.info is not leaf.info for other in owners[leaf.short_flag]):
            owners[leaf.short_flag].append(leaf)
    found = []
    for leaf in leaves:
        names = [leaf.long_flag]
        owned = leaf.short_flag and any(owner is leaf for owner in owners[leaf.short_flag])
        if owned and len(owners[leaf.short_flag]) == 1 and leaf.short_flag != leaf.long_flag:
            names.append(leaf.short_flag)
        options = _argument(leaf.info)
        if options.get("type") is str and "metavar" not in options:
            options["metavar"] = leaf.path[-1].upper()
        found.append(Flag(tuple(names), "/".join(leaf.path), _help_text(leaf), leaf.path[0] if len(leaf.path) > 1 else "", options))
    for flag, shared in owners.items():
        if len(shared) > 1:
            found.append(Flag((flag,), "|".join("/".join(leaf.path) for leaf in shared),
                              f"sets {', '.join(leaf.long_flag for leaf in shared)} together", "", _argument(shared[0].info)))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="model_test: chat with your fine-tuned checkpoints. Every flag is a setting of config/settings.py; "
        "each can also be given as the environment variable named in its help.",
        argument_default=argparse.SUPPRESS)
    groups: dict[str, Any] = {}
    for flag in flags():
        if "|" in flag.dest:  # a shared flag: on the parser itself, after the groups
            parser.add_argument(*flag.names, dest=flag.dest, help=flag.help, **flag.options)
            continue
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(f"{flag.group} settings" if flag.group else "the model to serve, and where files live")
        groups[flag.group].add_argument(*flag.names, dest=flag.dest, help=flag.help, **flag.options)
    return parser


def overrides_from(namespace: argparse.Namespace) -> dict:
    """The given flags as nested keyword arguments for Settings."""
    overrides: dict = {}
    for dest, value in vars(namespace).items():
        for path in dest.split("|"):
            *sections, name = path.split("/")
            target = overrides
            for section in sections:
                target = target.setdefault(section, {})
            target.setdefault(name, value)  # a field's own flag beats a shared one
    return overrides


def parse_settings(argv: Optional[Sequence[str]] = None) -> Settings:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    # the own flags (--llamacpp-n-ctx) are applied before the shared ones (--n-ctx), so they win
    ordered = argparse.Namespace(**dict(sorted(vars(namespace).items(), key=lambda item: "|" in item[0])))
    try:
        return Settings(**overrides_from(ordered))
    except ValidationError as exc:
        flags = {"/".join(leaf.path): leaf.long_flag for leaf in leaf_fields()}
        problems = "; ".join(f"{flags.get('/'.join(map(str, error['loc'])), '.'.join(map(str, error['loc'])))}: {error['msg']}"
                             for error in exc.errors())
        parser.error(problems)
