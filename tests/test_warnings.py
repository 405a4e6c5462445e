"""The suite runs with deprecations at our call sites as errors (pytest.ini)."""
import warnings

import pytest


def test_a_deprecation_attributed_to_our_code_is_an_error():
  # jax, flax, optax and orbax warn with stacklevel pointing at the caller, which is
  # this module here, psch_jax.* in the library.
  with pytest.raises(DeprecationWarning, match="gone in the next release"):
    warnings.warn("f is gone in the next release", DeprecationWarning, stacklevel=1)


def test_other_warnings_stay_warnings():
  with pytest.warns(UserWarning):
    warnings.warn("just a warning", UserWarning, stacklevel=1)
