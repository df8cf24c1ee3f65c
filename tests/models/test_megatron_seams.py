"""The probes of the megatron-core internals LLaDA's modules rely on: all hold on the installed
megatron-core, and each fails (naming its seam) once the internal it guards changes."""

from __future__ import annotations

import pytest

from rspo_mega.models.llada import megatron_seams
from rspo_mega.models.llada.megatron_seams import SEAMS, broken_seams


def test_every_seam_holds_on_the_installed_megatron_core():
    assert broken_seams() == []
    megatron_seams.check_megatron_seams()


def _seam(name: str):
    return next(s for s in SEAMS if s.relies_on.endswith(name))


def _preprocess_reordered(self, input_ids, position_ids, decoder_input=None):
    decoder_input = rotary_pos_emb = rotary_pos_cos = rotary_pos_sin = None
    sequence_len_offset = padding_mask = rotary_pos_cos_sin = None
    out = (decoder_input, rotary_pos_cos, rotary_pos_sin, rotary_pos_emb, sequence_len_offset,
           padding_mask)
    out += (rotary_pos_cos_sin,)
    return out


def _forward_attention_triple(self, hidden_states, attention_mask=None, context=None,
                              rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                              rotary_pos_cos_sin=None, attention_bias=None,
                              inference_context=None, packed_seq_params=None,
                              sequence_len_offset=None):
    with self.bias_dropout_add_exec_handler():
        hidden_states = self.self_attn_bda(self.training, False)(hidden_states, None, 0.0)
    return hidden_states, context, None


def _block_forward_without_context(self, hidden_states, attention_mask, inference_context=None):
    for layer in self.layers:
        hidden_states, _ = layer(hidden_states=hidden_states, attention_mask=attention_mask)
    return hidden_states


def _rope_renamed(t, freqs, transformer_config, cu_seqlens=None, mscale=1.0, cp_group=None):
    return t


def _rotary_forward_renamed(self, seq_len, start=0, packed_seq=False):
    return None


CHANGES = [  # (seam, owner module, owner attribute path, replacement)
    ("GPTModel._preprocess", "megatron.core.models.gpt", ("GPTModel", "_preprocess"),
     _preprocess_reordered),
    ("TransformerLayer._forward_attention", "megatron.core.transformer.transformer_layer",
     ("TransformerLayer", "_forward_attention"), _forward_attention_triple),
    ("TransformerBlock.forward", "megatron.core.transformer.transformer_block",
     ("TransformerBlock", "forward"), _block_forward_without_context),
    ("Attention.forward", "megatron.core.models.common.embeddings.rope_utils",
     ("apply_rotary_pos_emb",), _rope_renamed),
    ("RotaryEmbedding.forward", "megatron.core.models.common.embeddings.rotary_pos_embedding",
     ("RotaryEmbedding", "forward"), _rotary_forward_renamed),
]


@pytest.mark.parametrize("seam, module, path, replacement", CHANGES,
                         ids=[c[0] for c in CHANGES])
def test_a_probe_fails_once_its_internal_changes(monkeypatch, seam, module, path, replacement):
    import importlib

    owner = importlib.import_module(module)
    for name in path[:-1]:
        owner = getattr(owner, name)
    assert _seam(seam).holds()
    monkeypatch.setattr(owner, path[-1], replacement)
    assert not _seam(seam).holds()
    broken = broken_seams()
    assert len(broken) == 1 and _seam(seam).relies_on in broken[0]


def test_the_check_names_every_broken_seam(monkeypatch):
    monkeypatch.setattr("megatron.core.models.gpt.GPTModel._preprocess", _preprocess_reordered)
    monkeypatch.setattr(megatron_seams, "check_megatron_seams",
                        megatron_seams.check_megatron_seams.__wrapped__)
    with pytest.raises(RuntimeError, match=r"GPTModel\._preprocess: LLaDAModel.forward unpacks"):
        megatron_seams.check_megatron_seams()


def test_a_probe_that_cannot_read_its_source_reports_why(monkeypatch):
    def unreadable():
        raise OSError("could not get source code")

    seam = megatron_seams.Seam("megatron.core.x:Y.z", "an assumption", unreadable)
    assert broken_seams([seam]) == [
        "megatron.core.x:Y.z: an assumption (OSError: could not get source code)"]
