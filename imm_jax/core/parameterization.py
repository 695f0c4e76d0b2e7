"""The one-step map f_{s,t}(x_t) = c_skip(s,t) x_t + c_out(s,t) G(c_in(t) x_t, c_noise) (spec §2, §5).

f_type (paper name)       c_skip(s,t)                          c_out(s,t)
"identity"    (Identity)    sigma_s / sigma_t                     alpha_s - alpha_t sigma_s / sigma_t
"simple_edm"  (Simple-EDM)  (a_t a_s + s_t s_s) / (a_t^2+s_t^2)   -(a_s s_t - a_t s_s) sigma_d / sqrt(a_t^2+s_t^2)
"euler_fm"    (Euler-FM)    1                                     -(t - s) sigma_d          (schedule "fm" only)

c_in(t) = 1 / (sigma_d sqrt(alpha_t^2 + sigma_t^2)) for every variant (the paper's main text misprints it).
Every variant satisfies f_{s,s} = identity, and reproduces DDIM(x_t, x, s, t) when G is its ideal target.

The network comes in as `net_fn(x_in, t_in, s_in, labels) -> G`, batch-leading, times (B,).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp

from imm_jax.core import interpolants

F_TYPES = ("identity", "simple_edm", "euler_fm")
TEMB_TYPES = ("s", "stride")

NetFn = Callable[..., jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class Parameterization:
    """How network outputs become f_{s,t}(x_t), and how times become network inputs.

    Attributes:
      f_type: "identity" | "simple_edm" | "euler_fm".
      schedule: "fm" | "cosine".
      sigma_d: data / prior standard deviation (0.5 in the paper).
      temb: second time input: "s" gives time_scale * s, "stride" gives time_scale * (t - s).
      time_scale: c_noise(t) = time_scale * t (1000 in the paper).
    """
    f_type: str = "simple_edm"
    schedule: str = "fm"
    sigma_d: float = 0.5
    temb: str = "s"
    time_scale: float = 1000.0

    def __post_init__(self):
        interpolants.check_schedule(self.schedule)
        if self.f_type not in F_TYPES:
            raise ValueError(f"Unknown f_type {self.f_type!r}; expected one of {F_TYPES}.")
        if self.f_type == "euler_fm" and self.schedule != "fm":
            raise ValueError("f_type='euler_fm' is defined for the OT-FM schedule only: set "
                             "schedule='fm', or use f_type='simple_edm' with schedule='cosine'.")
        if self.temb not in TEMB_TYPES:
            raise ValueError(f"Unknown temb {self.temb!r}; expected 's' (second input c_noise(s)) "
                             "or 'stride' (second input c_noise(t - s)).")
        if not self.sigma_d > 0:
            raise ValueError(f"sigma_d must be positive, got {self.sigma_d}.")

    def c_in(self, t):
        a_t, s_t = interpolants.alpha_sigma(t, self.schedule)
        return 1.0 / (self.sigma_d * jnp.sqrt(a_t ** 2 + s_t ** 2))

    def c_skip_out(self, s, t):
        """(c_skip(s,t), c_out(s,t)) of f_{s,t}; c_out is also the kernel bandwidth's scale."""
        s = jnp.asarray(s)
        t = jnp.asarray(t)
        if self.f_type == "euler_fm":
            return jnp.ones_like(t), -(t - s) * self.sigma_d
        a_s, s_s = interpolants.alpha_sigma(s, self.schedule)
        a_t, s_t = interpolants.alpha_sigma(t, self.schedule)
        if self.f_type == "identity":
            # At t = s = 0 the ratio is 0/0; the limit of the map is the identity.
            same = t <= s
            ratio = jnp.where(same, 1.0, s_s / jnp.where(same, 1.0, s_t))
            return ratio, jnp.where(same, 0.0, a_s - a_t * ratio)
        norm2 = a_t ** 2 + s_t ** 2
        cross = interpolants.signal_noise_cross(s, t, self.schedule)
        return (a_t * a_s + s_t * s_s) / norm2, -cross * self.sigma_d / jnp.sqrt(norm2)

    def c_out(self, s, t):
        return self.c_skip_out(s, t)[1]

    def time_inputs(self, s, t):
        """Network time inputs (t_in, s_in), each (B,) float32: c_noise(t) and c_noise(s or t - s)."""
        t = jnp.asarray(t, jnp.float32)
        s = jnp.asarray(s, jnp.float32)
        second = s if self.temb == "s" else t - s
        return self.time_scale * t, self.time_scale * second

    def network_output(self, net_fn: NetFn, x_t, s, t, labels=None, cfg_scale=None,
                       null_label: Optional[int] = None):
        """G(c_in(t) x_t, c_noise(t), c_noise(s or t - s), labels), float32, guided if cfg_scale is set.

        Classifier-free guidance acts on this raw output: G_w = G(null) + w (G(c) - G(null)). None (or a
        Python 1.0) disables it; otherwise null_label (= num_classes) is required.
        """
        s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), x_t.shape[:1])
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x_t.shape[:1])
        x_in = interpolants.expand_like(self.c_in(t), x_t) * x_t.astype(jnp.float32)
        t_in, s_in = self.time_inputs(s, t)
        guided = (cfg_scale is not None and labels is not None
                  and not (isinstance(cfg_scale, (int, float)) and cfg_scale == 1.0))
        if not guided:
            return net_fn(x_in, t_in, s_in, labels).astype(jnp.float32)
        if null_label is None:
            raise ValueError("classifier-free guidance needs null_label (= num_classes).")
        both = lambda v: jnp.concatenate([v, v], axis=0)
        null = jnp.full_like(labels, null_label)
        g = net_fn(both(x_in), both(t_in), both(s_in), jnp.concatenate([null, labels], 0))
        g_uncond, g_cond = jnp.split(g.astype(jnp.float32), 2, axis=0)
        return g_uncond + cfg_scale * (g_cond - g_uncond)

    def apply(self, net_fn: NetFn, x_t, s, t, labels=None, cfg_scale=None,
              null_label: Optional[int] = None):
        """f_{s,t}(x_t).

        Args:
          net_fn: G = net_fn(x_in, t_in, s_in, labels), shapes as x_t.
          x_t: (B, H, W, C) samples at time t.
          s, t: (B,) target and current times, s <= t.
          labels: (B,) int class ids or None.
          cfg_scale, null_label: classifier-free guidance, see `network_output`.
        Returns:
          (B, H, W, C) f_{s,t}(x_t), float32.
        """
        s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), x_t.shape[:1])
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x_t.shape[:1])
        g = self.network_output(net_fn, x_t, s, t, labels, cfg_scale, null_label)
        c_skip, c_out = self.c_skip_out(s, t)
        x_t = x_t.astype(jnp.float32)
        return interpolants.expand_like(c_skip, x_t) * x_t + interpolants.expand_like(c_out, x_t) * g

    def velocity(self, net_fn: NetFn, x_t, t, labels=None, cfg_scale=None, null_label: Optional[int] = None):
        """Flow-matching velocity dx_t/dt = eps - x predicted as sigma_d G(., c_noise(t), c_noise(s = t)).

        The flow-matching baseline (`losses.fm_loss`) trains the same networks to this target with s = t,
        which is the Euler-FM parameterisation's instantaneous limit; schedule "fm" only.
        """
        if self.schedule != "fm":
            raise ValueError("the flow-matching baseline uses the OT-FM path: set imm.schedule='fm'.")
        return self.sigma_d * self.network_output(net_fn, x_t, t, t, labels, cfg_scale, null_label)
