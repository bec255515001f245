"""CLIP: contrastive image-text pretraining, zero-shot evaluation, and towers for chiasm's VLMs.

An image tower and a text tower each end in a projection into one shared embedding space;
matching pairs are pulled together by a symmetric InfoNCE (CLIP) or pairwise sigmoid
(SigLIP) loss. Zero-shot classification embeds class names through prompt templates. A
trained image tower is an encoder of the VLM seam (``chiasm-clip``), which is how a VLM's
eyes are usually made.
"""
