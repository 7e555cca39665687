"""Linear layers through oneDNN (cpu_kernels.linear / PoyoLinear): same values and gradients as
``F.linear``, packed weights that follow the module's weight, taken only where it was measured to
pay, and switchable off."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from make_fixtures import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from poyo_hf import PoyoForDecoding, PoyoProcessor
from poyo_hf.models.poyo import cpu_kernels
from poyo_hf.models.poyo.cpu_kernels import ONEDNN_MIN_MACS, PoyoLinear, linear

pytestmark = pytest.mark.skipif(
    not cpu_kernels.onednn_linear_enabled(), reason="torch built without oneDNN, or not an x86-64 machine"
)


class _Ops(TorchDispatchMode):
    """Records the names of the ATen / mkldnn ops that run under it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _ops(fn) -> list[str]:
    with _Ops() as mode:
        fn()
    return mode.names


def _onednn_calls(names: list[str]) -> int:
    return sum(name == "mkldnn._linear_pointwise" for name in names)


def _packs(names: list[str]) -> int:
    return sum(name == "mkldnn._reorder_linear_weight" for name in names)


@pytest.mark.parametrize(
    "shape, out_features, bias",
    [
        ((3, 400, 64), 1536, False),  # N > K: grad_w via the (K, N) orientation
        ((700, 512), 64, True),  # N < K: grad_w via the (N, K) orientation
        ((ONEDNN_MIN_MACS // (64 * 64), 64), 64, True),  # exactly at the threshold
    ],
)
def test_values_and_gradients_equal_f_linear(shape, out_features, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    layer = PoyoLinear(shape[-1], out_features, bias=bias)
    upstream = torch.randn(*shape[:-1], out_features, generator=g)

    names = _ops(lambda: (layer(x) * upstream).sum().backward())
    assert _onednn_calls(names) == 3 and _packs(names) == 0  # forward, grad_x, grad_w; trained weights unpacked
    grads = (x.grad.clone(), layer.weight.grad.clone(), None if layer.bias is None else layer.bias.grad.clone())

    # Reference: the same products in float64 through F.linear's own autograd.
    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = None if layer.bias is None else layer.bias.detach().double().requires_grad_()
    out64 = F.linear(x64, w64, b64)
    (out64 * upstream.double()).sum().backward()

    torch.testing.assert_close(layer(x).double(), out64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0].double(), x64.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[1].double(), w64.grad, rtol=1e-5, atol=1e-3)  # sums over >= 512 rows
    if bias:
        torch.testing.assert_close(grads[2].double(), b64.grad, rtol=1e-5, atol=1e-3)


def test_strided_input_and_inference_mode():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 1024, generator=g)
    x = base.t()  # (1024, 64), a transposed view
    layer = PoyoLinear(64, 256)
    with torch.inference_mode():
        names = _ops(lambda: layer(x))
        out = layer(x)
    assert _onednn_calls(names) == 1
    torch.testing.assert_close(out, F.linear(x.contiguous(), layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1024, 128])  # oneDNN with a packed weight; the small-product kernel
def test_inference_packs_once_and_follows_weight_changes(rows, monkeypatch):
    if rows <= cpu_kernels.SMALL_LINEAR_MAX_ROWS and cpu_kernels.kernels() is None:
        pytest.skip("the CPU kernels cannot be built here (no C++ compiler)")
    layer = PoyoLinear(64, 1536)
    x = torch.randn(rows, 64)
    small_packs, small_calls = [], []
    real_pack, real_small = cpu_kernels.pack_small, cpu_kernels.small_linear
    monkeypatch.setattr(cpu_kernels, "pack_small", lambda *a: small_packs.append(1) or real_pack(*a))
    monkeypatch.setattr(cpu_kernels, "small_linear", lambda *a: small_calls.append(1) or real_small(*a))

    def packs_and_calls(names):
        if rows <= cpu_kernels.SMALL_LINEAR_MAX_ROWS:
            return len(small_packs), len(small_calls)
        return _packs(names), _onednn_calls(names)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        names = _ops(lambda: [layer(x) for _ in range(3)])
    assert packs_and_calls(names) == (1, 3)  # packed on first use, then reused
    check()
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # in place, as an optimizer step: the version changes
    check()
    with torch.no_grad():
        layer.bias.add_(1.0)  # the small-product kernel packs the bias too
    check()
    layer.load_state_dict({"weight": torch.randn(1536, 64), "bias": torch.randn(1536)})
    check()
    layer.weight.data = torch.randn(1536, 64)  # new storage
    check()
    layer.weight = torch.nn.Parameter(torch.randn(1536, 64))  # a new Parameter object
    check()
    layer.bias = torch.nn.Parameter(torch.randn(1536))
    check()
    layer.load_state_dict({"weight": torch.randn(1536, 64), "bias": torch.randn(1536)}, assign=True)
    check()
    # The packed copies live beside the module: copies and state dicts hold plain tensors only.
    clone = copy.deepcopy(layer)
    assert set(clone.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    # With gradients the weight is used as it is (no packing), through oneDNN or F.linear.
    small_packs.clear()
    names = _ops(lambda: layer(x.requires_grad_()).sum().backward())
    assert _packs(names) == 0 and not small_packs
    assert _onednn_calls(names) == (3 if rows * 64 * 1536 >= ONEDNN_MIN_MACS else 0)


@pytest.mark.parametrize(
    "case",
    ["below the size threshold", "float64", "bfloat16 autocast", "switched off"],
)
def test_other_cases_are_exactly_f_linear(case, monkeypatch):
    # 64 x 64 products: one row less than the threshold, or twice as many rows.
    rows = ONEDNN_MIN_MACS // (64 * 64) - 1 if case == "below the size threshold" else 2 * ONEDNN_MIN_MACS // (64 * 64)
    dtype = torch.float64 if case == "float64" else torch.float32
    layer = PoyoLinear(64, 64).to(dtype)
    x = torch.randn(rows, 64, dtype=dtype)
    if case == "switched off":
        monkeypatch.setenv("POYO_HF_ONEDNN_LINEAR", "0")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bfloat16 autocast"):
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                names = _ops(lambda: layer(x))
                out = layer(x)
                expected = F.linear(x, layer.weight, layer.bias)
            assert _onednn_calls(names) == 0
            assert torch.equal(out, expected)


def test_setting_is_validated(monkeypatch):
    monkeypatch.setenv("POYO_HF_ONEDNN_LINEAR", "yes")
    with pytest.raises(ValueError, match="POYO_HF_ONEDNN_LINEAR='yes'"):
        linear(torch.randn(ONEDNN_MIN_MACS // 32, 8), torch.randn(4, 8))


def _poyo_batch_and_model():
    # Wide enough (hidden 64) that the projections pass the oneDNN size threshold at 80 windows.
    config = tiny_config(
        unit_vocab_size=7, session_vocab_size=2, hidden_size=64, head_dim=32, num_self_attention_heads=4
    )
    units = [f"s/u{i}" for i in range(6)]
    proc = PoyoProcessor.from_config(config, {"s": units})
    g = torch.Generator().manual_seed(3)
    windows = []
    for _ in range(80):
        n = 40
        windows.append(
            {
                "session_id": "s",
                "unit_ids": units,
                "spike_times": torch.sort(torch.rand(n, generator=g) * config.sequence_length).values.numpy(),
                "spike_unit_index": torch.randint(0, 6, (n,), generator=g).numpy(),
                "output_timestamps": torch.linspace(0.0, config.sequence_length, 8).numpy(),
                "targets": torch.randn(8, 2, generator=g).numpy(),
            }
        )
    torch.manual_seed(0)
    return dict(proc(windows)), PoyoForDecoding(config).eval()  # eval: no dropout, the same function


def _check_against_f_linear(monkeypatch, model, loss_of, min_onednn_calls: int = 1) -> None:
    """``loss_of()`` (the model's loss) and the gradients it gives, with the projections through
    oneDNN (at least ``min_onednn_calls`` products) and then through F.linear, agree."""

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert _onednn_calls(_ops(loss_and_grads)) >= min_onednn_calls
    loss, grads = loss_and_grads()
    monkeypatch.setenv("POYO_HF_ONEDNN_LINEAR", "0")
    assert _onednn_calls(_ops(loss_and_grads)) == 0
    loss_ref, grads_ref = loss_and_grads()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_poyo_training_step_equals_the_f_linear_path(monkeypatch):
    """A whole model, loss and gradients, with its projections through oneDNN vs through F.linear."""
    batch, model = _poyo_batch_and_model()
    _check_against_f_linear(monkeypatch, model, lambda: model(**batch).loss)


def test_poyo_inference_equals_the_f_linear_path(monkeypatch):
    batch, model = _poyo_batch_and_model()
    with torch.no_grad():
        names = _ops(lambda: model(**batch))
        assert _onednn_calls(names) > 0 and _packs(names) > 0
        fast = model(**batch).predictions
        monkeypatch.setenv("POYO_HF_ONEDNN_LINEAR", "0")
        reference = model(**batch).predictions
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-4)


def test_ndt_training_step_equals_the_f_linear_path(monkeypatch):
    """NDT's projections are PoyoLinear too: an MC_Maze-sized model's loss and gradients through
    oneDNN vs through F.linear (eval: no dropout; an explicit bin mask)."""
    from poyo_hf.bench.ndt import mc_maze_model

    model, proc = mc_maze_model(None, seed=0)
    c = model.config
    g = torch.Generator().manual_seed(0)
    T = c.num_bins + c.num_forward_bins
    spikes = torch.poisson(torch.full((4, T, c.num_neurons), 0.3), generator=g)
    held = torch.poisson(torch.full((4, T, c.num_heldout_neurons), 0.3), generator=g)
    bins = torch.rand(4, T, generator=g) < 0.25

    def loss_of():
        return model(spikes=spikes, heldout_spikes=held, mask=bins, generator=torch.Generator().manual_seed(1)).loss

    _check_against_f_linear(monkeypatch, model, loss_of, min_onednn_calls=3 * c.num_hidden_layers)  # QKV, FFN
