"""nucseg: fine-tune Segment Anything with LoRA on H&E nuclei, segment every nucleus of whole slides."""

import os as _os

# Before torch is imported: OpenMP threads that sleep at barriers instead of spinning. Spinning saves a few
# microseconds per barrier on idle cores and costs 10-20x the run time when the cores are shared with other
# work (nucseg.threads, docs/PERFORMANCE.md). An explicit OMP_WAIT_POLICY in the environment is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
