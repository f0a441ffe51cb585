"""onnx2jax and onnxruntime side by side on real-size models: ``python -m benchmarks.run``.

Builds the models offline (``benchmarks/models.py``), then for every case runs both engines in
one fresh process on the same inputs with interleaved calls (``onnx2jax.cli.bench.run_case``),
measures each engine's peak memory in processes of its own, and times the start-up of fresh
processes (plain, with the executable cache, from an ahead-of-time artifact). Quantized and
float16 models, tiny models timed per call (a stateful one's state fed back), and fine-tuning
steps against PyTorch (:func:`train_steps`) are cases too. Writes
``benchmarks/results/<name>.json`` and the table in ``benchmarks/README.md``, whose header
names the CPU and its vector width.

``--quick`` is a smoke run (2 timed runs, no memory or start-up); ``--model FILE`` benchmarks
one ONNX file of your own instead of the built-in cases.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.models import (  # noqa: E402
    MODELS_DIR,
    image_inputs,
    model_path,
    text_inputs,
    vad_inputs,
    vector_inputs,
)
from onnx2jax.core.model import PRECISIONS  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
README = HERE / "README.md"
TABLE_BEGIN = "<!-- results:begin (written by python -m benchmarks.run) -->"
TABLE_END = "<!-- results:end -->"


@dataclass(frozen=True)
class Case:
    """One benchmark: a model, its inputs, and what throughput counts.

    ``kind`` is ``"inference"`` (against onnxruntime), ``"per_call"`` (the same, for a model
    that runs in about a millisecond: ``block`` calls in a row per turn, ``runs`` times as many
    calls, the state fed back through ``carry``) or ``"train"`` (a fine-tuning step against
    PyTorch's on the module the ONNX file was exported from, with the optimizer ``train``).
    ``unoptimized_reference`` also checks onnx2jax against onnxruntime's unfused graph.
    """

    name: str
    model: str  # a name in benchmarks.models.BUILDERS, or a path to an .onnx file
    feeds: Callable[[], dict[str, np.ndarray]]
    items: int
    unit: str
    kind: str = "inference"
    carry: tuple[tuple[str, str], ...] = ()  # (output, input) fed back between calls
    block: int = 1
    train: str | None = None  # "adam" or "sgd", with kind "train"
    unoptimized_reference: bool = False


PER_CALL_BLOCK = 20

CASES = [
    Case("minilm_b1_s128", "minilm", lambda: text_inputs(1, 128), 1, "seq"),
    Case("minilm_b32_s128", "minilm", lambda: text_inputs(32, 128), 32, "seq"),
    Case("resnet50_b1", "resnet50", lambda: image_inputs(1), 1, "img"),
    Case("resnet50_b8", "resnet50", lambda: image_inputs(8), 8, "img"),
    Case(
        "gpt2_b1_s128",
        "gpt2",
        lambda: text_inputs(1, 128, vocab=50257, token_types=False),
        1,
        "seq",
    ),
    Case("vit_b16_b8", "vit_b16", lambda: image_inputs(8), 8, "img"),
    Case(
        "minilm_int8_b32_s128",
        "minilm_int8",
        lambda: text_inputs(32, 128),
        32,
        "seq",
        unoptimized_reference=True,
    ),
    Case(
        "resnet50_qdq_b8",
        "resnet50_qdq",
        lambda: image_inputs(8),
        8,
        "img",
        unoptimized_reference=True,
    ),
    Case(
        "minilm_fp16_b32_s128",
        "minilm_fp16",
        lambda: text_inputs(32, 128),
        32,
        "seq",
        unoptimized_reference=True,
    ),
    Case(
        "silero_vad_chunk512",
        "silero_vad",
        vad_inputs,
        1,
        "call",
        kind="per_call",
        carry=(("stateN", "state"),),
        block=PER_CALL_BLOCK,
    ),
    Case(
        "mlp5_b1",
        "mlp5",
        lambda: vector_inputs(1),
        1,
        "call",
        kind="per_call",
        block=PER_CALL_BLOCK,
    ),
    Case(
        "train_minilm_b8_s128_adam",
        "minilm",
        lambda: text_inputs(8, 128),
        8,
        "seq",
        kind="train",
        train="adam",
    ),
    Case(
        "train_resnet50_b8_sgd",
        "resnet50",
        lambda: image_inputs(8),
        8,
        "img",
        kind="train",
        train="sgd",
    ),
]
STARTUP_CASE = "minilm_b32_s128"


def _path_of(case: Case, models_dir: Path) -> Path:
    return Path(case.model) if case.model.endswith(".onnx") else model_path(case.model, models_dir)


def _python(args: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python ARGS`` from the repository root; parse the JSON of its last stdout line
    (or of all of stdout, for an indented document)."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    text = done.stdout.strip()
    return json.loads(text if text.startswith("{\n") else text.splitlines()[-1])


def busy_processes() -> int:
    """How many other pytest processes are running (the machine is noisy while any are)."""
    done = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False)
    return sum(
        1 for line in done.stdout.splitlines() if "pytest" in line and "benchmarks" not in line
    )


def cpu_steal_s() -> float | None:
    """CPU time this virtual machine's CPUs waited for the hypervisor since boot, in seconds
    (``/proc/stat``), or None where it is not reported. Other guests' load shows up here: it
    slows both engines, unevenly."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def wait_until_quiet(limit_s: float, log: Callable[[str], None] = print) -> int:
    """Wait up to ``limit_s`` seconds for other pytest processes to end; return how many remain."""
    deadline = time.monotonic() + limit_s
    busy = busy_processes()
    if busy:
        log(f"  waiting up to {limit_s:.0f} s for {busy} test process(es) to finish ...")
    while busy and time.monotonic() < deadline:
        time.sleep(5)
        busy = busy_processes()
    return busy


def vector_width(flags: set[str] | None = None, arch: str | None = None) -> dict[str, Any]:
    """The widest float vector unit of this CPU: AVX-512, AVX2, NEON, SSE or unknown, with its
    float32 lanes, from ``/proc/cpuinfo``'s flags (or the given ``flags`` and ``arch``).

    Example:
        >>> vector_width({"avx2", "fma", "avx512f"}, "x86_64")
        {'isa': 'AVX-512', 'float32_lanes': 16}
        >>> vector_width(set(), "arm64")
        {'isa': 'NEON', 'float32_lanes': 4}
    """
    if flags is None:
        flags = set()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags |= set(value.split())
    arch = (arch or platform.machine()).lower()
    if "avx512f" in flags:
        return {"isa": "AVX-512", "float32_lanes": 16}
    if "avx2" in flags:
        return {"isa": "AVX2", "float32_lanes": 8}
    if arch in ("arm64", "aarch64") or "asimd" in flags:
        return {"isa": "NEON", "float32_lanes": 4}
    if "sse2" in flags or arch in ("x86_64", "amd64"):
        return {"isa": "SSE", "float32_lanes": 4}
    return {"isa": "unknown", "float32_lanes": None}


def machine() -> dict[str, Any]:
    """The machine and the versions of everything measured."""
    import jax
    import onnx
    import onnxruntime

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    with contextlib.suppress(ValueError, OSError):
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    versions = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }
    for name in ("torch", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        "cpu": cpu,
        "vector": vector_width(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": memory,
        "os": platform.platform(),
        "jax_device": str(jax.devices()[0]),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": versions,
    }


def run_case_in_child(
    path: Path,
    feeds: dict[str, np.ndarray],
    items: int,
    runs: int,
    warmup: int,
    precision: str = "float32",
    env: dict[str, str] | None = None,
    carry: Sequence[tuple[str, str]] = (),
    block: int = 1,
    unoptimized_reference: bool = False,
) -> dict[str, Any]:
    """``onnx2jax.cli.bench.run_case`` in a fresh process (first-call times are then honest),
    with ``env`` added to its environment."""
    extra = [f"--carry={output}={name}" for output, name in carry]
    extra += ["--block", str(block)] + (["--unoptimized"] if unoptimized_reference else [])
    with tempfile.TemporaryDirectory() as folder:
        feeds_path = Path(folder) / "feeds.npz"
        np.savez(feeds_path, **feeds)
        return _python(
            [
                "-m",
                "benchmarks.run",
                "--child",
                str(path),
                str(feeds_path),
                "--runs",
                str(runs),
                "--warmup",
                str(warmup),
                "--items",
                str(items),
                "--precision",
                precision,
                *extra,
            ],
            env,
        )


def train_case_in_child(
    case: Case, path: Path, runs: int, warmup: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """:func:`train_steps` of ``case`` in a fresh process."""
    with tempfile.TemporaryDirectory() as folder:
        feeds_path = Path(folder) / "feeds.npz"
        np.savez(feeds_path, **case.feeds())
        return _python(
            [
                "-m",
                "benchmarks.run",
                "--train-child",
                case.model,
                str(path),
                str(feeds_path),
                str(case.train),
                "--runs",
                str(runs),
                "--warmup",
                str(warmup),
                "--items",
                str(case.items),
            ],
            env,
        )


LEARNING_RATES = {"adam": 1e-4, "sgd": 1e-3}


def train_steps(
    module_name: str,
    path: Path,
    feeds: dict[str, np.ndarray],
    optimizer: str,
    *,
    runs: int,
    warmup: int,
    items: int,
) -> dict[str, Any]:
    """Fine-tuning steps of the ONNX file at ``path`` (``onnx2jax.train.make_train_step``, every
    float param trains) and of the PyTorch module it was exported from, with the same
    optimizer (``"adam"``, or ``"sgd"`` with momentum 0.9), inputs and thread count, steps
    interleaved as :func:`onnx2jax.cli.bench.interleaved` times calls.

    The loss is the mean of ``pooler_output`` (text encoders) or the cross-entropy of
    ``logits`` against fixed labels. Both modules stay in eval mode (no dropout, BatchNorm's
    running statistics: the ONNX export folded them), so both compute one function and their
    first losses must agree. Returns a JSON-ready dict; ``ratio`` is onnx2jax / PyTorch.
    """
    import optax
    import torch

    import onnx2jax
    from benchmarks.models import MODULES
    from onnx2jax import train
    from onnx2jax.cli.bench import default_threads, interleaved

    threads = default_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = onnx2jax.load(path)
    load_s = time.perf_counter() - start
    module = MODULES[module_name]()
    output = "logits" if "logits" in model.output_names else "pooler_output"
    batch = len(next(iter(feeds.values())))
    labels = np.arange(batch) % module.config.num_labels if output == "logits" else None
    rate = LEARNING_RATES[optimizer]

    def loss_fn(params: dict[str, Any], data: tuple) -> Any:
        inputs, targets = data
        result = model.apply(params, **inputs)[output]
        if targets is None:
            return result.mean()
        return optax.softmax_cross_entropy_with_integer_labels(result, targets).mean()

    transform = optax.adam(rate) if optimizer == "adam" else optax.sgd(rate, momentum=0.9)
    trainable, frozen = train.split(model.params)
    step = train.make_train_step(loss_fn, transform)
    states = [train.init(trainable, transform)]

    def ours() -> float:
        states[0], metrics = step(states[0], frozen, (feeds, labels))
        return float(metrics["loss"])

    torch_feeds = {k: torch.from_numpy(v) for k, v in feeds.items()}
    torch_labels = None if labels is None else torch.from_numpy(labels)
    weights = [p for p in module.parameters() if p.requires_grad]
    torch_optimizer = (
        torch.optim.Adam(weights, lr=rate)
        if optimizer == "adam"
        else torch.optim.SGD(weights, lr=rate, momentum=0.9)
    )

    def theirs() -> float:
        torch_optimizer.zero_grad(set_to_none=True)
        result = getattr(module(**torch_feeds), output)
        loss = (
            result.mean()
            if torch_labels is None
            else torch.nn.functional.cross_entropy(result, torch_labels)
        )
        loss.backward()
        torch_optimizer.step()
        return float(loss.detach())

    firsts, losses = {}, {}
    for name, call in (("onnx2jax", ours), ("pytorch", theirs)):
        begin = time.perf_counter()
        losses[name] = call()
        firsts[name] = time.perf_counter() - begin
    samples = interleaved({"onnx2jax": ours, "pytorch": theirs}, runs, warmup)

    def summary(times: list[float]) -> dict[str, Any]:
        median = float(np.median(times))
        return {
            "median_ms": median,
            "min_ms": min(times),
            "runs": len(times),
            "throughput_per_s": items / (median / 1e3),
            "samples_ms": times,
        }

    return {
        "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()},
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "optimizer": optimizer,
        "learning_rate": rate,
        "loss": "cross_entropy(logits)" if labels is not None else "mean(pooler_output)",
        "trainable_params": {
            "onnx2jax": int(sum(np.size(v) for v in trainable.values())),
            "pytorch": int(sum(p.numel() for p in weights)),
        },
        "onnx2jax": {
            **summary(samples["onnx2jax"]),
            "load_s": load_s,
            "first_call_s": firsts["onnx2jax"],
        },
        "pytorch": {**summary(samples["pytorch"]), "first_call_s": firsts["pytorch"]},
        "first_loss": losses,
        "first_loss_rel_error": abs(losses["onnx2jax"] - losses["pytorch"])
        / max(abs(losses["pytorch"]), 1e-30),
        "ratio": float(np.median(samples["onnx2jax"]) / np.median(samples["pytorch"])),
    }


def _medians(processes: list[dict[str, Any]]) -> dict[str, Any]:
    """Each time's median over ``processes`` (one record each), and the records themselves."""
    times = [k for k in processes[0] if k.endswith("_s")]
    return {
        **{k: float(np.median([p[k] for p in processes])) for k in times},
        "processes": processes,
    }


def startup(path: Path, feeds: dict[str, np.ndarray], repeats: int = 3) -> dict[str, Any]:
    """First-call times of fresh processes: plain, cache (cold, warm), AOT (cold, warm).

    Each is measured ``repeats`` times, each time with empty caches, and reported as medians:
    one process's figure varied widely on this project's hosts for the same work.
    """
    runs: dict[str, list[dict[str, Any]]] = {}

    def measure(key: str, *args: str) -> None:
        runs.setdefault(key, []).append(_python(["-m", "benchmarks.startup", *args]))

    with tempfile.TemporaryDirectory() as folder:
        folder_path = Path(folder)
        feeds_path = folder_path / "feeds.npz"
        np.savez(feeds_path, **feeds)
        artifact = folder_path / "model.o2j"
        dims = (
            [
                f"--dim=batch={feeds['input_ids'].shape[0]}",
                f"--dim=sequence={feeds['input_ids'].shape[1]}",
            ]
            if "input_ids" in feeds
            else []
        )
        start = time.perf_counter()
        _python(
            [
                "-m",
                "onnx2jax",
                "compile",
                str(path),
                "-o",
                str(artifact),
                "--json",
                "--quiet",
                *dims,
            ]
        )
        compile_s = time.perf_counter() - start
        for repeat in range(repeats):
            cache, aot_cache = folder_path / f"cache{repeat}", folder_path / f"aot-cache{repeat}"
            measure("plain", "onnx", str(path), str(feeds_path))
            measure("cache_first_process", "onnx", str(path), str(feeds_path), str(cache))
            measure("cache_second_process", "onnx", str(path), str(feeds_path), str(cache))
            measure("aot", "aot", str(artifact), str(feeds_path))
            measure(
                "aot_cache_first_process", "aot", str(artifact), str(feeds_path), str(aot_cache)
            )
            measure(
                "aot_cache_second_process", "aot", str(artifact), str(feeds_path), str(aot_cache)
            )
        return {
            **{key: _medians(processes) for key, processes in runs.items()},
            "aot_compile_s": compile_s,
            "aot_artifact_mb": artifact.stat().st_size / 1e6,
        }


def run(
    cases: Sequence[Case],
    *,
    runs: int,
    warmup: int,
    memory: bool,
    with_startup: bool,
    models_dir: Path,
    quiet_wait: float = 0.0,
    log: Callable[[str], None] = print,
    precision: str = "float32",
    startup_repeats: int = 3,
    cpu_devices: int | None = None,
) -> dict[str, Any]:
    """Benchmark ``cases``; return the results document."""
    from onnx2jax.cli.bench import peak_memory

    document: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "benchmarks.run", *sys.argv[1:]]),
        "machine": machine(),
        "settings": {
            "runs": runs,
            "warmup": warmup,
            "memory": memory,
            "startup": with_startup,
            "startup_repeats": startup_repeats,
            "precision": precision,
            "cpu_devices": cpu_devices,
        },
        "busy_pytest_processes_at_start": busy_processes(),
        "cases": {},
    }
    # The child processes (cases, memory) get JAX's CPU devices; JAX fixes them at its start.
    env = {"JAX_NUM_CPU_DEVICES": str(cpu_devices)} if cpu_devices else {}
    for case in cases:
        path = _path_of(case, models_dir)
        feeds = case.feeds()
        count = runs * case.block
        log(f"{case.name}: timing {count} interleaved {'steps' if case.train else 'runs'} ...")
        before = wait_until_quiet(quiet_wait, log) if quiet_wait else busy_processes()
        steal, start = cpu_steal_s(), time.monotonic()
        try:
            if case.kind == "train":
                result = train_case_in_child(case, path, runs, warmup, env)
            else:
                result = run_case_in_child(
                    path,
                    feeds,
                    case.items,
                    count,
                    warmup,
                    precision,
                    env,
                    carry=case.carry,
                    block=case.block,
                    unoptimized_reference=case.unoptimized_reference,
                )
        except RuntimeError as exc:  # the other cases' figures are kept; this one is listed
            document.setdefault("failed", {})[case.name] = str(exc)[-3000:]
            log(f"  failed: {str(exc).strip().splitlines()[-1]}")
            continue
        stolen = cpu_steal_s()
        result.update(
            model=case.model,
            kind=case.kind,
            items=case.items,
            unit=case.unit,
            busy_pytest_processes=max(before, busy_processes()),
        )
        if steal is not None and stolen is not None:
            cpus = os.cpu_count() or 1
            result["steal_percent"] = 100 * (stolen - steal) / ((time.monotonic() - start) * cpus)
        if memory and case.kind != "train":
            for engine in ("onnx2jax", "onnxruntime"):
                result[engine]["memory"] = peak_memory(engine, path, feeds, env=env)
        document["cases"][case.name] = result
        reference = "pytorch" if case.kind == "train" else "onnxruntime"
        check = (
            f"first loss rel error {result['first_loss_rel_error']:.1e}"
            if case.kind == "train"
            else f"max rel error {result['max_rel_error']:.1e}"
        )
        log(
            f"  onnx2jax {result['onnx2jax']['median_ms']:.2f} ms, {reference} "
            f"{result[reference]['median_ms']:.2f} ms, ratio {result['ratio']:.2f}, {check}"
        )
    if with_startup:
        chosen = {c.name: c for c in cases}.get(STARTUP_CASE)
        if chosen is not None:
            log(f"start-up of fresh processes on {STARTUP_CASE} ({startup_repeats} of each) ...")
            if quiet_wait:
                wait_until_quiet(quiet_wait, log)
            try:
                document["startup"] = {
                    "case": STARTUP_CASE,
                    **startup(_path_of(chosen, models_dir), chosen.feeds(), startup_repeats),
                }
            except RuntimeError as exc:  # keep the timings already taken
                document["startup_error"] = str(exc)
                log(f"start-up measurement failed: {exc}")
    document["busy_pytest_processes_at_end"] = busy_processes()
    return document


# ------------------------------------------------------------------ reporting
def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def table(document: dict[str, Any]) -> str:
    """The Markdown table (and start-up table) of a results document."""
    rows = [
        "| case | onnx2jax median (min) ms | onnxruntime median (min) ms | ratio | "
        "back to back: o2j / ORT ms (ratio) | "
        "onnx2jax / ORT throughput | GFLOP/s (o2j / ORT) | first call s (o2j / ORT) | "
        "peak MB (o2j / ORT) | max error (abs / rel) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    info = document["machine"]
    vector = info.get("vector")
    header = (
        f"Host: {info['cpu']}, {vector['isa']} ({vector['float32_lanes']} float32 lanes), "
        f"{info['cores']} cores.\n\n"
        if vector
        else ""
    )
    training = {n: c for n, c in document["cases"].items() if c.get("kind") == "train"}
    for name, case in document["cases"].items():
        if name in training:
            continue
        ours, theirs = case["onnx2jax"], case["onnxruntime"]
        unit = case.get("unit", "item")
        flops = (
            f"{ours['gflop_per_s']:.0f} / {theirs['gflop_per_s']:.0f}"
            if "gflop_per_s" in ours
            else "-"
        )
        memory = (
            f"{ours['memory']['peak_increase_mb']:,.0f} / "
            f"{theirs['memory']['peak_increase_mb']:,.0f}"
            if "memory" in ours
            else "-"
        )
        b2b = (
            f"{_ms(ours['back_to_back_median_ms'])} / "
            f"{_ms(theirs['back_to_back_median_ms'])} ({case['back_to_back_ratio']:.2f})"
            if "back_to_back_ratio" in case
            else "-"
        )
        per_call = (
            f" ({ours['median_ms'] * 1e3:,.0f} / {theirs['median_ms'] * 1e3:,.0f} µs per call)"
            if case.get("kind") == "per_call"
            else ""
        )
        errors = f"{case['max_abs_error']:.1e} / {case['max_rel_error']:.1e}"
        if "max_rel_error_unoptimized" in case:
            errors += f" (unfused ORT: {case['max_rel_error_unoptimized']:.1e} rel)"
        rows.append(
            f"| {name} | {_ms(ours['median_ms'])} ({_ms(ours['min_ms'])}) | "
            f"{_ms(theirs['median_ms'])} ({_ms(theirs['min_ms'])}) | "
            f"**{case['ratio']:.2f}**{per_call} | {b2b} | {ours['throughput_per_s']:.1f} / "
            f"{theirs['throughput_per_s']:.1f} {unit}/s | {flops} | "
            f"{ours['first_call_s']:.2f} / {theirs['first_call_s']:.2f} | {memory} | "
            f"{errors} |"
        )
    text = header + "\n".join(rows)
    if training:
        lines = [
            "",
            "Fine-tuning steps against PyTorch (forward, backward, optimizer; the same module, "
            "inputs and threads; ratio = onnx2jax / PyTorch):",
            "",
            "| case | onnx2jax step median (min) ms | PyTorch step median (min) ms | ratio | "
            "first step s (o2j / PyTorch) | threads (XLA / torch) | first loss (o2j / PyTorch) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, case in training.items():
            ours, theirs = case["onnx2jax"], case["pytorch"]
            loss = case["first_loss"]
            lines.append(
                f"| {name} | {_ms(ours['median_ms'])} ({_ms(ours['min_ms'])}) | "
                f"{_ms(theirs['median_ms'])} ({_ms(theirs['min_ms'])}) | "
                f"**{case['ratio']:.2f}** | {ours['first_call_s']:.2f} / "
                f"{theirs['first_call_s']:.2f} | {case['threads']} / {case['torch_threads']} | "
                f"{loss['onnx2jax']:.6g} / {loss['pytorch']:.6g} |"
            )
        text += "\n" + "\n".join(lines)
    start = document.get("startup")
    if start:
        repeats = max(len(r.get("processes", [r])) for r in start.values() if isinstance(r, dict))
        each = (
            f"medians of {repeats} processes each, first call's range in brackets; "
            if repeats > 1
            else ""
        )
        lines = [
            "",
            f"Start-up of a fresh process, {start['case']} (seconds, {each}first "
            "call = load + trace + compile + first run, after imports):",
            "",
            "| process | import | load | first call | total |",
            "|---|---|---|---|---|",
        ]
        labels = {
            "plain": "onnx2jax.load, no cache",
            "cache_first_process": "cache_dir, first process (fills the cache)",
            "cache_second_process": "cache_dir, second process",
            "aot": "AOT artifact, no cache",
            "aot_cache_first_process": "AOT artifact + cache, first process",
            "aot_cache_second_process": "AOT artifact + cache, second process",
        }
        for key, label in labels.items():
            if key in start:
                r = start[key]
                firsts = [p["first_call_s"] for p in r.get("processes", [])]
                spread = f" ({min(firsts):.2f}-{max(firsts):.2f})" if len(firsts) > 1 else ""
                lines.append(
                    f"| {label} | {r['import_s']:.2f} | {r['load_s']:.2f} | "
                    f"**{r['first_call_s']:.2f}**{spread} | {r['total_s']:.2f} |"
                )
        lines.append("")
        lines.append(
            f"`onnx2jax compile` took {start['aot_compile_s']:.1f} s and wrote "
            f"{start['aot_artifact_mb']:.0f} MB."
        )
        text += "\n" + "\n".join(lines)
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    busy = max(
        document.get("busy_pytest_processes_at_start", 0),
        document.get("busy_pytest_processes_at_end", 0),
        *(c.get("busy_pytest_processes", 0) for c in document["cases"].values()),
    )
    text += (
        f"\n\nMachine: {info['cpu']}"
        + (f" ({vector['isa']})" if vector else "")
        + f", {info['cores']} cores, {info['memory_gib']} GiB; "
        f"{info['os']}. Versions: {versions}. {document['settings']['runs']} timed runs "
        f"per engine after {document['settings']['warmup']} warm-up rounds; "
        + (
            f"JAX with {devices} CPU devices, the batch split over them; "
            if (devices := document["settings"].get("cpu_devices"))
            else ""
        )
        + f"{document['date']}. "
        + (
            "The machine was quiet (no other test processes)."
            if not busy
            else f"Other test processes were running (up to {busy}): figures are noisy."
        )
    )
    steals = [c["steal_percent"] for c in document["cases"].values() if "steal_percent" in c]
    if steals:
        text += (
            f" The hypervisor took {min(steals):.1f}-{max(steals):.1f}% of the CPUs' time "
            "during the cases (steal time: other guests' load, which makes figures noisy)."
        )
    blocks = {c["block"] for c in document["cases"].values() if c.get("kind") == "per_call"}
    if blocks:
        runs = document["settings"]["runs"]
        text += (
            " Per-call cases: "
            + ", ".join(f"{runs * b} calls per engine, in turns of {b}" for b in sorted(blocks))
            + (
                ", each engine's state fed back into its next call"
                if any(c.get("carry") for c in document["cases"].values())
                else ""
            )
            + "."
        )
    for name, error in document.get("failed", {}).items():
        text += f"\n\n**{name} failed**: `{error.strip().splitlines()[-1]}`"
    return text


def write_readme(document: dict[str, Any], results_file: Path) -> None:
    """Replace the results section of benchmarks/README.md with this document's table."""
    relative = results_file.relative_to(HERE) if results_file.is_relative_to(HERE) else results_file
    section = (
        f"{TABLE_BEGIN}\n\nFrom `{relative}` (`{document['command']}`):\n\n"
        f"{table(document)}\n\n{TABLE_END}"
    )
    empty = f"# Benchmarks\n\n{TABLE_BEGIN}\n{TABLE_END}\n"
    text = README.read_text() if README.exists() else empty
    if TABLE_BEGIN in text and TABLE_END in text:
        text = re.sub(
            re.escape(TABLE_BEGIN) + ".*?" + re.escape(TABLE_END),
            lambda _: section,
            text,
            flags=re.S,
        )
    else:
        text += "\n" + section + "\n"
    README.write_text(text)


# ------------------------------------------------------------------ command line
def _child(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.run --child")
    parser.add_argument("model")
    parser.add_argument("feeds")
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--carry", action="append", default=[], metavar="OUTPUT=INPUT")
    parser.add_argument("--block", type=int, default=1)
    parser.add_argument("--unoptimized", action="store_true")
    args = parser.parse_args(argv)
    import onnx2jax
    from onnx2jax.cli.bench import run_case

    onnx2jax.tune_process()  # what the command line does; see onnx2jax/runtime/process.py

    with np.load(args.feeds) as data:
        feeds = {k: data[k] for k in data.files}
    result = run_case(
        args.model,
        feeds,
        runs=args.runs,
        warmup=args.warmup,
        items=args.items,
        load_options={"precision": args.precision},
        carry=dict(pair.split("=", 1) for pair in args.carry),
        block=args.block,
        unoptimized_reference=args.unoptimized,
    )
    import jax

    result["jax_devices"] = len(jax.local_devices())
    print(json.dumps(result))
    return 0


def _train_child(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.run --train-child")
    parser.add_argument("module", help="a name in benchmarks.models.MODULES")
    parser.add_argument("model")
    parser.add_argument("feeds")
    parser.add_argument("optimizer", choices=sorted(LEARNING_RATES))
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--items", type=int, required=True)
    args = parser.parse_args(argv)
    import onnx2jax

    onnx2jax.tune_process()
    with np.load(args.feeds) as data:
        feeds = {k: data[k] for k in data.files}
    result = train_steps(
        args.module,
        Path(args.model),
        feeds,
        args.optimizer,
        runs=args.runs,
        warmup=args.warmup,
        items=args.items,
    )
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m benchmarks.run``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 timed runs, 1 warm-up, no memory or start-up",
    )
    parser.add_argument(
        "--case",
        "--cases",
        action="append",
        default=[],
        metavar="NAME",
        help="run only these cases (repeatable, or comma-separated): "
        f"{', '.join(c.name for c in CASES)}",
    )
    parser.add_argument(
        "--model",
        metavar="FILE.onnx",
        help="benchmark this file instead (random inputs; see --dim)",
    )
    parser.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=SIZE",
        help="with --model: size of a named input dimension (default 1)",
    )
    parser.add_argument("--runs", type=int, default=10, help="timed runs per engine (10)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up rounds (2)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120,
        metavar="SECONDS",
        help="before each case, wait up to this long for other pytest "
        "processes to finish (120; 0: do not wait)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument("--no-startup", action="store_true", help="skip start-up times")
    parser.add_argument(
        "--startup-repeats",
        type=int,
        default=3,
        metavar="N",
        help="fresh processes per start-up figure, reported as medians (3)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=MODELS_DIR,
        help="where built models are cached (benchmarks/models)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="results file (default benchmarks/results/<date>.json, or quick.json with --quick)",
    )
    parser.add_argument(
        "--no-readme", action="store_true", help="do not rewrite the table in benchmarks/README.md"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=PRECISIONS[0],
        help="onnx2jax's precision policy for the timed calls (float32); any "
        "other is an opt-in figure: no memory, no start-up, and the "
        "table in benchmarks/README.md is left alone",
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        metavar="N",
        help="give JAX N CPU devices (JAX_NUM_CPU_DEVICES), over which "
        "model(...) splits a batch: an opt-in figure, no start-up, and "
        "the table in benchmarks/README.md is left alone",
    )
    parser.add_argument("--build-only", action="store_true", help="export the models and stop")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    if argv[:1] == ["--train-child"]:
        return _train_child(argv[1:])
    args = build_parser().parse_args(argv)
    if args.quick:
        args.runs, args.warmup, args.no_memory, args.no_startup = 2, 1, True, True
    opt_in = args.precision != PRECISIONS[0]
    if opt_in:  # the default figures stay the default policy's
        args.no_memory, args.no_startup, args.no_readme = True, True, True
    if args.cpu_devices:
        args.no_startup, args.no_readme = True, True
    if args.model:
        from onnx2jax.cli import make_inputs, parse_assignments
        from onnx2jax.core.model import load

        inputs = load(args.model).inputs
        dims = {k: int(v) for k, v in parse_assignments(args.dim, "--dim").items()}
        feeds = make_inputs(inputs, {}, dims)
        first = next(iter(feeds.values()))
        cases = [
            Case(
                Path(args.model).stem,
                str(Path(args.model).resolve()),
                lambda: feeds,
                int(first.shape[0]) if first.ndim else 1,
                "item",
            )
        ]
    else:
        known = {c.name: c for c in CASES}
        chosen = [n for names in args.case for n in names.split(",") if n]
        unknown = [n for n in chosen if n not in known]
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; choose from {sorted(known)}")
        cases = [known[n] for n in chosen] if chosen else CASES
    if opt_in or args.cpu_devices:
        # The fine-tuning steps know neither option: they would time the default.
        skipped = [c.name for c in cases if c.kind == "train"]
        cases = [c for c in cases if c.kind != "train"]
        if skipped:
            print(f"skipping {', '.join(skipped)}: --precision and --cpu-devices time inference")
    if args.build_only:
        for case in cases:
            print(_path_of(case, args.models_dir))
        return 0
    document = run(
        cases,
        runs=args.runs,
        warmup=args.warmup,
        memory=not args.no_memory,
        with_startup=not args.no_startup,
        models_dir=args.models_dir,
        quiet_wait=0.0 if args.quick else args.quiet_wait,
        precision=args.precision,
        startup_repeats=args.startup_repeats,
        cpu_devices=args.cpu_devices,
    )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if opt_in:
        stamp += f"-{args.precision}"
    if args.cpu_devices:
        stamp += f"-cpu{args.cpu_devices}"
    output = args.output or RESULTS_DIR / ("quick.json" if args.quick else f"{stamp}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=1) + "\n")
    print(table(document))
    print(f"\nwrote {output}")
    if not args.no_readme and not args.quick and not args.model:
        write_readme(document, output.resolve())
        print(f"updated {README}")
    return 1 if document.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
