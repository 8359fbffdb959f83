"""The client inside the real frameworks: Keras 3 fit/evaluate/predict (torch backend, CPU),
PyTorch loops and DataLoader, JAX. Each test skips, saying so, where its framework is absent
(.ci/run installs them all)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before anything imports keras

import gc
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import seqs
from dataserver.client import RemoteSequence

pytestmark = [
    # Keras' and torch's first imports and model builds take seconds; each test starts servers.
    pytest.mark.timeout(180),
    # torch 2.13's Tensor.__array__ takes no ``copy`` argument, which NumPy 2.4 deprecates; Keras
    # calls np.array(tensor) on the torch backend. Not ours to fix, and only this message.
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]


@pytest.fixture
def keras() -> ModuleType:
    return pytest.importorskip("keras", minversion="3", reason="Keras 3 is not installed "
                               "(pip install 'keras>=3'; .ci/run installs it)")


@pytest.fixture
def torch() -> ModuleType:
    return pytest.importorskip("torch", reason="PyTorch is not installed "
                               "(pip install torch==2.13.0, the CPU build; .ci/run installs it)")


@pytest.fixture
def jax() -> ModuleType:
    return pytest.importorskip("jax", reason="JAX is not installed (pip install jax; .ci/run "
                               "installs it)")


def mapped_file(address: int) -> str:
    """The file mapped at ``address`` in this process ("" for anonymous memory)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            if lo <= address < hi:
                return parts[5].strip() if len(parts) == 6 else ""
    raise AssertionError(f"address {address:#x} is not mapped")


def test_importing_the_client_imports_no_framework() -> None:
    code = ("import sys; import dataserver.client\n"
            "frameworks = ('keras', 'torch', 'jax', 'tensorflow')\n"
            "print(sorted(m for m in frameworks if m in sys.modules))\n"
            "for m in ('keras', 'torch'):\n"
            "    sys.modules[m] = None  # as if not installed\n"
            "from dataserver.client import _adapters\n"
            "for f in (_adapters.as_keras, _adapters.as_torch):\n"
            "    try:\n"
            "        f(None)\n"
            "    except ImportError as e:\n"
            "        print(type(e).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["[]", "ModuleNotFoundError", "ModuleNotFoundError"]


# --- Keras ----------------------------------------------------------------------------------


def linear_model(keras: ModuleType, features: int) -> Any:
    model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def test_keras_adapter_adds_no_worker_pool_and_forwards_epoch_ends(serve: Any,
                                                                   keras: ModuleType) -> None:
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    server = serve(seqs.EpochTagged(6), workers=2)
    with RemoteSequence(server.endpoint) as rs:
        ds = rs.as_keras()
        assert isinstance(ds, keras.utils.PyDataset)
        assert (len(ds), ds.workers, ds.use_multiprocessing) == (6, 1, False)
        assert PyDatasetAdapter(ds).enqueuer is None, "Keras would run its own pool on top"
        ds.on_epoch_end()  # Keras resetting an iterator before reading: not an epoch
        assert rs.epoch == 0
        assert [int(ds[i][1][0]) for i in range(6)] == list(range(6))
        ds.on_epoch_end()
        assert rs.epoch == 1
        _x, y = ds[0]
        assert y.tolist() == [0, 1], "the workers' Sequence did not see the epoch end"


def test_keras_fit_with_validation_then_evaluate_and_predict(serve: Any,
                                                              keras: ModuleType) -> None:
    train_seq, val_seq = seqs.Linear(16, seed=0), seqs.Linear(4, seed=1)
    train_server = serve(train_seq, workers=2)
    val_server = serve(val_seq, workers=2)  # a second DataServer
    with RemoteSequence(train_server.endpoint) as train, \
            RemoteSequence(val_server.endpoint) as val:
        model = linear_model(keras, 4)
        val_ds = val.as_keras()
        history = model.fit(train.as_keras(), validation_data=val_ds, epochs=2, shuffle=False,
                            verbose=0)
        loss, val_loss = history.history["loss"], history.history["val_loss"]
        assert len(loss) == len(val_loss) == 2
        assert loss[1] < loss[0] and val_loss[1] < val_loss[0]
        assert val.epoch == 2, "each validation pass ends one epoch of the server's"
        assert train.epoch >= 2

        kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.weights)
        xs, ys = zip(*(val_seq[i] for i in range(len(val_seq))), strict=True)
        expected = np.concatenate([x @ kernel + bias for x in xs])
        predicted = model.predict(val_ds, verbose=0)
        assert predicted.shape == (4 * 32, 1)
        np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-5)
        mse = float(np.mean((expected - np.concatenate(ys)) ** 2))
        assert model.evaluate(val_ds, verbose=0) == pytest.approx(mse, rel=1e-3)
        assert val.epoch == 4


def test_keras_predict_follows_index_order_under_random_delays(serve: Any,
                                                                keras: ModuleType) -> None:
    n, rows = 24, 16
    server = serve(seqs.EpochFilled(n, rows=rows, cols=16, delay=0.03), workers=3)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(1, use_bias=False)])
    kernel = np.zeros((16, 1), np.float32)
    kernel[0, 0] = 1.0  # predicts x[:, 0], which is the batch index (+ 1000 per epoch)
    model.layers[0].kernel.assign(kernel)
    with RemoteSequence(server.endpoint) as rs:
        ds = rs.as_keras()
        for epoch in range(2):
            got = model.predict(ds, verbose=0).reshape(n, rows)
            want = np.arange(n, dtype=np.float32)[:, None] + 1000 * epoch
            np.testing.assert_array_equal(got, np.broadcast_to(want, (n, rows)))
        assert rs.epoch == 2


def test_keras_fit_default_shuffle_warns_once_and_stays_correct(serve: Any,
                                                                keras: ModuleType) -> None:
    server = serve(seqs.Linear(12), workers=2)
    random.seed(0)  # Keras shuffles a PyDataset's indices with the random module
    with RemoteSequence(server.endpoint) as rs:
        model = linear_model(keras, 4)
        with pytest.warns(UserWarning, match="shuffle=False") as caught:
            history = model.fit(rs.as_keras(), epochs=2, verbose=0)
        assert sum("shuffle=False" in str(w.message) for w in caught) == 1
        assert history.history["loss"][1] < history.history["loss"][0]


# --- PyTorch --------------------------------------------------------------------------------


def test_torch_tensors_share_the_shared_memory_slots(serve: Any, torch: ModuleType,
                                                     isolated: dict[str, Path]) -> None:
    server = serve(seqs.Indexed(10, rows=64, cols=64), workers=2)
    with RemoteSequence(server.endpoint) as rs:
        ds = rs.as_torch()
        assert isinstance(ds, torch.utils.data.IterableDataset) and len(ds) == 10
        seen = []
        for x, y in ds:
            i = int(y[0])
            seen.append(i)
            assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
            assert x.shape == (64, 64) and float(x[0, 0]) == float(x[-1, -1]) == i
            path = mapped_file(x.data_ptr())
            assert path.startswith(str(isolated["shm"]) + "/"), f"tensor memory is {path!r}"
            assert not x.is_pinned()
            last = x
        assert seen == list(range(10))
        assert rs.epoch == 1, "a complete pass ends the server's epoch"
        del x, y
        assert rs.held() == 1, "a live tensor keeps its slot leased"
        del last
        assert rs.held() == 0


def test_torch_training_loop_through_a_dataloader(serve: Any, torch: ModuleType) -> None:
    server = serve(seqs.Linear(16), workers=2)
    with RemoteSequence(server.endpoint) as rs:
        loader = torch.utils.data.DataLoader(rs.as_torch(), batch_size=None, num_workers=0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = []
        for _epoch in range(2):
            total = 0.0
            for x, y in loader:
                assert isinstance(x, torch.Tensor) and x.shape == (32, 4)
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
            losses.append(total / len(loader))
        assert losses[1] < losses[0]
        assert rs.epoch == 2


def test_torch_each_pass_is_one_server_epoch(serve: Any, torch: ModuleType) -> None:
    server = serve(seqs.EpochTagged(8), workers=2)
    with RemoteSequence(server.endpoint) as rs:
        ds = rs.as_torch()
        for epoch in range(2):
            assert [y.tolist() for _x, y in ds] == [[i, epoch] for i in range(8)]
        for _x, y in ds:  # a pass left early ...
            assert y.tolist() == [0, 2]
            break
        assert rs.epoch == 2
        assert [y.tolist() for _x, y in ds] == [[i, 3] for i in range(8)]  # ... ends at the next
        assert rs.epoch == 4


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_torch_dataloader_workers_are_refused_clearly(serve: Any, torch: ModuleType,
                                                      context: str) -> None:
    server = serve(seqs.Indexed(4), workers=1)
    with RemoteSequence(server.endpoint) as rs:
        loader = torch.utils.data.DataLoader(rs.as_torch(), batch_size=None, num_workers=1,
                                             multiprocessing_context=context)
        if context == "fork":  # the worker gets a copy and is refused when it starts reading
            it = iter(loader)
            with pytest.raises(RuntimeError, match="num_workers=0"):
                next(it)
            del it  # the DataLoader iterator stops its worker when it goes
            gc.collect()
        else:  # spawn must pickle the dataset, which refuses (torch adds a warning about it)
            with pytest.warns(UserWarning, match="pickle"), \
                    pytest.raises(TypeError, match="num_workers=0"):
                iter(loader)
        assert [int(y[0]) for _x, y in rs.as_torch()] == [0, 1, 2, 3], "rs still works"


def test_torch_pin_memory(serve: Any, torch: ModuleType) -> None:
    server = serve(seqs.Indexed(4), workers=1)
    with RemoteSequence(server.endpoint) as rs:
        if torch.accelerator.is_available():
            ds = rs.as_torch(pin_memory=True)
            for x, y in ds:
                assert x.is_pinned() and float(x[0, 0]) == int(y[0])
            del x, y
            assert rs.held() == 0, "pinned copies must not hold slots"
        else:
            with pytest.warns(UserWarning, match="no accelerator"):
                ds = rs.as_torch(pin_memory=True)
            assert [int(y[0]) for x, y in ds if not x.is_pinned()] == [0, 1, 2, 3]


def test_torch_leaves_arrays_torch_cannot_hold_as_numpy(serve: Any, torch: ModuleType) -> None:
    server = serve(seqs.Structured(), workers=1)
    with RemoteSequence(server.endpoint) as rs:
        batch = next(iter(rs.as_torch()))
    want = seqs.make_structured(0)
    assert isinstance(batch, dict) and batch["index"] == 0 and batch[3] == "int key"
    for key in ("images", "fortran", "strided", "empty", "zerod", "bools", "complex", "u64"):
        assert isinstance(batch[key], torch.Tensor), key
        np.testing.assert_array_equal(batch[key].numpy(), want[key])
    for key in ("bigendian", "dates", "unicode", "records"):
        assert isinstance(batch[key], np.ndarray), key
    nested = batch["nested"]
    assert isinstance(nested, tuple) and isinstance(nested[1], list)
    assert isinstance(nested[1][1]["deep"], torch.Tensor)


# --- JAX ------------------------------------------------------------------------------------


def test_jax_iterates_the_client_directly(serve: Any, jax: ModuleType) -> None:
    import jax.numpy as jnp

    server = serve(seqs.Indexed(12), workers=2, slots=6, prefetch=2)
    step = jax.jit(lambda x: jnp.sum(x) / x.size)
    with RemoteSequence(server.endpoint) as rs:
        kept = []
        for x, y in rs:
            kept.append(jax.device_put(x))  # on CPU: aliases the slot and keeps it leased
            assert float(step(kept[-1])) == int(y[0])
        rs.on_epoch_end()
        for _ in range(2):  # round the 6-slot ring twice more: kept arrays must not change
            assert [int(y[0]) for _x, y in rs] == list(range(12))
            rs.on_epoch_end()
        assert [float(step(k)) for k in kept] == list(range(12))
        del kept
