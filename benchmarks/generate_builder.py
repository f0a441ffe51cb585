"""Greedy generation on onnxruntime-genai's model builder folders: onnx2jax next to
onnxruntime-genai's own generator, on the same ``model.onnx``.

For each architecture (``--archs``: a random Llama and Qwen2 saved with ``save_pretrained``,
``--hidden``, ``--layers``, ``--vocab``) and precision (``--precisions``: fp32, int4) the
builder writes a folder (``python -m onnxruntime_genai.models.builder -e cpu``, offline, kept
in ``--models``). Then for each batch size, a random prompt of ``--prompt`` tokens and
``--new`` new tokens:

- onnxruntime-genai: ``og.Generator`` on ``og.Model(folder)``, greedy, ``max_length`` the
  prompt plus the new tokens; prefill is timed as ``append_tokens`` and the first token's
  choice (a generation of one token), decode as the rest of a whole generation.
- onnx2jax: ``onnx2jax.generation.generate`` on the folder's ``model.onnx`` (prefill and
  decode programs compiled before the timing), prefill as ``generate(..., 1)``, decode as the
  rest, both with the same ``max_length``.

Figures are medians of ``--runs`` interleaved runs: tokens per second (prefill: prompt tokens,
decode: new tokens after the first) and ratio = onnx2jax's time / onnxruntime-genai's (< 1:
onnx2jax faster). ``same_tokens`` says whether both made the same greedy tokens (fp32 should;
int4 computes differently: onnxruntime-genai rounds activations to int8 at the builder's
``accuracy_level`` 4, onnx2jax computes in float32), ``agreement`` the fraction of new tokens
equal before the first that differs. ``python -m benchmarks.generate_builder --json`` prints
the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import onnx2jax
from benchmarks.generate import add_arguments, host, phase_figures
from onnx2jax.cli.bench import interleaved
from onnx2jax.generation import generate, prompt_bucket

ARCHITECTURES = ("llama", "qwen2")


def save_random_decoder(kind: str, folder: Path, *, hidden: int, layers: int, vocab: int) -> Path:
    """A transformers ``kind`` ("llama" or "qwen2") with random weights, ``hidden // 64``
    heads of size 64 (half as many key/value heads), and a word-level tokenizer of ``vocab``
    words (the builder copies one), saved with ``save_pretrained`` in ``folder``."""
    import tokenizers
    import torch
    import transformers

    torch.manual_seed(0)
    heads = max(hidden // 64, 2)
    common = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        vocab_size=vocab,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if kind == "llama":
        module = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "qwen2":
        module = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        raise ValueError(f"no random {kind!r} decoder: choose from {ARCHITECTURES}")
    module.save_pretrained(folder)
    words = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0")
    )
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t0"
    ).save_pretrained(folder)
    return folder


def run_genai_builder(source: Path, out: Path, precision: str, cache: Path, *extra: str) -> Path:
    """``out``: onnxruntime-genai's model builder run (for the CPU) on ``source``, a
    save_pretrained folder with a tokenizer, in ``precision`` (fp32, int4...)."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source)]
    command += ["-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache), *extra]
    subprocess.run(command, check=True, capture_output=True)
    return out


def genai_greedy(model: Any, ids: np.ndarray, new: int) -> np.ndarray:
    """onnxruntime-genai's greedy tokens [batch, new] after the prompts ``ids``."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=ids.shape[1] + new, batch_size=len(ids))
    generator = og.Generator(model, params)
    generator.append_tokens(ids.astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return np.stack([np.asarray(generator.get_sequence(row)) for row in range(len(ids))])[
        :, ids.shape[1] :
    ]


def agreement(ours: np.ndarray, theirs: np.ndarray) -> float:
    """The fraction of tokens equal, per row, before the row's first that differs (after
    which each engine continues its own sequence), averaged over the rows."""
    same = np.cumprod(ours == theirs, axis=1)
    return float(same.mean())


def measure(
    ours_model: onnx2jax.Model,
    theirs_model: Any,
    ids: np.ndarray,
    new: int,
    max_length: int,
    runs: int,
) -> dict[str, Any]:
    """Both engines' greedy tokens after ``ids`` compared, and their prefill and decode times
    (medians of ``runs`` interleaved runs) in ms and tokens per second."""
    prompt = ids.shape[1]
    ours = generate(ours_model, ids, new, max_length=max_length)[:, prompt:]
    theirs = genai_greedy(theirs_model, ids, new)
    calls = {
        "onnx2jax prefill": lambda: generate(ours_model, ids, 1, max_length=max_length),
        "onnx2jax whole": lambda: generate(ours_model, ids, new, max_length=max_length),
        "genai prefill": lambda: genai_greedy(theirs_model, ids, 1),
        "genai whole": lambda: genai_greedy(theirs_model, ids, new),
    }
    case: dict[str, Any] = {
        "same_tokens": bool(np.array_equal(ours, theirs)),
        "agreement": round(agreement(ours, theirs), 3),
    }
    case.update(phase_figures(interleaved(calls, runs), ids.shape, new))
    return case


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime_genai as og

    root = Path(args.models)
    root.mkdir(parents=True, exist_ok=True)
    max_length = prompt_bucket(prompt_bucket(args.prompt) + args.new - 1)
    cases = []
    for kind in args.archs:
        name = f"{kind}_h{args.hidden}_l{args.layers}_v{args.vocab}"
        source = root / f"{name}_hf"
        if not (source / "config.json").exists():
            save_random_decoder(
                kind, source, hidden=args.hidden, layers=args.layers, vocab=args.vocab
            )
        for precision in args.precisions:
            folder = root / f"{name}_{precision}"
            if not (folder / "genai_config.json").exists():
                run_genai_builder(source, folder, precision, root / "builder_cache")
            theirs_model = og.Model(str(folder))
            ours_model = onnx2jax.load(folder / "model.onnx")
            for batch in args.batch:
                ids = np.random.default_rng(0).integers(3, args.vocab, (batch, args.prompt))
                case = {"model": kind, "precision": precision, "batch": batch}
                case.update(measure(ours_model, theirs_model, ids, args.new, max_length, args.runs))
                cases.append(case)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "models": f"builder {'/'.join(args.archs)}, hidden {args.hidden}, {args.layers} layers, "
        f"vocabulary {args.vocab}",
        "prompt": args.prompt,
        "new_tokens": args.new,
        "max_length": max_length,
        "runs": args.runs,
        **host(),
        "onnxruntime_genai": og.__version__,
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int4"])
    folder = Path(__file__).parent / "models" / "builder"
    add_arguments(parser, runs=3, hidden=256, layers=4, vocab=32000, models=folder)
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['models']}, prompt {args.prompt}, {args.new} new tokens, {result['cpu']}, "
        f"{result['threads']} threads"
    )
    print(
        "| model | precision | batch | prefill tok/s onnx2jax / genai (ratio) "
        "| decode tok/s onnx2jax / genai (ratio) | same tokens (agreement) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for case in result["cases"]:
        ours, theirs = case["onnx2jax"], case["genai"]
        print(
            f"| {case['model']} | {case['precision']} | {case['batch']} "
            f"| {ours['prefill_tokens_per_s']:.0f} / {theirs['prefill_tokens_per_s']:.0f} "
            f"({case['prefill_ratio']}) "
            f"| {ours['decode_tokens_per_s']:.0f} / {theirs['decode_tokens_per_s']:.0f} "
            f"({case['decode_ratio']}) | {case['same_tokens']} ({case['agreement']}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
