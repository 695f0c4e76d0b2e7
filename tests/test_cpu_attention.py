"""The CPU attention kernel's plumbing: when it applies, vmap, sharded jit and large logits. The DiT using it and
the fallback when it cannot be built: test_kernel_build.py; values and gradients: test_attention_vjp.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imm_jax.kernels import cpu_attention
from imm_jax.networks import layers
from test_attention_vjp import numpy_attention

needs_kernel = pytest.mark.skipif(not cpu_attention.available(),
                                  reason="no C++ compiler here: the CPU attention kernel is not built")


def random_qkv(shape, scale=1.0, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def test_applies_only_to_float32_and_multiples_of_8():
    qkv = jnp.zeros((2, 16, 3, 2, 8), jnp.float32)
    with cpu_attention.switched_off():
        assert not cpu_attention.applies(qkv)
    assert cpu_attention.applies(qkv) == cpu_attention.available()
    assert not cpu_attention.applies(jnp.zeros((2, 12, 3, 2, 8), jnp.float32))
    assert not cpu_attention.applies(qkv.astype(jnp.bfloat16))


@needs_kernel
def test_large_logits_stay_finite_and_exact():
    # Logits up to ~+-500: softmax rows are (near) one-hot and exp underflows; the kernel must not overflow.
    # float32 logits of size L carry rounding ~L * 2^-24, which the softmax turns into relative errors of that
    # size: the kernel must be as accurate as the plain-JAX path, not more.
    qkv = random_qkv((2, 16, 3, 2, 8), scale=8.0)
    out = cpu_attention.attention(qkv)
    assert np.isfinite(np.asarray(out)).all()
    with cpu_attention.switched_off():
        plain = layers.attention(qkv, "cpu")
    reference = numpy_attention(*(qkv[:, :, i] for i in range(3)))
    assert np.abs(out - reference).max() <= 3 * np.abs(plain - reference).max() + 1e-6
    grad = jax.grad(lambda x: jnp.sum(cpu_attention.attention(x) ** 2))(qkv)
    assert np.isfinite(np.asarray(grad)).all()


@needs_kernel
def test_vmap_matches_per_slice():
    qkv = random_qkv((3, 2, 16, 3, 2, 8))
    g = random_qkv((3, 2, 16, 2, 8), seed=1)
    loss = lambda x, g: jnp.sum(cpu_attention.attention(x) * g)
    out = jax.vmap(cpu_attention.attention)(qkv)  # vmapped axes fold into the batch
    grads = jax.vmap(jax.grad(loss))(qkv, g)
    for i in range(3):
        np.testing.assert_allclose(out[i], cpu_attention.attention(qkv[i]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(grads[i], jax.grad(loss)(qkv[i], g[i]), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_batch_sharded_jit_runs_per_shard_and_matches_one_device():
    # The trainer's mesh layout: batch over ("data", "fsdp").
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    qkv = random_qkv((8, 16, 3, 2, 8))
    loss = lambda x: jnp.mean(jnp.sin(cpu_attention.attention(x)))
    step = jax.jit(jax.value_and_grad(loss), out_shardings=(None, sharding))
    hlo = step.lower(jax.device_put(qkv, sharding)).compile().as_text()
    assert "all-gather" not in hlo  # each device attends over its own 2 batch rows
    assert "f32[2,16,3,2,8]{4,3,2,1,0} custom-call" in hlo
    value, grad = step(jax.device_put(qkv, sharding))
    ref_value, ref_grad = jax.value_and_grad(loss)(qkv)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
