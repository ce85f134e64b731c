"""`# Copied from <target> [with A->B]` marks in the RLG pipeline files and the guider: the marked code must equal its
target (diffusers' installed version, or diffalign's own SD RLG pipeline), after the renames, up to formatting (the
syntax trees are compared). Upstream drift then shows up here, not as a silent fork."""

import ast
import importlib
import inspect
import os
import re
import textwrap

import pytest

from diffalign.families import FAMILIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every RLG pipeline file (found, not listed: a new family's pipeline is checked from the day it lands) and the guider
FILES = {
    f"pipelines/{name}": f"diffalign.pipelines.{name[:-3]}"
    for name in sorted(os.listdir(os.path.join(ROOT, "pipelines")))
    if name.startswith("pipeline_") and name.endswith(".py")
}
FILES["diffalign/guiders.py"] = "diffalign.guiders"
MARK = re.compile(
    r"^([ \t]*)# Copied from ([\w.]+)(?: with (\w+)->(\w+))?\n(?:\s*@[^\n]*\n)*\s*(?:def|class) (\w+)", re.M
)


def resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = inspect.getattr_static(obj, name)
        return obj
    raise ImportError(dotted)


def tree(obj) -> str:
    if isinstance(obj, property):
        obj = obj.fget
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    node = ast.parse(textwrap.dedent(inspect.getsource(obj))).body[0]
    node.decorator_list = []
    return ast.dump(node)


def marks():
    for path, module in FILES.items():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            for match in MARK.finditer(f.read()):
                yield pytest.param(
                    module, bool(match.group(1)), *match.group(2, 3, 4, 5), id=f"{path}:{match.group(5)}"
                )


@pytest.mark.parametrize("module, in_class, target, old, new, name", list(marks()))
def test_copied_code_equals_its_target(module, in_class, target, old, new, name):
    local_module = importlib.import_module(module)
    if in_class:
        owners = [c for c in vars(local_module).values() if inspect.isclass(c) and c.__module__ == module]
        local = next(vars(c)[name] for c in owners if name in vars(c))
    else:
        local = getattr(local_module, name)
    expected = tree(resolve(target))
    if old:
        expected = expected.replace(old, new)
    assert tree(local) == expected


@pytest.mark.parametrize("family", sorted(FAMILIES.values(), key=lambda f: f.name), ids=lambda f: f.name)
def test_every_family_rlg_pipeline_is_checked(family):
    """Each family's RLG pipeline lives in a checked file, and that file has `# Copied from` marks."""
    import diffalign.pipelines

    if family.rlg_pipeline_class is None:
        pytest.skip(f"{family.name} has no RLG pipeline")
    module = getattr(diffalign.pipelines, family.rlg_pipeline_class).__module__
    assert module in FILES.values(), module
    path = next(path for path, name in FILES.items() if name == module)
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        assert MARK.search(f.read()), f"{path} has no # Copied from marks"
