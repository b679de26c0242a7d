"""nucseg: fine-tune Segment Anything with LoRA on H&E nuclei, segment every nucleus of whole slides."""

__version__ = "0.1.0"
