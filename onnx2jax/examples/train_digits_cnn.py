"""Train the example model shipped with onnx2jax and export it with torch.onnx.

A small CNN on scikit-learn's 8x8 handwritten digits (1,797 images, no download). Writes
``digits_cnn.onnx`` and ``digits_samples.npz`` (held-out images and their labels) next to this
file. Needs torch and scikit-learn:

    python -m onnx2jax.examples.train_digits_cnn
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def main() -> None:
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    torch.manual_seed(0)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # N, 1, 8, 8 in [0, 1]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1500], order[1500:]

    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(32 * 2 * 2, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_train, y_train = torch.from_numpy(images[train]), torch.from_numpy(labels[train])
    epochs = 30
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(train)).split(64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(images[test])).argmax(1).numpy()
    accuracy = float((predicted == labels[test]).mean())
    print(f"held-out accuracy after {epochs} epochs: {accuracy:.3f} on {len(test)} images")

    torch.onnx.export(
        model,
        (x_train[:1],),
        str(HERE / "digits_cnn.onnx"),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    np.savez(HERE / "digits_samples.npz", images=images[test[:16]], labels=labels[test[:16]])


if __name__ == "__main__":
    main()
