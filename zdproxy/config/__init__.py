"""Configuration: the typed schema and the YAML loader that reports file:line:key."""

from zdproxy.config.loader import (
    ConfigError,
    ConfigProblem,
    check_file,
    load_config,
    load_config_text,
    summary,
)
from zdproxy.config.schema import Address, BackendConfig, Config, PoolConfig, parse_duration

__all__ = [
    "Address",
    "BackendConfig",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "PoolConfig",
    "check_file",
    "load_config",
    "load_config_text",
    "parse_duration",
    "summary",
]
