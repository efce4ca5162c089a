"""shard_batch / prefetch_to_device on 4 simulated CPU devices (in a subprocess: XLA_FLAGS
must be set before jax is imported, and this test process may already have imported it)."""

import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import grain
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec

    from diffvit_jax.data import sharding

    assert jax.device_count() == 4, jax.devices()
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == 4

    host = {"image": np.arange(8 * 6 * 6 * 3, dtype=np.float32).reshape(8, 6, 6, 3),
            "label": np.arange(8, dtype=np.int32)}
    batch = sharding.shard_batch(host, mesh)
    image = batch["image"]
    assert image.shape == (8, 6, 6, 3), image.shape
    assert image.sharding.spec == PartitionSpec("data"), image.sharding
    assert len(image.addressable_shards) == 4
    assert {s.data.shape for s in image.addressable_shards} == {(2, 6, 6, 3)}
    assert len({s.device for s in image.addressable_shards}) == 4
    np.testing.assert_array_equal(np.asarray(image), host["image"])

    # The jitted step sees the sharded batch and keeps the sharding.
    @jax.jit
    def step(b):
      return b["image"] * 2, jnp.sum(b["label"])
    doubled, total = step(batch)
    assert int(total) == 28 and doubled.sharding.spec == PartitionSpec("data")

    # A batch that does not split over the devices is a clear error.
    from diffvit_jax.errors import ConfigError
    try:
      sharding.shard_batch({"x": np.zeros((6, 2))}, mesh)
      raise AssertionError("6 examples on 4 devices must fail")
    except ConfigError as e:
      assert "multiple of the device count" in str(e)

    # Device prefetch: same batches; its state is that of the next unconsumed batch.
    def host_iter():
      return iter(grain.MapDataset.range(64).map(lambda i: np.full((2,), i, np.float32))
                  .batch(4).to_iter_dataset())
    it = sharding.prefetch_to_device(host_iter(), mesh, size=3)
    first = [np.asarray(next(it)) for _ in range(2)]
    assert [b[:, 0].tolist() for b in first] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    state = it.get_state()
    expected = np.asarray(next(it))
    resumed = sharding.prefetch_to_device(host_iter(), mesh, size=3)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.asarray(next(resumed)), expected)
    assert len(list(sharding.prefetch_to_device(iter([host]), mesh))) == 1
    print("ok")
    """)


def test_shard_batch_on_four_cpu_devices():
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")
