"""xdreamer: text-to-3D with X-Dreamer (CG-LoRA + AMA) on DMTet and PBR materials."""

__version__ = "0.1.0"
