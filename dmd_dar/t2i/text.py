"""Text conditioning of text-to-image teachers: `TextCondition`, prompt files, the prompt-embedding cache, encoders.

Text encoders of T2I teachers are large (T5-XXL, Qwen2.5-VL); distillation needs only their outputs. The cache
is computed once with the pipeline's own encoders (`pipeline_prompt_encoder(pipe)`) or any callable
`encode(list[str]) -> TextCondition`, written atomically, and reused while the prompts file is unchanged (the
SHA-256 of the prompt list is stored in the file's metadata).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dmd_dar.checkpoint import atomic_write_bytes
from dmd_dar.errors import UserError

_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "attention_mask")


# ------------------------------------------------------------------------------------------ conditions
@dataclass
class TextCondition:
    """Text conditioning of a T2I teacher, batch first.

    prompt_embeds: [B, T, D] token embeddings (T5 / CLIP / Qwen2.5-VL hidden states).
    pooled_prompt_embeds: [B, P] pooled embedding (SD3, Flux), else None.
    attention_mask: [B, T] 1 = token, 0 = padding (PixArt, Qwen-Image), else None.
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor | None = None
    attention_mask: Tensor | None = None

    def __post_init__(self):
        if self.prompt_embeds.ndim != 3:
            raise ValueError(f"prompt_embeds must be [B, T, D], got shape {list(self.prompt_embeds.shape)}")
        b = self.prompt_embeds.shape[0]
        for name in ("pooled_prompt_embeds", "attention_mask"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != b:
                raise ValueError(f"{name} has batch {value.shape[0]}, prompt_embeds has {b}")

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    def _map(self, fn) -> TextCondition:
        return TextCondition(**{f.name: (None if getattr(self, f.name) is None else fn(f.name, getattr(self, f.name)))
                                for f in dataclasses.fields(self)})

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextCondition:
        """Move to a device; `dtype` applies to the embeddings only (the mask keeps its dtype)."""
        return self._map(lambda name, v: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point() and name != "attention_mask") else None))

    def __getitem__(self, index) -> TextCondition:
        return self._map(lambda name, v: v[index])

    def expand(self, batch_size: int) -> TextCondition:
        """A batch-1 condition (e.g. the empty prompt) repeated to `batch_size`."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot expand a batch of {self.batch_size} conditions to {batch_size}")
        return self._map(lambda name, v: v.expand(batch_size, *v.shape[1:]))

    @classmethod
    def concat(cls, conditions: Sequence[TextCondition]) -> TextCondition:
        """The conditions one after the other along the batch. Sequence lengths must agree (encode all with
        the same max length); a mask present on some only is completed with ones (every token real)."""
        first = conditions[0]
        for c in conditions[1:]:
            if c.prompt_embeds.shape[1:] != first.prompt_embeds.shape[1:]:
                raise ValueError(f"prompt_embeds {list(c.prompt_embeds.shape)} do not match {list(first.prompt_embeds.shape)}: "
                                 "encode all prompts (the null prompt too) with the same max_sequence_length")
        if len({c.pooled_prompt_embeds is None for c in conditions}) > 1:
            raise ValueError("pooled_prompt_embeds is set on some conditions only")
        mask = None
        if any(c.attention_mask is not None for c in conditions):
            dtype = first.attention_mask.dtype if first.attention_mask is not None else torch.long
            mask = torch.cat([c.attention_mask.to(dtype) if c.attention_mask is not None
                              else torch.ones(c.prompt_embeds.shape[:2], dtype=dtype, device=c.prompt_embeds.device)
                              for c in conditions])
        pooled = None if first.pooled_prompt_embeds is None else torch.cat([c.pooled_prompt_embeds for c in conditions])
        return cls(torch.cat([c.prompt_embeds for c in conditions]), pooled, mask)

    def cat(self, other: TextCondition) -> TextCondition:
        """[self; other] along the batch, CFG's batch doubling (conditional first, null second): a batch-1
        `other` is expanded to this batch first. Otherwise as `concat`."""
        return TextCondition.concat([self, other.expand(self.batch_size) if other.batch_size == 1 else other])

    def to_dict(self) -> dict[str, Tensor | None]:
        """A plain dict (what `dmd_dar.diffusion.concat_cond` batches); `from_dict` / the adapters accept it back."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextCondition:
        return cls(**data)


def as_text_condition(cond: Any) -> TextCondition:
    if isinstance(cond, TextCondition):
        return cond
    if isinstance(cond, dict):
        return TextCondition.from_dict(cond)
    if isinstance(cond, Tensor):
        return TextCondition(prompt_embeds=cond)
    raise TypeError(f"a text teacher needs a TextCondition (or its to_dict()), got {type(cond).__name__}")


PromptEncoder = Callable[[list[str]], TextCondition]


# ------------------------------------------------------------------------------------------ prompt files and cache
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
    if any(part.prompt_embeds.shape[1:] != parts[0].prompt_embeds.shape[1:] for part in parts):
        raise UserError("the text encoder returned different sequence lengths per batch; pad to a fixed max_sequence_length")
    return TextCondition.concat(parts)


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
        raise UserError(f"prompt cache {path} not found: build it with dmd_dar.t2i.build_prompt_cache")
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


def fixed_length(encode: PromptEncoder, length: int | None) -> PromptEncoder:
    """Pad (zeros, mask 0) every encoded batch to `length` tokens. Qwen-Image's encoder returns each batch at
    its own longest prompt (and drops an all-ones mask); the cache and CFG need one length for all prompts.
    Only for models that read the mask (Qwen-Image): padding is invisible to them."""

    def encode_fixed(prompts: list[str]) -> TextCondition:
        cond = encode(prompts)
        n = cond.prompt_embeds.shape[1]
        if length is None or n == length:
            return cond
        if n > length:
            mask = cond.attention_mask[:, :length] if cond.attention_mask is not None else None
            return TextCondition(cond.prompt_embeds[:, :length], cond.pooled_prompt_embeds, mask)
        mask = cond.attention_mask
        if mask is None:
            mask = torch.ones(cond.prompt_embeds.shape[:2], dtype=torch.long, device=cond.prompt_embeds.device)
        embeds = F.pad(cond.prompt_embeds, (0, 0, 0, length - n))
        return TextCondition(embeds, cond.pooled_prompt_embeds, F.pad(mask, (0, length - n)))

    return encode_fixed
