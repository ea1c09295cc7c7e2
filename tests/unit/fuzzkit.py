"""Shared pieces of the fuzz tests: valid specs that set every field, hypothesis strategies for
arbitrary JSON-ish values and nasty scalars, and a checker that a SpecError's field is a real
path into the object it was raised for.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Deterministic and bounded in CI: the same examples every run, no example database on disk.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=120,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INLINE = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]

# Valid specs that, between them, set every field parse_spec reads.
VALID_SPECS: list[dict[str, Any]] = [
    {
        "model": {"base": "models/base", "revision": "main", "trustRemoteCode": False},
        "dataset": {"path": "data/train.jsonl", "split": "train",
                    "columns": {"anchor": "question", "positive": "answer", "negative": "neg"},
                    "eval": {"fraction": 0.1}},
        "training": {"loss": "CachedMultipleNegativesRankingLoss", "lossParams": {"miniBatchSize": 8, "scale": 20},
                     "epochs": 2, "maxSteps": 50, "batchSize": 16, "learningRate": 1e-4, "warmupRatio": 0.1,
                     "seed": 7, "precision": "fp32", "maxSeqLength": 128,
                     "checkpoint": {"everySteps": 5, "keep": 2, "onPreemption": True}},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["query", "value"], "useRslora": True},
        "export": {"merge": True, "formats": ["sentence-transformers", "huggingface", "adapter"],
                   "pooling": "mean", "normalize": True, "maxShardSize": "2GB", "verify": {"tolerance": 1e-4},
                   "evaluate": {"metric": "ndcg@10", "min": 0.1}, "checkpoint": "final"},
        "resources": {"gpus": 1, "gpuResource": "nvidia.com/gpu", "cpu": "4", "memory": "16Gi"},
        "image": "registry.example/worker:1",
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "batch-low",
        "queueName": "team-a",
        "storage": {"claimName": "shared-ws", "size": "20Gi", "storageClassName": "fast", "reclaimPolicy": "Delete"},
        "backoffLimit": 3,
        "suspend": False,
        "ttlSecondsAfterFinished": 3600,
    },
    {
        "model": {"base": "builtin:all-MiniLM-L6-v2"},
        "dataset": {"inline": INLINE, "columns": {"anchor": "question", "positive": "answer"},
                    "eval": {"inline": INLINE[:1]}},
        "training": {"loss": "MatryoshkaLoss",
                     "lossParams": {"matryoshkaDims": [32, 16], "matryoshkaWeights": [1, 0.5],
                                    "innerLoss": "MultipleNegativesRankingLoss", "miniBatchSize": 4}},
        "resources": {"gpus": 0, "cpu": "500m", "memory": "2Gi"},
        "storage": {"size": "1Gi"},
    },
    {
        "model": {"fromJob": "previous-job"},
        "dataset": {"hub": "org/pairs-scored", "columns": {"anchor": "s1", "positive": "s2", "score": "label"},
                    "eval": {"path": "data/eval.jsonl"}},
        "training": {"loss": "CoSENTLoss", "lossParams": {"scale": 20.0}, "precision": "bf16"},
        "lora": {"r": 8},
        "export": {"formats": ["adapter"], "merge": False, "checkpoint": "checkpoint-100"},
    },
    {
        "model": {"base": "/opt/models/minilm"},
        "dataset": {"path": "data/corpus.parquet", "columns": {"text": "sentence"}},
        "training": {"loss": "DenoisingAutoEncoderLoss",
                     "lossParams": {"tieEncoderDecoder": True, "noiseDeleteRatio": 0.6}},
        "export": {"formats": ["huggingface"], "pooling": "cls"},
    },
]


def _keys(obj: Any, out: set[str]) -> set[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(k)
            _keys(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _keys(v, out)
    return out


# Every field name a valid spec can hold; a SpecError may name one that is missing from the input.
KNOWN_KEYS = _keys(VALID_SPECS, set()) - {"question", "answer", "pool", "key", "operator", "effect"}


def utf8_text(n: int) -> st.SearchStrategy[str]:
    # Real documents are UTF-8: no lone surrogates (JSON would pair them up into another character)
    return st.text(st.characters(blacklist_categories=("Cs",)), max_size=n)


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Anything a YAML or JSON document can hold (YAML also allows non-string keys and huge ints)."""
    scalars = st.one_of(
        st.none(), st.booleans(),
        st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
        st.floats(allow_nan=True, allow_infinity=True),
        utf8_text(30), st.sampled_from(NASTY_STRINGS),
    )
    keys = st.one_of(utf8_text(12), st.sampled_from(sorted(KNOWN_KEYS)), st.integers(-3, 3))
    return st.recursive(
        scalars,
        lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)),
        max_leaves=max_leaves,
    )


NASTY_STRINGS = [
    "", " ", "\t\n", "..", "../..", "../../etc/passwd", "data/../../../etc/shadow", "a/../../b", "..\\..\\win",
    "/etc/passwd", "~root/.ssh/id_rsa", "~/x", "a\x00b", "\x00", "builtin:", "builtin:../x",
    "file:///etc/passwd", "http://169.254.169.254/latest/meta-data", "$(rm -rf /)", "`id`", "; rm -rf /",
    "名前-モデル", "🤖" * 40, "e\u0301", "\u202eevil", "x" * 300, "y" * 5000, "-1", "0", "1e400", "NaN",
    "checkpoint-", "checkpoint--1", "checkpoint-1/../../x", "final/..", "5GB", "0GB", "99999999999999999999TB",
    "nvidia.com/gpu", "16Gi", "-16Gi", "A", "UPPER", "a" * 64,
]

_SEG = re.compile(r"\[(\d+)\]")


def field_resolves(obj: Any, field: str, root: str = "spec") -> bool:
    """True when `field` (e.g. `spec.export.formats[1]`) is a path into `obj` (the value at
    `root`), possibly ending in field names the input lacks but a spec may hold (a required one).
    Keys may themselves contain dots, so each step tries the keys present, longest first."""
    if field != root and not field.startswith((root + ".", root + "[")):
        return False
    return _walk(obj, field[len(root):])


def _walk(obj: Any, rest: str) -> bool:
    if rest == "":
        return True
    if rest.startswith("["):
        m = re.match(r"\[(\d+)\]", rest)
        if not m or not isinstance(obj, list) or int(m.group(1)) >= len(obj):
            return False
        return _walk(obj[int(m.group(1))], rest[m.end():])
    if not rest.startswith("."):
        return False
    rest = rest[1:]
    if isinstance(obj, dict):
        for k in sorted(obj, key=lambda k: -len(str(k))):
            sk = str(k)
            if rest.startswith(sk) and rest[len(sk):len(sk) + 1] in ("", ".", "[") and _walk(obj[k], rest[len(sk):]):
                return True
    # The rest is absent from the input: it must consist of field names a spec can hold.
    names = [p for p in re.split(r"[.\[\]]", rest) if p]
    return bool(names) and all(n in KNOWN_KEYS or n.isdigit() for n in names)


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (tuple of keys/indices) into obj, the root included."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


def dotted(path: tuple[Any, ...], root: str = "spec") -> str:
    text = root
    for p in path:
        text += f"[{p}]" if isinstance(p, int) else f".{p}"
    return text


def mutate(spec: dict[str, Any], path: tuple[Any, ...], op: str, value: Any) -> dict[str, Any]:
    """A copy of spec with one mutation at path: `replace` the value, `delete` it, or `add` an
    unknown sibling key (named by value)."""
    spec = copy.deepcopy(spec)
    if not path:
        return value if op == "replace" else spec
    parent = spec
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif op == "add" and isinstance(parent, dict):
        parent[f"{last}X{value}"] = 1
    return spec
