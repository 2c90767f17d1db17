"""KV-cache compression policies. Importing this package registers every method."""

from .base import Policy, PolicyError
from .compose import Compose
from .dense import Dense
from . import adakv, chunkkv, elastic_cache, h2o, knorm, kvmerger, locret, pyramidkv, snapkv, streaming, tova  # noqa: F401  (registers)
from .registry import REGISTRY, list_policies, parse_policy, register
from .adakv import AdaKV
from .chunkkv import ChunkKV
from .elastic_cache import ElasticCache
from .kvmerger import KVMerger
from .locret import Locret
from .h2o import H2O
from .knorm import KNorm
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .tova import TOVA

__all__ = ["AdaKV", "ChunkKV", "ElasticCache", "KVMerger", "Locret", "H2O", "KNorm", "PyramidKV", "SnapKV", "StreamingLLM", "TOVA", "Compose", "Policy", "PolicyError", "Dense", "REGISTRY", "list_policies", "parse_policy", "register"]
