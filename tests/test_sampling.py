"""Time grids and the pushforward / restart samplers."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from imm_jax.core import interpolants, sampling
from imm_jax.core.losses import IMMObjective, network_fn
from imm_jax.core.parameterization import Parameterization
from tiny_net import TinyNet


def test_grids_match_spec():
    kw = dict(schedule="fm", t_max=0.994)
    np.testing.assert_allclose(sampling.time_grid("uniform", 8, t_min=0.0, **kw),
                               [0.994, 0.86975, 0.7455, 0.62125, 0.497, 0.37275, 0.2485, 0.12425, 0], atol=1e-12)
    np.testing.assert_allclose(sampling.time_grid("edm", 8, t_min=0.0, **kw),
                               [0.994, 0.98486, 0.95674, 0.86056, 0.56413, 0.14731, 0.01001, 7.9e-5, 0],
                               rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(sampling.time_grid("edm", 2, t_min=0.0, **kw), [0.994, 0.564132, 0], atol=1e-6)
    np.testing.assert_allclose(sampling.time_grid("edm", 4, t_min=0.0, **kw),
                               [0.994, 0.956736, 0.564132, 0.01001, 0], atol=1e-6)
    np.testing.assert_allclose(sampling.time_grid("etas", 2, t_min=0.006, mid_etas=[1.4], **kw),
                               [0.994, 0.583333, 0.006], atol=1e-6)
    np.testing.assert_allclose(sampling.time_grid("uniform", 1, t_min=0.006, **kw), [0.994, 0.006])
    for n in (1, 2, 4, 8):
        g = sampling.time_grid("edm", n, t_min=0.006, **kw)
        assert g.dtype == np.float64 and g[0] == 0.994 and g[-1] == 0.006 and len(g) == n + 1


def test_grid_errors():
    with pytest.raises(ValueError, match="mid-point etas"):
        sampling.time_grid("etas", 3, schedule="fm", t_min=0.006, t_max=0.994, mid_etas=[1.4])
    with pytest.raises(ValueError, match="Unknown grid"):
        sampling.time_grid("karras", 2, schedule="fm", t_min=0.0, t_max=0.994)
    # a grid that is not strictly decreasing (a mid-point at t_max, or above it) is refused
    for mid_t in (0.994, 0.999):
        with pytest.raises(ValueError, match="must decrease strictly"):
            sampling.time_grid("etas", 2, schedule="fm", t_min=0.006, t_max=0.994,
                               mid_etas=[float(interpolants.eta(mid_t, "fm"))])


def test_per_step_conditioning_errors():
    """Tuned per-step conditioning: one of cond_override / cond_offset, and only for pushforward / euler."""
    net, params, obj, _ = setup()
    grid = sampling.time_grid("uniform", 2, schedule="fm", t_min=0.006, t_max=0.994)
    e = jnp.zeros((2, 1, 8))
    run = lambda **kw: sampling.generate(net, params, jax.random.key(0), (4, 8, 8, 1), objective=obj, grid=grid, **kw)
    with pytest.raises(ValueError, match="cond_override or cond_offset, not both"):
        run(cond_override=e, cond_offset=e)
    with pytest.raises(ValueError, match="defined for the 'pushforward' and 'euler' samplers, got sampler='restart'"):
        run(sampler="restart", cond_offset=e)


def setup(num_classes=0):
    net = TinyNet(num_classes=num_classes)
    x = jnp.zeros((4, 8, 8, 1))
    labels = jnp.arange(4) % 2 if num_classes else None
    params = net.init(jax.random.key(0), x, jnp.zeros(4), jnp.zeros(4), labels)["params"]
    # Non-trivial weights so the output depends on time and labels.
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), params)
    obj = IMMObjective(param=Parameterization(), null_label=num_classes or None)
    return net, params, obj, labels


def test_one_step_pushforward_is_one_call():
    net, params, obj, _ = setup()
    grid = sampling.time_grid("uniform", 1, schedule="fm", t_min=0.006, t_max=0.994)
    noise = interpolants.prior_noise(jax.random.key(3), (4, 8, 8, 1))
    out = sampling.generate(net, params, jax.random.key(0), (4, 8, 8, 1), objective=obj, grid=grid, noise=noise)
    direct = obj.param.apply(network_fn(net, params, train=False), noise, jnp.full(4, 0.006), jnp.full(4, 0.994))
    np.testing.assert_allclose(out, direct, rtol=1e-6, atol=1e-6)


def test_multistep_pushforward_composes_maps():
    net, params, obj, labels = setup(num_classes=2)
    grid = sampling.time_grid("edm", 3, schedule="fm", t_min=0.006, t_max=0.994)
    noise = interpolants.prior_noise(jax.random.key(3), (4, 8, 8, 1))
    out = sampling.generate(net, params, jax.random.key(0), (4, 8, 8, 1), objective=obj, grid=grid,
                            labels=labels, cfg_scale=1.5, noise=noise)
    fn = network_fn(net, params, train=False)
    x = noise
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = obj.param.apply(fn, x, jnp.full(4, t_next, jnp.float32), jnp.full(4, t_cur, jnp.float32), labels,
                            cfg_scale=1.5, null_label=2)
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)
    assert out.dtype == jnp.float32


def test_restart_sampler_matches_loop():
    net, params, obj, _ = setup()
    grid = sampling.time_grid("uniform", 3, schedule="fm", t_min=0.006, t_max=0.994)
    key = jax.random.key(7)
    out = sampling.generate(net, params, key, (4, 8, 8, 1), objective=obj, grid=grid, sampler="restart")
    k_noise, k_restart = jax.random.split(key)
    x = interpolants.prior_noise(k_noise, (4, 8, 8, 1))
    keys = jax.random.split(k_restart, 3)
    fn = network_fn(net, params, train=False)
    g32 = grid.astype(np.float32)
    for i in range(3):
        clean = obj.param.apply(fn, x, jnp.full(4, g32[-1]), jnp.full(4, g32[i]))
        x = interpolants.add_noise(clean, interpolants.prior_noise(keys[i], x.shape), jnp.full(4, g32[i + 1]), "fm")
    np.testing.assert_allclose(out, clean, rtol=1e-5, atol=1e-5)


def test_same_key_same_samples():
    net, params, obj, _ = setup()
    grid = sampling.time_grid("uniform", 2, schedule="fm", t_min=0.006, t_max=0.994)
    run = jax.jit(lambda k: sampling.generate(net, params, k, (4, 8, 8, 1), objective=obj, grid=grid))
    a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_fm_samplers_match_loop():
    net, params, obj, labels = setup(num_classes=2)
    grid = sampling.time_grid("uniform", 3, schedule="fm", t_min=0.0, t_max=0.994)
    noise = interpolants.prior_noise(jax.random.key(3), (4, 8, 8, 1))
    fn = network_fn(net, params, train=False)
    v = lambda x, t: obj.param.velocity(fn, x, jnp.full(4, t, jnp.float32), labels, cfg_scale=2.0, null_label=2)
    g32 = grid.astype(np.float32)
    x_e, x_h = noise, noise
    for t_cur, t_next in zip(g32[:-1], g32[1:]):
        h = t_next - t_cur
        x_e = x_e + h * v(x_e, t_cur)
        d = v(x_h, t_cur)
        x_h = x_h + 0.5 * h * (d + v(x_h + h * d, t_next))
    for name, ref in (("euler", x_e), ("heun", x_h)):
        out = sampling.generate(net, params, jax.random.key(0), (4, 8, 8, 1), objective=obj, grid=grid,
                                labels=labels, cfg_scale=2.0, sampler=name, noise=noise)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_ideal_velocity_transports_exactly():
    """With the exact velocity of a single data point, one Euler step lands on it (straight OT path)."""
    x0 = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 1)), jnp.float32)
    noise = 0.5 * jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 1)), jnp.float32)
    v = lambda x, t: (x - x0) / t[:, None, None, None]  # eps - x0 given x_t on the line through x0
    out = sampling.ode(v, x0 * 0.006 + noise * 0.994, np.array([0.994, 0.0]))
    np.testing.assert_allclose(out, x0, rtol=1e-5, atol=1e-5)


def test_default_sampler_follows_objective():
    import ml_collections
    from imm_jax.core.losses import objective_name
    c = ml_collections.ConfigDict({"imm": {}})
    assert objective_name(c) == "imm"
    assert sampling.default_sampler(objective_name(c)) == "pushforward"
    c.imm.objective = "fm"
    assert sampling.default_sampler(objective_name(c)) == "euler"
    assert sampling.default_sampler("fm") in sampling.FM_SAMPLERS
    assert sampling.default_sampler("imm") in sampling.IMM_SAMPLERS
