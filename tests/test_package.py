"""The package imports, its extension matches it, and errors keep their errno."""

from __future__ import annotations

import errno

import pytest

import cprfast
from cprfast import _core


def test_core_version_matches_package() -> None:
    assert _core.core_version() == cprfast.__version__


def test_region_size_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="nonzero multiple of the page size"):
        _core.Region.create("bad", 123)


def test_hugetlb_without_reserved_pages_names_feature_and_errno() -> None:
    try:
        r = _core.Region.create("huge", 1 << 30, hugetlb=1 << 30)
    except cprfast.FeatureUnavailableError as e:
        assert isinstance(e, OSError)
        assert e.errno in (errno.ENOMEM, errno.EINVAL, errno.ENOSYS, errno.EPERM)
        assert "hugetlb memfd" in str(e)
    else:
        r.close()
