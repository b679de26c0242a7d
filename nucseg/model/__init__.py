"""Models: SAM and its fine-tuning methods (LoRA, adapters), the adapter format, weights, and the tile segmenters."""
