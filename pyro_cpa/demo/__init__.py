"""The one-command demo: ``python -m pyro_cpa demo`` (see :func:`main`)."""
from .circle import (DemoConfig, MethodResult, format_table, headline, make_decoder, make_model,
                     run_circle_experiment)
from .cli import main, parse_args

__all__ = ["DemoConfig", "MethodResult", "format_table", "headline", "make_decoder", "make_model",
           "run_circle_experiment", "main", "parse_args"]
