"""The `clinfer` command: serve | worker | dimse | db | token | audit | models | bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from service.config import Settings, get_settings


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as e:
        print(f"clinfer: refusing to start: {e}", file=sys.stderr)
        raise SystemExit(2) from e


def _configure_logging(level: str) -> None:
    from service.logs import configure

    configure(level)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.main import create_app

    settings = _settings()
    _configure_logging(args.log_level)
    # no uvicorn access log (it prints concrete paths, which carry study UIDs): service.access logs route templates
    uvicorn.run(
        create_app(),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level.lower(),
        proxy_headers=True,
        access_log=False,
        log_config=None,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from service.flows.runtime import get_runtime
    from service.worker.app import Sweeper, run_worker

    settings = _settings()
    _configure_logging(args.log_level)
    if settings.embedded_worker:
        print(
            "clinfer worker needs CLINFER_BROKER_URL (the embedded default runs its worker inside `clinfer serve`)",
            file=sys.stderr,
        )
        return 2
    runtime = get_runtime()
    if settings.worker_metrics_port and args.pool != "prefork":
        from prometheus_client import start_http_server

        # the task threads share this process's collectors; prefork children would not (see README)
        start_http_server(settings.worker_metrics_port)
    sweeper = None
    if not args.no_sweep:
        sweeper = Sweeper(runtime)
        sweeper.start()
    try:
        run_worker(queues=args.queues.split(","), concurrency=args.concurrency, pool=args.pool)
    finally:
        if sweeper is not None:
            sweeper.stop()
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from service.store import db

    settings = _settings()
    db.upgrade(db.make_engine(settings.effective_database_url))
    print("database schema is up to date")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from service.api.auth import mint_token

    print(mint_token(_settings(), role=args.role, subject=args.subject, ttl_seconds=args.ttl))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from service.store import audit, db

    settings = _settings()
    engine = db.make_engine(settings.effective_database_url)
    with db.make_session_factory(engine)() as session:
        checked, broken = audit.verify(session=session)
    if broken is not None:
        print(f"audit chain BROKEN at event {broken.event_id}: {broken.reason} ({checked} events checked)")
        return 1
    print(f"audit chain intact: {checked} events verified")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from service.inference.registry import ModelRegistry

    settings = _settings()
    registry = ModelRegistry(root=settings.model_repository, providers=list(settings.execution_providers))
    registry.load()
    out = {
        name: {
            "versions": [
                {"version": v.version, "sha256": v.sha256, "artifact": v.artifact} for v in m.manifest.versions
            ],
            "image_input": m.manifest.image_input.name,
            "clinical_inputs": [f.name for f in m.manifest.clinical_input.features]
            if m.manifest.clinical_input
            else [],
            "findings": [f.display for f in m.manifest.outputs.findings],
        }
        for name, m in registry.models.items()
    }
    print(json.dumps({"models": out, "errors": registry.errors}, indent=2))
    return 1 if registry.errors else 0


def cmd_models_train(args: argparse.Namespace) -> int:
    try:
        from service.training.train import build_cxr_fusion
    except ImportError as e:
        print(f"training needs the [train] extra (pip install 'clinfer[train]'): {e}", file=sys.stderr)
        return 2
    if args.name != "cxr-fusion":
        print(f"unknown trainable model {args.name!r}; available: cxr-fusion", file=sys.stderr)
        return 2
    build_cxr_fusion(Path(args.out), seed=args.seed)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from service import bench

    results = bench.run(_settings(), out_dir=Path(args.out), model=args.model, repeats=args.repeats)
    bench.print_table(results)
    print(f"written: {Path(args.out) / 'bench.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clinfer", description="clinical inference service")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="serve the API (and, embedded, the worker)").set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="a Celery worker on CLINFER_BROKER_URL")
    worker.add_argument("--queues", default="preprocess,infer")
    worker.add_argument("--concurrency", type=int, default=2)
    worker.add_argument(
        "--pool",
        default="threads",
        choices=["threads", "prefork", "solo"],
        help="threads (default): one model copy per process, metrics on CLINFER_WORKER_METRICS_PORT",
    )
    worker.add_argument("--no-sweep", action="store_true", help="do not run the stable-study sweeper and reconciler")
    worker.set_defaults(func=cmd_worker)

    db_parser = sub.add_parser("db", help="database schema")
    db_sub = db_parser.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="migrate to the latest schema").set_defaults(func=cmd_db_upgrade)

    token = sub.add_parser("token", help="mint a token with the local dev key")
    token.add_argument("--role", required=True, choices=["ingest", "clinician", "admin"])
    token.add_argument("--subject", default=None)
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.set_defaults(func=cmd_token)

    audit_parser = sub.add_parser("audit", help="the audit log")
    audit_sub = audit_parser.add_subparsers(dest="audit_command", required=True)
    audit_sub.add_parser("verify", help="check the hash chain").set_defaults(func=cmd_audit_verify)

    models = sub.add_parser("models", help="the model repository")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="models, versions, hashes").set_defaults(func=cmd_models_list)
    train = models_sub.add_parser("train", help="train and export a demonstration model (extra [train])")
    train.add_argument("name")
    train.add_argument("--out", default="models")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_models_train)

    bench_parser = sub.add_parser("bench", help="inference figures as ratios against batch size 1 (writes JSON)")
    bench_parser.add_argument("--out", default="bench-results")
    bench_parser.add_argument("--model", default="cxr-fusion")
    bench_parser.add_argument("--repeats", type=int, default=20)
    bench_parser.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
