"""A small Linen network obeying the networks contract, for testing the math without the real backbones; random
weights for the real ones."""
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp


def perturbed(params, seed: int, scale: float):
    """params + scale * N(0, 1) noise in every entry (the backbones zero-initialise layers that would hide what a
    test looks at). One draw for the whole tree: a draw per leaf compiles one program per leaf shape."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return unravel(flat + scale * jax.random.normal(jax.random.key(seed), flat.shape))


class TinyNet(nn.Module):
    """G(x, t_in, s_in, labels): two convs modulated by both time inputs and an optional label embedding."""
    num_classes: int = 0
    features: int = 8
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, t_in, s_in, labels=None, train=False):
        emb = jnp.stack([jnp.sin(t_in / 300.0), jnp.cos(t_in / 300.0),
                         jnp.sin(s_in / 300.0), jnp.cos(s_in / 300.0)], axis=-1)
        emb = nn.Dense(self.features)(emb)
        if self.num_classes:
            emb = emb + nn.Embed(self.num_classes + 1, self.features)(labels)
        h = nn.Conv(self.features, (3, 3))(x)
        h = nn.silu(h + emb[:, None, None, :])
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Conv(x.shape[-1], (3, 3))(h)
