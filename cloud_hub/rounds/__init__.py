"""Federated rounds: ``coordinator`` (the loop and the link), ``config`` (its options), ``opening`` (select,
plan, announce), ``answers`` (judge each update, commit then ack, receipt), ``judge``, ``secure``, ``privacy``,
``store`` (their SQL), ``finish`` (aggregate, INT8 from the devices' ranges, gate, register, publish), ``fedavg``
and ``robust`` (the math)."""
