"""KV-cache compression policies. Importing this package registers every method."""

from .base import Policy, PolicyError
from .compose import Compose
from .dense import Dense
from . import adakv, h2o, knorm, pyramidkv, snapkv, streaming, tova  # noqa: F401  (registers)
from .registry import REGISTRY, list_policies, parse_policy, register

__all__ = ["Compose", "Policy", "PolicyError", "Dense", "REGISTRY", "list_policies", "parse_policy", "register"]
