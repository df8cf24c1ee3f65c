"""LLaDA geometries shipped with the package: ``tiny.yaml`` (a ``model:`` section for CPU tests)
and ``llada_8b.json`` (the HF config.json geometry of LLaDA-8B Base / Instruct), which a run
names with ``model.hf_config=shipped:llada_8b``."""
