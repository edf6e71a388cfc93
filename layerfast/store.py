"""The resume store: a run's progress, persisted transactionally in `<out>/progress.sqlite`.

One data pass evaluates every variant, so "finished work" is the prefix of the data already
seen. The store keeps, in one row updated in one transaction, how many samples are done and the
float64 [V, 4] sums at that point; SQLite's journal makes each update all-or-nothing, so a run
killed at any moment (SIGKILL included) leaves either the previous or the new state. A rerun
with the same arguments continues from there: the same batches in the same order are added to
the same sums, so the end result equals an uninterrupted run. A rerun with different arguments
is refused unless `fresh=True`.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import torch

from layerfast.errors import LayerfastError

FILENAME = "progress.sqlite"


class ResumeStore:
    def __init__(self, out: Path, fingerprint: dict, num_variants: int, fresh: bool = False) -> None:
        self.path = out / FILENAME
        self.fingerprint = json.dumps(fingerprint, sort_keys=True, default=str)
        self.V = num_variants
        if fresh and self.path.exists():
            self.path.unlink()
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self.db.execute("CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY CHECK (id = 0),"
                            " n_done INTEGER, counts BLOB, complete INTEGER)")
        except sqlite3.Error as exc:
            raise LayerfastError(f"cannot write the resume store {self.path}: {exc}") from None
        row = self.db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('fingerprint', ?)", (self.fingerprint,))
        elif row[0] != self.fingerprint:
            old, new = json.loads(row[0]), json.loads(self.fingerprint)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise LayerfastError(
                f"{out} holds a run with different arguments (differs in: {', '.join(diff)}); "
                "pass --fresh to start over there, or choose another --out")

    def load(self) -> tuple[int, torch.Tensor | None, bool]:
        """(samples done, their sums or None, whether the pass finished)."""
        row = self.db.execute("SELECT n_done, counts, complete FROM state WHERE id = 0").fetchone()
        if row is None:
            return 0, None, False
        counts = torch.from_numpy(np.frombuffer(row[1], dtype=np.float64).copy().reshape(self.V, 4))
        return int(row[0]), counts, bool(row[2])

    def save(self, counts: torch.Tensor, n_done: int, complete: bool = False) -> None:
        blob = counts.to(torch.float64).contiguous().numpy().tobytes()
        self.db.execute("INSERT OR REPLACE INTO state VALUES (0, ?, ?, ?)", (n_done, blob, int(complete)))

    def close(self) -> None:
        self.db.close()
