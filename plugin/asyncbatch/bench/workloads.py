# SPDX-License-Identifier: Apache-2.0
"""Named workloads, shared by the offline, online and replay benchmarks.

A workload is a list of `BenchRequest` (token-id prompt, number of output
tokens), a pure function of its parameters and seed.  Token ids are drawn from
``[2, vocab_size)``: ids 0 and 1 are the BOS/EOS of the dummy tokenizer
(`asyncbatch.sim.model_dir`), whose token ``t123`` is id 123, so a prompt can
also travel as the text ``"t5 t812 ..."`` (`to_text`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_VOCAB_SIZE = 32000


class WorkloadError(ValueError):
    pass


@dataclass(frozen=True)
class BenchRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class RandomWorkload:
    """Independent random prompts.  Lengths are uniform in ``len * [1 - r, 1 + r]``
    (vLLM's ``random`` dataset with ``--random-range-ratio r``)."""

    num_requests: int = 96
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        _positive(self, "num_requests", "input_len", "output_len")
        if not 0.0 <= self.range_ratio < 1.0:
            raise WorkloadError(f"range_ratio must be in [0, 1), got {self.range_ratio}")

    def requests(self, vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[BenchRequest]:
        self.validate()
        rng = random.Random(self.seed)
        out = []
        for i in range(self.num_requests):
            n_in = _jitter(rng, self.input_len, self.range_ratio)
            n_out = _jitter(rng, self.output_len, self.range_ratio)
            out.append(BenchRequest(f"r{i}", random_tokens(rng, n_in, vocab_size), n_out))
        return out


@dataclass(frozen=True)
class PrefixSharedWorkload:
    """``num_groups`` groups of ``group_size`` requests; the requests of a group
    share a ``prefix_len``-token prefix and differ in a ``suffix_len``-token suffix.

    ``order="shuffled"`` sends the requests in a random order (groups
    interleaved), ``"sorted"`` group by group.
    """

    num_groups: int = 32
    group_size: int = 8
    prefix_len: int = 1024
    suffix_len: int = 64
    output_len: int = 64
    order: str = "shuffled"
    seed: int = 0

    def validate(self) -> None:
        _positive(self, "num_groups", "group_size", "prefix_len", "suffix_len", "output_len")
        if self.order not in ("shuffled", "sorted"):
            raise WorkloadError(f"order must be 'shuffled' or 'sorted', got {self.order!r}")

    @property
    def num_requests(self) -> int:
        return self.num_groups * self.group_size

    def requests(self, vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[BenchRequest]:
        self.validate()
        rng = random.Random(self.seed)
        out = []
        for g in range(self.num_groups):
            prefix = random_tokens(rng, self.prefix_len, vocab_size)
            for m in range(self.group_size):
                suffix = random_tokens(rng, self.suffix_len, vocab_size)
                out.append(BenchRequest(f"g{g}m{m}", prefix + suffix, self.output_len))
        if self.order == "shuffled":
            rng.shuffle(out)
        return out


@dataclass(frozen=True)
class ShareGPTWorkload:
    """Conversations from a local ShareGPT-format JSON file (never downloaded).

    The file is a list of ``{"conversations": [{"from": "human", "value": ...},
    {"from": "gpt", "value": ...}, ...]}``.  The first human turn is the prompt
    and the next turn's length the output length, both counted in
    whitespace-separated words; each word becomes the token id of its hash, so
    texts that share words share tokens (and prefixes share KV blocks).
    """

    path: str = ""
    num_requests: int = 256
    max_input_len: int = 2048
    max_output_len: int = 512
    min_len: int = 4
    shuffle: bool = True
    seed: int = 0

    def validate(self) -> None:
        _positive(self, "num_requests", "max_input_len", "max_output_len")
        if not self.path:
            raise WorkloadError(
                "the sharegpt workload needs a local JSON file: --workload sharegpt:path=FILE"
            )
        if not Path(self.path).is_file():
            raise WorkloadError(f"sharegpt file not found: {self.path}")

    def requests(self, vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[BenchRequest]:
        self.validate()
        try:
            data = json.loads(Path(self.path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise WorkloadError(f"cannot read sharegpt file {self.path}: {e}") from None
        if not isinstance(data, list):
            raise WorkloadError(f"{self.path}: expected a JSON list of conversations")
        convs = [c for c in data if isinstance(c, dict) and len(c.get("conversations", [])) >= 2]
        if self.shuffle:
            random.Random(self.seed).shuffle(convs)
        out: list[BenchRequest] = []
        for conv in convs:
            turns = conv["conversations"]
            prompt = str(turns[0].get("value", "")).split()[: self.max_input_len]
            n_out = min(len(str(turns[1].get("value", "")).split()), self.max_output_len)
            if len(prompt) < self.min_len or n_out < self.min_len:
                continue
            ids = [_word_id(w, vocab_size) for w in prompt]
            out.append(BenchRequest(f"s{len(out)}", ids, n_out))
            if len(out) == self.num_requests:
                break
        if not out:
            raise WorkloadError(f"{self.path}: no usable conversations")
        return out


Workload = RandomWorkload | PrefixSharedWorkload | ShareGPTWorkload

# name -> (class, parameter overrides of the class defaults)
PRESETS: dict[str, tuple[type, dict[str, Any], str]] = {
    "random": (RandomWorkload, {}, "96 independent random prompts, 256 in / 128 out"),
    "prefix-shared": (
        PrefixSharedWorkload, {},
        "32 groups x 8 requests sharing a 1024-token prefix, 64-token suffix, shuffled",
    ),
    "prefix-sorted": (
        PrefixSharedWorkload, {"order": "sorted"},
        "prefix-shared, sent group by group",
    ),
    "replay-kv": (
        PrefixSharedWorkload,
        dict(num_groups=16, group_size=8, prefix_len=512, suffix_len=32, output_len=64),
        "KV-pressure default: 16 groups x 8 requests, 512-token prefixes, shuffled; "
        "the default 512-block KV cache cannot hold the prefixes and the running requests",
    ),
    "sharegpt": (ShareGPTWorkload, {}, "ShareGPT-like mix from a local JSON file (path=FILE)"),
}


def describe_workloads() -> str:
    lines = []
    for name, (cls, overrides, text) in PRESETS.items():
        params = {f.name: f.default for f in dataclasses.fields(cls)}
        params.update(overrides)
        shown = ",".join(f"{k}={v}" for k, v in params.items())
        lines.append(f"{name:14s} {text}\n{'':14s}   {shown}")
    return "\n".join(lines)


def parse_workload(text: str) -> Workload:
    """``NAME[:key=value,key=value...]`` -> a workload, e.g.
    ``prefix-shared:num_groups=8,order=sorted`` or ``sharegpt:path=data.json``."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in PRESETS:
        raise WorkloadError(
            f"unknown workload {name!r}; known workloads: {', '.join(PRESETS)} "
            "(asyncbatch-bench workloads lists their parameters)"
        )
    cls, overrides, _ = PRESETS[name]
    params = dict(overrides)
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in types:
            raise WorkloadError(
                f"bad workload parameter {item!r} for {name!r}; parameters: {', '.join(types)}"
            )
        params[key] = _convert(name, key, value.strip(), types[key])
    workload = cls(**params)
    workload.validate()
    return workload


def workload_name(workload: Workload) -> str:
    return {RandomWorkload: "random", PrefixSharedWorkload: "prefix-shared",
            ShareGPTWorkload: "sharegpt"}[type(workload)]


def workload_spec(workload: Workload) -> dict[str, Any]:
    return {"name": workload_name(workload), **dataclasses.asdict(workload)}


def workload_label(text: str) -> str:
    """A short, file-name-safe label of a workload argument:
    ``replay-kv:order=sorted`` -> ``replay-kv.order=sorted``."""
    name, _, rest = text.partition(":")
    if not rest:
        return name
    label = re.sub(r"[^A-Za-z0-9_.=-]", "_", f"{name}.{rest.replace(',', '.')}")
    if len(label) <= 60:
        return label
    digest = hashlib.blake2b(text.encode(), digest_size=3).hexdigest()
    return f"{name}-{digest}"


def resized(workload: Workload, num_requests: int) -> Workload:
    """The same workload with about ``num_requests`` requests (at least one group):
    prefix-shared takes whole groups of its ``group_size``, so its sharing
    pattern stays what it was; the others take the count."""
    if num_requests < 1:
        raise WorkloadError(f"num_requests must be a positive integer, got {num_requests}")
    if isinstance(workload, PrefixSharedWorkload):
        groups = -(-num_requests // workload.group_size)
        return dataclasses.replace(workload, num_groups=groups)
    return dataclasses.replace(workload, num_requests=num_requests)


def to_text(token_ids: list[int]) -> str:
    """The prompt as text for the dummy tokenizer (``t<id>`` words)."""
    return " ".join(f"t{t}" for t in token_ids)


def write_custom_jsonl(requests: list[BenchRequest], path: str | Path) -> Path:
    """vLLM ``bench serve --dataset-name custom`` file (prompt text + output_tokens)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in requests:
            f.write(json.dumps({"prompt": to_text(r.prompt_token_ids),
                                "output_tokens": r.max_tokens}) + "\n")
    return path


def vllm_dataset_args(workload: Workload) -> list[str]:
    """The closest built-in ``vllm bench serve`` dataset (for models with a real
    tokenizer, where the ``custom`` text prompts would not map to the same ids)."""
    if isinstance(workload, RandomWorkload):
        return ["--dataset-name", "random", "--num-prompts", str(workload.num_requests),
                "--random-input-len", str(workload.input_len),
                "--random-output-len", str(workload.output_len),
                "--random-range-ratio", str(workload.range_ratio),
                "--seed", str(workload.seed)]
    if isinstance(workload, PrefixSharedWorkload):
        args = ["--dataset-name", "prefix_repetition",
                "--num-prompts", str(workload.num_requests),
                "--prefix-repetition-prefix-len", str(workload.prefix_len),
                "--prefix-repetition-suffix-len", str(workload.suffix_len),
                "--prefix-repetition-num-prefixes", str(workload.num_groups),
                "--prefix-repetition-output-len", str(workload.output_len),
                "--seed", str(workload.seed)]
        if workload.order == "sorted":
            args.append("--disable-shuffle")
        return args
    return ["--dataset-name", "sharegpt", "--dataset-path", workload.path,
            "--num-prompts", str(workload.num_requests), "--seed", str(workload.seed)]


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or v <= 0:
            raise WorkloadError(f"{n} must be a positive integer, got {v!r}")


def _jitter(rng: random.Random, n: int, ratio: float) -> int:
    if ratio == 0.0:
        return n
    return max(1, rng.randint(int(n * (1 - ratio)), int(n * (1 + ratio))))


def random_tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(2, vocab_size) for _ in range(n)]


def _word_id(word: str, vocab_size: int) -> int:
    digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
    return 2 + int.from_bytes(digest, "little") % (vocab_size - 2)


def _convert(name: str, key: str, value: str, typ: Any) -> Any:
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if typ == "int":
            return int(value)
        if typ == "float":
            return float(value)
        if typ == "bool":
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ValueError(value)
    except ValueError:
        raise WorkloadError(f"workload {name!r}: {key}={value!r} is not a valid {typ}") from None
    return value


__all__ = [
    "BenchRequest", "PrefixSharedWorkload", "RandomWorkload", "ShareGPTWorkload", "Workload",
    "WorkloadError", "describe_workloads", "parse_workload", "resized",
]
