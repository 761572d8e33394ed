"""Engine export (ONNX, TensorRT, AOTInductor) of CLEAR models: not built yet."""
