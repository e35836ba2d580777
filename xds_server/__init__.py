"""The control plane: catalog -> resources -> snapshot -> ADS streams to Envoys and ext_proc replicas.

resources.py / policies.py render (pure), snapshot.py packs and versions, cache.py holds the current
snapshot, sotw.py is one stream's protocol state machine (pure), server.py does the gRPC I/O.
"""
