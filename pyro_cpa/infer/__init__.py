"""Exact inference for CPA models in Pyro: model structure, exact MLE, evidence, EM."""
from .collapse import CollapseMessenger, collapse, empty_guide
from .callbacks import ExactMetrics
from .evaluation import (GuideEstimate, GuideEvaluation, evaluate_guide, exact_elbo, gaussian_mixture_entropy,
                         posterior_kl)
from .distributed import all_reduce_sum, exact_sum
from .em import EM
from .em_engine import EMStepResult, em_step, run_em
from .evidence import InformationCriteria, count_free_parameters, information_criteria, log_evidence
from .structure import CPAModelStructure, full_data_structure, read_structure, trace_model

__all__ = ["EM", "EMStepResult", "em_step", "run_em", "CPAModelStructure", "read_structure", "trace_model", "full_data_structure", "collapse",
           "CollapseMessenger", "empty_guide", "log_evidence", "information_criteria", "count_free_parameters",
           "InformationCriteria", "exact_elbo", "posterior_kl", "evaluate_guide", "GuideEstimate",
           "GuideEvaluation", "gaussian_mixture_entropy", "ExactMetrics", "all_reduce_sum", "exact_sum"]
