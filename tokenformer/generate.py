"""Text generation with the KV cache: greedy or sampled (temperature, top-k, top-p), streaming; and
batches of prompts of different lengths, left-padded under an attention mask.

The prompt is run once (prefill); each new token then costs one position (decode). One prompt can
go on past the model's context: the window slides (`generate_tokens`).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from tokenformer.errors import TokenFormerError


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V); temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(model, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None,
                    eos_id: int | None = None, seed: int | None = None,
                    vocab_size: int | None = None, slide: int | None = None) -> Iterator[int]:
    """Yield new token ids one by one (stops after `max_new_tokens` or at `eos_id`, not yielded).

    `vocab_size` masks the padding rows of the embedding so that only real tokens are produced.
    Generation goes on past the model's context (`seq_length`) by sliding the window, as nanoGPT
    crops to its block: when the window is full, its oldest `slide` tokens are dropped and the kept
    tail is encoded again from position 0 (the cached keys carry their old positions, so the cache
    cannot simply shift). `slide=1` is nanoGPT exactly (every token sees the last `seq_length`
    tokens, at the cost of a re-encode per token); the default, a quarter of the context, re-encodes
    once every `seq_length // 4` tokens and every token still sees at least three quarters of it.
    A prompt longer than the context keeps its last `seq_length` tokens.
    """
    if not prompt:
        raise TokenFormerError("the prompt is empty: give at least one token")
    context = model.config.seq_length
    slide = max(1, context // 4) if slide is None else slide
    if not 1 <= slide <= context:
        raise TokenFormerError(f"slide {slide} must be between 1 and the model's context {context}")
    window = list(prompt[-context:])
    device = model.word_embeddings.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = model.allocate_cache(1, min(len(window) + max_new_tokens, context))
    logits = model(torch.tensor([window], device=device), cache=cache, last_only=True)[:, -1]  # (1, V)
    for step in range(max_new_tokens):
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (1,)
        token_id = int(token.item())
        if eos_id is not None and token_id == eos_id:
            return
        yield token_id
        if step + 1 == max_new_tokens:  # the last token needs no forward pass of its own
            return
        window.append(token_id)
        if len(window) <= context:
            logits = model(token[:, None], cache=cache)[:, -1]
        else:  # the window is full: drop its oldest tokens, encode the kept tail afresh
            window = window[slide:]
            cache.length = 0
            logits = model(torch.tensor([window], device=device), cache=cache, last_only=True)[:, -1]


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                   seed: int | None = None, vocab_size: int | None = None, pad_id: int = 0) -> list[list[int]]:
    """New token ids for every prompt, generated together: each list stops after `max_new_tokens` or
    before `eos_id`, and equals what `generate_tokens` gives that prompt alone (greedy; sampling draws
    from one generator for the whole batch, so it is reproducible with `seed` but not row by row).

    The prompts are left-padded with `pad_id` to the longest; the attention mask keeps every row from
    reading padding, and each row's rotary positions count from its own first token.
    """
    if not prompts or any(not prompt for prompt in prompts):
        raise TokenFormerError("every prompt needs at least one token (and the batch at least one prompt)")
    config = model.config
    if max_new_tokens >= config.seq_length:  # rows of one batch would slide at different steps
        raise TokenFormerError(
            f"a batch of prompts does not slide the window: max_new_tokens {max_new_tokens} must be below the "
            f"model's context {config.seq_length} (generate_tokens, one prompt at a time, goes on past it)")
    prompts = [list(p[-(config.seq_length - max_new_tokens):]) for p in prompts]  # keep the end of long prompts
    device = model.word_embeddings.weight.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)  # (B, P)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)  # (B, P)
    positions = mask.sum(dim=1, keepdim=True)  # (B, 1): the position of each row's next token
    cache = model.allocate_cache(len(prompts), width + max_new_tokens)
    logits = model(ids, cache=cache, last_only=True, attention_mask=mask)[:, -1]  # (B, V)
    new: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_id is not None:
            done |= token == eos_id
        for row, (token_id, finished) in enumerate(zip(token.tolist(), done.tolist())):
            if not finished:  # a finished row gets nothing more (its end-of-text token neither)
                new[row].append(token_id)
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, P + step + 1)
        logits = model(token[:, None], cache=cache, attention_mask=mask, position_ids=positions)[:, -1]
        positions = positions + 1
    return new


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 100,
                  on_text: Callable[[str], None] | None = None, **sampling) -> str:
    """Continue `prompt`; `on_text` receives each newly decodable piece (for streaming)."""
    ids = tokenizer.encode(prompt)
    new: list[int] = []
    printed = ""
    for token in generate_tokens(model, ids, max_new_tokens, eos_id=tokenizer.eos_id,
                                 vocab_size=tokenizer.vocab_size, **sampling):
        new.append(token)
        if on_text is not None:
            text = tokenizer.decode(new)
            # Hold back a trailing partial UTF-8 character until its remaining bytes arrive.
            if not text.endswith("\ufffd"):
                on_text(text[len(printed):])
                printed = text
    text = tokenizer.decode(new)
    if on_text is not None and len(text) > len(printed):
        on_text(text[len(printed):])
    return text


@torch.no_grad()
def generate_caption(model, tokenizer, images: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> list[str]:
    """One caption per image of `images` (B, C, H, W), already normalised as the captioner was trained
    (`tokenformer.models.captioner`): all images share the prefix length, so the batch needs no padding.
    The prefill runs the image prefix and the opening end-of-text token; each row stops at its
    end-of-text token (not part of the caption) or after `max_new_tokens`."""
    if max_new_tokens < 1:
        raise TokenFormerError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    room = model.config.caption_room
    if max_new_tokens > room:
        raise TokenFormerError(f"max_new_tokens {max_new_tokens} does not fit the language model's seq_length "
                               f"after the image prefix: give at most {room}")
    device = model.lm.word_embeddings.weight.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    images = images.to(device=device, dtype=model.lm.word_embeddings.weight.dtype)
    batch = images.shape[0]
    cache = model.allocate_cache(batch, 1 + max_new_tokens)
    bos = torch.full((batch, 1), tokenizer.eos_id, dtype=torch.long, device=device)  # (B, 1)
    logits = model(images, bos, cache=cache, last_only=True)[:, -1]  # (B, V)
    new: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits[:, tokenizer.vocab_size:] = float("-inf")  # the embedding's padding rows are no tokens
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        done |= token == tokenizer.eos_id
        for row, (token_id, finished) in enumerate(zip(token.tolist(), done.tolist())):
            if not finished:
                new[row].append(token_id)
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        logits = model(None, token[:, None], cache=cache)[:, -1]
    return [tokenizer.decode(ids) for ids in new]
