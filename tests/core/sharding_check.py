"""Sharded loading, running, fine-tuning, saving and checkpointing on 8 CPU devices.

Run by tests/core/test_sharding.py in a process of its own, since JAX fixes its device count
when it starts: ``JAX_NUM_CPU_DEVICES=8 python tests/core/sharding_check.py MODEL EXTERNAL OUT``.
MODEL is a GPT-2-style model with its weights inline, EXTERNAL the same model with external
data; what it measures goes to the JSON file OUT, for the test to check.
"""

from __future__ import annotations

import filecmp
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import onnxruntime
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import onnx2jax
from onnx2jax import train
from onnx2jax.core import export
from onnx2jax.core.sharding import ShardingError
from onnx2jax.train.checkpoint import Checkpointer
from onnx2jax.train.lora import LoRA

STEPS = 3


def batch_of(rows: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 99, size=(rows, 12)).astype(np.int64)
    mask = np.ones((rows, 12), np.int64)
    mask[1, 9:] = 0
    return ids, mask


def loss_for(model: onnx2jax.Model, apply=None):
    apply = apply or model.apply

    def loss_fn(params, batch):
        ids, mask = batch
        logits = apply(params, ids, mask)["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    return loss_fn


def steps(model: onnx2jax.Model, batch, trainable_params, frozen, loss_fn) -> dict:
    """STEPS adam steps; the params after each and whether their shardings stayed."""
    optimizer = optax.adam(1e-3)
    state = train.init(trainable_params, optimizer)
    before = {k: v.sharding for k, v in state.params.items()}
    step = train.make_train_step(loss_fn, optimizer)
    losses = []
    kept = True
    for _ in range(STEPS):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
        kept = kept and all(v.sharding == before[k] for k, v in state.params.items())
    return {"state": state, "losses": losses, "kept": kept}


def largest(a: dict, b: dict) -> float:
    return max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in a)


def shard_fractions(model: onnx2jax.Model) -> dict[str, list]:
    """Per param: its spec, and the fraction of its values each device holds."""
    found = {}
    for name, value in model.params.items():
        shards = value.addressable_shards
        fractions = sorted({shard.data.size / value.size for shard in shards})
        found[name] = [str(value.sharding.spec), fractions, len(shards)]
    return found


def saved_alike(a: Path, b: Path) -> bool:
    """The two saves' data files are byte-identical, and their .onnx files are too once each
    one's (randomly named) data file name is replaced by the other's."""
    [data_a] = a.parent.glob(f"{a.name}.*.data")
    [data_b] = b.parent.glob(f"{b.name}.*.data")
    same_data = filecmp.cmp(data_a, data_b, shallow=False)
    text_a = a.read_bytes().replace(data_a.name.encode(), data_b.name.encode())
    return same_data and text_a == b.read_bytes()


def main(inline: str, external: str, out: str) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    report: dict = {}
    ids, mask = batch_of(8)
    base = onnx2jax.load(inline)
    reference = np.asarray(base(input_ids=ids, attention_mask=mask)["logits"])
    plain = train.split(base.params)
    unsharded = steps(base, (ids, mask), *plain, loss_for(base))
    report["unsharded_losses"] = unsharded["losses"]
    tuned = train.merge(unsharded["state"].params, plain[1])

    for preset in ("fsdp", "tensor"):
        for source, path in (("inline", inline), ("external", external)):
            key = f"{preset}/{source}"
            model = onnx2jax.load(path, sharding=preset)
            entry = report[key] = {"shards": shard_fractions(model)}
            data = NamedSharding(model.mesh, P("data"))
            batch = jax.device_put((ids, mask), data)
            called = model(input_ids=ids, attention_mask=mask)["logits"]
            jitted = jax.jit(model.apply)(model.params, *batch)["logits"]
            entry["call_error"] = float(np.abs(np.asarray(called) - reference).max())
            entry["jit_error"] = float(np.abs(np.asarray(jitted) - reference).max())
            if source == "external":
                continue
            run = steps(model, batch, *train.split(model.params), loss_for(model))
            entry["losses"] = run["losses"]
            entry["kept_shardings"] = run["kept"]
            entry["step_error"] = largest(unsharded["state"].params, run["state"].params)
            # Saved with external data, tensor by tensor: byte for byte the unsharded save.
            params = train.merge(run["state"].params, train.split(model.params)[1])
            folder = Path(tempfile.mkdtemp())
            (folder / "a").mkdir()
            (folder / "b").mkdir()
            sharded_file, plain_file = folder / "a" / "tuned.onnx", folder / "b" / "tuned.onnx"
            model.save(sharded_file, params, external_data=True)
            base.save(plain_file, jax.device_get(params), external_data=True)
            entry["save_identical"] = saved_alike(sharded_file, plain_file)
            session = onnxruntime.InferenceSession(
                str(sharded_file), providers=["CPUExecutionProvider"]
            )
            (got,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
            want = np.asarray(base.apply(tuned, ids, mask)["logits"])
            entry["onnxruntime_error"] = float(np.abs(got - want).max())
            # Over the protobuf limit (lowered here) a sharded save streams to external data
            # unasked, from the params' shapes alone.
            limit, export.PROTO_LIMIT = export.PROTO_LIMIT, 1000
            try:
                model.save(folder / "big.onnx", params)
            finally:
                export.PROTO_LIMIT = limit
            entry["auto_external"] = len(list(folder.glob("big.onnx.*.data"))) == 1
            auto = onnx2jax.load(folder / "big.onnx")
            entry["auto_error"] = largest(tuned, auto.params)

    # fit: the same three steps through the loop.
    model = onnx2jax.load(inline, sharding="fsdp")
    trainable, frozen = train.split(model.params)
    batch = jax.device_put((ids, mask), NamedSharding(model.mesh, P("data")))
    fitted = train.fit(
        loss_for(model),
        optax.adam(1e-3),
        trainable,
        lambda i: batch,
        steps=STEPS,
        frozen=frozen,
        progress=False,
    )
    report["fit_losses"] = fitted.losses
    report["fit_error"] = largest(unsharded["state"].params, fitted.state.params)
    report["fit_kept"] = all(
        fitted.state.params[k].sharding == v.sharding for k, v in trainable.items()
    )

    # LoRA on the sharded weights: the same steps as on the unsharded model.
    lora_runs = []
    for candidate in (base, model):
        lora = LoRA(candidate, targets="*c_attn*", rank=2)
        adapters = lora.init(jax.random.key(0))
        run = steps(
            candidate,
            (ids, mask),
            adapters,
            dict(candidate.params),
            loss_for(candidate, lora.apply),
        )
        lora_runs.append(run)
    report["lora_losses"] = [r["losses"] for r in lora_runs]
    report["lora_error"] = largest(lora_runs[0]["state"].params, lora_runs[1]["state"].params)

    # Checkpoint and restore keep each array's sharding and values.
    run = steps(model, batch, trainable, frozen, loss_for(model))
    with Checkpointer(tempfile.mkdtemp()) as checkpointer:
        checkpointer.save(STEPS, run["state"], force=True)
        checkpointer.wait()
        like = train.init(trainable, optax.adam(1e-3))
        restored = checkpointer.restore(like)
    leaves = [jax.tree.leaves(tree) for tree in (run["state"], restored, like)]
    report["restored_equal"] = all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b, _ in zip(*leaves, strict=True)
    )
    report["restored_shardings"] = all(
        b.sharding == c.sharding for _, b, c in zip(*leaves, strict=True)
    )
    report["restored_sharded"] = [
        sum(
            len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
            for leaf in tree
        )
        for tree in leaves[1:]
    ]

    # A two-axis mesh: "tensor" splits over "model", batches over "data".
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    two = onnx2jax.load(inline, mesh=mesh, sharding="tensor")
    report["two_axis_specs"] = {k: str(v.sharding.spec) for k, v in two.params.items()}
    report["two_axis_error"] = float(
        np.abs(np.asarray(two(input_ids=ids, attention_mask=mask)["logits"]) - reference).max()
    )

    # Rules and callables, and the errors of ones that cannot apply.
    rules = onnx2jax.load(inline, sharding=[("*c_fc.weight", P(None, "data")), ("*", None)])
    report["rule_specs"] = {k: str(v.sharding.spec) for k, v in rules.params.items()}
    by_function = onnx2jax.load(
        inline, sharding=lambda name, shape, dtype: P("data") if shape[0] % 8 == 0 else None
    )
    report["function_specs"] = {k: str(v.sharding.spec) for k, v in by_function.params.items()}
    errors = {}
    for label, option in (
        ("preset", "zero3"),
        ("rule", ["*"]),
        ("spec", [("*", "data")]),
        ("axis", [("*c_fc.weight", P("model"))]),
        ("indivisible", [("*wte.weight", P("data"))]),
        ("explicit", jax.make_mesh((8,), ("data",))),
    ):
        try:
            if isinstance(option, jax.sharding.Mesh):
                onnx2jax.load(inline, mesh=option)
            else:
                onnx2jax.load(inline, sharding=option)
            errors[label] = None
        except ShardingError as exc:
            errors[label] = str(exc)
    report["errors"] = errors
    Path(out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
