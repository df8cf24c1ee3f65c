from pathlib import Path

import pytest

from rspo_mega.data.templates import get_template
from rspo_mega.data.tokenizer import (
    LLADA_SPECIAL_TOKENS,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)
from rspo_mega.data.tokenizer_training import train_sentencepiece_tokenizer
from rspo_mega.errors import MissingSpecialTokenError
from rspo_mega.tasks.corpus import task_corpus

SAMPLE = (
    "Using [4, 6, 2] make 5.\n\n<reasoning>\n(4 + 6) / 2\n</reasoning>\n"
    "<answer>  x\t\u00fcn\u00efc\u00f8d\u00e9 \u6f22\u5b57 </answer>"
)
CHAT = (
    "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n{msg}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
SPECIALS = list(dict.fromkeys(LLADA_SPECIAL_TOKENS.values()))


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return task_corpus(num_countdown=300, num_sudoku=100, seed=0)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, corpus) -> Path:
    return train_sentencepiece_tokenizer(corpus, tmp_path_factory.mktemp("sp") / "tiny", vocab_size=400)


@pytest.fixture(scope="module")
def hf_tokenizer_json(tmp_path_factory, corpus) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(params=["sentencepiece", "hf"])
def tokenizer(request, sp_model, hf_tokenizer_json):
    return load_tokenizer(sp_model if request.param == "sentencepiece" else hf_tokenizer_json.parent)


def test_loader_picks_the_backend(sp_model, hf_tokenizer_json) -> None:
    assert isinstance(load_tokenizer(sp_model), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(hf_tokenizer_json), HFTokenizer)
    assert isinstance(load_tokenizer(hf_tokenizer_json.parent), HFTokenizer)


def test_round_trip(tokenizer) -> None:
    ids = tokenizer.encode(SAMPLE)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == SAMPLE
    assert 300 <= tokenizer.vocab_size <= 400


def test_special_ids(tokenizer) -> None:
    ids = tokenizer.special_ids
    assert ids["pad"] == ids["eos"] == tokenizer.token_to_id("<|endoftext|>")
    assert len({ids[r] for r in ("bos", "eos", "mask", "start_header", "end_header", "eot")}) == 6
    assert tokenizer.encode("<|mdm_mask|>") == [tokenizer.mask_id]
    assert tokenizer.decode([tokenizer.mask_id]) == "<|mdm_mask|>"
    assert tokenizer.bos_id == tokenizer.token_to_id("<|startoftext|>")


def test_llada_chat_template_inserts_special_ids(tokenizer) -> None:
    message = "Solve 2 + 3."
    ids = get_template("llada_chat").encode(tokenizer, message)
    assert tokenizer.decode(ids) == CHAT.format(msg=message)
    s = tokenizer.special_ids
    assert ids[:2] == [s["bos"], s["start_header"]]
    assert ids[-1 - len(tokenizer.encode("\n\n"))] == s["end_header"]
    assert ids.count(s["eot"]) == 1 and ids.count(s["start_header"]) == 2


def test_plain_template(tokenizer) -> None:
    ids = get_template("plain").encode(tokenizer, " Solve 2 + 3. ")
    assert ids[0] == tokenizer.bos_id and tokenizer.decode(ids[1:]) == "Solve 2 + 3.\n"
    with pytest.raises(KeyError, match="unknown prompt template 'chatml'"):
        get_template("chatml")


def test_overrides(sp_model) -> None:
    base = load_tokenizer(sp_model)
    by_id = load_tokenizer(sp_model, {"mask": base.special_ids["eot"]})
    assert by_id.mask_id == base.special_ids["eot"] and by_id.special_tokens["mask"] == "<|eot_id|>"
    by_text = load_tokenizer(sp_model, {"pad": "<|eot_id|>"})
    assert by_text.pad_id == base.special_ids["eot"]
    with pytest.raises(ValueError, match="outside vocab"):
        load_tokenizer(sp_model, {"mask": 10**6})
    with pytest.raises(KeyError, match="unknown special token role 'sep'"):
        load_tokenizer(sp_model, {"sep": "<sep>"})


def test_missing_mask_token_is_named(tmp_path: Path, corpus) -> None:
    specials = ["<|startoftext|>", "<|endoftext|>"]
    with pytest.raises(ValueError, match="vocab_size=300 too small"):
        train_sentencepiece_tokenizer(corpus[:200], tmp_path / "small", vocab_size=300, special_tokens=specials)
    no_mask = train_sentencepiece_tokenizer(corpus[:200], tmp_path / "nomask", vocab_size=360, special_tokens=specials)
    with pytest.raises(MissingSpecialTokenError, match=r"nomask\.model has no mask token '<\|mdm_mask\|>'"):
        load_tokenizer(no_mask)
    tokenizer = load_tokenizer(no_mask, {"mask": "<|startoftext|>"})  # overriding rescues it
    with pytest.raises(MissingSpecialTokenError, match="start_header"):
        get_template("llada_chat").encode(tokenizer, "hi")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "broken.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="broken.json"):
        load_tokenizer(bad)
    with pytest.raises(ValueError, match="expected .json or .model"):
        (tmp_path / "vocab.txt").write_text("a")
        load_tokenizer(tmp_path / "vocab.txt")
