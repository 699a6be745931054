"""recdreamer-gs: text-to-3D Gaussians by uniform score distillation."""

__version__ = "0.1.0"
