"""Models: registry contract, shapes, widths, parameter counts, errors, torch.fx tracing."""

import inspect

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from hetfl.data.base import DataInfo
from hetfl.errors import ConfigError
from hetfl.models import MODELS, build_model, count_parameters, model_params, scaled
from hetfl.registry import describe

DIGITS = DataInfo((1, 8, 8), 10)
MNIST = DataInfo((1, 28, 28), 10)
CIFAR = DataInfo((3, 32, 32), 10)
FEATURES = DataInfo((60,), 10)
TOKENS = DataInfo((16,), 20, vocab_size=20)

TOKEN_MODELS = {"lstm", "transformer"}
ALL = ["cnn", "exclusive_sizes", "heterofl_conv", "layerwise", "leaf_cnn", "lstm", "mlp", "multi_exit", "resnet",
       "simple_cnn", "transformer"]


def info_for(name: str) -> DataInfo:
    return TOKENS if name in TOKEN_MODELS else DIGITS


def batch_for(info: DataInfo, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    if info.vocab_size is not None:
        x = torch.randint(0, info.vocab_size, (n, *info.input_shape), generator=g)
    else:
        x = torch.randn(n, *info.input_shape, generator=g)
    return x, torch.randint(0, info.num_classes, (n,), generator=g)


def make(name: str, info: DataInfo | None = None, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, info or info_for(name), **kw)


def test_registered_names():
    assert MODELS.names() == ALL


@pytest.mark.parametrize("name", ALL)
def test_factory_signature_contract(name):
    factory = MODELS.get(name)
    assert describe(factory)
    sig = inspect.signature(factory, eval_str=True)
    first, *rest = sig.parameters.values()
    assert first.name == "info"
    assert rest[0].name == "width" and rest[0].default == 1.0
    for p in rest:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, p.name
        assert p.default is not inspect.Parameter.empty, p.name
        assert p.annotation in (int, float, bool, str), p.name
        assert isinstance(p.default, p.annotation), p.name
    assert set(model_params(name)) == {p.name for p in rest}


@pytest.mark.parametrize("name", ALL)
def test_forward_shape_and_fx_trace(name):
    info = info_for(name)
    model = make(name).eval()
    x, _ = batch_for(info, 4)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (4, info.num_classes)
    assert torch.isfinite(y).all()
    # The width machinery derives its slicing from a torch.fx trace: every model must trace, and the
    # traced graph must compute the same function.  nn.LSTM appears as one leaf call_module node (its
    # four gate blocks are stacked in the rows of weight_ih_l*/weight_hh_l*/bias_*).
    traced = fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), y)


@pytest.mark.parametrize("name", ALL)
def test_sgd_step_reduces_loss(name):
    info = info_for(name)
    model = make(name, width=0.5).train()
    x, y = batch_for(info)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    torch.manual_seed(1)  # the same dropout masks (simple_cnn) in both forward passes
    before = F.cross_entropy(model(x), y)
    opt.zero_grad()
    before.backward()
    opt.step()
    torch.manual_seed(1)
    with torch.no_grad():
        after = F.cross_entropy(model(x), y)
    assert torch.isfinite(after)
    assert after < before


@pytest.mark.parametrize("name", ALL)
def test_half_width_is_a_prefix_shape_of_full_width(name):
    full, half = make(name), make(name, width=0.5)
    assert count_parameters(half) < count_parameters(full)
    fs, hs = full.state_dict(), half.state_dict()
    assert fs.keys() == hs.keys()
    for key in fs:
        assert fs[key].dim() == hs[key].dim(), key
        assert all(h <= f for h, f in zip(hs[key].shape, fs[key].shape)), key


@pytest.mark.parametrize("name", ALL)
def test_deterministic_given_seed(name):
    a, b = make(name), make(name)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_published_parameter_counts():
    assert count_parameters(make("cnn", MNIST)) == 1_663_370  # FedAvg CNN
    assert count_parameters(make("mlp", MNIST)) == 199_210  # FedAvg 2NN
    assert count_parameters(make("simple_cnn", CIFAR)) == 1_626_442  # pfl-research's benchmark CNN (1.63M)
    assert count_parameters(make("heterofl_conv", MNIST)) == 1_556_874  # HeteroFL conv "a" (1.56M)
    shakespeare = DataInfo((80,), 80, vocab_size=80)
    assert count_parameters(make("lstm", shakespeare)) == 819_920  # LEAF Shakespeare LSTM


def test_scaled():
    assert scaled(64, 1.0) == 64
    assert scaled(64, 0.5) == 32
    assert scaled(64, 0.0625) == 4
    assert scaled(3, 0.5) == 2
    assert scaled(10, 0.01) == 1
    assert scaled(200, 0.25) == 50
    assert scaled(10, 0.3) == 3  # not 4: 0.3 * 10 is 3.0000000000000004 in floating point
    assert scaled(10, 0.31) == 4


def test_width_sets_exact_channel_counts():
    conv = make("heterofl_conv", MNIST, width=0.25)
    assert [m.out_channels for m in conv.modules() if isinstance(m, nn.Conv2d)] == [16, 32, 64, 128]
    m = make("mlp", MNIST, width=0.5)
    assert [m.out_features for m in m.modules() if isinstance(m, nn.Linear)] == [100, 100, 10]
    c = make("cnn", MNIST, width=0.5)
    assert (c.conv1.out_channels, c.conv2.out_channels, c.fc1.out_features, c.fc2.out_features) == (
        16,
        32,
        256,
        10,
    )
    r = make("resnet", CIFAR, width=0.125, depth=10)
    assert r.stem.out_channels == 8 and r.fc.in_features == 64 and r.fc.out_features == 10
    lstm = make("lstm", width=0.5)
    assert (lstm.lstm.hidden_size, lstm.embed.embedding_dim) == (128, 8)
    lstm = make("lstm", width=0.5, scale_embedding=True)
    assert lstm.embed.embedding_dim == 4
    t = make("transformer", width=0.5)  # heads 4 -> 2, head size 32 kept, ffn 512 -> 256
    layer = t.layers[0]
    assert (layer.attn.q.out_features, layer.attn.head_dim, layer.fc1.out_features) == (64, 32, 256)
    assert t.tok.embedding_dim == 64 and t.pos.num_embeddings == 16
    t = make("transformer", width=0.3)  # ceil(0.3 * 4) = 2 heads
    assert t.layers[0].attn.q.out_features == 64


@pytest.mark.parametrize("bad", [1.5, 0, 0.0, -0.5, True, "0.5"])
def test_bad_width_raises(bad):
    with pytest.raises(ConfigError, match=r"model\.width must be in \(0, 1\], got"):
        build_model("mlp", DIGITS, width=bad)
    with pytest.raises(ConfigError, match=r"model\.width must be in \(0, 1\]"):
        MODELS.get("cnn")(DIGITS, width=bad)


def test_bad_width_message():
    with pytest.raises(ConfigError) as err:
        build_model("cnn", MNIST, width=1.5)
    assert str(err.value) == "model.width must be in (0, 1], got 1.5"


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_token_models_refuse_float_inputs(name):
    with pytest.raises(ConfigError, match=r"token dataset \(e\.g\. shakespeare\)"):
        build_model(name, MNIST)


@pytest.mark.parametrize("name", ["cnn", "heterofl_conv", "resnet", "mlp"])
def test_image_models_refuse_token_inputs(name):
    with pytest.raises(ConfigError, match=rf"model '{name}'.*token \(text\) dataset"):
        build_model(name, TOKENS)


def test_parameter_errors():
    with pytest.raises(ConfigError, match="has no parameter 'depth'"):
        build_model("cnn", MNIST, depth=18)
    with pytest.raises(ConfigError, match="must be of type int"):
        build_model("resnet", MNIST, depth="18")
    with pytest.raises(ConfigError, match="must be one of 10, 18"):
        build_model("resnet", MNIST, depth=34)
    with pytest.raises(ConfigError, match="norm of 'resnet' must be one of 'bn', 'gn', 'none', got 'ln'"):
        build_model("resnet", MNIST, norm="ln")
    with pytest.raises(ConfigError, match="comma-separated positive integers"):
        build_model("mlp", MNIST, hidden="200,x")
    with pytest.raises(ConfigError, match="multiple of model.heads"):
        build_model("transformer", TOKENS, d_model=100, heads=3)
    with pytest.raises(ConfigError, match="dropout"):
        build_model("transformer", TOKENS, dropout=1.0)
    with pytest.raises(ConfigError, match="unknown model 'vgg'"):
        build_model("vgg", MNIST)
    with pytest.raises(ConfigError, match="inputs shaped"):
        build_model("cnn", DataInfo((1, 2, 3, 4), 10))


@pytest.mark.parametrize("name", ["mlp", "cnn", "heterofl_conv", "resnet"])
@pytest.mark.parametrize("info", [FEATURES, DataInfo((8, 8), 10), CIFAR], ids=["flat", "hw", "chw"])
def test_image_models_accept_any_shape(name, info):
    model = make(name, info, width=0.125).eval()
    x, _ = batch_for(info, 3)
    with torch.no_grad():
        assert model(x).shape == (3, 10)


def test_norm_options():
    x, _ = batch_for(DIGITS, 4)
    for norm in ("bn", "gn", "none"):
        model = make("resnet", depth=10, width=0.125, norm=norm).eval()
        assert model(x).shape == (4, 10)
        traced = fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), model(x))
    model = make("resnet", depth=10, width=0.125, norm="none")
    assert not any(isinstance(m, nn.BatchNorm2d | nn.GroupNorm) for m in model.modules())
    model = make("heterofl_conv", norm="bn", bn_track_stats=False)
    assert not any("running" in k for k in model.state_dict())
    model = make("heterofl_conv", norm="none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model = make("resnet", depth=10, width=0.25, norm="gn", gn_groups=32)
    assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {16, 32}


def test_resnet_depth():
    def blocks(m):
        return len(m.blocks)

    assert blocks(make("resnet", depth=10, width=0.125)) == 4
    assert blocks(make("resnet", depth=18, width=0.125)) == 8
    shortcuts = [b.shortcut is not None for b in make("resnet", depth=18, width=0.125).blocks]
    assert shortcuts == [False, False, True, False, True, False, True, False]
    # HeteroFL's "PreResNet18" has 1-1-1-2 blocks per stage: 9.6M parameters on CIFAR10 in its tables.
    heterofl = make("resnet", CIFAR, blocks="1,1,1,2")
    assert blocks(heterofl) == 5 and count_parameters(heterofl) == 9_622_090
    assert count_parameters(make("resnet", CIFAR)) == 11_172_170
    with pytest.raises(ConfigError, match="needs 4 block counts"):
        build_model("resnet", CIFAR, blocks="2,2")


def test_transformer_is_causal():
    model = make("transformer").eval()
    x, _ = batch_for(TOKENS, 2)

    def hidden(tokens):
        h = model.tok(tokens) + model.pos(torch.arange(tokens.size(1)))
        for layer in model.layers:
            h = layer(h)
        return h

    with torch.no_grad():
        full = hidden(x)
        prefix = hidden(x[:, :5])
        changed = x.clone()
        changed[:, 10] = (changed[:, 10] + 1) % TOKENS.vocab_size
        after = hidden(changed)
    torch.testing.assert_close(full[:, :5], prefix)
    torch.testing.assert_close(after[:, :10], full[:, :10])
    assert not torch.allclose(after[:, 10:], full[:, 10:])


def test_per_layer_lstm_is_the_stacked_lstm_with_one_depth_block_per_layer():
    from hetfl.hetero.depth import encode_params, plan_for

    stacked, layered = make("lstm", hidden=12), make("lstm", hidden=12, per_layer=True)
    renamed = {}
    for k, v in stacked.state_dict().items():  # lstm.weight_ih_l1 -> layers.1.weight_ih_l0
        if k.startswith("lstm."):
            name, layer = k.removeprefix("lstm.").rsplit("_l", 1)
            k = f"layers.{layer}.{name}_l0"
        renamed[k] = v
    layered.load_state_dict(renamed)
    x, _ = batch_for(TOKENS)
    assert torch.allclose(stacked(x), layered(x), atol=1e-6)
    plan = plan_for("lstm", encode_params([("hidden", 12), ("per_layer", True), ("layers", 3)]), TOKENS)
    assert plan.units == (("embed",), ("layers.0",), ("layers.1",), ("layers.2", "fc"))
    with pytest.raises(ConfigError, match=r"model.per_layer of 'lstm' must be of type bool, got 'yes' \(str\)"):
        make("lstm", per_layer="yes")
