"""Greedy generation: onnx2jax's ``generate`` next to onnxruntime running the same steps.

A random Llama (2 layers, hidden size 64, vocabulary 100 by default: ``--hidden``, ``--layers``
and ``--vocab`` make it larger) is exported by torch.onnx with its KV cache as graph inputs and
outputs. For each batch size, a prompt of ``--prompt`` tokens and ``--new`` new tokens:

- onnx2jax: ``onnx2jax.generation.generate`` (prefill and decode programs, compiled before
  the timing); prefill is timed as ``generate(..., max_new_tokens=1)``, decode as the rest of
  a whole generation, both with the same ``max_length``.
- onnxruntime: the loop an onnxruntime user writes, a session on the same file with every
  graph optimization, the past growing by one token a step (prefill with an empty past).

Both make the same greedy tokens (checked); the figures are tokens per second (prefill: prompt
tokens, decode: new tokens) and ratio = onnx2jax's time / onnxruntime's (< 1: onnx2jax faster),
medians of ``--runs`` interleaved runs. ``python -m benchmarks.generate --json`` prints them as
JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import onnx2jax
from onnx2jax.cli.bench import default_threads, interleaved, onnxruntime_session
from onnx2jax.generation import cache_layout, generate, prompt_bucket


def tiny_decoder(kind: str = "llama", *, hidden: int = 64, layers: int = 2, vocab: int = 100):
    """A transformers causal LM (``"llama"`` or ``"gpt2"``) with random weights: 4 heads (and
    2 key/value heads for Llama), eos 2, pad 0.

    The weights are drawn wider than transformers' default so that the logits of competing
    tokens are far apart: greedy tokens then do not hang on rounding.
    """
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2
    )
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=4, n_positions=1024, **common
        )
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=1024,
        **common,
    )
    return transformers.LlamaForCausalLM(config).eval()


def export_with_cache(module, path: str | Path, position_ids: bool = True) -> Path:
    """torch.onnx (TorchScript exporter, opset 17) of a transformers causal LM with its KV cache
    as ``past_key_values.{i}.key/value`` inputs and ``present.{i}.key/value`` outputs, optimum's
    names; the batch and every length dynamic. ``position_ids=False`` leaves that input out."""
    import torch
    import transformers

    config = module.config
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = config.hidden_size // config.num_attention_heads

    class WithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, input_ids, attention_mask, *rest):
            positions, past = (rest[0], rest[1:]) if position_ids else (None, rest)
            cache = transformers.DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            flat = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *flat)

    batch, new, old = 2, 3, 5
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    names = ["input_ids", "attention_mask", *(["position_ids"] * position_ids), *past]
    outputs = ["logits", *(n.replace("past_key_values", "present") for n in past)]
    sample = [
        torch.randint(0, config.vocab_size, (batch, new)),
        torch.ones(batch, old + new, dtype=torch.long),
        *([torch.arange(old, old + new).repeat(batch, 1)] * position_ids),
        *(torch.randn(batch, heads, old, head_dim) for _ in past),
    ]
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in past})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in outputs[1:]})
    with torch.no_grad():
        torch.onnx.export(
            WithCache().eval(),
            tuple(sample),
            str(path),
            input_names=names,
            output_names=outputs,
            dynamic_axes={n: axes[n] for n in names + outputs},
            opset_version=17,
            dynamo=False,
        )
    return Path(path)


def onnxruntime_greedy(session: Any, model: onnx2jax.Model, ids: np.ndarray, new: int) -> Any:
    """Greedy tokens [batch, new] from onnxruntime, the past growing a token a step."""
    layout = cache_layout(model)
    batch, prompt = ids.shape
    past = {
        name: np.zeros(shape, dtype)
        for name, shape, dtype in zip(
            layout.past, layout.buffers(batch, 0), layout.dtypes, strict=True
        )
    }
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones((batch, prompt), np.int64),
        "position_ids": np.tile(np.arange(prompt, dtype=np.int64), (batch, 1)),
    }
    names = [o.name for o in session.get_outputs()]
    tokens = []
    for step in range(new):
        out = dict(zip(names, session.run(None, {**feeds, **past}), strict=True))
        token = out["logits"][:, -1].argmax(-1)
        tokens.append(token)
        length = prompt + step + 1
        feeds = {
            "input_ids": token[:, None].astype(np.int64),
            "attention_mask": np.ones((batch, length), np.int64),
            "position_ids": np.full((batch, 1), length - 1, np.int64),
        }
        past = {p: out[q] for p, q in zip(layout.past, layout.present, strict=True)}
    return np.stack(tokens, axis=1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.models)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"llama_h{args.hidden}_l{args.layers}_v{args.vocab}_cache.onnx"
    if not path.exists():
        module = tiny_decoder(hidden=args.hidden, layers=args.layers, vocab=args.vocab)
        export_with_cache(module, path)
    model = onnx2jax.load(path)
    session = onnxruntime_session(model, path, threads=default_threads())
    max_length = prompt_bucket(prompt_bucket(args.prompt) + args.new - 1)
    cases = []
    for batch in args.batch:
        ids = np.random.default_rng(0).integers(3, args.vocab, (batch, args.prompt))
        ours = generate(model, ids, args.new, max_length=max_length)[:, args.prompt :]
        theirs = onnxruntime_greedy(session, model, ids, args.new)
        calls = {
            "onnx2jax prefill": lambda ids=ids: generate(model, ids, 1, max_length=max_length),
            "onnx2jax whole": lambda ids=ids: generate(model, ids, args.new, max_length=max_length),
            "onnxruntime prefill": lambda ids=ids: onnxruntime_greedy(session, model, ids, 1),
            "onnxruntime whole": lambda ids=ids: onnxruntime_greedy(session, model, ids, args.new),
        }
        case: dict[str, Any] = {"batch": batch, "same_tokens": bool(np.array_equal(ours, theirs))}
        case.update(phase_figures(interleaved(calls, args.runs), ids.shape, args.new))
        cases.append(case)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "model": path.name,
        "prompt": args.prompt,
        "new_tokens": args.new,
        "max_length": max_length,
        "runs": args.runs,
        **host(),
        "cases": cases,
    }


def phase_figures(
    times: Mapping[str, Sequence[float]], shape: tuple[int, int], new: int
) -> dict[str, Any]:
    """Prefill and decode figures of two engines from the times in ms of their calls
    ``"{engine} prefill"`` (one new token) and ``"{engine} whole"`` (``new`` tokens) after
    prompts of ``shape`` [batch, prompt]: medians in ms, tokens per second, and the ratios of
    the first engine's times to the second's.

    Example:
        >>> times = {"a prefill": [10], "a whole": [30], "b prefill": [5], "b whole": [25]}
        >>> figures = phase_figures(times, (2, 8), 3)
        >>> figures["a"]["decode_tokens_per_s"], figures["prefill_ratio"]
        (200.0, 2.0)
    """
    batch, prompt = shape
    engines = list(dict.fromkeys(name.rsplit(" ", 1)[0] for name in times))
    figures: dict[str, Any] = {}
    for engine in engines:
        prefill = statistics.median(times[f"{engine} prefill"])
        decode = statistics.median(times[f"{engine} whole"]) - prefill
        figures[engine] = {
            "prefill_ms": round(prefill, 3),
            "decode_ms": round(decode, 3),
            "prefill_tokens_per_s": round(batch * prompt / prefill * 1e3, 1),
            "decode_tokens_per_s": round(batch * (new - 1) / decode * 1e3, 1),
        }
    first, second = engines
    for phase in ("prefill", "decode"):
        ratio = figures[first][f"{phase}_ms"] / figures[second][f"{phase}_ms"]
        figures[f"{phase}_ratio"] = round(ratio, 3)
    return figures


def host() -> dict[str, Any]:
    """What the results say of the host: its CPU, the engines' thread count, jax's version.

    Example:
        >>> sorted(host())
        ['cpu', 'jax', 'threads']
    """
    return {"cpu": cpu_model(), "threads": default_threads(), "jax": jax.__version__}


def cpu_model() -> str:
    """The CPU's model name and its widest vector extension, as the results name the host.

    Example:
        >>> isinstance(cpu_model(), str)
        True
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                width = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
                return f"{line.split(':', 1)[1].strip()} ({width})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def add_arguments(
    parser: argparse.ArgumentParser,
    *,
    runs: int,
    hidden: int,
    layers: int,
    vocab: int,
    models: Path,
) -> None:
    """The generation benchmarks' common arguments (batch sizes 1 and 8, a prompt of 128 tokens
    and 128 new ones by default), with each benchmark's default sizes and models folder.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser, runs=1, hidden=64, layers=2, vocab=100, models=Path("m"))
        >>> parser.parse_args(["--batch", "2"]).batch
        [2]
    """
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--models", default=str(models))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    folder = Path(__file__).parent / "models"
    add_arguments(parser, runs=5, hidden=64, layers=2, vocab=100, models=folder)
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']}, prompt {args.prompt}, {args.new} new tokens, {result['cpu']}")
    for case in result["cases"]:
        ours, theirs = case["onnx2jax"], case["onnxruntime"]
        print(
            f"batch {case['batch']}: prefill {ours['prefill_tokens_per_s']:.0f} vs "
            f"{theirs['prefill_tokens_per_s']:.0f} tokens/s (ratio {case['prefill_ratio']}), "
            f"decode {ours['decode_tokens_per_s']:.0f} vs {theirs['decode_tokens_per_s']:.0f} "
            f"tokens/s (ratio {case['decode_ratio']}), same tokens: {case['same_tokens']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
