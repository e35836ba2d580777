"""The BudgetShares resource (proto/kvgate/v1/policy.proto) as both sides read and write it: the
control plane divides every endpoint's KV budget among the ext_proc replicas (xds_server/shares.py)
and each replica takes its own fraction from it.

It maps node ids to fractions. A replica not listed holds nothing. An empty map means "not divided
yet": a replica keeps what it holds.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import any_pb2

from kvgate.v1 import policy_pb2
from kvgate.wire import BUDGET_SHARES_NAME


def encode(shares: Mapping[str, float]) -> policy_pb2.BudgetShares:
    return policy_pb2.BudgetShares(fraction=dict(shares))


def share_of(resources: list[any_pb2.Any], node_id: str) -> float | None:
    """This replica's fraction in a BudgetShares response; None when the budget is not divided yet
    (keep what is held). Raises ValueError (the client NACKs) on anything malformed."""
    if not resources:
        return None
    if len(resources) != 1:
        raise ValueError(f"expected one {BUDGET_SHARES_NAME} resource, got {len(resources)}")
    msg = policy_pb2.BudgetShares()
    if not resources[0].Unpack(msg):
        raise ValueError(f"unexpected resource type {resources[0].type_url}")
    if not msg.fraction:
        return None
    if bad := {n: f for n, f in msg.fraction.items() if not 0.0 <= f <= 1.0}:
        raise ValueError(f"fractions outside [0, 1]: {bad}")
    if sum(msg.fraction.values()) > 1.0 + 1e-9:
        raise ValueError(f"fractions sum to more than 1: {dict(msg.fraction)}")
    return msg.fraction.get(node_id, 0.0)
