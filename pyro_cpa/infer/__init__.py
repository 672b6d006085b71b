"""Exact inference for CPA models in Pyro: model structure, EM, exact evaluation."""
from .structure import CPAModelStructure, full_data_structure, read_structure, trace_model

__all__ = ["CPAModelStructure", "read_structure", "trace_model", "full_data_structure"]
