"""Data: tokenizers, the one document reader, GPT-NeoX indexed files, corpus preparation, training
windows, and images."""
