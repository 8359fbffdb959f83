"""A plain PyTorch training loop fed by a dataserver: tensors that share the server's shared
memory (no copy), through a DataLoader with ``batch_size=None, num_workers=0``.

From the repository root: ``python -m examples.torch_loop`` (starts a server here), or beside a
running server (see examples/data.py for the ``dataserver serve`` line)::

    python -m examples.torch_loop --endpoint ipc:///tmp/ds-examples.sock
"""

from __future__ import annotations

import argparse

import torch

from dataserver.client import RemoteSequence
from examples.data import FEATURES, server


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", help="a running dataserver (default: start one here)")
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args(argv)
    with server(a.endpoint) as endpoint, \
            RemoteSequence(endpoint, dataset="train") as train, \
            RemoteSequence(endpoint, dataset="val") as val:
        # the server's workers make the batches: no DataLoader workers, no re-batching
        loader = torch.utils.data.DataLoader(train.as_torch(), batch_size=None, num_workers=0)
        val_data = val.as_torch()  # each pass over these is one epoch of the server's
        model = torch.nn.Linear(FEATURES, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for epoch in range(a.epochs):
            for x, y in loader:  # read-only tensors: x / 255 is fine, x /= 255 is not
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                mse = sum(float(torch.nn.functional.mse_loss(model(x), y)) for x, y in val_data)
            print(f"epoch {epoch + 1}/{a.epochs}: train mse {float(loss.detach()):.5f}, "
                  f"val mse {mse / len(val_data):.5f}")


if __name__ == "__main__":
    main()
