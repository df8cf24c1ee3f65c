"""docs/CONFIG.md is the schema's: regenerated text equals the file, and every key has a comment."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("gen_config_doc", ROOT / "tools" / "gen_config_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_doc_matches_the_schema():
    tool = _tool()
    assert (ROOT / "docs" / "CONFIG.md").read_text() == tool.render(), (
        "docs/CONFIG.md is stale: run python tools/gen_config_doc.py")


def test_every_key_is_documented():
    from rspo_mega.config.schema import TrainConfig

    tool = _tool()
    missing = [f"{prefix}{f.name}" for prefix, cls in tool.sections(TrainConfig)
               for f in dataclasses.fields(cls)
               if not dataclasses.is_dataclass(tool._default(f))
               and not tool.field_comments(cls).get(f.name)]
    assert not missing, f"schema fields without a comment: {missing}"
