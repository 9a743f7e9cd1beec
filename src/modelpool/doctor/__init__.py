"""``modelpool doctor``: what in this environment, or in a model, will go wrong in worker
processes, and how to fix it, before deploying (docs/doctor.md)."""

from ._environment import check_environment
from ._model_check import check_model
from ._report import Finding, Report

__all__ = ["Finding", "Report", "check_environment", "check_model"]
