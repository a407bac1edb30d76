"""Training checkpoints (``ssah_jax.checkpoints.TrainCheckpoints``): when a save starts, and
what a restore gives back."""

import jax.numpy as jnp
import numpy as np

from ssah_jax.checkpoints.manager import TrainCheckpoints


def test_saves_every_n_steps_and_when_forced_never_at_the_first_step(tmp_path):
    state = {"w": jnp.arange(3.0), "step": jnp.array(0)}
    checkpoints = TrainCheckpoints(tmp_path / "c", every=3, keep=10)
    started = []
    for step in range(1, 8):
        state = {"w": state["w"] + 1, "step": jnp.array(step)}
        started.append(checkpoints.save(step, state, {"step": step}, force=step == 7))
    checkpoints.close()
    assert started == [False, False, True, False, False, True, True]
    assert sorted(int(p.name) for p in (tmp_path / "c").iterdir() if p.name.isdigit()) == [3, 6, 7]
    reopened = TrainCheckpoints(tmp_path / "c", every=3, keep=10)
    restored, meta = reopened.restore(state, step=6)
    assert meta == {"step": 6} and int(restored["step"]) == 6
    np.testing.assert_array_equal(restored["w"], np.arange(3.0) + 6)
    assert reopened.latest_step() == 7
    reopened.close()
