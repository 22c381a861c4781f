"""Cloud hub: lossless MQTT ingestion into SQL, fleet aggregation, retraining and model rollout."""

__version__ = "0.1.0"
