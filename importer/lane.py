"""What a lane is: one consumer of a transfer's received stream (a hash, a sink's decoder).

The pipeline (importer/pipeline.py) hands every block to each lane, and the lane threads
(importer/lanethreads.py) run them; both speak of lanes through this protocol alone.
"""

from __future__ import annotations

from typing import Protocol


class Lane(Protocol):
    """A consumer of the received stream. `update` and `finish` run on a lane thread, one
    call at a time, in order; a lane that raised is not called again."""

    name: str

    def update(self, data: memoryview) -> None: ...

    def finish(self) -> None: ...
