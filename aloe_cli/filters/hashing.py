"""Perceptual hashes of images, computed in parallel (the index that searches them is hash_index.py).

Hashes are 64-bit imagehash hashes (hash_size=8). Inside the program they are
plain Python ints, so comparing two is one XOR and a popcount; outside (files,
reports) they are the 16-hex-digit strings that `str(imagehash.phash(img))`
prints, so users can check any value with imagehash itself.

Bit order: imagehash flattens its 8x8 bit array row by row and writes the first
bit as the most significant, so `int(str(imagehash_hash), 16)` is our int.

This is a core module: it never prints. Bad images come back as reason codes
(see `hash_task`), user mistakes as `AloeError`.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import Any, NamedTuple

import imagehash
import numpy as np

from aloe_cli.data.images import describe, load_image
from aloe_cli.data.shard import available_cpus
from aloe_cli.errors import AloeError, RecordError
from aloe_cli.filters.hash_index import HASH_BITS

HASH_SIZE = 8  # imagehash's hash_size: an 8x8 bit grid = 64 bits
_HASH_MASK = (1 << HASH_BITS) - 1

# All four produce an 8x8 grid at their default hash_size=8.
HASH_FUNCTIONS: dict[str, Callable[..., imagehash.ImageHash]] = {
    "phash": imagehash.phash,
    "dhash": imagehash.dhash,
    "ahash": imagehash.average_hash,
    "whash": imagehash.whash,
}

# Reduced JPEG decode for `fast=True`. Pillow's draft() picks the largest DCT
# scale (1/2, 1/4, 1/8) that keeps both sides >= this size, so a 512 px JPEG
# decodes at 128 px and a 2048 px one at 256 px: no full-size IDCT and far fewer
# pixels for the hash's own resize. phash resizes to 32x32; 128 leaves the
# Lanczos resize 4x oversampling, where 64 (a 1/8 decode of a 512 px image,
# i.e. plain 8x8 block means) visibly moves phash bits that sit near the median.
# Measured, fast vs exact phash (distance = differing bits of 64):
#   150 grace_hopper-derived JPEGs (crops, rotations, tone, 180-2400 px, q50-95):
#     draft 32: 35% equal, 81% <=2, max 8;  64: 55%, 91%, max 6;
#     96: 67%, 97%, max 4;  128: 77%, 98%, max 4;  256: 92%, 100%, max 2
#   104 synthetic 512x512 JPEGs (blurred noise, shapes, MRI slice, gratings):
#     32/48/64: 81% equal, 96% <=2, max 4;  96/128: 88%, 99%, max 4;  256: 89%, 100%, max 2
# 128 is the smallest size with >=98% of phashes within 2 bits (dhash 100%,
# ahash 99-100%) at about 40% of the exact path's time on the photo set (1.5 vs 3.7 ms);
# 256 is closer but ~1.5x slower again.
FAST_DRAFT_SIZE = 128


def _check_kind(kind: str) -> Callable[..., imagehash.ImageHash]:
    try:
        return HASH_FUNCTIONS[kind]
    except KeyError:
        raise AloeError(f"unknown hash kind '{kind}' (choose from {', '.join(HASH_FUNCTIONS)})") from None


def to_hex(h: int) -> str:
    """64-bit int -> the 16-hex-digit string imagehash prints."""
    return f"{h:016x}"


def from_hex(text: str) -> int:
    """16-hex-digit string (as printed by imagehash) -> 64-bit int."""
    text = text.strip()
    # Fixed length keeps a 256-bit hash (hash_size=16) or a typo from being
    # silently accepted as a 64-bit one.
    if len(text) != HASH_BITS // 4:
        raise AloeError(f"a hash must be {HASH_BITS // 4} hex digits, got '{text[:40]}'")
    try:
        return int(text, 16)
    except ValueError:
        raise AloeError(f"not a hex hash: '{text[:40]}'") from None


def imagehash_to_int(value: imagehash.ImageHash) -> int:
    """imagehash result -> int, with the same bit order as its hex string."""
    bits = np.asarray(value.hash, dtype=bool).ravel()
    if bits.size != HASH_BITS:
        raise ValueError(f"expected a {HASH_BITS}-bit hash, got {bits.size} bits")
    # packbits writes the first bit as the MSB of the first byte: big-endian,
    # exactly imagehash's row-major, first-bit-most-significant hex.
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hash_image(entry: Any, image_root: str | os.PathLike | None = None, *,
               kind: str = "phash", fast: bool = False) -> int:
    """Hash one image entry (path, data URI, HF dict, bytes; see `load_image`).

    With fast=False the result is bit-identical to `imagehash.<kind>(load_image(entry))`,
    and for ordinary photos to `imagehash.<kind>(Image.open(path))`.
    fast=True decodes JPEGs at reduced size: a few bits may differ, so only
    compare fast hashes with fast hashes. Raises RecordError for bad images.
    """
    func = _check_kind(kind)
    image = load_image(entry, image_root, draft_size=FAST_DRAFT_SIZE if fast else None)
    return imagehash_to_int(func(image))


class HashResult(NamedTuple):
    """One image's outcome: either `hash` or a `reason` code with a `message`."""

    hash: int | None
    reason: str | None
    message: str | None


def hash_task(args: tuple) -> HashResult:
    """(entry, image_root, kind, fast) -> HashResult; never raises on a bad image.

    Top-level so it pickles under 'spawn'. A failure becomes a result rather than
    an exception so one broken file cannot abort the pool's whole batch.
    """
    entry, image_root, kind, fast = args
    try:
        return HashResult(hash_image(entry, image_root, kind=kind, fast=fast), None, None)
    except RecordError as exc:
        return HashResult(None, exc.reason, exc.message)
    except Exception as exc:  # noqa: BLE001 - deliberate, see below
        # A decoder bug on one odd file must not end a million-image run either;
        # its own reason code keeps it distinguishable from a merely corrupt file.
        # Only the type name is kept: messages from DICOM decoders could quote header values.
        return HashResult(None, "hash_failed", f"cannot hash image {describe(entry)}: {type(exc).__name__}")


def _ignore_signals() -> None:
    """Worker initializer: Ctrl-C and SLURM's SIGTERM reach every process of the group, but only the
    parent acts on them; it cancels what is queued and the workers exit after their current chunk.
    A worker that died mid-task (or held a queue lock) is what hangs or garbles a process pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def hash_chunk(chunk: list[tuple]) -> list[HashResult]:
    """Pool worker: a chunk of `hash_task` arguments -> their results, in order."""
    return [hash_task(args) for args in chunk]


# The parent waits on its workers in slices this long: a signal meant for it (delivered to one of the
# pool's helper threads) is handled at the next slice instead of after the whole batch.
_WAIT_SLICE = 0.2


def _pool_context():
    # fork starts workers in milliseconds and shares the already-imported
    # numpy/scipy/Pillow; elsewhere (macOS, Windows) use the platform's safe default.
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


class Hasher:
    """Hash many images with a pool of worker processes.

        with Hasher("phash", fast=False, workers=8) as hasher:
            results = hasher.hash_many([(entry, image_root), ...])

    workers == 1 runs in this process (no pool, easy to debug). The pool
    (`concurrent.futures.ProcessPoolExecutor`) is started on first use and kept
    for later calls until close()/__exit__. Workers ignore SIGINT/SIGTERM: the
    parent handles them, cancels queued chunks and lets the workers finish the
    chunk in hand, so an interrupted run leaves neither stray workers nor
    tracebacks. A worker that dies (killed, out of memory) is a one-line error.
    `workers` is capped at the CPUs this process may use (`available_cpus`):
    more processes than cores only add forks and memory.
    """

    # Upper bound on images per pool chunk: big enough to amortise the IPC
    # round-trip (~0.1 ms) against a hash (~1-20 ms), small enough that the
    # last chunk of a batch (every stage batch ends in a barrier) or a run of
    # slow DICOMs does not leave the other workers idle for long.
    MAX_CHUNKSIZE = 8

    def __init__(self, kind: str = "phash", fast: bool = False, workers: int = 1):
        _check_kind(kind)
        if int(workers) < 1:
            raise AloeError(f"workers must be at least 1, got {workers}")
        self.kind = kind
        self.fast = bool(fast)
        self.workers = min(int(workers), available_cpus())
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Hasher:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error (or Ctrl-C, SIGTERM) do not wait for queued work.
        self.close(terminate=exc_type is not None)

    def close(self, terminate: bool = False) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True, cancel_futures=terminate)

    def _args(self, tasks: Iterable[tuple[Any, Any]]) -> Iterator[tuple]:
        for entry, image_root in tasks:
            yield (entry, None if image_root is None else str(image_root), self.kind, self.fast)

    def _chunksize(self, n: int) -> int:
        # About 4 chunks per worker (Pool.map's own rule) for load balance, capped.
        return max(1, min(self.MAX_CHUNKSIZE, -(-n // (self.workers * 4))))

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=_pool_context(), initializer=_ignore_signals)
        return self._pool

    def _run(self, args: list[tuple], chunksize: int) -> list[HashResult]:
        pool = self._get_pool()
        futures = [pool.submit(hash_chunk, args[start:start + chunksize])
                   for start in range(0, len(args), chunksize)]
        results: list[HashResult] = []
        try:
            for future in futures:
                while True:
                    try:
                        results.extend(future.result(timeout=_WAIT_SLICE))
                        break
                    except FutureTimeout:
                        continue
        except BrokenProcessPool:
            raise AloeError("a hashing worker process died (killed, or out of memory?); "
                            "run again, with fewer --workers if memory is short") from None
        finally:
            for future in futures:
                future.cancel()
        return results

    def hash_many(self, tasks: list[tuple[Any, Any]]) -> list[HashResult]:
        """[(entry, image_root)] -> [HashResult], in the same order."""
        tasks = list(tasks)
        if self.workers == 1 or len(tasks) <= 1:
            return [hash_task(args) for args in self._args(tasks)]
        return self._run(list(self._args(tasks)), self._chunksize(len(tasks)))

    def hash_iter(self, tasks: Iterable[tuple[Any, Any]], chunksize: int | None = None) -> Iterator[HashResult]:
        """Streaming form of hash_many for inputs too large to hold twice; order preserved."""
        args = self._args(tasks)
        if self.workers == 1:
            return (hash_task(arg) for arg in args)
        return self._stream(args, chunksize or self.MAX_CHUNKSIZE)

    def _stream(self, args: Iterator[tuple], chunksize: int) -> Iterator[HashResult]:
        window = chunksize * self.workers * 4  # a few chunks per worker in flight, the rest not yet read
        while batch := list(islice(args, window)):
            yield from self._run(batch, chunksize)
