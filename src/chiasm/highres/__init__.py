"""Dynamic high resolution: an image as a global view plus tiles of the original (chiasm.highres.tiling)."""
