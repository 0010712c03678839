"""GSA kernels (installed as ``t2r.kernels``): PyTorch references, Triton kernels and the dispatching entry points."""

from .gsa_ops import gsa, gsa_decode_
from .gsa_reference import gsa_chunk, gsa_recurrent

__all__ = ["gsa", "gsa_chunk", "gsa_decode_", "gsa_recurrent"]
