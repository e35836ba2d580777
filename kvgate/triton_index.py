"""Triton's model repository index (`POST /v2/repository/index`, gRPC `RepositoryIndex`) as the
gateway's clients see it: the catalog's Triton models, by the names clients call them. Both sides
render it: Envoy answers an open gateway's HTTP index itself (xds_server renders the body from the
catalog); ext_proc answers a tenant's, with only the models the tenant may call, and every gRPC one
(a gRPC reply with a message can only come from a gRPC server: Envoy's own replies to gRPC carry
a status and no message).

Each model is "READY": the gateway serves it. The engine's version numbers stay the engine's: the
entries name none (KServe makes the field optional).
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

REPOSITORY_INDEX_PATH = "/v2/repository/index"
READY = "READY"


def index_json(names: Iterable[str]) -> bytes:
    return orjson.dumps([{"name": name, "state": READY} for name in sorted(names)])
