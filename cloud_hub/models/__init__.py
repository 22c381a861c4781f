"""The model lifecycle: train, quantize to INT8, gate, register, sign.

``training`` (scikit-learn MLPs and the baselines), ``quantize`` (onnxruntime's INT8 and the error metrics),
``weights`` (the MLP's tensors in and out of ONNX), ``lifecycle`` (train → gate → register), ``autoretrain``
(``serve``'s periodic retrain), ``signing`` (the only private-key code).
"""
