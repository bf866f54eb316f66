# SPDX-License-Identifier: Apache-2.0
"""``asyncbatch-bench``: A/B benchmarks of asyncbatch against stock vLLM 0.26.

Subcommands: ``replay`` (CPU, simulated time), ``offline`` and ``online`` (GPU),
``ab`` (GPU: offline then online, and a combined summary), ``calibrate`` (GPU,
writes the replay's cost model), ``compare`` (replay against GPU rankings) and
``workloads``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncbatch.bench.variants import BASELINE, VARIANT_NAMES, EngineProfile

if TYPE_CHECKING:
    from asyncbatch.bench.ab import AbPlan, PartOutcome
    from asyncbatch.bench.models import ModelSpec
    from asyncbatch.bench.workloads import Workload

RESULTS = Path("benchmarks/results")
QUICK_MODEL = "dummy:llama-1b"
FULL_MODEL = "dummy:llama-8b"
REPLAY_WORKLOADS = ["replay-kv", "random"]
GPU_WORKLOADS = ["replay-kv", "random"]
# --quick: the same workloads 4x as long, about 6 s per run of stock async on an
# H100 (Llama-1B shape).  Runs of 1-2 s spread by up to 48% between two repeats;
# at ~6 s a fixed jitter of ~0.3 s per run is ~5%.
QUICK_GPU_WORKLOADS = ["replay-kv:num_groups=64", "random:num_requests=384"]
QUICK_OFFLINE_RUN_S = 6.0
ONLINE_WORKLOADS = ["replay-kv"]
# seconds of requests per request rate (online); each rate gets rate x this many
ONLINE_DURATION_S = 30.0
QUICK_ONLINE_DURATION_S = 15.0
# variants the online part of `ab --quick` leaves out, and why
QUICK_OFFLINE_HELP = (f"workloads {' '.join(QUICK_GPU_WORKLOADS)}, ~{QUICK_OFFLINE_RUN_S:g} s "
                      "per run of stock async on an H100")
QUICK_ONLINE_HELP = f"~{QUICK_ONLINE_DURATION_S:g} s of requests per rate"
QUICK_ONLINE_SKIP = {"sync": "one batch in flight is the slowest stock setting and is "
                             "measured offline; two more server starts would not fit "
                             "--quick (--online-variants puts it back)"}


class CliError(Exception):
    pass


def _common(p: argparse.ArgumentParser, *, variants: str, kv_blocks: int | None,
            ab: bool = False) -> None:
    p.add_argument("--workload", "-w", action="append", metavar="NAME[:k=v,...]",
                   help=("workload of the offline part" if ab else "workload")
                   + ", repeatable (see `asyncbatch-bench workloads`)")
    p.add_argument("--variants", default=variants,
                   help=f"comma-separated, from {', '.join(VARIANT_NAMES)} "
                        f"(default {variants}; ratios are against {BASELINE})")
    if ab:
        p.add_argument("--result-dir", type=Path,
                       help=f"results root: the summary goes there, the parts' JSON/MD/PNG "
                            f"under offline/ and online/ (default {RESULTS})")
        p.add_argument("--name", help="base name of the summary; the parts add -offline and "
                                      "-online (default: ab-model-date, offline-model-date, "
                                      "online-model-date)")
    else:
        p.add_argument("--result-dir", type=Path, help="where results JSON/MD/PNG go")
        p.add_argument("--name",
                       help="base name of the result files (default: mode-model-date)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=kv_blocks,
                   help="KV cache size in blocks (vLLM --num-gpu-blocks-override); 0 = "
                        "vLLM's own sizing" + (
                            f"; the default {kv_blocks} keeps the prefix-shared working set "
                            "from fitting, as in the replay" if kv_blocks else " (default)"))
    p.add_argument("--asyncbatch-config", type=json_object, default={}, metavar="JSON",
                   help="plugin settings for the variants that load asyncbatch (asyncbatch, "
                        "worker, full), e.g. '{\"policy\": \"fcfs\"}'")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"policy\": \"fcfs\"}'")
    return value


def _gpu_common(p: argparse.ArgumentParser, quick: str = "") -> None:
    p.add_argument("--model", help=f"local model folder, or dummy:SHAPE for a dummy-weight "
                                   f"folder made on the fly (default {FULL_MODEL}, "
                                   f"{QUICK_MODEL} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"small profile: model {QUICK_MODEL} instead of {FULL_MODEL}"
                        + (f"; {quick}" if quick else ""))
    p.add_argument("--repeats", type=int, default=2, help="runs per variant, >= 2 (default 2)")
    p.add_argument("--executor", default="mp",
                   help="distributed_executor_backend for every variant (default mp: stock "
                        "async ran 1.23x faster with mp than in-process on an H100; "
                        "'none' = vLLM's default)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra engine argument for every variant (VALUE may be JSON)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per engine process")
    p.add_argument("--keep-work-dir", action="store_true",
                   help="keep the logs and request files after success (a failed run always "
                        "keeps them; their folder is printed at the start)")


def _offline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup", type=int, default=8, help="warm-up requests per workload")


def _online_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--request-rates", default="8,32",
                   help="comma-separated request rates (req/s; 'inf' allowed; default 8,32)")
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help="size each run to about rate x SECONDS requests, so every rate runs "
                        f"about as long (default {ONLINE_DURATION_S:g}, "
                        f"{QUICK_ONLINE_DURATION_S:g} with --quick; 0 = the workload as "
                        "given, as at rate inf)")
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--port", type=int, help="server port (default: a free one)")
    p.add_argument("--online-dataset", choices=["vllm", "custom"], default="vllm",
                   help="vllm: built-in random/prefix_repetition with the workload's "
                        "parameters; custom: the workload's exact prompts as JSONL "
                        "(dummy tokenizer; needs pandas)")
    p.add_argument("--health-timeout", type=float, default=600,
                   help="seconds to wait for a server's /health")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncbatch-bench",
        description="A/B benchmarks: stock vLLM (sync, async) against asyncbatch.Scheduler. "
                    "Start with `asyncbatch-bench replay` (CPU only, about 10 s).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("replay", help="CPU replay with simulated GPU step times",
                       description="Drive the real vLLM 0.26 schedulers (stock and asyncbatch) "
                                   "in-process with a simulated executor whose step times come "
                                   "from a calibrated cost model; results are SIMULATED.")
    _common(p, variants="sync,async,asyncbatch", kv_blocks=512)
    p.add_argument("--calibration", help="cost model JSON (path, or a name under "
                                         "asyncbatch/bench/calibration/; default h100-llama-8b)")

    p = sub.add_parser("offline", help="GPU: offline A/B, one fresh engine process per run",
                       description="Each variant runs in a fresh `vllm.LLM` process, ABBA "
                                   "order, each at least twice; reports median (min..max).")
    _common(p, variants="sync,async,asyncbatch", kv_blocks=512)
    _gpu_common(p, QUICK_OFFLINE_HELP)
    _offline_options(p)

    p = sub.add_parser("online", help="GPU: online A/B through vllm serve + vllm bench serve",
                       description="Starts `vllm serve` per variant on loopback and drives it "
                                   "with `vllm bench serve`; servers are always shut down.")
    _common(p, variants="async,asyncbatch", kv_blocks=512)
    _gpu_common(p, QUICK_ONLINE_HELP)
    _online_options(p)

    p = sub.add_parser("ab", help="GPU: offline then online A/B, and one summary of both",
                       description="Runs `offline`, then `online`, with the same model, "
                                   "engine profile and variants; writes both result sets "
                                   "and ab-<model>-<date>.md, which links them and states "
                                   "the verdicts.  Every input is checked before the first "
                                   "process starts.")
    _common(p, variants="sync,async,asyncbatch", kv_blocks=512, ab=True)
    _gpu_common(p, f"offline {QUICK_OFFLINE_HELP}; online {QUICK_ONLINE_HELP}, without "
                   f"{', '.join(QUICK_ONLINE_SKIP)}; 6 engines and 4 servers, about 17-24 min")
    _offline_options(p)
    _online_options(p)
    p.add_argument("--online-variants",
                   help="variants of the online part (default: --variants; with --quick "
                        f"without {', '.join(QUICK_ONLINE_SKIP)})")
    p.add_argument("--online-workload", action="append", metavar="NAME[:k=v,...]",
                   help=f"workload of the online part, repeatable (default "
                        f"{' '.join(ONLINE_WORKLOADS)}); --workload sets the offline part's")

    p = sub.add_parser("calibrate", help="GPU: fit the replay's cost model, write its JSON",
                       description="Times every step of offline runs (async and sync "
                                   "scheduling) and fits the cost model by least squares.")
    _common(p, variants="async", kv_blocks=None)
    _gpu_common(p)
    p.add_argument("--out", type=Path, help="output JSON (default: asyncbatch/bench/"
                                            "calibration/<gpu>-<shape>.json)")
    p.add_argument("--no-sync", action="store_true",
                   help="skip the sync run (host time then = schedule() time only)")

    p = sub.add_parser("compare", help="does a replay rank the variants as a GPU run does?",
                       description="Prints the output-throughput verdicts against stock "
                                   "async of a replay result and a GPU result side by side; "
                                   "exit code 1 when a ranking differs.")
    p.add_argument("replay_json", type=Path)
    p.add_argument("gpu_json", type=Path)

    p = sub.add_parser("workloads", help="list the workloads and their parameters")
    p.add_argument("workload", nargs="*", help="show the size of these workloads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.cmd == "replay":
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        return {"replay": cmd_replay, "offline": cmd_offline, "online": cmd_online,
                "ab": cmd_ab, "calibrate": cmd_calibrate, "compare": cmd_compare,
                "workloads": cmd_workloads}[args.cmd](args)
    except KeyboardInterrupt:
        print("asyncbatch-bench: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        if isinstance(e, _known_errors()):
            print(f"asyncbatch-bench {args.cmd}: error: {e}", file=sys.stderr)
            return 2
        raise


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors that are about the input or a failed run, not a bug: reported in one
    line (plus a log's tail) with exit code 2, no traceback."""
    from asyncbatch.bench.models import ModelError
    from asyncbatch.bench.offline import BenchError
    from asyncbatch.bench.procs import Terminated
    from asyncbatch.bench.variants import VariantError
    from asyncbatch.bench.workloads import WorkloadError

    return (CliError, ModelError, BenchError, Terminated, VariantError, WorkloadError,
            FileNotFoundError)


def _workloads(texts: list[str] | None, default: list[str]) -> list[tuple[str, Any]]:
    from asyncbatch.bench.workloads import parse_workload, workload_label

    texts = texts or default
    labels = [workload_label(t) for t in texts]
    if len(set(labels)) != len(labels):
        raise CliError(f"a workload is listed twice: {' '.join(texts)}")
    return [(label, parse_workload(t)) for label, t in zip(labels, texts, strict=True)]


def _variants(text: str) -> list[str]:
    from asyncbatch.bench.variants import check_variants

    return check_variants([v.strip() for v in text.split(",") if v.strip()])


def _profile(args: argparse.Namespace, gpu: bool) -> EngineProfile:
    from asyncbatch.bench.variants import parse_extra

    kw: dict[str, Any] = dict(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks or None,
        asyncbatch_config=args.asyncbatch_config)
    if gpu:
        kw.update(executor=None if args.executor in ("", "none") else args.executor,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  max_model_len=args.max_model_len, extra=parse_extra(args.engine_arg))
    return EngineProfile(**kw)


def _name(args: argparse.Namespace, mode: str, model_label: str) -> str:
    return args.name or f"{mode}-{model_label}-{time.strftime('%Y%m%d-%H%M%S')}"


def _finish(out_dir: Path, name: str, result: dict[str, Any], title: str,
            simulated: bool = False) -> dict[str, Path]:
    """Summarize, print the table and write the JSON, Markdown and PNG."""
    from asyncbatch.bench.report import format_table, summarize_runs, write_results

    result["summary"] = summarize_runs(result["runs"])
    table = format_table(result["runs"], title=title, simulated=simulated)
    paths = write_results(out_dir, name, result, table, plot_title=title, simulated=simulated)
    print(table)
    print(f"\nresults: {paths['json']}\ntable:   {paths['md']}\nplot:    {paths['png']}")
    return paths


def cmd_compare(args: argparse.Namespace) -> int:
    from asyncbatch.bench.compare import compare

    for path in (args.replay_json, args.gpu_json):
        if not path.is_file():
            raise CliError(f"no such results file: {path}")
    table, agree = compare(args.replay_json, args.gpu_json)
    print(table)
    print("rankings match" if agree else "rankings DIFFER")
    return 0 if agree else 1


def cmd_workloads(args: argparse.Namespace) -> int:
    from asyncbatch.bench.workloads import describe_workloads, parse_workload

    if not args.workload:
        print(describe_workloads())
        print("\nUse NAME:key=value,... to change parameters, e.g. "
              "prefix-shared:num_groups=8,order=sorted")
        return 0
    for text in args.workload:
        reqs = parse_workload(text).requests()
        n_in = sum(r.num_prompt_tokens for r in reqs)
        n_out = sum(r.max_tokens for r in reqs)
        print(f"{text}: {len(reqs)} requests, {n_in} prompt tokens, {n_out} output tokens")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from asyncbatch.bench.replay import (
        ReplayConfig,
        calibration_path,
        load_cost_model,
        run_variant,
    )
    from asyncbatch.bench.report import environment_stamp
    from asyncbatch.bench.stats import abba_order

    workloads = _workloads(args.workload, REPLAY_WORKLOADS)
    variants = _replayable(_variants(args.variants))
    cal = args.calibration
    if cal and not Path(cal).is_file() and calibration_path(cal).is_file():
        cal = str(calibration_path(cal))
    cost_model, cal_path = load_cost_model(cal)
    from asyncbatch.sim.engine import use_cpu_platform

    use_cpu_platform()
    config = ReplayConfig(num_blocks=args.num_kv_blocks or 4096, block_size=args.block_size,
                          max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          additional_config={"asyncbatch": args.asyncbatch_config}
                          if args.asyncbatch_config else None)
    runs = []
    reqs = {label: w.requests() for label, w in workloads}
    order = abba_order(variants, 1)
    total = sum(len(r) for r in reqs.values()) * len(order)
    with tqdm(total=total, desc="replay (requests)", disable=args.no_progress,
              file=sys.stderr) as bar:
        for label, _ in workloads:
            for variant, k in order:
                bar.set_postfix_str(f"{label} {variant}")
                run = run_variant(variant, reqs[label], cost_model, config, progress=bar)
                runs.append({**run, "workload": label, "repeat": k})
    from dataclasses import asdict

    from asyncbatch.bench.workloads import workload_spec

    result = {
        "kind": "replay", "simulated": True,
        "environment": environment_stamp("(simulated)", cost_model.meta.get("model_shape"),
                                         gpu=f"simulated: {cost_model.meta.get('gpu')}",
                                         argv=args.argv),
        "cost_model": {**cost_model.to_json(), "path": _relative(cal_path)},
        "config": {"variants": variants, "replay": asdict(config),
                   "workloads": {label: workload_spec(w) for label, w in workloads},
                   "note": "deterministic: one run per variant; host overhead of step i "
                           "overlaps the GPU time of step i-1 (two steps in flight)"},
        "runs": runs,
    }
    label = cost_model.meta.get("model_shape") or "model"
    measured = "" if cost_model.meta.get("measured") else ", first-estimate calibration"
    title = (f"replay on the real vLLM scheduler, cost model {Path(cal_path).stem}{measured}, "
             f"{config.num_blocks} KV blocks")
    _finish(args.result_dir or RESULTS / "replay", _name(args, "replay", label), result, title,
            simulated=True)
    return 0


DEPTH_NOTE = (
    "asyncbatch-bench replay: worker and full run three batches in flight through the real "
    "scheduler, so their prefix hits, preemptions and wasted tokens are simulated; the cost "
    "model treats the host as one serial resource, so the latency a third batch hides (the "
    "EngineCore -> worker -> GPU chain) is not, and their times are a lower bound")


def _replayable(variants: list[str]) -> list[str]:
    """Every variant replays; for the worker's third batch in flight see `DEPTH_NOTE`."""
    from asyncbatch.bench.replay import VARIANTS

    other = [v for v in variants if v not in VARIANTS]
    if other:
        raise CliError(f"the replay cannot run {', '.join(other)}; replayable variants: "
                       f"{', '.join(VARIANTS)}")
    if {"worker", "full"} & set(variants):
        print(DEPTH_NOTE, file=sys.stderr)
    return variants


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def _check_repeats(args: argparse.Namespace) -> None:
    if args.repeats < 2:
        raise CliError("--repeats must be at least 2: a single run has no spread, so no "
                       "difference could be told from noise")


def _model(args: argparse.Namespace) -> ModelSpec:
    from asyncbatch.bench.models import resolve_model

    return resolve_model(args.model or (QUICK_MODEL if args.quick else FULL_MODEL))


def _offline_workloads(args: argparse.Namespace) -> list[tuple[str, Workload]]:
    return _workloads(args.workload, QUICK_GPU_WORKLOADS if args.quick else GPU_WORKLOADS)


def _online_workloads(args: argparse.Namespace,
                      texts: list[str] | None) -> list[tuple[str, Workload]]:
    """The online workloads, refused here if `run_online` could not run them."""
    from asyncbatch.bench.online import check_online_workloads

    workloads = _workloads(texts, ONLINE_WORKLOADS)
    check_online_workloads(workloads, args.online_dataset)
    return workloads


def _rates(args: argparse.Namespace) -> list[float]:
    try:
        rates = [float(r) for r in args.request_rates.split(",") if r.strip()]
    except ValueError:
        raise CliError(f"--request-rates wants numbers, got {args.request_rates!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise CliError(f"--request-rates wants rates above 0, got {args.request_rates!r}")
    return rates


def _online_duration(args: argparse.Namespace) -> float | None:
    """Seconds per request rate online (`online.for_rate`); None = as given."""
    duration = args.duration
    if duration is None:
        duration = QUICK_ONLINE_DURATION_S if args.quick else ONLINE_DURATION_S
    if duration < 0:
        raise CliError(f"--duration must be 0 or more seconds, got {duration:g}")
    return duration or None


def _check_port(args: argparse.Namespace) -> None:
    if args.port is not None:
        from asyncbatch.bench.online import check_port_free

        check_port_free(args.port)


def _work_dir(mode: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"asyncbatch-{mode}-"))


def _done_with(args: argparse.Namespace, work_dir: Path) -> None:
    if not args.keep_work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)


def _offline_part(args: argparse.Namespace, model: ModelSpec,
                  workloads: list[tuple[str, Workload]], variants: list[str], *,
                  work_dir: Path, out_dir: Path,
                  name: str) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the offline A/B and write its results; returns the result and its files."""
    from asyncbatch.bench.offline import run_offline
    from asyncbatch.bench.report import environment_stamp

    result = run_offline(model, workloads, variants, _profile(args, True),
                         repeats=args.repeats, work_dir=work_dir, num_warmup=args.warmup,
                         timeout_s=args.timeout, progress=not args.no_progress)
    result = {"kind": "offline", "simulated": False,
              "environment": environment_stamp(model.path, model.shape, gpu=result["gpu"],
                                               argv=args.argv),
              **result}
    title = f"offline A/B, {model.label}, {result['environment']['gpu']}"
    return result, _finish(out_dir, name, result, title)


def _online_part(args: argparse.Namespace, model: ModelSpec,
                 workloads: list[tuple[str, Workload]], variants: list[str], *,
                 rates: list[float], duration_s: float | None, work_dir: Path, out_dir: Path,
                 name: str) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the online A/B and write its results; returns the result and its files."""
    from asyncbatch.bench.online import run_online
    from asyncbatch.bench.report import environment_stamp

    result = run_online(model, workloads, variants, _profile(args, True),
                        request_rates=rates, max_concurrency=args.max_concurrency,
                        repeats=args.repeats, work_dir=work_dir, result_dir=out_dir,
                        port=args.port, dataset_source=args.online_dataset,
                        duration_s=duration_s, raw_dir=out_dir / "vllm-bench" / name,
                        health_timeout_s=args.health_timeout,
                        bench_timeout_s=args.timeout, progress=not args.no_progress)
    result = {"kind": "online", "simulated": False,
              "environment": environment_stamp(model.path, model.shape, argv=args.argv),
              **result}
    title = f"online A/B (vllm bench serve), {model.label}, {result['environment']['gpu']}"
    return result, _finish(out_dir, name, result, title)


def cmd_offline(args: argparse.Namespace) -> int:
    from asyncbatch.bench.procs import sigterm_raises

    variants = _variants(args.variants)
    _check_repeats(args)
    model = _model(args)
    workloads = _offline_workloads(args)
    work_dir = _work_dir("offline")
    print(f"asyncbatch-bench offline: logs in {work_dir}", file=sys.stderr)
    with sigterm_raises():
        _offline_part(args, model, workloads, variants, work_dir=work_dir,
                      out_dir=args.result_dir or RESULTS / "offline",
                      name=_name(args, "offline", model.label))
    _done_with(args, work_dir)
    return 0


def cmd_online(args: argparse.Namespace) -> int:
    from asyncbatch.bench.procs import sigterm_raises

    variants = _variants(args.variants)
    rates, duration_s = _rates(args), _online_duration(args)
    _check_repeats(args)
    model = _model(args)
    workloads = _online_workloads(args, args.workload)
    _check_port(args)
    work_dir = _work_dir("online")
    print(f"asyncbatch-bench online: logs in {work_dir}", file=sys.stderr)
    with sigterm_raises():
        _online_part(args, model, workloads, variants, rates=rates, duration_s=duration_s,
                     work_dir=work_dir, out_dir=args.result_dir or RESULTS / "online",
                     name=_name(args, "online", model.label))
    _done_with(args, work_dir)
    return 0


@dataclass(frozen=True)
class _AbInputs:
    """Everything `cmd_ab` runs, checked before the first process starts: a bad
    online setting must not surface only after the offline part's minutes."""

    plan: AbPlan
    model: ModelSpec
    offline_workloads: list[tuple[str, Workload]]
    online_workloads: list[tuple[str, Workload]]
    rates: list[float]
    duration_s: float | None


def _online_variants(args: argparse.Namespace,
                     variants: list[str]) -> tuple[list[str], dict[str, str]]:
    """``--online-variants``, or the offline variants less those --quick leaves out
    (returned with the reason, for the summary)."""
    if args.online_variants:
        return _variants(args.online_variants), {}
    skipped = {v: why for v, why in QUICK_ONLINE_SKIP.items() if args.quick and v in variants}
    kept = [v for v in variants if v not in skipped]
    if not kept:
        raise CliError(f"no variant left for the online part ({', '.join(skipped)} left out "
                       "by --quick); name them with --online-variants")
    return kept, skipped


def _ab_inputs(args: argparse.Namespace) -> _AbInputs:
    from asyncbatch.bench.ab import AbPlan

    variants = _variants(args.variants)
    online_variants, skipped = _online_variants(args, variants)
    rates, duration_s = _rates(args), _online_duration(args)
    _check_repeats(args)
    model = _model(args)
    offline_workloads = _offline_workloads(args)
    online_workloads = _online_workloads(args, args.online_workload)
    _check_port(args)
    plan = AbPlan(model=model.label, offline_variants=variants,
                  online_variants=online_variants,
                  offline_workloads=[label for label, _ in offline_workloads],
                  online_workloads=[label for label, _ in online_workloads],
                  repeats=args.repeats, request_rates=rates, duration_s=duration_s,
                  online_skipped=skipped,
                  offline_run_s=QUICK_OFFLINE_RUN_S if args.quick and not args.workload
                  and not args.model else None)
    return _AbInputs(plan, model, offline_workloads, online_workloads, rates, duration_s)


def _ab_part(mode: str, step: int, run: Any) -> PartOutcome:
    """Run one part; a failure of the run (not a bug, not a signal) becomes the
    outcome's error, so that the caller can say which part failed."""
    from asyncbatch.bench.ab import PartOutcome, duration_text
    from asyncbatch.bench.procs import Terminated

    print(f"asyncbatch-bench ab: [{step}/2] {mode} part", file=sys.stderr)
    t0 = time.monotonic()
    try:
        result, paths = run()
    except Terminated:
        raise
    except _known_errors() as e:
        return PartOutcome(mode, time.monotonic() - t0, error=str(e))
    seconds = time.monotonic() - t0
    print(f"asyncbatch-bench ab: {mode} part done in {duration_text(seconds)}", file=sys.stderr)
    return PartOutcome(mode, seconds, paths, result)


def cmd_ab(args: argparse.Namespace) -> int:
    from asyncbatch.bench.ab import duration_text, summary_markdown, write_summary
    from asyncbatch.bench.procs import sigterm_raises

    inputs = _ab_inputs(args)
    plan, model = inputs.plan, inputs.model
    root = args.result_dir or RESULTS
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = {mode: f"{args.name}-{mode}" if args.name else f"{mode}-{model.label}-{stamp}"
             for mode in ("offline", "online")}
    summary_path = root / f"{args.name or f'ab-{model.label}-{stamp}'}.md"
    work_dir = _work_dir("ab")
    print(f"asyncbatch-bench ab: logs in {work_dir}", file=sys.stderr)
    print("asyncbatch-bench ab: plan\n  " + plan.describe().replace("\n", "\n  "),
          file=sys.stderr)
    t0 = time.monotonic()
    with sigterm_raises():
        offline = _ab_part("offline", 1, lambda: _offline_part(
            args, model, inputs.offline_workloads, plan.offline_variants,
            work_dir=work_dir / "offline", out_dir=root / "offline", name=names["offline"]))
        if offline.error:
            raise CliError(f"the offline part failed, so the online part was not started "
                           f"(logs kept in {work_dir}):\n{offline.error}")
        online = _ab_part("online", 2, lambda: _online_part(
            args, model, inputs.online_workloads, plan.online_variants, rates=inputs.rates,
            duration_s=inputs.duration_s, work_dir=work_dir / "online",
            out_dir=root / "online", name=names["online"]))
    total_s = time.monotonic() - t0
    text = summary_markdown(plan, [offline, online], summary_path=summary_path,
                            environment=offline.result["environment"], total_s=total_s)
    write_summary(summary_path, text)
    if online.error:
        raise CliError(f"the online part failed; the offline results and a summary of them "
                       f"are written ({summary_path}); logs kept in {work_dir}:\n"
                       f"{online.error}")
    print(f"\n{text}\nsummary: {summary_path} ({duration_text(total_s)} in all)")
    _done_with(args, work_dir)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from asyncbatch.bench.calibrate import (
        DEFAULT_WORKLOADS,
        calibrate,
        default_out_name,
    )
    from asyncbatch.bench.calibrate import (
        QUICK_WORKLOADS as CAL_QUICK,
    )
    from asyncbatch.bench.models import resolve_model
    from asyncbatch.bench.procs import sigterm_raises
    from asyncbatch.bench.replay import calibration_path

    model = resolve_model(args.model or (QUICK_MODEL if args.quick else FULL_MODEL))
    workloads = _workloads(args.workload, CAL_QUICK if args.quick else DEFAULT_WORKLOADS)
    work_dir = _work_dir("calibrate")
    print(f"asyncbatch-bench calibrate: logs in {work_dir}", file=sys.stderr)
    with sigterm_raises():
        cm = calibrate(model, workloads, _profile(args, True), work_dir=work_dir,
                       with_sync=not args.no_sync, timeout_s=args.timeout,
                       progress=not args.no_progress)
    out = args.out or calibration_path(default_out_name(cm.meta.get("gpu"), model.shape))
    cm.save(out)
    _done_with(args, work_dir)
    print(json.dumps(cm.to_json(), indent=1))
    print(f"\ncost model written to {out}\nuse it: asyncbatch-bench replay --calibration {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
