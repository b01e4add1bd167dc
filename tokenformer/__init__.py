"""TokenFormer: a Transformer whose every linear projection is attention over learnable parameter
tokens (Pattention), so that a trained model can grow by appending tokens.

The model here computes exactly what the official code computes and loads its released weights.
"""

from tokenformer.checkpoint import load_model
from tokenformer.data.prepare import load_prepared, prepare
from tokenformer.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from tokenformer.decode import Decoder
from tokenformer.errors import TokenFormerError
from tokenformer.generate import generate_batch, generate_caption, generate_text, generate_tokens
from tokenformer.models.captioner import Captioner, CaptionerConfig
from tokenformer.models.clip import CLIP_PRESETS, CLIPConfig, CLIPTokenFormer
from tokenformer.models.config import PRESETS, Config
from tokenformer.models.lm import KVCache, TokenFormer
from tokenformer.models.official import export_official, load_official, weight_map
from tokenformer.models.pattention import Pattention
from tokenformer.models.vision import VISION_PRESETS, VisionConfig, VisionTokenFormer
from tokenformer.scaling.freeze import freeze_old_tokens
from tokenformer.scaling.grow import grow, grow_optimizer_state, grow_pattention, old_slot_counts
from tokenformer.scaling.shrink import shrink, shrink_pattention, token_scores
from tokenformer.scaling.tune import add_tuning_tokens, load_adapter, load_adapters, merge_adapters, save_adapter

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ByteTokenizer", "Config", "Decoder", "KVCache", "Pattention", "TokenFormer", "TokenFormerError",
    "Tokenizer", "export_official", "generate_batch", "generate_text", "generate_tokens", "load_official",
    "load_tokenizer", "weight_map", "grow", "shrink", "grow_pattention", "shrink_pattention",
    "grow_optimizer_state", "freeze_old_tokens", "old_slot_counts", "token_scores",
    "prepare", "load_prepared", "load_model",
    "add_tuning_tokens", "save_adapter", "load_adapter", "load_adapters", "merge_adapters",
    "VISION_PRESETS", "VisionConfig", "VisionTokenFormer",
    "Captioner", "CaptionerConfig", "generate_caption", "CLIP_PRESETS", "CLIPConfig", "CLIPTokenFormer",
]
