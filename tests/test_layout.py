"""The shape of the package: no import cycles, imports at the top, ruff clean, every module in the README,
and the scripts check every setting before the heavy imports."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "breakhis"
# heavy, optional at import time: Grad-CAM draws only when asked; space files load without Ray; TensorBoard is
# imported by a run that writes events, and training goes on without it (events.py)
LAZY_OK = ("matplotlib", "ray", "torch.utils.tensorboard")


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package."""
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """The package modules a module imports (relative imports resolved; `from . import x` counted as x)."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if not base.startswith("breakhis"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("breakhis")}
    return {m for m in found if m in known and m != name}


def test_the_import_graph_has_no_cycle():
    graph = {name: imports_of(name, path) for name, path in modules().items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_imports_sit_at_the_top_of_modules():
    """Imports inside functions hide the dependency graph; only the heavy optional ones may be lazy."""
    lazy = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if not (mod or "").startswith(LAZY_OK):
                        lazy.append(f"{name}:{node.lineno} {mod}")
    assert lazy == []


def test_every_module_has_one_line_in_the_readme_layout():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    missing = [str(p.relative_to(ROOT)) for p in modules().values()
               if p.name != "__init__.py" and f"`{p.relative_to(PACKAGE).as_posix()}`" not in layout]
    assert missing == []
    assert "DESIGN.md" not in readme  # a user of the repository does not have the team's notes


def test_the_readme_is_a_door_and_every_docs_page_it_links_exists():
    """README.md: at most 200 lines; the reference lives in docs/, and every page it links is there, and
    every page there is linked (a page nobody can find is as good as missing)."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    assert linked, "the README links its reference pages in docs/"
    assert sorted(p for p in linked if not (ROOT / p).is_file()) == []
    assert sorted(linked) == sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
    for page in (ROOT / "docs").glob("*.md"):  # links between pages resolve too
        for target in re.findall(r"\]\(([^)#:]+\.md)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links {target}"


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is installed by requirements.txt")
def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    out = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("flags, words", [
    (["--backbone", "resnet999"], "--backbone 'resnet999': choose one of resnet18"),
    (["--optimizer", "lbfgs"], "--optimizer 'lbfgs': choose one of adam, adamw, sgd"),
    (["--scheduler", "cosmic"], "--scheduler 'cosmic': choose one of none, step"),
    (["--class-weights", "0.5,0.3,0.2"], "one positive weight per class"),
    (["--lr", "nan"], "--lr nan"),
    (["--weight-decay", "-1"], "--weight-decay -1.0"),
    (["--folds", "0-9"], "--folds '0-9': give official folds 1..5"),
    (["--folds", "3-1"], "--folds '3-1'"),
    (["--folds", "1-3", "--fold", "2"], "--folds 1-3 with --fold 2"),
    (["--folds", "1-5", "--seeds", "0,1"], "--folds 1-5 with --seeds/--resplit is not supported"),
])
def test_bad_settings_fail_before_torch_data_or_folder(flags, words, tmp_path):
    """train.py refuses a bad setting in one line, exit 2, before importing torch, reading the tree or
    making a folder (the tree does not even exist here)."""
    code = ("import sys, train; from breakhis.errors import guard\n"
            f"rc = guard(train.main, {flags + ['--data', str(tmp_path / 'none'), '--results', str(tmp_path / 'r')]!r})\n"
            "print('torch' in sys.modules); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert out.stdout.strip() == "False"  # nothing heavy was imported: the check runs in a fraction of a second
    assert out.stderr.startswith("error: ") and words in out.stderr and out.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()
