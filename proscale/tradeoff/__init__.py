"""`proscale tradeoff`: encoder variants x seeds on your data -> GFLOPs vs accuracy, Pareto front,
recommendation (tradeoff/job.py). Lowest first: variants -> runs -> summary -> report -> job."""
from proscale.tradeoff.job import TradeoffConfig, add_parser, run_tradeoff
from proscale.tradeoff.runs import Job, run_jobs
from proscale.tradeoff.variants import DEFAULT_KEYS, Variant, parse_variant, parse_variants

__all__ = ["TradeoffConfig", "run_tradeoff", "add_parser", "Job", "run_jobs", "Variant", "parse_variant",
           "parse_variants", "DEFAULT_KEYS"]
