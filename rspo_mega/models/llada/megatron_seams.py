"""The megatron-core internals LLaDA's modules override or call, each with a probe.

``LLaDAModel``, ``LLaDATransformerLayer``, ``BidirectionalSelfAttention``, ``SDPACoreAttention``
and ``SwiGLUMLP`` subclass megatron-core modules and lean on parts of them that are not a stable
API: private methods (``GPTModel._preprocess``, ``TransformerLayer._forward_attention`` and
``_forward_mlp``), the order of a returned tuple, the keywords one module passes another. Each
:class:`Seam` names such a part, what the override assumes about it, and a probe that inspects
the installed megatron-core. ``build_llada_model`` calls :func:`check_megatron_seams` (once per
process), so an upgrade that changes one fails loudly, naming the seam, instead of running the
model wrong; ``tests/models/test_megatron_seams.py`` shows each probe catches a change.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable

from rspo_mega.models.llada.attention import SDPACoreAttention


@dataclass(frozen=True)
class Seam:
    """One megatron-core internal a LLaDA module relies on."""

    relies_on: str  # "module:Class.member" in megatron-core
    assumption: str  # what the override assumes about it
    holds: Callable[[], bool]  # the probe: True while the installed megatron-core matches


def _tree(fn: Any) -> ast.AST:
    """The syntax tree of ``fn``'s source."""
    return ast.parse(textwrap.dedent(inspect.getsource(fn)))


def _params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _has_params(fn: Any, names: Iterable[str]) -> bool:
    return set(names) <= set(_params(fn))


def _calls(fn: Any, callee: str) -> list[ast.Call]:
    """The calls in ``fn`` whose callee reads as ``callee`` (e.g. ``self.core_attention``)."""
    return [n for n in ast.walk(_tree(fn))
            if isinstance(n, ast.Call) and ast.unparse(n.func) == callee]


def _passes(fn: Any, callee: str, keywords: Iterable[str]) -> bool:
    """Whether some call of ``callee`` in ``fn`` passes all ``keywords`` by name."""
    return any(set(keywords) <= {k.arg for k in call.keywords} for call in _calls(fn, callee))


PREPROCESS_OUTPUT = ("decoder_input", "rotary_pos_emb", "rotary_pos_cos", "rotary_pos_sin",
                     "sequence_len_offset")


def _name_tuples(fn: Any) -> list[tuple[str, ...]]:
    """Every tuple literal in ``fn`` made of plain names, as those names."""
    return [tuple(e.id for e in n.elts) for n in ast.walk(_tree(fn))
            if isinstance(n, ast.Tuple) and n.elts and all(isinstance(e, ast.Name) for e in n.elts)]


def _preprocess_output() -> bool:
    """``_preprocess`` returns ``PREPROCESS_OUTPUT`` first and ``rotary_pos_cos_sin`` 7th."""
    from megatron.core.models.gpt import GPTModel

    fn = GPTModel._preprocess
    tuples = _name_tuples(fn)
    six = [t for t in tuples if t[:5] == PREPROCESS_OUTPUT and len(t) == 6]
    return (_has_params(fn, ("input_ids", "position_ids", "decoder_input")) and bool(six)
            and ("rotary_pos_cos_sin",) in tuples)


LAYER_KEYWORDS = ("attention_mask", "context", "rotary_pos_emb", "rotary_pos_cos",
                  "rotary_pos_sin", "rotary_pos_cos_sin", "attention_bias", "inference_context",
                  "packed_seq_params", "sequence_len_offset")


def _layer_forward_attention() -> bool:
    """``_forward_attention`` takes ``LAYER_KEYWORDS`` and returns ``(hidden_states, context)``;
    its residual add is ``self_attn_bda`` under ``bias_dropout_add_exec_handler``."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    fn = TransformerLayer._forward_attention
    returns = [n.value for n in ast.walk(_tree(fn)) if isinstance(n, ast.Return) and n.value]
    pair = any(isinstance(r, ast.Tuple) and [ast.unparse(e) for e in r.elts]
               == ["hidden_states", "context"] for r in returns)
    return (_has_params(fn, LAYER_KEYWORDS) and pair
            and bool(_calls(fn, "self.bias_dropout_add_exec_handler"))
            and bool(_calls(fn, "self.self_attn_bda")))


def _layer_forward() -> bool:
    """``forward`` is ``_forward_attention(*args, **kwargs)`` then ``_forward_mlp(hidden,
    inference_context, padding_mask=...)``."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return (bool(_calls(TransformerLayer.forward, "self._forward_attention"))
            and bool(_calls(TransformerLayer.forward, "self._forward_mlp"))
            and _params(TransformerLayer._forward_mlp)[:4]
            == ["self", "hidden_states", "inference_context", "padding_mask"])


def _block_passes_context() -> bool:
    """The block hands ``inference_context`` to every layer (the path of ``ForwardContext``)."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    return (_has_params(TransformerBlock.forward, ("attention_mask", "inference_context"))
            and _passes(TransformerBlock.forward, "layer", ("inference_context",)))


def _attention_pieces() -> bool:
    """The cached attention repeats megatron's: ``get_query_key_value_tensors(hidden, None)`` ->
    query, key, value; ``apply_rotary_pos_emb(t, freqs, config=, cp_group=)``; the core
    attention called with ``attn_mask_type``/``attention_bias``/``packed_seq_params``;
    ``linear_proj``; megatron's forward takes ``inference_context`` by keyword."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer.attention import Attention, SelfAttention

    return (_params(SelfAttention.get_query_key_value_tensors)[:3]
            == ["self", "hidden_states", "key_value_states"]
            and _params(rope_utils.apply_rotary_pos_emb)[:3] == ["t", "freqs", "config"]
            and _has_params(rope_utils.apply_rotary_pos_emb, ("cp_group",))
            and _has_params(Attention.forward, ("inference_context", "rotary_pos_emb"))
            and bool(_calls(Attention.forward, "apply_rotary_pos_emb"))
            and any(_passes(Attention.forward, core, ("attn_mask_type", "attention_bias",
                                                      "packed_seq_params"))
                    for core in ("self.core_attention", "apply_module(self.core_attention)"))
            and bool(_calls(Attention.forward, "self.linear_proj")))


def _core_attention_arguments() -> bool:
    """``Attention`` builds its core attention with keywords ``SDPACoreAttention`` takes, the
    softmax scale being ``config.softmax_scale``."""
    from megatron.core.transformer.attention import Attention

    built = _calls(Attention.__init__, "submodules.core_attention")
    taken = set(_params(SDPACoreAttention.__init__))
    return bool(built) and all(
        {k.arg for k in call.keywords} <= taken and any(
            k.arg == "softmax_scale" and ast.unparse(k.value) == "self.config.softmax_scale"
            for k in call.keywords) for call in built)


def _rotary_offset() -> bool:
    """``rotary_pos_emb(max_seq_len, offset=...)``: a cached span's true positions."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return _params(RotaryEmbedding.forward)[:3] == ["self", "max_seq_len", "offset"]


def _mlp_fields() -> bool:
    """``SwiGLUMLP`` reads these config fields and ``MLP.forward``'s ``per_token_scale``."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_config import TransformerConfig

    names = {f.name for f in fields(TransformerConfig)}
    return (_params(MLP.forward)[:3] == ["self", "hidden_states", "per_token_scale"]
            and {"gated_linear_unit", "add_bias_linear", "bias_activation_fusion",
                 "use_te_activation_func", "glu_linear_offset",
                 "activation_func_clamp_value"} <= names)


SEAMS: tuple[Seam, ...] = (
    Seam("megatron.core.models.gpt.gpt_model:GPTModel._preprocess",
         "LLaDAModel.forward unpacks its tuple by position", _preprocess_output),
    Seam("megatron.core.transformer.transformer_layer:TransformerLayer._forward_attention",
         "LLaDATransformerLayer overrides it for selected queries", _layer_forward_attention),
    Seam("megatron.core.transformer.transformer_layer:TransformerLayer.forward",
         "LLaDATransformerLayer.forward repeats it with the context kept from the MLP",
         _layer_forward),
    Seam("megatron.core.transformer.transformer_block:TransformerBlock.forward",
         "ForwardContext reaches the layers as inference_context", _block_passes_context),
    Seam("megatron.core.transformer.attention:Attention.forward",
         "BidirectionalSelfAttention's cached path repeats its steps", _attention_pieces),
    Seam("megatron.core.transformer.attention:Attention.__init__",
         "SDPACoreAttention takes DotProductAttention's arguments", _core_attention_arguments),
    Seam("megatron.core.models.common.embeddings.rotary_pos_embedding:RotaryEmbedding.forward",
         "LLaDAModel rotates a cached span at its offset", _rotary_offset),
    Seam("megatron.core.transformer.mlp:MLP.forward",
         "SwiGLUMLP replaces its forward for plain SwiGLU", _mlp_fields),
)


def broken_seams(seams: Iterable[Seam] = SEAMS) -> list[str]:
    """The seams whose probe fails (or cannot read the installed source), as messages."""
    broken = []
    for seam in seams:
        try:
            why = "" if seam.holds() else "changed"
        except (OSError, TypeError, SyntaxError, AttributeError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        if why:
            broken.append(f"{seam.relies_on}: {seam.assumption} ({why})")
    return broken


@functools.cache
def check_megatron_seams() -> None:
    """Raise if the installed megatron-core no longer matches what LLaDA's modules assume."""
    broken = broken_seams()
    if broken:
        raise RuntimeError("the installed megatron-core changed internals LLaDA's modules rely "
                           "on (see rspo_mega/models/llada/megatron_seams.py):\n  "
                           + "\n  ".join(broken))
