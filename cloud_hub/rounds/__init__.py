"""Federated rounds: ``coordinator`` (select, announce, judge each update, commit then ack, resume), ``store``
(their SQL), ``finish`` (aggregate, INT8 from the devices' ranges, gate, register, publish), ``fedavg`` (the math)."""
