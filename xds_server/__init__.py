"""The control plane: catalog -> resources -> snapshot -> ADS streams to Envoys and ext_proc replicas
(docs/architecture.md, "The control plane").

- types and cache: resource_types.py (type URLs, push order, wildcards), snapshot.py (Resources,
  Snapshot: versioned by content, catalog-free), cache.py (the current snapshot; wakes every stream);
- the renderer, render/: the catalog into a Snapshot (resources.py, policies.py: pure builders;
  protos.py: dicts into protobuf; build.py: the whole snapshot);
- the transport: sotw.py and delta.py (one ADS stream's protocol, pure), acks.py (clients' answers and
  the waits for them), server.py (the gRPC I/O).
The renderer and the transport both stand on the types and the cache; neither imports the other.
control.py joins them (changes: catalog and budget shares, make before break); beside it shares.py
(the division of budgets), admin.py (admin API), status.py + status_page.py (the status page),
metrics.py, watch.py (the catalog file), settings.py.
"""
