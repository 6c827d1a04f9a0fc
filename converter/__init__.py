"""qwenlora-merge: merge LoRAs offline into Nunchaku 4-bit Qwen-Image / Z-Image-Turbo checkpoints."""

__version__ = "0.1.0"
