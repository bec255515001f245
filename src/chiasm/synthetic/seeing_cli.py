"""``chiasm world``: write one of the worlds for high resolution, several images, video and grounding."""

from __future__ import annotations

import argparse
from pathlib import Path

KINDS = ("gui", "small_objects", "which_image", "what_changed")


def add_world_parser(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("world", help="write a synthetic world (GUI screens, small objects, which image, "
                                     "what changed) with a held-out split, in the LLaVA format")
    w.add_argument("kind", choices=KINDS)
    w.add_argument("--out", required=True, help="folder for train.json, eval.json and images/")
    w.add_argument("--n-train", type=int, default=400)
    w.add_argument("--n-eval", type=int, default=100)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--image-size", type=int, help="side in pixels (default: 672 small_objects, 128 others)")
    w.add_argument("--box-style", choices=["int1000", "fraction"], default="int1000",
                   help="how boxes are written as text (gui)")
    w.set_defaults(func=_cmd_world)


def _cmd_world(args: argparse.Namespace) -> int:
    if args.n_train < 0 or args.n_eval < 0:
        raise ValueError("--n-train and --n-eval must be 0 or more")
    if args.kind == "gui":
        from chiasm.synthetic.gui import make_gui_world

        files = make_gui_world(Path(args.out), n_train=args.n_train, n_eval=args.n_eval, seed=args.seed,
                               box_style=args.box_style)
    else:
        from chiasm.synthetic.seeing import make_seeing_world

        files = make_seeing_world(args.kind, Path(args.out), n_train=args.n_train, n_eval=args.n_eval,
                                  seed=args.seed, image_size=args.image_size)
    for split, path in files.items():
        print(f"{split}: {path}")
    return 0
