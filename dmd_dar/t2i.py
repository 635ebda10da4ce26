"""Text-to-image distillation: diffusers transformers as a DMD model family (see dmd_dar.families)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class T2IConfig:
    """Settings of a diffusers teacher (used when `family: diffusers`)."""

    model_class: str = "SD3Transformer2DModel"
    prompts: Optional[str] = None  # prompts file, one per line
    embeddings_cache: Optional[str] = None
    resolution: int = 1024
    route_text: bool = False
