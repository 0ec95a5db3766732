"""Sluice: a lean streaming gateway for OpenAI-compatible chat completions."""
