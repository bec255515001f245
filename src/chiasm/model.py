"""The vision-language model: encoder -> bridge -> visual tokens spliced into the LM's input.

Read top to bottom this file is the data path: ``encode_images`` (pixels -> features),
``visual_tokens`` (features -> LM-width tokens), ``embed`` (token ids + visual tokens ->
one embedded sequence), ``lm_inputs`` (that sequence and what in-LM bridges read inside the
LM's layers), ``forward`` (loss on assistant tokens) and ``generate``.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from chiasm.bridges.base import Bridge, build_bridge
from chiasm.checkpointing import enable_checkpointing
from chiasm.config import AudioConfig, ModelConfig, from_dict, to_dict
from chiasm.encoders.base import VisionEncoder, build_encoder
from chiasm.errors import ModelFolderError
from chiasm.layout import token_order
from chiasm.lm.layers import unwrap_peft
from chiasm.lm.loader import check_attn_implementation, dtype_name, load_language_model, torch_dtype
from chiasm.model_folder_checks import check_saved_config
from chiasm.processor import PROCESSOR_FILE, Processor, load_tokenizer
from chiasm.tokens import add_audio_token, add_image_token, image_token_count

if TYPE_CHECKING:
    from chiasm.hearing.encoder import AudioEncoder

CONFIG_FILE = "chiasm_config.json"
ENCODER_FOLDER = "encoder"  # what rebuilding the encoder needs beyond its weights (a tower's configs)
AUDIO_BRIDGE_FILE = "audio_bridge.safetensors"


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None


class VisionLanguageModel(nn.Module):
    """Encoder + bridge + causal LM, with the tokenizer that knows the image token.

    A model that hears (``config.audio``) also holds a frozen audio encoder and its own bridge,
    whose tokens fill the ``<audio>`` positions (see :mod:`chiasm.hearing`).
    """

    def __init__(self, config: ModelConfig, encoder: VisionEncoder, bridge: Bridge,
                 lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                 audio_encoder: AudioEncoder | None = None, audio_bridge: Bridge | None = None):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.bridge = bridge
        self.lm = lm
        self.tokenizer = tokenizer
        self.image_token_id = add_image_token(tokenizer)
        if (audio_encoder is None) != (audio_bridge is None) or (audio_encoder is None) != (config.audio is None):
            raise ValueError("a model that hears needs config.audio, an audio encoder and an audio bridge together")
        if audio_bridge is not None and audio_bridge.in_lm:
            raise ValueError(f"the audio bridge must emit tokens into the sequence; {type(audio_bridge).__name__} "
                             "works inside the LM's layers")
        self.audio_encoder = audio_encoder
        # An empty module when the model does not hear, so every stage's policy loop sees the component.
        self.audio_bridge = audio_bridge if audio_bridge is not None else nn.ModuleList()
        self.audio_token_id = add_audio_token(tokenizer) if audio_encoder is not None else None
        # Checked here so that a layout the bridge cannot follow fails before any training.
        self.token_order = token_order(config.image_layout, bridge.token_grid(encoder.grid()),
                                       image_token_count(encoder, bridge))
        bridge.attach(self.base_lm)
        if config.gradient_checkpointing:
            enable_checkpointing(self.base_lm, encoder)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def build(cls, config: ModelConfig) -> VisionLanguageModel:
        """Assemble from the config: pretrained encoder and LM, a freshly initialised bridge."""
        encoder = build_encoder(config.encoder)
        lm, tokenizer = load_language_model(config.lm.source, dtype=config.dtype,
                                            attn_implementation=config.attn_implementation,
                                            trust_remote_code=config.lm.trust_remote_code)
        bridge = build_bridge(config.bridge, encoder.dim, lm.config.hidden_size)
        hearing = hearing_parts(config.audio, lm.config.hidden_size)
        return _in_lm_dtype(cls(config, encoder, bridge, lm, tokenizer, **hearing))

    @property
    def processor(self) -> Processor:
        """Sample -> inputs for this model (tokenizer, image preprocessing, tokens per image, layout)."""
        key = (self.encoder.preprocessing, self.tokens_per_image, self.max_length, self.config.system_prompt,
               self.config.image_layout, self.tokens_per_audio)
        cached = getattr(self, "_processor", None)
        if cached is None or cached[0] != key:  # rebuilt only when one of its parts changed
            cached = (key, Processor.from_model(self))
            self._processor = cached
        return cached[1]

    @property
    def base_lm(self) -> PreTrainedModel:
        """The transformers model underneath any LoRA wrapper."""
        return unwrap_peft(self.lm)

    @property
    def tokens_per_image(self) -> int:
        return image_token_count(self.encoder, self.bridge)

    @property
    def tokens_per_audio(self) -> int:
        """Sequence positions one audio clip occupies (0 for a model that does not hear)."""
        if self.audio_encoder is None:
            return 0
        return self.audio_bridge.num_tokens(self.audio_encoder.grid())

    @property
    def placeholder_ids(self) -> list[int]:
        """Token ids whose positions hold image or audio tokens: never embedded, never generated."""
        return [i for i in (self.image_token_id, self.audio_token_id) if i is not None]

    @property
    def max_length(self) -> int:
        if self.config.max_length is not None:
            return self.config.max_length
        return int(getattr(self.base_lm.config, "max_position_embeddings", 2048))

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    # ---- the data path -------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(n_images, 3, H, W)`` -> encoder features ``(n_images, N, Dv)``."""
        return self.encoder(pixels)

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features -> ``(n_images, tokens_per_image, D)`` in the LM's dtype."""
        tokens = self.bridge(features.to(self.bridge_dtype), self.encoder.grid())
        return tokens.to(self.lm.get_input_embeddings().weight.dtype)

    @property
    def bridge_dtype(self) -> torch.dtype:
        return next(self.bridge.parameters()).dtype

    def audio_tokens(self, audio: torch.Tensor) -> torch.Tensor:
        """Log-mel windows ``(n_clips, n_mels, frames)`` -> ``(n_clips, tokens_per_audio, D)`` in the LM's dtype."""
        if self.audio_encoder is None:
            raise ValueError("audio was given to a model that does not hear (its config has no [model.audio])")
        frames = self.audio_encoder(audio)
        dtype = next(self.audio_bridge.parameters()).dtype
        tokens = self.audio_bridge(frames.to(dtype), self.audio_encoder.grid())
        return tokens.to(self.lm.get_input_embeddings().weight.dtype)

    def _splice_audio(self, input_ids: torch.Tensor, embeds: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        """Put each clip's tokens at its ``<audio>`` positions (clips in row-major placeholder order)."""
        if self.audio_token_id is None:
            if audio is not None and audio.shape[0]:
                raise ValueError("audio was given to a model that does not hear (its config has no [model.audio])")
            return embeds
        is_audio = input_ids == self.audio_token_id
        n_positions = int(is_audio.sum())
        if audio is None or audio.shape[0] == 0:
            if n_positions:
                raise ValueError(f"{n_positions} audio-token positions but no audio was given")
            return embeds
        return _fill(embeds, is_audio, self.audio_tokens(audio), "clip(s)", "audio tokens", "audio positions")

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor | None,
              audio: torch.Tensor | None = None) -> torch.Tensor:
        """Embed ``input_ids`` and put visual tokens where the image placeholders stand (and audio
        tokens at audio placeholders).

        Images are consumed in row-major order of their placeholders across the batch,
        which is the order the collator lists them in. In-LM bridges also need the keyword
        arguments that ``lm_inputs`` returns beside this sequence.
        """
        is_image = input_ids == self.image_token_id
        placeholders = is_image if self.audio_token_id is None else is_image | (input_ids == self.audio_token_id)
        safe_ids = input_ids.masked_fill(placeholders, 0)
        embeds = self._splice_audio(input_ids, self.lm.get_input_embeddings()(safe_ids), audio)
        n_positions = int(is_image.sum())
        if features is None or features.shape[0] == 0:
            if n_positions:
                raise ValueError(f"{n_positions} image-token positions but no images were given")
            return embeds
        vis = self.visual_tokens(features)
        if self.token_order is not None:  # e.g. grouped by quadrant (chiasm.layout)
            vis = vis[:, self.token_order]
        return _fill(embeds, is_image, vis, "image(s)", "visual tokens", "image-token positions")

    def lm_inputs(self, input_ids: torch.Tensor, features: torch.Tensor | None,
                  audio: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The embedded sequence and the keyword arguments that in-LM bridges read in the LM's layers."""
        embeds = self.embed(input_ids, features, audio)
        if features is None or features.shape[0] == 0:
            return embeds, {}
        return embeds, self.bridge.layer_inputs(features.to(self.bridge_dtype), self.encoder.grid(),
                                                input_ids == self.image_token_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, *, pixels: torch.Tensor | None = None,
                features: torch.Tensor | None = None, return_logits: bool = False,
                position_ids: torch.Tensor | None = None, audio: torch.Tensor | None = None) -> VLMOutput:
        """Loss (mean over supervised tokens) and/or logits; give either pixels or cached features.

        With labels, the LM head runs only where a label is supervised: with a 49k-word
        vocabulary the head over every position costs as much as several decoder layers,
        and the loss needs only the answer tokens. ``return_logits`` adds full logits.
        ``position_ids`` marks packed rows (restarting at 0 per sample, see
        chiasm.train.packing): the LM then gets no 2D mask, because transformers derives the
        block-causal mask from ``position_ids`` only when the 2D mask is absent. ``audio``: the
        batch's log-mel windows, for a model that hears.
        """
        if features is None and pixels is not None:
            features = self.encode_images(pixels)
        embeds, layer_inputs = self.lm_inputs(input_ids, features, audio)
        mask = {"attention_mask": attention_mask} if position_ids is None else {"position_ids": position_ids}
        return self._forward(embeds, labels, return_logits, {**mask, **layer_inputs})

    def _forward(self, embeds: torch.Tensor, labels: torch.Tensor | None, return_logits: bool,
                 lm_kwargs: dict[str, torch.Tensor]) -> VLMOutput:
        """``lm_kwargs``: the 2D mask or packed ``position_ids``, and what in-LM bridges read."""
        if labels is None or return_logits or not self._can_split_head():
            logits = self.lm(inputs_embeds=embeds, use_cache=False, **lm_kwargs).logits
            loss = None
            if labels is not None:
                # Shift the labels, not the logits: slicing (B, L, vocab) logits would copy them.
                targets = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
                loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
            return VLMOutput(loss, logits)
        hidden = self.base_lm.get_decoder()(inputs_embeds=embeds, use_cache=False, **lm_kwargs).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        picked = self.base_lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
        return VLMOutput(nn.functional.cross_entropy(picked, targets[keep]), None)

    def _can_split_head(self) -> bool:
        """Decoder + plain linear head, with no logit scaling or soft-capping after it."""
        cfg = self.base_lm.config
        plain = not any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale"))
        return plain and hasattr(self.base_lm, "get_decoder") and self.base_lm.get_output_embeddings() is not None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 pixels: torch.Tensor | None = None, features: torch.Tensor | None = None,
                 max_new_tokens: int = 32, use_cache: bool = True,
                 audio: torch.Tensor | None = None) -> list[list[int]]:
        """Greedy continuation of left-padded prompts; returns the new token ids per row."""
        if features is None and pixels is not None:
            features = self.encode_images(pixels)
        embeds, layer_inputs = self.lm_inputs(input_ids, features, audio)
        return self._generate(embeds, attention_mask, max_new_tokens, use_cache, layer_inputs)

    def _generate(self, embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  use_cache: bool, layer_inputs: dict[str, torch.Tensor]) -> list[list[int]]:
        # The generation engine's own greedy loop, so that evaluation and chat answer alike.
        from chiasm.chat_template import stop_token_ids  # the LM's own turn ends, not hard-coded names
        from chiasm.generation.decode import greedy_rows

        return greedy_rows(self.lm, embeds, attention_mask, layer_inputs, max_new_tokens=max_new_tokens,
                           stop_ids=stop_token_ids(self.base_lm, self.tokenizer), use_cache=use_cache,
                           suppress=self.placeholder_ids)

    # ---- persistence ---------------------------------------------------------------
    def merged_lm(self) -> PreTrainedModel:
        """The plain transformers LM: a LoRA-merged copy under LoRA, else the LM itself."""
        if hasattr(self.lm, "merge_and_unload"):
            return copy.deepcopy(self.lm).merge_and_unload()
        return self.lm

    def save(self, folder: str | Path) -> Path:
        """Write a self-contained folder: config, processor, encoder, bridge and a plain transformers LM.

        The LM is LoRA-merged and keeps its weights' dtype, which the saved config records. The
        encoder's own configs (a tower's config and image processor) go into ``encoder/``, so the
        folder loads with the original tower gone.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lm = self.merged_lm()
        config = replace(self.config, dtype=dtype_name(next(lm.parameters()).dtype))
        (folder / CONFIG_FILE).write_text(json.dumps(to_dict(config), indent=2) + "\n")
        save_file(_contiguous(self.bridge.export_state(self.base_lm)), str(folder / "bridge.safetensors"))
        save_file(_contiguous(self.encoder.state_dict()), str(folder / "encoder.safetensors"))
        shutil.rmtree(folder / ENCODER_FOLDER, ignore_errors=True)  # never a stale tower config from an older save
        self.encoder.export(folder / ENCODER_FOLDER)
        if self.audio_encoder is not None:
            self.audio_encoder.save(folder)
            save_file(_contiguous(self.audio_bridge.state_dict()), str(folder / AUDIO_BRIDGE_FILE))
        lm.save_pretrained(folder / "lm", safe_serialization=True)
        self.processor.save_pretrained(folder)  # processor_config.json, and the tokenizer into lm/
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, attn_implementation: str | None = None) -> VisionLanguageModel:
        """Load a folder written by :meth:`save`, in its saved dtype unless ``dtype`` says otherwise.

        ``attn_implementation`` replaces the saved one (e.g. a kernel only the serving GPU has).
        """
        folder = Path(folder)
        if not (folder / CONFIG_FILE).exists():
            inside = folder / "model"  # a training run's folder holds its model in RUN/model
            hint = f"; did you mean {inside}?" if (inside / CONFIG_FILE).is_file() else ""
            raise FileNotFoundError(f"{folder} is not a chiasm model folder (no {CONFIG_FILE}){hint}")
        try:
            config = from_dict(ModelConfig, json.loads((folder / CONFIG_FILE).read_text()))
        except ValueError as exc:  # not JSON, or not a model config (ConfigError)
            raise ModelFolderError(f"{folder / CONFIG_FILE}: not a valid model config: {exc}") from exc
        check_saved_config(config, folder / CONFIG_FILE)
        if dtype is not None:
            config = replace(config, dtype=dtype_name(torch_dtype(dtype)))
        if attn_implementation is not None:
            config = replace(config, attn_implementation=attn_implementation)
        enc_cfg = config.encoder
        if (folder / ENCODER_FOLDER).is_dir():  # rebuilt from the folder, never from the original source
            enc_cfg = replace(enc_cfg, source=str(folder / ENCODER_FOLDER))
        encoder = build_encoder(enc_cfg, pretrained=False)  # weights come from the folder
        _load_weights(encoder, folder / "encoder.safetensors", "encoder")
        check_attn_implementation(config.attn_implementation)
        extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
        if not (folder / "lm").is_dir():
            raise ModelFolderError(f"{folder / 'lm'}: folder missing; the model folder is incomplete (save it again)")
        try:
            lm = AutoModelForCausalLM.from_pretrained(folder / "lm", dtype=torch_dtype(config.dtype),
                                                      trust_remote_code=config.lm.trust_remote_code, **extra)
        except (OSError, ValueError, SafetensorError) as exc:
            raise ModelFolderError(f"{folder / 'lm'}: cannot load the language model: {exc}") from exc
        tokenizer = load_tokenizer(folder / "lm", trust_remote_code=config.lm.trust_remote_code)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        has_processor = (folder / PROCESSOR_FILE).is_file()
        processor = Processor.from_pretrained(folder, tokenizer=tokenizer) if has_processor else None
        # Shapes only: the saved state dict below replaces any pretrained bridge weights.
        bridge = build_bridge(config.bridge, encoder.dim, lm.config.hidden_size, pretrained=False)
        hearing = hearing_parts(config.audio, lm.config.hidden_size, folder=folder)
        model = _in_lm_dtype(cls(config, encoder, bridge, lm, tokenizer, **hearing))
        _load_weights(bridge, folder / "bridge.safetensors", "bridge")
        if config.audio is not None:
            _load_weights(model.audio_bridge, folder / AUDIO_BRIDGE_FILE, "audio bridge")
        if processor is not None:
            _adopt_processor(model, processor, folder)
        if device is not None:
            model.to(device)
        return model.eval()


def _fill(embeds: torch.Tensor, where: torch.Tensor, tokens: torch.Tensor, items: str, kind: str,
          positions: str) -> torch.Tensor:
    """``tokens`` ``(n, k, D)`` put at the ``where`` positions of ``embeds`` in row-major order; the counts
    must agree (``items``, ``kind`` and ``positions`` name them in the error)."""
    n_positions = int(where.sum())
    if tokens.shape[0] * tokens.shape[1] != n_positions:
        raise ValueError(f"{tokens.shape[0]} {items} x {tokens.shape[1]} {kind} = {tokens.shape[0] * tokens.shape[1]}"
                         f" but the sequence holds {n_positions} {positions}")
    embeds = embeds.clone()
    embeds[where] = tokens.reshape(-1, tokens.shape[-1])
    return embeds


def hearing_parts(audio: AudioConfig | None, lm_dim: int, *, folder: Path | None = None) -> dict[str, nn.Module]:
    """The audio encoder and bridge a model that hears is built with (keyword arguments of the model).

    The encoder comes from its Whisper source, or from a saved model ``folder`` (whose bridge
    weights are loaded next, so the bridge is only shaped); nothing for a model that does not hear.
    """
    if audio is None:
        return {}
    from chiasm.hearing.encoder import AudioEncoder

    encoder = AudioEncoder.from_whisper(audio.source, audio.seconds) if folder is None \
        else AudioEncoder.load(folder, audio.seconds)
    return {"audio_encoder": encoder,
            "audio_bridge": build_bridge(audio.bridge, encoder.dim, lm_dim, pretrained=folder is None)}


def _in_lm_dtype(model: VisionLanguageModel) -> VisionLanguageModel:
    """In-LM bridges run inside the LM's layers, on its hidden states: they take the LM's dtype.

    Cast after ``attach``, which creates their per-layer modules. Prefix bridges stay in
    float32: they are small, trained with AdamW (whose updates bf16 weights would round
    away), and their output is cast to the LM's dtype anyway.
    """
    if model.bridge.in_lm:
        model.bridge.to(model.base_lm.dtype)
    return model


def _load_weights(module: nn.Module, path: Path, what: str) -> None:
    """Load ``path`` into ``module``; a missing, corrupt or mismatched file is named in the error."""
    try:
        module.load_state_dict(load_file(str(path)))
    except FileNotFoundError as exc:
        raise ModelFolderError(f"{path}: file missing; the model folder is incomplete (save it again)") from exc
    except (SafetensorError, OSError) as exc:
        raise ModelFolderError(f"{path}: not a readable safetensors file, corrupt or truncated ({exc})") from exc
    except RuntimeError as exc:  # load_state_dict: missing, unexpected or misshapen tensors
        raise ModelFolderError(f"{path}: its tensors do not fit the {what} that {CONFIG_FILE} describes "
                               f"({' '.join(str(exc).split())[:400]})") from exc


def _adopt_processor(model: VisionLanguageModel, processor: Processor, folder: Path) -> None:
    """Feed the model as its folder says; refuse a processor that contradicts the model's parts."""
    if processor.tokens_per_image != model.tokens_per_image:
        raise ValueError(f"{folder / PROCESSOR_FILE} says {processor.tokens_per_image} tokens per image, "
                         f"the saved encoder and bridge make {model.tokens_per_image}")
    if processor.tokens_per_audio != model.tokens_per_audio:
        raise ValueError(f"{folder / PROCESSOR_FILE} says {processor.tokens_per_audio} tokens per audio clip, "
                         f"the saved audio encoder and bridge make {model.tokens_per_audio}")
    model.encoder.preprocessing = processor.image


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}
