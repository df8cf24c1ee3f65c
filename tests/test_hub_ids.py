"""Hub ids ``hf:ORG/NAME[@REVISION]`` in ``checkpoint.init_from``, ``model.hf_config`` and
``data.tokenizer``, resolved offline through a huggingface_hub cache the test lays out on disk
(``models--ORG--NAME/{blobs,refs,snapshots}``, snapshot files linked to their blobs)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rspo_mega.config import ConfigError
from rspo_mega.setup import load_run_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "rspo_mega" / "checkpoints" / "tiny_sudoku_long_instruct"
MAIN, V1 = "a" * 40, "b" * 40  # the commits refs/main and refs/v1 point to


def _snapshot(cache: Path, repo: str, commit: str, files: dict[str, bytes],
              refs: tuple[str, ...]) -> Path:
    """One cached commit of ``repo`` holding ``files``, named by ``refs``; its snapshot folder."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An offline HF cache: the shipped tiny LLaDA as ``rspo/tiny`` (main), and at ``v1`` the
    same with 2 layers in its config.json."""
    from huggingface_hub import constants

    root = tmp_path / "hub"
    files = {p.name: p.read_bytes() for p in SHIPPED.iterdir() if p.name != "README.md"}
    _snapshot(root, "rspo/tiny", MAIN, files, ("main",))
    config = json.loads(files["config.json"])
    _snapshot(root, "rspo/tiny", V1,
              {"config.json": json.dumps({**config, "n_layers": 2}).encode()}, ("v1",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


def test_init_from_a_hub_id_is_its_cached_snapshot(cache):
    snapshot = cache / "models--rspo--tiny" / "snapshots" / MAIN
    cfg = load_run_config(None, ["checkpoint.init_from=hf:rspo/tiny"])
    assert cfg.checkpoint.init_from == str(snapshot)  # config.yaml names the exact commit
    assert cfg.data.tokenizer == str(snapshot)  # the start's tokenizer, as for a local directory
    local = load_run_config(None, [f"checkpoint.init_from={SHIPPED}"])
    assert cfg.model == local.model
    assert load_run_config(None, [f"checkpoint.init_from=hf:rspo/tiny@{MAIN}"]).checkpoint.init_from \
        == str(snapshot)


def test_hf_config_and_tokenizer_take_hub_ids_and_revisions(cache):
    cfg = load_run_config(None, ["model.hf_config=hf:rspo/tiny@v1", "data.tokenizer=hf:rspo/tiny"])
    assert cfg.model.hf_config == str(cache / "models--rspo--tiny" / "snapshots" / V1)
    assert cfg.model.num_layers == 2
    assert cfg.data.tokenizer == str(cache / "models--rspo--tiny" / "snapshots" / MAIN)
    assert cfg.model.vocab_size == load_run_config(None, [f"data.tokenizer={SHIPPED}"]).model.vocab_size


def test_a_hub_id_missing_from_the_cache_is_one_line_naming_the_key(cache):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, ["checkpoint.init_from=hf:rspo/other@v2"])
    message = str(err.value)
    assert message.startswith("checkpoint.init_from=hf:rspo/other@v2: revision v2 of rspo/other "
                              f"is not in the HF cache {cache} and HF_HUB_OFFLINE=1 forbids")
    assert message.endswith("fill the cache with: hf download rspo/other --revision v2")
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"^model.hf_config=hf:rspo/tiny@v3: revision v3 of"):
        load_run_config(None, ["model.hf_config=hf:rspo/tiny@v3"])
    with pytest.raises(ConfigError, match=r"^data.tokenizer=hf:tiny: a hub id looks like "
                                          r"hf:ORG/NAME or hf:ORG/NAME@REVISION$"):
        load_run_config(None, ["data.tokenizer=hf:tiny"])


def test_a_cached_snapshot_gets_the_checks_of_a_local_directory(cache):
    (cache / "models--rspo--tiny" / "snapshots" / V1 / "config.json").unlink()
    (cache / "models--rspo--tiny" / "snapshots" / V1 / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^model.hf_config: .*snapshots/b{40}"):
        load_run_config(None, ["model.hf_config=hf:rspo/tiny@v1"])


def test_rspo_train_resolves_a_hub_id_from_the_environment_s_cache(cache, tmp_path):
    """The user's path: ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` set, ``--dry-run``."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "rspo_mega.train", "--dry-run", "checkpoint.init_from=hf:rspo/tiny",
            f"logging.output_dir={tmp_path / 'run'}"]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"init_from: {cache / 'models--rspo--tiny' / 'snapshots' / MAIN}" in done.stdout
    args[-2] = "checkpoint.init_from=hf:rspo/missing"
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "rspo-train: config error: checkpoint.init_from=hf:rspo/missing: revision main of "
        f"rspo/missing is not in the HF cache {cache} and HF_HUB_OFFLINE=1 forbids downloading "
        "it; fill the cache with: hf download rspo/missing --revision main"]
