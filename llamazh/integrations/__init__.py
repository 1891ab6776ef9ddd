"""Integrations with other libraries: the only place that knows transformers' classes."""
