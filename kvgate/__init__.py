"""kvgate: an LLM inference gateway on Envoy that admits requests by the KV-cache bytes they can claim.

This package holds what every part shares (catalog, header names, generated protos) and the CLI.
"""

__version__ = "0.1.0"
