"""The device: read, infer, keep every result until the hub's receipt, verify and swap models, learn at home.

``cli`` (the ``edge-agent`` app), ``jobs`` (``replay``, ``run``), ``agent`` (one device's wiring), ``pipeline``
(windows → features → INT8 model), ``outbox`` (SQLite, until the receipt), ``publisher`` (PUBACKs, receipts,
re-sends), ``bundle`` (verify and hot-swap), ``learner`` and ``learn`` (federated rounds: numpy fine-tuning),
``metrics`` (Prometheus, optional). The hub never imports this package (``.importlinter``).
"""
