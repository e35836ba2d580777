"""The committed kvgate/v1/policy_pb2.py(i) are exactly what proto/kvgate/v1/policy.proto compiles to.

A proto change committed without regenerating fails here. Regenerate from the repo root with:
    python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. proto/kvgate/v1/policy.proto
"""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO = PROTO_ROOT / "kvgate" / "v1" / "policy.proto"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("protoc")
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}", str(PROTO)])
    assert rc == 0, f"protoc failed on {PROTO}"
    return out / "kvgate" / "v1"


@pytest.mark.parametrize("name", ["policy_pb2.py", "policy_pb2.pyi"])
def test_committed_code_matches_the_proto(generated: Path, name: str) -> None:
    committed = REPO / "kvgate" / "v1" / name
    fresh = generated / name
    assert fresh.is_file()
    assert committed.read_bytes() == fresh.read_bytes(), (
        f"kvgate/v1/{name} is stale: regenerate it from {PROTO.relative_to(REPO)}")


def test_generated_module_knows_model_policy() -> None:
    from kvgate.v1 import policy_pb2

    assert policy_pb2.ModelPolicy.DESCRIPTOR.full_name == "kvgate.v1.ModelPolicy"
    assert [f.name for f in policy_pb2.ModelPolicy.DESCRIPTOR.fields] == [
        "name", "protocol", "max_context_tokens", "max_output_tokens", "kv_bytes_per_token",
        "tokens_per_block", "endpoints", "prompt_estimate", "backend_model"]
