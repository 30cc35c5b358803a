"""nanoVLM's per-benchmark prompt formatting, as the lmms-eval adapter (`nanovlm.evaluation.lmms`) applies it.

Follows the original nanoVLM table, with its "chartvqa" entry spelled as the task is actually called (`chartqa`),
and without doubling a "Choices:" header the table's replacements can produce in sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptFormat:
    """How one benchmark's prompt is adapted: a prefix, text replacements and a suffix for the user turn, and text
    appended after the assistant header (e.g. "Answer:")."""

    replacements: tuple[tuple[str, str], ...] = ()
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""

    def format_user(self, text: str) -> str:
        """prefix + text with each replacement applied in order, + suffix. A replacement whose result is already in
        the text is skipped, so "\\nOptions:" -> "\\nChoices:" followed by "\\nA. " -> "\\nChoices:\\nA. " does not
        write the header twice."""
        text = self.user_prefix + text
        for old, new in self.replacements:
            if new and new in text:
                continue
            text = text.replace(old, new)
        return text + self.user_suffix


_MULTIPLE_CHOICE = PromptFormat(
    replacements=(
        ("\nOptions:", "\nChoices:"),
        ("\nA. ", "\nChoices:\nA. "),
        ("Please select the correct answer from the options above.", "Answer with the letter."),
        ("Answer with the option's letter from the given choices directly", "Answer with the letter directly"),
    ),
    assistant_prefix="Answer:",
)
_DOCVQA = PromptFormat(
    user_prefix="Give a short and terse answer to the following question. Do not paraphrase or reformat the text you "
    "see in the image. Do not include any full stops. Just give the answer without additional explanation. Question: "
)
_CHARTQA = PromptFormat(
    user_prefix="For the question below, follow the following instructions:\n"
    "-The answer should contain as few words as possible.\n"
    "-Don't paraphrase or reformat the text you see in the image.\n"
    "-Answer a binary question with Yes or No.\n"
    "-When asked to give a numerical value, provide a number like 2 instead of Two.\n"
    "-If the final answer has two or more items, provide it in the list format like [1, 2].\n"
    "-When asked to give a ratio, give out the decimal value like 0.25 instead of 1:4.\n"
    "-When asked to give a percentage, give out the whole value like 17 instead of decimal like 0.17%.\n"
    "-Don't include any units in the answer.\n"
    "-Do not include any full stops at the end of the answer.\n"
    "-Try to include the full label from the graph when asked about an entity.\n"
    "Question: "
)
_TEXTVQA = PromptFormat(
    user_prefix="Answer the following question about the image using as few words as possible. Follow these "
    "additional instructions:\n"
    "-Always answer a binary question with Yes or No.\n"
    "-When asked what time it is, reply with the time seen in the image.\n"
    "-Do not put any full stops at the end of the answer.\n"
    "-Do not put quotation marks around the answer.\n"
    "-An answer with one or two words is favorable.\n"
    "-Do not apply common sense knowledge. The answer can be found in the image.\n"
    "Question: "
)
_MMMU = PromptFormat(
    replacements=(
        ("Question:", ""),
        ("Answer with the option's letter from the given choices directly.", "Answer with the letter directly."),
        ("\nA. ", "\nChoices:\nA. "),
    ),
    assistant_prefix="Answer:",
)
_BRIEF = PromptFormat(user_suffix="\nGive a very brief answer.")

PROMPT_FORMATS: dict[str, PromptFormat] = {
    **dict.fromkeys(("ai2d", "mmstar", "seedbench", "scienceqa", "scienceqa_img"), _MULTIPLE_CHOICE),
    **dict.fromkeys(("docvqa_val", "docvqa_test"), _DOCVQA),
    "chartqa": _CHARTQA,
    **dict.fromkeys(("textvqa_val", "textvqa_test"), _TEXTVQA),
    **dict.fromkeys(("mmmu_val", "mmmu_test"), _MMMU),
    **dict.fromkeys(("infovqa_val", "infovqa_test", "mme", "ocrbench"), _BRIEF),
}
NO_FORMAT = PromptFormat()


def prompt_format_for(task: str | None) -> PromptFormat:
    """The task's `PromptFormat`; tasks not in `PROMPT_FORMATS` are left unchanged."""
    return PROMPT_FORMATS.get(task or "", NO_FORMAT)


def cut_at_stop_strings(text: str, until: str | Sequence[str] | None) -> str:
    """`text` up to (not including) the earliest occurrence of any non-empty stop string."""
    if until is None:
        return text
    stops = [until] if isinstance(until, str) else list(until)
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


__all__ = ["NO_FORMAT", "PROMPT_FORMATS", "PromptFormat", "cut_at_stop_strings", "prompt_format_for"]
