"""Verdicts that travel with a node: stamped at screening, trusted later only for the same image and config.

A node screened at ingestion (or by a postprocessor) carries its verdict in its metadata: the
one per-image summary (:meth:`~guardalign_core.verdicts.ImageVerdict.summary`) plus

- ``fingerprint``: :func:`guardalign_core.memory.config_fingerprint` of the guard that decided
  (backbone, weights, dtype/backend, concept banks, rule, threshold, grid, patch and mask mode,
  policy, image limits: everything that changes the verdict or what is forwarded), and
- ``image_sha256``: the SHA-256 of exactly the bytes that were forwarded.

Metadata is user-editable, so :func:`trusted_summary` trusts a stamp only when the node's image
*now* is those bytes, inline, with no path or URL beside them, under the same MIME type, and the
stamp says they were checked (``status: ok``, ``forward: bytes``). Anything else is screened
again. The digest is not a signature: whoever can write both a node's image and its metadata
can compute one, so this trusts the vector store's integrity, not its writers. Set
``trust_screened=False`` on the postprocessor where the store is writable by untrusted parties.
"""

from __future__ import annotations

import hashlib
from typing import Any

from llama_index.core.schema import ImageNode, Node

from guardalign_core.verdicts import Forward, ImageVerdict

from ._messages import _raw, node_file_path

__all__ = ["FINGERPRINT_KEY", "IMAGE_DIGEST_KEY", "image_digest", "inline_image", "stamped_summary", "trusted_summary"]

FINGERPRINT_KEY = "fingerprint"
"""Key, inside a node's verdict, of the deciding guard's config fingerprint."""

IMAGE_DIGEST_KEY = "image_sha256"
"""Key, inside a node's verdict, of the SHA-256 of the forwarded image bytes."""

_TRUSTED_DECISIONS = frozenset({"allow", "mask", "flag"})


def image_digest(data: bytes) -> str:
    """The hex SHA-256 of image bytes (what a stamp records and a trust check recomputes)."""
    return hashlib.sha256(data).hexdigest()


def stamped_summary(entry: ImageVerdict, fingerprint: str) -> dict[str, Any]:
    """The per-image summary of ``entry`` plus the config fingerprint and the digest of the forwarded bytes.

    An image that was not forwarded as checked bytes (blocked, or unchecked under
    ``fail_open``) gets ``image_sha256: None``: nothing about it can be trusted later.

    Example:
        >>> stamped_summary(verdict.images[0], config_fingerprint(guard.config, guard.detector))["image_sha256"]  # doctest: +SKIP
        '9f2c...'
    """
    digest = image_digest(entry.data) if entry.forward == Forward.BYTES and entry.data is not None else None
    return {**entry.summary(), FINGERPRINT_KEY: fingerprint, IMAGE_DIGEST_KEY: digest}


def inline_image(node: Any) -> tuple[bytes, str | None] | None:
    """A node's image bytes and MIME type when they are inline and the only source; else ``None``.

    A node that also names a path (``image_path``, or ``metadata["file_path"]``, which LlamaIndex
    also loads) or a URL is not inline-only: a model may be shown either.
    """
    if isinstance(node, ImageNode):
        if node.image is None or node.image_path is not None or node.image_url is not None or node_file_path(node) is not None:
            return None
        return _raw(node.image), node.image_mimetype
    if isinstance(node, Node) and node.image_resource is not None:
        resource = node.image_resource
        if resource.data is None or resource.path is not None or resource.url is not None:
            return None
        return _raw(resource.data), resource.mimetype
    return None


def trusted_summary(node: Any, metadata_key: str, fingerprint: str) -> dict[str, Any] | None:
    """The node's stamped verdict if it may be trusted without a new scan, else ``None``.

    Trusted only if the stamp comes from a guard with this ``fingerprint``, says the image was
    checked and forwarded as bytes, and its digest and MIME type match the node's current
    inline image (a swapped image, a stamp copied onto another node, a path or URL added
    after screening: all screened again).
    """
    metadata = getattr(node, "metadata", None) or {}
    stamp = metadata.get(metadata_key)
    if not isinstance(stamp, dict):
        return None
    if stamp.get(FINGERPRINT_KEY) != fingerprint or not fingerprint:
        return None
    if stamp.get("status") != "ok" or stamp.get("forward") != Forward.BYTES.value or stamp.get("decision") not in _TRUSTED_DECISIONS:
        return None
    image = inline_image(node)
    if image is None:
        return None
    data, mime = image
    digest = stamp.get(IMAGE_DIGEST_KEY)
    if not isinstance(digest, str) or digest != image_digest(data):
        return None
    if (mime or "").lower() != str(stamp.get("mime") or "").lower():
        return None
    return stamp
