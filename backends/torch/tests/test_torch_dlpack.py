"""DLPack exchange: pools and gathered K/V cross to NumPy / MLX / CuPy, and arrays come back, without copies where possible."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_helpers import fill, make_config  # noqa: E402

from pagedkv_core.errors import DeviceMismatch, DTypeMismatch, InvalidArgument  # noqa: E402
from pagedkv_torch.dlpack import export_array, export_gathered, export_pools, import_array  # noqa: E402


def test_pools_cross_to_numpy_in_place(backend):
    storage = backend.create_storage(make_config(), "cpu")
    fill(backend, storage, np.random.default_rng(40))
    k, v = export_pools(storage, 1)
    assert k.shape == (24, 8, 2, 32)
    assert k.__array_interface__["data"][0] == storage.k[1].data_ptr()  # same bytes
    k[3, 0, 0, 0] = 123.0
    assert float(storage.k[1, 3, 0, 0, 0]) == 123.0
    np.testing.assert_array_equal(v, storage.to_numpy(1)[1])


def test_gathered_view_crosses_to_numpy(backend):
    storage = backend.create_storage(make_config("float16"), "cpu")
    fill(backend, storage, np.random.default_rng(41))
    k, v = export_gathered(storage, 0, [4, 9, 1], 19)
    want_k, want_v = storage.gather(0, [4, 9, 1], 19)
    assert k.dtype == np.float16 and k.shape == (19, 2, 32)
    np.testing.assert_array_equal(k, want_k.numpy())
    np.testing.assert_array_equal(v, want_v.numpy())


def test_numpy_arrays_come_back_without_a_copy():
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = import_array(host, "cpu")
    assert t.data_ptr() == host.__array_interface__["data"][0]
    with pytest.raises(InvalidArgument, match="DLPack"):
        import_array([1, 2, 3])


def test_what_cannot_cross_says_why():
    with pytest.raises(DTypeMismatch, match="bfloat16"):
        export_array(torch.zeros(2, dtype=torch.bfloat16), "numpy")
    with pytest.raises(DeviceMismatch, match="CuPy"):
        export_array(torch.zeros(2), "cupy")
    with pytest.raises(DeviceMismatch, match="NumPy"):
        export_array(torch.zeros(2, device="meta"), "numpy")
    with pytest.raises(InvalidArgument, match="library"):
        export_array(torch.zeros(2), "jax")


def test_mlx_round_trip(backend):
    mx = pytest.importorskip("mlx.core", exc_type=ImportError)
    storage = backend.create_storage(make_config("bfloat16"), "cpu")
    fill(backend, storage, np.random.default_rng(42))
    k, _ = export_pools(storage, 0, "mlx")  # MLX copies foreign CPU memory on import
    assert k.dtype == mx.bfloat16 and tuple(k.shape) == tuple(storage.k[0].shape)
    back = import_array(k)  # and MLX memory comes back to torch in place
    assert back.dtype == torch.bfloat16 and torch.equal(back, storage.k[0])
    ones = mx.ones((4,), dtype=mx.float32)
    mx.eval(ones)
    import_array(ones)[0] = 5.0
    assert float(ones[0].item()) == 5.0


def test_cupy_shares_gpu_memory(backend):
    probe = backend.probe("cuda:0")
    if not probe.available:
        pytest.skip(probe.reason)
    cp = pytest.importorskip("cupy", exc_type=ImportError)
    storage = backend.create_storage(make_config(), "cuda:0")
    k, _ = export_pools(storage, 0, "cupy")
    assert k.data.ptr == storage.k[0].data_ptr()
    assert isinstance(k, cp.ndarray)
    back = import_array(k)
    assert back.data_ptr() == storage.k[0].data_ptr()
