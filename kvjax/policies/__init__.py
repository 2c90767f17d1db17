"""KV-cache compression policies. Importing this package registers every method."""

from .a2ats import A2ATS
from .adakv import AdaKV
from .base import Policy, PolicyError
from .chunkkv import ChunkKV
from .compose import Compose
from .cskv import CSKV
from .dense import Dense
from .elastic_cache import ElasticCache
from .h2o import H2O
from .knorm import KNorm
from .kvmerger import KVMerger
from .locret import Locret
from .matryoshka import Matryoshka
from .offload import Offload
from .pyramidkv import PyramidKV
from .quest import Quest
from .registry import REGISTRY, list_policies, parse_policy, register
from .shadowkv import ShadowKV
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .tova import TOVA
from .triforce_retrieval import TriForceRetrieval

__all__ = [
    "A2ATS",
    "CSKV",
    "H2O",
    "REGISTRY",
    "TOVA",
    "AdaKV",
    "ChunkKV",
    "Compose",
    "Dense",
    "ElasticCache",
    "KNorm",
    "KVMerger",
    "Locret",
    "Matryoshka",
    "Offload",
    "Policy",
    "PolicyError",
    "PyramidKV",
    "Quest",
    "ShadowKV",
    "SnapKV",
    "StreamingLLM",
    "TriForceRetrieval",
    "list_policies",
    "parse_policy",
    "register",
]
