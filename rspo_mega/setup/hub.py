"""Hub ids ``hf:ORG/NAME[@REVISION]`` in ``checkpoint.init_from``, ``model.hf_config`` and
``data.tokenizer``: the snapshot directory of that repository in huggingface_hub's cache.

Resolution is offline first: the cache (``HF_HUB_CACHE``, ``HF_HOME``; clusters pre-populate
it with ``hf download ORG/NAME``) is searched without any network call; only a repository or
revision missing there is downloaded, and only unless ``HF_HUB_OFFLINE=1``. A key downloads the
files it reads: ``init_from`` the JSON files, safetensors shards and a SentencePiece model,
``hf_config`` its config.json, ``tokenizer`` the tokenizer files. The value is replaced by the
snapshot's path (``.../models--ORG--NAME/snapshots/<commit>``) when the config is loaded, so the
saved ``config.yaml`` names the exact commit, and every check of a local directory applies to it
unchanged. A malformed id, or one neither cached nor downloadable, is a ``ValueError`` naming
the key (a ``ConfigError`` once :mod:`rspo_mega.setup.resolve` has it).
"""

from __future__ import annotations

import re

HUB_PREFIX = "hf:"
HUB_ID = re.compile(r"hf:(?P<repo>[\w.-]+/[\w.-]+)(@(?P<revision>[\w./-]+))?")
# the config keys that take a hub id -> the files of the repository each of them reads
HUB_FILES: dict[str, list[str]] = {
    "checkpoint.init_from": ["*.json", "*.safetensors", "tokenizer.model"],
    "model.hf_config": ["config.json"],
    "data.tokenizer": ["*.json", "tokenizer.model"],
}


def resolve_hub_id(key: str, value: str) -> str:
    """The local snapshot directory of the hub id ``value`` given for config key ``key``."""
    match = HUB_ID.fullmatch(value)
    if match is None:
        raise ValueError(f"{key}={value}: a hub id looks like hf:ORG/NAME or "
                         "hf:ORG/NAME@REVISION")
    repo, revision = match["repo"], match["revision"] or "main"
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = dict(revision=revision, allow_patterns=HUB_FILES[key])
    missing = f"{key}={value}: revision {revision} of {repo} is not in the HF cache " \
              f"{constants.HF_HUB_CACHE}"
    try:
        return snapshot_download(repo, local_files_only=True, **where)
    except LocalEntryNotFoundError as err:  # not cached, or cached in part (IncompleteSnapshot)
        if type(err) is not LocalEntryNotFoundError:
            missing += f" in full ({_first_line(err)})"
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{missing} and HF_HUB_OFFLINE=1 forbids downloading it; fill the cache "
                         f"with: hf download {repo} --revision {revision}")
    try:
        return snapshot_download(repo, **where)
    except Exception as err:  # noqa: BLE001 - network, auth, unknown repo: all the user's to fix
        raise ValueError(f"{missing} and downloading it failed: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"
