"""Converters from other implementations' checkpoints into poyo_hf folders."""
