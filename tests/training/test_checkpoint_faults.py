"""Faults during a checkpoint save, on two ranks: each ends resumable, with nothing lost.

Disk full (in the per-rank files, in rank 0's metadata.json, in the dist-checkpoint shards: a
real tmpfs filled up, or a patched shard writer), a rank killed while its writers run, a
truncated metadata file in the newest checkpoint. Each time the previous checkpoint stays valid,
a new launch (the next start) resumes from it, and the error names the cause. The harness also
fails any of these tests that leaves a process behind (a writer of the killed rank, for example).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.distributed import DistributedTestError, run_distributed
from tests.training.checkpoint_parts import load, save
from tests.training.test_checkpointing import collect_checkpoint_warnings

ROWS = 256  # each rank's shard: ROWS x 1024 float32 = 1 MiB
NO_SPACE = os.strerror(errno.ENOSPC).lower()


def _state(rank: int, world_size: int, value: float) -> dict:
    from megatron.core.dist_checkpointing import ShardedTensor

    tensor = torch.full((ROWS, 1024), value)
    return {"w": ShardedTensor.from_rank_offsets("w", tensor, (0, rank, world_size), replica_id=0)}


def _newest(ckpt: Path) -> str:
    """The newest ``iter_*`` directory that is not a temporary one."""
    return max(p.name for p in ckpt.iterdir() if p.name.startswith("iter_") and ".tmp-" not in p.name)


def _disk_state(root: str) -> dict:
    """What a restart would find: directory names, the newest complete checkpoint, iter 1's
    validity."""
    from rspo_mega.training.checkpoint.files import validate_checkpoint

    torch.distributed.barrier()  # rank 0 has cleaned up
    ckpt = Path(root) / "ckpt"
    return {"names": sorted(p.name for p in ckpt.iterdir()),
            "latest": _newest(ckpt),
            "iter1": validate_checkpoint(ckpt / "iter_0000001")}


def _failed_save(root: str, rank: int) -> str:
    from rspo_mega.errors import CheckpointError

    try:
        save(Path(root) / "ckpt", 2, _state(rank, 2, 2.0), pos=20 + rank)
    except CheckpointError as exc:
        return str(exc)
    return "saved"


def _no_space_for(name: str, mode: str):
    """A full disk refusing to create a shard file (the patched case: portable, no mount)."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)


def _fill_disk(root: str, disk: str) -> None:
    """Rank 0: leave 256 KiB free on the tmpfs at ``root``; or patch every rank's shard writer.

    On the tmpfs the writers fail in the middle of a shard, where torch's C++ writer loses the
    errno ("unexpected pos ..."), so the cause is inferred from the free space."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if disk == "patched":
        filesystem_async.open = _no_space_for  # shadows the builtin that the writers call
    elif torch.distributed.get_rank() == 0:
        st = os.statvfs(root)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        subprocess.run(["mount", "-o", f"remount,size={used + 256 * 1024}", root], check=True)


def _run_out_of_space(rank: int, world_size: int, root: str, disk: str) -> dict:
    from rspo_mega.training.checkpoint import manager as checkpointing

    save(Path(root) / "ckpt", 1, _state(rank, world_size, 1.0), pos=10 + rank)
    out = {}

    def rank_file_full(payload: dict, path: Path) -> None:
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    real_save, real_write = checkpointing.save_synced, checkpointing.atomic_write_text
    if rank == 1:
        checkpointing.save_synced = rank_file_full
    out["rank file"] = (_failed_save(root, rank), _disk_state(root))
    checkpointing.save_synced = real_save

    def metadata_full(path: Path, text: str) -> None:
        if path.name == checkpointing.METADATA:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a full write() raises
        real_write(path, text)

    if rank == 0:
        checkpointing.atomic_write_text = metadata_full
    out["metadata"] = (_failed_save(root, rank), _disk_state(root))
    checkpointing.atomic_write_text = real_write

    _fill_disk(root, disk)
    torch.distributed.barrier()
    out["shards"] = (_failed_save(root, rank), _disk_state(root))
    return out


def _resume(rank: int, world_size: int, root: str) -> dict:
    """The next start: find the newest valid checkpoint, load it, then save step 2."""
    warnings = collect_checkpoint_warnings()
    path, state, plain = load(Path(root) / "ckpt", None, _state(rank, world_size, 0.0), "pos")
    out = {"resumed": path.name, "values": torch.unique(state["w"]).tolist(), "pos": plain["pos"],
           "warnings": warnings}
    save(Path(root) / "ckpt", 2, _state(rank, world_size, 2.0), pos=20 + rank)
    out["after"] = _disk_state(root)
    return out


def _check_resumed(results: list[dict]) -> None:
    for rank, res in enumerate(results):
        assert res["resumed"] == "iter_0000001" and res["values"] == [1.0], res
        assert res["pos"] == 10 + rank
        assert res["after"] == {"names": ["iter_0000001", "iter_0000002"],
                                "latest": "iter_0000002", "iter1": None}


@pytest.fixture()
def disk(request, tmp_path: Path) -> tuple[Path, str]:
    """``(tmp_path/disk, kind)``: a 64 MiB tmpfs for kind "tmpfs" (skipped where mount is
    refused), a plain directory for "patched"."""
    root = tmp_path / "disk"
    root.mkdir()
    if request.param == "patched":
        yield root, request.param
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield root, request.param
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.mark.parametrize("disk", ["tmpfs", "patched"], indirect=True)
def test_disk_full_during_a_save(disk: tuple[Path, str]) -> None:
    root, kind = disk
    results = run_distributed(_run_out_of_space, 2, args=(str(root), kind), timeout=150)
    for res in results:  # every rank raised the same message
        assert res == results[0]
    intact = {"names": ["iter_0000001"], "latest": "iter_0000001", "iter1": None}
    expected = {"rank file": "(extra/rank_00001.pt on rank 1)",
                "metadata": "(metadata.json on rank 0)", "shards": "(dist-checkpoint shards on rank"}
    for site, where in expected.items():
        message, state = results[0][site]
        assert message.startswith(f"{NO_SPACE} while writing iter_0000002 {where}"), (site, message)
        assert message.endswith("the newest complete checkpoint is iter_0000001"), message
        assert state == intact, (site, state)  # no temporary directory left, iter 1 valid
    if kind == "tmpfs":  # space is freed: the next start can save again
        subprocess.run(["mount", "-o", "remount,size=64m", str(root)], check=True)
    _check_resumed(run_distributed(_resume, 2, args=(str(root),), timeout=150))


def _killed_while_writing(rank: int, world_size: int, root: str) -> None:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    save(Path(root) / "ckpt", 1, _state(rank, world_size, 1.0), pos=10 + rank)

    def kill_my_rank(*args, **kwargs) -> None:  # runs in a shard writer forked by rank 1
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(300)  # must not outlive the rank: the harness fails the test if it does

    if rank == 1:
        FileSystemWriterAsync.write_preloaded_data = staticmethod(kill_my_rank)
    save(Path(root) / "ckpt", 2, _state(rank, world_size, 2.0), pos=20 + rank)


def test_a_rank_killed_during_a_save(tmp_path: Path) -> None:
    with pytest.raises(DistributedTestError) as err:
        run_distributed(_killed_while_writing, 2, args=(str(tmp_path),), timeout=120)
    assert str(err.value).startswith("rank 1 of 2 died with exit code -9"), str(err.value)
    assert not getattr(err.value, "__notes__", None), err.value.__notes__  # no writer survived
    leftovers = [p.name for p in (tmp_path / "ckpt").iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and leftovers[0].startswith("iter_0000002.tmp-")
    assert _newest(tmp_path / "ckpt") == "iter_0000001"
    _check_resumed(run_distributed(_resume, 2, args=(str(tmp_path),), timeout=150))


def _save_two_then_truncate(rank: int, world_size: int, root: str, victim: str) -> None:
    for step in (1, 2):
        save(Path(root) / "ckpt", step, _state(rank, world_size, float(step)), pos=10 * step + rank)
    if rank == 0:
        path = Path(root) / "ckpt" / "iter_0000002" / victim
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("victim, reason", [
    ("metadata.json", "metadata.json does not parse"),
    ("dist/.metadata", "file dist/.metadata has"),
])
def test_truncated_metadata_of_the_latest_checkpoint(tmp_path: Path, victim: str, reason: str):
    run_distributed(_save_two_then_truncate, 2, args=(str(tmp_path), victim), timeout=120)
    assert _newest(tmp_path / "ckpt") == "iter_0000002"
    results = run_distributed(_resume, 2, args=(str(tmp_path),), timeout=150)
    _check_resumed(results)
    warned = "\n".join(results[0]["warnings"])
    assert "skipping invalid checkpoint" in warned and "iter_0000002" in warned
    assert reason in warned, warned
