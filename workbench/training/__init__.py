"""Building the bundled model: corpus, tokenizer, training loop, model card."""
