"""Checkpoints of training state (params and optimizer state) with orbax-checkpoint.

A thin layer on ``orbax.checkpoint.CheckpointManager``: numbered steps, keep the last ``n``,
save every ``k`` steps, restore into the structure of a template so optax's state comes back
as the same NamedTuples. Resuming at step ``k`` gives exactly the arrays that were saved, so a
resumed run continues to the same params as an uninterrupted one.

Example:
    >>> import tempfile, jax.numpy as jnp, optax
    >>> from onnx2jax import train
    >>> state = train.init({"w": jnp.ones(3)}, optax.adam(1e-3))
    >>> with Checkpointer(tempfile.mkdtemp(), max_to_keep=2) as ckpt:
    ...     _ = ckpt.save(0, state)
    ...     restored = ckpt.restore(state)
    >>> restored.params["w"].tolist()
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from onnx2jax.core.errors import InputError


class Checkpointer:
    """Numbered checkpoints of a pytree (usually a :class:`onnx2jax.train.TrainState`).

    ``max_to_keep`` old checkpoints are kept (``None``: all); :meth:`save` writes only every
    ``save_interval_steps`` steps unless forced. Saving is asynchronous: the arrays are copied
    to host before :meth:`save` returns, the files are written in the background; :meth:`wait`
    (or leaving the ``with`` block) waits for them.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Save ``state`` as ``step`` if the interval says so (or ``force``); True if saved."""
        if step in self.manager.all_steps():
            return False
        return bool(self.manager.save(step, args=ocp.args.StandardSave(state), force=force))

    def restore(self, like: Any, step: int | None = None) -> Any:
        """Restore ``step`` (default: the latest) into the structure, dtypes and shardings of
        ``like``, a pytree of arrays shaped as the saved one (e.g. a freshly initialised state).
        """
        self.manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise InputError(f"no checkpoint in {self.directory}")
        if step not in self.manager.all_steps():
            raise InputError(
                f"no checkpoint for step {step} in {self.directory}; found steps {self.all_steps()}"
            )
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(target))

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every step kept on disk, oldest first."""
        return sorted(self.manager.all_steps())

    def wait(self) -> None:
        """Wait until every asynchronous save has been written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
