"""Sensor sources: everything yields :class:`ReadingChunk` (columnar readings of one or more devices).

* ``chunk``   -- :class:`ReadingChunk`, :class:`LogError` (file, line, reason), :class:`ReadStats`
* ``numbers`` -- vectorized decoding of numeric and categorical fields
* ``formats`` -- CSV and JSON Lines blocks, and :class:`Rules`: every rule a line must pass
* ``lines``   -- :class:`LineParser`, the one engine every source's lines go through (bytes in, chunks out)
* ``logs``    -- recorded logs (CSV / JSON Lines, gzip): :func:`read_log`
* ``replay``  -- :func:`pace` (readings released at their recorded time, scaled)
* ``runs``    -- the first pass over a log: its stretches in time order (one per device for a log grouped by device)
* ``merge``   -- :class:`ReplayLogs`: the stretches of one or more logs merged by time, memory bounded by the stretches
* ``live``    -- :class:`SimulatedSensor`, :class:`JsonLinesStream`, :class:`FollowFile`
* ``fields``  -- a real sensor's reading (JSON object, CSV line) -> a log record: :class:`FieldMap`, :class:`SensorFeed`
* ``mqtt_sensor``   -- :class:`MqttSensor` (``source = "mqtt"``: topics of a local broker)
* ``serial_sensor`` -- :class:`SerialSensor` (``source = "serial"``: a serial port, through a pulled cable)
"""

from edge_agent.sources.chunk import MAX_ERRORS_KEPT, LogError, ReadingChunk, ReadStats, file_error
from edge_agent.sources.fields import FieldMap, SensorFeed
from edge_agent.sources.lines import DEFAULT_CHUNK_ROWS, LineParser
from edge_agent.sources.live import FollowFile, JsonLinesStream, SimulatedSensor, StdinSource
from edge_agent.sources.logs import LogReader, log_format, read_log
from edge_agent.sources.merge import ReplayLogs
from edge_agent.sources.mqtt_sensor import DeviceNames, MqttSensor
from edge_agent.sources.replay import pace
from edge_agent.sources.serial_sensor import SerialSensor

__all__ = [
    "DEFAULT_CHUNK_ROWS", "MAX_ERRORS_KEPT", "DeviceNames", "FieldMap", "FollowFile", "JsonLinesStream", "LineParser",
    "LogError", "LogReader", "MqttSensor", "ReadStats", "ReadingChunk", "ReplayLogs", "SensorFeed", "SerialSensor", "SimulatedSensor",
    "StdinSource", "file_error", "log_format", "pace", "read_log",
]
