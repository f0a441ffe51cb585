"""Real exported models and the variants people deploy, compared with onnxruntime."""
