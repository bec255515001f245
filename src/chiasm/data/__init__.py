"""Data sources (LLaVA JSON/JSONL; the synthetic world in chiasm.synthetic) that all yield :class:`Sample`."""

from chiasm.data.sample import DataError, Sample, Turn

__all__ = ["DataError", "Sample", "Turn"]
