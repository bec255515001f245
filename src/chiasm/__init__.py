"""chiasm: build vision-language models from a pretrained encoder, a bridge and a causal LM."""

__version__ = "0.1.0"
