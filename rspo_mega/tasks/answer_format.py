"""The reasoning/answer response format verifiers read, and bounded extraction helpers.

Completions are expected as `<reasoning>...</reasoning>\n<answer>...</answer>` (d1 style).
Verifiers read the answer block; when it is missing they fall back to task-specific cues
(the last `\\boxed{}` or the last number). All helpers run in time linear in the input and
operate on text clipped to `MAX_COMPLETION_CHARS` first.
"""

from __future__ import annotations

__all__ = [
    "MAX_COMPLETION_CHARS",
    "STOP_MARKERS",
    "RESPONSE_FORMAT",
    "clip_completion",
    "extract_answer_block",
    "format_response",
]

# Generation lengths of 256-2048 tokens decode to well under this; anything longer is clipped
# to its tail (where the answer lives) before any parsing happens.
MAX_COMPLETION_CHARS = 16_384

# Text after any of these is not part of the response (decoded special tokens).
STOP_MARKERS: tuple[str, ...] = ("<|eot_id|>", "<|endoftext|>")

RESPONSE_FORMAT = (
    "Respond in the following format:\n"
    "<reasoning>\n...\n</reasoning>\n"
    "<answer>\n...\n</answer>"
)

_OPEN, _CLOSE = "<answer>", "</answer>"


def clip_completion(text: str) -> str:
    """Cut at the first stop marker, then keep at most the last MAX_COMPLETION_CHARS chars."""
    if not isinstance(text, str):
        return ""
    head = text[: 4 * MAX_COMPLETION_CHARS]  # bound the marker scan on huge inputs
    cuts = [cut for cut in (head.find(marker) for marker in STOP_MARKERS) if cut >= 0]
    if cuts:
        text = head[: min(cuts)]
    return text[-MAX_COMPLETION_CHARS:]


def extract_answer_block(text: str) -> str | None:
    """Content of the last `<answer>...</answer>`, or of a trailing unclosed `<answer>`.

    Returns None when the text has no `<answer>` tag. Expects already clipped text.
    """
    start = text.rfind(_OPEN)
    if start < 0:
        return None
    body = text[start + len(_OPEN) :]
    end = body.find(_CLOSE)
    return (body if end < 0 else body[:end]).strip()


def format_response(reasoning: str, answer: str) -> str:
    """Render a response in the expected format (tokenizer corpora, SFT targets, tests)."""
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>"
