"""Keras 3 ``fit`` (with validation), ``evaluate`` and ``predict`` fed by a dataserver.

From the repository root: ``python -m examples.keras_fit`` (starts a server here), or beside a
running server (see examples/data.py for the ``dataserver serve`` line)::

    python -m examples.keras_fit --endpoint ipc:///tmp/ds-examples.sock

Keras runs on its torch backend unless KERAS_BACKEND says otherwise.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from dataserver.client import RemoteSequence
from examples.data import FEATURES, Regression, server


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", help="a running dataserver (default: start one here)")
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    with server(a.endpoint) as endpoint, \
            RemoteSequence(endpoint, dataset="train") as train, \
            RemoteSequence(endpoint, dataset="val") as val:
        model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        val_data = val.as_keras()
        # shuffle=False: Keras must ask for batches in order (shuffle on the server instead)
        model.fit(train.as_keras(), validation_data=val_data, epochs=a.epochs, shuffle=False,
                  verbose=2)
        print(f"evaluate: mse {model.evaluate(val_data, verbose=0):.5f}")
        predicted = model.predict(val_data, verbose=0)  # rows in the order of the batches
        targets = np.concatenate([Regression(batches=8, seed=1)[i][1] for i in range(8)])
        print(f"predict: {len(predicted)} rows, max |error| "
              f"{float(np.abs(predicted - targets).max()):.3f}")


if __name__ == "__main__":
    main()
