"""The model lifecycle: train, quantize to INT8, gate, register, sign.

``datasets`` (training data from logs, the hold-out split), ``training`` (scikit-learn MLPs and their FP32 ONNX),
``baselines`` (what a model must beat: the mean or majority, k-NN, persistence), ``quantize`` (onnxruntime's
INT8 and the error metrics), ``int8`` (a round's INT8 model from its base's INT8 graph), ``weights`` (the MLP's
tensors in and out of ONNX), ``forecast`` (persistence and the forecast graph),
``lifecycle`` (train → gate → register), ``signing`` (the only private-key code). ``serve``'s periodic retrain
is ``cloud_hub.rollout.autoretrain``.
"""
