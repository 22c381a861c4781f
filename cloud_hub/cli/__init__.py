"""The ``cloud-hub`` command line: ``app`` composes one module per command group."""
