"""One import from an opened source into a sink, the same for the server and the importer job.

A source that cannot continue where it broke off (an HTTP server without `Range`, or whose
file changed) asks to start over: the sink is aborted, nothing of the first attempt stays,
and the source is opened again, a bounded number of times.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from importer.errors import StartOver
from importer.pipeline import Pipeline, PipelineOptions, Sink, TransferResult
from importer.progress import Progress
from importer.sources.opened import OpenedSource, SourceOpener

__all__ = ["OptionsFor", "SinkOpener", "run_transfer"]

log = logging.getLogger(__name__)

MAX_START_OVERS = 3

SinkOpener = Callable[[OpenedSource], Awaitable[Sink]]
OptionsFor = Callable[[OpenedSource], PipelineOptions]


async def run_transfer(
    open_source: SourceOpener,
    open_sink: SinkOpener,
    options_for: OptionsFor,
    progress: Progress,
    start_overs: int = MAX_START_OVERS,
) -> TransferResult:
    attempt = 0
    while True:
        try:
            async with open_source() as source:
                progress.restart(source.length, source.offset)
                sink = await open_sink(source)
                return await Pipeline(sink, options_for(source), progress).run(source.stream)
        except StartOver as exc:
            attempt += 1
            if attempt > start_overs:
                raise
            log.info("starting the transfer over (%d of %d): %s", attempt, start_overs, exc)
