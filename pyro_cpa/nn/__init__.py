"""CPA decoders: which ``torch.nn`` layers are supported and their canonical affine/activation view."""
from .activations import Elementwise, MaxPool
from .layers import Abs, Clamp, mlp
from .network import SUPPORTED, CPANetwork, as_cpa_network

__all__ = ["Abs", "Clamp", "CPANetwork", "Elementwise", "MaxPool", "as_cpa_network", "mlp", "SUPPORTED"]
