"""A standard ViT with ordinary linear layers: the baseline beside the vision TokenFormer.

Same interface and shapes as `tokenformer.VisionTokenFormer` (it takes the same `VisionConfig`):
linear patch embedding, class token, learned position embeddings, pre-LN blocks (LayerNorm with
weight and bias, multi-head self-attention with a fused qkv linear, an MLP of `ffn_slot_num`
hidden units with GELU), final LayerNorm and a linear head. The slot counts of the config other
than `ffn_slot_num` mean nothing here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenformer.models.pretrained import PretrainedModel
from tokenformer.models.vision import VisionConfig


class ViTBlock(nn.Module):
    """A pre-LN Transformer block; `causal` masks the future (the CLIP baseline's text tower).
    `config` needs only hidden_size, num_attention_heads, ffn_slot_num and layernorm_epsilon."""

    def __init__(self, config: VisionConfig, causal: bool = False) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.causal = causal
        self.norm1 = nn.LayerNorm(h, eps=config.layernorm_epsilon)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.norm2 = nn.LayerNorm(h, eps=config.layernorm_epsilon)
        self.fc1 = nn.Linear(h, config.ffn_slot_num)
        self.fc2 = nn.Linear(config.ffn_slot_num, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        H = self.num_heads
        qkv = self.qkv(self.norm1(x)).view(B, T, 3, H, h // H).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=self.causal)  # (B, H, T, D)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, h))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(PretrainedModel):
    """`model(images)` (B, C, H, W) -> logits (B, num_classes)."""

    model_type = "vit"
    config_class = VisionConfig

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.patch_embed = nn.Linear(config.patch_dim, h)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, h))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + config.num_patches, h))
        self.layers = nn.ModuleList(ViTBlock(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(h, eps=config.layernorm_epsilon)
        self.head = nn.Linear(h, config.num_classes)
        if self.cls_token.device.type != "meta":  # from_pretrained builds on meta, then loads the weights
            self._init_weights()

    def _init_weights(self) -> None:
        """The usual ViT init: truncated normal 0.02, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        B = images.shape[0]
        p, g = c.patch_size, c.image_size // c.patch_size
        patches = images.view(B, c.num_channels, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # (B, gy, gx, py, px, C)
        x = self.patch_embed(patches.reshape(B, g * g, c.patch_dim))                     # (B, N, h)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.position_embeddings  # (B, 1+N, h)
        for block in self.layers:
            x = block(x)
        return self.head(self.final_norm(x[:, 0]))  # (B, num_classes)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
