"""GSA ops: PyTorch references (reference.py), Triton kernels (chunk*.py: chunked forward/backward; decode*.py:
the in-place decode step; JIT code in *_jit.py), their tunables (tuning.py) and the dispatching entry points."""

from .dispatch import gsa, gsa_decode_
from .reference import gsa_chunk, gsa_decode_reference, gsa_recurrent

__all__ = ["gsa", "gsa_chunk", "gsa_decode_", "gsa_decode_reference", "gsa_recurrent"]
