"""Sensor sources: everything yields :class:`ReadingChunk` (columnar readings of one or more devices).

* ``chunk``   -- :class:`ReadingChunk`, :class:`LogError` (file, line, reason), :class:`ReadStats`
* ``numbers`` -- vectorized decoding of numeric and categorical fields
* ``formats`` -- CSV and JSON Lines blocks, and :class:`Rules`: every rule a line must pass
* ``logs``    -- recorded logs (CSV / JSON Lines, gzip): :func:`read_log`, and :class:`LineParser`,
  the one engine every source's lines go through
* ``replay``  -- :func:`pace` (readings released at their recorded time, scaled)
* ``live``    -- :class:`SimulatedSensor`, :class:`JsonLinesStream`, :class:`FollowFile`
"""

from edge_agent.sources.chunk import MAX_ERRORS_KEPT, LogError, ReadingChunk, ReadStats, file_error
from edge_agent.sources.live import FollowFile, JsonLinesStream, SimulatedSensor, StdinSource
from edge_agent.sources.logs import DEFAULT_CHUNK_ROWS, LineParser, LogReader, log_format, read_log
from edge_agent.sources.replay import pace

__all__ = [
    "DEFAULT_CHUNK_ROWS", "MAX_ERRORS_KEPT", "FollowFile", "JsonLinesStream", "LineParser", "LogError", "LogReader",
    "ReadStats", "ReadingChunk", "SimulatedSensor", "StdinSource", "file_error", "log_format", "pace", "read_log",
]
