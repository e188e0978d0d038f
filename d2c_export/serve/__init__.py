"""Serving on Ray Serve: `d2c-serve` (HTTP API, dynamic batching, back-pressure) and its load generator.

`api.py` holds the request and answer models and their checks, `batching.py` the merge of compatible
requests into one generation, `app.py` the Ray Serve deployments (the FastAPI ingress and the
generator replicas), `load.py` the load generator and the replica-kill fault, `cli.py` the commands.
"""
