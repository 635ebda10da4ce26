"""Teacher training: flow matching of a class-conditional DiT (residual or DAR routing), with optional REPA."""
