"""Language models: any transformers causal LM, plus the packaged offline SmolLM2."""

from chiasm.lm.loader import PACKAGED_LMS, load_language_model, resolve_lm_path

__all__ = ["PACKAGED_LMS", "load_language_model", "resolve_lm_path"]
