"""The hook mechanism and the model-state guard: exact captures, early stop, nothing left behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_unchanged, snapshot
from convlens.hooks import LayerCapture, StopForward, count_hooks, model_guard


def tiny_net() -> nn.Sequential:
    """conv -> bn -> in-place relu -> conv -> pool -> linear, fixed weights."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def assert_same(before: dict, model: nn.Module) -> None:
    """The old name and argument order, kept for tests/test_occlusion.py and tests/test_explain.py
    until they import ``assert_unchanged`` from conftest; remove it then."""
    assert_unchanged(model, before)


def test_capture_is_not_overwritten_by_later_inplace_op():
    net = tiny_net().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = net[1](net[0](x)).detach().clone()  # before the in-place ReLU
    assert (expected < 0).any()
    with LayerCapture({"1": net[1]}) as cap:
        out = cap.run(net, x)
    torch.testing.assert_close(cap["1"], expected, rtol=0, atol=0)
    torch.testing.assert_close(out, net(x).detach(), rtol=0, atol=0)  # the output itself is unchanged
    assert count_hooks(net) == 0


def test_grad_layer_gives_exact_partial_gradient():
    net = tiny_net().eval()
    x = torch.randn(2, 3, 8, 8)
    # reference: full autograd through the whole net
    a = net[2](net[1](net[0](x))).detach().requires_grad_(True)
    ref_out = net[6](net[5](net[4](net[3](a))))
    (ref_grad,) = torch.autograd.grad(ref_out[:, 1].sum(), a)
    with torch.no_grad():  # the caller's no_grad does not stop us
        with model_guard(net), LayerCapture({"2": net[2]}, grad=["2"]) as cap:
            out = cap.run(net, x)
            (g,) = torch.autograd.grad(out[:, 1].sum(), cap["2"])
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(g, ref_grad, rtol=1e-6, atol=1e-7)
    assert cap["2"].grad_fn is None  # a leaf: nothing before the layer was recorded
    assert all(p.grad is None for p in net.parameters())


def test_stop_early_never_runs_later_layers():
    net = tiny_net()
    fired = []
    handle = net[3].register_forward_hook(lambda *a: fired.append(True))
    try:
        # a plain name is a module's last call: the pass can stop there once the call count is known
        with LayerCapture({"0": net[0], "1": net[1]}, stop_early=True, calls={"0": 1, "1": 1}) as cap:
            assert cap.run(net, torch.randn(1, 3, 8, 8)) is None
        assert set(cap.outputs) == {"0", "1"} and not fired
        # without the counts the last call is known only at the end: the pass runs through
        with LayerCapture({"0": net[0]}, stop_early=True) as cap:
            assert cap.run(net, torch.randn(1, 3, 8, 8)) is not None
        assert len(fired) == 1
        # name#k stops at the k-th call without counts
        fired.clear()
        with LayerCapture({"1#1": net[1]}, stop_early=True) as cap:
            assert cap.run(net, torch.randn(1, 3, 8, 8)) is None
        assert set(cap.outputs) == {"1#1"} and not fired
    finally:
        handle.remove()
    assert count_hooks(net) == 0


def test_shared_module_last_call_and_kth_call():
    """One ReLU called three times: a plain name captures its last call, name#k the k-th; the
    gradient at the last call equals the gradient at the block output it is."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(2, 2, 1)
            self.b = nn.Conv2d(2, 2, 1)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.relu(self.a(x))  # call 1
            z = self.relu(self.b(y))  # call 2
            return self.relu(z - 0.1).sum(dim=(2, 3))  # call 3

    torch.manual_seed(0)
    net = Twice().eval()
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        c1 = net.a(x).relu()
        c2 = net.b(c1).relu()
        c3 = (c2 - 0.1).relu()
    with LayerCapture({"relu": net.relu, "relu#1": net.relu, "relu#2": net.relu}) as cap:
        cap.run(net, x)
    assert cap.counts["relu"] == 3
    torch.testing.assert_close(cap["relu#1"], c1)
    torch.testing.assert_close(cap["relu#2"], c2)
    torch.testing.assert_close(cap["relu"], c3)
    with LayerCapture({"relu": net.relu}, grad=["relu"]) as cap:
        out = cap.run(net, x)
        (g,) = torch.autograd.grad(out[0, 1], cap["relu"])
    expected = torch.zeros_like(c3)
    expected[0, 1] = 1.0  # d sum_ij z_1ij / d z
    torch.testing.assert_close(g, expected)
    assert count_hooks(net) == 0


def test_guard_restores_everything_after_failure_halfway():
    net = tiny_net().train()
    net[0].weight.requires_grad_(False)
    net[3].weight.grad = torch.full_like(net[3].weight, 7.0)
    net[2].inplace = True
    before = snapshot(net)
    torch.set_grad_enabled(True)

    def boom(module, args, output):
        raise RuntimeError("fails halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        with model_guard(net), LayerCapture({"1": net[1], "3": net[3]}, grad=["3"]) as cap:
            net[4].register_forward_hook(boom)  # a hook we do not own, failing after ours fired
            net[0].weight.requires_grad_(True)
            net[2].inplace = False
            net[3].weight.grad = None
            try:
                cap.run(net, torch.randn(1, 3, 8, 8))
            finally:
                net[4]._forward_hooks.clear()
    assert torch.is_grad_enabled()
    assert_unchanged(net, before)
    assert all(m.training for m in net.modules())


def test_guard_restores_after_keyboard_interrupt():
    net = tiny_net().train()
    before = snapshot(net)
    with pytest.raises(KeyboardInterrupt):
        with model_guard(net), LayerCapture({"3": net[3]}):
            assert not net.training
            raise KeyboardInterrupt
    assert_unchanged(net, before)


def _grad_off(net):
    torch.set_grad_enabled(False)


@pytest.mark.parametrize(
    "change",
    [
        lambda net: net[1].train(not net[1].training),
        lambda net: setattr(net[2], "inplace", False),
        lambda net: net[0].weight.requires_grad_(False),
        lambda net: setattr(net[3].weight, "grad", net[3].weight.grad.clone()),  # same values, new tensor
        lambda net: net[3].weight.grad.add_(1),  # same tensor, new values
        lambda net: setattr(net[0].weight, "grad", torch.zeros_like(net[0].weight)),
        lambda net: net[6].bias.data.add_(1e-6),
        lambda net: net[1].running_mean.add_(1e-6),
        lambda net: net[1].extra.add_(1),  # a non-persistent buffer (not in the state dict)
        lambda net: net[4].register_forward_hook(lambda *a: None),
        lambda net: net.__setitem__(2, nn.ReLU(inplace=True)),  # a module swapped for an equal one
        lambda net: setattr(net[5], "forward", lambda x: x.flatten(1)),  # forward patched on the instance
        lambda net: setattr(net[6], "weight", nn.Parameter(net[6].weight.detach().clone())),
        _grad_off,
    ],
)
def test_assert_unchanged_sees_every_kind_of_change(change):
    """conftest's model-state check, which every "model untouched" test relies on, fails on each change."""
    net = tiny_net().eval()
    net[3].weight.grad = torch.ones_like(net[3].weight)
    net[1].register_buffer("extra", torch.zeros(2), persistent=False)
    before = snapshot(net)
    assert_unchanged(net, before)
    try:
        change(net)
        with pytest.raises(AssertionError):
            assert_unchanged(net, before)
    finally:
        torch.set_grad_enabled(True)


def test_remove_is_idempotent_and_capture_rejects_tuple_outputs():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    pair = nn.Sequential(Pair())
    cap = LayerCapture({"0": pair[0]})
    with cap, pytest.raises(TypeError, match="choose one of its submodules"):
        cap.run(pair, torch.zeros(1))
    cap.remove()
    cap.remove()
    assert count_hooks(pair) == 0
    with pytest.raises(ValueError, match="not among the captured"):
        LayerCapture({"0": pair[0]}, grad=["1"])


def test_stopforward_is_an_exception_users_can_see():
    assert issubclass(StopForward, Exception)
