"""Model folders. Each is self-contained (torch, transformers and its own siblings only)."""
