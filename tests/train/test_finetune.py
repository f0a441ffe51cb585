"""Fine-tuning imported models: selection, train steps, LoRA, orbax checkpoints, Flax, export."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import optax
import pytest

import onnx2jax
from onnx2jax import train
from onnx2jax.core.errors import InputError
from onnx2jax.train.checkpoint import Checkpointer
from onnx2jax.train.lora import LoRA
from tests.core.test_export import tiny_model
from tests.models.exports import minilm_inputs


def ort_outputs(path: Path, feeds: dict) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def initializer_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in onnx.load(str(path)).graph.initializer}


def assert_export_matches(
    model: onnx2jax.Model,
    params: dict,
    path: Path,
    feeds: dict,
    trained: set[str],
    source: Path | onnx.ModelProto,
    atol: float = 1e-5,
) -> None:
    """The saved file runs in onnxruntime like model.apply(params); only ``trained`` changed."""
    model.save(path, params)
    got = ort_outputs(path, feeds)
    want = model.apply(params, **feeds)
    for name, value in got.items():
        np.testing.assert_allclose(value, np.asarray(want[name]), atol=atol, rtol=0)
    before = (
        initializer_bytes(source)
        if isinstance(source, Path)
        else {t.name: t.SerializeToString() for t in source.graph.initializer}
    )
    after = initializer_bytes(path)
    assert list(before) == list(after)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == trained


# ------------------------------------------------------------------------------ selection
def test_selection_by_glob_regex_predicate_and_all():
    model = onnx2jax.load(tiny_model())
    params = model.params
    assert train.trainable_names(params) == ["w", "b", "scale"]
    assert train.trainable_names(params, "[wb]") == ["w", "b"]
    assert train.trainable_names(params, re.compile("^sc")) == ["scale"]
    assert train.trainable_names(params, lambda name, v: v.shape == (4,) and name != "b") == [
        "w",
        "scale",
    ]
    assert train.trainable_names(params, ["w", re.compile("b")]) == ["w", "b"]
    assert train.trainable_names(params, "mul_scale", model=model) == ["scale"]  # node name
    assert train.trainable_names(params, False) == []
    with pytest.raises(InputError, match="selects no float param"):
        train.trainable_names(params, "encoder.*")
    # Non-float values never train, whatever the selector says.
    assert train.trainable_names({"ids": jnp.arange(3), "w": jnp.ones(2)}, "*") == ["w"]
    trainable, frozen = train.split(params, "w")
    assert list(trainable) == ["w"] and list(frozen) == ["b", "scale"]
    assert train.merge(trainable, frozen).keys() == params.keys()


def test_frozen_params_get_no_optimizer_state_and_shared_weight_is_one_param():
    """``w`` feeds two nodes (Mul and Sub): one param, whose gradient sums both uses."""
    model = onnx2jax.load(tiny_model())
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)

    def loss_fn(params, batch):
        return jnp.sum(model.apply(params, batch)["y"] ** 2)

    trainable, frozen = train.split(model.params, "w")
    optimizer = optax.adam(1e-2)
    state = train.init(trainable, optimizer)
    assert [p.shape for p in jax.tree.leaves(state.opt_state)] == [(), (4,), (4,)]
    step = train.make_train_step(loss_fn, optimizer)
    grads = jax.grad(loss_fn)(model.params, x)
    state, metrics = step(state, frozen, x)
    # Adam's first moment after one step is (1 - b1) * grad: the summed gradient of both uses.
    np.testing.assert_allclose(state.opt_state[0].mu["w"], 0.1 * grads["w"], rtol=1e-6)
    assert set(state.params) == {"w"}
    w, b, scale = (np.asarray(model.params[k]) for k in ("w", "b", "scale"))
    np.testing.assert_allclose(
        grads["w"], np.sum(2 * (x * w + b - w) * scale**2 * (x - 1), axis=0), rtol=1e-5
    )
    assert float(metrics["loss"]) == pytest.approx(float(loss_fn(model.params, x)), rel=1e-6)
    # model.params survive donation of the state.
    assert np.isfinite(np.asarray(model.params["w"])).all()
    # Evaluation and the example loop.
    evaluate = train.make_eval_step(loss_fn)
    before = train.evaluate(evaluate, trainable, frozen, [x])["loss"]
    result = train.fit(
        loss_fn, optimizer, trainable, [x] * 30, steps=30, frozen=frozen, progress=False
    )
    assert train.evaluate(evaluate, result.state.params, frozen, [x])["loss"] < before
    assert result.params.keys() == model.params.keys()
    assert result.params["b"] is frozen["b"]


def test_train_and_eval_steps_compile_with_the_models_xla_options():
    """By default the steps jit with model(...)'s options (on the CPU, YNNPACK fusion off:
    faster fine-tuning steps); ``{}`` keeps XLA's defaults, and the numbers agree."""
    model, loss_fn, batches = digits_task()
    trainable, frozen = train.split(model.params, None)
    optimizer = optax.sgd(0.1)
    batch = batches(0)
    results, programs = [], []
    for options in (None, {}):
        step = train.make_train_step(loss_fn, optimizer, donate=False, compiler_options=options)
        state = train.init(trainable, optimizer)
        programs.append(step.lower(state, frozen, batch).compile().as_text())
        state, metrics = step(state, frozen, batch)
        evaluate = train.make_eval_step(loss_fn, compiler_options=options)
        results.append(
            (state.params, metrics["loss"], evaluate(state.params, frozen, batch)["loss"])
        )
    if jax.default_backend() == "cpu" and model.compiler_options:
        assert "ynn" not in programs[0] and "ynn" in programs[1]
    # Called in the caller's own trace (steps under lax.scan in their jit), where JAX refuses
    # a nested jit with compiler options, the step still runs.
    step = train.make_train_step(loss_fn, optimizer, donate=False)

    @jax.jit
    def one_step_scanned(state):
        return jax.lax.scan(lambda s, _: (step(s, frozen, batch)[0], None), state, None, length=1)[
            0
        ]

    scanned = one_step_scanned(train.init(trainable, optimizer)).params
    for name in scanned:
        np.testing.assert_allclose(scanned[name], results[0][0][name], rtol=1e-4, atol=1e-6)
    ours, xlas = results
    np.testing.assert_allclose(ours[1], xlas[1], rtol=1e-5)
    np.testing.assert_allclose(ours[2], xlas[2], rtol=1e-5)
    for name in ours[0]:
        np.testing.assert_allclose(ours[0][name], xlas[0][name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ orbax
def digits_task():
    model = onnx2jax.load(onnx2jax.example_path())
    data = np.load(onnx2jax.example_path().with_name("digits_samples.npz"))
    images, labels = data["images"], data["labels"]

    def loss_fn(params, batch):
        logits = model.apply(params, batch["image"])["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    def batches(step: int) -> dict:
        rows = np.random.default_rng(step).choice(len(images), 8, replace=False)
        return {"image": images[rows], "label": labels[rows]}

    return model, loss_fn, batches


def test_resumed_training_equals_uninterrupted(tmp_path: Path):
    model, loss_fn, batches = digits_task()
    optimizer = optax.adamw(1e-2)
    tuned, frozen = train.split(model.params, "10.*")
    full = train.fit(loss_fn, optimizer, tuned, batches, steps=6, frozen=frozen, progress=False)

    with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        first = train.fit(
            loss_fn,
            optimizer,
            tuned,
            batches,
            steps=3,
            frozen=frozen,
            progress=False,
            checkpointer=ckpt,
        )
        assert ckpt.all_steps() == [2, 3]
    assert int(first.state.step) == 3
    # A new process would start here: fresh objects, the same folder.
    with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        resumed = train.fit(
            loss_fn,
            optimizer,
            tuned,
            batches,
            steps=6,
            frozen=frozen,
            progress=False,
            checkpointer=ckpt,
        )
        assert ckpt.all_steps() == [5, 6]
        assert len(resumed.history) == 3
        restored = ckpt.restore(train.init(tuned, optimizer), step=6)
    for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert full.losses[3:] == resumed.losses


def test_xla_flags_give_every_jit_in_a_process_the_models_options():
    """The README's way to give jits that take no options (``nnx.jit``) model(...)'s: XLA_FLAGS
    with the option the model passes to its own jit."""
    from onnx2jax.core.model import default_compiler_options

    options = default_compiler_options()
    if not options:
        pytest.skip("no options off the CPU or with ONNX2JAX_TUNE_XLA=0")
    ((name, value),) = options.items()
    script = (
        "import jax, jax.numpy as jnp\n"
        "f = jax.jit(lambda w, x: jnp.tanh(x @ w))\n"
        "print('ynn' in f.lower(jnp.ones((64, 64)), jnp.ones((8, 64))).compile().as_text())\n"
    )
    found = {}
    for flags in ("", f"--{name}={value}"):
        env = {**os.environ, "XLA_FLAGS": flags}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        found[flags] = done.stdout.strip().splitlines()[-1]
    assert list(found.values()) == ["True", "False"]


# ------------------------------------------------------------------------------ Flax NNX
def test_nnx_head_on_imported_backbone(tmp_path: Path):
    from flax import nnx

    from onnx2jax.train.nnx import OnnxFrozen, OnnxModule

    model, _, batches = digits_task()

    class Classifier(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.backbone = OnnxModule(model, trainable="/10/Gemm")
            self.head = nnx.Linear(10, 10, rngs=rngs)

        def __call__(self, x):
            return self.head(jax.nn.relu(self.backbone(x)["logits"]))

    net = Classifier(nnx.Rngs(0))
    optimizer = nnx.Optimizer(net, optax.adam(1e-2), wrt=nnx.Param)
    # Only the Gemm weights and the head train; the convolutions are frozen.
    assert len(jax.tree.leaves(nnx.state(optimizer.opt_state))) == 1 + 2 * 4
    frozen_before = {
        k: np.asarray(v[...]) for k, v in net.backbone.weights.items() if isinstance(v, OnnxFrozen)
    }
    assert sorted(frozen_before) == sorted(k for k in model.params if k.startswith("onnx::"))

    @nnx.jit
    def step(net, optimizer, batch):
        def loss_fn(net):
            logits = net(batch["image"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(net)
        optimizer.update(net, grads)
        return loss

    batch = batches(0)
    losses = [float(step(net, optimizer, batch)) for _ in range(40)]
    assert losses[-1] < losses[0] / 2
    for name, value in frozen_before.items():
        np.testing.assert_array_equal(np.asarray(net.backbone.weights[name][...]), value)
    params = net.backbone.onnx_params()
    assert_export_matches(
        model,
        params,
        tmp_path / "backbone.onnx",
        {"image": batch["image"]},
        {"10.weight", "10.bias"},
        onnx2jax.example_path(),
    )


# ------------------------------------------------------------------------------ CNN with BatchNorm
def export_bn_cnn(path: Path) -> Path:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.BatchNorm2d(4),
        torch.nn.Conv2d(4, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.BatchNorm2d(8),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 3 * 3, 2),
    )
    with torch.no_grad():  # non-trivial running statistics, as after real training
        for module in net:
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    net.eval()
    torch.onnx.export(
        net,
        (torch.zeros(1, 1, 8, 8),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        opset_version=17,
        dynamo=False,
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    return path


def test_cnn_with_batchnorm_finetunes_end_to_end(tmp_path: Path):
    source = export_bn_cnn(tmp_path / "bn_cnn.onnx")
    model = onnx2jax.load(source)
    assert [n.op_type for n in model.proto.graph.node].count("BatchNormalization") == 2
    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
    labels = images[:, 0, :4].mean(axis=(1, 2)) > images[:, 0, 4:].mean(axis=(1, 2))
    labels = labels.astype(np.int64)

    def loss_fn(params, batch):
        logits = model.apply(params, batch[0])["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    # Everything trains but the running statistics.
    trainable, frozen = train.split(model.params, lambda name, _: "running" not in name)
    assert frozen and all("running" in k for k in frozen)
    result = train.fit(
        loss_fn,
        optax.adam(2e-2),
        trainable,
        lambda _: (images, labels),
        steps=40,
        frozen=frozen,
        progress=False,
    )
    assert result.losses[-1] < result.losses[0] / 2, result.losses
    assert_export_matches(
        model, result.params, tmp_path / "tuned.onnx", {"image": images}, set(trainable), source
    )


# ------------------------------------------------------------------------------ MiniLM
def minilm_task(model: onnx2jax.Model):
    """Eight fixed sentences, two classes: a linear head on the pooled output."""
    feeds = minilm_inputs(8, 8, seed=3)
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1])

    def logits_of(params, batch):
        hidden = model.apply(params["onnx"], **batch["feeds"])["pooler_output"]
        return hidden @ params["head"]["w"] + params["head"]["b"]

    def loss_fn(params, batch):
        logits = logits_of(params, batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    head = {"w": jnp.zeros((384, 2)), "b": jnp.zeros(2)}
    return {"feeds": feeds, "labels": labels}, loss_fn, head


def test_minilm_finetune_export_matches_onnxruntime(minilm_legacy_onnx: Path, tmp_path: Path):
    model = onnx2jax.load(minilm_legacy_onnx)
    batch, loss_fn, head = minilm_task(model)
    # The last encoder layer trains (by node name: its MatMul weights are onnx::MatMul_*).
    tuned, frozen = train.split(model.params, "*layer.5*", model=model)
    assert len(tuned) == 16
    result = train.fit(
        loss_fn,
        optax.adam(3e-3),
        {"onnx": tuned, "head": head},
        lambda _: batch,
        steps=12,
        frozen={"onnx": frozen},
        progress=False,
    )
    assert result.losses[-1] < result.losses[0] / 2, result.losses
    assert_export_matches(
        model,
        result.params["onnx"],
        tmp_path / "tuned.onnx",
        minilm_inputs(2, 8, seed=5),
        set(tuned),
        minilm_legacy_onnx,
    )


def test_minilm_lora_on_attention(minilm_legacy_onnx: Path, tmp_path: Path):
    model = onnx2jax.load(minilm_legacy_onnx)
    batch, _, _ = minilm_task(model)
    lora = LoRA(
        model, targets=re.compile(r"attention/self/(query|key|value)/MatMul$"), rank=4, alpha=8
    )
    assert len(lora.targets) == 18

    def loss_fn(params, batch):
        pooled = lora.apply(params, **batch["feeds"])["pooler_output"]
        return optax.softmax_cross_entropy_with_integer_labels(
            4 * pooled[:, :2], batch["labels"]
        ).mean()

    adapters = lora.init(jax.random.key(0))
    optimizer = optax.adam(1e-2)
    state = train.init(adapters, optimizer)
    leaves = jax.tree_util.tree_leaves_with_path(state.opt_state)
    keys = {path[-1].key for path, _ in leaves if path and hasattr(path[-1], "key")}
    assert keys == set(lora.adapter_names)
    result = train.fit(
        loss_fn, optimizer, adapters, lambda _: batch, steps=12, frozen=model.params, progress=False
    )
    assert result.losses[-1] < result.losses[0] / 2, result.losses
    path = tmp_path / "lora.onnx"
    lora.save(path, result.params)
    saved = onnx.load(str(path))
    original = onnx.load(str(minilm_legacy_onnx))
    assert [n.SerializeToString() for n in saved.graph.node] == [
        n.SerializeToString() for n in original.graph.node
    ]
    feeds = minilm_inputs(2, 8, seed=5)
    want = lora.apply(result.params, **feeds)
    got = ort_outputs(path, feeds)
    for name in got:
        np.testing.assert_allclose(got[name], np.asarray(want[name]), atol=1e-5, rtol=0)
    targets = {t.weight for t in lora.targets}
    before = {t.name: t.SerializeToString() for t in original.graph.initializer}
    after = {t.name: t.SerializeToString() for t in saved.graph.initializer}
    assert {k for k in before if before[k] != after[k]} == targets
