"""A job's ledger: every record a job leaves in its output store (see book.py)."""

from __future__ import annotations

from .book import Ledger, Poisoned
from .kills import POISON_KILLS, KillCounts
from .records import ChunkProgress, Tally, tally
from .submissions import Submission, new_id

__all__ = ["POISON_KILLS", "ChunkProgress", "KillCounts", "Ledger", "Poisoned", "Submission", "Tally", "new_id", "tally"]
