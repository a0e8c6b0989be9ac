"""`Secret`: key material in a wipeable buffer (its own module: keys/sources.py and
tools/runner.py both need it, and tools/ must not import keys/, which runs programs through it)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

KEY_BYTES = 32


class Secret:
    """Key material in a wipeable buffer; never shows itself in repr, str or logs."""

    def __init__(self, data: bytearray) -> None:
        self._data = data

    @classmethod
    def random(cls, size: int = KEY_BYTES) -> Secret:
        """A new key from the kernel's random source (getrandom, through `cryptography`)."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        # AESGCM makes 256-bit keys from the OS CSPRNG; longer keys are built from several.
        data = bytearray()
        while len(data) < size:
            data += AESGCM.generate_key(bit_length=256)
        del data[size:]
        return cls(data)

    @contextmanager
    def view(self) -> Iterator[memoryview]:
        """Borrow the bytes without copying them."""
        if not self._data:
            raise ValueError("secret already wiped")
        with memoryview(self._data) as mv:
            yield mv

    def wipe(self) -> None:
        """Overwrite the key in memory; the Secret is unusable afterwards."""
        for i in range(len(self._data)):
            self._data[i] = 0
        self._data = bytearray()

    def __len__(self) -> int:
        return len(self._data)

    def __enter__(self) -> Secret:
        return self

    def __exit__(self, *_: object) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return "<Secret: redacted>"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")
