"""Weight conversion from torch_brain (the reference): parity and safe loading."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoProcessor

from poyo_hf.convert.torch_brain import UnsafeCheckpointError, convert_checkpoint, load_checkpoint

tb_models = pytest.importorskip(
    "torch_brain.models", reason="torch-brain (optional test dependency, installed by .ci/run) is absent"
)

PRESETS = {
    # Reference constructor arguments for the two preset shapes.
    "poyo-mp": dict(dim=64, depth=6, num_latents_per_step=16, cross_heads=2, self_heads=8),
    "poyo-1": dict(dim=128, depth=24, num_latents_per_step=32, cross_heads=4, self_heads=8),
}


def reference_model(shape: dict, seed: int = 0):
    torch.manual_seed(seed)
    ref = tb_models.POYO(sequence_length=1.0, latent_step=0.125, dim_out=2, **shape)
    ref.unit_emb.initialize_vocab([f"sess{s}/unit{u}" for s in range(3) for u in range(40)])
    ref.session_emb.initialize_vocab(["sess0", "sess1", "sess2"])
    # Random (not default) LayerNorm and bias values so that every converted tensor matters.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return ref.eval()


def lightning_checkpoint(ref, shape) -> dict:
    return {
        "state_dict": OrderedDict(("model." + k, v) for k, v in ref.state_dict().items()),
        "hyper_parameters": {"model": dict(sequence_length=1.0, latent_step=0.125, **shape)},
        "epoch": 3,
    }


def windows(rng):
    out = []
    for b in range(4):
        s = f"sess{b % 3}"
        n = int(rng.integers(0, 200))
        out.append(
            {
                "session_id": s,
                "unit_ids": [f"{s}/unit{u}" for u in range(40)],
                "spike_times": np.sort(rng.uniform(0, 1, n)),
                "spike_unit_index": rng.integers(0, 40, n),
                "output_timestamps": np.sort(rng.uniform(0, 1, int(rng.integers(1, 60)))),
            }
        )
    return out


@pytest.mark.parametrize("preset", ["poyo-mp", "poyo-1"])
def test_converted_checkpoint_matches_torch_brain(preset, tmp_path):
    shape = PRESETS[preset]
    ref = reference_model(shape)
    torch.save(lightning_checkpoint(ref, shape), tmp_path / "ref.ckpt")
    convert_checkpoint(tmp_path / "ref.ckpt", tmp_path / "hf")
    model = AutoModel.from_pretrained(tmp_path / "hf").eval()
    proc = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert proc.session_units["sess1"][:2] == ["sess1/unit0", "sess1/unit1"]
    batch = proc(windows(np.random.default_rng(1)))
    latent_index, latent_t = model.poyo.latent_grid()
    with torch.no_grad():
        ours = model(**batch).predictions
        theirs = ref(
            input_unit_index=batch["input_unit_index"],
            input_timestamps=batch["input_timestamps"],
            input_token_type=batch["input_token_type"],
            input_mask=batch["input_mask"],
            latent_index=latent_index.expand(4, -1),
            latent_timestamps=latent_t.expand(4, -1),
            session_index=batch["session_index"],
            output_timestamps=batch["output_timestamps"],
        )
    m = batch["output_mask"]
    torch.testing.assert_close(ours[m], theirs[m], atol=1e-5, rtol=1e-5)


def test_plain_state_dict_converts_too(tmp_path):
    shape = PRESETS["poyo-mp"]
    ref = reference_model(shape, seed=1)
    torch.save(ref.state_dict(), tmp_path / "plain.pt")
    convert_checkpoint(tmp_path / "plain.pt", tmp_path / "hf")
    model = AutoModel.from_pretrained(tmp_path / "hf")
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 6
    assert model.config.num_latents_per_step == 16 and model.config.unit_vocab_size == 121
    torch.testing.assert_close(model.poyo.unit_emb.weight, ref.unit_emb.weight)


class NotATensor:  # a stand-in for an arbitrary pickled object
    pass


def test_unsafe_objects_are_refused_with_the_type_and_the_flag(tmp_path):
    shape = PRESETS["poyo-mp"]
    ckpt = lightning_checkpoint(reference_model(shape), shape)
    ckpt["callbacks"] = NotATensor()
    torch.save(ckpt, tmp_path / "unsafe.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"NotATensor.*--allow-unsafe-pickle"):
        load_checkpoint(tmp_path / "unsafe.ckpt")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(UnsafeCheckpointError):
        convert_checkpoint(tmp_path / "unsafe.ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_script_entry_point(tmp_path):
    shape = PRESETS["poyo-mp"]
    torch.save(lightning_checkpoint(reference_model(shape), shape), tmp_path / "ref.ckpt")
    script = __import__("pathlib").Path(__file__).resolve().parents[2] / "scripts" / "convert_torch_brain_checkpoint.py"
    res = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ref.ckpt"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "missing.ckpt"), str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "does not exist" in res.stderr
