"""TokenFormer in Hugging Face transformers: `TokenFormerConfig`, `TokenFormerModel`,
`TokenFormerForCausalLM` and `TokenFormerForSequenceClassification`, registered with `AutoConfig`,
`AutoModel`, `AutoModelForCausalLM` and `AutoModelForSequenceClassification` on import, and
`save_hf_directory`, the directory `tokenformer convert SRC OUT --format hf` writes.

    import tokenformer.hf  # registers model_type "tokenformer"
    model = AutoModelForCausalLM.from_pretrained(OUT)

A directory written here also loads with `trust_remote_code=True` without this import, wherever
tokenformer is installed (its `auto_map` names a small modeling file that imports this package).
Needs the `hf` extra: pip install "tokenformer[hf]". Nothing else in the package imports this one.
"""

from __future__ import annotations

from tokenformer.errors import TokenFormerError

# The oldest release CI proves (constraints.txt; `make test-newest` proves the newest): the extra's bound.
MIN_TRANSFORMERS = "5.23.0"


def require_transformers(version: str | None = None) -> None:
    """Check that transformers is installed and new enough (its `version`: the installed one), or
    explain in one sentence what to install."""
    if version is None:
        try:
            import transformers
        except ImportError as e:
            if e.name == "transformers":
                raise TokenFormerError('the transformers integration needs the "hf" extra: '
                                       'pip install "tokenformer[hf]"') from None
            raise TokenFormerError(f"transformers is installed but does not import ({e}): "
                                   f'reinstall it with pip install "tokenformer[hf]"') from None
        version = transformers.__version__
    from packaging.version import Version

    if Version(version) < Version(MIN_TRANSFORMERS):
        raise TokenFormerError(f"transformers {version} is too old for tokenformer.hf, which needs "
                               f"{MIN_TRANSFORMERS} or newer: pip install \"tokenformer[hf]\"")


require_transformers()

from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM,  # noqa: E402
                          AutoModelForSequenceClassification)

from tokenformer.hf.config import AUTO_MAP, MODELING_FILE, TokenFormerConfig  # noqa: E402
from tokenformer.hf.export import save_hf_directory, to_hf  # noqa: E402
from tokenformer.hf.modeling import (TokenFormerForCausalLM, TokenFormerForSequenceClassification,  # noqa: E402
                                     TokenFormerModel)

AutoConfig.register(TokenFormerConfig.model_type, TokenFormerConfig, exist_ok=True)
AutoModel.register(TokenFormerConfig, TokenFormerModel, exist_ok=True)
AutoModelForCausalLM.register(TokenFormerConfig, TokenFormerForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(TokenFormerConfig, TokenFormerForSequenceClassification, exist_ok=True)

__all__ = ["AUTO_MAP", "MIN_TRANSFORMERS", "MODELING_FILE", "TokenFormerConfig", "TokenFormerForCausalLM",
           "TokenFormerForSequenceClassification", "TokenFormerModel", "require_transformers", "save_hf_directory",
           "to_hf"]
