"""Every setting of the service, in one pydantic-settings model.

Sources, strongest first: values given by the CLI, environment variables
`PYPNM_<NAME>`, then an optional TOML file (`--config FILE` or `PYPNM_CONFIG`).
`load_settings` is the only way in; it turns every problem (unreadable file, bad
TOML, unknown key, invalid value) into a `SettingsError` whose message is one line
that names the setting, so the CLI and the reload status can show it as it is.

Lists and tables arrive from the environment as text. pydantic-settings would decode
them as JSON only, and a value such as `127.0.0.1/32` would end in its own exception
rather than a validation error; so decoding is switched off (`enable_decoding=False`)
and `_list_or_table_from_text` reads the text instead: JSON when it starts with `[` or
`{`, else the comma form people type (`a,b`; tables `label:value,label2:value2`). Its
errors are validation errors, which name the setting like every other.
"""

from __future__ import annotations

import collections.abc
import contextvars
import ipaddress
import json
import os
import re
import tomllib
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BeforeValidator,
    ByteSize,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pypnm.profile import SettingSource, workers_for_auto


def _network(value: object) -> object:
    """Parse an address or network (`10.0.0.0/8`, `::1`); host bits are allowed and dropped."""
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network (like 10.0.0.0/8 or ::1/128)") from None
    return value


def _byte_size(value: object) -> object:
    """A size in bytes: a number, or a number and a unit (`512MiB`, `1 GiB`, `1.5GB`, `300kB`)."""
    if isinstance(value, str):
        try:
            return int(TypeAdapter(ByteSize).validate_python(value.strip()))
        except ValidationError:
            raise ValueError(
                f"{value!r} is not a size; write bytes (536870912) or a number and a unit "
                "(512MiB, 1GiB, 1.5GB: KiB, MiB, GiB are powers of 1024, kB, MB, GB of 1000)"
            ) from None
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise ValueError(f"{value} is negative; write 0 for no limit")
    return value


IPNetwork = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network)]
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]

ENV_PREFIX = "PYPNM_"
CONFIG_ENV = "PYPNM_CONFIG"

# Settings the master applies once, when it binds its socket(s) and starts workers.
# A reload that sees them changed reports that a restart is needed.
RESTART_ONLY = (
    "host",
    "port",
    "runtime_dir",
    # Every process of the service (master, fork template, workers) writes the same format to the same file.
    "log_format",
    "log_file",
    "log_file_max_bytes",
    "log_file_backups",
)

# Which TOML file the model reads while load_settings runs (pydantic-settings builds
# its sources inside the constructor, so the path has to travel beside the call).
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("pypnm_config_file", default=None)


class SettingsError(ValueError):
    """A setting or the settings file is unusable; the message is one line for the operator."""


class Settings(BaseSettings):
    # enable_decoding=False: lists and tables given as text are read by _list_or_table_from_text.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, enable_decoding=False
    )

    # Listening (host and port restart-only)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # A reload's new generation has this many; "auto" sizes it from CPUs and memory (pypnm.profile.auto_workers).
    workers: int = Field(1, ge=1, le=64)
    # HTTPS: a reload checks the pair (pypnm.supervisor.tls) and freezes it into the new generation's snapshot.
    ssl: bool = False
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    # Serving
    log_level: LogLevel = "info"
    access_log: bool = True
    cors_origins: list[str] = Field(default_factory=list)
    cors_allow_credentials: bool = False
    gzip_minimum_size: int = Field(1000, ge=0)
    # Count requests and serve GET /metrics (a System Operation); off: neither, for a build without the cost.
    metrics_enabled: bool = True

    # Log output (restart-only; see pypnm.logs and pypnm.supervisor.logfile)
    log_format: Literal["text", "json"] = "text"
    # Every process appends its lines to this file instead of stderr; None: stderr.
    log_file: Path | None = None
    # Rotate before a line would take the file past this size; 0: never (rotation left to logrotate).
    log_file_max_bytes: int = Field(10 * 1024 * 1024, ge=0)
    log_file_backups: int = Field(5, ge=1, le=1000)  # rotated files kept: <log_file>.1 (newest) to .<n>

    # HTTP limits, per worker (a reload applies them to the new generation)
    limit_request_line_size: int = Field(16384, ge=256, le=1 << 24)  # one line of a request head: 431 beyond
    limit_request_header_size: int = Field(65536, ge=256, le=1 << 26)  # the request line and all headers: 431
    timeout_request_header: float = Field(10.0, gt=0, le=3600)  # seconds to send a request head, else closed
    # Open connections a worker serves; requests on more get 503. Below the usual 1024 open files per process.
    limit_concurrency: int = Field(1000, ge=1, le=1_000_000)

    # Reloading
    graceful_timeout: float = Field(30.0, gt=0, le=3600)
    reload_timeout: float = Field(30.0, gt=0, le=3600)
    reload_min_interval: float = Field(1.0, ge=0, le=3600)
    # Old generations allowed to drain at once; a swap beyond it closes the oldest one's connections now,
    # so long-lived responses (streams) cannot pile up processes. At least 1: a swap never cuts its own old one.
    max_draining_generations: int = Field(2, ge=1, le=64)
    # Seconds a serving worker's event loop may leave the master's heartbeat unanswered before the
    # worker counts as hung and is replaced (the new one first), then killed. 0 turns the check off.
    worker_timeout: float = Field(30.0, ge=0, le=3600)
    # Seconds after a swap during which the replaced generation's snapshot is kept, and the new generation
    # rolled back to it if its workers crash (or hang) `rollback_crashes` times (supervisor/rollback.py). 0: off.
    rollback_window: float = Field(30.0, ge=0, le=3600)
    rollback_crashes: int = Field(3, ge=1, le=1000)
    # Worker recycling (lifecycle.py): a serving worker past a limit is replaced (the new one first) and drains.
    # Requests a worker serves before it is recycled; 0: no limit. Each worker adds 0..jitter to it, at random,
    # so that workers started together are not recycled together; None: a tenth of limit_max_requests.
    limit_max_requests: int = Field(0, ge=0)
    limit_max_requests_jitter: int | None = Field(None, ge=0)
    # Resident memory (RSS) past which a worker is recycled: bytes, or "512MiB", "1GiB", "1.5GB"; 0: no limit.
    limit_worker_memory: Annotated[int, BeforeValidator(_byte_size)] = 0
    # How a reload imports the new code: `incremental` re-imports only the modules whose files changed and
    # their importers, in a zygote forked from the serving generation's; `clean` imports it all in a fresh
    # one. None: incremental with --reload (development), clean otherwise (supervisor/import_graph.py).
    reload_import: Literal["incremental", "clean"] | None = None
    # The longest line of incremental imports in a row; the next reload imports clean (supervisor/lifecycle.py).
    reload_import_line: int = Field(32, ge=1, le=1000)
    # When an incremental line's next zygote (a standby) is forked: `ahead`, once the last reload is over,
    # kept waiting (faster reloads, its own copy of the pages it wrote meanwhile); `at_reload`, as a reload
    # begins. None: ahead with --reload (development), at_reload otherwise (supervisor/standby.py).
    reload_standby: Literal["ahead", "at_reload"] | None = None
    reload_dirs: list[Path] = Field(default_factory=list)
    reload_includes: list[str] = Field(default_factory=lambda: ["*.py", "*.toml"])
    reload_excludes: list[str] = Field(default_factory=lambda: [".*", "*~", "__pycache__"])
    check_paths: list[str] | None = None
    # Reload when the content of the settings file (--config) or of api_tokens_file changes, however
    # it is replaced (a Kubernetes ConfigMap or Secret volume swaps a `..data` symlink); see config_watch.py.
    watch_config: bool = True
    preload_modules: list[str] = Field(default_factory=list)
    # The master writes its pid here (atomically; a self-upgrade's new master rewrites it), and removes
    # it at a clean stop if it still names the master. None: no file. A reload moves it.
    pid_file: Path | None = None
    # Parent of the master's private runtime directory (control socket, snapshots); restart only.
    # None: $RUNTIME_DIRECTORY (systemd), else the temporary directory.
    runtime_dir: Path | None = None

    # Access to System Operations
    trusted_networks: list[IPNetwork] = Field(
        default_factory=lambda: [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    )
    api_tokens: dict[str, SecretStr] = Field(default_factory=dict)
    api_tokens_file: Path | None = None
    forwarded_allow_ips: list[IPNetwork] = Field(default_factory=list)
    # Host names (or `*.domain` patterns, or addresses) that name this service, besides loopback and
    # the address it listens on: a request admitted by its address must carry one (DNS rebinding).
    allowed_hosts: list[str] = Field(default_factory=list)

    @field_validator("*", mode="before")
    @classmethod
    def _list_or_table_from_text(cls, value: Any, info: ValidationInfo) -> Any:
        """A list or table setting given as text (every environment variable is): JSON or the comma form."""
        if not isinstance(value, str) or info.field_name is None:
            return value
        kind = _container_kind(cls.model_fields[info.field_name].annotation)
        return value if kind is None else parse_text(value, kind)

    @model_validator(mode="before")
    @classmethod
    def _auto_workers(cls, data: Any) -> Any:
        """`workers = "auto"` (file, PYPNM_WORKERS=auto, --workers auto): sized from this machine, now.

        Resolved when the settings are read, so each reload sizes its generation again; the
        memory budget per worker is `limit_worker_memory` when it is valid, else the default.
        """
        if isinstance(data, dict) and isinstance(data.get("workers"), str) and data["workers"].strip() == "auto":
            try:
                budget = _byte_size(data.get("limit_worker_memory", 0))
            except ValueError:
                budget = 0  # reported by the field's own validation
            data = {**data, "workers": workers_for_auto(budget if isinstance(budget, int) else 0)}
        return data

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_number(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip().isdigit():
            raise ValueError(f"{value!r} is neither a number of workers (1 to 64) nor 'auto'")
        return value

    @field_validator("log_file", mode="before")
    @classmethod
    def _no_log_file_when_empty(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value  # PYPNM_LOG_FILE="": stderr

    @field_validator("check_paths")
    @classmethod
    def _paths_are_absolute(cls, paths: list[str] | None) -> list[str] | None:
        for path in paths or []:
            if not path.startswith("/"):
                raise ValueError(f"{path!r} must start with '/'")
        return paths

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_are_names(cls, hosts: list[str]) -> list[str]:
        return [_host_pattern(host) for host in hosts]

    @field_validator("api_tokens")
    @classmethod
    def _tokens_are_usable(cls, tokens: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for label, token in tokens.items():
            _check_token(label, token.get_secret_value())
        return tokens

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if "*" in self.cors_origins and self.cors_allow_credentials:
            raise ValueError("cors_origins may not contain '*' while cors_allow_credentials is true")
        if self.ssl and not (self.ssl_certfile and self.ssl_keyfile):
            raise ValueError("ssl needs both ssl_certfile and ssl_keyfile")
        return self

    @model_validator(mode="after")
    def _limits_consistent(self) -> Settings:
        if self.limit_request_line_size > self.limit_request_header_size:
            raise ValueError("limit_request_line_size may not be larger than limit_request_header_size")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_file.get()
        if path is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path))

    def tokens(self) -> dict[str, str]:
        """All bearer tokens, label → secret, from `api_tokens` and `api_tokens_file`."""
        tokens = {label: secret.get_secret_value() for label, secret in self.api_tokens.items()}
        if self.api_tokens_file is not None:
            tokens.update(read_tokens_file(self.api_tokens_file))
        return tokens

    @property
    def max_requests_jitter(self) -> int:
        """`limit_max_requests_jitter` in force: as set, else a tenth of `limit_max_requests`."""
        if self.limit_max_requests_jitter is not None:
            return self.limit_max_requests_jitter
        return self.limit_max_requests // 10

    def restart_only(self) -> dict[str, Any]:
        """The settings a reload cannot apply, in a form that compares and prints plainly."""
        return {name: _plain(getattr(self, name)) for name in RESTART_ONLY}


_HOST_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"(?:{_HOST_LABEL}\.)*{_HOST_LABEL}")
# A last label like these makes a browser read the host as an IPv4 address ("127.1", "0x7f.1"),
# and it is none that `ipaddress` takes: neither a name nor an address here.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


def canonical_host(text: str) -> str | None:
    """A host name or IP address in one spelling, or None if it is neither.

    Names: lower case, without the trailing dot. Addresses: as `ipaddress` prints them,
    IPv6 with or without brackets, an IPv4-mapped IPv6 address as the IPv4 one. A name
    whose last label is a number ("127.1", "999.1.1.1") is neither.
    """
    text = text.strip().lower()
    bracketed = text.startswith("[") and text.endswith("]")
    try:
        address = ipaddress.ip_address(text[1:-1] if bracketed else text)
    except ValueError:
        name = text.removesuffix(".")
        if bracketed or len(name) > 253 or not _HOST_NAME.fullmatch(name):
            return None
        return None if _NUMERIC_LABEL.fullmatch(name.rpartition(".")[2]) else name
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return None if bracketed and address.version == 4 else str(address)


def is_host_name(host: str) -> bool:
    """Whether a canonical host (from `canonical_host`) is a name rather than an IP address."""
    return ":" not in host and not _NUMERIC_LABEL.fullmatch(host.rpartition(".")[2])


def _host_pattern(value: str) -> str:
    """An `allowed_hosts` entry: a host name, an IP address, or `*.` and a domain (any name under it)."""
    wildcard = value.strip().startswith("*.")
    host = canonical_host(value.strip()[2:] if wildcard else value)
    if host is None or (wildcard and not is_host_name(host)):
        raise ValueError(
            f"{value!r} is not a host name, an IP address or a '*.domain' pattern "
            "(no scheme, port or path; like pypnm.example.net or *.example.net)"
        )
    return f"*.{host}" if wildcard else host


def _container_kind(annotation: Any) -> Literal["list", "table"] | None:
    """Whether a setting's type is a list (also inside `| None`), a table, or neither."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        kinds = {_container_kind(arg) for arg in get_args(annotation)} - {None}
        return kinds.pop() if len(kinds) == 1 else None
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence):
        return "list"
    if origin in (dict, collections.abc.Mapping):
        return "table"
    return None


def parse_text(text: str, kind: Literal["list", "table"]) -> Any:
    """Read a list or table written as text; ValueError (never naming a value: it may be a token) if it is not one.

    `[...]`/`{...}` is JSON. Otherwise items are separated by commas, white space around
    them is dropped and empty items are skipped (so an empty text is an empty list); a
    table's items are `label:value`, split at the first colon (labels hold no colon, values may).
    """
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            form = "a,b" if kind == "list" else "label:value,label2:value2"
            raise ValueError(
                f"not valid JSON ({exc.msg} at character {exc.pos + 1}); write {form} or valid JSON"
            ) from None
    items = [item.strip() for item in stripped.split(",") if item.strip()]
    if kind == "list":
        return items
    table: dict[str, str] = {}
    for number, item in enumerate(items, start=1):
        label, sep, value = item.partition(":")
        if not sep or not label.strip():
            raise ValueError(f"item {number} is not 'label:value'; write label:value,label2:value2 or a JSON object")
        table[label.strip()] = value.strip()
    return table


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _check_token(label: str, token: str) -> None:
    if not label or not label.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"token label {label!r} must be letters, digits, '-' or '_'")
    # ASCII: an HTTP header carries nothing else, so a client could never send another token.
    if len(token) < 16 or not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise ValueError(f"token {label!r} must be at least 16 characters, printable ASCII with no white space")


def read_tokens_file(path: Path) -> dict[str, str]:
    """Read `label:token` lines (blank lines and `#` comments skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"api_tokens_file {str(path)!r}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"api_tokens_file {str(path)!r}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        label, sep, token = line.partition(":")
        if not sep:
            raise SettingsError(f"api_tokens_file {str(path)!r} line {number}: expected 'label:token'")
        try:
            _check_token(label.strip(), token.strip())
        except ValueError as exc:
            raise SettingsError(f"api_tokens_file {str(path)!r} line {number}: {exc}") from None
        tokens[label.strip()] = token.strip()
    return tokens


def config_path(config_file: str | os.PathLike[str] | None = None) -> Path | None:
    """The settings file in force: the explicit one, else `PYPNM_CONFIG`, else none."""
    chosen = config_file if config_file is not None else os.environ.get(CONFIG_ENV) or None
    return Path(chosen) if chosen is not None else None


def _check_file(path: Path) -> None:
    # Read it ourselves first: pydantic-settings would silently treat a missing file as empty.
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"config file {str(path)!r}: cannot read it ({exc.strerror})") from None
    try:
        tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"config file {str(path)!r}: not valid TOML ({exc})") from None


def setting_source(
    name: str, overrides: collections.abc.Mapping[str, Any], config_file: Path | None
) -> tuple[SettingSource, Any]:
    """Where a setting's value comes from, by the precedence `load_settings` applies, and the value as given there.

    The runtime profile's `active_source`. The file is the one the settings were read from
    (a generation's snapshot of it); one that cannot be read counts as not setting it.
    """
    if name in overrides:
        return "explicit_cli", overrides[name]
    wanted = f"{ENV_PREFIX}{name}".lower()  # pydantic-settings matches names case-insensitively
    for key, value in os.environ.items():
        if key.lower() == wanted:
            return "environment", value
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            data = {}
        if name in data:
            return "settings_file", data[name]
    return "default", None


def load_settings(
    config_file: str | os.PathLike[str] | None = None, *, read_tokens: bool = True, **overrides: Any
) -> Settings:
    """Build the settings from overrides, the environment and the TOML file, or raise SettingsError.

    `read_tokens`: read the `api_tokens_file` too (a broken one is a settings error, found now rather
    than per request); a client that needs only where the service listens may not be able to read it.
    """
    path = config_path(config_file)
    if path is not None:
        _check_file(path)
    token = _config_file.set(path)
    try:
        settings = Settings(**overrides)
        if read_tokens:
            settings.tokens()
        return settings
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc, path)) from None
    finally:
        _config_file.reset(token)


def describe_validation_error(exc: ValidationError, path: Path | None) -> str:
    """One line per problem, joined with '; ', each naming the setting and where it can be set."""
    problems: list[str] = []
    for error in exc.errors(include_url=False):
        # Keep the field name and list positions / table keys; drop pydantic's validator tags.
        loc = [str(part) for part in error["loc"] if isinstance(part, int) or not any(c in str(part) for c in "[(")]
        name = loc[0] if loc else ""
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            where = f" in {str(path)!r}" if path else ""
            problem = f"unknown setting {name!r}{where}: remove it or check its spelling"
        elif not name:
            problem = message
        else:
            where = f"{ENV_PREFIX}{name.upper()}" + (f" or {name!r} in {str(path)!r}" if path else "")
            item = f"[{']['.join(loc[1:])}]" if len(loc) > 1 else ""
            problem = f"invalid setting {name!r}{item} ({where}): {message}"
        if problem not in problems:  # a union type reports one bad value once per member
            problems.append(problem)
    return "; ".join(problems)
