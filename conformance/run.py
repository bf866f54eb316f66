# SPDX-License-Identifier: Apache-2.0
"""vLLM's own scheduler tests as asyncbatch's conformance suite.

Runs ``tests/v1/core`` of the installed vLLM release's source distribution,
unedited, three times on the CPU: every scheduler the tests build is vLLM's
``AsyncScheduler`` (``stock``, the reference), then ``asyncbatch.Scheduler`` with
``policy: fcfs``, then with ``policy: prefix`` (see ``conftest.py``, the adapter).

The contract:

- ``fcfs`` passes every test that ``stock`` passes in the same run;
- ``prefix`` passes every test that ``stock`` passes, except those listed in
  ``prefix_exceptions-<release>.txt``, each with the design feature it is due
  to: ``order`` (assertions of FCFS admission order that decode-first and
  grouping change) or ``gate`` (an admission the KV-memory forecast holds back a
  step).  Each listed test must fail under ``prefix`` (else the list is stale)
  and pass under ``prefix`` with that feature switched off (``order``:
  ``decode_first`` and ``grouping`` off; ``gate``: ``memory_gate`` off), which
  shows that the feature is all that differs.

The stock run records which tests call the scheduler under test; the plugin's
runs take only those of them that pass with stock (``--all``: every test), since
the rest run vLLM code that is the same whichever scheduler is chosen.

Exits non-zero on any breach, and writes the outcomes of every test per
variant plus a summary to ``--out``.

The source distribution is downloaded once (from PyPI, sha256-checked) into
``$ASYNCBATCH_CACHE`` (default ``~/.cache/asyncbatch``), outside the checkout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hub_models import write_hub_models  # noqa: E402

from asyncbatch import _compat  # noqa: E402  (no torch, no vLLM)

VARIANTS = ("stock", "fcfs", "prefix")
# The files of vLLM's test tree the scheduler tests import, besides tests/v1/core.
SUPPORT_FILES = (
    "tests/__init__.py",
    "tests/v1/__init__.py",
    "tests/v1/kv_connector/__init__.py",
    "tests/v1/kv_connector/unit/__init__.py",
    "tests/v1/kv_connector/unit/utils.py",
)


def cache_dir() -> Path:
    root = os.environ.get("ASYNCBATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "asyncbatch")
    return Path(root)


def fetch_sdist(version: str, dest: Path) -> Path:
    """vLLM's source distribution for ``version``, downloaded once."""
    archive = dest / f"vllm-{version}.tar.gz"
    if archive.exists():
        return archive
    dest.mkdir(parents=True, exist_ok=True)
    index = os.environ.get("ASYNCBATCH_PYPI_SIMPLE", "https://pypi.org/simple/vllm/")
    with urllib.request.urlopen(index, timeout=60) as response:
        page = response.read().decode()
    match = re.search(rf'href="([^"]*/vllm-{re.escape(version)}\.tar\.gz)#sha256=([0-9a-f]+)"',
                      page)
    if match is None:
        raise SystemExit(f"no source distribution of vllm {version} on {index}")
    url, sha256 = match.groups()
    print(f"downloading {url.rsplit('/', 1)[-1]} ...", flush=True)
    partial = archive.with_suffix(".part")
    with urllib.request.urlopen(url, timeout=600) as response, open(partial, "wb") as f:
        shutil.copyfileobj(response, f)
    digest = hashlib.sha256(partial.read_bytes()).hexdigest()
    if digest != sha256:
        partial.unlink()
        raise SystemExit(f"sha256 of {url} is {digest}, the index says {sha256}")
    partial.rename(archive)
    return archive


def stage(archive: Path, version: str, tree: Path) -> Path:
    """A test tree holding vLLM's ``tests/v1/core`` and what it imports, unedited,
    with the adapter as its root conftest."""
    if tree.exists():
        shutil.rmtree(tree)
    prefix = f"vllm-{version}/"
    wanted = ("tests/v1/core/", *SUPPORT_FILES)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name[len(prefix):] if member.name.startswith(prefix) else ""
            if member.isfile() and name.startswith(wanted):
                target = tree / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, dst)
    if not (tree / "tests/v1/core").is_dir():
        raise SystemExit(f"{archive} has no tests/v1/core")
    shutil.copy(HERE / "conftest.py", tree / "tests/conftest.py")
    return tree


def run_variant(tree: Path, variant: str, out: Path, redirect: Path,
                settings: dict | None = None, tests: list[str] | None = None,
                label: str | None = None) -> dict[str, str]:
    env = dict(os.environ, ASYNCBATCH_CONFORMANCE=variant,
               ASYNCBATCH_CONFORMANCE_OUT=str(out), VLLM_MODEL_REDIRECT_PATH=str(redirect),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if settings:
        env["ASYNCBATCH_CONFORMANCE_SETTINGS"] = json.dumps(settings)
    cmd = [sys.executable, "-m", "pytest", *(tests or ["tests/v1/core"]), "-q", "-p",
           "no:cacheprovider", "-W", "ignore", "--rootdir", str(tree),
           "--continue-on-collection-errors"]
    start = time.monotonic()
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    if not out.exists():
        raise SystemExit(f"pytest wrote no outcomes for {variant}; see {log}")
    outcomes: dict[str, str] = json.loads(out.read_text())["outcomes"]
    counts = Counter(outcomes.values())
    print(f"  {label or variant:<24} {counts['passed']:4d} passed {counts['failed']:4d} failed "
          f"{counts['skipped']:4d} skipped  ({time.monotonic() - start:.0f} s, log {log})",
          flush=True)
    return outcomes


# The design features of `prefix` an exception may be due to, and the settings that
# switch each off for the check.
FEATURES = {"order": {"decode_first": False, "grouping": False},
            "gate": {"memory_gate": False}}


def read_exceptions(path: Path) -> dict[str, tuple[str, str]]:
    """``test id | feature | reason`` per line (feature: `FEATURES`); ``#`` starts
    a comment line. Returns test id -> (feature, reason)."""
    listed: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [part.strip() for part in line.split("|")]
        if len(parts) != 3 or not all(parts) or parts[1] not in FEATURES:
            raise SystemExit(f"{path}:{number}: want 'test id | {' or '.join(FEATURES)} | "
                             f"reason', got {line!r}")
        listed[parts[0]] = (parts[1], parts[2])
    return listed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for outcomes and logs (default: under the cache)")
    parser.add_argument("--exceptions", type=Path, default=None,
                        help="the by-design exceptions of `prefix` (default: "
                        "prefix_exceptions-<vLLM minor>.txt beside this script)")
    parser.add_argument("--jobs", type=int, default=2, help="variants run at once")
    parser.add_argument("--all", action="store_true",
                        help="run every test in the plugin's variants too, not only those "
                        "that reach a scheduler in the stock run")
    args = parser.parse_args(argv)

    version = metadata.version("vllm")
    major, minor = _compat.minor(version)
    exceptions = args.exceptions or HERE / f"prefix_exceptions-{major}.{minor}.txt"
    if not exceptions.exists():
        known = ", ".join(sorted(p.name for p in HERE.glob("prefix_exceptions-*.txt")))
        raise SystemExit(f"{exceptions.name} is missing: conformance is set up for the vLLM "
                         f"releases that have one ({known})")
    cache = cache_dir()
    archive = fetch_sdist(version, cache / "vllm-src")
    tree = stage(archive, version, cache / "conformance" / f"tree-{version}")
    redirect = write_hub_models(cache / "conformance" / "models")
    out = args.out or cache / "conformance" / f"results-{version}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"vLLM {version}: tests/v1/core of its source distribution, unedited")

    stock = run_variant(tree, "stock", out / "stock.json", redirect)
    reference = sorted(t for t, o in stock.items() if o == "passed")
    if not reference:
        raise SystemExit(f"no test passed with stock AsyncScheduler; see {out / 'stock.log'}")
    # The plugin's runs: the tests that pass with stock and reach a scheduler (the
    # others run vLLM code that is the same whichever scheduler is chosen), or all.
    recorded = json.loads((out / "stock.json").read_text())
    touched = set(recorded["touched"])
    # in stock's run order: tests that share module fixtures see the same neighbours
    passed = set(reference)
    subset = None if args.all else [t for t in recorded["order"] if t in touched and t in passed]
    if subset is not None and not subset:
        raise SystemExit("the stock run recorded no test that calls the scheduler: the adapter "
                         f"(conformance/conftest.py) did not record calls; see {out / 'stock.log'}")
    if subset is not None:
        print(f"  {len(subset)} of the {len(reference)} tests that pass with stock reach a "
              "scheduler: the plugin's variants run those (--all: every test)")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = {v: pool.submit(run_variant, tree, v, out / f"{v}.json", redirect,
                               tests=subset) for v in VARIANTS[1:]}
        results = {"stock": stock, **{v: run.result() for v, run in runs.items()}}
    if subset is not None:
        reference = sorted(subset)
    listed = read_exceptions(exceptions)
    problems: list[str] = []

    for variant in ("fcfs", "prefix"):
        outcomes = results[variant]
        for test in reference:
            if outcomes.get(test) != "passed" and not (variant == "prefix" and test in listed):
                problems.append(f"{variant}: {test} passes with stock AsyncScheduler, "
                                f"{outcomes.get(test, 'not run')} here")
    prefix = results["prefix"]
    for test in listed:
        if stock.get(test) != "passed":
            problems.append(f"listed exception {test} does not pass with stock "
                            f"({stock.get(test, 'not run')}): drop it from the list")
        elif test not in reference:
            problems.append(f"listed exception {test} never reaches a scheduler: drop it "
                            "from the list")
        elif prefix.get(test) == "passed":
            problems.append(f"listed exception {test} passes under prefix now: drop it "
                            "from the list")
    # Each exception must pass once the design feature it names is switched off.
    without: dict[str, str] = {}
    for feature, settings in FEATURES.items():
        tests = sorted(t for t, (f, _) in listed.items() if f == feature)
        if not tests:
            continue
        outcomes = run_variant(tree, "prefix", out / f"prefix-without-{feature}.json",
                               redirect, settings=settings, tests=tests,
                               label=f"prefix, {feature} off")
        for test in tests:
            without[test] = outcomes.get(test, "not run")
            if without[test] != "passed":
                problems.append(f"listed exception {test} fails under prefix with its "
                                f"{feature} off too ({without[test]}): not due to it")

    summary = {
        "vllm": version,
        "passed": {v: sum(o == "passed" for o in r.values()) for v, r in results.items()},
        "plugin_variants_ran": "all" if subset is None else "tests that reach a scheduler",
        "reference": len(reference),
        "failed": {v: sum(o == "failed" for o in r.values()) for v, r in results.items()},
        "stock_failures": sorted(t for t, o in stock.items() if o == "failed"),
        "prefix_exceptions": {t: {"feature": f, "reason": r} for t, (f, r) in listed.items()},
        "prefix_exceptions_with_their_feature_off": without,
        "problems": problems,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"  reference: {len(reference)} tests pass with stock; "
          f"{len(summary['stock_failures'])} fail with stock too (not part of the contract)")
    by_feature = Counter(f for f, _ in listed.values())
    print(f"  prefix exceptions (by design): {len(listed)} "
          f"({', '.join(f'{f} {n}' for f, n in sorted(by_feature.items()))}), listed in "
          f"{exceptions.name}")
    if problems:
        print("CONFORMANCE FAILED:")
        for problem in problems:
            print("  " + problem)
        return 1
    print(f"conformance passed (vLLM {version}); outcomes in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
