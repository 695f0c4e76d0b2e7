"""The training state pytree: step, params, optimizer state, EMA copies (one per decay), base RNG key."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """All mutable training state; a pytree of arrays.

    step: int32 scalar, number of optimizer updates applied.
    params: network parameters (float32).
    opt_state: optax state for `params`.
    ema: tuple of parameter trees, one per decay in `config.train.ema_decays` (same order).
    rng: raw uint32 PRNG key (2,); per-step keys are `fold_in(rng, step)`, so resuming is exact.
    """
    step: jax.Array
    params: Any
    opt_state: Any
    ema: tuple
    rng: jax.Array

    def split_for_checkpoint(self) -> tuple[dict, dict]:
        """(state item without EMA, EMA item) so that sampling can restore EMA alone."""
        main = {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}
        ema = {f"ema_{i}": e for i, e in enumerate(self.ema)}
        return main, ema

    @classmethod
    def join_from_checkpoint(cls, main: dict, ema: dict) -> "TrainState":
        n = len(ema)
        return cls(step=main["step"], params=main["params"], opt_state=main["opt_state"],
                   ema=tuple(ema[f"ema_{i}"] for i in range(n)), rng=main["rng"])


def create(params, tx, ema_decays, rng) -> TrainState:
    """Initial state: EMAs start at the initial params."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=tuple(params for _ in ema_decays), rng=rng)


def ema_update(ema: tuple, params, decays) -> tuple:
    """ema_d <- d * ema_d + (1 - d) * params for every decay d."""
    return tuple(
        jax.tree.map(lambda e, p, d=d: (d * e + (1.0 - d) * p).astype(e.dtype), e_tree, params)
        for e_tree, d in zip(ema, decays))
