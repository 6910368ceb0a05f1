"""The ranking service: ONNX Runtime ranker models over gRPC (RankingService and the Open
Inference Protocol), with dynamic batching and zero-downtime version swaps."""
