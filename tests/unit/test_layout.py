"""The layout's rules (docs/architecture.md), checked so they stay true."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
LIBRARY = [p for p in (ROOT / "hetis").rglob("*.py") if "v1" not in p.relative_to(ROOT / "hetis").parts]


def imported_modules(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def test_no_library_module_imports_a_service():
    offenders = [str(p.relative_to(ROOT)) for p in LIBRARY
                 if any(m == "services" or m.startswith("services.") for m in imported_modules(p))]
    assert not offenders


def test_library_files_stay_readable_in_one_sitting():
    long = {str(p.relative_to(ROOT)): n for p in LIBRARY if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def test_services_are_thin():
    for folder in (ROOT / "services").iterdir():
        if folder.is_dir() and not folder.name.startswith("__"):
            lines = sum(len(p.read_text().splitlines()) for p in folder.glob("*.py"))
            assert lines < 300, f"services/{folder.name}: {lines} lines"


def test_the_control_plane_loads_without_torch_grpc_or_redis():
    code = ("import sys, hetis.engine.engine, hetis.engine.serving; "
            "print(sorted(m for m in ('torch', 'grpc', 'redis') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.strip()
    assert out == "[]"


def test_the_data_plane_knows_nothing_of_the_mesh():
    model = [p for p in LIBRARY if p.parent.name == "model"]
    assert model
    for p in model:
        bad = {m for m in imported_modules(p) if m.split(".")[0] in ("grpc", "redis")
               or m.startswith(("hetis.mesh", "hetis.v1"))}
        assert not bad, (p.name, bad)
