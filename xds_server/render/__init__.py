"""The renderer: a catalog (and the gateway settings) into the resources the control plane serves.

resources.py (Envoy's resources) and policies.py (kvgate's: ModelPolicy, Tenant) are pure builders;
protos.py turns the dicts into protobuf deterministically; build.py assembles them into a Snapshot.
Nothing here holds state or speaks ADS: control.py renders, the cache and the streams serve.
"""
