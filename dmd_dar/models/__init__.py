"""Backbones on the depth router: our own SiT/DiT, and diffusers transformers converted to DAR."""
from dmd_dar.models.dit import DiT, DiTOutput


def convert_to_dar(model, routing, **kwargs):
    """diffusers transformer -> the same weights with DAR (or residual) routing per sublayer.

    Imported lazily so that `dmd_dar.models` works without diffusers installed."""
    from dmd_dar.models.diffusers_dar import convert_to_dar as _convert

    return _convert(model, routing, **kwargs)


__all__ = ["DiT", "DiTOutput", "convert_to_dar"]
