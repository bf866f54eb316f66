# SPDX-License-Identifier: Apache-2.0
"""``asyncbatch-bench``: A/B benchmarks of asyncbatch against stock vLLM 0.26.

Subcommands: ``replay`` (CPU, simulated time), ``offline`` and ``online`` (GPU),
``calibrate`` (GPU, writes the replay's cost model), ``compare`` (replay against
GPU rankings) and ``workloads``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from asyncbatch.bench.variants import BASELINE, VARIANT_NAMES, EngineProfile

RESULTS = Path("benchmarks/results")
QUICK_MODEL = "dummy:llama-1b"
FULL_MODEL = "dummy:llama-8b"
REPLAY_WORKLOADS = ["replay-kv", "random"]
GPU_WORKLOADS = ["replay-kv", "random"]
ONLINE_WORKLOADS = ["replay-kv"]


class CliError(Exception):
    pass


def _common(p: argparse.ArgumentParser, *, variants: str, kv_blocks: int | None) -> None:
    p.add_argument("--workload", "-w", action="append", metavar="NAME[:k=v,...]",
                   help="workload, repeatable (see `asyncbatch-bench workloads`)")
    p.add_argument("--variants", default=variants,
                   help=f"comma-separated, from {', '.join(VARIANT_NAMES)} "
                        f"(default {variants}; ratios are against {BASELINE})")
    p.add_argument("--result-dir", type=Path, help="where results JSON/MD/PNG go")
    p.add_argument("--name", help="base name of the result files (default: mode-model-date)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=kv_blocks,
                   help="KV cache size in blocks (vLLM --num-gpu-blocks-override); 0 = "
                        "vLLM's own sizing" + (
                            f"; the default {kv_blocks} keeps the prefix-shared working set "
                            "from fitting, as in the replay" if kv_blocks else " (default)"))
    p.add_argument("--asyncbatch-config", type=_json_object, default={}, metavar="JSON",
                   help="plugin settings for the variants that load asyncbatch (asyncbatch, "
                        "worker, full), e.g. '{\"policy\": \"fcfs\"}'")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"policy\": \"fcfs\"}'")
    return value


def _gpu_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"local model folder, or dummy:SHAPE for a dummy-weight "
                                   f"folder made on the fly (default {FULL_MODEL}, "
                                   f"{QUICK_MODEL} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"small profile: model {QUICK_MODEL} instead of {FULL_MODEL}")
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
    _gpu_common(p)
    p.add_argument("--warmup", type=int, default=8, help="warm-up requests per workload")

    p = sub.add_parser("online", help="GPU: online A/B through vllm serve + vllm bench serve",
                       description="Starts `vllm serve` per variant on loopback and drives it "
                                   "with `vllm bench serve`; servers are always shut down.")
    _common(p, variants="async,asyncbatch", kv_blocks=512)
    _gpu_common(p)
    p.add_argument("--request-rates", default="8,32",
                   help="comma-separated request rates (req/s; 'inf' allowed; default 8,32)")
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--port", type=int, help="server port (default: a free one)")
    p.add_argument("--online-dataset", choices=["vllm", "custom"], default="vllm",
                   help="vllm: built-in random/prefix_repetition with the workload's "
                        "parameters; custom: the workload's exact prompts as JSONL "
                        "(dummy tokenizer; needs pandas)")
    p.add_argument("--health-timeout", type=float, default=600,
                   help="seconds to wait for a server's /health")

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
                "calibrate": cmd_calibrate, "compare": cmd_compare,
                "workloads": cmd_workloads}[args.cmd](args)
    except KeyboardInterrupt:
        print("asyncbatch-bench: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        from asyncbatch.bench.models import ModelError
        from asyncbatch.bench.offline import BenchError
        from asyncbatch.bench.procs import Terminated
        from asyncbatch.bench.variants import VariantError
        from asyncbatch.bench.workloads import WorkloadError

        known = (CliError, ModelError, BenchError, Terminated, VariantError, WorkloadError,
                 FileNotFoundError)
        if isinstance(e, known):
            print(f"asyncbatch-bench {args.cmd}: error: {e}", file=sys.stderr)
            return 2
        raise


def _workloads(args: argparse.Namespace, default: list[str]) -> list[tuple[str, Any]]:
    from asyncbatch.bench.workloads import parse_workload, workload_label

    texts = args.workload or default
    labels = [workload_label(t) for t in texts]
    if len(set(labels)) != len(labels):
        raise CliError(f"a workload is listed twice: {' '.join(texts)}")
    return [(label, parse_workload(t)) for label, t in zip(labels, texts, strict=True)]


def _variants(args: argparse.Namespace) -> list[str]:
    from asyncbatch.bench.variants import check_variants

    return check_variants([v.strip() for v in args.variants.split(",") if v.strip()])


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


def _finish(args: argparse.Namespace, mode: str, model_label: str, result: dict[str, Any],
            title: str, simulated: bool = False) -> None:
    from asyncbatch.bench.report import format_table, summarize_runs, write_results

    result["summary"] = summarize_runs(result["runs"])
    table = format_table(result["runs"], title=title, simulated=simulated)
    out_dir = args.result_dir or RESULTS / mode
    paths = write_results(out_dir, _name(args, mode, model_label), result, table,
                          plot_title=title, simulated=simulated)
    print(table)
    print(f"\nresults: {paths['json']}\ntable:   {paths['md']}\nplot:    {paths['png']}")


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

    workloads = _workloads(args, REPLAY_WORKLOADS)
    variants = _replayable(_variants(args))
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
    _finish(args, "replay", label, result, title, simulated=True)
    return 0


def _replayable(variants: list[str]) -> list[str]:
    """The replay simulates schedulers with a fixed host time per step, so a
    variant that changes only the worker would replay exactly as stock async."""
    from asyncbatch.bench.replay import VARIANTS

    other = [v for v in variants if v not in VARIANTS]
    if other:
        raise CliError(f"the replay cannot run {', '.join(other)}: it models the scheduler "
                       "only, not the worker's host time; replayable variants: "
                       f"{', '.join(VARIANTS)}")
    return variants


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def _gpu_setup(args: argparse.Namespace) -> tuple[Any, list[tuple[str, Any]]]:
    from asyncbatch.bench.models import resolve_model

    if args.repeats < 2 and args.cmd != "calibrate":
        raise CliError("--repeats must be at least 2: a single run has no spread, so no "
                       "difference could be told from noise")
    model = resolve_model(args.model or (QUICK_MODEL if args.quick else FULL_MODEL))
    return model, _workloads(args, ONLINE_WORKLOADS if args.cmd == "online" else GPU_WORKLOADS)


def _work_dir(args: argparse.Namespace, mode: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"asyncbatch-{mode}-"))


def _done_with(args: argparse.Namespace, work_dir: Path) -> None:
    if not args.keep_work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)


def cmd_offline(args: argparse.Namespace) -> int:
    from asyncbatch.bench.offline import run_offline
    from asyncbatch.bench.procs import sigterm_raises
    from asyncbatch.bench.report import environment_stamp

    variants = _variants(args)
    model, workloads = _gpu_setup(args)
    work_dir = _work_dir(args, "offline")
    print(f"asyncbatch-bench offline: logs in {work_dir}", file=sys.stderr)
    with sigterm_raises():
        result = run_offline(model, workloads, variants, _profile(args, True),
                             repeats=args.repeats, work_dir=work_dir, num_warmup=args.warmup,
                             timeout_s=args.timeout, progress=not args.no_progress)
    result = {"kind": "offline", "simulated": False,
              "environment": environment_stamp(model.path, model.shape, gpu=result["gpu"],
                                               argv=args.argv),
              **result}
    title = f"offline A/B, {model.label}, {result['environment']['gpu']}"
    _finish(args, "offline", model.label, result, title)
    _done_with(args, work_dir)
    return 0


def cmd_online(args: argparse.Namespace) -> int:
    from asyncbatch.bench.online import run_online
    from asyncbatch.bench.procs import sigterm_raises
    from asyncbatch.bench.report import environment_stamp

    variants = _variants(args)
    try:
        rates = [float(r) for r in args.request_rates.split(",") if r.strip()]
    except ValueError:
        raise CliError(f"--request-rates wants numbers, got {args.request_rates!r}") from None
    model, workloads = _gpu_setup(args)
    if args.port is not None:
        from asyncbatch.bench.online import check_port_free

        check_port_free(args.port)
    work_dir = _work_dir(args, "online")
    out_dir = args.result_dir or RESULTS / "online"
    print(f"asyncbatch-bench online: logs in {work_dir}", file=sys.stderr)
    with sigterm_raises():
        result = run_online(model, workloads, variants, _profile(args, True),
                            request_rates=rates, max_concurrency=args.max_concurrency,
                            repeats=args.repeats, work_dir=work_dir, result_dir=out_dir,
                            port=args.port, dataset_source=args.online_dataset,
                            health_timeout_s=args.health_timeout, bench_timeout_s=args.timeout,
                            progress=not args.no_progress)
    result = {"kind": "online", "simulated": False,
              "environment": environment_stamp(model.path, model.shape, argv=args.argv),
              **result}
    title = f"online A/B (vllm bench serve), {model.label}, {result['environment']['gpu']}"
    _finish(args, "online", model.label, result, title)
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
    workloads = _workloads(args, CAL_QUICK if args.quick else DEFAULT_WORKLOADS)
    work_dir = _work_dir(args, "calibrate")
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
