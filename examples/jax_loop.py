"""A JAX training loop fed by a dataserver: iterate the RemoteSequence itself (numpy views of
the shared memory) and hand the arrays to jitted functions; ``on_epoch_end()`` after each epoch.

From the repository root: ``python -m examples.jax_loop`` (starts a server here), or beside a
running server (see examples/data.py for the ``dataserver serve`` line)::

    python -m examples.jax_loop --endpoint ipc:///tmp/ds-examples.sock
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp

from dataserver.client import RemoteSequence
from examples.data import FEATURES, server


def loss_fn(params: Any, x: Any, y: Any) -> Any:
    w, b = params
    return jnp.mean((x @ w + b - y) ** 2)


@jax.jit
def train_step(params: Any, x: Any, y: Any) -> tuple[Any, Any]:
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    return jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, grads), loss


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", help="a running dataserver (default: start one here)")
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args(argv)
    params = (jnp.zeros((FEATURES, 1)), jnp.zeros(()))
    eval_loss = jax.jit(loss_fn)
    with server(a.endpoint) as endpoint, \
            RemoteSequence(endpoint, dataset="train") as train, \
            RemoteSequence(endpoint, dataset="val") as val:
        for epoch in range(a.epochs):
            for x, y in train:  # batches 0..len-1 in order; numpy arrays jax takes as they are
                params, loss = train_step(params, x, y)
            train.on_epoch_end()
            mse = sum(float(eval_loss(params, x, y)) for x, y in val) / len(val)
            val.on_epoch_end()
            print(f"epoch {epoch + 1}/{a.epochs}: train mse {float(loss):.5f}, "
                  f"val mse {mse:.5f}")


if __name__ == "__main__":
    main()
