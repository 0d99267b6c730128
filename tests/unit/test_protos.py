"""The committed gRPC stubs are what `make protos` generates from protos/."""
from __future__ import annotations

import pathlib

from hetis.mesh.protos_gen import ROOT, generate


def test_stubs_are_current(tmp_path):
    files = generate(tmp_path)
    assert files
    for f in files:
        committed = ROOT / "hetis" / "v1" / f.name
        assert committed.exists(), f"{f.name} is not committed: run `make protos`"
        assert committed.read_text() == f.read_text(), f"{f.name} is stale: run `make protos`"
    extra = {p.name for p in (ROOT / "hetis" / "v1").glob("*_pb2*.py*")} - {f.name for f in files}
    assert not extra, f"stubs without a .proto: {extra}"


def test_optional_sampling_fields():
    from hetis.v1 import generation_pb2 as pb
    sp = pb.SamplingParams()
    for f in ("temperature", "top_p", "top_k", "max_tokens", "seed"):
        assert not sp.HasField(f)
    assert pathlib.Path(ROOT / "protos" / "hetis" / "v1" / "generation.proto").exists()
