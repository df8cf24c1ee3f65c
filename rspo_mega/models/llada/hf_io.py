"""Reading and writing HF safetensors checkpoints tensor by tensor (never a pickle).

:class:`HFCheckpointReader` resolves every key through ``model.safetensors.index.json`` (shards
are grouped by tensor name, not by layer) and opens shards lazily with ``safe_open``: only the
tensor asked for is materialised. :func:`write_hf_checkpoint` streams tensors into size-capped
shards (one tensor in memory at a time) and writes the index.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# A megatron checkpoint (torch_dist ``.metadata``), a trainer checkpoint (``dist/``) or a trainer
# save_dir (``latest``, ``iter_*``) is never read as HF, whatever else it holds.
_MEGATRON_MARKERS = (".metadata", "dist", "latest")


def looks_like_hf_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory laid out as an HF checkpoint: a ``config.json``,
    safetensors or pickle weights, and none of the files of a megatron or trainer checkpoint."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    if any(n in _MEGATRON_MARKERS or n.startswith("iter_") for n in names):
        return False
    return any(n == "config.json" or n.endswith(".safetensors") or n.endswith(PICKLE_SUFFIXES)
               for n in names)


class HFCheckpointReader:
    """Lazy, key-addressed access to an HF safetensors checkpoint directory."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"HF checkpoint directory {self.path} does not exist")
        self.weight_map = self._read_weight_map()
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}  # key -> (dtype tag, shape)
        self._check_index()

    def _refuse_pickles(self, names: Iterable[str]) -> None:
        for name in names:
            if name.endswith(PICKLE_SUFFIXES) or name.endswith(".bin.index.json"):
                raise ValueError(
                    f"{os.path.join(self.path, name)}: refusing a pickle checkpoint (torch.load "
                    "can run arbitrary code); convert it to safetensors first"
                )

    def _read_weight_map(self) -> dict[str, str]:
        index = os.path.join(self.path, INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{index}: not a safetensors index ({exc!r})") from None
            self._refuse_pickles(set(weight_map.values()))
            return dict(weight_map)
        single = os.path.join(self.path, SINGLE_NAME)
        if os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                return {k: SINGLE_NAME for k in f.keys()}
        self._refuse_pickles(sorted(os.listdir(self.path)))
        raise FileNotFoundError(f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME}")

    def _check_index(self) -> None:
        by_file: dict[str, set[str]] = {}
        for key, name in self.weight_map.items():
            by_file.setdefault(name, set()).add(key)
        for name, keys in by_file.items():
            file = os.path.join(self.path, name)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file} (listed in {INDEX_NAME}) does not exist")
            with safe_open(file, framework="pt") as f:
                stored = set(f.keys())
                missing = keys - stored
                if missing:
                    raise KeyError(
                        f"{file}: tensor {sorted(missing)[0]} listed in the index is missing")
                for key in keys:
                    sl = f.get_slice(key)
                    self._meta[key] = (sl.get_dtype(), tuple(sl.get_shape()))

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        self._file(key)
        return self._meta[key][1]

    def dtype(self, key: str) -> torch.dtype:
        self._file(key)
        raw = self._meta[key][0]
        if raw not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key} has unsupported dtype {raw}")
        return _DTYPES[raw]

    def get(self, key: str) -> torch.Tensor:
        """Materialise one tensor (its own memory). The shard is mapped only for this read, so
        pages of tensors already read do not stay resident (RSS stays flat over a model)."""
        with safe_open(os.path.join(self.path, self._file(key)), framework="pt") as f:
            return f.get_tensor(key)

    def _file(self, key: str) -> str:
        try:
            return self.weight_map[key]
        except KeyError:
            raise KeyError(f"{self.path}: tensor {key} not in the checkpoint") from None


def parse_size(text: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"2GiB"`` / ``1000`` -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text.upper().replace("IB", "iB"))
    if not m:
        raise ValueError(f"cannot parse size {text!r} (e.g. 5GB, 500MB, 2GiB)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy in-order grouping of ``(key, nbytes)`` into shards of at most ``max_shard_bytes``
    (a tensor larger than the cap gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return [s for s in shards if s]


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def stream_safetensors(path: str, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                       tensors: Iterator[tuple[str, torch.Tensor]]) -> int:
    """Write one safetensors file whose header is known up front, one tensor at a time.

    ``entries`` lists ``(key, dtype, shape)`` in file order; ``tensors`` must yield exactly those.
    Only the tensor being written is held. Returns the number of data bytes written.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in entries:
        nbytes = torch.empty((), dtype=dtype).element_size() * _numel(shape)
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, dtype, shape in entries:
            got_key, tensor = next(tensors)
            if got_key != key or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(
                    f"tensor stream mismatch at {key}: got {got_key} {tensor.dtype} "
                    f"{list(tensor.shape)}, expected {dtype} {list(shape)}"
                )
            f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return offset


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_hf_checkpoint(
    out_dir: str,
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    max_shard_bytes: int,
    config: dict,
) -> None:
    """Stream ``tensors`` (in the order of ``entries``) into safetensors shards of at most
    ``max_shard_bytes`` (a larger tensor gets its own shard), the index and ``config.json``.
    One tensor is held at a time, whatever the shard size."""
    sizes = [(k, torch.empty((), dtype=d).element_size() * _numel(s)) for k, d, s in entries]
    plan = plan_shards(sizes, max_shard_bytes)
    n = len(plan)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    by_key = {e[0]: e for e in entries}
    weight_map: dict[str, str] = {}
    total = 0
    stream = iter(tensors)
    for keys, name in zip(plan, names):
        total += stream_safetensors(os.path.join(out_dir, name), [by_key[k] for k in keys], stream)
        weight_map.update({k: name for k in keys})
    if next(stream, None) is not None:
        raise RuntimeError("tensor stream has more tensors than planned")
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def copy_template_files(template: str, out_dir: str, skip: Callable[[str], bool]) -> list[str]:
    """Copy tokenizer/modeling files from an HF directory (no weights, no config.json)."""
    import shutil

    copied = []
    for name in sorted(os.listdir(template)):
        src = os.path.join(template, name)
        if not os.path.isfile(src) or skip(name):
            continue
        shutil.copy2(src, os.path.join(out_dir, name))
        copied.append(name)
    return copied
