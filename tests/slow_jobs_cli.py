"""``hepatoquant`` with every analysis batch slowed (see slow_jobs.py): ``python slow_jobs_cli.py ARGS...``."""

from hepatoquant import analysis
from hepatoquant.cli import entry
from slow_jobs import SECONDS_PER_BATCH, _slowed

analysis.predict_batches = _slowed(analysis.predict_batches, SECONDS_PER_BATCH)
entry()
