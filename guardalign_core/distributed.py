"""Screening a ``ray.data.Dataset`` of images: one loaded CLIP per actor, one verdict row per image.

Corpus scans (a multimodal RAG index, a training set) outgrow one process and then one
machine; Ray Data is where such batch inference already runs. :func:`scan_dataset` adds one
``map_batches`` stage over an actor pool: each actor builds the detector once (``num_gpus``
each when the cluster has GPUs) and turns every batch of rows into
:class:`~guardalign_core.corpus.VerdictRow` rows, written with Ray's own writers
(``write_parquet``). The verdict is the in-process :meth:`BaseDetector.scan
<guardalign_core.detector.BaseDetector.scan>` of the same image with the same config: the
actor calls exactly that.

Rows may hold encoded bytes (``read_binary_files``, a ``read_parquet`` binary column),
decoded arrays (``read_images``; pass ``mode="RGB"``) or path/URI strings (local, ``file://``,
``s3://``, ``gs://`` and the other ``pyarrow.fs`` schemes; ``http(s)`` only as
``ImageLimits`` allows). An image that cannot be read or decoded gives an error row, never a
failed job; what a row holds that is none of these is refused the same way (default deny).

Ray is an optional dependency (extra ``ray``) and imported only when a function here runs.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from PIL import Image

from .config import DetectorConfig, GuardConfig, resolve_config
from .corpus import VERDICT_COLUMNS, verdict_row
from .errors import EmptyImageError, GuardAlignError, ImageError, ImageTooLargeError, InvalidImageSourceError
from .images import ImageLimits, encode_png, read_image_bytes
from .results import Decision, ScanResult

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow
    import ray.data

    from .detector import BaseDetector

logger = logging.getLogger(__name__)

__all__ = ["RayNotAvailableError", "is_ray_available", "scan_dataset", "scan_files", "verdict_schema"]

IMAGE_COLUMNS: tuple[str, ...] = ("bytes", "image", "path", "uri", "url")
"""Columns looked for, in this order, when ``column`` is not given."""

OBJECT_STORE_SCHEMES = frozenset({"s3", "gs", "gcs", "hdfs", "viewfs"})
"""URI schemes read through ``pyarrow.fs`` (credentials from the environment, as Ray's readers do)."""

_BUCKET_SCHEMES = frozenset({"s3", "gs", "gcs"})  # the file system's path is bucket + key

_UNREADABLE = "could not be read"


class RayNotAvailableError(GuardAlignError, ImportError):
    """Ray Data is not installed: the ``ray`` extra is needed."""


@functools.lru_cache(maxsize=None)
def is_ray_available() -> bool:
    """Whether ``ray.data`` can be imported (cached)."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise RayNotAvailableError(
            f"scanning through Ray needs the ray extra ({err.name or 'ray'} is not installed): pip install 'guardalign[ray]'"
        ) from None
    return ray


def verdict_schema(include_sanitized: bool = False) -> "pyarrow.Schema":
    """The Arrow schema of a verdict row (:class:`~guardalign_core.corpus.VerdictRow`), one type per column.

    Fixed rather than inferred, so that a block of error rows (no scores, no boxes) has the
    same column types as a block of verdicts and every Parquet file of a scan reads as one table.
    """
    import pyarrow as pa

    box = pa.struct([
        ("x0", pa.int64()), ("y0", pa.int64()), ("x1", pa.int64()), ("y1", pa.int64()),
        ("row", pa.int64()), ("col", pa.int64()), ("score", pa.float64()), ("category", pa.string()),
    ])
    types = {
        "source": pa.string(), "status": pa.string(), "decision": pa.string(), "unsafe": pa.bool_(),
        "score": pa.float64(), "threshold": pa.float64(), "reason": pa.string(), "error": pa.string(),
        "detector": pa.string(), "rule": pa.string(), "backbone": pa.string(), "policy": pa.string(),
        "input_format": pa.string(), "forward_as_sent": pa.bool_(),
        "image_width": pa.int64(), "image_height": pa.int64(), "grid_rows": pa.int64(), "grid_cols": pa.int64(),
        "scores": pa.list_(pa.list_(pa.float64())), "boxes": pa.list_(box), "categories": pa.list_(pa.string()),
        "summary": pa.string(), "config_fingerprint": pa.string(),
    }
    fields = [pa.field(name, types[name]) for name in VERDICT_COLUMNS]
    if include_sanitized:
        fields.append(pa.field("sanitized_png", pa.binary()))
    return pa.schema(fields)


# -- one batch of rows -> verdict rows (no Ray here: tested in-process) ------------------------
def _label(source: str | None, position: int) -> str:
    """A short label for the result (the file name), never a full path or content."""
    if source:
        name = PurePosixPath(urllib.parse.urlparse(source).path if "://" in source else source.replace("\\", "/")).name
        if name and len(name) <= 255:
            return name
    return f"row {position}"


class _ObjectStores:
    """``pyarrow.fs`` file systems for object-store URIs, one per scheme and bucket (client set-up is not free).

    A row's URI names only a scheme, a bucket and a key: where the requests go (endpoint,
    transport, credentials) comes from the caller's code (``filesystems``, else a file system
    built from the scheme alone, credentials from the environment), never from the row. A URI
    with a query, fragment, user or port is refused: ``s3://b/k?endpoint_override=host``
    would otherwise send signed requests to any host the corpus names.
    """

    def __init__(self, filesystems: "Mapping[str, Any] | None" = None) -> None:
        self._given = {str(k).lower(): v for k, v in (filesystems or {}).items()}
        unknown = sorted(set(self._given) - OBJECT_STORE_SCHEMES)
        if unknown:
            raise ValueError(f"filesystems: keys are URI schemes ({', '.join(sorted(OBJECT_STORE_SCHEMES))}), got {', '.join(map(repr, unknown))}")
        self._systems: dict[tuple[str, str], Any] = {}

    def _system(self, scheme: str, bucket: str, limits: ImageLimits) -> Any:
        if scheme in self._given:
            return self._given[scheme]
        key = (scheme, bucket)
        if key not in self._systems:
            self._systems[key] = _default_filesystem(scheme, bucket, limits.fetch_timeout_s)
        return self._systems[key]

    def read(self, uri: str, limits: ImageLimits, label: str) -> bytes:
        try:
            parsed = urllib.parse.urlsplit(uri)
        except ValueError:
            raise InvalidImageSourceError(_UNREADABLE, source=label) from None
        scheme, netloc = parsed.scheme.lower(), parsed.netloc
        if "?" in uri or "#" in uri or "@" in netloc or ":" in netloc:
            raise InvalidImageSourceError(
                "an object-store URI may not carry a query, fragment, user or port (the file system's options come "
                "from scan_dataset(filesystems=...), not from the row)",
                source=label,
            )
        key_path = urllib.parse.unquote(parsed.path)
        if scheme in _BUCKET_SCHEMES:
            if not _BUCKET.fullmatch(netloc) or not key_path.strip("/"):
                raise InvalidImageSourceError(f"{_UNREADABLE}: not a bucket/key URI", source=label)
            bucket, path = netloc, f"{netloc}{key_path}"
        else:  # hdfs, viewfs: the cluster is the caller's (filesystems=, or fs.defaultFS), never a host the row names
            if netloc and scheme not in self._given:
                raise InvalidImageSourceError(
                    f"an {scheme}:// URI naming a host is read only through scan_dataset(filesystems={{{scheme!r}: ...}}); "
                    f"write {scheme}:///path for the default file system",
                    source=label,
                )
            bucket, path = "", key_path
        try:
            system = self._system(scheme, bucket, limits)
            with system.open_input_stream(path) as stream:
                data = stream.read(limits.max_bytes + 1)
        except (OSError, ValueError, TypeError):
            raise InvalidImageSourceError(_UNREADABLE, source=label) from None
        if len(data) > limits.max_bytes:
            raise ImageTooLargeError(f"{_UNREADABLE}: over the limit of {limits.max_bytes} bytes (ImageLimits.max_bytes)", source=label)
        return data


_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]")  # S3 and GCS bucket names (lower case, no host syntax)


def _default_filesystem(scheme: str, bucket: str, timeout_s: float) -> Any:
    """The file system for ``scheme`` built from the scheme (and, for S3, the bucket's region) alone.

    Every request is bounded by ``ImageLimits.fetch_timeout_s``, so an unreachable store fails
    the row instead of stalling the scan.
    """
    import datetime

    import pyarrow.fs as pafs

    if scheme == "s3":
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region:
            try:
                region = pafs.resolve_s3_region(bucket)  # asks AWS itself; the bucket name cannot pick the host
            except (OSError, ValueError):
                region = None
        return pafs.S3FileSystem(region=region, connect_timeout=timeout_s, request_timeout=timeout_s)
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=max(1.0, timeout_s)))
    return pafs.HadoopFileSystem("default")


def _read_uri(text: str, limits: ImageLimits, label: str, stores: _ObjectStores) -> bytes:
    """The bytes behind a path or URI string; every failure reads "could not be read"."""
    text = text.strip()
    if not text:
        raise EmptyImageError("the row's path is empty", source=label)
    scheme = urllib.parse.urlparse(text[:2048]).scheme.lower()
    if scheme in ("http", "https", "data"):
        return read_image_bytes(text, limits, source=label)  # ImageLimits decides (allow_remote, allowed_hosts)
    if scheme in OBJECT_STORE_SCHEMES:
        return stores.read(text, limits, label)
    if scheme == "file":
        text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
    elif scheme and len(scheme) > 1:  # one letter is a Windows drive
        raise InvalidImageSourceError(f"unsupported URI scheme {scheme[:16]!r} (paths, file://, http(s) and {', '.join(sorted(OBJECT_STORE_SCHEMES))})", source=label)
    try:
        return read_image_bytes(Path(text), limits, source=label)
    except ImageTooLargeError:
        raise ImageTooLargeError(f"{_UNREADABLE}: over the limit of {limits.max_bytes} bytes (ImageLimits.max_bytes)", source=label) from None
    except ImageError:  # missing, unreadable, a directory: one message, no file-system detail
        raise InvalidImageSourceError(_UNREADABLE, source=label) from None


def _to_input(value: Any, label: str, limits: ImageLimits, stores: _ObjectStores) -> Any:
    """What one row's image value becomes for :meth:`BaseDetector.scan`: bytes or a PIL image."""
    import numpy as np

    if value is None:
        raise EmptyImageError("the row holds no image", source=label)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return _read_uri(value, limits, label, stores)
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and (value.ndim == 2 or (value.ndim == 3 and value.shape[-1] in (1, 3, 4))):
        if value.ndim == 3 and value.shape[-1] == 1:
            value = value[..., 0]
        if 0 in value.shape:
            raise EmptyImageError("the decoded image has no pixels", source=label)
        return Image.fromarray(np.ascontiguousarray(value))
    if isinstance(value, np.ndarray):
        raise InvalidImageSourceError(
            f"a decoded image must be a uint8 array of shape (H, W), (H, W, 3) or (H, W, 4); got {value.dtype} {tuple(value.shape)[:4]}",
            source=label,
        )
    raise InvalidImageSourceError(f"expected image bytes, a decoded array or a path/URI string, got {type(value).__name__}", source=label)


def _sanitized_png(result: ScanResult) -> bytes | None:
    """The pixels to use in place of the original: the masked image, or a re-encode when the original bytes mislead."""
    if result.masked_image is None:
        return None
    if result.decision == Decision.MASK or (result.decision in (Decision.ALLOW, Decision.FLAG) and result.forward_as_sent is False):
        return encode_png(result.masked_image)
    return None


def scan_values(
    detector: "BaseDetector",
    values: Sequence[Any],
    sources: Sequence[str | None],
    *,
    fingerprint: str,
    include_sanitized: bool = False,
    stores: _ObjectStores | None = None,
    filesystems: "Mapping[str, Any] | None" = None,
) -> list[dict[str, Any]]:
    """Verdict rows for one batch of row values (what each actor runs; no Ray needed).

    Args:
        detector: the detector (its ``scan`` makes every verdict).
        values: per row: encoded bytes, a decoded uint8 array, a PIL image, or a path/URI string.
        sources: per row, the source recorded in the verdict row (path or URI; ``None`` if unknown).
        fingerprint: :func:`~guardalign_core.memory.config_fingerprint` of the config and detector.
        include_sanitized: add ``sanitized_png`` (PNG of the masked pixels; ``None`` where the
            original is what should be used, or nothing may be).
        filesystems: as for :func:`scan_dataset` (ignored when ``stores`` is given).

    Returns:
        One row per value, in order; a value that cannot be read gives an error row.
    """
    if len(values) != len(sources):
        raise ValueError(f"sources: got {len(sources)} for {len(values)} values")
    stores = stores or _ObjectStores(filesystems)
    limits = detector.image_limits
    labels = [_label(source, i) for i, source in enumerate(sources)]
    inputs: dict[int, Any] = {}
    results: dict[int, ScanResult] = {}
    for i, value in enumerate(values):
        try:
            inputs[i] = _to_input(value, labels[i], limits, stores)
        except ImageError as err:
            results[i] = detector._error_result(i, labels[i], err, detector.policy)
    order = sorted(inputs)
    if order:
        scanned = detector.scan([inputs[i] for i in order], sources=[labels[i] for i in order])
        results.update(zip(order, scanned))
    rows = []
    for i in range(len(values)):
        row = verdict_row(results[i], fingerprint=fingerprint, source=sources[i])
        row["source"] = sources[i]  # unknown stays None: the in-batch label ("row 3") names nothing in the corpus
        if include_sanitized:
            row["sanitized_png"] = _sanitized_png(results[i])
        rows.append(row)
    return rows


def _pick_column(columns: Sequence[str]) -> str:
    for name in IMAGE_COLUMNS:
        if name in columns:
            return name
    raise ValueError(f"column: no image column found (looked for {', '.join(IMAGE_COLUMNS)}; the rows have {', '.join(columns)}); pass column=")


class _VerdictScanner:
    """The ``map_batches`` callable: builds the detector once per actor, then scans batches."""

    def __init__(self, config: dict[str, Any], column: str | None, source_column: str | None, include_sanitized: bool,
                 filesystems: "Mapping[str, Any] | None" = None) -> None:
        from .detector import create_detector
        from .memory import config_fingerprint

        guard_config = GuardConfig.model_validate(config)
        self.detector = create_detector(guard_config).load()
        self.fingerprint = config_fingerprint(guard_config, self.detector)
        self.column, self.source_column, self.include_sanitized = column, source_column, include_sanitized
        self.stores = _ObjectStores(filesystems)
        self.schema = verdict_schema(include_sanitized)

    def __call__(self, batch: dict[str, Any]) -> "pyarrow.Table":
        import pyarrow as pa

        column = self.column or _pick_column(list(batch))
        if column not in batch:
            raise ValueError(f"column: {column!r} is not in the dataset (it has {', '.join(batch)})")
        values = list(batch[column])
        source_column = self.source_column
        if source_column is None and column != "path" and "path" in batch:
            source_column = "path"
        if source_column is not None:
            if source_column not in batch:
                raise ValueError(f"source_column: {source_column!r} is not in the dataset (it has {', '.join(batch)})")
            sources = [None if s is None else str(s) for s in batch[source_column]]
        else:
            sources = [str(v) if isinstance(v, str) else None for v in values]
        rows = scan_values(self.detector, values, sources, fingerprint=self.fingerprint, include_sanitized=self.include_sanitized, stores=self.stores)
        return pa.Table.from_pylist(rows, schema=self.schema)


def _compute_strategy(ray, concurrency: int | tuple[int, int]):
    if isinstance(concurrency, bool) or not isinstance(concurrency, (int, tuple)):
        raise TypeError(f"concurrency: expected an int or a (min, max) tuple, got {type(concurrency).__name__}")
    if isinstance(concurrency, int):
        if concurrency < 1:
            raise ValueError(f"concurrency: must be at least 1, got {concurrency}")
        return ray.data.ActorPoolStrategy(size=concurrency)
    if len(concurrency) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in concurrency) or not 1 <= concurrency[0] <= concurrency[1]:
        raise ValueError(f"concurrency: a (min, max) tuple needs 1 ≤ min ≤ max, got {concurrency!r}")
    return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])


def scan_dataset(
    ds: "ray.data.Dataset",
    config: "str | Path | GuardConfig | DetectorConfig | dict | None" = None,
    *,
    column: str | None = None,
    source_column: str | None = None,
    batch_size: int = 32,
    concurrency: int | tuple[int, int] = 1,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    include_sanitized: bool = False,
    filesystems: "Mapping[str, Any] | None" = None,
) -> "ray.data.Dataset":
    """Screen every image of a Ray Dataset; returns a Dataset of verdict rows (lazy, like any Ray transform).

    Args:
        ds: rows holding the images, e.g. ``ray.data.read_binary_files(uri, include_paths=True)``
            (``bytes`` + ``path``), ``ray.data.read_images(uri, mode="RGB", include_paths=True)``
            (``image`` arrays), ``ray.data.read_parquet(...)`` with a binary or path/URI column.
        config: a preset name, config file, ``GuardConfig``, ``DetectorConfig`` or dict (default
            the default config); validated here, before any actor starts.
        column: the image column (default: the first of ``bytes``, ``image``, ``path``, ``uri``, ``url``).
        source_column: the column recorded as each row's ``source`` (default ``path`` when there
            is one; for a path/URI image column, the string itself).
        batch_size: rows per ``map_batches`` call (and per ``detector.scan``).
        concurrency: actors, each with its own loaded CLIP: an int for a fixed pool, or
            ``(min, max)`` for an autoscaling one (Ray's ``ActorPoolStrategy``).
        num_gpus: GPUs per actor; ``None``: 1 when the connected cluster has GPUs, else 0.
        num_cpus: CPUs per actor (Ray's default when ``None``); Ray sizes the actor's thread pools from it.
        include_sanitized: add a ``sanitized_png`` column (the masked pixels as PNG where the
            decision is ``mask``, or a re-encode where the original bytes would show a model
            other pixels; ``None`` otherwise).
        filesystems: ``pyarrow.fs`` file systems by URI scheme (``{"s3": S3FileSystem(endpoint_override=...)}``)
            for path/URI rows; a scheme not given gets one built from the scheme alone (credentials from
            the environment, each request bounded by ``ImageLimits.fetch_timeout_s``). A row never sets
            options: an object-store URI with a query, fragment, user or port is an error row.

    Returns:
        A ``ray.data.Dataset`` with one :class:`~guardalign_core.corpus.VerdictRow` row per
        input row (schema :func:`verdict_schema`); ``.write_parquet(path)`` writes it.

    Raises:
        RayNotAvailableError: the ``ray`` extra is not installed.
        ValueError, TypeError: an invalid config or argument (before anything runs).

    Example:
        >>> import ray
        >>> ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)  # doctest: +SKIP
        >>> verdicts = scan_dataset(ds, "fast-cpu", concurrency=4, num_gpus=1)  # doctest: +SKIP
        >>> verdicts.write_parquet("s3://bucket/verdicts/")  # doctest: +SKIP
    """
    ray = _import_ray()
    guard_config = resolve_config(config)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
    compute = _compute_strategy(ray, concurrency)
    for name, value in (("num_gpus", num_gpus), ("num_cpus", num_cpus)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{name}: must be a non-negative number, got {value!r}")
    filesystems = dict(_ObjectStores(filesystems)._given) or None  # validated before any actor starts
    if num_gpus is None:
        num_gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    if guard_config.detector.device.startswith("cuda") and not num_gpus:
        raise ValueError(f"device: {guard_config.detector.device!r} needs GPUs on the actors; pass num_gpus= (or device='auto')")
    return ds.map_batches(
        _VerdictScanner,
        fn_constructor_kwargs={
            "config": guard_config.model_dump(mode="json"),
            "column": column,
            "source_column": source_column,
            "include_sanitized": include_sanitized,
            "filesystems": filesystems,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=compute,
        num_gpus=num_gpus or None,
        num_cpus=num_cpus,
    )


def scan_files(
    paths: Sequence[str],
    config: "str | Path | GuardConfig | DetectorConfig | dict | None" = None,
    *,
    address: str | None = None,
    batch_size: int = 32,
    concurrency: int | tuple[int, int] = 1,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Scan files (paths or URIs) through Ray, yielding verdict rows batch by batch as they finish.

    What ``guardalign scan --ray`` runs. Connects to ``address`` (``None``: start a new local
    cluster; ``"auto"``: ``RAY_ADDRESS`` or the cluster running on this machine; ``host:port``
    or ``ray://host:port``: that cluster) unless Ray is already initialised in this process; a
    cluster it started is shut down when the iterator is exhausted or closed. Batches arrive in completion order,
    not input order; each row's ``source`` is its path.

    Raises:
        RayNotAvailableError: the ``ray`` extra is not installed.
    """
    ray = _import_ray()
    resolve_config(config)  # fail on a bad config before a cluster starts
    if not paths:
        return
    started = False
    if not ray.is_initialized():
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
        started = True
    elif address:
        logger.warning("Ray is already initialised in this process; using that cluster, not %s", address)
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = False  # the caller shows its own
    try:
        ds = ray.data.from_items([{"path": str(p)} for p in paths])
        verdicts = scan_dataset(ds, config, column="path", batch_size=batch_size, concurrency=concurrency, num_gpus=num_gpus, num_cpus=num_cpus)
        for batch in verdicts.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield batch.to_pylist()
    finally:
        context.enable_progress_bars = bars
        if started:
            ray.shutdown()
