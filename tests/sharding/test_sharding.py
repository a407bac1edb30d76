"""A (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices gives the single-device logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ssah_jax import sharding
from ssah_jax.checkpoints import load_weights
from tests import tiny

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")


@pytest.mark.slow
def test_sharded_forward_matches_single_device(tmp_path):
    path = tiny.save(tiny.llama_config(num_attention_heads=4, num_key_value_heads=2), tmp_path / "hf")
    single = load_weights(path)
    ids, mask = tiny.random_batch(128, batch=4, left_pad=(0, 2, 4, 1))
    expected = np.asarray(single(jnp.asarray(ids), jnp.asarray(mask)))

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = load_weights(path, mesh=mesh)
    kernel = model.layers[0].mlp.gate_proj.kernel[...]
    assert kernel.sharding == NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))
    assert kernel.addressable_shards[0].data.shape == (32, 48)  # [64, 96] split 2 x 2
    down = model.layers[1].mlp.down_proj.kernel[...]
    assert down.sharding.spec == PartitionSpec("tensor", "fsdp")

    placed = sharding.shard_model(single, mesh)  # the same placement, after loading
    assert placed.layers[0].mlp.gate_proj.kernel[...].sharding == kernel.sharding

    graphdef, state = nnx.split(model)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    with jax.set_mesh(mesh), sharding.use_rules():
        logits = forward(state, jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding))
    assert len(logits.sharding.device_set) == 8
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-5


def test_unknown_logical_name_is_an_error():
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.logical_to_spec(("embed", "experts"))


def test_mesh_shape_must_fit_devices():
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 2})
    assert sharding.make_mesh({"data": -1, "tensor": 2}).shape == {"data": 4, "fsdp": 1, "tensor": 2}
