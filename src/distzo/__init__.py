"""distzo: zeroth-order fine-tuning of Hugging Face language models."""

__version__ = "0.1.0"

from distzo.optimizer import StepStats, ZOOptimizer  # noqa: E402
from distzo.schedules import Schedule  # noqa: E402

__all__ = ["ZOOptimizer", "StepStats", "Schedule", "__version__"]
