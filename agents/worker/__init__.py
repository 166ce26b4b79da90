"""The worker process (``jobstream worker``): see ``agents.worker.main``."""

from agents.worker.consumer import DISPATCH_CONSUMER
from agents.worker.main import Worker, run_worker

__all__ = ["DISPATCH_CONSUMER", "Worker", "run_worker"]
