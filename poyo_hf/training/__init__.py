"""Training and evaluation utilities for poyo_hf models (losses, metrics, loops)."""
