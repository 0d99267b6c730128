"""CLUSTER.yaml: the hosts of a mixed GPU fleet and the network between them, the input
of ``hetis plan`` (hetis/sim/planner.py)::

    hosts:
      - {name: a100-box, gpus: {a100-80g: 4}}
      - {name: r3090-a, gpus: {rtx3090: 2}}
    network: {inter_host_gbps: 100, intra_host: pcie}   # intra_host: pcie | nvlink

GPU names are the keys of ``data/gpu_specs.json`` (hetis/sim/hardware.py). A host may
hold several GPU types. ``network`` may be left out: 100 Gb/s Ethernet between hosts
and PCIe inside them, the paper's testbed. ``intra_host: nvlink`` means every GPU of a
host reaches every other over NVLink; a type without NVLink falls back to its PCIe
(:func:`hetis.sim.hardware.link`).

Why the document is composed into nodes and not loaded into dicts: an operator with a
typo in a 40-host file wants the line, so every error names the file, the line (from
the YAML node's mark) and the field, e.g.
``cluster.yaml:3: hosts[1].gpus: unknown GPU 'a200' (known: ...)``. Duplicate keys,
which ``yaml.safe_load`` silently collapses, are errors here.
"""
from __future__ import annotations

from dataclasses import dataclass

import yaml
from yaml.constructor import SafeConstructor

from hetis.sim.hardware import GpuType, Link, link, load_gpus

INTRA_HOST = ("pcie", "nvlink")
DEFAULT_INTER_HOST_GBPS = 100.0


class ClusterFileError(ValueError):
    """A cluster file that cannot be used; the message is ``FILE:LINE: FIELD: what``."""


@dataclass(frozen=True)
class Host:
    name: str
    gpus: dict[str, int]      # GPU type key -> count on this host


@dataclass(frozen=True)
class Cluster:
    hosts: tuple[Host, ...]
    inter_host: Link          # between any two hosts (alpha-beta)
    intra_host: str           # "pcie" | "nvlink": between the GPUs of one host
    inter_host_gbps: float = DEFAULT_INTER_HOST_GBPS

    def gpu_counts(self) -> dict[str, int]:
        """GPUs per type over all hosts."""
        counts: dict[str, int] = {}
        for h in self.hosts:
            for g, n in h.gpus.items():
                counts[g] = counts.get(g, 0) + n
        return counts

    def subset(self, gpus) -> Cluster:
        """The same network with only the GPUs of the types in ``gpus`` (hosts left
        without any are dropped)."""
        keep = set(gpus)
        hosts = tuple(Host(h.name, {g: n for g, n in h.gpus.items() if g in keep})
                      for h in self.hosts if keep & set(h.gpus))
        return Cluster(hosts, self.inter_host, self.intra_host, self.inter_host_gbps)

    def intra_link(self, gpu: GpuType) -> Link:
        """The link between two GPUs of this type on one host."""
        return link(self.intra_host, gpu)

    def slots(self, gpu: str) -> list[str]:
        """One host name per GPU of this type, largest host first, grouped by host."""
        hosts = sorted((h for h in self.hosts if gpu in h.gpus), key=lambda h: -h.gpus[gpu])
        return [h.name for h in hosts for _ in range(h.gpus[gpu])]

    def link_between(self, ga: GpuType, hosts_a: list[str], gb: GpuType,
                     hosts_b: list[str]) -> Link:
        """The link between two groups of GPUs (each a list of their hosts): Ethernet
        unless all sit on one host; there NVLink/PCIe of one type, the slower PCIe of two."""
        if len(set(hosts_a) | set(hosts_b)) > 1:
            return self.inter_host
        if ga.key == gb.key:
            return self.intra_link(ga)
        return link("pcie", min(ga, gb, key=lambda g: g.pcie_gbs))


# ------------------------------------------------------------------------- parsing


class _Reader:
    """Walks composed YAML nodes; every complaint carries the file, the node's line and
    the field path."""

    def __init__(self, source: str):
        self.source = source
        self._construct = SafeConstructor()

    def fail(self, node, field: str, what: str):
        line = node.start_mark.line + 1 if node is not None else 1
        raise ClusterFileError(f"{self.source}:{line}: {field or '(top level)'}: {what}")

    def mapping(self, node, field: str, known: tuple[str, ...] | None = None,
                required: tuple[str, ...] = ()) -> dict[str, tuple]:
        """{key: (key node, value node)}; unknown, duplicate and missing keys are errors."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, field, "expected a mapping")
        out: dict[str, tuple] = {}
        for knode, vnode in node.value:
            key = self.scalar(knode, field)
            sub = f"{field}.{key}" if field else str(key)
            if known is not None and key not in known:
                self.fail(knode, sub, f"unknown key (known: {', '.join(known)})")
            if key in out:
                self.fail(knode, sub, "duplicate key")
            out[key] = (knode, vnode)
        for key in required:
            if key not in out:
                self.fail(node, f"{field}.{key}" if field else key, "missing")
        return out

    def scalar(self, node, field: str):
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, field, "expected a single value")
        return self._construct.construct_object(node)

    def positive(self, node, field: str, integer: bool):
        v = self.scalar(node, field)
        kinds = (int,) if integer else (int, float)
        if isinstance(v, bool) or not isinstance(v, kinds) or not v > 0 or v != v:
            self.fail(node, field, f"must be a positive {'integer' if integer else 'number'} "
                                   f"(got {v!r})")
        return v


def _hosts(r: _Reader, node, gpus: dict[str, GpuType]) -> tuple[Host, ...]:
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        r.fail(node, "hosts", "expected a non-empty list of {name, gpus}")
    hosts, seen = [], {}
    for i, hnode in enumerate(node.value):
        field = f"hosts[{i}]"
        h = r.mapping(hnode, field, known=("name", "gpus"), required=("name", "gpus"))
        name = r.scalar(h["name"][1], f"{field}.name")
        if not isinstance(name, str) or not name.strip():
            r.fail(h["name"][1], f"{field}.name", f"must be a non-empty string (got {name!r})")
        if name in seen:
            r.fail(h["name"][1], f"{field}.name", f"duplicate host name {name!r} "
                                                  f"(also hosts[{seen[name]}])")
        seen[name] = i
        gnode = h["gpus"][1]
        counts = {}
        for key, (knode, vnode) in r.mapping(gnode, f"{field}.gpus").items():
            if key not in gpus:
                r.fail(knode, f"{field}.gpus", f"unknown GPU {key!r} (known: "
                                               f"{', '.join(sorted(gpus))})")
            counts[key] = r.positive(vnode, f"{field}.gpus.{key}", integer=True)
        if not counts:
            r.fail(gnode, f"{field}.gpus", "no GPUs")
        hosts.append(Host(name, counts))
    return tuple(hosts)


def _network(r: _Reader, node) -> tuple[float, str]:
    if node is None:
        return DEFAULT_INTER_HOST_GBPS, "pcie"
    net = r.mapping(node, "network", known=("inter_host_gbps", "intra_host"))
    gbps = DEFAULT_INTER_HOST_GBPS
    if "inter_host_gbps" in net:
        vnode = net["inter_host_gbps"][1]
        gbps = float(r.positive(vnode, "network.inter_host_gbps", False))
        if not 1e-3 <= gbps <= 1e6:
            r.fail(vnode, "network.inter_host_gbps", f"must be in [0.001, 1e6] Gb/s (got {gbps:g})")
    intra = "pcie"
    if "intra_host" in net:
        vnode = net["intra_host"][1]
        intra = r.scalar(vnode, "network.intra_host")
        if intra not in INTRA_HOST:
            r.fail(vnode, "network.intra_host", f"must be one of {', '.join(INTRA_HOST)} "
                                                f"(got {intra!r})")
    return gbps, intra


def parse_cluster(text: str, source: str = "cluster.yaml",
                  gpus: dict[str, GpuType] | None = None) -> Cluster:
    """A :class:`Cluster` from CLUSTER.yaml text; ``source`` names it in errors."""
    gpus = gpus if gpus is not None else load_gpus()
    r = _Reader(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise ClusterFileError(f"{source}:{line}: not valid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise ClusterFileError(f"{source}: not valid YAML: {e}") from None
    if root is None:
        raise ClusterFileError(f"{source}:1: hosts: missing (the file is empty)")
    top = r.mapping(root, "", known=("hosts", "network"), required=("hosts",))
    hosts = _hosts(r, top["hosts"][1], gpus)
    gbps, intra = _network(r, top["network"][1] if "network" in top else None)
    name = f"{gbps:.3f}".rstrip("0").rstrip(".")
    return Cluster(hosts, link(f"ethernet-{name}g"), intra, gbps)


def load_cluster(path: str, gpus: dict[str, GpuType] | None = None) -> Cluster:
    """Read and check a CLUSTER.yaml file (errors name ``path``, the line and the field)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ClusterFileError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_cluster(text, source=path, gpus=gpus)
