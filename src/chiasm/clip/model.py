"""The CLIP model: two towers, a learnt temperature (and SigLIP's bias), save and load.

A saved folder holds ``clip_config.json``, ``model.safetensors``, the tokenizer and the image
preprocessing, plus the configs of any pretrained trunk (``image_encoder/``, ``text_encoder/``):
it loads with the original checkpoints gone, which is what lets a VLM read its image tower by path.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from chiasm.clip.config import ClipModelConfig
from chiasm.clip.losses import clip_loss, siglip_loss
from chiasm.clip.tokenizer import CaptionTokenizer
from chiasm.clip.towers import EncoderImageTower, HFTextTower, TextTransformerTower, ViTImageTower
from chiasm.config import from_dict, to_dict
from chiasm.encoders.preprocessing import ImagePreprocessing
from chiasm.errors import ModelFolderError

CONFIG_FILE = "clip_config.json"
FORMAT = "chiasm-clip"
IMAGE_ENCODER_FOLDER = "image_encoder"
TEXT_ENCODER_FOLDER = "text_encoder"


class ClipModel(nn.Module):
    def __init__(self, cfg: ClipModelConfig, tokenizer: CaptionTokenizer, *, pretrained: bool = True):
        super().__init__()
        self.config = cfg
        self.tokenizer = tokenizer
        if cfg.image.kind == "vit":
            self.visual: ViTImageTower | EncoderImageTower = ViTImageTower(cfg.image, cfg.embed_dim)
        else:
            self.visual = EncoderImageTower(cfg.image, cfg.embed_dim, pretrained=pretrained)
        if cfg.text.kind == "transformer":
            self.text: TextTransformerTower | HFTextTower = TextTransformerTower(
                cfg.text, cfg.embed_dim, tokenizer.vocab_size, tokenizer.eos_id)
        else:
            self.text = HFTextTower(cfg.text, cfg.embed_dim, pretrained=pretrained)
        siglip = cfg.loss == "siglip"
        init_scale = cfg.init_logit_scale if cfg.init_logit_scale is not None else (
            math.log(10.0) if siglip else math.log(1 / 0.07))
        self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias if cfg.init_logit_bias is not None
                                                          else -10.0))) if siglip else None

    # ---- preprocessing ----------------------------------------------------------------
    @property
    def preprocessing(self) -> ImagePreprocessing:
        if isinstance(self.visual, EncoderImageTower):
            return self.visual.encoder.preprocessing
        s = self.config.image.image_size
        return ImagePreprocessing(size=(s, s), mean=tuple(self.config.image.mean), std=tuple(self.config.image.std))

    # ---- embeddings ---------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        """exp(log-scale), clamped at ``max_logit_scale`` (CLIP's 100) so logits cannot blow up."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def embed_image_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual.project(pooled), dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(B, embed_dim)``."""
        return self.embed_image_pooled(self.visual.trunk(pixels))

    def embed_text_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text.project(pooled), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.embed_text_pooled(self.text.trunk(ids, mask))

    @torch.no_grad()
    def encode_captions(self, captions: list[str], batch_size: int = 512) -> torch.Tensor:
        device = self.logit_scale.device
        out = []
        for lo in range(0, len(captions), batch_size):
            enc = self.tokenizer.encode(captions[lo: lo + batch_size])
            out.append(self.encode_text(enc.ids.to(device), enc.mask.to(device)))
        return torch.cat(out)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, *, pixels: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None, text_pooled: torch.Tensor | None = None,
                caption_index: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one batch (what DDP wraps): images as pixels, or as cached pooled vectors of a
        locked trunk; captions as token ids (``caption_index`` maps each image to its row there, so a
        caption repeated in the batch is encoded once) or as cached pooled vectors of a locked text trunk.
        """
        img = self.encode_image(pixels) if pooled is None else self.embed_image_pooled(pooled)
        txt = self.encode_text(ids, mask) if text_pooled is None else self.embed_text_pooled(text_pooled)
        if caption_index is not None:
            txt = txt[caption_index]
        return self.loss(img, txt)

    def loss(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        if self.logit_bias is not None:
            return siglip_loss(img, txt, self.scale(), self.logit_bias)
        return clip_loss(img, txt, self.scale())

    # ---- persistence ---------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for sub in (IMAGE_ENCODER_FOLDER, TEXT_ENCODER_FOLDER, "tokenizer"):
            shutil.rmtree(folder / sub, ignore_errors=True)
        meta = {"format": FORMAT, "model": to_dict(self.config), "preprocessing": self.preprocessing.to_dict()}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        self.tokenizer.save(folder)
        if isinstance(self.visual, EncoderImageTower):
            self.visual.encoder.export(folder / IMAGE_ENCODER_FOLDER)
        if isinstance(self.text, HFTextTower):
            self.text.net.config.save_pretrained(folder / TEXT_ENCODER_FOLDER)
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device | None = None) -> ClipModel:
        cfg, preprocessing = read_config(folder)
        folder = Path(folder)
        if cfg.text.kind == "hf":
            tok = CaptionTokenizer.from_pretrained(str(folder / "tokenizer"), cfg.text.context_length,
                                                   too_long=cfg.text.too_long)
            cfg = replace(cfg, text=replace(cfg.text, source=str(folder / TEXT_ENCODER_FOLDER)))
        else:
            tok = CaptionTokenizer.load_file(folder / "tokenizer.json", cfg.text.context_length,
                                             too_long=cfg.text.too_long)
        if cfg.image.kind == "encoder" and (folder / IMAGE_ENCODER_FOLDER).is_dir():
            enc = replace(cfg.image.encoder, source=str(folder / IMAGE_ENCODER_FOLDER))
            cfg = replace(cfg, image=replace(cfg.image, encoder=enc))
        model = cls(cfg, tok, pretrained=False)
        path = folder / "model.safetensors"
        try:
            model.load_state_dict(load_file(str(path)))
        except FileNotFoundError as exc:
            raise ModelFolderError(f"{path}: file missing; the CLIP folder is incomplete") from exc
        except (SafetensorError, OSError) as exc:
            raise ModelFolderError(f"{path}: not a readable safetensors file ({exc})") from exc
        except RuntimeError as exc:
            raise ModelFolderError(f"{path}: its tensors do not fit {CONFIG_FILE} "
                                   f"({' '.join(str(exc).split())[:300]})") from exc
        if isinstance(model.visual, EncoderImageTower):
            model.visual.encoder.preprocessing = preprocessing
        if device is not None:
            model.to(device)
        return model.eval()


def read_config(folder: str | Path) -> tuple[ClipModelConfig, ImagePreprocessing]:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        inside = folder / "model"
        hint = f"; did you mean {inside}?" if (inside / CONFIG_FILE).is_file() else ""
        raise FileNotFoundError(f"{folder} is not a chiasm CLIP model folder (no {CONFIG_FILE}){hint}")
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        return from_dict(ClipModelConfig, meta["model"]), ImagePreprocessing.from_dict(meta["preprocessing"])
    except (ValueError, KeyError, AttributeError) as exc:
        raise ModelFolderError(f"{path}: not a valid CLIP model config: {exc}") from exc
