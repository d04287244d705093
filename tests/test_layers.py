"""The tree shows the architecture: each folder of app/ is a layer, and a module imports only from
its own layer or below, so nothing reaches back up and there are no import circles. run.py's
flags are generated from the settings model, so a new setting is a flag without a line more."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from config.cli import flags, leaf_fields, parse_settings
from config.settings import PROJECT_ROOT

APP = PROJECT_ROOT / "app"

# Top to bottom. evals and arena sit above engine: an eval runs its rows through the engine's
# slots, a blind comparison its prompt through the compare columns. What both keep on disk is one
# layer under them, so neither imports the other.
LAYERS = [
    ("app", 10),  # the factory
    ("app.routes", 9),
    ("app.services.evals", 8),
    ("app.services.arena", 8),
    ("app.services.records", 7),
    ("app.services.engine", 6),
    ("app.services.catalog", 5),
    ("app.services.backends", 4),
    ("app.services.checkpoints", 3),
    ("app.services.core", 2),
    ("app.services.system", 2),
    ("app.logging_setup", 1),
    ("app.version", 0),
]


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def rank(module: str) -> int:
    """The rank of the most specific layer the module belongs to."""
    best = max((prefix for prefix, _ in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return dict(LAYERS)[best]


def app_imports(path: Path) -> set[str]:
    """Every app module this file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import (ruff's TID252 should have caught it)"
            if node.module.split(".")[0] == "app":
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "app")
    return found


MODULES = {module_name(path): path for path in APP.rglob("*.py")}


def test_every_module_is_in_a_layer():
    unplaced = [name for name, path in MODULES.items()
                if name != "app" and rank(name) == dict(LAYERS)["app"] and path.read_text().strip()]  # empty package markers aside
    assert unplaced == [], "modules outside every layer folder: put them in one (or name the layer here)"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_or_sideways(module):
    upward = [target for target in app_imports(MODULES[module])
              if target != "app" and rank(target) > rank(module)]
    assert upward == [], f"{module} (layer rank {rank(module)}) imports up into {upward}"


def find_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    circles = []

    def visit(node, stack):
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return circles


def test_no_import_circles_between_modules():
    # a package importing its own children is not a circle unless a child imports the package back
    graph = {name: {target for target in app_imports(path) if target in MODULES and target != name}
             for name, path in MODULES.items()}
    assert find_circles(graph) == []


def package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def test_no_import_circles_between_packages():
    """Modules can avoid a circle while their packages close one (evals -> arena -> evals)."""
    graph: dict[str, set[str]] = {package_of(name): set() for name in MODULES}
    for name, path in MODULES.items():
        source = package_of(name)
        for target in app_imports(path):
            if target in MODULES and package_of(target) != source and not package_of(target).startswith(source + ".") \
                    and not source.startswith(package_of(target) + "."):
                graph[source].add(package_of(target))
    assert find_circles(graph) == []


def test_every_setting_is_a_flag_with_its_description_and_bounds():
    options = {name: flag for flag in flags() for name in flag.names}
    for leaf in leaf_fields():
        action = options[leaf.long_flag]
        assert leaf.env in action.help, leaf.long_flag
        if leaf.info.description:
            assert leaf.info.description[:30].replace("%", "%%") in action.help, leaf.long_flag
    assert "[>= 64, <= 1048576]" in options["--llamacpp-n-ctx"].help
    assert {"--port", "--host", "--api-key", "--dtype", "--base-url", "--remote-model", "--n-ctx", "--n-threads"} <= set(options)


def test_flags_set_nested_settings_and_shared_flags_set_every_section():
    settings = parse_settings(["--limits-max-queue", "3", "--n-ctx", "1024", "--llamacpp-n-ctx", "512",
                               "--no-server-hugepages", "--model-roots", '["/data/models"]'])
    assert settings.limits.max_queue == 3
    assert settings.llamacpp.n_ctx == 512  # its own flag beats the shared one
    assert settings.transformers.n_ctx == 1024 and settings.remote.n_ctx == 1024
    assert settings.server.hugepages is False
    assert settings.model_roots == [Path("/data/models")]


def test_a_flag_out_of_bounds_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--limits-max-queue", "-1"])
    assert exit_info.value.code == 2
    assert "--limits-max-queue" in capsys.readouterr().err
