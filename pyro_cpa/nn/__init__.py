"""CPA decoders: which ``torch.nn`` layers are supported and their canonical affine/activation view."""
from .layers import Abs
from .network import SUPPORTED, CPANetwork, as_cpa_network

__all__ = ["Abs", "CPANetwork", "as_cpa_network", "SUPPORTED"]
