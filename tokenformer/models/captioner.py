"""The image captioner: a vision TokenFormer whose output tokens are the prefix of a TokenFormer
language model, which then writes the caption (LLaVA's shape, every linear layer a Pattention).

    images (B, C, H, W) --vision.tokens--> (B, P, h_vision)     P = 1 + patches, class token first
                        --vision.head-->   (B, P, h_text)       the projector: a Pattention
    [image prefix; word embeddings of ids]  (B, P + T, h_text)
    lm.run_layers (causal over everything, the prefix too, as in LLaVA), lm.final_norm,
    tied head -> logits of the T caption positions (B, T, padded_vocab)

The image tower is a `VisionTokenFormer` with `num_classes` = the language model's width, so its
own `head`, applied to every token instead of the class token alone, is the projector: every
parameter of both parts takes part in every forward pass, and DDP needs no
`find_unused_parameters`. Decoding reuses the language model's `KVCache` and block stack: the
prefill runs the prefix and the first caption ids, then one id at a time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tokenformer.errors import TokenFormerError
from tokenformer.models.config import Config, PresetConfig, check_declared_fields
from tokenformer.models.lm import KVCache, TokenFormer
from tokenformer.models.pattention import Pattention
from tokenformer.models.pretrained import PartsCheckpointing, PretrainedModel
from tokenformer.models.vision import VISION_PRESETS, VisionConfig, VisionTokenFormer
from tokenformer.options import Bounds

MODEL_TYPE = "tokenformer_captioner"
# The slot counts `tokenformer grow` reads (see `CaptionerConfig`): the language model's under the
# names of a language model, the image tower's with this prefix.
VISION_PREFIX = "vision_"
BLOCK_SLOT_FIELDS = ("qkv_slot_num", "proj_slot_num", "ffn_slot_num")


@dataclass
class CaptionerConfig(PresetConfig):
    """The two parts' configs, nested: `vision` (a `VisionConfig`, its `num_classes` the width of
    the image tokens given to the language model) and `text` (a `Config`).

    For `tokenformer grow` the config also reads like one model's: `qkv_slot_num`, `proj_slot_num`,
    `ffn_slot_num` (and `*_scale_num`) are the language model's, `vision_qkv_slot_num` ... the
    image tower's; `slot_fields` lists all six, `replace` writes changes back into the part they
    name, and `growth_history` records growths of the captioner as a whole.
    """

    field_bounds: ClassVar[dict[str, Bounds]] = {"image_std": Bounds(above=0, maximum=1e6)}  # a divisor

    name: str = "custom"
    vision: VisionConfig | dict[str, Any] | None = None
    text: Config | dict[str, Any] | None = None
    # pixels scaled to [0, 1], then (x - mean) / std per channel (one value: every channel), before
    # the image tower: stored here so that whoever captions an image normalises it as training did
    image_mean: list[float] = field(default_factory=lambda: [0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5])
    growth_history: list[dict[str, Any]] = field(default_factory=list)

    slot_fields = BLOCK_SLOT_FIELDS + tuple(VISION_PREFIX + f for f in BLOCK_SLOT_FIELDS)
    config_label = "captioner config"
    preset_label = "captioner preset"
    part_fields = ("vision", "text")  # mappings over a preset change single fields of its parts

    def __post_init__(self) -> None:
        # a saved config.json holds the parts as mappings; `None` means the parts' defaults
        if not isinstance(self.text, Config):
            self.text = Config.from_dict(dict(self.text or {}))
        if not isinstance(self.vision, VisionConfig):
            values = dict(self.vision or {})
            values.setdefault("num_classes", self.text.hidden_size)
            self.vision = VisionConfig.from_dict(values)
        self.validate()

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return CAPTIONER_PRESETS

    @property
    def prefix_length(self) -> int:
        """Image tokens before the caption: the class token and one per patch."""
        return 1 + self.vision.num_patches

    @property
    def caption_room(self) -> int:
        """The longest caption generation can write: the language model's seq_length after the
        image prefix and the opening end-of-text token."""
        return self.text.seq_length - self.prefix_length - 1

    @property
    def num_parameters(self) -> int:
        return self.vision.num_parameters + self.text.num_parameters

    @property
    def norm_activation_type(self) -> str:
        """What decides whether exact growth can hold: softmax if either part uses it."""
        kinds = (self.vision.norm_activation_type, self.text.norm_activation_type)
        return "softmax" if "softmax" in kinds else self.text.norm_activation_type

    def validate(self) -> None:
        """Raise `TokenFormerError` with one clear sentence if the two parts cannot fit together."""
        self.vision.validate()
        self.text.validate()
        check_declared_fields(self, "captioner config")
        if self.vision.num_classes != self.text.hidden_size:
            raise TokenFormerError(
                f"the image tower's num_classes {self.vision.num_classes} must equal the language model's "
                f"hidden_size {self.text.hidden_size} (its head projects the image tokens into the language "
                f"model): drop num_classes from the vision config or set it to {self.text.hidden_size}")
        channels = self.vision.num_channels
        if len(self.image_mean) not in (1, channels) or len(self.image_std) != len(self.image_mean):
            raise TokenFormerError(f"image_mean {self.image_mean} and image_std {self.image_std} need one value, or "
                                   f"one per channel ({channels}), each")
        if self.text.seq_length < self.prefix_length + 2:
            raise TokenFormerError(
                f"the language model's seq_length {self.text.seq_length} leaves no room for a caption after "
                f"{self.prefix_length} image tokens: raise text seq_length (or the vision patch_size)")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vision": self.vision.to_dict(), "text": self.text.to_dict(),
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "growth_history": list(self.growth_history)}

    # ---- what `tokenformer grow` reads and writes ------------------------------------------------

    def _part(self, name: str) -> tuple[Any, str]:
        if name.startswith(VISION_PREFIX):
            return self.vision, name[len(VISION_PREFIX):]
        return self.text, name

    def __getattr__(self, name: str) -> Any:
        # only reached for names that are not attributes: the slot and scale counts of the parts
        if name.endswith(("_slot_num", "_scale_num")) and "text" in self.__dict__:
            part, field_name = self._part(name)
            if hasattr(part, field_name):
                return getattr(part, field_name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def replace(self, **changes: Any) -> "CaptionerConfig":
        """A copy with `changes` applied: this config's own fields (`growth_history`, ...) here, any
        other to the part it names: `vision_*` to the image tower (`vision_qkv_slot_num` -> its
        `qkv_slot_num`), the rest to the language model (`vocab_size`, `qkv_slot_num`, ...)."""
        mine = {f.name for f in dataclasses.fields(self)} - {"vision", "text"}
        own = {k: changes.pop(k) for k in [k for k in changes if k in mine]}
        parts: dict[str, dict[str, Any]] = {"vision": {}, "text": {}}
        for key, value in changes.items():
            part, field_name = self._part(key)
            parts["vision" if part is self.vision else "text"][field_name] = value
        return dataclasses.replace(self, vision=dataclasses.replace(self.vision, **parts["vision"]),
                                   text=dataclasses.replace(self.text, **parts["text"]), **own)


# The image tower of the 32x32 RGB scenes (`tokenformer make-scenes`; 8x8 patches, so 17 image
# tokens: a quadrant's sub-cell is one patch, and a CPU trains it in minutes) with a small language
# model, then ViT-B/16's tower (224x224, 197 image tokens) with the shape of TokenFormer-150M.
CAPTIONER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vision=dict(image_size=32, patch_size=8, num_channels=3, num_layers=2, hidden_size=64,
                    num_attention_heads=4, qkv_slot_num=64, proj_slot_num=64, ffn_slot_num=256,
                    patch_slot_num=128, head_slot_num=64, patch_bias=True),
        text=dict(num_layers=2, hidden_size=64, num_attention_heads=4, qkv_slot_num=64, proj_slot_num=64,
                  ffn_slot_num=256, seq_length=96, vocab_size=257)),
    "B/16-150M": dict(
        vision={**VISION_PRESETS["B/16"], "head_slot_num": 768},
        text=dict(num_layers=12, hidden_size=768, num_attention_heads=12, qkv_slot_num=768,
                  proj_slot_num=768, ffn_slot_num=3072, seq_length=2048)),
}


class Captioner(PartsCheckpointing, PretrainedModel):
    """`model(images, ids)`: logits (B, T, padded_vocab) of caption ids (B, T) after the images'
    prefix. `vision` is the image tower (its head the projector), `lm` the language model."""

    model_type = MODEL_TYPE
    config_class = CaptionerConfig
    checkpointed_parts = ("lm", "vision")  # both parts' blocks follow gradient_checkpointing
    written_by = "save_pretrained or `tokenformer train-captioner`"

    def __init__(self, config: CaptionerConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        config.validate()
        self.vision = VisionTokenFormer(config.vision, device=device, dtype=dtype)
        self.lm = TokenFormer(config.text, device=device, dtype=dtype)
        self.config = config

    @property
    def config(self) -> CaptionerConfig:
        return self._config

    @config.setter
    def config(self, config: CaptionerConfig) -> None:
        # the parts read their own configs (shapes, the cache): keep them those of the whole, also
        # when `tokenformer grow` replaces it
        self._config = config
        self.vision.config, self.lm.config = config.vision, config.text

    def image_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The image tokens in the language model's width (B, P, h_text)."""
        return self.vision.head(self.vision.tokens(images))  # (B, P, h_text)

    def forward(self, images: torch.Tensor | None, ids: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, padded_vocab) of the caption positions `ids` (B, T): position t predicts id t + 1.

        Without a cache, or with an empty one (the prefill), the images' prefix comes first. With a
        cache that holds positions already, `ids` continue after them and `images` is not used (pass
        None). `last_only` returns the last position's logits only, (B, 1, padded_vocab).
        """
        start = 0 if cache is None else cache.length
        x = self.lm.word_embeddings(ids)  # (B, T, h)
        prefix = 0
        if start == 0:
            if images is None:
                raise TokenFormerError("the first forward pass of a caption needs its images (the prefix)")
            image_tokens = self.image_prefix(images).to(x.dtype)  # (B, P, h)
            if image_tokens.shape[0] != ids.shape[0]:
                raise TokenFormerError(f"{image_tokens.shape[0]} images but {ids.shape[0]} rows of ids: "
                                       f"give one row of caption ids per image")
            prefix = image_tokens.shape[1]
            x = torch.cat([image_tokens, x], dim=1)  # (B, P + T, h)
        if cache is not None and start + x.shape[1] > cache.max_length:
            raise TokenFormerError(f"KV cache holds {cache.max_length} positions but {start + x.shape[1]} are "
                                   f"needed: allocate a longer cache")
        if start + x.shape[1] > self.config.text.seq_length:
            raise TokenFormerError(
                f"{start + x.shape[1]} positions exceed the language model's seq_length "
                f"{self.config.text.seq_length}: use shorter captions")
        x = self.lm.run_layers(x, start, cache)  # (B, P + T, h), or (B, T, h) after the prefill
        if cache is not None:
            cache.length += x.shape[1]
        x = x[:, prefix:]  # (B, T, h): the caption positions
        if last_only:
            x = x[:, -1:]  # (B, 1, h)
        x = self.lm.final_norm(x)
        return x @ self.lm.word_embeddings.weight.T  # (B, T, padded_vocab)

    def allocate_cache(self, batch_size: int, caption_length: int) -> KVCache:
        """A KV cache for the image prefix and `caption_length` caption positions."""
        return self.lm.allocate_cache(batch_size, self.config.prefix_length + caption_length)

    def pattention_groups(self) -> dict[str, dict[str, Pattention]]:
        """The Pattentions of each slot count of `CaptionerConfig.slot_fields`, by module name: the
        image tower's blocks under `vision_*`, the language model's under the plain names. The
        patch embedding and the projector keep their own counts."""
        groups: dict[str, dict[str, Pattention]] = {}
        for prefix, part in ((VISION_PREFIX, "vision"), ("", "lm")):
            qkv, proj, ffn = {}, {}, {}
            for i, block in enumerate(getattr(self, part).layers):
                name = f"{part}.layers.{i}"
                qkv.update({f"{name}.attention.{n}": getattr(block.attention, n) for n in ("query", "key", "value")})
                proj[f"{name}.attention.proj"] = block.attention.proj
                ffn[f"{name}.mlp"] = block.mlp
            groups.update({prefix + "qkv_slot_num": qkv, prefix + "proj_slot_num": proj, prefix + "ffn_slot_num": ffn})
        return groups

    @classmethod
    def from_parts(cls, vision_dir: str | Path, lm_dir: str | Path, head_slot_num: int | None = None,
                   device: torch.device | str = "cpu") -> "Captioner":
        """A captioner from a trained image tower (a `train-vision` model directory) and a trained
        language model: every weight is theirs except the projector, a fresh Pattention from the
        tower's width to the language model's (`head_slot_num` tokens, default the tower's head's)
        unless the tower's head has that width already."""
        vision = VisionTokenFormer.from_pretrained(vision_dir, device=device)
        lm = TokenFormer.from_pretrained(lm_dir, device=device)
        vision_config = vision.config
        slots = head_slot_num or vision_config.head_slot_num
        if vision_config.num_classes != lm.config.hidden_size or slots != vision_config.head_slot_num:
            vision_config = dataclasses.replace(vision_config, num_classes=lm.config.hidden_size,
                                                head_slot_num=slots)
        model = cls(CaptionerConfig(name="from-parts", vision=vision_config, text=lm.config), device=device)
        keep_head = vision_config is vision.config
        tower = {k: v for k, v in vision.state_dict().items() if keep_head or not k.startswith("head.")}
        if not keep_head:  # the new projector keeps its fresh initialisation
            tower.update({f"head.{k}": v for k, v in model.vision.head.state_dict().items()})
        model.vision.load_state_dict(tower)
        model.lm.load_state_dict(lm.state_dict())
        return model.eval()


def caption_loss(model, images: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy on the caption tokens only.

    `ids` (B, L): each row `[bos, w_1 .. w_n, eos]` then padding; `lengths` (B,) the real length of
    each row (n + 2). Caption position t predicts id t + 1: the bos predicts the first word, the last
    word predicts eos, and nothing after eos (padding) counts. The image positions are never
    targets. `reduction` "mean" (over the counted tokens) or "sum".
    """
    logits = model(images, ids[:, :-1]).float()                         # (B, L - 1, V)
    targets = ids[:, 1:]                                                # (B, L - 1)
    positions = torch.arange(targets.shape[1], device=ids.device)       # (L - 1,)
    counted = positions[None, :] < (lengths.to(ids.device)[:, None] - 1)  # (B, L - 1)
    targets = targets.masked_fill(~counted, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)
