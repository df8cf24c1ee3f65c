"""Write docs/CONFIG.md from the schema: every key with its type, default and comment.

    python tools/gen_config_doc.py          # rewrite docs/CONFIG.md
    python tools/gen_config_doc.py --check  # exit 1 if docs/CONFIG.md differs from the schema

The comments are the ones in ``rspo_mega/config/schema.py``: the comment at the end of a field's
line, after the comment lines just above it. ``tests/test_config_doc.py`` fails when the file
drifts from the schema.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "CONFIG.md"
HEADER = """# Configuration keys

Generated from `rspo_mega/config/schema.py` by `tools/gen_config_doc.py` (do not edit by hand;
`tests/test_config_doc.py` fails when this file and the schema differ). A run's YAML sets any of
these keys; `section.key=value` on the command line overrides them. The loader checks each value
against its type (choices, ranges) and `validate_config` the rules between keys (with the rules
each loss and task declares: `rspo_mega/setup/rules.py`). Keys that were removed are refused with
where their setting went (`REMOVED_KEYS` in `rspo_mega/config/loader.py`). The `model` keys a run
leaves unset come from `model.hf_config`, an HF `checkpoint.init_from` and the tokenizer, when
the run's setup step reads them (`rspo_mega/setup/resolve.py`).
"""


def field_comments(cls: type) -> dict[str, str]:
    """``field -> comment`` from the class source: lines above the field, then its own line."""
    lines, _ = inspect.getsourcelines(cls)
    tree = ast.parse(inspect.getsource(cls))
    out = {}
    for node in tree.body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        row = node.lineno - 1
        above = []
        for line in reversed(lines[:row]):
            if not line.strip().startswith("#"):
                break
            above.insert(0, line.strip()[1:].strip())
        trailing = lines[row].split("  # ", 1)[1].strip() if "  # " in lines[row] else ""
        out[node.target.id] = " ".join(part for part in above + [trailing] if part)
    return out


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _render(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return "{}" if value == {} else f"{value!r}"


def sections(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """``(dotted prefix, dataclass)`` of the top level and every nested section, in order."""
    found = [(prefix, cls)]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(_default(f)):
            found += sections(type(_default(f)), f"{prefix}{f.name}.")
    return found


def render() -> str:
    """The text of docs/CONFIG.md."""
    sys.path.insert(0, str(ROOT))
    from rspo_mega.config.loader import field_types, type_name
    from rspo_mega.config.schema import TrainConfig

    parts = [HEADER]
    for prefix, cls in sections(TrainConfig):
        title = prefix.rstrip(".") or "top level"
        doc = " ".join((cls.__doc__ or "").split())
        parts.append(f"\n## `{title}`\n\n{doc}\n\n| key | type | default | description |\n"
                     "|---|---|---|---|")
        types, comments = field_types(cls), field_comments(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(_default(f)):
                continue
            kind = type_name(types[f.name]).replace("|", "\\|")
            comment = comments.get(f.name, "").replace("|", "\\|")
            parts.append(f"| `{prefix}{f.name}` | {kind} | `{_render(_default(f))}` | {comment} |")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/CONFIG.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} differs from the schema; run python tools/gen_config_doc.py",
                  file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
