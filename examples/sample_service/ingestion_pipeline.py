"""Ingestion pipeline of the sample service.

A file is split into chunks; every chunk is parsed, checksummed and written to
the document store. Processing time is *modeled*, not slept: every chunk costs a
fixed overhead (a store round trip plus bookkeeping) and every megabyte costs a
fixed parsing time. The pipeline's timeout is measured against this modeled
clock, so runs are deterministic and instant in wall-clock time.

With the numbers below a 50 MB file takes about 36 modeled seconds and a 500 MB
file about 357 -- over the default 300 second budget.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

KB = 1024
MB = 1024 * 1024

DEFAULT_TIMEOUT_SECONDS = 300

# Cost model (modeled seconds).
PER_CHUNK_OVERHEAD_S = 0.04  # store round trip + bookkeeping, paid once per chunk
PER_MB_S = 0.074  # parsing + checksumming, paid per megabyte of input

CHUNK_SIZE_BYTES = 64 * 1024


def chunk_size_for(file_size_bytes: int) -> int:
    """Return the chunk size (in bytes) used to split a file of `file_size_bytes`."""
    return CHUNK_SIZE_BYTES


def count_chunks(file_size_bytes: int, chunk_size_bytes: int) -> int:
    """Number of chunks a file of `file_size_bytes` is split into."""
    if chunk_size_bytes <= 0:
        raise ValueError("chunk_size_bytes must be positive")
    if file_size_bytes < 0:
        raise ValueError("file_size_bytes must not be negative")
    return math.ceil(file_size_bytes / chunk_size_bytes)


def chunk_cost_seconds(chunk_bytes: int) -> float:
    """Modeled time to process one chunk of `chunk_bytes`."""
    return PER_CHUNK_OVERHEAD_S + (chunk_bytes / MB) * PER_MB_S


def modeled_seconds(file_size_bytes: int, chunk_size_bytes: int) -> float:
    """Modeled time to process a whole file with the given chunk size."""
    chunks = count_chunks(file_size_bytes, chunk_size_bytes)
    return round(chunks * PER_CHUNK_OVERHEAD_S + (file_size_bytes / MB) * PER_MB_S, 3)


def process_chunk(file_path: str, index: int, offset: int, nbytes: int, crc: int) -> int:
    """Parse and checksum one chunk (cheap stand-in work: a running CRC over its header)."""
    header = f"{file_path}:{index}:{offset}:{nbytes}".encode()
    return zlib.crc32(header, crc)


@dataclass
class PipelineResult:
    ok: bool
    file_path: str
    size_bytes: int
    chunk_size_bytes: int
    chunks: int
    chunks_processed: int
    modeled_seconds: float  # modeled time for the whole file
    elapsed_seconds: float  # modeled time actually spent (capped at the timeout)
    timeout_seconds: int
    digest: str

    def to_dict(self) -> dict:
        data = asdict(self)
        size_mb = self.size_bytes / MB
        data["size_mb"] = int(size_mb) if size_mb == int(size_mb) else round(size_mb, 3)
        return data


def run_pipeline(file_path: str, file_size_bytes: int, timeout_seconds: int) -> PipelineResult:
    """Ingest a file, chunk by chunk, stopping when the modeled clock passes the timeout."""
    if timeout_seconds <= 0:
        raise ValueError("timeout_seconds must be positive")
    if file_size_bytes < 0:
        raise ValueError("file_size_bytes must not be negative")
    chunk_size = chunk_size_for(file_size_bytes)
    total_chunks = count_chunks(file_size_bytes, chunk_size)
    elapsed = 0.0
    crc = 0
    offset = 0
    processed = 0
    timed_out = False
    for index in range(total_chunks):
        nbytes = min(chunk_size, file_size_bytes - offset)
        cost = chunk_cost_seconds(nbytes)
        if elapsed + cost > timeout_seconds:
            timed_out = True
            elapsed = float(timeout_seconds)
            break
        crc = process_chunk(file_path, index, offset, nbytes, crc)
        elapsed += cost
        offset += nbytes
        processed += 1
    return PipelineResult(
        ok=not timed_out,
        file_path=file_path,
        size_bytes=file_size_bytes,
        chunk_size_bytes=chunk_size,
        chunks=total_chunks,
        chunks_processed=processed,
        modeled_seconds=modeled_seconds(file_size_bytes, chunk_size),
        elapsed_seconds=round(elapsed, 3),
        timeout_seconds=timeout_seconds,
        digest=f"{crc:08x}",
    )
