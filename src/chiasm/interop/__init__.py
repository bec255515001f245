"""Checkpoints of other formats in and out of chiasm: transformers' LLaVA (``model_type`` llava).

:func:`chiasm.interop.llava.import_llava` turns a ``LlavaForConditionalGeneration`` folder into
a :class:`~chiasm.model.VisionLanguageModel`; :func:`chiasm.interop.export_hf.export_llava`
writes a chiasm model whose parts LLaVA can express as such a folder. What the other side
cannot represent is refused with :class:`NotRepresentable`, naming each setting: a checkpoint
converted with a setting dropped would load and then compute something else.
"""

from __future__ import annotations


class NotRepresentable(ValueError):
    """A setting the target format has no way to express; the message names every such setting."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{what}: {'; '.join(problems)}")
