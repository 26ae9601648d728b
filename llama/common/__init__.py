"""Helpers every wing may import: JSON files read with limits, hints about
download layouts. No torch, and nothing else of llama."""
