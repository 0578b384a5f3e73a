"""Initializers: a contract over every registered entry, oracles from torch.nn.init, model-level use.

The expected statistics below are written from shared/SCIENCE.md section 1, independently of
pipeline/engine/nn/initializers.py: a wrong fan, gain, scale or truncation shows up as a wrong std.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.config import Config, ConfigError, InitializerConfig
from pipeline.config.catalog import validate_initializer
from pipeline.config.composition import compose
from pipeline.engine.nn.initializers import (
    BIAS_INITIALIZERS,
    DATA_DEPENDENT,
    INITIALIZERS,
    LSUV_TOL,
    TRUNC_NORMAL_STD_CORRECTION,
    InitArgs,
    apply_init,
    init_bias,
    init_weight,
    load_pretrained,
)
from pipeline.engine.weights import load_weights_file, save_weights

SHAPES = [(512, 1024), (64, 32, 3, 3)]
RELU_GAIN = math.sqrt(2.0)  # what gain="auto" resolves to in these tests
DETERMINISTIC = ("identity",)  # not a distribution: tested exactly, below
PER_TENSOR = [name for name in INITIALIZERS.names() if name != "pretrained" and name not in DETERMINISTIC]
RANDOM = [name for name in PER_TENSOR if name not in ("zeros", "constant")]
FAN_BASED = [name for name in PER_TENSOR if name not in BIAS_INITIALIZERS]  # need >= 2 dims
TRUNCATION = 2.0 / 0.87962566103423978  # max |w| / std of a normal truncated at +-2 std'

# Options for the contract test, set away from the defaults wherever the scheme reads them.
OPTIONS = {
    "zeros": {},
    "constant": {"value": 0.3},
    "normal": {"std": 0.02},
    "uniform": {"bound": 0.07},
    "xavier_uniform": {"gain": 1.7},
    "xavier_normal": {"gain": 1.7},
    "kaiming_uniform": {"gain": "auto"},
    "kaiming_normal": {"gain": "auto", "mode": "fan_out"},
    "lecun_uniform": {"gain": 5.0},  # LeCun is gain 1 by definition: a gain must not leak in
    "lecun_normal": {"gain": 5.0},
    "orthogonal": {"gain": 1.3},
    "variance_scaling": {"factor": 2.0, "mode": "fan_avg", "distribution": "truncated_normal"},
    "delta_orthogonal": {"gain": 1.3},
    "lsuv": {"gain": 5.0},  # LSUV's data step sets the size: a gain must not leak in
}
# How the values are spread: "uniform" (max = sqrt(3) std), "truncated", "normal" (untruncated).
SUPPORT = {
    "normal": "normal",
    "uniform": "uniform",
    "xavier_uniform": "uniform",
    "xavier_normal": "normal",
    "kaiming_uniform": "uniform",
    "kaiming_normal": "normal",
    "lecun_uniform": "uniform",
    "lecun_normal": "normal",
}

KAIMING_ORACLES = [("kaiming_normal", nn.init.kaiming_normal_), ("kaiming_uniform", nn.init.kaiming_uniform_)]
LECUN_ORACLES = [("lecun_normal", nn.init.kaiming_normal_), ("lecun_uniform", nn.init.kaiming_uniform_)]
GAIN_ORACLES = [
    ("xavier_uniform", nn.init.xavier_uniform_),
    ("xavier_normal", nn.init.xavier_normal_),
    ("orthogonal", nn.init.orthogonal_),
]
UNREADABLE = [("missing.safetensors", None), ("junk.safetensors", b"junk"), ("junk.pt", b"junk")]


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) for PyTorch's layout (out, in, *kernel)."""
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def expected_std(name: str, cfg: InitializerConfig, shape: tuple[int, ...]) -> float:
    """The std each scheme must give at scale 1 (SCIENCE.md section 1)."""
    fan_in, fan_out = fans(shape)
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[cfg.mode]
    gain = RELU_GAIN if cfg.gain == "auto" else float(cfg.gain)
    table = {
        "zeros": lambda: 0.0,
        "constant": lambda: 0.0,
        "normal": lambda: cfg.std,
        "uniform": lambda: cfg.bound / math.sqrt(3),  # U(+-b) has std b / sqrt(3)
        "xavier_uniform": lambda: gain * math.sqrt(6 / (fan_in + fan_out)) / math.sqrt(3),
        "xavier_normal": lambda: gain * math.sqrt(2 / (fan_in + fan_out)),
        "kaiming_uniform": lambda: math.sqrt(3) * gain / math.sqrt(fan) / math.sqrt(3),
        "kaiming_normal": lambda: gain / math.sqrt(fan),
        "lecun_uniform": lambda: 1 / math.sqrt(fan_in),
        "lecun_normal": lambda: 1 / math.sqrt(fan_in),
        "orthogonal": lambda: gain / math.sqrt(max(shape[0], math.prod(shape[1:]))),
        "variance_scaling": lambda: math.sqrt(cfg.factor / fan),
        # One orthogonal (out, in) tap among prod(kernel): min(out, in) unit vectors times gain.
        "delta_orthogonal": lambda: gain / math.sqrt(max(shape[0], shape[1]) * math.prod(shape[2:])),
        "lsuv": lambda: 1 / math.sqrt(max(shape[0], math.prod(shape[1:]))),  # orthonormal, before the data step
    }
    return table[name]()


def support(name: str, cfg: InitializerConfig) -> str | None:
    if name == "variance_scaling":
        return {"truncated_normal": "truncated"}.get(cfg.distribution, cfg.distribution)
    return SUPPORT.get(name)


def initialized(
    name: str, shape: tuple[int, ...], scale: float = 1.0, seed: int = 0, act_gain: float = RELU_GAIN, **options
) -> torch.Tensor:
    tensor = torch.empty(shape)
    cfg = InitializerConfig(name=name, **options)
    init_weight(tensor, cfg, scale, act_gain, torch.Generator().manual_seed(seed))
    return tensor


def torch_init(fn, shape: tuple[int, ...], seed: int = 0, **kwargs) -> torch.Tensor:
    """The same draw made by a torch.nn.init function (the oracle)."""
    tensor = torch.empty(shape)
    fn(tensor, generator=torch.Generator().manual_seed(seed), **kwargs)
    return tensor


def assert_statistics(name: str, cfg: InitializerConfig, w: torch.Tensor) -> None:
    std = expected_std(name, cfg, tuple(w.shape))
    w = w.double()  # float32 reductions over 500k values would blur the exact cases
    mean = cfg.value if name == "constant" else 0.0
    assert abs(w.mean().item() - mean) <= 5 * std / math.sqrt(w.numel()) + 1e-7
    assert w.std().item() == pytest.approx(std, rel=0.03, abs=1e-7)
    top = w.abs().max().item() / std if std else 0.0
    kind = support(name, cfg)
    if kind == "uniform":
        assert 0.98 * math.sqrt(3) <= top <= math.sqrt(3) * (1 + 1e-5)
    elif kind == "truncated":
        assert 0.97 * TRUNCATION <= top <= TRUNCATION * (1 + 1e-5)  # i.e. max |w| <= 2.274 std
    elif kind == "normal":
        assert top > 3.5  # untruncated: tails beyond any truncation at 2.27 std


# --- contract over every entry -------------------------------------------------------------------


def test_every_entry_has_a_formula():
    assert set(PER_TENSOR) == set(OPTIONS)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", PER_TENSOR)
def test_statistics_match_the_formula(name, shape):
    cfg = InitializerConfig(name=name, **OPTIONS[name])
    w = initialized(name, shape, **OPTIONS[name])
    assert_statistics(name, cfg, w)


@pytest.mark.parametrize("distribution", ["truncated_normal", "normal", "uniform"])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out", "fan_avg"])
def test_variance_scaling_follows_keras(mode, distribution):
    options = {"factor": 0.5, "mode": mode, "distribution": distribution}
    w = initialized("variance_scaling", (64, 32, 3, 3), **options)
    assert_statistics("variance_scaling", InitializerConfig(name="variance_scaling", **options), w)


@pytest.mark.parametrize("name", PER_TENSOR)
def test_scale_multiplies_the_std(name):
    one = initialized(name, (256, 128), 1.0, **OPTIONS[name])
    three = initialized(name, (256, 128), 3.0, **OPTIONS[name])
    assert torch.allclose(three, 3 * one, rtol=1e-5, atol=1e-8)
    if name in RANDOM:
        assert three.std().item() / one.std().item() == pytest.approx(3.0, rel=1e-4)


@pytest.mark.parametrize("name", RANDOM)
def test_same_seed_same_tensor(name):
    first = initialized(name, (64, 32, 3, 3), seed=7, **OPTIONS[name])
    assert torch.equal(first, initialized(name, (64, 32, 3, 3), seed=7, **OPTIONS[name]))
    assert not torch.equal(first, initialized(name, (64, 32, 3, 3), seed=8, **OPTIONS[name]))


@pytest.mark.parametrize("name", FAN_BASED)
def test_fan_based_entries_refuse_1d(name):
    with pytest.raises(ConfigError, match=f"^{name} needs a tensor of at least 2 dimensions, got shape \\(5,\\)$"):
        initialized(name, (5,), **OPTIONS[name])


def test_identity_is_scale_times_eye_and_a_conv_passes_its_input_through():
    assert torch.equal(initialized("identity", (3, 4), 2.0), 2.0 * torch.eye(3, 4))
    with pytest.raises(ConfigError, match="identity needs"):
        initialized("identity", (5,))
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
    conv.weight.data = initialized("identity", (4, 4, 3, 3), 2.0)
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(conv(x), 2.0 * x)


def test_zeros_and_constant_are_exact():
    assert torch.equal(initialized("zeros", (3, 4)), torch.zeros(3, 4))
    assert torch.equal(initialized("constant", (3, 4), 2.0, value=0.3), torch.full((3, 4), 0.3 * 2.0))


def test_gain_auto_means_the_activation_gain():
    assert InitArgs(InitializerConfig(gain="auto"), 1.0, 1.234).gain == 1.234
    assert InitArgs(InitializerConfig(gain=2), 1.0, 1.234).gain == 2.0


def test_pretrained_is_not_a_per_tensor_initializer():
    with pytest.raises(ConfigError, match="whole model"):
        initialized("pretrained", (4, 4))


# --- oracles: torch.nn.init ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("name, oracle", KAIMING_ORACLES)
def test_kaiming_equals_torch_for_relu(name, oracle, mode, shape):
    ours = initialized(name, shape, act_gain=nn.init.calculate_gain("relu"), mode=mode)
    assert torch.equal(ours, torch_init(oracle, shape, mode=mode, nonlinearity="relu"))


def test_kaiming_equals_torch_for_leaky_relu():
    gain = nn.init.calculate_gain("leaky_relu", 0.2)
    ours = initialized("kaiming_normal", (128, 64), act_gain=gain)
    assert torch.equal(ours, torch_init(nn.init.kaiming_normal_, (128, 64), a=0.2, nonlinearity="leaky_relu"))


@pytest.mark.parametrize("name, oracle", LECUN_ORACLES)
def test_lecun_is_kaiming_linear(name, oracle):
    ours = initialized(name, (64, 32, 3, 3), act_gain=RELU_GAIN, gain=3.0)
    assert torch.equal(ours, torch_init(oracle, (64, 32, 3, 3), nonlinearity="linear"))


@pytest.mark.parametrize("gain", [1.0, "auto"])
@pytest.mark.parametrize("name, oracle", GAIN_ORACLES)
def test_gain_schemes_equal_torch(name, oracle, gain):
    tanh = nn.init.calculate_gain("tanh")  # the activation gain that "auto" resolves to here
    ours = initialized(name, (64, 32, 3, 3), 0.5, act_gain=tanh, gain=gain)
    expected_gain = (tanh if gain == "auto" else gain) * 0.5  # scale multiplies the gain, as the std
    assert torch.equal(ours, torch_init(oracle, (64, 32, 3, 3), gain=expected_gain))


def test_normal_and_uniform_equal_torch():
    assert torch.equal(initialized("normal", (32, 16), 2.0, std=0.1), torch_init(nn.init.normal_, (32, 16), std=0.2))
    ours = initialized("uniform", (32, 16), 2.0, bound=0.1)
    assert torch.equal(ours, torch_init(nn.init.uniform_, (32, 16), a=-0.2, b=0.2))


def test_truncated_variance_scaling_equals_torch_trunc_normal():
    options = {"factor": 2.0, "mode": "fan_in", "distribution": "truncated_normal"}
    wide = math.sqrt(2.0 / 288) / TRUNC_NORMAL_STD_CORRECTION
    oracle = torch_init(nn.init.trunc_normal_, (64, 32, 3, 3), std=wide, a=-2 * wide, b=2 * wide)
    assert torch.equal(initialized("variance_scaling", (64, 32, 3, 3), **options), oracle)


@pytest.mark.parametrize("shape", [(128, 128), (64, 256), (256, 64), (64, 32, 3, 3)], ids=str)
def test_orthogonal_rows_or_columns_are_orthonormal_times_gain(shape):
    w = initialized("orthogonal", shape, 1.5, gain=2.0).reshape(shape[0], -1).double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    assert torch.allclose(gram, (2.0 * 1.5) ** 2 * torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-4)


# --- biases and whole models -------------------------------------------------------------------


def small_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 3),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 256),
        nn.LayerNorm(256),
        nn.Tanh(),
        nn.Linear(256, 10),
    )


def init_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))]


def apply(model: nn.Module, scale: float = 1.0, seed: int = 0, **options) -> nn.Module:
    apply_init(model, InitializerConfig(**options), scale, RELU_GAIN, torch.Generator().manual_seed(seed))
    return model


def test_apply_init_sets_every_weight_and_zero_bias():
    model = apply(small_model(), name="zeros")
    for layer in init_layers(model):
        assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d, nn.Conv3d], ids=lambda m: m.__name__)
def test_apply_init_reaches_every_conv_kind(conv):
    layer = conv(16, 32, 3)
    apply(layer, name="kaiming_normal")
    fan_in = layer.weight[0].numel()
    assert layer.weight.std().item() == pytest.approx(RELU_GAIN / math.sqrt(fan_in), rel=0.05)
    assert torch.count_nonzero(layer.bias) == 0  # torch's default bias is U(+-1/sqrt(fan_in))


def test_apply_init_leaves_norm_layers_alone():
    model = apply(small_model(), name="normal", std=0.5)
    for norm in norm_layers(model):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_apply_init_is_deterministic():
    first = apply(small_model(), seed=3, name="orthogonal", bias="torch_default").state_dict()
    second = apply(small_model(), seed=3, name="orthogonal", bias="torch_default").state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_torch_default_bias_fills_its_range():
    layer = apply(nn.Linear(64, 4096), name="zeros", bias="torch_default")
    bound = 1 / math.sqrt(64)
    assert layer.bias.abs().max().item() <= bound
    assert layer.bias.abs().max().item() > 0.95 * bound


def test_bias_options_are_not_scaled():
    layer = apply(nn.Linear(8, 4096), 3.0, name="zeros", bias="constant", bias_value=0.25)
    assert torch.equal(layer.bias, torch.full((4096,), 0.25))
    layer = apply(nn.Linear(8, 4096), 3.0, name="zeros", bias="normal", bias_value=0.1)
    assert layer.bias.std().item() == pytest.approx(0.1, rel=0.05)
    layer = apply(nn.Linear(8, 4096), 3.0, name="zeros", bias="uniform", bias_value=0.1)
    assert 0.095 < layer.bias.abs().max().item() <= 0.1


def test_bias_with_a_matrix_scheme_is_refused():
    expected = (
        "initializer.bias=orthogonal is invalid: orthogonal needs a tensor of at least 2 dimensions "
        "and a bias is 1-D; valid: zeros, constant, normal, uniform, torch_default"
    )
    with pytest.raises(ConfigError) as err:
        init_bias(torch.empty(4), InitializerConfig(bias="orthogonal"), 8)
    assert str(err.value) == expected


# --- weight files and pretrained starts ---------------------------------------------------------


def trained_looking(model: nn.Module) -> nn.Module:
    """Random weights and non-default BN statistics, so a load that skips anything shows."""
    apply(model, seed=11, name="normal", std=0.3, bias="normal", bias_value=0.1)
    model.train()(torch.randn(4, 3, 8, 8))  # moves the BatchNorm running statistics
    return model


def pretrained(path: Path, **options) -> InitializerConfig:
    return InitializerConfig(name="pretrained", path=str(path), **options)


def assert_same_state(a: nn.Module, b: nn.Module, skip: tuple[str, ...] = ()) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if not key.startswith(skip):
            assert torch.equal(sa[key], sb[key]), key


def test_save_then_load_gives_the_same_model(tmp_path):
    source = trained_looking(small_model())
    save_weights(source, tmp_path / "deep" / "model.safetensors")
    target = apply(small_model(), name="pretrained", path=str(tmp_path / "deep" / "model.safetensors"))
    assert_same_state(source, target)


def test_torch_state_dict_files_load(tmp_path):
    source = trained_looking(small_model())
    torch.save(source.state_dict(), tmp_path / "model.pt")
    target = small_model()
    load_pretrained(target, pretrained(tmp_path / "model.pt"), 1.0)
    assert_same_state(source, target)


def test_scale_multiplies_loaded_weights_only(tmp_path):
    source = trained_looking(small_model())
    save_weights(source, tmp_path / "m.safetensors")
    target = small_model()
    load_pretrained(target, pretrained(tmp_path / "m.safetensors"), 2.0)
    for ours, theirs in zip(init_layers(target), init_layers(source)):
        assert torch.allclose(ours.weight, 2.0 * theirs.weight) and torch.equal(ours.bias, theirs.bias)
    assert torch.equal(norm_layers(target)[0].running_var, norm_layers(source)[0].running_var)


def test_the_engine_loads_files_only_and_leaves_a_run_id_to_the_record_layer():
    # The engine never reads MLflow: the runner fetches a run's weights to initializer.path first
    # (tests/record/test_record.py trains from a recorded run through it).
    with pytest.raises(
        ConfigError, match="initializer.run_id=abc123 names an MLflow run; the engine alone loads initializer.path"
    ):
        apply(small_model(), name="pretrained", run_id="abc123")


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    save_weights(nn.Sequential(nn.Linear(8, 16)), tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match=r"0\.weight model \(32, 8\) vs file \(16, 8\)"):
        load_pretrained(nn.Sequential(nn.Linear(8, 32)), pretrained(tmp_path / "m.safetensors"), 1.0)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)).state_dict()
    state = {k: v for k, v in state.items() if k != "1.weight"} | {"extra": torch.zeros(1)}
    save_file(state, tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match=r"missing keys: 1\.weight; unexpected keys: extra"):
        load_pretrained(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)), pretrained(tmp_path / "m.safetensors"), 1.0)


def test_exclude_keeps_the_built_values_of_a_prefix(tmp_path):
    save_weights(nn.ModuleDict({"head": nn.Linear(8, 3), "header": nn.Linear(8, 8)}), tmp_path / "m.safetensors")
    target = nn.ModuleDict({"head": nn.Linear(8, 5), "header": nn.Linear(8, 8)})
    built_head = target["head"].weight.detach().clone()
    load_pretrained(target, pretrained(tmp_path / "m.safetensors", exclude=["head"]), 1.0)
    assert torch.equal(target["head"].weight, built_head)  # a different shape, yet no error
    assert torch.equal(target["header"].weight, load_weights_file(tmp_path / "m.safetensors")["header.weight"])


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def _touch(path: str) -> None:
    Path(path).write_text("unpickling ran code")


def test_a_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"weight": _RunsCodeWhenUnpickled(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="weights_only=True"):
        load_weights_file(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_pickle_of_plain_values_is_not_a_state_dict(tmp_path):
    torch.save({"weight": [1, 2, 3]}, tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="not a state dict of named tensors"):
        load_weights_file(tmp_path / "plain.pt")


@pytest.mark.parametrize("name, content", UNREADABLE)
def test_unreadable_weight_files_are_config_errors(tmp_path, name, content):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError, match=name):
        load_weights_file(tmp_path / name)


# --- validation ------------------------------------------------------------------------------------


def validate(**options) -> bool:
    """True once the catalog accepted the options (it raises ConfigError otherwise)."""
    validate_initializer(Config(initializer=InitializerConfig(**options)))
    return True


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"name": "he_normal", "mode": "fan_out"},
        {"name": "variance_scaling", "mode": "fan_avg", "distribution": "uniform"},
        {"name": "xavier_uniform", "gain": 1.0},
        {"name": "orthogonal", "gain": "2.5"},
        {"name": "zeros", "bias": "torch_default"},
        {"name": "normal", "bias": "normal", "bias_value": 0.1},
        {"name": "orthogonal", "std": -1.0},  # options a scheme does not read are not checked
    ],
    ids=str,
)
def test_valid_configs_pass(options):
    assert validate(**options)


BAD = [
    ({"name": "he_gaussian"}, "unknown initializer 'he_gaussian'; valid: constant, delta_orthogonal, glorot_normal"),
    ({"mode": "fan_avg"}, "initializer.mode=fan_avg is invalid for kaiming_normal; valid: fan_in, fan_out"),
    ({"name": "variance_scaling", "mode": "fan_sum"}, "valid: fan_in, fan_out, fan_avg"),
    (
        {"name": "variance_scaling", "distribution": "gaussian"},
        "initializer.distribution=gaussian is invalid for variance_scaling; valid: normal, truncated_normal, uniform",
    ),
    ({"name": "variance_scaling", "factor": 0.0}, "initializer.factor=0.0 is invalid"),
    ({"name": "normal", "std": 0.0}, "initializer.std=0.0 is invalid"),
    ({"name": "uniform", "bound": -0.1}, "initializer.bound=-0.1 is invalid"),
    ({"gain": 0}, "initializer.gain=0 is invalid; valid: auto or a finite number > 0"),
    ({"gain": -1.0}, "initializer.gain=-1.0 is invalid"),
    ({"gain": "big"}, "initializer.gain=big is invalid"),
    ({"bias": "orthogonal"}, "initializer.bias=orthogonal is invalid: orthogonal needs a tensor of at least 2"),
    ({"bias": "glorot_normal"}, "glorot_normal needs a tensor of at least 2 dimensions and a bias is 1-D"),
    ({"bias": "ones"}, "initializer.bias=ones is invalid; valid: zeros, constant, normal, uniform, torch_default"),
    ({"bias": "normal"}, "initializer.bias_value (bias=normal)=0.0 is invalid"),
    ({"name": "pretrained"}, "exactly one of initializer.path or initializer.run_id; got neither"),
    ({"name": "pretrained", "path": "a.pt", "run_id": "r"}, "got both"),
    ({"name": "pretrained", "path": "/nonexistent/m.pt"}, "initializer.path=/nonexistent/m.pt does not exist"),
]


@pytest.mark.parametrize("options, message", BAD, ids=[str(options) for options, _ in BAD])
def test_bad_configs_raise_one_line_errors(options, message):
    with pytest.raises(ConfigError) as err:
        validate(**options)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_an_existing_pretrained_path_passes(tmp_path):
    save_weights(nn.Linear(2, 2), tmp_path / "m.safetensors")
    assert validate(name="pretrained", path=str(tmp_path / "m.safetensors"))


# --- conf/initializer -----------------------------------------------------------------------------


def test_yaml_gain_defaults_follow_torch():
    def gain(option):
        return compose([f"initializer={option}"])["initializer"]["gain"]

    assert gain("glorot_uniform") == 1.0 and gain("orthogonal") == 1.0 and gain("he_normal") == "auto"


# --- delta-orthogonal and LSUV (Xiao et al. 2018; Mishkin & Matas 2015) -------------------------


@pytest.mark.parametrize("shape", [(32, 16, 3), (32, 32, 3, 3), (16, 8, 5, 5), (8, 8, 3, 3, 3)], ids=str)
def test_delta_orthogonal_is_an_orthogonal_centre_tap_and_zeros(shape):
    w = initialized("delta_orthogonal", shape, 1.5, gain=2.0).double()
    centre = tuple(k // 2 for k in shape[2:])
    tap = w[(slice(None), slice(None), *centre)]
    assert torch.allclose(tap.T @ tap, (2.0 * 1.5) ** 2 * torch.eye(shape[1], dtype=torch.float64), atol=1e-5)
    rest = w.clone()
    rest[(slice(None), slice(None), *centre)] = 0
    assert torch.count_nonzero(rest) == 0


def test_delta_orthogonal_conv_preserves_every_position_norm():
    conv = nn.Conv1d(16, 32, 3, padding=1, bias=False)
    apply(conv, name="delta_orthogonal", gain=1.0)
    x = torch.randn(4, 16, 10)
    assert torch.allclose(conv(x).norm(dim=1), x.norm(dim=1), rtol=1e-4)  # (B, L): an isometry per position


def test_delta_orthogonal_on_a_linear_weight_is_orthogonal():
    ours = initialized("delta_orthogonal", (10, 32), 0.5, gain=1.0)
    assert torch.equal(ours, torch_init(nn.init.orthogonal_, (10, 32), gain=0.5))


def test_delta_orthogonal_refuses_more_inputs_than_outputs():
    expected = (
        "delta_orthogonal needs in_channels <= out_channels (an orthogonal centre tap that preserves "
        "norms); got a conv kernel of shape (8, 16, 3) with 16 > 8; use model.channels >= 16, or "
        "initializer=orthogonal"
    )
    with pytest.raises(ConfigError) as err:
        initialized("delta_orthogonal", (8, 16, 3))
    assert str(err.value) == expected


def layer_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every Linear/Conv layer's output on ``x``, in the order the forward pass calls them."""
    outputs = []
    handles = [m.register_forward_hook(lambda mod, inp, out: outputs.append(out.detach())) for m in init_layers(model)]
    with torch.no_grad():
        model.train()(x)
    for handle in handles:
        handle.remove()
    return outputs


def deep_network(model: str = "mlp", act: str = "relu", norm: str = "none", depth: int = 12) -> nn.Module:
    from pipeline.config import ActivationConfig, ModelConfig, NormalizationConfig
    from pipeline.engine.nn.models import build_model

    shape = (1, 8, 8) if model == "cnn" else (64,)
    cfg = ModelConfig(name=model, depth=depth, width=64, channels=16)
    return build_model(cfg, ActivationConfig(name=act), NormalizationConfig(name=norm), shape, 10)


@pytest.mark.parametrize(
    "model, act, norm", [("mlp", "relu", "none"), ("mlp", "tanh", "batch"), ("cnn", "relu", "none")]
)
def test_lsuv_gives_every_layer_unit_output_variance_on_the_probe(model, act, norm):
    torch.manual_seed(0)
    net, probe = deep_network(model, act, norm), 3 * torch.randn(128, 1, 8, 8) + 1
    apply_init(net, InitializerConfig(name="lsuv"), 1.0, RELU_GAIN, torch.Generator().manual_seed(0), probe=probe)
    variances = [float(out.double().var()) for out in layer_outputs(net, probe)]
    assert len(variances) == 13  # 12 hidden layers and the head, which Network registers first
    assert all(abs(v - 1) < LSUV_TOL for v in variances), variances


def test_lsuv_scale_multiplies_the_normalized_weights():
    probe = torch.randn(64, 64)
    one, two = deep_network(depth=4), deep_network(depth=4)
    for net, scale in ((one, 1.0), (two, 2.0)):
        apply_init(net, InitializerConfig(name="lsuv"), scale, RELU_GAIN, torch.Generator().manual_seed(1), probe=probe)
    for a, b in zip(init_layers(one), init_layers(two)):
        assert torch.allclose(b.weight, 2.0 * a.weight, rtol=1e-4)
    assert float(layer_outputs(two, probe)[0].var()) == pytest.approx(4.0, rel=0.05)  # target variance scale^2


def test_lsuv_leaves_batch_norm_statistics_and_the_mode_alone():
    net = deep_network(norm="batch", depth=3).eval()
    apply_init(net, InitializerConfig(name="lsuv"), 1.0, RELU_GAIN, probe=torch.randn(32, 64) + 5)
    assert not net.training
    for norm in net.modules():
        if isinstance(norm, nn.BatchNorm1d):
            assert (
                torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
                and int(norm.num_batches_tracked) == 0
            )


def test_lsuv_needs_a_probe_batch():
    with pytest.raises(ConfigError, match="initializer=lsuv is data-dependent: apply_init needs a probe batch"):
        apply_init(deep_network(depth=2), InitializerConfig(name="lsuv"), 1.0, RELU_GAIN)
    assert set(DATA_DEPENDENT) == {"lsuv"}
