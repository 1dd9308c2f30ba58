"""Built-in tiny models and the local tokenizer."""
