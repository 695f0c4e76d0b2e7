"""orbax checkpoints: round trip, separate items, sampling-only restore, keep-N, damaged latest -> previous."""
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imm_jax.training import checkpointing


def items(v):
    params = {"dense": {"kernel": jnp.full((3, 4), v, jnp.float32), "bias": jnp.arange(4.0) + v}}
    main = {"step": jnp.asarray(int(v), jnp.int32), "params": params,
            "opt_state": {"mu": jax.tree.map(lambda x: x * 0.5, params)}, "rng": jnp.array([1, 2], jnp.uint32)}
    ema = {"ema_0": jax.tree.map(lambda x: x + 0.25, params), "ema_1": jax.tree.map(lambda x: x - 0.25, params)}
    return main, ema


def cfg():
    return ml_collections.ConfigDict(dict(model=dict(name="dit", hidden_size=8),
                                          train=dict(ema_decays=(0.9999, 0.999)), sample=dict(steps=(1, 2))))


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree.structure(a) == jax.tree.structure(b)


def damage(item_dir):
    """Removes the array data of one saved item (what a crash mid-write or a lost file leaves)."""
    for name in os.listdir(item_dir):
        if name.startswith("ocdbt") or name == "d" or name == "manifest.ocdbt":
            p = item_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def test_round_trip_and_items(tmp_path):
    ck = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2)
    for s in (1, 2, 3):
        main, ema = items(s)
        ck.save(s, main, ema, cfg(), {"step": s})
    ck.wait()
    assert ck.all_steps() == [2, 3]  # keep-N
    assert {"config", "data", "ema", "state"} <= set(os.listdir(tmp_path / "3"))
    main_a, ema_a = items(3)
    step, main, ema, data = ck.restore(abstract(main_a), abstract(ema_a))
    ck.close()
    assert step == 3 and data == {"step": 3}
    assert_tree_equal(main, main_a)
    assert_tree_equal(ema, ema_a)


def test_restore_for_sampling_reads_only_ema_and_config(tmp_path):
    ck = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    main, ema = items(5)
    ck.save(5, main, ema, cfg(), {"step": 5})
    ck.close()
    shutil.rmtree(tmp_path / "checkpoints" / "5" / "state")  # sampling must not need the train state
    config, e = checkpointing.restore_for_sampling(str(tmp_path))
    assert config.model.hidden_size == 8 and tuple(config.sample.steps) == (1, 2)
    assert sorted(e) == ["0.999", "0.9999"]
    assert_tree_equal(e["0.9999"], ema["ema_0"])
    assert_tree_equal(e["0.999"], ema["ema_1"])
    # the step directory itself is accepted too
    _, e2 = checkpointing.restore_for_sampling(str(tmp_path / "checkpoints" / "5"))
    assert_tree_equal(e2["0.999"], ema["ema_1"])


def test_save_for_sampling_round_trip(tmp_path):
    params = items(2)[0]["params"]
    c = ml_collections.ConfigDict(dict(model=dict(name="unet", model_channels=4), train=dict(ema_decays=(0.9999,))))
    checkpointing.save_for_sampling(str(tmp_path / "conv"), params, c)
    config, e = checkpointing.restore_for_sampling(str(tmp_path / "conv"))
    assert list(e) == ["0.9999"] and config.model.model_channels == 4
    assert_tree_equal(e["0.9999"], params)


def test_damaged_latest_falls_back_to_previous(tmp_path, caplog):
    ck = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3, async_save=False)
    for s in (1, 2):
        main, ema = items(s)
        ck.save(s, main, ema, cfg(), {"step": s})
    ck.wait()
    damage(tmp_path / "2" / "state")  # the latest step's train state
    main_a, ema_a = items(1)
    with caplog.at_level("ERROR"):
        step, main, ema, _ = ck.restore(abstract(main_a), abstract(ema_a))
    ck.close()
    assert step == 1
    assert_tree_equal(main, main_a)
    assert any("step 2" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)


def test_no_checkpoint(tmp_path):
    ck = checkpointing.Checkpointer(str(tmp_path))
    main, ema = items(1)
    assert ck.restore(abstract(main), abstract(ema)) is None
    ck.close()
    with pytest.raises(FileNotFoundError):
        checkpointing.restore_for_sampling(str(tmp_path))


def test_sampling_restore_falls_back_past_a_damaged_latest(tmp_path, caplog):
    """restore_for_sampling: when the latest step's EMA cannot be read, the previous step's is used (logged);
    an explicit step is not silently replaced."""
    ck = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3, async_save=False)
    for s in (1, 2):
        main, ema = items(s)
        ck.save(s, main, ema, cfg(), {"step": s})
    ck.wait()
    ck.close()
    damage(tmp_path / "2" / "ema")
    with caplog.at_level("ERROR"):
        config, emas = checkpointing.restore_for_sampling(str(tmp_path))
    assert sorted(emas) == ["0.999", "0.9999"]
    assert_tree_equal(emas["0.9999"], items(1)[1]["ema_0"])  # step 1's EMA
    assert any("step 2" in r.getMessage() and "previous" in r.getMessage() for r in caplog.records)
    with pytest.raises(FileNotFoundError, match="No readable checkpoint"):
        checkpointing.restore_for_sampling(str(tmp_path / "2"))
