"""Screenshot of the web page answering about an image, from a saved model (the README's docs/web.png).

    python scripts/web_screenshot.py runs/demo/model runs/demo/world/images/eval/00000.png \
        --question "What colour is the circle?" --out docs/web.png

It serves MODEL on a free loopback port exactly as ``chiasm serve`` does, opens the page in
Debian's chromium (``chiasm.browser``), uploads IMAGE, asks each question in turn, waits for the
"how the model sees" panel, points at a cell so its visual token's words show, and saves a
full-page PNG.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from chiasm.browser import WebPage, browser_page
from chiasm.serve.app import create_app
from chiasm.serve.background import BackgroundServer
from chiasm.serve.settings import ServeSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a saved model folder")
    parser.add_argument("image", type=Path)
    parser.add_argument("--question", action="append", required=True, help="repeat for several turns")
    parser.add_argument("--out", type=Path, default=Path("docs/web.png"))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--point", type=float, nargs=2, default=(0.3, 0.3), metavar=("FX", "FY"),
                        help="where to point on the image, as fractions of its width and height")
    args = parser.parse_args()
    if not args.image.is_file():
        parser.error(f"{args.image}: no such image file")
    with BackgroundServer(create_app(args.model, ServeSettings(model_name=args.model.name))) as server, \
            tempfile.TemporaryDirectory() as tmp, browser_page(Path(tmp) / "profile") as page:
        web = WebPage(page, server.url + "/")
        web.open()
        web.upload(args.image)
        for question in args.question:
            answer, _ = web.ask(question, max_tokens=args.max_tokens)
            print(f"{question} -> {answer!r}")
        web.explained()
        web.hover_image(*args.point)
        print(f"wrote {web.screenshot(args.out)}")


if __name__ == "__main__":
    main()
