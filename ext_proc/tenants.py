"""Who is calling: API keys (compared as sha256 digests) to tenants, what each may call, and how much.

Pure: the table is replaced from the Tenant resources xds_server serves; requests are checked against
it at their headers, before any body is read. With no tenant served, the gateway is open.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kvgate.api_keys import key_hash
from kvgate.v1 import policy_pb2

# Where clients put keys: the OpenAI SDK and curl send `Authorization: Bearer KEY`; some SDKs
# (Azure-style) send `api-key`; tritonclient sends whatever headers the caller gives it.
KEY_HEADERS = ("authorization", "api-key", "x-api-key")


@dataclass(frozen=True)
class Tenant:
    name: str
    models: frozenset[str]  # "*" for all
    requests_per_minute: int  # 0: unlimited
    tokens_per_minute: int
    priority_class: str  # "": the model's default

    def may_call(self, model: str) -> bool:
        return "*" in self.models or model in self.models


@dataclass(frozen=True)
class Unauthenticated:
    message: str


def _keys(headers: Mapping[str, str]) -> set[str]:
    """Every key the request carries, whichever header it came in."""
    keys = set()
    for name in KEY_HEADERS:
        value = headers.get(name, "").strip()
        if value:
            scheme, _, rest = value.partition(" ")
            keys.add(rest.strip() if scheme.lower() == "bearer" and rest else value)
    return keys


@dataclass
class TenantTable:
    _by_hash: dict[str, Tenant] = field(default_factory=dict)
    loaded: bool = False

    @property
    def required(self) -> bool:
        return bool(self._by_hash)

    def replace(self, tenants: list[policy_pb2.Tenant]) -> None:
        by_hash = {}
        for t in tenants:
            tenant = Tenant(t.name, frozenset(t.models), t.requests_per_minute, t.tokens_per_minute, t.priority_class)
            for digest in t.api_key_sha256:
                if digest in by_hash:
                    raise ValueError(f"tenants {by_hash[digest].name!r} and {t.name!r} share an API key")
                by_hash[digest] = tenant
        self._by_hash = by_hash
        self.loaded = True

    def authenticate(self, headers: Mapping[str, str]) -> Tenant | Unauthenticated | None:
        """The caller's tenant; None when the gateway is open (no tenants)."""
        if not self._by_hash:
            return None
        keys = _keys(headers)
        if not keys:
            return Unauthenticated("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
        if len(keys) > 1:
            # Which one would the gateway, and which one the engine, take? Ambiguity is refused.
            return Unauthenticated(f"Two different API keys in {', '.join(KEY_HEADERS)}: send one.")
        tenant = self._by_hash.get(key_hash(keys.pop()))
        if tenant is None:
            return Unauthenticated("Incorrect API key provided.")
        return tenant
