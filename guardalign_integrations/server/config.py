"""The server's settings: one typed, validated :class:`ServerConfig`, loadable from YAML.

What: where to listen, what to serve (a guarding gateway in front of an upstream
OpenAI-compatible API, or a local calibrated model), which guard preset, and the
operational limits (auth, body size, concurrency, timeouts, micro-batching).

Why: a misspelt limit must be an error, not a silent default (``extra="forbid"``), and a
server reachable from the network must never run without authentication (validated here,
before anything is bound). Environment variables are read only by the CLI, never here.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

from guardalign_core.structured_files import read_structured_file
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_REFUSAL = "I can't help with this request: an image it contains was judged unsafe."


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class UpstreamConfig(_Config):
    """The OpenAI-compatible API the gateway forwards to (OpenAI, vLLM, Ollama, OpenRouter, LiteLLM)."""

    base_url: str = Field(description="Base URL of the upstream API including its version path, e.g. 'https://api.openai.com/v1'.")
    api_key: str | None = Field(
        None, description="The server's own upstream key (used when key_mode='server'). Never logged, never returned."
    )
    key_mode: Literal["server", "passthrough"] = Field(
        "server",
        description="'server': send api_key upstream and never the caller's Authorization; 'passthrough': forward the "
        "caller's Authorization header unchanged (the caller then authenticates to this server with x-api-key).",
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Timeout for connecting to the upstream, in seconds (504 when exceeded).")
    read_timeout_s: float = Field(
        120.0, gt=0, description="Timeout between two reads from the upstream (whole answer, or one streamed chunk), in seconds."
    )
    max_connections: int = Field(256, ge=1, description="Most simultaneous connections to the upstream.")
    max_response_bytes: int = Field(
        64 * 1024 * 1024, gt=0,
        description="Largest whole (non-streamed) answer read from the upstream, after decompression (502 above it: a "
        "hostile or broken upstream cannot exhaust the gateway's memory, a gzip bomb included).",
    )

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected an http(s) URL, got {value!r}")
        return value


class LocalModelConfig(_Config):
    """A local Hugging Face LVLM served with the full method (detection, masking, prefix, calibration)."""

    model_id: str = Field(description="A hub id (e.g. 'llava-hf/llava-1.5-7b-hf') or a local checkpoint folder.")
    served_name: str | None = Field(None, description="The model name reported by /v1/models (default: the folder name or hub id).")
    device: str = Field("cpu", description="Torch device for the LVLM, e.g. 'cpu' or 'cuda'.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="Weights dtype.")
    max_concurrent: int = Field(1, ge=1, description="Most generations running at once (each holds its own KV cache).")
    max_new_tokens: int = Field(512, ge=1, description="Default and upper bound of max_tokens per request.")
    suppress_special_tokens: bool = Field(
        False, description="Never generate the tokenizer's special tokens (needed by random-weight test checkpoints only)."
    )
    trust_remote_code: bool = Field(False, description="Passed to the transformers Auto classes.")

    @property
    def name(self) -> str:
        return self.served_name or (Path(self.model_id).name if Path(self.model_id).exists() else self.model_id)


class BatchingConfig(_Config):
    """Micro-batching: concurrent scans from different requests share one detector batch."""

    enabled: bool | None = Field(None, description="On, off, or null: on when the detector runs on a GPU (the default).")
    window_ms: float = Field(3.0, ge=0, le=1000, description="How long the first scan of a batch waits for others to join, in ms.")
    max_images: int = Field(64, ge=1, description="Most images in one batch (a full batch starts at once).")


class ServerConfig(_Config):
    """Everything ``guardalign serve`` needs. Exactly one of ``upstream`` and ``model`` must be set.

    Example:
        >>> ServerConfig(upstream={"base_url": "http://127.0.0.1:11434/v1"}, guard="fast-cpu").host
        '127.0.0.1'
    """

    host: str = Field("127.0.0.1", description="Address to bind. Anything but loopback requires api_keys.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port).")
    guard: str = Field("default", description="Guard preset name or a GuardConfig YAML/JSON file (detector, policy, image limits, prefix).")
    upstream: UpstreamConfig | None = Field(None, description="Gateway mode: the OpenAI-compatible API requests are forwarded to.")
    model: LocalModelConfig | None = Field(None, description="Local mode: the LVLM this server runs itself.")
    api_keys: list[str] = Field(
        default_factory=list,
        description="Keys accepted from callers (Authorization: Bearer, or x-api-key). Empty: no auth (loopback only).",
    )
    blocked_response: Literal["refusal", "error"] = Field(
        "refusal",
        description="A blocked request gets an assistant refusal (finish_reason 'content_filter'), or an OpenAI-style "
        "400 error with code 'guardalign_blocked'.",
    )
    refusal_text: str = Field(DEFAULT_REFUSAL, description="The refusal message of a blocked request.")
    safety_prompt: bool = Field(True, description="Gateway: add the black-box safety prompt the guard plans (DESIGN §1C).")
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Largest request body accepted, in bytes (413 above).")
    body_read_timeout_s: float = Field(
        30.0, gt=0,
        description="How long a client may take to send its whole request body, in seconds (408 and the connection "
        "closed after). The body is read before a processing slot is taken, so slow uploads never hold one.",
    )
    max_json_values: int = Field(
        250_000, ge=1,
        description="Most JSON values (objects, arrays, strings, numbers, literals) in one request body, counted before "
        "parsing (413 json_too_complex above): bounds the CPU a body can cost.",
    )
    max_concurrency: int = Field(64, ge=1, description="Requests processed at once; more wait in the queue.")
    max_queue: int = Field(256, ge=0, description="Requests allowed to wait for a slot; beyond that the answer is 429.")
    retry_after_s: int = Field(1, ge=0, description="The Retry-After value of a 429, in seconds.")
    drain_timeout_s: float = Field(30.0, ge=0, description="On shutdown, how long in-flight requests may finish, in seconds.")
    max_connections: int | None = Field(
        None, ge=1,
        description="Most open client connections and requests in progress (uvicorn's limit_concurrency; 503 above), "
        "counted before any slot or queue place: null means 4 x (max_concurrency + max_queue), at least 1024.",
    )
    keep_alive_timeout_s: int = Field(
        5, ge=1, description="How long an idle keep-alive connection stays open between requests, in seconds (uvicorn's timeout_keep_alive)."
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    warm_up: bool = Field(True, description="Load the CLIP backbone (and local model) at start-up; /readyz says ready after.")
    gc_freeze: bool = Field(
        True,
        description="After warm-up, move every object alive (torch, the models) out of the garbage collector's reach "
        "(gc.freeze), so that collections no longer walk them on the request path; undone at shutdown.",
    )

    @model_validator(mode="after")
    def _check(self) -> "ServerConfig":
        if (self.upstream is None) == (self.model is None):
            raise ValueError("set exactly one of upstream (gateway mode) and model (local model mode)")
        if not is_loopback(self.host) and not self.api_keys:
            raise ValueError(f"host: binding {self.host!r} (not loopback) requires api_keys (or --api-key)")
        if any(not key.strip() for key in self.api_keys):
            raise ValueError("api_keys: empty keys are not accepted")
        if self.max_connections is not None and self.max_connections <= self.max_concurrency + self.max_queue:
            raise ValueError(f"max_connections: {self.max_connections} leaves no room above max_concurrency + max_queue "
                             f"({self.max_concurrency + self.max_queue}); the queue could never fill, and 503s would replace 429s")
        return self

    @property
    def connection_limit(self) -> int:
        """``max_connections``, or its default: room for every slot and queue place several times over."""
        return self.max_connections or max(1024, 4 * (self.max_concurrency + self.max_queue))

    @property
    def mode(self) -> Literal["gateway", "local"]:
        return "gateway" if self.upstream is not None else "local"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_server_config(path: str | Path | None = None, **overrides: Any) -> ServerConfig:
    """Read a YAML/JSON server config and apply ``overrides`` (``None`` values are ignored).

    ``upstream`` may be given as a URL string and ``model`` as an id or folder; either
    replaces the other mode of the file.

    Raises:
        ValueError: missing file, not a mapping, or invalid fields (pydantic names them).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"server config file not found: {path.name}")
        data = read_structured_file(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path.name}: expected a mapping at the top level")
    updates = {k: v for k, v in overrides.items() if v is not None}
    upstream, model = updates.pop("upstream", None), updates.pop("model", None)
    if upstream is not None:
        base = data.get("upstream") if isinstance(data.get("upstream"), dict) else {}
        data["upstream"] = {**base, "base_url": upstream} if isinstance(upstream, str) else upstream
        data.pop("model", None)
    if model is not None:
        base = data.get("model") if isinstance(data.get("model"), dict) else {}
        data["model"] = {**base, "model_id": model} if isinstance(model, str) else model
        data.pop("upstream", None)
    data.update(updates)
    return ServerConfig.model_validate(data)
