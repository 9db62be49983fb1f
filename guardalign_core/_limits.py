"""Limits on untrusted images: one image, one request, one fetch, one forwarded image.

Kept apart from :mod:`guardalign_core.images` so that the decoder, the fetcher, the request
budget and the forwarding encoder can all read the same frozen settings without importing
each other. Users import :class:`ImageLimits` from ``guardalign_core.images``.

The defaults and how to loosen them are documented in ``docs/threat-model.md``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

ANTHROPIC_BASE64_LIMIT = 5_000_000
"""Anthropic's per-image limit applies to the base64 text: 5 MB of base64 hold 3.75 MB of bytes."""


class ImageLimits(BaseModel):
    """Limits and remote-fetch rules applied to every decoded image.

    Example:
        >>> from guardalign_core.images import ImageLimits
        >>> ImageLimits(max_aspect_ratio=50).max_aspect_ratio
        50.0
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(
        20 * 1024 * 1024,
        gt=0,
        description="Largest encoded input accepted per image, in bytes (base64 and data URLs are checked on their "
        "text length before decoding). Forwarded images are held to max_output_bytes separately.",
    )
    max_pixels: int = Field(40_000_000, gt=0, description="Largest width×height accepted (decompression-bomb guard).")
    max_aspect_ratio: float = Field(
        32.0,
        ge=1.0,
        description="Largest long-side/short-side ratio accepted, checked from the header before decoding. 32 keeps "
        "scroll-capture screenshots and long receipts (≈1:20) and panoramas (≈1:10); a 1-pixel-wide strip of legal "
        "pixel count (1×500,000) is refused before it costs seconds and gigabytes downstream.",
    )
    allow_remote: bool = Field(False, description="Fetch http(s) URLs. Off by default: a guard should not make requests on a user's behalf.")
    allowed_hosts: tuple[str, ...] = Field(
        (),
        description="Hosts that may be fetched when allow_remote is on, also for every redirect; empty means none. "
        "Compared case-insensitively, without a port.",
    )
    fetch_timeout_s: float = Field(
        10.0, gt=0, description="Deadline for one remote fetch as a whole (connect, redirects, headers and body), in seconds."
    )
    max_redirects: int = Field(3, ge=0, le=10, description="Most http(s) redirects followed by one fetch; each must stay on allowed_hosts.")
    max_images: int = Field(20, ge=0, description="Most images accepted in one request (per-request budget).")
    max_total_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Most encoded image bytes accepted in one request, all images together."
    )
    max_total_pixels: int = Field(
        100_000_000, gt=0, description="Most decoded pixels (width×height) accepted in one request, all images together."
    )
    max_output_bytes: int = Field(
        ANTHROPIC_BASE64_LIMIT * 3 // 4,
        ge=1024,
        description="Largest forwarded (re-encoded) image, in bytes; larger results are downscaled until they fit. "
        "The default, 3.75 MB, is Anthropic's 5 MB base64 limit; OpenAI and Bedrock accept more.",
    )
    allow_local_files: bool = Field(
        False,
        description="Read local files named in message content (paths, file:// URLs). Off by default: message "
        "content is untrusted, and a guard must not read the server's files on its behalf.",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _normalise_hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for host in hosts:
            name = host.strip().lower().rstrip(".") if isinstance(host, str) else ""
            if not name or any(c in name for c in "/@ []") or (":" in name and not _is_ipv6(name)):
                raise ValueError(f"allowed_hosts: {host!r} is not a bare host name (no scheme, port, path or user)")
            out.append(name)
        return tuple(out)


def _is_ipv6(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True
