"""DMD distillation: the losses (public), the method (one fake-score update and one student update), its config,
and the trainer that runs it (`dmd_dar.dmd.trainer.run_distillation`, CLI `scripts/distill.py`)."""
from dmd_dar.dmd.losses import distribution_matching_loss, gan_discriminator_loss, gan_generator_loss, noised_dm_loss

__all__ = ["distribution_matching_loss", "gan_discriminator_loss", "gan_generator_loss", "noised_dm_loss"]
