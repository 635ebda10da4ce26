"""CLIP score of text-conditioned samples, with open-clip-torch.

Score = 100 * max(cos(image_embedding, text_embedding), 0), averaged over the (image, prompt) pairs: the
torchmetrics `CLIPScore` definition. Images come in as float NCHW in [-1, 1] and are resized and
normalised with the model's own preprocessing settings (size, resize mode, mean, std).

    scorer = CLIPScorer.from_pretrained("ViT-B-32", pretrained="/models/clip/open_clip_pytorch_model.bin")
    scorer.score(images, prompts)   # -> float in [0, 100]

Weights come from a local file, or from the Hugging Face hub by tag ("openai", "laion2b_s34b_b79k", ...)
for users with a network (open_clip caches them). Without weights, a UserError says how to provide them.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dmd_dar.errors import UserError
from dmd_dar.spectral import validate_images

WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.startswith(("~", ".")) or value.endswith(WEIGHT_SUFFIXES)


class CLIPScorer:
    """Embeds images and prompts with an open_clip model and scores their agreement."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, device: str | torch.device | None = None):
        import open_clip

        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.resize_mode: str = cfg.get("resize_mode", "shortest")
        self.interpolation: str = cfg.get("interpolation", "bicubic")
        self.mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(
        cls,
        model_name: str = "ViT-B-32",
        pretrained: str = "openai",
        *,
        device: str | torch.device = "cpu",
        cache_dir: str | None = None,
    ) -> CLIPScorer:
        """Build a scorer from open_clip weights: `pretrained` is a local weights file or a hub tag.

        `model_name` may also be "hf-hub:org/repo" or "local-dir:/path" (open_clip's schemas), in which
        case `pretrained` is ignored.
        """
        import open_clip

        schema = model_name.split(":", 1)[0] if model_name.startswith(("hf-hub:", "local-dir:")) else None
        if schema == "local-dir":
            folder = Path(model_name.split(":", 1)[1]).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise UserError(f"{folder}: not an open_clip model folder (no open_clip_config.json); "
                                "pass a folder saved from the hub, or model_name + pretrained=/path/to/weights")
        elif schema is None:
            if model_name not in open_clip.list_models():
                raise UserError(f"unknown open_clip model {model_name!r}; e.g. ViT-B-32, ViT-B-16, ViT-L-14 "
                                "(open_clip.list_models() lists all)")
            if not pretrained:
                raise UserError("pretrained is empty; pass a weights file path or a tag such as 'openai'")
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags:
                path = Path(pretrained).expanduser()
                if not path.is_file():
                    if _looks_like_path(pretrained):
                        raise UserError(f"CLIP weights file {pretrained} not found; pass pretrained= the path of an "
                                        f"existing open_clip {model_name} checkpoint (e.g. open_clip_pytorch_model.bin)")
                    raise UserError(f"unknown CLIP weights tag {pretrained!r} for {model_name}; pass a weights file "
                                    f"path or one of the tags {', '.join(tags[:6])}")
                pretrained = str(path)
        try:
            model = open_clip.create_model(
                model_name, pretrained=None if schema else pretrained, device=device, cache_dir=cache_dir,
                require_pretrained=True,
            )
            tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        except UserError:
            raise
        except Exception as err:
            raise UserError(_weights_unavailable_message(model_name, pretrained, schema, err)) from err
        return cls(model, tokenizer, device=device)

    # ----------------------------------------------------------------------------------------------

    def preprocess(self, images: Any) -> torch.Tensor:
        """Float NCHW [-1, 1] -> the model's input: resized, centre-cropped, normalised RGB."""
        x = validate_images(images).to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise UserError(f"CLIP score needs 1- or 3-channel images, got {x.shape[1]} channels")
        x = (x + 1.0) / 2.0
        target_h, target_w = self.image_size
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            resized = (target_h, target_w)
        else:  # "shortest" (the default): scale the shorter side to the target, then centre-crop
            scale = max(target_h / h, target_w / w)
            resized = (max(target_h, round(h * scale)), max(target_w, round(w * scale)))
        if resized != (h, w):
            mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
            x = F.interpolate(x, size=resized, mode=mode, align_corners=False, antialias=True).clamp(0, 1)
        top, left = (x.shape[-2] - target_h) // 2, (x.shape[-1] - target_w) // 2
        x = x[..., top : top + target_h, left : left + target_w]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def image_embeddings(self, images: Any) -> torch.Tensor:
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def cosine_similarities(self, images: Any, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Cosine similarity of each image with its own prompt: float tensor [N] on the CPU."""
        if isinstance(texts, str):
            raise UserError("texts must be a list with one prompt per image, got a single string")
        num_images = int(images.shape[0])
        if len(texts) != num_images:
            raise UserError(f"need one prompt per image: got {num_images} images and {len(texts)} prompts")
        out = []
        for start in range(0, num_images, batch_size):
            img = self.image_embeddings(images[start : start + batch_size])
            txt = self.text_embeddings(texts[start : start + batch_size])
            out.append((img * txt).sum(-1).cpu())
        return torch.cat(out)

    def scores(self, images: Any, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Per-pair CLIP scores 100 * max(cos, 0): float tensor [N]."""
        return 100.0 * self.cosine_similarities(images, texts, batch_size).clamp_min(0.0)

    def score(self, images: Any, texts: Sequence[str], batch_size: int = 64) -> float:
        """Mean CLIP score over the pairs, in [0, 100]."""
        return float(self.scores(images, texts, batch_size).mean())


def _weights_unavailable_message(model_name: str, pretrained: str | None, schema: str | None, err: Exception) -> str:
    import open_clip

    cause = " ".join(str(err).split())[:160]
    if schema is not None:
        return (f"cannot load CLIP model {model_name} ({type(err).__name__}: {cause}); without a network, save "
                "the hub folder on a machine that has one and pass model_name='local-dir:/path/to/folder'")
    if pretrained and Path(pretrained).is_file():
        return f"cannot load CLIP weights {pretrained} into {model_name} ({type(err).__name__}: {cause}); check it is an open_clip {model_name} checkpoint"
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained or "") or {}
    where = f"huggingface.co/{cfg['hf_hub'].rstrip('/')}" if cfg.get("hf_hub") else cfg.get("url", "the open_clip hub")
    return (f"CLIP weights {model_name}/{pretrained} are not available offline; download them on a machine with "
            f"a network (from {where}) and pass pretrained=/path/to/open_clip_pytorch_model.bin")
