"""The model side every stage shares: loading checkpoints (loading), the chat template training uses and THE
definition of loss tokens (chat_template, checkpoint, loss_tokens, token_cache), and generation backends (local
batched hf, OpenAI-compatible client)."""
