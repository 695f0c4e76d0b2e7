"""The CPU GEMM of the linear and convolution layers (imm_jax/kernels/cpu_dense.cc): values against NumPy for
every operand layout and block edge, convolutions, vmap, sharded jits and the UNet using it. The DiT using it and
the fallbacks: test_kernel_build.py; gradients of layers.linear / layers.conv2d: test_layer_vjps.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imm_jax import networks
from imm_jax.kernels import build, cpu_dense
from imm_jax.networks import layers
from test_layer_vjps import numpy_conv

needs_kernel = pytest.mark.skipif(not cpu_dense.available(),
                                  reason="no C++ compiler here: the CPU dense kernel is not built")


def normal(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def assert_close_to_float64(out, ref, k):
    # float32 products of k unit-normal terms: rounding ~sqrt(k) * 2^-24 relative to the terms' size.
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6 * np.sqrt(k) * 4)


@needs_kernel
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (7, 5, 17), (13, 1601, 33), (200, 64, 48), (97, 800, 15)],
                         ids=["1x1x1", "edges", "three-k-blocks", "two-row-blocks", "row-block-edge"])
def test_matches_numpy(m, k, n, transpose_a, transpose_b, with_bias):
    # Shapes straddle the 6 x 16 register tile, the 96-row task block and the 768-deep K block.
    a, b, bias = normal((m, k)), normal((k, n), 1), normal((n,), 2)
    ref = a.astype(np.float64) @ b.astype(np.float64) + (bias if with_bias else 0.0)
    a_arg = np.ascontiguousarray(a.T) if transpose_a else a
    b_arg = np.ascontiguousarray(b.T) if transpose_b else b
    out = jax.jit(lambda a, b, bias: cpu_dense.matmul(
        a, b, bias if with_bias else None, transpose_a=transpose_a, transpose_b=transpose_b))(a_arg, b_arg, bias)
    assert_close_to_float64(np.asarray(out), ref, k)


@needs_kernel
def test_does_not_read_what_the_output_held():
    # XLA may hand the kernel a reused buffer: every output element must be written, not accumulated into.
    a, b = normal((50, 900)), normal((900, 20), 1)
    f = jax.jit(lambda a, b: cpu_dense.matmul(a, b) + 0.0)
    first = np.asarray(f(a, b))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(a, b)), first)


def test_applies_only_to_float32_on_the_cpu():
    x = jnp.zeros((4, 3), jnp.float32)
    with build.switched_off():
        assert not cpu_dense.applies(x)
    assert cpu_dense.applies(x) == cpu_dense.preferred()
    assert not cpu_dense.applies(x, x.astype(jnp.bfloat16))


@needs_kernel
def test_the_layers_use_the_kernel_only_without_avx512_unless_forced(monkeypatch):
    x = jnp.zeros((4, 3), jnp.float32)
    for avx512, env, used in [(True, None, False), (True, "1", True), (False, None, True), (False, "1", True),
                              (False, "0", False), (True, "0", False)]:
        monkeypatch.setattr(cpu_dense, "host_has_avx512", lambda avx512=avx512: avx512)
        if env is None:
            monkeypatch.delenv(cpu_dense.ENV_SWITCH, raising=False)
        else:
            monkeypatch.setenv(cpu_dense.ENV_SWITCH, env)
        cpu_dense.available.cache_clear()
        assert cpu_dense.applies(x) == used, (avx512, env)
    monkeypatch.undo()
    cpu_dense.available.cache_clear()
    assert cpu_dense.applies(x)  # the suite's own setting (tests/conftest.py) forces the kernel


def test_host_has_avx512_reads_the_cpu_flags():
    flags = [line.split() for line in open("/proc/cpuinfo") if line.startswith("flags")]
    assert cpu_dense.host_has_avx512() == ("avx512f" in flags[0])


@needs_kernel
def test_vmap_folds_rows_or_falls_back():
    x, w, bias = normal((3, 10, 6)), normal((6, 5), 1), normal((5,), 2)
    folded = jax.jit(jax.vmap(lambda x: cpu_dense.matmul(x, w, bias)))
    assert "imm_matmul" in folded.lower(x).as_text()
    ref = x.astype(np.float64) @ w + bias
    assert_close_to_float64(np.asarray(folded(x)), ref, 6)
    ws = normal((3, 6, 5), 3)  # a batched weight: the jnp formula, same values
    out = jax.vmap(lambda x, w: cpu_dense.matmul(x, w, bias))(x, ws)
    assert_close_to_float64(np.asarray(out), np.einsum("bik,bkn->bin", x.astype(np.float64), ws) + bias, 6)


@needs_kernel
def test_row_sharded_jit_runs_per_shard_and_matches_one_device():
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    x, w, bias = normal((8, 16, 24)), normal((24, 40), 1), normal((40,), 2)
    loss = lambda x, w, b: jnp.mean(jnp.sin(layers.linear(x, w, b, "cpu")))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), out_shardings=(None, (sharding, None, None)))
    x_sharded = jax.device_put(x, sharding)
    hlo = step.lower(x_sharded, w, bias).compile().as_text()
    assert "all-gather" not in hlo  # forward and input gradient on each device's 2 x 16 rows
    assert hlo.count("f32[32,40]{1,0} custom-call") == 1 and hlo.count("f32[32,24]{1,0} custom-call") == 1
    value, grads = step(x_sharded, w, bias)
    with build.switched_off():
        ref_value, ref_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, bias)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("shape, k, pad", [((2, 5, 7, 3), 3, 1), ((1, 6, 6, 70), 3, 0), ((2, 4, 4, 2), 3, 2),
                                           ((3, 9, 8, 5), 5, 2), ((2, 3, 3, 4), 1, 0), ((1, 7, 7, 40), 5, 1)],
                         ids=["same", "valid-wide", "pad-2", "5x5", "1x1", "tap-across-k-blocks"])
def test_conv2d_matches_numpy(shape, k, pad):
    # 6-row panels cross image rows and images; with 5 x 5 x 40 = 1000 columns the 768-deep K block ends inside
    # tap 19 (columns 760-799).
    x, kernel = normal(shape), normal((k, k, shape[-1], 21), 1)
    out = jax.jit(lambda x, w: cpu_dense.conv2d(x, w, pad))(x, kernel)
    assert_close_to_float64(np.asarray(out), numpy_conv(x, kernel, pad), k * k * shape[-1])


@needs_kernel
@pytest.mark.parametrize("shape, kernel_shape, pad, stride", [((2, 9, 8, 3), (1, 3), (0, 1), 1),
                                                              ((2, 9, 8, 3), (3, 3), (0, 0), 2),
                                                              ((1, 10, 11, 4), (7, 1), (3, 0), 1),
                                                              ((1, 8, 8, 5), (3, 3), (1, 1), 2)],
                         ids=["1x3", "stride-2", "7x1", "stride-2-padded"])
def test_conv2d_rectangular_and_strided_match_numpy(shape, kernel_shape, pad, stride):
    # The FID Inception's convolutions: rectangular kernels, per-axis padding, stride 2.
    x, kernel = normal(shape), normal((*kernel_shape, shape[-1], 7), 1)
    out = jax.jit(lambda x, w: cpu_dense.conv2d(x, w, pad, stride=stride))(x, kernel)
    kh, kw = kernel_shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
    ho, wo = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
    ref = sum(np.einsum("bhwc,cd->bhwd", xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride],
                        kernel[i, j].astype(np.float64)) for i in range(kh) for j in range(kw))
    assert_close_to_float64(np.asarray(out), ref, kh * kw * shape[-1])


@needs_kernel
def test_conv2d_rejects_bad_shapes():
    with pytest.raises(ValueError, match="HWIO"):
        cpu_dense.conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 2, 5)), 1)
    with pytest.raises(ValueError, match="stride"):
        cpu_dense.conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 5)), 1, stride=0)


@needs_kernel
def test_conv2d_vmap_and_batch_sharded_jit():
    x, kernel = normal((3, 2, 6, 6, 4)), normal((3, 3, 4, 5), 1)
    folded = jax.jit(jax.vmap(lambda x: cpu_dense.conv2d(x, kernel, 1)))
    assert "imm_conv2d" in folded.lower(x).as_text()
    for i in range(3):
        assert_close_to_float64(np.asarray(folded(x)[i]), numpy_conv(x[i], kernel, 1), 36)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    xs = normal((8, 6, 6, 4))
    loss = lambda x, w: jnp.mean(jnp.sin(layers.conv2d(x, w, 1, "cpu")))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), out_shardings=(None, (sharding, None)))
    x_sharded = jax.device_put(xs, sharding)
    hlo = step.lower(x_sharded, kernel).compile().as_text()
    assert "all-gather" not in hlo  # forward and input gradient on each device's 2 images
    assert hlo.count("f32[2,6,6,5]{3,2,1,0} custom-call") == 1 and hlo.count("f32[2,6,6,4]{3,2,1,0} custom-call") == 1
    value, grads = step(x_sharded, kernel)
    with build.switched_off():
        ref_value, ref_grads = jax.value_and_grad(loss, argnums=(0, 1))(xs, kernel)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_unet_uses_the_kernels_with_the_same_output():
    config = networks.unet_config(image_size=8, in_channels=3, model_channels=16, channel_mult=(1, 2),
                                  num_blocks=1, attn_resolutions=(4,))
    net = networks.build(config)
    x = jnp.asarray(normal((2, 8, 8, 3)))
    t, s = jnp.array([0.9, 0.5]), jnp.array([0.1, 0.2])
    params = net.init(jax.random.PRNGKey(0), x, t, s, None)
    params = jax.tree.map(lambda p: p + 0.05 * jnp.asarray(normal(p.shape, 4)), params)
    apply = lambda p: net.apply(p, x, t, s, None)
    text = jax.jit(apply).lower(params).as_text()
    assert "imm_conv2d" in text and "imm_matmul" in text
    with build.switched_off():
        reference = apply(params)
    np.testing.assert_allclose(apply(params), reference, rtol=1e-4, atol=1e-5)

