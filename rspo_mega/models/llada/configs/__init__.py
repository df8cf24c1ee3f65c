"""YAML ``model:`` sections for LLaDA geometries (``tiny.yaml`` for CPU tests, ``llada_8b.yaml``)."""
