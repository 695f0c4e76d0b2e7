"""CIFAR-10 (unconditional, 32x32x3), the paper's recipe (spec §4, Table 5).

    TFDS_DATA_DIR=/data/tfds python -m imm_jax.main --config=configs/cifar10.py --workdir=runs/cifar10

Data: tfds `cifar10` prepared as array_record (`tfds build cifar10 --file_format=array_record` where internet
is available; TensorFlow is not needed to read it). Set TFDS_DATA_DIR or --config.data.path.
Recipe: DDPM++ (55.7M + s-embedding), Simple-EDM + OT-FM, sigma_d 0.5, t ~ U(0.006, 0.994), M = 4, k = 15,
a = 1, b = 5, Laplace kernel, dropout 0.2, x-flip, RAdam lr 1e-4 (0.9, 0.999, eps 1e-8), no weight decay,
batch 4096, 400K steps, EMA 0.9999. Sampling: 1 step [0.994, 0.006]; 2 steps with eta(t1) = 1.4.
Augmentation: x-flip of the data, and EDM's non-leaking pipeline (x/y flip, isotropic and anisotropic scaling,
rotation, fractional translation) with p = 0.12 and its 9-entry label fed to DDPM++'s map_augment (EDM's CIFAR-10
setting; the paper enables EDM augmentation but gives no probability, spec §4). `configs/cifar10.py:augment=P` sets
the probability; augment=0 turns it off and drops the embedding (the released cifar10.pt has none).
"""
import ml_collections

from imm_jax import networks
from imm_jax.configs import base


def get_config(arg=None):
    args = base.parse_args(arg, "cifar10", dict(augment="0.12"), {})
    try:
        p = float(args["augment"])
    except ValueError:
        raise ValueError(f"configs/cifar10.py: augment={args['augment']!r} must be a probability, e.g. 0.12 "
                         "(EDM's), or 0 for no augmentation (and no augment embedding).") from None
    c = base.get_config(networks.unet_config(image_size=32, in_channels=3, num_classes=0,
                                             augment_dim=9 if p > 0 else 0))
    c.imm.update(dict(k=15, label_dropout=0.0))
    c.data.update(dict(source="tfds", name="cifar10", random_flip=True, augment_p=p))
    c.optim.name = "radam"
    # FID during training on the 10k CIFAR-10 test images (tfds); the paper's FID uses 50k samples vs the train set
    # (python -m imm_jax.evaluation on exported samples).
    c.eval.every = 20000
    c.sample.update(dict(steps=(1, 2), grid="etas", mid_etas=ml_collections.ConfigDict(dict(s1=(), s2=(1.4,))),
                         cfg_scale=1.0))
    return c
