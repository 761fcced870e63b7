"""update_staged gives the same digest as a plain update, for every size and buffer kind."""

from __future__ import annotations

import hashlib
import os

import pytest

from cvmfs_ml.cvmfs.hashing import STAGING_SIZE, Algorithm, new_hasher, update_staged


@pytest.mark.parametrize(
    "size", [0, 1, STAGING_SIZE - 1, 2 * STAGING_SIZE - 1, 2 * STAGING_SIZE, 5 * STAGING_SIZE + 7]
)
@pytest.mark.parametrize("algorithm", [Algorithm.SHA1, Algorithm.SHAKE128])
def test_same_digest_as_a_plain_update(size: int, algorithm: Algorithm) -> None:
    data = os.urandom(size)
    staging = memoryview(bytearray(STAGING_SIZE))
    for kind in (bytes, bytearray, memoryview):
        hasher = new_hasher(algorithm)
        update_staged(hasher, kind(data), staging)
        plain = new_hasher(algorithm)
        plain.update(data)
        assert hasher.digest() == plain.digest()


def test_slices_of_a_larger_buffer_and_a_small_staging_buffer() -> None:
    block = bytearray(os.urandom(3 * 2**20))
    part = memoryview(block)[12345 : 2**21 + 99]
    hasher = new_hasher(Algorithm.SHA1)
    update_staged(hasher, part, memoryview(bytearray(4096)))
    assert hasher.digest() == hashlib.sha1(bytes(part)).digest()
