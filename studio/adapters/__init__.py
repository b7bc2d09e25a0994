"""Adapters: the method registry and the operations every method supports."""

from studio.adapters.core import (
    adapter_names, adapter_state_dict, add_adapter, check_settings, add_trigger_embedding, load_adapter, merge, no_decay_groups, read_metadata,
    remove_adapter, save_adapter, set_active, set_enabled, unmerge,
)
from studio.adapters.methods import AdapterMethod, AdapterSettings, get_method, methods, register_method

__all__ = [
    "AdapterMethod", "AdapterSettings", "add_adapter", "check_settings", "add_trigger_embedding", "adapter_names", "adapter_state_dict", "get_method",
    "load_adapter", "merge", "methods", "no_decay_groups", "read_metadata", "register_method", "remove_adapter", "save_adapter",
    "set_active", "set_enabled", "unmerge",
]

from studio.adapters import tlora  # noqa: E402,F401 - registers --method tlora
from studio.adapters import b4m  # noqa: E402,F401 - registers --method b4m
