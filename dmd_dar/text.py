"""Prompt-embedding cache: a prompts file (one prompt per line) -> `TextCondition` tensors in one safetensors file.

Text encoders of T2I teachers are large (T5-XXL, Qwen2.5-VL); distillation needs only their outputs. The cache
is computed once with the pipeline's own encoders (`pipeline_prompt_encoder(pipe)`) or any callable
`encode(list[str]) -> TextCondition`, written atomically, and reused while the prompts file is unchanged (the
SHA-256 of the prompt list is stored in the file's metadata).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from dmd_dar.checkpoint import atomic_write_bytes
from dmd_dar.errors import UserError
from dmd_dar.teachers import TextCondition

PromptEncoder = Callable[[list[str]], TextCondition]
_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "attention_mask")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} not found: pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts: write one prompt per line")
    return prompts


def prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


@dataclass
class PromptCache:
    """All cached prompts and their conditions; `cache[indices]` gives a batch `TextCondition`."""

    prompts: list[str]
    condition: TextCondition
    null: TextCondition | None = None  # the empty prompt's condition (CFG), batch 1

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index) -> TextCondition:
        return self.condition[index]


def encode_in_batches(prompts: Sequence[str], encode: PromptEncoder, batch_size: int = 16) -> TextCondition:
    parts = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            parts.append(encode(list(prompts[i : i + batch_size])).to("cpu"))
    out = parts[0]
    for part in parts[1:]:
        if part.prompt_embeds.shape[1:] != out.prompt_embeds.shape[1:]:
            raise UserError("the text encoder returned different sequence lengths per batch; pad to a fixed max_sequence_length")
        out = out.cat(part)
    return out


def build_prompt_cache(prompts_file: str | os.PathLike, cache_path: str | os.PathLike, encode: PromptEncoder,
                       batch_size: int = 16, null_prompt: str | None = "") -> PromptCache:
    """Load the cache at `cache_path` if it holds exactly the prompts of `prompts_file`; otherwise encode them
    (and the null prompt, when given) and write the cache atomically."""
    prompts = read_prompts(prompts_file)
    cache_path = Path(cache_path)
    digest = prompts_digest(prompts)
    if cache_path.is_file():
        cached = load_prompt_cache(cache_path)
        if prompts_digest(cached.prompts) == digest and (null_prompt is None or cached.null is not None):
            return cached
    condition = encode_in_batches(prompts, encode, batch_size)
    null = encode_in_batches([null_prompt], encode) if null_prompt is not None else None
    save_prompt_cache(cache_path, prompts, condition, null)
    return PromptCache(prompts, condition, null)


def save_prompt_cache(path: str | os.PathLike, prompts: Sequence[str], condition: TextCondition,
                      null: TextCondition | None = None) -> None:
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    for prefix, cond in (("", condition), ("null.", null)):
        if cond is None:
            continue
        for key in _KEYS:
            value = getattr(cond, key)
            if value is not None:
                tensors[prefix + key] = value.detach().cpu().contiguous()
    metadata = {"prompts": json.dumps(list(prompts)), "sha256": prompts_digest(prompts)}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_prompt_cache(path: str | os.PathLike) -> PromptCache:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt cache {path} not found: build it with dmd_dar.text.build_prompt_cache")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        prompts = json.loads(metadata["prompts"])
    except Exception as err:  # damaged file or not ours
        raise UserError(f"{path} is not a readable prompt cache ({err}); delete it to rebuild") from None

    def condition(prefix: str) -> TextCondition | None:
        if prefix + "prompt_embeds" not in tensors:
            return None
        return TextCondition(**{k: tensors.get(prefix + k) for k in _KEYS})

    return PromptCache(prompts, condition(""), condition("null."))


# ------------------------------------------------------------------------------------------ encoders
def pipeline_prompt_encoder(pipe, max_sequence_length: int | None = None, device=None) -> PromptEncoder:
    """`encode(prompts) -> TextCondition` with a diffusers pipeline's own text encoders (SD3, Flux, PixArt,
    Qwen-Image pipelines; CFG is done by us, so the pipeline's negative branch is switched off)."""
    name = type(pipe).__name__
    device = device or getattr(pipe, "_execution_device", None) or "cpu"
    extra = {"max_sequence_length": max_sequence_length} if max_sequence_length else {}

    def encode(prompts: list[str]) -> TextCondition:
        if name.startswith("StableDiffusion3"):
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                      do_classifier_free_guidance=False, **extra)
            return TextCondition(embeds, pooled)
        if name.startswith("Flux"):
            embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, **extra)
            return TextCondition(embeds, pooled)
        if name.startswith("PixArt"):
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device, **extra)
            return TextCondition(embeds, attention_mask=mask)
        if name.startswith("QwenImage"):
            embeds, mask = pipe.encode_prompt(prompts, device=device, **extra)
            return TextCondition(embeds, attention_mask=mask)
        raise UserError(f"no prompt encoder for {name}; supported pipelines: StableDiffusion3, Flux, PixArt, QwenImage")

    return encode


def transformers_prompt_encoder(tokenizer, text_encoder, max_length: int = 77, pooled: bool = True,
                                with_mask: bool = False, device=None) -> PromptEncoder:
    """`encode(prompts)` from a transformers tokenizer + encoder: last hidden state (+ pooler output for CLIP-like
    models, + the attention mask). For custom setups and tests; pipelines should use `pipeline_prompt_encoder`."""
    device = device or next(text_encoder.parameters()).device

    def encode(prompts: list[str]) -> TextCondition:
        tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        out = text_encoder(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))
        pooled_out = getattr(out, "pooler_output", None) if pooled else None
        return TextCondition(out.last_hidden_state, pooled_out, tokens["attention_mask"] if with_mask else None)

    return encode
