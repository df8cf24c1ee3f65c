"""HF <-> megatron conversion: bit-exact round trip, the CLIs, and refusal of bad input."""

from __future__ import annotations

import glob
import json
import os
import runpy
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rspo_mega.models.llada import convert_hf_to_mcore, convert_mcore_to_hf
from rspo_mega.models.llada import hf_adapter
from tests.fixtures.hf_llada import PREFIX

TOOLS = os.path.join(os.path.dirname(__file__), "..", "..", "tools")


def _tensors(path: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def _assert_identical(a: str, b: str) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def _cli(name: str, *argv: str) -> None:
    import sys

    old = sys.argv
    sys.argv = [name, *argv]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(os.path.join(TOOLS, name), run_name="__main__")
        assert done.value.code == 0
    finally:
        sys.argv = old


def test_round_trip_tp2_pp2_is_bit_exact(hf_mha, hf_gqa, converted, tmp_path):
    for name, src in (("mha", hf_mha), ("gqa", hf_gqa)):
        out = str(tmp_path / name)
        convert_mcore_to_hf(converted[name], out, max_shard_size="40KB")
        _assert_identical(src, out)
        index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
        assert len(set(index["weight_map"].values())) > 1  # really sharded
        cfg = json.load(open(os.path.join(out, "config.json")))
        assert cfg["architectures"] == ["LLaDAModelLM"] and cfg["torch_dtype"] == "bfloat16"


def test_clis_with_template_overwrite_and_dtype(hf_gqa, tmp_path):
    mc, hf = str(tmp_path / "mc"), str(tmp_path / "hf")
    _cli("convert_hf_to_mcore.py", "--hf", hf_gqa, "--out", mc, "--tp", "1", "--dtype", "float32")
    os.remove(os.path.join(mc, "hf_config.json"))  # geometry must then come from --template
    _cli("convert_mcore_to_hf.py", "--ckpt", mc, "--out", hf, "--template", hf_gqa)
    source, fp32 = _tensors(hf_gqa), _tensors(hf)  # the checkpoint's dtype is kept: float32
    assert all(t.dtype == torch.float32 and torch.equal(t, source[k].float())
               for k, t in fp32.items()) and fp32.keys() == source.keys()
    assert json.load(open(os.path.join(hf, "config.json")))["torch_dtype"] == "float32"
    assert os.path.isfile(os.path.join(hf, "tokenizer_config.json"))
    assert os.path.isfile(os.path.join(hf, "modeling_llada.py"))
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        convert_mcore_to_hf(mc, hf, template=hf_gqa)
    _cli("convert_mcore_to_hf.py", "--ckpt", mc, "--out", hf, "--template", hf_gqa,
         "--dtype", "bfloat16", "--overwrite")
    _assert_identical(hf_gqa, hf)  # bf16 -> fp32 -> bf16 is exact


def _one_line(name: str, *argv: str) -> str:
    """The single line a converter prints for a mistake in its arguments (exit code 2)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, os.path.join(TOOLS, name), *argv],
                          capture_output=True, text=True, timeout=120)
    text = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in text, text[-3000:]
    assert len(text.strip().splitlines()) == 1, text[-3000:]
    return text.strip()


def test_cli_mistakes_are_one_line(hf_gqa, converted, tmp_path):
    missing = str(tmp_path / "missing")
    assert _one_line("convert_hf_to_mcore.py", "--hf", missing, "--out", str(tmp_path / "o")) \
        == f"convert_hf_to_mcore: HF directory error: --hf {missing}: no such directory"
    line = _one_line("convert_hf_to_mcore.py", "--hf", hf_gqa, "--out", converted["gqa"])
    assert line.startswith(f"convert_hf_to_mcore: output error: --out {converted['gqa']}: ") \
        and "--overwrite" in line, line
    assert _one_line("convert_mcore_to_hf.py", "--ckpt", missing, "--out", str(tmp_path / "o")) \
        == f"convert_mcore_to_hf: checkpoint error: --ckpt {missing}: no such directory"
    line = _one_line("convert_mcore_to_hf.py", "--ckpt", converted["gqa"], "--out", hf_gqa)
    assert line.startswith(f"convert_mcore_to_hf: output error: --out {hf_gqa}: "), line


def _rewrite(src: str, dst: str, edit) -> str:
    """Copy an HF dir, then apply ``edit(tensors) -> tensors`` to every shard (index updated)."""
    shutil.copytree(src, dst)
    index_path = os.path.join(dst, "model.safetensors.index.json")
    index = json.load(open(index_path))
    for shard in sorted(set(index["weight_map"].values())):
        path = os.path.join(dst, shard)
        new = edit(load_file(path), shard)
        save_file(new, path, metadata={"format": "pt"})
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
        index["weight_map"].update({k: shard for k in new})
    json.dump(index, open(index_path, "w"))
    return dst


def _drop(key):
    return lambda t, shard: {k: v for k, v in t.items() if k != key}


def _add_extra(t, shard):
    return {**t, f"{PREFIX}blocks.0.rotary.inv_freq": torch.zeros(4)} if "00001" in shard else t


def _bad_shape(t, shard):
    key = f"{PREFIX}blocks.1.k_proj.weight"
    return {k: (v[:-1] if k == key else v) for k, v in t.items()}


@pytest.mark.parametrize("edit,error,needle", [
    (_drop(f"{PREFIX}blocks.1.up_proj.weight"), KeyError, "blocks.1.up_proj.weight"),
    (_add_extra, KeyError, "blocks.0.rotary.inv_freq"),
    (_bad_shape, ValueError, "blocks.1.k_proj.weight"),
])
def test_bad_tensors_are_named(hf_mha, tmp_path, edit, error, needle):
    bad = _rewrite(hf_mha, str(tmp_path / "bad"), edit)
    out = str(tmp_path / "out")
    with pytest.raises(error, match=needle.replace(".", r"\.")):
        convert_hf_to_mcore(bad, out)
    assert not os.path.exists(out)


def test_index_listing_a_missing_tensor(hf_mha, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(hf_mha, bad)
    index_path = os.path.join(bad, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"][f"{PREFIX}blocks.7.q_proj.weight"] = "model-00002-of-00005.safetensors"
    json.dump(index, open(index_path, "w"))
    with pytest.raises(KeyError, match=r"blocks\.7\.q_proj\.weight.*missing|model-00002"):
        convert_hf_to_mcore(bad, str(tmp_path / "out"))


def test_unsupported_architecture(hf_mha, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(hf_mha, bad)
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg["architectures"] = ["LLaDAMoEModelLM"]
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    with pytest.raises(ValueError, match="unsupported architecture"):
        convert_hf_to_mcore(bad, str(tmp_path / "out"))


def test_pickle_checkpoint_is_refused_without_loading(hf_mha, tmp_path, monkeypatch):
    bad = tmp_path / "bin"
    bad.mkdir()
    shutil.copy(os.path.join(hf_mha, "config.json"), bad / "config.json")
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must never be called on an HF input")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(ValueError, match="pytorch_model.bin: refusing a pickle"):
        convert_hf_to_mcore(str(bad), str(tmp_path / "out"))


def test_existing_output_refused_and_failure_leaves_nothing(hf_mha, converted, tmp_path,
                                                            monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        convert_hf_to_mcore(hf_mha, str(out))
    assert os.listdir(out) == ["config.json"]

    calls = {"n": 0}
    real = hf_adapter.to_mcore

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_adapter, "to_mcore", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_hf_to_mcore(hf_mha, str(out), overwrite=True)
    assert os.listdir(out) == ["config.json"]  # the old content is untouched
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp directory left behind
    monkeypatch.undo()
    convert_hf_to_mcore(hf_mha, str(out), overwrite=True)
    assert "metadata.json" in os.listdir(out)


def test_mcore_side_errors(hf_mha, hf_gqa, converted, tmp_path):
    with pytest.raises(KeyError, match=r"'wrong\.embedding\.word_embeddings\.weight'"):
        convert_mcore_to_hf(converted["mha"], str(tmp_path / "a"), prefix="wrong.")
    with pytest.raises(ValueError, match=r"tensor decoder\.layers\.\S+ has shape"):  # GQA cfg, MHA ckpt
        convert_mcore_to_hf(converted["mha"], str(tmp_path / "b"), hf_config=hf_gqa)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_mcore_to_hf(str(tmp_path / "nope"), str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_a_trainer_checkpoint_is_found_by_its_iteration_directory(converted, tmp_path):
    """``--ckpt iter_N`` stands for its ``dist/``; the optimizer's moments, stored under their own
    prefixes beside the model's, are not taken for a second model."""
    from rspo_mega.models.llada.convert import _detect_prefix

    keys = {"embedding.word_embeddings.weight", "optimizer.state.exp_avg.embedding.word_embeddings"
            ".weight", "optimizer.state.exp_avg_sq.embedding.word_embeddings.weight"}
    assert _detect_prefix(keys) == ""
    iteration = tmp_path / "iter_0000007"
    iteration.mkdir()
    shutil.copytree(converted["gqa"], iteration / "dist")
    out = tmp_path / "hf"
    convert_mcore_to_hf(str(iteration), str(out))  # geometry: the copy of hf_config.json
    assert (out / "config.json").is_file()
