"""The fixture every Keras spectral-normalization test module uses (import it by name)."""

import pytest

keras = pytest.importorskip("keras")

BACKEND = keras.backend.backend()


@pytest.fixture(autouse=True, params=[BACKEND])
def keras_backend(request):
    """Puts the backend's name in every test id and starts each test from a clean state."""
    keras.utils.set_random_seed(0)
    yield request.param
    keras.config.set_dtype_policy("float32")
