"""GSA kernels (installed as ``t2r.kernels``): PyTorch references and the dispatching entry point."""

from .gsa_ops import gsa
from .gsa_reference import gsa_chunk, gsa_recurrent

__all__ = ["gsa", "gsa_chunk", "gsa_recurrent"]
