"""Typed configuration: the model, the training recipe (a list of stages) and evaluation.

Configs are plain dataclasses read from TOML or JSON. Unknown keys are errors (a typo never
silently falls back to a default), and every run folder keeps one fully resolved copy
(``config.json``) so that a run can be understood and repeated from its folder alone.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PolicyMode = Literal["frozen", "full", "lora", "last_n"]


@dataclass
class EncoderConfig:
    """Which vision encoder turns pixels into a grid of feature vectors."""

    name: str = "efficientnet-lite0"
    source: str | None = None  # hub id or folder, for encoders that load a checkpoint
    feature_layer: int = -1  # hidden-state index for transformer towers (-2: LLaVA's choice)
    image_size: int | None = None  # None: the encoder's own (a tower's config; 224 for the others)
    options: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False  # run code shipped with a hub tower: only when asked


@dataclass
class BridgeConfig:
    """Which bridge maps encoder features to something the LM reads."""

    name: str = "mlp"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LMConfig:
    """The causal language model: hub id, folder, or ``packaged:NAME``."""

    source: str = "packaged:smollm2-135m-instruct"
    trust_remote_code: bool = False  # run code shipped with a hub model: only when asked


@dataclass
class TilingConfig:
    """How an image is split into a global view and tiles (chiasm.highres.tiling); None in a model config:
    no tiling."""

    mode: Literal["aspect", "anyres"] = "aspect"
    max_tiles: int = 6
    min_tiles: int = 1
    # anyres: the allowed grids as [rows, cols] (LLaVA-NeXT's pinpoints divided by the tile size);
    # empty: every grid up to max_tiles.
    pinpoints: list[list[int]] = field(default_factory=list)
    global_view: bool = True
    separators: Literal["markers", "row_end", "none"] = "markers"
    # An image with a side below this many pixels is refused: no tile would hold a readable detail.
    min_side: int = 8
    # An image above this many pixels is refused before decoding (a decompression bomb, a mistake).
    max_image_pixels: int = 64_000_000
    # An image whose aspect ratio differs from the best grid's by more than this factor is refused:
    # its tiles would be squashed beyond recognition.
    max_distortion: float = 4.0

    def __post_init__(self) -> None:
        if self.mode not in ("aspect", "anyres"):
            raise ValueError(f"tiling.mode must be 'aspect' or 'anyres', not {self.mode!r}")
        if self.separators not in ("markers", "row_end", "none"):
            raise ValueError(f"tiling.separators must be 'markers', 'row_end' or 'none', not {self.separators!r}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"tiling needs 1 <= min_tiles <= max_tiles, got {self.min_tiles}, {self.max_tiles}")
        for p in self.pinpoints:
            if len(p) != 2 or min(p) < 1:
                raise ValueError(f"tiling.pinpoints entries are [rows, cols] of positive ints, got {p!r}")
        if self.mode == "anyres" and not self.grids():
            raise ValueError(f"tiling: no pinpoint grid has at most max_tiles = {self.max_tiles} tiles")

    def grids(self) -> list[tuple[int, int]]:
        """The candidate grids as (rows, cols), in InternVL's order (by tile count, then as listed)."""
        if self.mode == "anyres" and self.pinpoints:
            cand = [(int(r), int(c)) for r, c in self.pinpoints]
        else:
            cand = [(r, c) for n in range(self.min_tiles, self.max_tiles + 1)
                    for r in range(1, n + 1) for c in range(1, n + 1) if r * c == n]
            cand = sorted(set(cand), key=lambda g: g[0] * g[1])
        return [g for g in cand if self.min_tiles <= g[0] * g[1] <= self.max_tiles]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TilingConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"tiling: unknown key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)


@dataclass
class AudioConfig:
    """A speech encoder and its own bridge: each ``<audio>`` clip becomes a fixed number of LM tokens."""

    # A Whisper: "packaged:base" / "packaged:tiny.en", a CTranslate2 or transformers folder, a hub id.
    source: str = "packaged:base"
    # The encoder's window: a multiple of 0.02 s up to 30. Longer clips are refused, never cut.
    seconds: float = 30.0
    # Any token-reducing bridge over the encoder's one-row grid of 20 ms frames.
    bridge: BridgeConfig = field(default_factory=lambda: BridgeConfig("pooling", {"kernel": [1, 10]}))


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    # A short system prompt keeps sequences short; None uses the chat template's default.
    system_prompt: str | None = None
    max_length: int | None = None  # None: the LM's own context length
    # Where each visual token sits, told to the LM: a name in chiasm.layout.LAYOUTS, "raster" (bridge
    # order, no text) or the synthetic world's "quadrants" (tokens grouped by quadrant, named in words).
    image_layout: str = "raster"
    # Weights dtype of the LM (and of in-LM bridges, which run inside its layers); a saved model
    # records the dtype it was saved in and loads back in it.
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # The LM's attention kernel ("sdpa", "eager", "flash_attention_2"...); None: transformers' default.
    attn_implementation: str | None = None
    # Activation checkpointing of the LM and of a transformers vision tower: each layer's
    # activations are recomputed in the backward pass instead of kept, which trades about one
    # more forward pass for memory (longer sequences, bigger batches); gradients are unchanged.
    gradient_checkpointing: bool = False
    # Dynamic high resolution (chiasm.highres.tiling): each image becomes a global view plus tiles
    # of a grid chosen for its shape; None: one view at the encoder's size.
    tiling: TilingConfig | None = None
    # Hearing (chiasm.hearing): a Whisper encoder + bridge for <audio> placeholders; None: images only.
    audio: AudioConfig | None = None

    def __post_init__(self) -> None:
        from chiasm.layout import LAYOUTS

        _check_name("image_layout", self.image_layout, LAYOUTS.kind, LAYOUTS.names())


@dataclass
class PolicyConfig:
    """How one component is treated in one stage."""

    mode: PolicyMode = "frozen"
    lr: float | None = None  # None: the stage's lr
    last_n: int = 2
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # None: every linear layer but the output head (peft's "all-linear"), whatever the family
    # names them; a list: these module names (each must match a module).
    lora_targets: list[str] | None = None
    # None: adapters in every block; N: only in the last N decoder layers (encoder blocks), so
    # with the inputs frozen the backward pass stops below them (a cheaper step on a CPU).
    lora_layers: int | None = None


@dataclass
class StageConfig:
    """One stage of a recipe: its data and a policy per component."""

    name: str
    data: str
    image_root: str | None = None
    encoder: PolicyConfig = field(default_factory=PolicyConfig)
    bridge: PolicyConfig = field(default_factory=lambda: PolicyConfig(mode="full"))
    lm: PolicyConfig = field(default_factory=PolicyConfig)
    # The audio bridge of a model that hears ("full" or "frozen"; its Whisper encoder stays frozen).
    audio_bridge: PolicyConfig = field(default_factory=lambda: PolicyConfig(mode="full"))
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    on_error: Literal["raise", "skip"] = "raise"
    # Under on_error = "skip": the largest share of the data file's records that may be skipped
    # (bad records, broken images) before the stage stops; skips go to stages/NAME/skipped.jsonl.
    max_skip_fraction: float = 0.01
    # Image paths that resolve outside image_root (absolute, ../, symlinks) are refused unless true.
    allow_outside_image_root: bool = False
    # Images with more pixels (width x height) are refused unread; None: Pillow's MAX_IMAGE_PIXELS
    # (which also caps this value: raise PIL.Image.MAX_IMAGE_PIXELS to allow larger images).
    max_image_pixels: int | None = None
    checkpoint_every: int = 0  # optimizer steps; 0: only at the end of the stage
    # A name in chiasm.train.objectives. "lm": next-token loss on assistant turns through the LM.
    # "contrastive": pre-alignment of a prefix bridge to the LM's word embeddings, no LM forward
    # (chiasm.train.contrastive). "words": each named group of visual tokens regresses onto the
    # words of the phrase grounded there (chiasm.synthetic.word_targets; image_layout
    # "quadrants" and "regions"; with no named groups the whole image says its one region's
    # phrase or its caption). "ctc": the audio bridge alone, its tokens scored against the
    # LM's word embeddings by CTC on speech -> transcript samples (chiasm.hearing.ctc).
    objective: str = "lm"
    temperature: float = 0.05  # of the contrastive and ctc objectives' cosine logits
    # Contrastive: also match every run of this many consecutive caption tokens (their mean
    # embedding), so one visual token must carry an object's attributes together. 0: words only.
    phrase_span: int = 0
    # Contrastive: weight of a phrase-region term (samples need "regions": phrases with boxes;
    # see chiasm.data.regions), which makes each phrase match a token inside its own box.
    region_weight: float = 0.0
    # Words: what a group of tokens with no region in it says.
    empty_phrase: str = "nothing"
    # LM stages: rows of the LM's own text (sampled once at the stage start) trained on per step
    # beside the data, to keep its language (chiasm.train.replay). 0: none.
    text_replay: int = 0
    replay_tokens: int = 64
    replay_pool: int = 256  # distinct rows drawn; steps cycle through them
    # LM stages' data path (chiasm.train.loader): DataLoader worker processes (0: in this process).
    num_workers: int = 0
    # A frozen encoder's features computed once and read from a memory-mapped cache; false: the
    # encoder runs on the pixels every step (pre-alignment objectives need the cache).
    feature_cache: bool = True
    # Length-grouped batching: 0 off; k: sort samples by length within mega-batches of k optimizer steps.
    group_by_length: int = 0
    # Sequence packing: 0 off; N: a micro-batch's samples packed into rows of at most N tokens.
    pack_length: int = 0
    # Image tokens one sample may hold (tiles and frames counted from image sizes before any
    # pixel is decoded); None: no cap. Over it a sample is refused (an error naming it, or a
    # counted skip under on_error = "skip"), or with budget_drop = "frames" a video sample loses
    # evenly spaced frames (first and last kept), each logged and counted in the stage's record.
    image_token_budget: int | None = None
    budget_drop: Literal["none", "frames"] = "none"

    def __post_init__(self) -> None:
        from chiasm.train.objectives import objective_names

        _check_name(f"stage {self.name!r}: objective", self.objective, "objective", objective_names())
        if self.budget_drop not in ("none", "frames"):
            raise ValueError(f"stage {self.name!r}: budget_drop must be 'none' or 'frames', not {self.budget_drop!r}")


@dataclass
class EvalConfig:
    data: str | None = None
    image_root: str | None = None
    allow_outside_image_root: bool = False  # as StageConfig's
    max_samples: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 8
    retention_tokens: int = 4096
    retention_prompts: int = 12
    # How an answer is scored: a name in chiasm.eval.scorers.SCORERS ("exact" after the VQAv2
    # normalisation; "vqa_soft" over meta "answers"; the synthetic world's "synthetic").
    scorer: str = "exact"

    def __post_init__(self) -> None:
        from chiasm.eval.scorers import SCORERS

        _check_name("scorer", self.scorer, SCORERS.kind, SCORERS.names())


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/default"
    # Where a frozen encoder's cached features go (default OUTPUT_DIR/cache). Files are keyed by
    # encoder and image list, so runs that share an encoder can share the folder safely.
    feature_cache: str | None = None
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Under torchrun: "ddp" replicates the model on every rank, "fsdp" shards each LM decoder
    # layer, a trainable encoder's layers and the model (FSDP2) so that weights, gradients and
    # optimizer state are split across ranks (chiasm.train.fsdp). One process ignores both.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # "auto": NCCL for CUDA tensors with gloo beside it for CPU ones, gloo without CUDA.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Parameters that may get no gradient in a step (a tower read below its last layer, the
    # encoder and bridge in a batch without images). None: found per stage (chiasm.train.parallel).
    find_unused_parameters: bool | None = None
    # A saved chiasm model folder the run starts from (its weights and model config), in place of
    # building [model] from its sources: e.g. a model made by `chiasm import`. Leave [model] out
    # (or give the folder's own, as the run folder's config.json does).
    init_from: str | None = None


class ConfigError(ValueError):
    """A config value that does not fit its field."""


def _check_name(where: str, name: str, kind: str, known: list[str]) -> None:
    """Refuse a name that no registry knows, listing the ones it does (matched exactly)."""
    if name not in known:
        raise ConfigError(f"{where}: unknown {kind} {name!r}; known: {', '.join(known)}")


def _build(cls: type, data: Any, where: str) -> Any:
    """Recursively build dataclass ``cls`` from plain data, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for arg in args:  # the first member the value fits, e.g. `int | list[int]`
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {args}")
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):  # bool is an int subclass: `true` is no number
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is float and isinstance(value, int):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


coerce = _coerce


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass from a dict (e.g. parsed TOML/JSON)."""
    return _build(cls, data, cls.__name__)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path) -> RunConfig:
    """Read a run config from ``.toml`` or ``.json``; relative data paths stay relative to CWD.

    Its values are checked too (:mod:`chiasm.config_checks`): one ConfigError lists every problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}" if not path.is_dir() else f"{path} is a folder, "
                                "not a config file")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError both are ValueErrors
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from None
    if not data:
        raise ConfigError(f"{path}: the config file is empty; a run needs [model] and at least one [[stages]]")
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    from chiasm.config_checks import check_run_config  # it imports this module

    check_run_config(cfg, str(path))
    return cfg


def read_config_file(path: str | Path, cls: type) -> Any:
    """A TOML (by its ``.toml`` suffix) or JSON file parsed into the dataclass ``cls``; errors name the file.

    The companions' run configs (CLIP, diffusion, speech) are read with it; each checks its values next.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError both are ValueErrors
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from None
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
