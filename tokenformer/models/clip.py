"""The CLIP TokenFormer: an image tower and a text tower whose every linear layer is a Pattention,
trained contrastively (the official project announces a CLIP on DataComp-1B and releases no code;
the layout follows open_clip).

    images (B, C, H, W) --visual: VisionTokenFormer, num_classes = embed_dim--> (B, E)
        the Pattention `head` on the final-normed class token is the image projection
    ids (B, L), lengths (B,) --text: the language model's blocks, causal, rotary--> (B, L, w)
        pooled at the end-of-text position `lengths - 1`, final LayerNorm, Pattention `projection` --> (B, E)
    forward: both L2-normalised, and exp(logit_scale) (a learned scalar in log space)

Every parameter takes part in every forward pass (DDP needs no `find_unused_parameters`). Both
towers keep the official qkv / proj / ffn slot groups, so `tokenformer.grow` grows each tower by its
own config (`towers`, `with_towers`); the two projections keep their own token counts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenformer.errors import TokenFormerError
from tokenformer.models.config import Config, PresetConfig, check_declared_fields
from tokenformer.models.lm import LanguageModelCore
from tokenformer.models.pattention import Pattention
from tokenformer.models.pretrained import PartsCheckpointing, PretrainedModel
from tokenformer.models.vision import VisionConfig, VisionTokenFormer
from tokenformer.options import Bounds

MODEL_TYPE = "clip_tokenformer"
TOWERS = ("visual", "text")


@dataclass
class CLIPConfig(PresetConfig):
    """Shape of a CLIP TokenFormer: the image tower's `VisionConfig` (`vision`; its `num_classes` is
    `embed_dim`, since its head is the image projection), the text tower's language-model `Config`
    (`text`; `seq_length` is the context length), the shared embedding width and the logit scale
    (`init_logit_scale` = log(1/0.07) and the clamp `max_logit_scale` = 100, as open_clip)."""

    # log(1/temperature) lies in [0, log(max_logit_scale)] (checked in `validate`)
    field_bounds: ClassVar[dict[str, Bounds]] = {"init_logit_scale": Bounds(minimum=0, maximum=100)}

    name: str = "custom"
    vision: Any = None
    text: Any = None
    embed_dim: int = 512
    text_projection_slot_num: int = 512
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        check_declared_fields(self, "CLIP config")  # before the towers take embed_dim
        if isinstance(self.vision, dict):
            # the head is the projection: its width follows embed_dim unless stated (and then checked)
            self.vision = VisionConfig.from_dict({"num_classes": self.embed_dim, **self.vision})
        if isinstance(self.text, dict):
            self.text = Config.from_dict(self.text)
        self.validate()

    def validate(self) -> None:
        """Raise `TokenFormerError` with one clear sentence if the configuration cannot work."""
        if not isinstance(self.vision, VisionConfig) or not isinstance(self.text, Config):
            raise TokenFormerError("a CLIP config needs `vision` (VisionConfig fields) and `text` (language model "
                                   "Config fields): give both as mappings")
        check_declared_fields(self, "CLIP config")
        if self.vision.num_classes != self.embed_dim:
            raise TokenFormerError(
                f"vision.num_classes {self.vision.num_classes} must equal embed_dim {self.embed_dim} (the image "
                f"tower's head is the image projection): drop num_classes from the vision fields")
        if not 1.0 <= self.max_logit_scale or not 0.0 <= self.init_logit_scale <= math.log(self.max_logit_scale):
            raise TokenFormerError(
                f"init_logit_scale {self.init_logit_scale} must lie in [0, log(max_logit_scale "
                f"{self.max_logit_scale})]: the training clamps the scale to that range")

    # ---- derived fields -------------------------------------------------------------------

    @property
    def num_parameters(self) -> int:
        """Parameter count computed from the shapes alone: both towers, the text projection and the
        logit scale."""
        projection = self.text_projection_slot_num * (self.text.hidden_size + self.embed_dim)
        return self.vision.num_parameters + self.text.num_parameters + projection + 1

    # ---- constructors -----------------------------------------------------------------------

    config_label = "CLIP config"
    preset_label = "CLIP preset"
    part_fields = ("vision", "text")  # `vision={"num_layers": 4}` over a preset changes only the layer count

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return CLIP_PRESETS

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "vision": self.vision.to_dict(), "text": self.text.to_dict()}


def _tower(width: int, layers: int, heads: int, **fields: Any) -> dict[str, Any]:
    """The block fields of a tower of `width` with TokenFormer's slot counts: qkv = proj = width,
    ffn = 4 x width (the released models')."""
    return dict(hidden_size=width, num_layers=layers, num_attention_heads=heads, qkv_slot_num=width,
                proj_slot_num=width, ffn_slot_num=4 * width, **fields)


# "B/16" is open_clip's ViT-B-16 in TokenFormer form: the ViT-B/16 image tower (224 px, width 768,
# 12 layers), the text tower (context 77, width 512, 8 heads, 12 layers, open_clip's 49408-token
# vocabulary), embed 512, each projection with embed_dim tokens. The small ones train on a CPU: 32x32
# RGB (`make-scenes`) and 28x28 grey (Fashion-MNIST); their text vocabulary is the byte tokenizer's
# until a task sets the one of its tokenizer.
CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "B/16": dict(vision=_tower(768, 12, 12, image_size=224, patch_size=16, patch_slot_num=768, head_slot_num=512),
                 text=_tower(512, 12, 8, seq_length=77, vocab_size=49408), embed_dim=512,
                 text_projection_slot_num=512),
    "tiny": dict(vision=_tower(64, 2, 4, image_size=32, patch_size=8, num_channels=3, patch_slot_num=64,
                               head_slot_num=64, patch_bias=True),
                 text=_tower(64, 2, 4, seq_length=32, vocab_size=257), embed_dim=64, text_projection_slot_num=64),
    "tiny-28": dict(vision=_tower(64, 2, 4, image_size=28, patch_size=7, num_channels=1, patch_slot_num=64,
                                  head_slot_num=64, patch_bias=True),
                    text=_tower(64, 2, 4, seq_length=32, vocab_size=257), embed_dim=64,
                    text_projection_slot_num=64),
    "small": dict(vision=_tower(128, 4, 4, image_size=32, patch_size=4, num_channels=3, patch_slot_num=128,
                                head_slot_num=128, patch_bias=True),
                  text=_tower(128, 4, 4, seq_length=32, vocab_size=257), embed_dim=128,
                  text_projection_slot_num=128),
}


class TextTower(LanguageModelCore, nn.Module):
    """The language model's embedding, causal rotary blocks and final norm, pooled at the end-of-text
    position and projected by a Pattention: `tower(ids, lengths)` -> (B, embed_dim)."""

    def __init__(self, config: Config, embed_dim: int, projection_slot_num: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.build_modules(config, device=device, dtype=dtype)
        self.projection = Pattention(config.hidden_size, embed_dim, projection_slot_num,
                                     norm_activation_type=config.norm_activation_type,
                                     key_std=config.init_method_std,
                                     value_std=2.0 / config.num_layers / math.sqrt(config.hidden_size),
                                     device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, L = ids.shape
        if L > self.config.seq_length:
            raise TokenFormerError(f"texts of {L} tokens exceed the context length {self.config.seq_length}: "
                                   f"tokenize them with context_length={self.config.seq_length}")
        if lengths.shape != (B,) or bool((lengths < 1).any()) or bool((lengths > L).any()):
            raise TokenFormerError(f"lengths must be (batch,) = ({B},) counts in 1..{L} (the end-of-text "
                                   f"token is at lengths - 1): use tokenize_captions")
        # Causal attention: the end-of-text position sees its own text only, so the right padding
        # after it changes nothing and needs no mask.
        x = self.run_layers(self.word_embeddings(ids))                           # (B, L, w)
        pooled = x[torch.arange(B, device=ids.device), lengths.to(ids.device) - 1]  # (B, w)
        return self.projection(self.final_norm(pooled))                          # (B, E)


class CLIPTokenFormer(PartsCheckpointing, PretrainedModel):
    """`model(images, ids, lengths)` -> (image_features, text_features, logit_scale): both (B, E) and
    L2-normalised, the scale already exponentiated (as open_clip's CLIP)."""

    model_type = MODEL_TYPE
    config_class = CLIPConfig
    checkpointed_parts = ("visual", "text")  # both towers' blocks follow gradient_checkpointing
    written_by = "save_pretrained or `tokenformer train-clip`"

    def __init__(self, config: CLIPConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.visual = VisionTokenFormer(config.vision, device=device, dtype=dtype)
        self.text = TextTower(config.text, config.embed_dim, config.text_projection_slot_num,
                              device=device, dtype=dtype)
        self.logit_scale = nn.Parameter(torch.full((), config.init_logit_scale, device=device,
                                                   dtype=dtype or torch.float32))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (B, E), not normalised."""
        return self.visual(images)

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Text embeddings (B, E), not normalised: `ids` (B, L) right-padded, `lengths` (B,) with the
        end-of-text token at `lengths - 1` (see `tokenize_captions`)."""
        return self.text(ids, lengths)

    def forward(self, images: torch.Tensor, ids: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(ids, lengths), dim=-1)
        return image_features, text_features, self.logit_scale.exp()

    # ---- growth: each tower by its own config ---------------------------------------------------

    def towers(self) -> dict[str, nn.Module]:
        """The towers that `tokenformer.grow` grows one by one, each by the slot counts of its config."""
        return {name: getattr(self, name) for name in TOWERS}

    def with_towers(self, towers: dict[str, nn.Module]) -> "CLIPTokenFormer":
        """A copy with these towers (grown ones) and a config that states their configs."""
        # deepcopy everything else (the logit scale), taking the given towers in place of the old ones
        model = copy.deepcopy(self, {id(getattr(self, name)): tower for name, tower in towers.items()})
        model.config = dataclasses.replace(self.config, vision=model.visual.config, text=model.text.config)
        return model


def tokenize_captions(tokenizer, captions: Sequence[str], context_length: int,
                      pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, context_length) long and lengths (B,) long of `captions`: each caption's ids
    then the tokenizer's end-of-text id, cut to `context_length` keeping the end-of-text token last
    (the text tower pools there), right-padded with `pad_id` (default: the end-of-text id)."""
    if context_length < 1:
        raise TokenFormerError(f"context_length must be at least 1 (room for the end-of-text token), got "
                               f"{context_length}")
    eos = tokenizer.eos_id
    pad = eos if pad_id is None else pad_id
    encoded = tokenizer.encode_batch(list(captions))
    ids = torch.full((len(encoded), context_length), pad, dtype=torch.long)  # (B, L)
    lengths = torch.empty(len(encoded), dtype=torch.long)                     # (B,)
    for row, tokens in enumerate(encoded):
        tokens = list(tokens[:context_length - 1]) + [eos]
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        lengths[row] = len(tokens)
    return ids, lengths
