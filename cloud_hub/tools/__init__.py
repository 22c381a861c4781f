"""Not on the serving path: the private broker for tests and benchmarks, the demos, the sample generators."""
