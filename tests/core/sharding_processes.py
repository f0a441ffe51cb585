"""Data-parallel fine-tuning of a sharded model in one process or in several.

Run by tests/core/test_sharding.py: ``python tests/core/sharding_processes.py MODEL OUT
CHECKPOINTS [PROCESS COUNT PORT]``. With a process id, count and port it joins the others
through ``jax.distributed.initialize`` on 127.0.0.1 (CPU collectives over gloo); each process
writes to OUT the losses and the shards of the trained params its own devices hold, by their
index in the whole param, for the test to compare with a one-process run. The trained state is
checkpointed with orbax into the folder CHECKPOINTS (every process its own shards) and restored
into a fresh state; OUT says whether it came back the same. Then the trained model is saved
with external data as CHECKPOINTS-saved/tuned.onnx.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

STEPS = 3


def main(model_path: str, out: str, checkpoints: str, *joined: str) -> None:
    if joined:
        process, count, port = (int(v) for v in joined)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=count, process_id=process)
    import onnx2jax
    from onnx2jax import train
    from onnx2jax.train.checkpoint import Checkpointer

    assert len(jax.devices()) == 8, jax.devices()
    model = onnx2jax.load(model_path, sharding="fsdp")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 99, size=(8, 12)).astype(np.int64)
    mask = np.ones((8, 12), np.int64)
    rows = NamedSharding(model.mesh, P("data"))
    # Each process builds only the rows its devices hold.
    batch = tuple(
        jax.make_array_from_callback(v.shape, rows, lambda index, v=v: v[index])
        for v in (ids, mask)
    )

    def loss_fn(params, batch):
        logits = model.apply(params, *batch)["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1], batch[0][:, 1:]
        ).mean()

    optimizer = optax.adam(1e-3)
    trainable, frozen = train.split(model.params)
    state = train.init(trainable, optimizer)
    step = train.make_train_step(loss_fn, optimizer)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    shards = {"losses": np.array(losses)}
    for name, value in state.params.items():
        assert value.sharding == trainable[name].sharding, name
        for shard in value.addressable_shards:
            key = ";".join(f"{s.start}:{s.stop}" for s in shard.index)
            shards[f"{name}|{key}"] = np.asarray(shard.data)
    with Checkpointer(checkpoints) as checkpointer:
        checkpointer.save(STEPS, state, force=True)
        checkpointer.wait()
        restored = checkpointer.restore(train.init(trainable, optimizer))
    # The moments and params come back in their shards; the counts (scalars) as the fresh
    # state holds them.
    pairs = zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True)
    same = all(
        float(a) == float(b)
        if a.ndim == 0
        else a.sharding == b.sharding
        and all(
            np.array_equal(np.asarray(x.data), np.asarray(y.data))
            for x, y in zip(a.addressable_shards, b.addressable_shards, strict=True)
        )
        for a, b in pairs
    )
    shards["restored_same"] = np.array(same)
    # Every process saves; the first writes the file, from each param gathered in turn.
    saved = Path(f"{checkpoints}-saved") / "tuned.onnx"
    model.save(saved, train.merge(state.params, frozen), external_data=True)
    np.savez(out, **shards)
    if joined:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
