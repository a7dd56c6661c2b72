"""`python -m convert`: Hugging Face DeepSeek checkpoints (safetensors, PyTorch .bin, block-FP8)
into MLX model folders, quantized by recipe, streamed tensor by tensor in bounded memory."""
