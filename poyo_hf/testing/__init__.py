"""Test helpers for code that talks to the Hugging Face Hub, without the network.

`poyo_hf.testing.hub_server` serves the subset of the Hub HTTP API that huggingface_hub,
transformers and datasets call (create/upload/download/stream) from memory on 127.0.0.1, and
`poyo_hf.testing.hub_env` builds the environment a Hub client process needs to use it, and
`poyo_hf.testing.client` runs client code in such a process and collects a JSON report of named
checks. `poyo_hf.testing.shapes` holds the tiny model shape the training and Hub tests share.

Nothing here imports huggingface_hub, transformers or datasets: those libraries read
``HF_ENDPOINT`` once, at import time, so the server must be importable (and startable) before
any client library is, and clients are best run in a subprocess with the environment from
:func:`poyo_hf.testing.hub_env.hub_environment`.
"""
