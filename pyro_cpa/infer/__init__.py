"""Exact inference for CPA models in Pyro: model structure, exact MLE, evidence, EM."""
from .collapse import CollapseMessenger, collapse, empty_guide
from .evidence import InformationCriteria, count_free_parameters, information_criteria, log_evidence
from .structure import CPAModelStructure, full_data_structure, read_structure, trace_model

__all__ = ["CPAModelStructure", "read_structure", "trace_model", "full_data_structure", "collapse",
           "CollapseMessenger", "empty_guide", "log_evidence", "information_criteria", "count_free_parameters",
           "InformationCriteria"]
