"""The image placeholder and the one function that counts its expansion.

The data pipeline (when it expands placeholders), the model (when it splices visual
tokens) and generation (when it builds prompts) all ask :func:`image_token_count`, so the
number of placeholder positions and the number of visual tokens can never drift apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from chiasm.bridges.base import Bridge
    from chiasm.encoders.base import VisionEncoder
    from chiasm.highres.tiling import TilingConfig

IMAGE_TOKEN = "<image>"
AUDIO_TOKEN = "<audio>"  # a clip's placeholder and the token its positions hold (chiasm.hearing)


def image_token_count(encoder: VisionEncoder, bridge: Bridge, image_size: tuple[int, int] | None = None,
                      tiling: TilingConfig | None = None) -> int:
    """Sequence positions one image occupies: the bridge's token count for the encoder's grid,
    times the image's views when it is tiled (see :func:`tokens_for_image`)."""
    return tokens_for_image(bridge.num_tokens(encoder.grid()), image_size, tiling, encoder.image_size)


def tokens_for_image(tokens_per_view: int, image_size: tuple[int, int] | None, tiling: TilingConfig | None,
                     tile: int) -> int:
    """The count itself: ``tokens_per_view`` per encoder input, and a tiled image of ``image_size``
    (width, height) is its global view plus the tiles of the grid chosen for that size alone."""
    if tiling is None or image_size is None:
        return tokens_per_view
    from chiasm.highres.tiling import n_views

    return tokens_per_view * n_views(image_size, tiling, tile)


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Register ``<image>`` as a special token (idempotent) and return its id.

    The id may lie past the LM's embedding table: the model never embeds it, it replaces
    those positions with visual tokens, so the LM's vocabulary stays untouched.
    """
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]},
                                     replace_extra_special_tokens=False)
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def add_audio_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Register ``<audio>`` as a special token (idempotent) and return its id; like ``<image>``, its
    positions are filled with the audio bridge's tokens and never embedded."""
    if AUDIO_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_TOKEN]},
                                     replace_extra_special_tokens=False)
    return int(tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))
