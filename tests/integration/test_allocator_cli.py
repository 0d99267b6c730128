"""`hetis allocate FILE` as a real process: the table on stdout (the in-process
tests, JSON and errors, are in tests/unit/allocator/test_cli.py)."""
import json
import os
import subprocess
import sys

from tests.helpers.alloc_instances import POOL_YAML

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_table_output_as_a_real_process(tmp_path):
    f = tmp_path / "pool.yaml"
    f.write_text(POOL_YAML)
    p = subprocess.run([sys.executable, "-m", "hetis.allocator.cli", "allocate", str(f)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "cooperative allocation" in p.stdout and all(n in p.stdout for n in ("alice", "bob", "carol"))


def test_json_output_as_a_real_process_is_only_json(tmp_path):
    """stdout is one JSON object: HiGHS's banner (highspy >= 1.12 prints it on the first
    model of a process) and its stray MIP lines go to stderr."""
    f = tmp_path / "pool.yaml"
    f.write_text(POOL_YAML)
    p = subprocess.run([sys.executable, "-m", "hetis.allocator.cli", "allocate", str(f), "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["mode"] == "cooperative" and set(out["allocation"]) == {"alice", "bob", "carol"}
