"""lean's modules stand on floors: each imports only from floors below its own, so data flows one way and no
import cycle can form. A new module gets a floor here, or this test fails."""

import ast
from pathlib import Path

import pytest

LEAN = Path(__file__).resolve().parent.parent / "lean"
FLOORS = [
    "errors progress masks targets sampling canvas internals heads paste graphs",  # plain data, torch alone
    "files config cli download example images weights optim distributed frozen_norm roi_align transform "
    "speed background coco_fields cache.format cache.verify ema board",
    "coco pennfudan synthetic cache.writer cache.reader cache.export cache.__main__ staging monitor model plot engine "
    "augment",
    "sources cache loader checkpoint deployed",
    "cache.command evaluate predict",
    "scoring export",
    "train",
]
FLOOR = {f"lean.{name}": level for level, names in enumerate(FLOORS) for name in names.split()}
NO_TORCH = ("lean.sampling", "lean.masks", "lean.targets", "lean.canvas", "lean.config")  # pure numpy or Python
NO_TORCH_ON_IMPORT = ("lean.cli", "lean.cache", "lean.cache.__main__")  # they start before torch loads: Ctrl-C


def module_name(path):
    parts = path.relative_to(LEAN.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path, top_level_only=False):
    """The modules a file imports: everywhere in it, or only at its top level (what importing it runs)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "lean":  # from lean import checkpoint, ...
                found |= {f"lean.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(path): path for path in sorted(LEAN.rglob("*.py")) if module_name(path) != "lean"}


def test_every_module_has_a_floor():
    assert sorted(set(MODULES) - set(FLOOR)) == []
    assert sorted(set(FLOOR) - set(MODULES)) == []  # no floor names a module that is gone


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_from_the_floors_below_it(name):
    above = {
        module: FLOOR[module]
        for module in imports(MODULES[name])
        if module in FLOOR and module != name and FLOOR[module] >= FLOOR[name]
    }
    assert above == {}, f"{name} (floor {FLOOR[name]}) imports from its floor or above"
    assert not any(module.split(".")[0] == "bench" for module in imports(MODULES[name])), "lean never imports bench"


@pytest.mark.parametrize("name", NO_TORCH)
def test_pure_modules_do_not_import_torch(name):
    assert not any(module.split(".")[0] in ("torch", "torchvision") for module in imports(MODULES[name]))


@pytest.mark.parametrize("name", NO_TORCH_ON_IMPORT)
def test_the_modules_that_start_a_command_do_not_load_torch(name):
    top = imports(MODULES[name], top_level_only=True)
    assert not any(module.split(".")[0] in ("torch", "torchvision") for module in top)
    assert all(FLOOR.get(module, 0) <= FLOOR["lean.cli"] for module in top if module.startswith("lean"))


def test_the_layering_check_sees_a_module_importing_above_its_floor(tmp_path):
    model = tmp_path / "model.py"
    model.write_text("import torch\nfrom lean.loader import Loader\n\ndef f():\n    from bench import common\n")
    found = imports(model)
    assert {"lean.loader", "torch", "bench"} <= found
    assert FLOOR["lean.loader"] >= FLOOR["lean.model"]  # so model importing the loader is refused above
    assert imports(model, top_level_only=True) == {"torch", "lean.loader"}
