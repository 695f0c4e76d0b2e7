"""Mapping r(s,t), weight w(t), and the IMM loss on a tiny network."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from imm_jax.core import interpolants, losses, mmd
from imm_jax.core.losses import IMMObjective
from imm_jax.core.parameterization import Parameterization
from test_config import load
from tiny_net import TinyNet

RNG = np.random.default_rng(3)


def ref_weight(t, schedule, a, b):
    """Spec §3.4 straight from its definition, float64."""
    if schedule == "fm":
        al, sg = 1 - t, t
        dlam = 2 / (t * (1 - t))
    else:
        al, sg = np.cos(np.pi * t / 2), np.sin(np.pi * t / 2)
        dlam = 2 * np.pi / np.sin(np.pi * t)
    lam = 2 * np.log(al / sg)
    return 0.5 / (1 + np.exp(lam - b)) * dlam * al ** a / (al ** 2 + sg ** 2)


@pytest.mark.parametrize("schedule", ["fm", "cosine"])
@pytest.mark.parametrize("a,b", [(1, 5), (2, 4)])
def test_weight_matches_definition(schedule, a, b):
    t = RNG.uniform(0.001, 0.995, 64)
    out = losses.loss_weight(jnp.asarray(t, jnp.float32), schedule=schedule, a=a, b=b)
    np.testing.assert_allclose(out, ref_weight(t, schedule, a, b), rtol=3e-5)
    assert np.isfinite(float(losses.loss_weight(jnp.float32(0.0), schedule=schedule, a=a, b=b)))


def test_weight_table_from_spec():
    t = jnp.array([0.006, 0.05, 0.1, 0.2, 0.5, 0.9, 0.994])
    np.testing.assert_allclose(losses.loss_weight(t, schedule="fm", a=1, b=5),
                               [0.907, 6.44, 7.89, 6.64, 3.97, 1.35, 1.02], rtol=5e-3)
    np.testing.assert_allclose(losses.loss_weight(t, schedule="fm", a=2, b=4),
                               [0.333, 2.76, 4.42, 4.55, 1.96, 0.136, 0.0061], rtol=5e-3)


def test_gap_tables_from_spec():
    t = jnp.array([0.05, 0.3, 0.5, 0.7, 0.9, 0.99])
    s = jnp.zeros_like(t)
    cifar = losses.mapping_r(s, t, schedule="fm", k=15, t_min=0.006, t_max=0.994)
    imnet = losses.mapping_r(s, t, schedule="fm", k=12, t_min=0.0, t_max=0.994)
    # float32 r carries ~6e-8 absolute error, so compare gaps with that slack.
    np.testing.assert_allclose(t - cifar, [4.6e-3, 2.5e-3, 1.27e-3, 4.6e-4, 5.1e-5, 5.1e-7], rtol=2e-2, atol=1.2e-7)
    np.testing.assert_allclose(t - imnet, [3.8e-2, 2.0e-2, 1.03e-2, 3.7e-3, 4.1e-4, 4.0e-6], rtol=2e-2, atol=1.2e-7)
    assert losses.mapping_delta(schedule="fm", k=15, t_min=0.006, t_max=0.994) == pytest.approx(5.056e-3, rel=1e-3)
    assert losses.mapping_delta(schedule="fm", k=12, t_min=0.0, t_max=0.994) == pytest.approx(4.045e-2, rel=1e-3)


@pytest.mark.parametrize("schedule", ["fm", "cosine"])
def test_eta_mapping_matches_numpy(schedule):
    t_max = 0.994 if schedule == "fm" else 0.996
    t = RNG.uniform(0.05, 0.95, 64)
    s = t * RNG.uniform(0, 1, 64)
    delta = losses.mapping_delta(schedule=schedule, k=10, t_min=0.0, t_max=t_max)
    e = interpolants.eta(t, schedule) - delta
    ref = np.where(e < 0, s, np.maximum(s, interpolants.t_from_eta(np.maximum(e, 0), schedule)))
    out = losses.mapping_r(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), schedule=schedule, k=10,
                           t_min=0.0, t_max=t_max)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["eta", "t", "logsnr", "inv_eta"])
@pytest.mark.parametrize("min_gap", [0.0, 1e-2])
def test_mapping_bounds_and_base_case(kind, min_gap):
    t = jnp.asarray(RNG.uniform(0.006, 0.994, 256), jnp.float32)
    s = jnp.asarray(0.006 + RNG.uniform(0, 1, 256) * (np.asarray(t) - 0.006), jnp.float32)
    r = losses.mapping_r(s, t, schedule="fm", k=8, t_min=0.006, t_max=0.994, min_gap=min_gap, kind=kind)
    assert np.all(np.asarray(r) >= np.asarray(s)) and np.all(np.asarray(r) <= np.asarray(t))
    assert np.any(np.asarray(r) < np.asarray(t))
    if min_gap:
        assert np.all((np.asarray(t - r) >= min_gap * 0.999) | (np.asarray(r) == np.asarray(s)))


def test_base_case_survives():
    # ImageNet k = 12: eta_t < delta for t < 0.0389, so r = s there.
    t = jnp.array([0.01, 0.03, 0.038, 0.04, 0.1])
    s = jnp.array([0.005, 0.001, 0.02, 0.0, 0.0])
    r = losses.mapping_r(s, t, schedule="fm", k=12, t_min=0.0, t_max=0.994)
    np.testing.assert_array_equal(np.asarray(r)[:3], np.asarray(s)[:3])
    assert float(r[3]) > 0 and float(r[4]) > 0


def test_ablation_mappings_step_sizes():
    t = jnp.array([0.5])
    s = jnp.array([0.0])
    r_t = losses.mapping_r(s, t, schedule="fm", k=4, t_min=0.0, t_max=1.0, kind="t")
    np.testing.assert_allclose(t - r_t, 1 / 16, rtol=1e-6)
    r_t = losses.mapping_r(s, t, schedule="fm", k=4, t_min=0.1, t_max=0.9, kind="t")  # delta = (T - eps) / 2^k
    np.testing.assert_allclose(t - r_t, 0.8 / 16, rtol=1e-5)
    r_l = losses.mapping_r(s, t, schedule="fm", k=4, t_min=0.001, t_max=0.994, kind="logsnr")
    d_l = (float(interpolants.logsnr(0.001, "fm")) - float(interpolants.logsnr(0.994, "fm"))) / 16
    np.testing.assert_allclose(interpolants.logsnr(r_l, "fm") - interpolants.logsnr(t, "fm"), d_l, rtol=1e-4)
    # t_max = 0.8: 1 / eta(t_max) = 0.25 is a visible part of the span (at 0.994 it is 0.006 of ~199)
    # and t = 0.7, not 0.5: eta(0.5) = 1 = 1 / eta(0.5) would hide an eta taken for its inverse
    t7 = jnp.array([0.7])
    r_i = losses.mapping_r(s, t7, schedule="fm", k=4, t_min=0.005, t_max=0.8, kind="inv_eta")
    d_i = (1 / float(interpolants.eta(0.005, "fm")) - 1 / float(interpolants.eta(0.8, "fm"))) / 16
    np.testing.assert_allclose(1 / interpolants.eta(r_i, "fm") - 1 / interpolants.eta(t7, "fm"), d_i, rtol=1e-4)
    with pytest.raises(ValueError, match="t_min > 0"):
        losses.mapping_r(s, t, schedule="fm", k=4, t_min=0.0, t_max=0.994, kind="logsnr")


def make(objective_kwargs=None, num_classes=0, dropout=0.0):
    kw = dict(param=Parameterization(f_type="simple_edm"), t_min=0.006, t_max=0.994, particles=4, k=10)
    kw.update(objective_kwargs or {})
    if num_classes:
        kw.setdefault("null_label", num_classes)
    obj = IMMObjective(**kw)
    net = TinyNet(num_classes=num_classes, dropout=dropout)
    x = jnp.asarray(RNG.uniform(-1, 1, (8, 8, 8, 1)), jnp.float32)
    labels = jnp.arange(8) % 3 if num_classes else None
    params = net.init(jax.random.key(0), x, jnp.zeros(8), jnp.zeros(8), labels)["params"]
    return obj, net, params, x, labels


@pytest.mark.parametrize("f_type", ["simple_edm", "euler_fm", "identity"])
def test_loss_finite_value_and_gradient(f_type):
    obj, net, params, x, labels = make({"param": Parameterization(f_type=f_type)})
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: losses.imm_loss(net, p, x, labels, jax.random.key(1), objective=obj), has_aux=True)(params)
    assert np.isfinite(float(loss)) and float(loss) >= -1e-6
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    for key in ("k_tt", "k_rr", "k_tr", "loss_t0", "gap_t_r", "base_case_frac"):
        assert np.isfinite(float(metrics[key]))


def test_time_bin_metrics_are_four_bins_holding_each_groups_loss():
    # One group per batch (M = 8): its weighted loss lands in exactly one of loss_t0..loss_t3, the others are 0.
    obj, net, params, x, _ = make({"particles": 8})
    for seed in range(3):
        loss, metrics = losses.imm_loss(net, params, x, None, jax.random.key(seed), objective=obj)
        bins = sorted(k for k in metrics if k.startswith("loss_t"))
        assert bins == ["loss_t0", "loss_t1", "loss_t2", "loss_t3"]
        values = np.array([float(metrics[k]) for k in bins])
        assert np.count_nonzero(values) == 1
        np.testing.assert_allclose(values.sum(), float(loss), rtol=1e-6)


def test_loss_matches_manual_computation():
    """Rebuild the loss step by step from the public pieces with an independent time draw."""
    obj, net, params, x, _ = make()
    key = jax.random.key(5)
    loss, _ = losses.imm_loss(net, params, x, None, key, objective=obj)
    k_time, k_eps, _, _, _ = jax.random.split(key, 5)
    s, r, t = losses.sample_times(k_time, 2, obj)
    eps = 0.5 * jax.random.normal(k_eps, x.shape)
    rep = lambda v: jnp.repeat(v, 4)
    p = obj.param
    fn = losses.network_fn(net, params, train=True)
    yt = p.apply(fn, interpolants.add_noise(x, eps, rep(t), "fm"), rep(s), rep(t))
    yr = p.apply(fn, interpolants.add_noise(x, eps, rep(r), "fm"), rep(s), rep(r))
    wk = 1 / np.abs(np.asarray(p.c_out(s, t)))
    ref = np.mean(np.asarray(obj.weight(t)) *
                  mmd.grouped_mmd(yt.reshape(2, 4, -1), yr.reshape(2, 4, -1), kernel_weight=wk))
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_time_metrics_describe_the_groups_pairs():
    """gap_t_r is the mean of t - r and base_case_frac the share of groups with r = s (the induction's base case)
    over the batch's (s, r, t); k = 1 puts almost every pair in the base case, k = 10 few."""
    for k, seed in ((1, 0), (10, 1)):
        obj, net, params, x, _ = make({"k": k, "particles": 1})  # 8 groups
        key = jax.random.key(seed)
        _, metrics = losses.imm_loss(net, params, x, None, key, objective=obj)
        s, r, t = (np.asarray(v) for v in losses.sample_times(jax.random.split(key, 5)[0], 8, obj))
        np.testing.assert_allclose(float(metrics["gap_t_r"]), np.mean(t - r), rtol=1e-6)
        assert float(metrics["base_case_frac"]) == np.mean(r == s)
        assert (float(metrics["base_case_frac"]) > 0.5) == (k == 1)


def test_target_branch_contributes_no_gradient():
    """Gradient equals that of the loss with y_r replaced by a constant."""
    obj, net, params, x, _ = make()
    key = jax.random.key(2)
    g_full = jax.grad(lambda p: losses.imm_loss(net, p, x, None, key, objective=obj)[0])(params)

    def loss_const_target(p):
        k_time, k_eps, _, _, _ = jax.random.split(key, 5)
        s, r, t = losses.sample_times(k_time, 2, obj)
        eps = 0.5 * jax.random.normal(k_eps, x.shape)
        rep = lambda v: jnp.repeat(v, 4)
        yr = obj.param.apply(losses.network_fn(net, params, train=True),
                             interpolants.add_noise(x, eps, rep(r), "fm"), rep(s), rep(r))
        yt = obj.param.apply(losses.network_fn(net, p, train=True),
                             interpolants.add_noise(x, eps, rep(t), "fm"), rep(s), rep(t))
        per = mmd.grouped_mmd(yt.reshape(2, 4, -1), yr.reshape(2, 4, -1), kernel_weight=obj.kernel_weight(s, t))
        return jnp.mean(obj.weight(t) * per)

    g_ref = jax.grad(loss_const_target)(params)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_base_case_target_is_exact_interpolant():
    """With r = s everywhere (k small), f_{s,r}(x_r) = f_{s,s}(x_s) = x_s = alpha_s x + sigma_s eps."""
    obj = IMMObjective(param=Parameterization(), t_min=0.006, t_max=0.994, particles=4, k=0)
    t = jnp.asarray(RNG.uniform(0.006, 0.994, 64), jnp.float32)
    s = 0.006 + jnp.asarray(RNG.uniform(0, 1, 64), jnp.float32) * (t - 0.006)
    np.testing.assert_array_equal(obj.r(s, t), s)  # delta = eta_max - eta_min > eta_t: base case
    x = jnp.asarray(RNG.normal(size=(64, 2, 2, 1)), jnp.float32)
    eps = 0.5 * jnp.asarray(RNG.normal(size=(64, 2, 2, 1)), jnp.float32)
    x_s = interpolants.add_noise(x, eps, s, "fm")
    junk = lambda x_in, t_in, s_in, labels: jnp.full_like(x_in, 7.0)
    np.testing.assert_allclose(obj.param.apply(junk, x_s, s, obj.r(s, t)), x_s, rtol=1e-6)


def test_fused_equals_two_pass_without_dropout():
    obj, net, params, x, labels = make(num_classes=3)
    fused = IMMObjective(**{**obj.__dict__, "fused": True})
    key = jax.random.key(4)
    l1, g1 = jax.value_and_grad(lambda p: losses.imm_loss(net, p, x, labels, key, objective=obj)[0])(params)
    l2, g2 = jax.value_and_grad(lambda p: losses.imm_loss(net, p, x, labels, key, objective=fused)[0])(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_label_dropout_is_shared_by_both_passes():
    seen = []

    class Spy(TinyNet):
        def __call__(self, x, t_in, s_in, labels=None, train=False):
            jax.debug.callback(lambda l: seen.append(np.asarray(l)), labels)
            return super().__call__(x, t_in, s_in, labels, train)

    obj, _, _, x, labels = make({"label_dropout": 0.5}, num_classes=3)
    net = Spy(num_classes=3)
    params = net.init(jax.random.key(0), x, jnp.zeros(8), jnp.zeros(8), labels)["params"]
    seen.clear()
    losses.imm_loss(net, params, x, labels, jax.random.key(9), objective=obj)
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[0], seen[1])
    assert np.any(seen[0] == 3) and np.any(seen[0] != 3)


def test_time_bin_metrics_match_numpy():
    # loss_ti = mean per-group loss over the groups whose t lies in the i-th quarter of [t_min, t_max].
    obj = make()[0]
    t = RNG.uniform(obj.t_min, obj.t_max, 64)
    per_group = RNG.uniform(0.0, 1.0, 64)
    got = losses._time_bin_metrics(jnp.asarray(per_group, jnp.float32), jnp.asarray(t, jnp.float32), obj)
    width = (obj.t_max - obj.t_min) / 4
    for i in range(4):
        inside = (t >= obj.t_min + i * width) & (t < obj.t_min + (i + 1) * width)
        assert inside.sum() >= 5
        np.testing.assert_allclose(float(got[f"loss_t{i}"]), per_group[inside].mean(), rtol=1e-5)
    # The last bin is closed (t = t_max belongs to it); empty bins report 0.
    top = losses._time_bin_metrics(jnp.array([1.0, 2.0, 3.0]), jnp.array([obj.t_max - 1e-4, obj.t_max, obj.t_max]),
                                   obj)
    assert [float(top[f"loss_t{i}"]) for i in range(4)] == [0.0, 0.0, 0.0, 2.0]


def test_label_dropout_replaces_a_fraction_p_by_the_null_class():
    labels = jnp.asarray(np.arange(20000) % 10, jnp.int32)
    out = np.asarray(losses.drop_labels(jax.random.key(4), labels, 0.2, 10))
    dropped = out == 10
    assert abs(dropped.mean() - 0.2) < 0.015  # binomial sd 0.003
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
    assert losses.drop_labels(jax.random.key(4), labels, 0.0, 10) is labels


def test_dropout_keys_choice():
    obj_ind, net, params, x, _ = make(dropout=0.5)
    obj_sh = IMMObjective(**{**obj_ind.__dict__, "dropout_keys": "shared"})
    # With r forced to t (k huge is not allowed to hit r = t exactly), compare the two passes' masks indirectly:
    # "shared" must give a different loss from "independent" under heavy dropout, and be deterministic.
    key = jax.random.key(3)
    l_ind = float(losses.imm_loss(net, params, x, None, key, objective=obj_ind)[0])
    l_sh = float(losses.imm_loss(net, params, x, None, key, objective=obj_sh)[0])
    assert l_ind != l_sh
    assert l_sh == float(losses.imm_loss(net, params, x, None, key, objective=obj_sh)[0])
    with pytest.raises(ValueError, match="fused"):
        IMMObjective(**{**obj_ind.__dict__, "dropout_keys": "shared", "fused": True})


def test_objective_validation():
    with pytest.raises(ValueError, match="not divisible"):
        obj, net, params, x, _ = make({"particles": 3})
        losses.imm_loss(net, params, x, None, jax.random.key(0), objective=obj)
    with pytest.raises(ValueError, match="class-conditional"):
        IMMObjective(label_dropout=0.1)
    with pytest.raises(ValueError, match="Unknown mapping"):
        IMMObjective(mapping="lambda")
    with pytest.raises(ValueError, match=r"eta\(1\) is infinite"):
        IMMObjective(t_max=1.0)  # OT-FM's eta = t / (1 - t)


def test_fm_loss_matches_manual_and_has_gradient():
    obj, net, params, x, labels = make({"label_dropout": 0.0}, num_classes=3)
    key = jax.random.key(6)
    loss, metrics = losses.fm_loss(net, params, x, labels, key, objective=obj)
    k_time, k_eps, _, _ = jax.random.split(key, 4)
    t = jax.random.uniform(k_time, (8,), jnp.float32, 0.006, 0.994)
    eps = 0.5 * jax.random.normal(k_eps, x.shape)
    tb = np.asarray(t)[:, None, None, None]
    x_t = (1 - tb) * np.asarray(x) + tb * np.asarray(eps)
    a_t, s_t = 1 - np.asarray(t), np.asarray(t)
    c_in = 1 / (0.5 * np.sqrt(a_t ** 2 + s_t ** 2))
    g = net.apply({"params": params}, jnp.asarray(c_in[:, None, None, None] * x_t, jnp.float32),
                  1000 * t, 1000 * t, labels=labels)
    ref = np.mean((0.5 * np.asarray(g) - (np.asarray(eps) - np.asarray(x))) ** 2) / 0.25
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
    grads = jax.grad(lambda p: losses.fm_loss(net, p, x, labels, key, objective=obj)[0])(params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_k_schedule_stages():
    """k rises by one per stage of k_ramp_steps / (k_end - k + 1) steps, then stays at k_end."""
    obj = IMMObjective(k=7, k_end=10, k_ramp_steps=400)
    steps = [0, 99, 100, 199, 200, 299, 300, 399, 400, 10_000]
    got = [float(obj.k_at(jnp.asarray(i))) for i in steps]
    assert got == [7, 7, 8, 8, 9, 9, 10, 10, 10, 10]
    assert obj.k_at(None) == 7 and IMMObjective(k=7).k_at(jnp.asarray(500)) == 7
    with pytest.raises(ValueError, match="k_end >= k"):
        IMMObjective(k=7, k_end=6, k_ramp_steps=10)
    with pytest.raises(ValueError, match="k_ramp_steps >= 1"):
        IMMObjective(k=7, k_end=8, k_ramp_steps=0)
    c = load("tiny")  # the same check for a config's schedule
    c.imm.k, c.imm.k_end, c.imm.k_ramp_steps = 6, 9, 0
    with pytest.raises(ValueError, match="k_ramp_steps >= 1"):
        IMMObjective.from_config(c.imm, num_classes=10)
    # the smallest valid schedules: k_end = k (constant), one ramp step (k_end from step 1 on)
    assert float(IMMObjective(k=7, k_end=7, k_ramp_steps=10).k_at(jnp.asarray(5))) == 7
    one = IMMObjective(k=7, k_end=8, k_ramp_steps=1)
    assert [float(one.k_at(jnp.asarray(i))) for i in (0, 1, 2)] == [7, 8, 8]


def test_k_schedule_loss_equals_constant_k_of_its_stage():
    """Under a schedule, the loss at a step is the loss of the constant-k objective of that stage (same key),
    and r(s, t) with a traced k equals r with the Python int; the mapping is delta = span / 2^k (spec §3.5)."""
    sched, net, params, x, _ = make({"k": 6, "k_end": 9, "k_ramp_steps": 40})
    key = jax.random.key(11)
    for step, k in ((0, 6), (15, 7), (25, 8), (39, 9), (1000, 9)):
        const = IMMObjective(param=sched.param, t_min=0.006, t_max=0.994, particles=4, k=k)
        l_s, m_s = jax.jit(lambda p, st: losses.imm_loss(net, p, x, None, key, objective=sched, step=st))(
            params, jnp.asarray(step))
        l_c, m_c = jax.jit(lambda p: losses.imm_loss(net, p, x, None, key, objective=const))(params)
        np.testing.assert_allclose(float(l_s), float(l_c), rtol=1e-6)
        assert float(m_s["k"]) == k and float(m_c["k"]) == k
    s = jnp.asarray(RNG.uniform(0.006, 0.3, 32), jnp.float32)
    t = jnp.asarray(RNG.uniform(0.3, 0.994, 32), jnp.float32)
    np.testing.assert_array_equal(
        losses.mapping_r(s, t, schedule="fm", k=jnp.float32(9.0), t_min=0.006, t_max=0.994),
        losses.mapping_r(s, t, schedule="fm", k=9, t_min=0.006, t_max=0.994))
    # the eta step is (eta(T) - eta(eps)) / 2^k: check it against the closed form of spec §3.5
    delta = (0.994 / 0.006 - 0.006 / 0.994) / 2 ** 9
    r_ref = np.maximum((np.float64(t) - delta * (1 - np.float64(t))) / (1 - delta * (1 - np.float64(t))),
                       np.float64(s))
    np.testing.assert_allclose(losses.mapping_r(s, t, schedule="fm", k=jnp.float32(9.0), t_min=0.006,
                                                t_max=0.994), r_ref, rtol=2e-6, atol=1e-6)


class ProbeNet:
    """A stand-in network (the networks contract's `apply`) that records the time inputs it is called with and
    returns zeros; run eagerly, so the recorded values are the ones the loss really used."""

    def __init__(self):
        self.calls = []

    def apply(self, variables, x_in, t_in, s_in, labels=None, train=False, rngs=None):
        self.calls.append((np.asarray(t_in, np.float64), np.asarray(s_in, np.float64)))
        self.dropout_keys = getattr(self, "dropout_keys", []) + [
            None if not rngs else np.asarray(jax.random.key_data(rngs["dropout"]))]
        return jnp.zeros_like(x_in)


def _ks_uniform(u):
    """Kolmogorov-Smirnov distance of samples u from U(0, 1)."""
    u = np.sort(np.asarray(u, np.float64))
    n = len(u)
    return max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))


def test_time_sampling_follows_the_spec():
    """Spec §3.6: per group one t ~ U(t_min, t_max), one s ~ U(t_min, t), r = r(s, t), shared by its M particles;
    read from what imm_loss feeds the network (online pass: (t, s), target pass: (r, s)), not from sample_times."""
    M, G = 4, 4000
    obj = IMMObjective(param=Parameterization(f_type="simple_edm", temb="s", time_scale=1000.0), t_min=0.006,
                       t_max=0.994, particles=M, k=10)
    net = ProbeNet()
    x = jnp.zeros((M * G, 2, 2, 1), jnp.float32)
    losses.imm_loss(net, {}, x, None, jax.random.key(0), objective=obj)
    (t_in, s_in), (r_in, s_in2) = net.calls
    t, s, r = t_in / 1000, s_in / 1000, r_in / 1000
    np.testing.assert_array_equal(s_in, s_in2)  # both passes at the same s
    for v in (t, s, r):  # one draw per group of M consecutive particles
        g = v.reshape(G, M)
        assert np.all(g == g[:, :1])
    t, s, r = t[::M], s[::M], r[::M]
    assert len(np.unique(t)) > 0.99 * G  # distinct draws across groups (float32 ties aside)
    # KS at n = 4000: the 0.1% critical value is 1.95 / sqrt(n) = 0.031
    assert _ks_uniform((t - 0.006) / (0.994 - 0.006)) < 0.031
    assert np.all(s >= 0.006 - 1e-6) and np.all(s <= t + 1e-6)
    assert _ks_uniform((s - 0.006) / (t - 0.006)) < 0.031  # s | t uniform on [t_min, t]
    # r from the spec's closed form (eta mapping, OT-FM: eta = t / (1 - t)), float64
    delta = (0.994 / 0.006 - 0.006 / 0.994) / 2 ** 10  # (eta_max - eta_min) / 2^k
    e = t / (1 - t) - delta
    ref = np.where(e <= 0, s, np.maximum(s, np.maximum(e, 0) / (1 + np.maximum(e, 0))))
    np.testing.assert_allclose(r, ref, rtol=2e-5, atol=1e-6)
    assert np.mean(r == s) > 0.05 and np.all(r < t)  # the base case happens; r always below t


@pytest.mark.parametrize("mode", ["shared", "independent"])
def test_dropout_keys_reach_the_two_passes(mode):
    """dropout_keys="shared": the online and target passes get the same dropout key (the same masks);
    "independent": different keys."""
    obj = IMMObjective(param=Parameterization(f_type="simple_edm"), t_min=0.006, t_max=0.994, particles=4, k=10,
                       dropout_keys=mode)
    net = ProbeNet()
    losses.imm_loss(net, {}, jnp.zeros((8, 2, 2, 1)), None, jax.random.key(3), objective=obj)
    online, target = net.dropout_keys
    assert online is not None and target is not None
    assert np.array_equal(online, target) == (mode == "shared")


def test_objective_defaults_are_the_papers_cifar10_recipe():
    """IMMObjective() / Parameterization() defaults = spec §4's CIFAR-10 column (literal values, not the config)."""
    o = IMMObjective()
    assert (o.t_min, o.t_max, o.particles, o.k, o.a, o.b) == (0.006, 0.994, 4, 15, 1.0, 5.0)
    assert (o.mapping, o.kernel, o.min_gap, o.label_dropout, o.null_label) == ("eta", "laplace", 0.0, 0.0, None)
    assert (o.dropout_keys, o.fused, o.k_end, o.k_ramp_steps) == ("independent", False, None, 0)
    p = o.param
    assert (p.f_type, p.schedule, p.sigma_d, p.temb, p.time_scale) == ("simple_edm", "fm", 0.5, "s", 1000.0)
    # and the packaged CIFAR-10 config builds the same objective
    from test_config import load
    assert IMMObjective.from_config(load("cifar10").imm) == o
