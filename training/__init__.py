"""Training: source-domain pre-training, transfer to the target domain, evaluation and ONNX export."""
