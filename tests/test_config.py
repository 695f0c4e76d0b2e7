"""Configs load, and start-up validation rejects bad configs with messages that say what to change."""
import os

import pytest

from imm_jax import config_files
from imm_jax.training import config_validation

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")


def load(name, arg=None):
    return config_files.load(f"{CONFIG_DIR}/{name}.py" + (f":{arg}" if arg is not None else ""))


@pytest.mark.parametrize("name", ["tiny", "fashion_mnist", "imagenet256", "cifar10"])
def test_configs_load_and_validate(name):
    c = load(name)
    config_validation.validate(c, num_devices=8 if name == "tiny" else 1)
    with open(os.path.join(CONFIG_DIR, name + ".py")) as f:
        assert "python -m imm_jax.main --config=configs/" + name + ".py" in f.read()


def test_cifar10_recipe():
    c = load("cifar10")
    assert (c.data.batch_size, c.imm.particles, c.imm.k, c.imm.a, c.imm.b) == (4096, 4, 15, 1.0, 5.0)
    assert (c.imm.f_type, c.imm.schedule, c.optim.name, c.data.random_flip) == ("simple_edm", "fm", "radam", True)
    assert c.model.dropout == 0.2 and c.model.num_classes == 0 and c.data.name == "cifar10"
    assert (c.imm.t_min, c.imm.t_max, c.optim.lr) == (0.006, 0.994, 1e-4)
    # EDM augmentation with its 9-entry label (EDM's CIFAR-10 setting); augment=0 drops both
    assert (c.data.augment_p, c.model.augment_dim) == (0.12, 9)
    assert (load("cifar10", "augment=0").data.augment_p, load("cifar10", "augment=0").model.augment_dim) == (0, 0)
    with pytest.raises(ValueError, match="must be a probability"):
        load("cifar10", "augment=lots")


def test_imagenet_variants():
    c = load("imagenet256", "variant=XL/2,a=2,temb=stride")
    assert c.model.variant == "XL/2" and c.imm.a == 2.0 and c.imm.temb == "stride" and c.imm.min_gap == 1e-4
    assert (c.imm.f_type, c.imm.k, c.imm.b, c.imm.t_min, c.imm.label_dropout) == ("euler_fm", 12, 4.0, 0.0, 0.1)
    c = load("imagenet256", "variant=S/2")
    assert c.model.variant == "S/2" and c.imm.a == 1.0 and c.imm.temb == "s" and c.imm.min_gap == 0.0
    config_validation.validate(c, num_devices=8)
    with pytest.raises(ValueError, match="variant"):
        load("imagenet256", "variant=Q/3")
    with pytest.raises(ValueError, match="unknown arg"):
        load("imagenet256", "size=B/2")


def _expect(config, fragment, num_devices=8):
    with pytest.raises(config_validation.ConfigError) as e:
        config_validation.validate(config, num_devices=num_devices)
    assert fragment in str(e.value), str(e.value)


def test_validation_messages():
    c = load("tiny")
    c.data.batch_size = 30
    _expect(c, "not divisible by config.imm.particles=4")
    c = load("tiny")
    c.data.batch_size = 36
    _expect(c, "not divisible by the 8 data-parallel devices")
    c = load("tiny")
    c.data.batch_size = 16  # 2 per device: half a group of 4
    _expect(c, "make batch_size a multiple of 32")
    c = load("tiny")
    c.imm.f_type, c.imm.schedule = "euler_fm", "cosine"
    _expect(c, "requires config.imm.schedule='fm'")
    c = load("tiny")
    c.optim.name = "sgdx"
    _expect(c, "config.optim.name='sgdx'")
    c = load("tiny")
    c.train.ema_decays = (0.9, 1.5)
    _expect(c, "decays must be in [0, 1)")
    c = load("tiny")
    c.data.source = "mnistt"
    _expect(c, "config.data.source='mnistt'")
    c = load("tiny")
    c.model.dtype = "float16"
    _expect(c, "--config.imm.min_gap=1e-4")
    c = load("tiny")
    with c.unlocked() if hasattr(c, "unlocked") else c.ignore_type():
        c.extra_thing = 1
    _expect(c, "unknown top-level config field 'extra_thing'")
    c = load("tiny")
    del c.optim["lr"]
    _expect(c, "config.optim.lr is missing")
    c = load("tiny")
    c.imm.k_end = 10  # no ramp length
    _expect(c, "it needs k_end >= k and k_ramp_steps >= 1")
    c = load("tiny")
    c.imm.k_end, c.imm.k_ramp_steps = 8, 100  # below k = 12
    _expect(c, "it needs k_end >= k and k_ramp_steps >= 1")


def test_validation_collects_all_errors():
    c = load("tiny")
    c.data.batch_size = 30
    c.imm.kernel = "gauss"
    with pytest.raises(config_validation.ConfigError) as e:
        config_validation.validate(c, num_devices=8)
    assert "particles=4" in str(e.value) and "config.imm.kernel='gauss'" in str(e.value)


@pytest.mark.parametrize("name,arg", [("tiny", None), ("fashion_mnist", None), ("fashion_mnist", "fm"),
                                      ("cifar10", None), ("imagenet256", "variant=XL/2,a=2,temb=stride")])
def test_configs_override_the_base_schema(name, arg):
    """Every experiment config is configs/base.py with values changed: the same sections and fields (vae is the
    latent models' optional extra), and the same type for each field."""
    from imm_jax.configs import base
    c, b = load(name, arg), base.get_config(load(name, arg).model)
    assert set(c.keys()) - {"vae"} == set(b.keys())
    for section in b.keys():
        if section in ("seed", "model"):
            continue
        assert set(c[section].keys()) == set(b[section].keys()), section
        for k in b[section].keys():
            want = b[section].get_type(k) if hasattr(b[section], "get_type") else type(b[section][k])
            assert c[section][k] is None or isinstance(c[section][k], (want, int) if want is float else want), \
                (section, k)


def test_config_args_and_paths_say_what_is_wrong(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"fashion_mnist.py: objective='dit': use one of \('imm', 'fm'\)"):
        load("fashion_mnist", "dit")
    with pytest.raises(ValueError, match=r"unknown argument 'size'"):
        load("imagenet256", "size=XL")
    with pytest.raises(ValueError, match=r"must be key=value"):
        load("imagenet256", "XL/2")
    assert load("fashion_mnist", "objective=fm").imm.objective == "fm"
    # From another directory, configs/NAME.py is the installed copy; a missing one lists what exists.
    monkeypatch.chdir(tmp_path)
    assert config_files.load("configs/tiny.py").model.image_size == 8
    assert config_files.resolve("tiny").startswith(config_files.CONFIG_DIR)
    with pytest.raises(FileNotFoundError, match=r"configs/cifar10.py, configs/fashion_mnist.py"):
        config_files.resolve("configs/cifar100.py")
    (tmp_path / "mine.py").write_text("from imm_jax.configs import tiny\nget_config = tiny.get_config\n")
    assert config_files.resolve("mine.py:x") == "mine.py:x"  # an existing file is used as given
    assert config_files.resolve_argv(["prog", "--config", "tiny", "--config.seed=3"]) == [
        "prog", "--config", config_files.resolve("tiny"), "--config.seed=3"]
