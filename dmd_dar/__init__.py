"""dmd_dar: DMD distillation of diffusion transformers into one/few-step students with DAR routing."""
__version__ = "0.1.0"
