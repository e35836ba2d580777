"""The OpenAI API's model objects (`GET /v1/models`, `GET /v1/models/{id}`), as both sides render them:
Envoy answers an open gateway's lookups itself (xds_server renders the bodies from the catalog), and
ext_proc answers a tenant's, from the policies, with only the models the tenant may call.

`max_model_len` is vLLM's field for the context length; `max_output_tokens` the gateway's clamp.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

MODELS_PATH = "/v1/models"


@dataclass(frozen=True)
class ModelCard:
    name: str
    max_context_tokens: int
    max_output_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "kvgate",
                "max_model_len": self.max_context_tokens, "max_output_tokens": self.max_output_tokens}


def model_list(cards: Iterable[ModelCard]) -> bytes:
    return orjson.dumps({"object": "list", "data": [c.to_json() for c in cards]})


def model_object(card: ModelCard) -> bytes:
    return orjson.dumps(card.to_json())
