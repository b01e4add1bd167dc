"""An open_clip-shaped CLIP with ordinary linear layers: the baseline beside the CLIP TokenFormer.

It takes the same `CLIPConfig` as `tokenformer.models.clip.CLIPTokenFormer` and reads from it what a
standard CLIP has: each tower's width, depth and heads, the image and patch size, the context length
and vocabulary, `embed_dim`, and the logit scale's init and clamp. The slot counts mean nothing here;
the MLPs are 4 x width, open_clip's `mlp_ratio`.

    image tower  `visual`: the ViT of the Fashion-MNIST experiment (experiments.vit): linear patch
                 embedding, class token, learned positions, pre-LN blocks (LayerNorm with weight and
                 bias, fused-qkv multi-head attention, GELU MLP), ln_post on the class token, then
                 its `head` h -> E without bias: the image projection
    text tower   token + learned position embeddings, the same blocks run causally, `ln_final`,
                 the token at `lengths - 1` (the end-of-text token; texts are right-padded), then
                 `text_projection` h -> E without bias
    logit_scale  a scalar in log space, initialised to `config.init_logit_scale` (log(1/0.07))

Two small departures from open_clip, both shared with the ViT baseline: the image tower has no
`ln_pre` before its blocks (the vision TokenFormer has none either) and its patch embedding has a
bias. The text tower is initialised as open_clip initialises its text Transformer; the image tower
keeps the ViT baseline's truncated-normal init.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from experiments.vit import ViT, ViTBlock
from tokenformer.errors import TokenFormerError
from tokenformer.models.clip import CLIPConfig
from tokenformer.models.pretrained import PretrainedModel

MLP_RATIO = 4  # open_clip's width of the MLP hidden layer, in units of the tower's width


class CLIPBaseline(PretrainedModel):
    """`model(images, ids, lengths)` -> (normalised image features (B, E), normalised text features
    (B, E), exp(logit_scale)): the interface of `CLIPTokenFormer`, so both train through `train` (train-clip)."""

    model_type = "clip_baseline"
    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        vision, text, E = config.vision, config.text, config.embed_dim
        # the ViT reads the MLP width from ffn_slot_num and its head width from num_classes
        self.visual = ViT(dataclasses.replace(vision, ffn_slot_num=MLP_RATIO * vision.hidden_size, num_classes=E))
        self.visual.head = nn.Linear(vision.hidden_size, E, bias=False)

        h = text.hidden_size
        text_blocks = dataclasses.replace(text, ffn_slot_num=MLP_RATIO * h)
        self.token_embedding = nn.Embedding(text.padded_vocab_size, h)  # the TokenFormer's padded vocabulary
        self.positional_embedding = nn.Parameter(torch.empty(text.seq_length, h))
        self.transformer = nn.ModuleList(ViTBlock(text_blocks, causal=True) for _ in range(text.num_layers))
        self.ln_final = nn.LayerNorm(h, eps=text.layernorm_epsilon)
        self.text_projection = nn.Linear(h, E, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        if self.logit_scale.device.type != "meta":  # from_pretrained builds on meta, then loads the weights
            self._init_open_clip()

    def _init_open_clip(self) -> None:
        """open_clip's init of the text Transformer (residual outputs scaled down by sqrt(2 layers))
        and of both projections (std width^-0.5)."""
        h, layers = self.config.text.hidden_size, self.config.text.num_layers
        nn.init.normal_(self.visual.head.weight, std=self.config.vision.hidden_size ** -0.5)
        attention_std, output_std, fc_std = h ** -0.5, h ** -0.5 * (2 * layers) ** -0.5, (2 * h) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer:
            for layer, std in ((block.qkv, attention_std), (block.proj, output_std),
                               (block.fc1, fc_std), (block.fc2, output_std)):
                nn.init.normal_(layer.weight, std=std)
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.text_projection.weight, std=h ** -0.5)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float -> (B, E), not normalised."""
        vision = self.config.vision
        if tuple(images.shape[1:]) != (vision.num_channels, vision.image_size, vision.image_size):
            raise TokenFormerError(
                f"images of shape (C, H, W) = {tuple(images.shape[1:])} do not fit this model, which takes "
                f"{(vision.num_channels, vision.image_size, vision.image_size)}: resize/crop them")
        return self.visual(images)

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, L) long, right-padded, lengths (B,) -> (B, E), not normalised: the final-normed
        token at `lengths - 1`, which causal attention lets see the whole caption and no padding."""
        B, L = ids.shape
        if L > self.config.text.seq_length:
            raise TokenFormerError(f"texts of {L} tokens exceed the context length {self.config.text.seq_length}: "
                                   f"tokenize them with context_length={self.config.text.seq_length}")
        x = self.token_embedding(ids) + self.positional_embedding[:L]        # (B, L, h)
        for block in self.transformer:
            x = block(x)
        pooled = self.ln_final(x[torch.arange(B, device=ids.device), lengths - 1])  # (B, h)
        return self.text_projection(pooled)                                  # (B, E)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(ids, lengths), dim=-1)
        return image_features, text_features, self.logit_scale.exp()


def num_parameters_by_hand(config: CLIPConfig) -> int:
    """The baseline's parameter count from the shapes alone (for the test and the report):
    per block 2 LayerNorms (4h), qkv and proj (4h^2 + 4h), the MLP (2 r h^2 + r h + h)."""
    def blocks(h: int, layers: int) -> int:
        r = MLP_RATIO
        return layers * (4 * h + 4 * h * h + 4 * h + 2 * r * h * h + r * h + h)

    v, t, E = config.vision, config.text, config.embed_dim
    image = (v.patch_dim * v.hidden_size + v.hidden_size) + v.hidden_size + (1 + v.num_patches) * v.hidden_size \
        + blocks(v.hidden_size, v.num_layers) + 2 * v.hidden_size + v.hidden_size * E
    text = t.padded_vocab_size * t.hidden_size + t.seq_length * t.hidden_size + blocks(t.hidden_size, t.num_layers) \
        + 2 * t.hidden_size + t.hidden_size * E
    return image + text + 1

