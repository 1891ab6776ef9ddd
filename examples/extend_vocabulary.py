"""Placeholder main job until llamazh.tokenizer lands (issue 2)."""

print("llamazh: the vocabulary-extension example is not implemented yet")
