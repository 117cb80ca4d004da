"""The module map in ARCHITECTURE.md is the code's: every module is listed once, every import goes to an earlier
line of the import order, the torch-free modules import no torch, and no module outgrows its one job."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llamacli"
MAX_LINES = 420  # "no module over ~400 lines"


def import_order() -> list[list[str]]:
    """The lines of the `import-order` block in ARCHITECTURE.md, each a list of module names."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"```import-order\n(.*?)```", text, re.S)
    assert block, "ARCHITECTURE.md has no import-order block"
    return [line.split("#")[0].split() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def torch_free() -> list[str]:
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"```import-order\n(.*?)```", text, re.S).group(1)
    return [m for line in block.splitlines() if "# torch-free" in line for m in line.split("#")[0].split()]


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name below llamacli (packages' __init__ excluded)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.name == "__init__":
            continue
        out[".".join(rel.parts)] = path
    return out


def imported(path: Path, name: str) -> set[str]:
    """The llamacli modules a module imports, anywhere in it (lazy imports count), as names below llamacli."""
    packages = {".".join(p.relative_to(PACKAGE).parts) for p in PACKAGE.rglob("*") if p.is_dir()
                and (p / "__init__.py").exists()}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from llamacli.pkg import mod` imports the module pkg.mod; `from llamacli.pkg import name` the package.
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [n for n in subs if n.removeprefix("llamacli.") in modules_cache]
            if len(names) < len(subs):
                names.append(node.module)
        else:
            continue
        for full in names:
            if full == "llamacli" or not full.startswith("llamacli."):
                continue
            mod = full.removeprefix("llamacli.")
            if mod in packages or mod in modules_cache:
                found.add(mod)
    found.discard(name)
    return found


modules_cache = modules()


def test_every_module_is_in_the_import_order_once():
    listed = [m for line in import_order() for m in line]
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(listed) == sorted(modules_cache)


def test_imports_follow_the_import_order():
    rank = {m: i for i, line in enumerate(import_order()) for m in line}
    wrong = []
    for name, path in modules_cache.items():
        for dep in imported(path, name):
            if dep in rank:
                ok = rank[dep] < rank[name]
            else:  # a package: allowed when all of its listed modules come earlier
                children = [m for m in rank if m.startswith(dep + ".")]
                ok = bool(children) and max(rank[c] for c in children) < rank[name]
            if not ok:
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "imports against ARCHITECTURE.md's order: " + "; ".join(wrong)


def test_the_import_checker_catches_a_backward_import(tmp_path):
    """The check above can fail: a module importing a later one is reported."""
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from llamacli.generation.engine import Engine\n    from llamacli import prompts\n")
    assert imported(fake, "config") == {"generation.engine", "prompts"}


def test_torch_free_modules_import_no_torch():
    mods = torch_free()
    assert {"request", "prompts", "layout", "config"} <= set(mods)
    code = ("import sys\n" + "".join(f"import llamacli.{m}\n" for m in mods)
            + "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\nprint(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(modules_cache))
def test_each_module_is_small_and_states_its_job(name):
    path = modules_cache[name]
    source = path.read_text(encoding="utf-8")
    n = source.count("\n")
    assert n <= MAX_LINES, f"{path.name} has {n} lines"
    assert ast.get_docstring(ast.parse(source)), f"{name} has no module docstring"
