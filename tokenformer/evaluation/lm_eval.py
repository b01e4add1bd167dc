"""TokenFormer as a model of lm-evaluation-harness, registered under the name `tokenformer`.

lm-eval 0.4.x finds models only in its own registry: it has no plugin or entry-point discovery
for models, so `lm_eval --model tokenformer` works only once this module has been imported. The
`tokenformer-lm-eval` command (and `python -m tokenformer.evaluation.lm_eval`) imports it and then
runs lm-eval's own command line with the same arguments:

    tokenformer-lm-eval --model tokenformer \\
        --model_args pretrained=CHECKPOINT_DIR,dtype=float32,batch_size=8 --tasks lambada_openai

The scoring follows the official adapter (GPT-NeoX's harness adapter): the context is cut on the
left to the model's length (the last `max_length + 1` tokens of context + continuation are kept),
batches are right-padded, log-softmax runs over the padded vocabulary, requests run longest first
and come back in request order.

lm-eval's own `hf` model gives the same scores on a directory written by `tokenformer convert SRC
OUT --format hf` (`lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True`, the
recommended route: see docs/transformers.md). This adapter stays for what that route does not do:
it reads this package's checkpoint directories as they are (every training checkpoint, no
conversion, no transformers), takes a loaded `TokenFormer` object, and runs `tokenformer evaluate`.

Needs the `eval` extra: pip install "tokenformer[eval]".
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

from tokenformer.console import progress_bar
from tokenformer.data.tokenizer import check_vocab_fits, load_tokenizer
from tokenformer.errors import TokenFormerError
from tokenformer.evaluation.scoring import score_windows
from tokenformer.generate import generate_tokens
from tokenformer.models.lm import TokenFormer


def require_lm_eval():
    """Import lm-eval, or explain in one sentence how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise TokenFormerError(
            'lm-evaluation-harness is not installed: pip install "tokenformer[eval]"') from None
    return lm_eval


try:
    lm_eval = require_lm_eval()
except TokenFormerError as e:
    if __name__ != "__main__":
        raise
    sys.exit(f"python -m tokenformer.evaluation.lm_eval: error: {e}")  # one line, not a traceback

import lm_eval.models  # noqa: E402,F811  (registers lm-eval's own models first: see `main`)
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


@register_model("tokenformer")
class TokenFormerLM(TemplateLM):
    """lm-eval model arguments: `pretrained` (a checkpoint directory, or a loaded `TokenFormer`),
    `dtype` (float32, bfloat16, float16; default float32), `batch_size`, `device` (default cpu),
    `max_length` (default: the model's seq_length), `tokenizer` (default: the checkpoint's
    tokenizer.json). A model object stays on its device and in its dtype unless these are given."""

    def __init__(self, pretrained=None, dtype: str | None = None, batch_size: int | str = 8,
                 device: str | None = None, max_length: int | str | None = None, tokenizer=None,
                 max_batch_size: int | None = None, **unknown) -> None:
        # max_batch_size: lm-eval's command line passes it for batch_size=auto; unused here.
        super().__init__()
        if unknown:
            raise TokenFormerError(
                f"unknown model_args {', '.join(sorted(unknown))}: the tokenformer model takes "
                f"pretrained, dtype, batch_size, device, max_length and tokenizer")
        if pretrained is None:
            raise TokenFormerError("the tokenformer model needs model_args pretrained=CHECKPOINT_DIR")

        if isinstance(pretrained, TokenFormer):  # used where it is, as it is, unless told otherwise
            model = pretrained if device is None else pretrained.to(_usable_device(device))
            model = model if dtype is None else model.to(_torch_dtype(dtype))
        else:
            model = TokenFormer.from_pretrained(pretrained, device=_usable_device(device),
                                                dtype=_torch_dtype(dtype or "float32"))
        self.model = model.eval()
        if tokenizer is None:
            if isinstance(pretrained, TokenFormer):
                raise TokenFormerError("a model given as an object needs its tokenizer: pass tokenizer=")
            tokenizer = pretrained
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        check_vocab_fits(self.tokenizer.vocab_size, self.model.config.padded_vocab_size,
                         fix="they do not belong together")
        self.batch_size = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length is not None else self.model.config.seq_length
        if not 1 <= self._max_length <= self.model.config.seq_length:
            raise TokenFormerError(
                f"max_length must be between 1 and the model's seq_length {self.model.config.seq_length}, "
                f"got {self._max_length}")
        self._device = model.word_embeddings.weight.device
        self.pretrained_name = str(pretrained) if not isinstance(pretrained, TokenFormer) else "TokenFormer"

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "TokenFormerLM":
        # lm-eval's command line always passes its own --batch_size (default 1) and --device
        # (default cuda:0) beside --model_args; lm-eval would then see batch_size twice and fail.
        # What the user wrote in --model_args wins.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        for key in extra.keys() & arg_dict.keys():
            if str(extra[key]) != str(arg_dict[key]):
                log.warning("%s=%s from --model_args overrides --%s %s", key, arg_dict[key], key, extra[key])
        return cls(**(extra | dict(arg_dict)))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "TokenFormerLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---- what TemplateLM asks for ---------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # GPT-NeoX adds no special tokens (no BOS): `add_special_tokens` changes nothing.
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: `((context, continuation), context_ids, continuation_ids)` each."""
        windows = [(context_ids, continuation_ids) for _, context_ids, continuation_ids in requests]
        results = score_windows(self.model, windows, self.batch_size, self.max_length,
                                progress=None if disable_tqdm else "loglikelihood")
        for (request, _, _), result in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, each after an end-of-text token, in disjoint windows of
        `max_length` predictions whose last one still has a full context (lm-eval's rolling windows)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in get_rolling_token_windows(self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(index)
        scores = score_windows(self.model, windows, self.batch_size, self.max_length,
                               progress=None if disable_tqdm else "loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for index, (score, _) in zip(owner, scores):
            totals[index] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with `do_sample`/`temperature`) continuations with the KV cache, one
        request at a time, stopped at the first `until` string (cut off), end-of-text, or `max_gen_toks`."""
        encoded = [self.tok_encode(context) for context, _ in (r.args for r in requests)]
        order = sorted(range(len(requests)), key=lambda i: (-len(encoded[i]), i))  # longest first
        outputs: list[str | None] = [None] * len(requests)
        bar = progress_bar(len(order), desc="generate_until", unit="request", enabled=not disable_tqdm)
        for i in order:
            bar.update(1)
            context, options = requests[i].args
            options = dict(options or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eot = self.tok_decode([self.eot_token_id])
            if eot not in until:
                until.append(eot)
            max_new = int(options.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            max_new = max(1, min(max_new, self.max_length - 1))
            sampling = {}
            if options.pop("do_sample", False):
                sampling = dict(temperature=float(options.pop("temperature", 1.0)),
                                top_k=options.pop("top_k", None), top_p=options.pop("top_p", None))
            prompt = encoded[i][-(self.max_length - max_new):] or [self.eot_token_id]
            new: list[int] = []
            text = ""
            for token in generate_tokens(self.model, prompt, max_new, eos_id=self.eot_token_id,
                                         vocab_size=self.tokenizer.vocab_size, **sampling):
                new.append(token)
                text = self.tok_decode(new)
                if any(stop in text for stop in until):
                    break
            text = self.tok_decode(new)
            for stop in until:
                text = text.split(stop)[0]
            outputs[i] = text
            self.cache_hook.add_partial("generate_until", (context, requests[i].args[1]), text)
        bar.close()
        return outputs  # type: ignore[return-value]

    def get_model_info(self) -> dict:
        config = self.model.config
        return dict(model_name=self.pretrained_name, model_num_parameters=self.model.num_parameters(),
                    model_dtype=str(self.model.word_embeddings.weight.dtype), max_length=self.max_length,
                    num_layers=config.num_layers, hidden_size=config.hidden_size)


def task_manager(tasks: Sequence[str], include_path: Sequence[str | Path] = (), builtin_tasks: bool = True):
    """lm-eval's `TaskManager` over its own tasks and the `include_path` folders, after checking
    that every folder exists and every task is known.

    `builtin_tasks=False` skips indexing lm-eval's own task tree (about 10 s), for runs that use
    only local tasks.
    """
    from lm_eval.tasks import TaskManager

    for folder in include_path:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"task folder {folder} (--include-path) does not exist")
    manager = TaskManager(include_path=[str(p) for p in include_path] or None, include_defaults=builtin_tasks)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = "in lm-eval or --include-path" if builtin_tasks else "in --include-path"
        raise TokenFormerError(
            f"unknown task {', '.join(unknown)}: there is no task of that name {where} "
            f"(`lm_eval ls tasks` lists lm-eval's own)")
    return manager


def run_tasks(lm, tasks: Sequence[str], manager, limit: int | float | None = None,
              num_fewshot: int = 0) -> dict:
    """Run lm-eval `tasks` (from `manager`, see `task_manager`) on an adapter `lm` (a
    `TokenFormerLM`); lm-eval's results dict, without per-sample logs."""
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                           task_manager=manager, log_samples=False, bootstrap_iters=0)


def _usable_device(device: str | None) -> str:
    # lm-eval's command line defaults to cuda:0 even on machines without a GPU.
    device = device or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: running on cpu", device)
        return "cpu"
    return device


def _torch_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.float32}
    if str(name) not in names:
        raise TokenFormerError(f"unknown dtype {name!r}: use float32, bfloat16 or float16")
    return names[str(name)]


def _batch_size(value) -> int:
    if str(value).startswith("auto"):
        log.warning("batch_size=auto is not supported by the tokenformer model: using 8")
        return 8
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise TokenFormerError(f"batch_size must be a positive integer, got {value!r}") from None
    if size < 1:
        raise TokenFormerError(f"batch_size must be a positive integer, got {value!r}")
    return size


def main(argv: list[str] | None = None) -> None:
    """`tokenformer-lm-eval`: lm-eval's own command line, with the `tokenformer` model registered.

    This module has registered `TokenFormerLM` on import (and imported `lm_eval.models` first, as
    lm-eval's registry only fills itself with its own models when it is empty).
    """
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:  # lm-eval's parser reads sys.argv itself
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
