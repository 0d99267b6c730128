"""`hetis allocate FILE` in-process: JSON for every mode, and errors that name the line and field
(the table, from a real process: tests/integration/test_allocator_cli.py)."""
import json

import pytest

from hetis.allocator import cli as allocate_cli
from hetis.allocator import modes
from tests.helpers.alloc_instances import POOL_YAML as GOOD


def cli(tmp_path, text, *args):
    f = tmp_path / "pool.yaml"
    f.write_text(text)
    return allocate_cli.main(["allocate", str(f), *args])


@pytest.mark.parametrize("mode", allocate_cli.MODES)
def test_json_output_for_every_mode(tmp_path, capsys, mode):
    assert cli(tmp_path, GOOD, "--mode", mode, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == mode and set(out["allocation"]) == {"alice", "bob", "carol"}
    for g, cap in {"v100": 4, "p100": 4, "k80": 8}.items():
        assert sum(a[g] for a in out["allocation"].values()) <= cap + 1e-5
    assert sum(out["allocation"]["alice"].values()) <= 6 + 1e-5
    assert out["efficiency"] == pytest.approx(sum(t["utility"] for t in out["tenants"].values()), abs=1e-4)
    if mode in ("cooperative", "noncooperative", "equal"):
        assert all(t["sharing_incentive"] and t["envy_free"] for t in out["tenants"].values())
    if mode == "cooperative":   # which stage produced it, and how far below the SI+EF optimum
        assert out["stage"] in ("fair_optimum", "pareto_refinement") and 0 <= out["optimality_gap"] < 0.5
        assert out["pareto_efficient"] is True and out["solver"] in ("lp", "milp", "ceei")
    else:
        assert out["stage"] == "exact" and out["optimality_gap"] is None


@pytest.mark.parametrize("text, where", [
    (GOOD.replace("k80: 0.6}", "k80: -0.6}"), ":5: tenants[0].throughput.k80"),
    (GOOD.replace("{v100: 4.4,", "{a100: 4.4,"), ":5: tenants[0].throughput.a100"),
    (GOOD.replace("weight: 2", "weight: zero"), ":10: tenants[2].weight"),
    (GOOD.replace("max_gpus: 6", "max_gpus: -6"), ":6: tenants[0].max_gpus"),
    (GOOD.replace("ResNet-50 (batch size 64)", "ResNet-51"), ":8: tenants[1].job_type"),
    (GOOD.replace("name: carol", "name: alice"), ":9: tenants[2].name"),
    (GOOD.replace("k80: 8}", "k80: 8.5}"), ":1: gpus.k80"),
    (GOOD.replace("    weight: 1\n", "    wieght: 1\n"), ":4: tenants[0].wieght"),
    (GOOD.replace("tenants:", "tenants: ["), "yaml"),
    ("gpus: {v100: 1}\n", "tenants"),
])
def test_bad_files_exit_2_naming_line_and_field(tmp_path, capsys, text, where):
    assert cli(tmp_path, text) == 2
    err = capsys.readouterr().err
    assert where in err, err


def test_missing_file_exits_2(tmp_path, capsys):
    assert allocate_cli.main(["allocate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_unknown_modes_are_refused_naming_the_field():
    assert allocate_cli.MODES == list(modes.MODES)
    with pytest.raises(ValueError, match="^mode: unknown 'greedy'"):
        modes.solver("greedy")
