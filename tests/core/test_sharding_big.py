"""A Llama-style model over 2 GB, sharded with "fsdp" on 8 CPU devices, within 1.2x its bytes.

Three processes, one after another, so that their memory never adds up: torch exports the
model (random weights, about 720M params) with external data; onnx2jax loads it on 8 devices,
runs it, trains 2 LoRA steps and saves it, reading its own peak resident memory (``VmHWM``)
after each (the save's alone: the peak is reset before it); onnxruntime runs the saved file.
On the CPU the devices are host memory, so the peak is everything the process held: the
model's bytes, the runtime, and what each step adds.
Run one step alone: ``python tests/core/test_sharding_big.py export|shard|check FOLDER``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
# Llama's layout at about 720M params, 2.9 GB of float32 weights: wide and shallow, since what
# a step adds beyond the weights (compiling, XLA's buffers) grows with the layers, not the width.
CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 2560,
    "intermediate_size": 6912,
    "num_hidden_layers": 8,
    "num_attention_heads": 20,
    "num_key_value_heads": 5,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "use_cache": False,
}
TOKENS = 8
# LoRA on the value projections (side branches beside their MatMuls).
TARGETS = "*v_proj*"
LORA_STEPS = 2
# Peak resident memory over the model's bytes that the sharded process may reach.
BUDGET = 1.2
# After the LoRA steps: the compiled step's memory is not yet within BUDGET (docs/sharding.md,
# "What is not there yet").
LORA_BUDGET = 1.3
# What the save may add, over the model's bytes, to the memory the process held before it.
SAVE_ADDS = 0.05


def inputs() -> dict[str, np.ndarray]:
    """Batch 1, TOKENS tokens; with a mask, as generation passes one (without it transformers
    traces a packed-sequence check the TorchScript exporter cannot convert)."""
    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (1, TOKENS), np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def export(folder: Path) -> None:
    """The model, exported by torch.onnx with its weights as external data (a file per
    tensor, as the TorchScript exporter writes them)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    with torch.no_grad():
        torch.onnx.export(
            Logits().eval(),
            tuple(torch.from_numpy(v) for v in inputs().values()),
            str(folder / "llama.onnx"),
            input_names=list(inputs()),
            output_names=["logits"],
            opset_version=17,
            dynamo=False,
            external_data=True,
        )


@pytest.fixture(scope="module")
def measured() -> tuple[dict, np.ndarray]:
    """The three steps, in a folder removed as soon as they are done (5 GB of files): the
    sharded process's report and onnxruntime's logits of the saved model."""
    with tempfile.TemporaryDirectory() as folder:
        where = Path(folder)
        _step("export", where)
        _step("shard", where, devices=8)
        _step("check", where)
        return json.loads((where / "report.json").read_text()), np.load(where / "onnxruntime.npy")


@pytest.mark.slow
def test_llama_over_2gb_on_eight_devices(measured):
    """Loads with "fsdp" on 8 devices and runs within BUDGET times the model's bytes of
    resident memory at its peak, trains LoRA within LORA_BUDGET, saves; onnxruntime runs the
    saved file and agrees."""
    report, got = measured
    size = report["model_bytes"]
    assert size > 2**31, size  # over the protobuf limit: external data for real
    peaks = {k: report[k] / size for k in ("load", "run", "lora")}
    assert peaks["load"] < BUDGET and peaks["run"] < BUDGET, peaks
    assert peaks["lora"] < LORA_BUDGET, peaks
    # Every param is split over the 8 devices, each holding 1/8.
    assert {tuple(v) for v in report["split"].values()} == {(1 / 8,)}, report["split"]
    assert report["targets"] == CONFIG["num_hidden_layers"]
    assert report["losses"][1] < report["losses"][0], report["losses"]
    want = np.asarray(report["tuned_logits"], np.float32)
    before = np.asarray(report["logits"], np.float32)
    assert np.abs(want - before).max() > 1e-4  # the LoRA steps changed the model
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_llama_over_2gb_save_adds_little(measured):
    """The save writes each param in blocks of rows put together from its shards: its peak (the
    high-water mark is reset just before it) is the memory held before it and a few blocks."""
    report, _ = measured
    assert (report["save"] - report["before_save"]) / report["model_bytes"] < SAVE_ADDS, report


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="the process holds more than BUDGET before the save (what the LoRA steps, the merge "
    "and its run leave): docs/sharding.md, 'What is not there yet'",
)
def test_llama_over_2gb_saves_within_budget(measured):
    report, _ = measured
    assert report["save"] / report["model_bytes"] < BUDGET, report


def _step(name: str, folder: Path, devices: int = 1) -> None:
    """One step of this file in a process of its own (so the processes' memory never adds
    up), JAX on ``devices`` CPU devices."""
    flags = f"--xla_force_host_platform_device_count={devices}"
    # On a busy host a device's thread may reach a collective long after the others: XLA's
    # default (40 s) would end the process.
    flags += " --xla_cpu_collective_call_terminate_timeout_seconds=1200"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("JAX_NUM_CPU_DEVICES", None)
    done = subprocess.run(
        [sys.executable, __file__, name, str(folder)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, (name, done.stdout[-3000:], done.stderr[-3000:])


def peak_bytes() -> int:
    """This process's peak resident memory so far (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def resident_bytes() -> int:
    """This process's resident memory now (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak() -> None:
    """Start ``VmHWM`` again from the resident memory now (Linux: ``clear_refs``, value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def shard(folder: Path) -> None:
    """Load with "fsdp" on 8 devices, run, train LORA_STEPS LoRA steps, save; the peak resident
    memory after each, the logits of the tuned model and the shards go to FOLDER."""
    import jax
    import optax

    import onnx2jax
    from onnx2jax import train
    from onnx2jax.train.lora import LoRA

    assert len(jax.devices()) == 8, jax.devices()
    report: dict = {"start": peak_bytes()}
    model = onnx2jax.load(folder / "llama.onnx", sharding="fsdp")
    report["load"] = peak_bytes()
    report["model_bytes"] = sum(v.nbytes for v in model.params.values())
    report["split"] = {
        k: sorted({s.data.size / v.size for s in v.addressable_shards})
        for k, v in model.params.items()
    }
    feed = inputs()
    report["logits"] = np.asarray(model(**feed)["logits"]).tolist()
    report["run"] = peak_bytes()

    lora = LoRA(model, targets=TARGETS, rank=4)
    report["targets"] = len(lora.targets)

    def loss_fn(params: dict, batch: dict) -> jax.Array:
        logits = lora.apply({**batch["frozen"], **params}, **batch["feed"])["logits"]
        tokens = batch["feed"]["input_ids"]
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    optimizer = optax.adam(1e-3)
    state = train.init(lora.init(jax.random.key(0)), optimizer)
    step = train.make_train_step(loss_fn, optimizer)
    losses = []
    for _ in range(LORA_STEPS):
        state, metrics = step(state, {}, {"frozen": model.params, "feed": feed})
        losses.append(float(metrics["loss"]))
    report["losses"] = losses
    report["lora"] = peak_bytes()
    # Folded under jit, not op by op: eager ops on arrays over 8 CPU devices each dispatch a
    # program with collectives, and on a busy host XLA's rendezvous of them stalled. Only the
    # target weights go through it: jit copies every param it returns.
    weights = {t.weight: model.params[t.weight] for t in lora.targets}
    merged = {**model.params, **jax.jit(lora.merge)({**weights, **state.params})}
    report["tuned_logits"] = np.asarray(jax.jit(model.apply)(merged, **feed)["logits"]).tolist()
    (folder / "tuned").mkdir()
    report["before_save"] = resident_bytes()
    reset_peak()
    model.save(folder / "tuned" / "tuned.onnx", merged, external_data=True)
    report["save"] = peak_bytes()
    (folder / "report.json").write_text(json.dumps(report))


def check(folder: Path) -> None:
    """onnxruntime's logits of the saved model, beside the report."""
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(folder / "tuned" / "tuned.onnx"), providers=["CPUExecutionProvider"]
    )
    (logits,) = session.run(["logits"], inputs())
    np.save(folder / "onnxruntime.npy", logits)


if __name__ == "__main__":
    step, where = sys.argv[1], Path(sys.argv[2])
    {"export": export, "shard": shard, "check": check}[step](where)
