"""The one registry of supported diffusers transformer architectures: what every check and adapter reads.

Each architecture is a frozen record: its short name (`arch`), the diffusers class, the parameterisations its
checkpoints use (`prediction`), how its latents are laid out and how it is conditioned. Nothing here imports
diffusers (class names only), so the registry costs nothing to import; `Architecture.diffusers_class()` resolves
the class when a model is really built.
"""
from __future__ import annotations

from dataclasses import dataclass

from dmd_dar.errors import UserError

# Parameterisations of a model's output (the x0 adapter converts each to x0, dmd_dar.t2i.adapters).
FLOW = "flow"  # velocity v = eps - x0 on the flow-matching path (SD3, Flux, Qwen-Image)
VP_EPS = "vp_eps"  # variance-preserving DDPM, eps prediction (DiT, PixArt)
VP_V = "vp_v"  # variance-preserving, v prediction
PREDICTIONS = (FLOW, VP_EPS, VP_V)

TEXT, CLASS_LABELS = "text", "class_labels"  # what conditions an architecture


@dataclass(frozen=True)
class Architecture:
    """One supported diffusers transformer architecture."""

    name: str  # our short name, e.g. "sd3" (the `arch` argument of the loaders)
    class_name: str  # the diffusers transformer class
    predictions: tuple[str, ...]  # parameterisations its checkpoints use; the first is the default
    conditioning: str  # TEXT (prompt embeddings) or CLASS_LABELS
    packed_latents: bool = False  # the pipeline packs 2x2 latent patches into tokens (4C channels)
    text_stream: bool = False  # MM-DiT: a text stream of its own, routable with convert_to_dar(route_text=True)
    pooled_text: bool = False  # takes a pooled prompt embedding
    text_mask: bool = False  # reads the prompt attention mask
    guidance_embedding: bool = False  # guidance-distilled checkpoints (config guidance_embeds) embed the guidance scale
    padded_prompts: bool = True  # its pipeline's encode_prompt pads every batch to one length (Qwen-Image's does not)
    vae_class_name: str = "AutoencoderKL"  # the VAE of its pipelines

    @property
    def prediction(self) -> str:
        """The default parameterisation."""
        return self.predictions[0]

    @property
    def is_flow(self) -> bool:
        return self.prediction == FLOW

    @property
    def text_to_image(self) -> bool:
        return self.conditioning == TEXT

    def diffusers_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.class_name)

    def vae_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.vae_class_name)


ARCHITECTURES = (
    Architecture("sd3", "SD3Transformer2DModel", (FLOW,), TEXT, text_stream=True, pooled_text=True),
    Architecture("flux", "FluxTransformer2DModel", (FLOW,), TEXT, packed_latents=True, text_stream=True, pooled_text=True,
                 guidance_embedding=True),
    Architecture("qwen_image", "QwenImageTransformer2DModel", (FLOW,), TEXT, packed_latents=True, text_stream=True,
                 text_mask=True, padded_prompts=False, vae_class_name="AutoencoderKLQwenImage"),
    Architecture("pixart", "PixArtTransformer2DModel", (VP_EPS, VP_V), TEXT, text_mask=True),
    Architecture("dit", "DiTTransformer2DModel", (VP_EPS, VP_V), CLASS_LABELS),
)
CLASS_NAMES = tuple(a.class_name for a in ARCHITECTURES)
TEXT_TO_IMAGE = tuple(a for a in ARCHITECTURES if a.text_to_image)
TEXT_TO_IMAGE_CLASS_NAMES = tuple(a.class_name for a in TEXT_TO_IMAGE)

_BY_NAME = {a.name: a for a in ARCHITECTURES}
_BY_CLASS_NAME = {a.class_name: a for a in ARCHITECTURES}


def architecture(name: str) -> Architecture:
    """The architecture of short name `name` ("sd3", "flux", "qwen_image", "pixart", "dit")."""
    if name not in _BY_NAME:
        raise UserError(f"arch={name!r} is unknown; use one of {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def architecture_of_class(class_name: str) -> Architecture:
    """The architecture of the diffusers class named `class_name`."""
    if class_name not in _BY_CLASS_NAME:
        raise UserError(f"{class_name} is not a supported diffusers transformer; supported: {', '.join(CLASS_NAMES)}")
    return _BY_CLASS_NAME[class_name]


def architecture_of(model: object) -> Architecture:
    """The architecture of a stock or DAR-converted diffusers model: a converted model's class subclasses its
    stock class (dmd_dar.models.diffusers_dar), so the first registered class in its MRO is the stock one."""
    for cls in type(model).__mro__:
        if cls.__name__ in _BY_CLASS_NAME:
            return _BY_CLASS_NAME[cls.__name__]
    raise UserError(f"{type(model).__name__} is not a supported diffusers transformer; supported: {', '.join(CLASS_NAMES)}")
