"""Run checkpoints: round trip at TP=2, keep-last-N, tmp/corruption fallback, RNG, config check."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rspo_mega.training.checkpoint.files import validate_checkpoint
from rspo_mega.errors import IncompatibleCheckpointError
from rspo_mega.training.checkpoint.compat import check_compatible
from tests.distributed import run_distributed
from tests.training.checkpoint_parts import PlainPart, ShardedPart, load


def _tiny_gpt(seed: int) -> torch.nn.Module:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from rspo_mega.parallel import set_random_seed

    set_random_seed(seed)
    config = TransformerConfig(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, tensor_model_parallel_size=2,
    )
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
                    vocab_size=128, max_sequence_length=64, position_embedding_type="rope")


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _draws() -> tuple:
    return (random.random(), float(np.random.rand()), torch.rand(4))


class _Collect(logging.Handler):
    """Keeps the messages of WARNING records and above in ``messages``."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


def collect_checkpoint_warnings() -> list[str]:
    """A list that fills with the checkpoint code's warnings from now on (in this process)."""
    handler = _Collect()
    logging.getLogger("rspo_mega.training.checkpoint").addHandler(handler)
    return handler.messages


def _body(rank: int, world_size: int, root: str) -> dict:
    from rspo_mega.parallel import initialize_model_parallel
    from rspo_mega.errors import CheckpointError
    from rspo_mega.training.checkpoint.files import read_metadata
    from rspo_mega.training.checkpoint.manager import CheckpointManager
    from rspo_mega.training.checkpoint.init_from import resolve_model_checkpoint
    from rspo_mega.training.checkpoint.parts import RNGState

    def resolve(path: Path) -> str:
        try:
            return str(Path(resolve_model_checkpoint(path)).relative_to(root))
        except CheckpointError as exc:
            return f"error: {exc}"

    warnings = collect_checkpoint_warnings()
    initialize_model_parallel(tp=2)
    out: dict = {}
    save_dir = Path(root) / "ckpt"
    config = {"model": {"hidden_size": 32}, "seed": 1}
    model = _tiny_gpt(seed=7)
    data = PlainPart()
    manager = CheckpointManager(save_dir, keep_last=2, config=config, parts={
        "model": ShardedPart(model.sharded_state_dict()), "data": data, "rng": RNGState()})
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        data.value = 10 * step + rank
        final = manager.save(step, last=True)
        if step == 3:
            expected_draws = _draws()  # what the RNG streams give right after the save
    saved_params = _params(model)
    out["dirs"] = sorted(p.name for p in save_dir.iterdir())
    out["meta"] = {k: v for k, v in read_metadata(final).items() if k != "files"}
    out["not_due"] = manager.save(4)  # save_interval=0: only the last step saves

    # Leftover temporary directory: ignored and removed. (Both ranks listed the directory first.)
    torch.distributed.barrier()
    if rank == 0:
        (save_dir / "iter_0000009.tmp-deadbeef" / "dist").mkdir(parents=True)
    out["resumable"] = manager.find_resumable().name
    # checkpoint.init_from: a save_dir, one trainer checkpoint, or a converted model checkpoint
    out["init_from"] = [resolve(save_dir), resolve(save_dir / "iter_0000002"),
                        resolve(save_dir / "iter_0000002" / "dist")]
    torch.distributed.barrier()  # rank 0 has removed the leftover
    out["tmp_left"] = [p.name for p in save_dir.iterdir() if ".tmp-" in p.name]

    # Round trip into a differently initialised model, plus a plain part and RNG states.
    _draws()
    fresh = _tiny_gpt(seed=99)
    out["differs_before"] = any(
        not torch.equal(v, saved_params[k]) for k, v in _params(fresh).items()
    )
    path, state_dict, plain = load(save_dir, save_dir / "iter_0000003",
                                   fresh.sharded_state_dict(), "data")
    got = _draws()  # no RNG part in that load: the streams go on
    out["rng_untouched"] = got[0] != expected_draws[0]
    fresh.load_state_dict(state_dict)
    out["max_diff"] = max(
        (v - saved_params[k]).abs().max().item() for k, v in _params(fresh).items()
    )
    out["data_position"] = plain["data"]
    manager.load(save_dir / "iter_0000003")
    got = _draws()
    out["rng_equal"] = (got[0] == expected_draws[0] and got[1] == expected_draws[1]
                        and torch.equal(got[2], expected_draws[2]))
    out["data_loaded"] = data.value

    # Corrupt the newest checkpoint: truncate a shard -> falls back to step 2, with a warning.
    if rank == 0:
        shard = sorted((save_dir / "iter_0000003" / "dist").glob("*.distcp"))[0]
        with open(shard, "r+b") as f:
            f.truncate(max(0, shard.stat().st_size - 7))
    out["fallback"] = manager.find_resumable().name
    out["init_from_corrupt"] = [resolve(save_dir), resolve(save_dir / "iter_0000003")]
    try:
        load(save_dir, save_dir / "iter_0000003", _tiny_gpt(seed=1).sharded_state_dict())
        out["load_corrupt"] = "loaded"
    except CheckpointError as exc:
        out["load_corrupt"] = str(exc)
    # Delete the dist metadata of step 2 as well -> nothing valid remains.
    if rank == 0:
        (save_dir / "iter_0000002" / "dist" / ".metadata").unlink()
    out["none_left"] = manager.find_resumable()
    out["init_from_none_left"] = resolve(save_dir)
    out["warnings"] = warnings
    return out


def test_checkpoint_manager_two_ranks(tmp_path: Path) -> None:
    r0, r1 = run_distributed(_body, world_size=2, args=(str(tmp_path),), timeout=150)
    for r, res in enumerate((r0, r1)):
        assert res["dirs"] == ["iter_0000002", "iter_0000003"], res["dirs"]
        assert res["resumable"] == "iter_0000003"
        assert res["tmp_left"] == []
        assert res["differs_before"]
        assert res["max_diff"] == 0.0
        assert res["data_position"] == res["data_loaded"] == 30 + r
        assert res["rng_equal"] and res["rng_untouched"] and res["not_due"] is None
        assert res["fallback"] == "iter_0000002"
        assert "not loadable" in res["load_corrupt"] and ".distcp" in res["load_corrupt"]
        assert res["none_left"] is None
        assert res["init_from"] == ["ckpt/iter_0000003/dist", "ckpt/iter_0000002/dist",
                                    "ckpt/iter_0000002/dist"]
        assert res["init_from_corrupt"][0] == "ckpt/iter_0000002/dist"
        assert res["init_from_corrupt"][1].startswith("error: checkpoint.init_from=")
        assert ".distcp" in res["init_from_corrupt"][1]
        assert "no valid checkpoint" in res["init_from_none_left"]
    meta = r0["meta"]
    assert meta["step"] == 3 and meta["world_size"] == 2
    assert meta["layout"]["tp"] == 2 and meta["config"]["model"]["hidden_size"] == 32
    joined = "\n".join(r0["warnings"])
    assert "iter_0000003" in joined and "bytes" in joined
    assert "iter_0000002" in joined and ".metadata" in joined


def test_validate_checkpoint_reasons(tmp_path: Path) -> None:
    assert "metadata.json is missing" in validate_checkpoint(tmp_path)
    (tmp_path / "metadata.json").write_text("{not json")
    assert "does not parse" in validate_checkpoint(tmp_path)


def test_check_compatible_names_keys() -> None:
    saved = {"model": {"hidden_size": 4096, "fp8": {"enabled": True}}, "seed": 1}
    check_compatible(saved, {"model": {"hidden_size": 4096, "fp8": {"enabled": True}}, "seed": 2})
    current = {"model": {"hidden_size": 2048, "fp8": {"enabled": False}, "num_layers": 4}}
    with pytest.raises(IncompatibleCheckpointError) as info:
        check_compatible(saved, current)
    msg = str(info.value)
    assert "model.hidden_size: 4096 -> 2048" in msg
    assert "model.fp8.enabled: True -> False" in msg
    assert "model.num_layers: '<absent>' -> 4" in msg
    assert "seed" not in msg
