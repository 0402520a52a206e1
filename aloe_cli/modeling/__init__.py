"""The model side every stage shares: loading checkpoints (loading), the chat template and THE definition of
loss tokens (tokens), and generation backends (local batched hf, OpenAI-compatible client)."""
