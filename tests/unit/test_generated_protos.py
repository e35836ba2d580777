"""The committed kvgate/v1/*_pb2*.py(i) are exactly what proto/kvgate/v1/*.proto compile to.

A proto change committed without regenerating fails here. Regenerate from the repo root with:
    python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/kvgate/v1/*.proto
"""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTOS = sorted((PROTO_ROOT / "kvgate" / "v1").glob("*.proto"))


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("protoc")
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}",
                      f"--grpc_python_out={out}", *map(str, PROTOS)])
    assert rc == 0, f"protoc failed on {PROTOS}"
    return out / "kvgate" / "v1"


@pytest.mark.parametrize("name", ["policy_pb2.py", "policy_pb2.pyi", "admin_pb2.py", "admin_pb2.pyi",
                                  "admin_pb2_grpc.py"])
def test_committed_code_matches_the_proto(generated: Path, name: str) -> None:
    committed = REPO / "kvgate" / "v1" / name
    fresh = generated / name
    assert fresh.is_file()
    assert committed.read_bytes() == fresh.read_bytes(), f"kvgate/v1/{name} is stale: regenerate it"


def test_every_generated_file_is_committed(generated: Path) -> None:
    without_services = {p.stem for p in PROTOS if "\nservice " not in p.read_text()}
    fresh = {p.name for p in generated.iterdir() if p.suffix in (".py", ".pyi")
             and p.name.removesuffix("_pb2_grpc.py") not in without_services}
    committed = {p.name for p in (REPO / "kvgate" / "v1").iterdir() if p.name != "__init__.py" and p.suffix in (".py", ".pyi")}
    assert fresh == committed


def test_generated_module_knows_model_policy() -> None:
    from kvgate.v1 import policy_pb2

    assert policy_pb2.ModelPolicy.DESCRIPTOR.full_name == "kvgate.v1.ModelPolicy"
    assert [f.name for f in policy_pb2.ModelPolicy.DESCRIPTOR.fields] == [
        "name", "protocol", "max_context_tokens", "max_output_tokens", "kv_bytes_per_token",
        "tokens_per_block", "endpoints", "prompt_estimate", "backend_model", "tokenizer", "priority_classes",
        "default_priority_class", "engine_metrics", "long_request_threshold", "long_requests_max_share",
        "chat_template", "engine", "long_requests_short_window_ms", "routing"]
    assert policy_pb2.BudgetShares.DESCRIPTOR.full_name == "kvgate.v1.BudgetShares"
