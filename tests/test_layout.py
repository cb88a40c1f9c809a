"""The package's layers, as docs/DESIGN.md's Layout section draws them: each folder imports only the folders below it,
torch-only code imports no DeepSpeed or transformers, and only engine/ imports DeepSpeed's internals."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ds_topkast"
# Each part of the package and the parts it may import (its own modules always).
ALLOWED = {
    "errors": set(),
    "core": {"errors"},
    "algorithms": {"core", "errors"},
    "config": {"algorithms", "errors"},
    "store": {"config", "errors"},
    "parallel": {"core", "errors"},
    "runtime": {"algorithms", "config", "core", "errors", "parallel", "store"},
    "convert": {"algorithms", "config", "core", "errors", "parallel", "runtime", "store"},
    "engine": {"config", "convert", "core", "errors", "parallel", "runtime", "store"},
    "integrations": {"config", "convert", "core", "engine", "errors", "parallel", "runtime", "store"},
    "lm": {"ds_topkast", "config", "convert", "core", "errors", "parallel", "runtime", "lm"},
    "train": {"lm"},
    "ds_topkast": {"config", "convert", "core", "engine", "errors", "integrations", "runtime"},
}
# Third-party packages a part may not import at all.
FORBIDDEN = {"core": ("deepspeed", "transformers", "accelerate"), "algorithms": ("deepspeed", "transformers"),
             "store": ("transformers", "accelerate"), "runtime": ("transformers", "accelerate")}


def part_of(module: str) -> str:
    parts = module.removesuffix(".__init__").split(".")
    return parts[1] if len(parts) > 1 else "ds_topkast"


def imports(path: Path) -> list[str]:
    """Every module `path` imports, at module level or inside functions (`from ds_topkast import x` as ds_topkast.x)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += ([f"{node.module}.{alias.name}" for alias in node.names] if node.module == "ds_topkast"
                      else [node.module])
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_the_layers_below_it(path):
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    part = part_of(".".join(relative.parts))
    for module in imports(path):
        if module.startswith("ds_topkast"):
            target = part_of(module)
            assert target == part or target in ALLOWED[part], f"{relative} ({part}/) imports {module} ({target}/)"
        assert not module.startswith(FORBIDDEN.get(part, ("\0",))), f"{relative} ({part}/) imports {module}"
        if module.startswith("deepspeed.runtime"):
            assert part == "engine", f"{relative} imports DeepSpeed's internals ({module}); only engine/ may"


def test_deepspeed_parameter_internals_stay_behind_the_adapters():
    """ZeRO-3's parameter attributes and ZeRO's flat groups are read in engine/ and parallel/zero3.py only."""
    internals = ("ds_tensor", "ds_numel", "ds_shape", "ds_id", "_hp_mapping", "fp32_partitioned_groups_flat")
    for path in MODULES:
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "engine" or relative == Path("parallel/zero3.py"):
            continue
        names = {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}
        names |= {node.value for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not names & set(internals), f"{relative} reads {sorted(names & set(internals))}"


def test_every_folder_says_what_it_holds():
    for folder in sorted(p for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        init = folder / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), folder
