"""Write a tiny, randomly initialised LLaVA-1.5-style checkpoint and a small synthetic data set, offline.

The checkpoint is what transformers writes for ``LlavaForConditionalGeneration`` (config,
safetensors, processor with its chat template), so ``chiasm import --format llava`` reads it
as it reads a real one. The data set (LLaVA JSON files and images of coloured shapes) is there
to chat with, evaluate and fine-tune the imported model. Random weights answer nonsense: this
shows the path, not a capability.

    python scripts/make_tiny_llava.py OUT [--tower siglip]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chiasm.synthetic.world import make_world
from chiasm.testing import make_tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write: OUT/llava (the checkpoint) and OUT/world (the data)")
    parser.add_argument("--tower", choices=["clip", "siglip"], default="clip")
    args = parser.parse_args()
    out = Path(args.out)
    if (out / "llava").exists():
        raise SystemExit(f"{out / 'llava'} exists already; choose another folder")
    llava = make_tiny_llava(out / "llava", tower=args.tower)
    world = make_world(out / "world", n_train=16, n_eval=4, image_size=64)
    print(f"LLaVA checkpoint: {llava}\ndata: {world.instruct} (training), {world.eval} (evaluation), "
          f"images in {world.image_dir}")


if __name__ == "__main__":
    main()
