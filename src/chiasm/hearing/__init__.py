"""Audio as one more modality of the encoder seam: a speech encoder and its own bridge.

A Whisper encoder (frozen) turns a clip into 20 ms frames on a one-row grid; any of chiasm's
token-reducing bridges (pooling with a ``[1, k]`` kernel, the resamplers, the Q-Former) turns
those frames into a fixed number of LM-width tokens, which the model splices in at each
``<audio>`` placeholder exactly as it splices visual tokens at ``<image>``. This is the
SALMONN / Qwen-Audio pattern: the LM hears through the same kind of seam it sees through.
"""
