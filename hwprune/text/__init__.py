"""Text: an offline English corpus, the MiniLM sentence encoder, and embedding quality measures."""
