"""The `kvgate` command and what it runs: a whole gateway (gateway.py) as child processes that die with it
(processes.py), Envoy's bootstrap (envoy_bootstrap.py), and the control plane's admin client.

Apart from the kvgate library (catalog, wire names, TLS) because it starts every part, so it may
import them all, and none of them imports it.
"""
