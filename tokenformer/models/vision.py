"""The vision TokenFormer: a ViT whose every linear layer is a Pattention (paper, section 7).

    patches (B, N, p*p*C) --patch_embed--> (B, N, h)      a Pattention over flattened patches
    [cls; patches] + learned position embeddings           (B, 1+N, h)
    blocks: the language model's `Block`, bidirectional, no rotary
    final LayerNorm (weight and bias) on the class token --head--> (B, num_classes)   a Pattention

The paper gives no code, only shapes and results (ImageNet-1K top-1 82.5 for B/16 with 109M
parameters, 83.1 for L/16 with 407M). The blocks are the language model's, so growth
(`tokenformer.grow`) and shrinking act on the same qkv / proj / ffn slot groups; the patch
embedding and the head keep their own token counts (`patch_slot_num`, `head_slot_num`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from tokenformer.errors import TokenFormerError
from tokenformer.models.config import PresetConfig, check_block_fields
from tokenformer.options import Bounds
from tokenformer.models.lm import Block
from tokenformer.models.pattention import Pattention
from tokenformer.models.pretrained import PretrainedModel

MODEL_TYPE = "vision_tokenformer"


@dataclass
class VisionConfig(PresetConfig):
    """Shape and numerics of a vision TokenFormer (field names as in the language model's Config).

    `patch_slot_num` / `head_slot_num` are the token counts of the patch embedding and of the
    classification head; `*_scale_num` pin the n of the block Pattentions' normalisation after an
    exact growth, as in `Config`. `patch_bias` appends a constant 1 to every flattened patch before
    the patch embedding: a Pattention's normalisation divides out the scale of its input, so without
    it a patch and the same patch made brighter or darker (e.g. dark cloth and background) embed
    alike; with it the keys carry one more column, the way a linear layer's bias folds into its weight.
    """

    field_bounds: ClassVar[dict[str, Bounds]] = {"init_method_std": Bounds(minimum=0)}  # as in Config

    name: str = "custom"
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    num_classes: int = 1000
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    qkv_slot_num: int = 768
    proj_slot_num: int = 768
    ffn_slot_num: int = 3072
    patch_slot_num: int = 768
    head_slot_num: int = 1000
    patch_bias: bool = False
    norm_activation_type: str = "l2_norm_gelu"
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    pattention_memory_lean: bool = False  # as in Config: one saved score tensor per Pattention
    qkv_scale_num: int | None = None
    proj_scale_num: int | None = None
    ffn_scale_num: int | None = None
    growth_history: list[dict[str, Any]] = field(default_factory=list)
    # How pixels in [0, 1] were normalised in training ((x - mean) / std, one value or one per channel):
    # saved with the model so that evaluation normalises alike (train-vision and train-clip set them).
    image_mean: list[float] = field(default_factory=lambda: [0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5])

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived fields -------------------------------------------------------------------

    @property
    def memory_bytes(self) -> int:
        """float32 bytes of the weights and of one image's tokens through a block (a few copies)."""
        return 4 * (self.num_parameters + 8 * (self.num_patches + 1) * max(self.hidden_size, self.ffn_slot_num))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: patch_size * patch_size * num_channels."""
        return self.patch_size * self.patch_size * self.num_channels

    @property
    def patch_input_dim(self) -> int:
        """Input width of the patch embedding: `patch_dim`, plus 1 with `patch_bias`."""
        return self.patch_dim + int(self.patch_bias)

    @property
    def num_parameters(self) -> int:
        """Parameter count computed from the shapes alone."""
        h = self.hidden_size
        per_layer = 2 * h * (3 * self.qkv_slot_num + self.proj_slot_num + self.ffn_slot_num)
        patch = self.patch_slot_num * (self.patch_input_dim + h)
        head = self.head_slot_num * (h + self.num_classes)
        cls_and_positions = h + (1 + self.num_patches) * h
        return patch + cls_and_positions + self.num_layers * per_layer + 2 * h + head

    # ---- checks -----------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise `TokenFormerError` with one clear sentence if the configuration cannot work."""
        check_block_fields(self, "vision config")
        if self.image_size % self.patch_size:
            raise TokenFormerError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}: "
                f"choose a patch size that divides it")
        if len(self.image_mean) not in (1, self.num_channels) or len(self.image_std) != len(self.image_mean) \
                or min(self.image_std) <= 0:
            raise TokenFormerError(f"image_mean {self.image_mean} and image_std {self.image_std} need one value, or one "
                                   f"per channel ({self.num_channels}), each; the std above 0")

    def normalisation(self) -> tuple[list[float], list[float]]:
        """`image_mean` and `image_std` with one value per channel."""
        channels = self.num_channels
        return ([*self.image_mean] * channels if len(self.image_mean) == 1 else list(self.image_mean),
                [*self.image_std] * channels if len(self.image_std) == 1 else list(self.image_std))

    # ---- constructors -----------------------------------------------------------------------

    # `from_name` and `from_dict` come from PresetConfig; these are what it needs to know.
    config_label = "vision config"
    preset_label = "vision preset"

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return VISION_PRESETS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ImageNet shapes of ViT-B/16 and ViT-L/16 (the paper's two models), then 28x28 grey ones
# (MNIST / Fashion-MNIST) small enough to train on a CPU.
VISION_PRESETS: dict[str, dict[str, Any]] = {
    "B/16": dict(image_size=224, patch_size=16, num_layers=12, hidden_size=768, num_attention_heads=12,
                 qkv_slot_num=768, proj_slot_num=768, ffn_slot_num=3072, patch_slot_num=768,
                 head_slot_num=1000),
    "L/16": dict(image_size=224, patch_size=16, num_layers=24, hidden_size=1024, num_attention_heads=16,
                 qkv_slot_num=1024, proj_slot_num=1024, ffn_slot_num=4096, patch_slot_num=1024,
                 head_slot_num=1000),
    "tiny-28": dict(image_size=28, patch_size=7, num_channels=1, num_classes=10, num_layers=2,
                    hidden_size=32, num_attention_heads=4, qkv_slot_num=16, proj_slot_num=16,
                    ffn_slot_num=64, patch_slot_num=16, head_slot_num=16),
    "fmnist-28": dict(image_size=28, patch_size=7, num_channels=1, num_classes=10, num_layers=4,
                      hidden_size=64, num_attention_heads=4, qkv_slot_num=64, proj_slot_num=64,
                      ffn_slot_num=256, patch_slot_num=256, head_slot_num=64, patch_bias=True),
    "small-28": dict(image_size=28, patch_size=4, num_channels=1, num_classes=10, num_layers=4,
                     hidden_size=96, num_attention_heads=4, qkv_slot_num=96, proj_slot_num=96,
                     ffn_slot_num=384, patch_slot_num=96, head_slot_num=64),
}


class VisionTokenFormer(PretrainedModel):
    """Image classifier: `model(images)` with images (B, C, H, W) returns logits (B, num_classes)."""

    model_type = MODEL_TYPE
    config_class = VisionConfig
    written_by = "save_pretrained or `tokenformer train-vision`"

    def __init__(self, config: VisionConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        h = config.hidden_size
        factory = dict(device=device, dtype=dtype)
        value_std = 2.0 / config.num_layers / math.sqrt(h)  # the blocks' "wang_init"
        common = dict(norm_activation_type=config.norm_activation_type,
                      key_std=config.init_method_std, **factory)
        self.patch_embed = Pattention(config.patch_input_dim, h, config.patch_slot_num,
                                      value_std=config.init_method_std, **common)
        self.cls_token = nn.Parameter(torch.empty(1, 1, h, **factory))
        self.position_embeddings = nn.Parameter(torch.empty(1, 1 + config.num_patches, h, **factory))
        self.layers = nn.ModuleList(Block(config, causal=False, **factory) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(h, eps=config.layernorm_epsilon, **factory)
        self.head = Pattention(h, config.num_classes, config.head_slot_num, value_std=value_std, **common)
        self.gradient_checkpointing = False  # recompute each block in the backward pass (training only)
        if self.cls_token.device.type != "meta":
            nn.init.normal_(self.cls_token, std=config.init_method_std)
            nn.init.normal_(self.position_embeddings, std=config.init_method_std)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, each flattened (p, p, C)."""
        c = self.config
        B, C, H, W = images.shape
        if (C, H, W) != (c.num_channels, c.image_size, c.image_size):
            raise TokenFormerError(
                f"images of shape (C, H, W) = {(C, H, W)} do not fit this model, which takes "
                f"{(c.num_channels, c.image_size, c.image_size)}: resize/crop them (see tokenformer.data.images)")
        p, g = c.patch_size, c.image_size // c.patch_size
        x = images.view(B, C, g, p, g, p)        # (B, C, gy, py, gx, px)
        x = x.permute(0, 2, 4, 3, 5, 1)          # (B, gy, gx, py, px, C)
        return x.reshape(B, g * g, p * p * C)    # (B, N, patch_dim)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Every final-normed output token, the class token first (B, 1 + N, h): the image prefix
        of a captioner (`tokenformer.models.captioner`)."""
        patches = self.patchify(images)                                  # (B, N, patch_dim)
        if self.config.patch_bias:
            patches = F.pad(patches, (0, 1), value=1.0)                  # (B, N, patch_dim + 1)
        x = self.patch_embed(patches)                                    # (B, N, h)
        cls = self.cls_token.expand(x.shape[0], -1, -1)                 # (B, 1, h)
        x = torch.cat([cls, x], dim=1) + self.position_embeddings       # (B, 1+N, h)
        checkpointing = self.gradient_checkpointing and self.training
        for block in self.layers:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, None, None, use_reentrant=False)
            else:
                x = block(x, None, None)
        return self.final_norm(x)                                        # (B, 1+N, h)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The final-normed class token (B, h). LayerNorm acts on each token alone, so this is the
        class token of `tokens`."""
        return self.tokens(images)[:, 0]                                 # (B, h)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, num_classes)
