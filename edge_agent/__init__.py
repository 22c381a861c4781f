"""Edge agent: sensor sources, preprocessing, INT8 ONNX inference and durable MQTT publishing.

``edge_agent.contract`` (the wire contract) and ``edge_agent.preprocess`` are shared with the hub.
"""

__version__ = "0.1.0"
