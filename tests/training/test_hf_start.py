"""``checkpoint.init_from`` = an HF LLaDA directory: geometry and tokenizer from it, weights
converted on the fly at the run's TP/PP, RL from it, and bad directories named before training."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rspo_mega.config import ConfigError
from rspo_mega.setup import load_run_config, validate_run
from rspo_mega.errors import HFDirectoryError
from tests.distributed import run_distributed
from tests.fixtures.hf_llada import PREFIX, TinyLLaDA, write_hf_llada

# Geometry unlike the schema defaults (4 layers, 128 hidden), so a run that ignored config.json
# would build another model. GQA: 4 heads in 2 KV groups.
GEOMETRY = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, mlp_hidden_size=160,
                max_sequence_length=128)
RUN = [
    "train_steps=2", "global_batch_size=8", "rollout.group_size=2",
    "rollout.gen_length=32", "rollout.block_length=32", "rollout.steps=8",
    "rollout.stop_on_eos_block=false", "likelihood.mc_samples=1", "likelihood.micro_batch_size=8",
    "data.num_train_examples=64", "data.num_test_examples=4", "optimizer.lr=1e-3",
    "logging.tensorboard=false", "logging.progress_bar=false",
]


def _write_with_tokenizer(path: Path, tokenizer_file: Path, name: str, seed: int = 3) -> str:
    """An HF LLaDA dir whose vocab and special ids are those of ``tokenizer_file`` (saved in it
    as ``name``)."""
    from rspo_mega.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    geo = TinyLLaDA(**GEOMETRY, vocab_size=tok.vocab_size, mask_token_id=tok.mask_id,
                    eos_token_id=tok.eos_id)
    write_hf_llada(str(path), geo, seed=seed)
    shutil.copy(tokenizer_file, path / name)
    return str(path)


@pytest.fixture(scope="module")
def hf_sp(tmp_path_factory) -> str:
    """An HF dir with a SentencePiece ``tokenizer.model`` trained on task text (as the tiny
    default's)."""
    from rspo_mega.data.tokenizer_training import train_sentencepiece_tokenizer
    from rspo_mega.tasks.corpus import task_corpus

    root = tmp_path_factory.mktemp("hf_sp")
    model = train_sentencepiece_tokenizer(task_corpus(num_countdown=300, num_sudoku=300),
                                          root / "sp" / "tok", vocab_size=400)
    return _write_with_tokenizer(root / "llada", model, "tokenizer.model")


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> str:
    """An HF dir with a ``tokenizer.json`` (byte-level BPE with LLaDA's special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rspo_mega.data.tokenizer import LLADA_SPECIAL_TOKENS
    from rspo_mega.tasks.corpus import task_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(task_corpus(num_countdown=200, num_sudoku=200), trainers.BpeTrainer(
        vocab_size=360, special_tokens=list(dict.fromkeys(LLADA_SPECIAL_TOKENS.values())),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    root = tmp_path_factory.mktemp("hf_json")
    tok.save(str(root / "tokenizer.json"))
    return _write_with_tokenizer(root / "llada", root / "tokenizer.json", "tokenizer.json")


def test_model_and_tokenizer_come_from_the_directory(hf_sp, hf_json, tmp_path):
    from rspo_mega.data.tokenizer import HFTokenizer, SentencePieceTokenizer
    from rspo_mega.training.run_data import prepare_run_data

    for hf, kind in ((hf_sp, SentencePieceTokenizer), (hf_json, HFTokenizer)):
        raw = json.loads(Path(hf, "config.json").read_text())
        cfg = load_run_config(None, RUN + [f"checkpoint.init_from={hf}",
                                       "model.num_layers=2",  # given and equal: accepted
                                       f"logging.output_dir={tmp_path}"])
        m = cfg.model
        assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups,
                m.ffn_hidden_size, m.vocab_size, m.max_position_embeddings) == (
                    2, 64, 4, 2, 160, raw["vocab_size"], 128)
        assert (m.mask_token_id, m.eos_token_id) == (raw["mask_token_id"], raw["eos_token_id"])
        assert m.params_dtype == "float32"  # the run's, not config.json's bfloat16
        assert cfg.data.tokenizer == hf
        validate_run(cfg, world_size=1)
        data = prepare_run_data(cfg)  # the tokenizer agrees with the model section
        assert isinstance(data.tokenizer, kind) and data.tokenizer.mask_id == m.mask_token_id


def _logits(cfg, ids: torch.Tensor, mask: torch.Tensor):
    """Full-vocab logits of a model built for ``cfg`` and loaded through ``prepare_init``."""
    from rspo_mega.models.llada import build_llada_model
    from rspo_mega.training.checkpoint.init_from import prepare_init
    from tests.models.test_layouts import _forward_full_vocab

    load = prepare_init(cfg)
    model = build_llada_model(cfg.model, init_weights=False)
    load([model])
    model.eval()
    with torch.no_grad():
        return _forward_full_vocab(model, ids, mask)


def _record_reads(calls: list, peak: list) -> None:
    """From now on, append every key this process's HF readers materialise to ``calls`` and
    keep in ``peak[0]`` the most earlier-read tensors still alive at a read."""
    import weakref

    from rspo_mega.models.llada.hf_io import HFCheckpointReader

    real = getattr(HFCheckpointReader.get, "unrecorded", HFCheckpointReader.get)
    returned: list = []

    def get(self, key: str) -> torch.Tensor:
        peak[0] = max(peak[0], sum(ref() is not None for ref in returned))
        calls.append(key)
        tensor = real(self, key)
        returned.append(weakref.ref(tensor))
        return tensor

    get.unrecorded = real
    HFCheckpointReader.get = get


def _layouts_body(rank: int, world: int, hf: str, converted: str, out: str) -> dict:
    from megatron.core import parallel_state as ps

    from rspo_mega.parallel import initialize_model_parallel

    hf_model = load_run_config(None, [f"checkpoint.init_from={hf}"]).model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf_model.vocab_size, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :4] = False
    results: dict = {}
    for tp, pp in ((1, 1), (2, 2)):
        initialize_model_parallel(tp=tp, pp=pp)
        for name, source in (("hf", hf), ("converted", converted)):
            cfg = load_run_config(None, RUN + [f"checkpoint.init_from={source}", f"parallel.tp={tp}",
                                           f"parallel.pp={pp}", f"logging.output_dir={out}"])
            if name == "converted":  # a megatron checkpoint carries no model section
                cfg.model = hf_model
            reads: list = []
            peak = [0]
            _record_reads(reads, peak)
            results[(name, tp, pp)] = _logits(cfg, ids, mask)
            if name == "hf":
                results[("reads", tp, pp)] = (reads, ps.get_pipeline_model_parallel_rank(), peak[0])
    return results


def _stage_keys(pp_rank: int, pp: int, layers: int) -> set[str]:
    per = layers // pp
    keys = {f"{PREFIX}blocks.{i}.{leaf}.weight" for i in range(pp_rank * per, (pp_rank + 1) * per)
            for leaf in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm",
                         "ff_proj", "up_proj", "ff_out")}
    if pp_rank == 0:
        keys.add(f"{PREFIX}wte.weight")
    if pp_rank == pp - 1:
        keys |= {f"{PREFIX}ln_f.weight", f"{PREFIX}ff_out.weight"}
    return keys


@pytest.mark.timeout(300)
def test_logits_match_the_converted_checkpoint_at_tp2_pp2(hf_sp, tmp_path):
    from rspo_mega.models.llada import convert_hf_to_mcore

    converted = str(tmp_path / "converted")
    convert_hf_to_mcore(hf_sp, converted, tp=2, pp=2)
    per_rank = run_distributed(_layouts_body, 4, args=(hf_sp, converted, str(tmp_path / "o")),
                               timeout=280)
    single = per_rank[0][("hf", 1, 1)]
    assert torch.equal(single, per_rank[0][("converted", 1, 1)])
    last_stage = [r for r in per_rank if r[("hf", 2, 2)] is not None]
    assert len(last_stage) == 2  # the two TP ranks of the last stage
    for r in last_stage:
        assert torch.equal(r[("hf", 2, 2)], r[("converted", 2, 2)])  # same weights, same layout
        assert (r[("hf", 2, 2)] - single).abs().max() < 1e-5  # and as at TP1
    for r in per_rank:  # each rank reads its own stage's tensors, each once
        reads, pp_rank, _ = r[("reads", 2, 2)]
        assert sorted(reads) == sorted(_stage_keys(pp_rank, 2, GEOMETRY["n_layers"]))
        assert sorted(r[("reads", 1, 1)][0]) == sorted(_stage_keys(0, 1, GEOMETRY["n_layers"]))
        # streaming: when a tensor is read, only the other sources of the same megatron tensor
        # (q and k before v) are still held
        assert max(r[("reads", 1, 1)][2], r[("reads", 2, 2)][2]) <= 2


def _rl_body(rank: int, world: int, hf: str, out: str) -> dict:
    from rspo_mega.training.trainer import Trainer

    cfg = load_run_config(None, RUN + [f"checkpoint.init_from={hf}", "parallel.tp=2",
                                   f"logging.output_dir={out}", f"checkpoint.save_dir={out}/ckpt"])
    trainer = Trainer(cfg, validate_run(cfg, world_size=world))
    from rspo_mega.models.llada.hf_io import HFCheckpointReader

    wte = HFCheckpointReader(hf).get(f"{PREFIX}wte.weight").float()  # [V, H]
    local = trainer.policy.model[0].module.embedding.word_embeddings.weight.detach()  # [Vp / tp, H]
    rows = local.shape[0]
    start = rank * rows
    real = wte[start:start + rows]
    starts_from_hf = torch.equal(local[:len(real)], real) and not local[len(real):].any()
    return {"summary": trainer.run(), "step": trainer.step, "starts_from_hf": starts_from_hf,
            "layers": len(trainer.policy.model[0].module.decoder.layers)}


@pytest.mark.timeout(300)
def test_a_few_rl_steps_from_an_hf_directory(hf_sp, tmp_path):
    from rspo_mega.training.checkpoint.files import validate_checkpoint

    out = tmp_path / "run"
    results = run_distributed(_rl_body, 2, args=(hf_sp, str(out)), timeout=280)
    assert all(r["starts_from_hf"] for r in results)  # both TP shards of the vocab
    result = results[0]
    assert result["step"] == 2 and result["layers"] == GEOMETRY["n_layers"]
    assert {"before/eval/accuracy", "after/eval/accuracy"} <= set(result["summary"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [d["loss"] for d in lines if "loss" in d]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert validate_checkpoint(out / "ckpt" / "iter_0000002") is None


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _bad_dirs(hf: str, other: str, root: Path) -> dict[str, tuple[str, list[str], type, str]]:
    """name -> (HF dir, extra overrides, error type, message regex) of each bad start."""
    from tests.models.test_convert import _rewrite

    missing = Path(shutil.copytree(hf, root / "missing_shard"))
    (missing / "model-00002-of-00005.safetensors").unlink()
    short = f"{PREFIX}blocks.1.k_proj.weight"
    misshapen = _rewrite(hf, str(root / "misshapen"),
                         lambda t, shard: {k: (v[:-1] if k == short else v) for k, v in t.items()})
    pickle = root / "pickle"
    pickle.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(Path(hf, name), pickle / name)
    (pickle / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    deeper = Path(shutil.copytree(hf, root / "deeper"))  # config.json says 3 layers, files have 2
    raw = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**raw, "n_layers": 3}))
    return {
        "missing_shard": (str(missing), [], HFDirectoryError,
                          r"model-00002-of-00005\.safetensors \(listed in model\.safetensors"),
        "misshapen": (misshapen, [], HFDirectoryError, r"blocks\.1\.k_proj\.weight has shape \[31, 64\]"),
        "pickle": (str(pickle), [], HFDirectoryError, r"pytorch_model\.bin: refusing a pickle"),
        "config_vs_tensors": (str(deeper), [], HFDirectoryError, r"missing tensor\(s\) \['model\.transformer"
                                                           r"\.blocks\.2\.attn_norm\.weight'"),
        "tokenizer_vs_config": (hf, [f"data.tokenizer={other}"], ConfigError,
                                r"model\.(mask|eos)_token_id=\d+ but the tokenizer"),
    }


def _bad_body(rank: int, world: int, cases: dict, out: str) -> dict:
    from rspo_mega.training.trainer import Trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must never read an HF input")

    torch.load = no_unpickling
    seen = {}
    for name, (hf, extra, _, _) in cases.items():
        cfg = load_run_config(None, RUN + [f"checkpoint.init_from={hf}", f"logging.output_dir={out}",
                                       f"checkpoint.save_dir={out}/ckpt", *extra])
        try:
            Trainer(cfg, validate_run(cfg, world_size=world), build_model=no_model)
            seen[name] = (None, "no error")
        except Exception as err:  # noqa: BLE001 - the test compares type and message
            seen[name] = (type(err), str(err))
    return seen


@pytest.mark.timeout(200)
def test_bad_directories_are_named_before_the_model_exists(hf_sp, hf_json, tmp_path):
    cases = _bad_dirs(hf_sp, hf_json, tmp_path / "bad")
    out = tmp_path / "run"
    (out / "ckpt").mkdir(parents=True)
    (out / "ckpt" / "keep.txt").write_text("written before the run")
    before = {name: _digest(Path(hf)) for name, (hf, *_) in cases.items()}
    before["run"] = _digest(out)
    seen = run_distributed(_bad_body, 1, args=(cases, str(out)), timeout=180)[0]
    for name, (_, _, error, pattern) in cases.items():
        got, message = seen[name]
        assert got is not None and issubclass(got, error), (name, got, message)
        assert re.search(pattern, message), (name, message)
    after = {name: _digest(Path(hf)) for name, (hf, *_) in cases.items()}
    after["run"] = _digest(out)
    assert after == before  # nothing written, nothing lost


def test_model_keys_that_disagree_are_named_when_the_config_loads(hf_sp, hf_json, tmp_path,
                                                                   capsys):
    from rspo_mega.models.llada.hf_io import looks_like_hf_checkpoint
    from rspo_mega.train import main

    with pytest.raises(ConfigError, match=r"model\.num_layers=4 \(config\.json: 2\), "
                                          r"model\.hidden_size=128 \(config\.json: 64\)"):
        load_run_config(None, [f"checkpoint.init_from={hf_sp}", "model.num_layers=4",
                           "model.hidden_size=128"])
    other = tmp_path / "other.json"  # model.hf_config describing another model
    other.write_text(json.dumps({**json.loads(Path(hf_sp, "config.json").read_text()),
                                 "d_model": 96}))
    with pytest.raises(ConfigError, match=r"from model\.hf_config=.*model\.hidden_size=96 "
                                          r"\(config\.json: 64\)"):
        load_run_config(None, [f"checkpoint.init_from={hf_sp}", f"model.hf_config={other}"])
    arch = Path(shutil.copytree(hf_sp, tmp_path / "moe"))
    raw = json.loads((arch / "config.json").read_text())
    (arch / "config.json").write_text(json.dumps({**raw, "architectures": ["LLaDAMoEModelLM"]}))
    no_tok = Path(shutil.copytree(hf_sp, tmp_path / "no_tok"))
    (no_tok / "tokenizer.model").unlink()
    plain = tmp_path / "plain.yaml"  # no model keys (the tiny default sets its own geometry)
    plain.write_text("train_steps: 1\n")
    for bad in (arch, no_tok):
        assert main(["--config", str(plain), "--dry-run", f"checkpoint.init_from={bad}",
                     f"logging.output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture ['LLaDAMoEModelLM']" in err
    assert "holds neither tokenizer.json nor tokenizer.model; set data.tokenizer" in err
    # what the other init_from forms hold is never taken for an HF directory
    for megatron in (".metadata", "dist", "latest", "iter_0000004"):
        d = tmp_path / f"m{len(megatron)}"
        d.mkdir()
        (d / megatron).mkdir()
        (d / "config.json").write_text("{}")
        assert not looks_like_hf_checkpoint(d), megatron
    assert looks_like_hf_checkpoint(hf_sp) and looks_like_hf_checkpoint(tmp_path / "moe")


def test_a_run_may_extend_the_context_of_its_start(hf_sp, tmp_path):
    """model.max_position_embeddings is the run's (RoPE: no weights depend on it); the logits of
    a sequence within both contexts are the start's."""
    base = load_run_config(None, RUN + [f"checkpoint.init_from={hf_sp}"])
    longer = load_run_config(None, RUN + [f"checkpoint.init_from={hf_sp}",
                                      "model.max_position_embeddings=512"])
    assert (base.model.max_position_embeddings, longer.model.max_position_embeddings) == (128, 512)
    assert replace(longer.model, max_position_embeddings=128) == base.model
    ids = torch.randint(0, base.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    got = run_distributed(_two_contexts, 1, args=(base, longer, ids, mask), timeout=300)[0]
    assert torch.equal(got[0], got[1])


def _two_contexts(rank: int, world: int, base, longer, ids, mask) -> tuple:
    from rspo_mega.parallel import initialize_model_parallel

    initialize_model_parallel(seed=1)
    return _logits(base, ids, mask), _logits(longer, ids, mask)


def test_unset_query_groups_and_pad_id_mean_their_defaults(tmp_path):
    from dataclasses import replace

    from rspo_mega.models.llada.hf_config import conflicting_fields
    from tests.fixtures.hf_llada import MHA, config_json

    raw = config_json(MHA)  # 4 heads in 4 KV groups (MHA), pad = eos = 298
    run = load_run_config(None, ["model.num_layers=2", "model.hidden_size=64",
                             "model.num_query_groups=4", "model.pad_token_id=298"]).model
    keys = {"num_layers", "hidden_size", "num_query_groups", "pad_token_id"}
    assert conflicting_fields(run, raw, keys=keys) == []
    assert conflicting_fields(replace(run, num_query_groups=2), raw, keys=keys) == [
        ("num_query_groups", 2, None)]
    # The 8B recipes, pointed at an HF LLaDA-8B directory instead of a converted checkpoint:
    # their model keys repeat the checkpoint's shape, so they load as they are.
    hf8b = tmp_path / "LLaDA-8B-Instruct"
    hf8b.mkdir()
    (hf8b / "config.json").write_text(json.dumps(config_json(TinyLLaDA(
        n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
        vocab_size=126464, max_sequence_length=4096, mask_token_id=126336,
        eos_token_id=126081))))
    recipe = Path(__file__).parents[2] / "examples" / "configs" / "llada8b_rspo_countdown.yaml"
    cfg = load_run_config(recipe, [f"checkpoint.init_from={hf8b}", "model.hf_config=null"])
    assert (cfg.model.num_layers, cfg.model.num_query_groups, cfg.model.params_dtype) == (
        32, None, "bfloat16")
