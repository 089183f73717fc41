import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import linear as linear_module
from model.linear import FEW_ROWS, Linear, lay_out, linear


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("rows", [1, 5, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("out_features", [48, 50])
@pytest.mark.parametrize("transposed", [False, True])
def test_linear_equals_f_linear_in_every_layout(threads, rows, out_features, transposed, monkeypatch):
    """The thread-split product gives F.linear's result whatever the weight's memory order, row
    count (the split stops above FEW_ROWS) or a feature count the threads do not divide."""
    monkeypatch.setattr(linear_module, "SPLIT_MIN", 0)
    torch.manual_seed(0)
    weight = torch.randn(out_features, 40, dtype=torch.float64)
    if transposed:
        weight = weight.t().contiguous().t()
    x = torch.randn(rows, 40, dtype=torch.float64)
    with torch.no_grad():
        got = linear(x, weight)
    assert got.shape == (rows, out_features) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_linear_keeps_autograd_where_gradients_are_needed(threads):
    weight = torch.randn(8, 6, requires_grad=True)
    x = torch.randn(2, 6, requires_grad=True)
    linear(x, weight).sum().backward()
    torch.testing.assert_close(weight.grad, x.detach().sum(0).expand(8, 6))
    torch.testing.assert_close(x.grad, weight.detach().sum(0).expand(2, 6))


def test_linear_module_is_a_bias_free_nn_linear():
    layer = Linear(6, 4)
    assert isinstance(layer, nn.Linear) and layer.bias is None and list(layer.state_dict()) == ["weight"]
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ layer.weight.T)


def test_lay_out_moves_wide_weights_and_back():
    model = nn.Sequential(Linear(4, 8), Linear(8, 4), nn.LayerNorm(4))
    values = [p.detach().clone() for p in model.parameters()]
    lay_out(model, for_decoding=True)
    assert [p.is_contiguous() for p in model.parameters()] == [False, True, True, True]
    assert model[0].weight.stride() == (1, 8)
    lay_out(model, for_decoding=False)
    assert all(p.is_contiguous() for p in model.parameters())
    for p, v in zip(model.parameters(), values):
        assert torch.equal(p, v)
