"""The `clinfer` command: serve | worker | dimse | db | token | audit | models | bench."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

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

    from service.api.http import NoDelayHttpToolsProtocol
    from service.api.main import create_app

    settings = _settings()
    _configure_logging(args.log_level)
    # no uvicorn access log (it prints concrete paths, which carry study UIDs): service.access logs route templates
    # several processes share the port (each its own runtime); uvicorn then needs the app's factory by name
    app: Any = create_app() if settings.api_workers == 1 else "service.api.main:create_app"
    uvicorn.run(
        app,
        factory=settings.api_workers > 1,
        workers=settings.api_workers,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level.lower(),
        proxy_headers=True,
        http=NoDelayHttpToolsProtocol,
        loop="auto",  # uvloop where it is installed
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
        from service import metrics

        metrics.register_gpu_metrics()  # clinfer_gpu_* where NVML sees a GPU
    if "infer" in args.queues.split(","):
        from service.flows import analysis

        if args.pool == "prefork":
            # in each child, once forked: a batcher's thread, an ONNX Runtime session's thread pool and a GPU
            # context do not survive a fork, and the database connections are the parent's
            from celery.signals import worker_process_init

            def warm_child(**_: object) -> None:
                runtime.engine.dispose(close=False)
                # in the background: Celery gives a child seconds to report itself up, a GPU warm-up may take
                # longer; a task that comes first loads the model it needs itself (once: the loads are locked)
                threading.Thread(target=analysis.warm_models, args=(runtime,), name="warm-models", daemon=True).start()

            worker_process_init.connect(warm_child, weak=False)
        else:
            analysis.warm_models(runtime)  # before the first task: no study pays model loading or first-shape costs
    sweeper = None
    if not args.no_sweep:
        sweeper = Sweeper(runtime)
        sweeper.start()
    try:
        run_worker(
            queues=args.queues.split(","), concurrency=args.concurrency or settings.worker_concurrency, pool=args.pool
        )
    finally:
        if sweeper is not None:
            sweeper.stop()
        runtime.batchers.close_all()
    return 0


def cmd_dimse(args: argparse.Namespace) -> int:
    from service.dimse import scp
    from service.flows.runtime import get_runtime

    _settings()
    _configure_logging(args.log_level)
    scp.start(get_runtime(), block=True)
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


def _describe_model(manifest: Any) -> dict[str, Any]:
    clinical = manifest.clinical_input
    inputs: dict[str, list[Any]] = {manifest.image_input.name: ["batch", *manifest.image_input.shape]}
    if clinical is not None:
        inputs[clinical.values_name] = ["batch", len(clinical.features)]
        inputs[clinical.mask_name] = ["batch", len(clinical.features)]
    outputs: dict[str, list[Any]] = {manifest.outputs.logits: ["batch", len(manifest.outputs.findings)]}
    if manifest.outputs.heatmap:
        outputs[manifest.outputs.heatmap] = ["batch", len(manifest.outputs.findings), "h", "w"]
    return {
        "intended_use": manifest.intended_use,
        "versions": [{"version": v.version, "sha256": v.sha256, "artifact": v.artifact} for v in manifest.versions],
        "inputs": inputs,
        "clinical_features": [f"{f.name} ({f.unit or 'coded'})" for f in clinical.features] if clinical else [],
        "outputs": outputs,
        "findings": [f"{f.display} ({f.system}|{f.code}) threshold {f.threshold}" for f in manifest.outputs.findings],
    }


def cmd_models_list(args: argparse.Namespace) -> int:
    from service.inference.registry import ModelRegistry

    settings = _settings()
    registry = ModelRegistry(**settings.model_registry_options())
    registry.load()
    described = {name: _describe_model(m.manifest) for name, m in sorted(registry.models.items())}
    print(json.dumps({"models": described, "errors": registry.errors}, indent=2, ensure_ascii=False))
    return 1 if registry.errors else 0


def cmd_models_build_trt(args: argparse.Namespace) -> int:
    """Build (and cache) a native TensorRT plan of a model for this GPU, and report its parity with the CPU."""
    from service.errors import ModelError, NotFound
    from service.inference.registry import ModelRegistry
    from service.inference.tensorrt_runner import build_trt, parity_with_cpu

    settings = _settings()
    registry = ModelRegistry(**settings.model_registry_options())
    registry.load()
    try:
        version = args.version or registry.get_or_raise(args.name).manifest.latest().version
        plan = build_trt(registry, args.name, version, fp16=args.fp16)
        print(f"{plan}\nmax |Δlogit| vs CPU: {parity_with_cpu(registry, args.name, version, plan):.6f}")
    except (ModelError, NotFound) as e:
        print(e.message, file=sys.stderr)
        return 1
    return 0


def cmd_rules_test(args: argparse.Namespace) -> int:
    """Explain routing for DICOM files: each rule's verdict per file, then the routes of the files as one study."""
    from service.errors import ConfigurationError
    from service.inference.registry import ModelRegistry
    from service.ingest import dicom
    from service.routing.rules import InstanceAttributes, build_table, explain

    settings = _settings()
    registry = ModelRegistry(**settings.model_registry_options())
    registry.load()
    manifests = {name: model.manifest for name, model in registry.models.items()}
    rules_path = Path(args.rules) if args.rules else settings.routing_rules
    try:
        table = build_table(rules_path, manifests)
    except ConfigurationError as e:
        print(e.message, file=sys.stderr)
        return 2
    instances = []
    for name in args.files:
        try:
            meta = dicom.parse_instance(Path(name).read_bytes(), max_pixels=settings.max_decoded_pixels).meta
        except (OSError, dicom.DicomRejected) as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 2
        print(f"{name}: SOP Instance UID {meta.sop_instance_uid}")
        instances.append(
            InstanceAttributes(
                sop_instance_uid=meta.sop_instance_uid,
                sop_class_uid=meta.sop_class_uid,
                modality=meta.modality,
                body_part_examined=meta.body_part_examined,
                rows=meta.rows,
                columns=meta.columns,
                photometric_interpretation=meta.photometric_interpretation,
                series_instance_uid=meta.series_instance_uid,
                series_description=meta.series_description,
                view_position=meta.view_position,
                manufacturer=meta.manufacturer,
                calling_ae_title=args.calling_ae_title,
                instance_number=meta.instance_number,
            )
        )
    print("\n".join(explain(table, manifests, instances)))
    return 0 if table.route_study(manifests, instances).routes else 1


def cmd_models_import(args: argparse.Namespace) -> int:
    from service.errors import ModelError
    from service.inference.repository import import_model

    settings = _settings()
    try:
        result = import_model(
            settings.model_repository,
            artifact=Path(args.artifact),
            manifest_file=Path(args.manifest),
            version=args.version,
            providers=list(settings.execution_providers),
        )
    except ModelError as e:
        print(f"import refused: {e.message}", file=sys.stderr)
        return 1
    print(
        f"imported {result.name} version {result.version} (sha256 {result.sha256}) to {result.path}; "
        f"smoke inference output {result.report.smoke_output_shape}. Restart serve and workers to serve it."
    )
    return 0


def cmd_models_validate(args: argparse.Namespace) -> int:
    from service.errors import ModelError
    from service.inference.repository import validate_model

    settings = _settings()
    try:
        reports = validate_model(
            settings.model_repository, args.name, version=args.version, providers=list(settings.execution_providers)
        )
    except ModelError as e:
        print(f"{args.name}: INVALID: {e.message}")
        return 1
    failed = False
    for version, report in reports.items():
        if report.ok:
            print(f"{args.name} {version}: ok (graph matches the manifest; smoke output {report.smoke_output_shape})")
        else:
            failed = True
            print(f"{args.name} {version}: INVALID")
            for problem in report.problems:
                print(f"  - {problem}")
    return 1 if failed else 0


def cmd_models_schema(args: argparse.Namespace) -> int:
    from service.inference.manifest import manifest_json_schema

    print(json.dumps(manifest_json_schema(), indent=2))
    return 0


TRAINABLE = ("cxr-fusion", "ct-head-ich")


def _training_or_exit() -> None:
    try:
        import torch  # noqa: F401
    except ImportError as e:
        print(f"training needs the [train] extra (pip install 'clinfer[train]'): {e}", file=sys.stderr)
        raise SystemExit(2) from e


def cmd_models_train(args: argparse.Namespace) -> int:
    _training_or_exit()
    if args.name == "ct-head-ich":
        # the head CT model trains, calibrates and exports in one step
        from service.training.ct_train import build_ct_head_ich

        build_ct_head_ich(Path(args.out), seed=args.seed)
        return 0
    from service.training.train import default_work_dir, train

    train(args.name, work_dir=Path(args.work_dir) if args.work_dir else default_work_dir(args.name), seed=args.seed)
    print(f"trained {args.name}; next: clinfer models export {args.name}")
    return 0


def cmd_models_export(args: argparse.Namespace) -> int:
    _training_or_exit()
    from service.training.evaluate import evaluate
    from service.training.export import export
    from service.training.train import default_work_dir

    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.name)
    evaluate(args.name, work_dir=work_dir, progress=False)  # the model card carries the held-out figures
    result = export(args.name, work_dir=work_dir, out_dir=Path(args.out))
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_models_evaluate(args: argparse.Namespace) -> int:
    _training_or_exit()
    from service.training.evaluate import evaluate
    from service.training.train import default_work_dir

    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.name)
    result = evaluate(args.name, work_dir=work_dir, progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for variant, figures in result["variants"].items():
            low, high = figures["macro_auroc_ci"]
            print(f"{variant:>14}: macro AUROC {figures['macro_auroc']:.3f} (95% CI {low:.3f}-{high:.3f})")
        delta = result["delta_vs_best_unimodal"]
        print(f"fusion - best unimodal: {delta['value']:+.3f} (95% CI {delta['ci'][0]:+.3f} to {delta['ci'][1]:+.3f})")
    return 0


def cmd_cohort_generate(args: argparse.Namespace) -> int:
    from service.errors import InvalidInput
    from service.training.cohort_files import generate_cohort

    try:
        summary = generate_cohort(Path(args.out), n=args.n, seed=args.seed, size=args.size, progress=True)
    except InvalidInput as e:
        print(f"clinfer cohort generate: {e.message}", file=sys.stderr)
        return 2
    print(f"wrote {summary.n} patients to {summary.out_dir} in {summary.seconds:.1f} s: {summary.counts}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from service import bench

    settings = _settings()
    if args.providers:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
        settings = settings.model_copy(update={"execution_providers": providers})
    try:
        results = bench.run(
            studies_n=args.studies,
            concurrency=args.concurrency,
            size=args.size,
            out=Path(args.json),
            database_url=args.database_url,
            broker_url=args.broker_url,
            compare_batching=not args.no_batching_comparison,
            model=args.model,
            settings=settings,
            api_workers=args.api_workers,
            preprocess_workers=args.preprocess_workers,
            repeat=args.repeat,
            api_threads=args.api_threads,
        )
    except RuntimeError as e:  # the service it started did not come up, or was not ready: say why, no traceback
        print(f"clinfer bench: {e}", file=sys.stderr)
        return 1
    bench.print_table(results)
    print(f"written: {args.json}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clinfer", description="clinical inference service")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="serve the API (and, embedded, the worker)").set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="a Celery worker on CLINFER_BROKER_URL")
    worker.add_argument("--queues", default="preprocess,infer,results")
    worker.add_argument("--concurrency", type=int, default=None, help="default CLINFER_WORKER_CONCURRENCY")
    worker.add_argument(
        "--pool",
        default="threads",
        choices=["threads", "prefork", "solo"],
        help="threads (default): one model copy per process, metrics on CLINFER_WORKER_METRICS_PORT",
    )
    worker.add_argument("--no-sweep", action="store_true", help="do not run the stable-study sweeper and reconciler")
    worker.set_defaults(func=cmd_worker)

    sub.add_parser("dimse", help="the DICOM listener (C-ECHO, C-STORE SCP)").set_defaults(func=cmd_dimse)

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

    rules = sub.add_parser("rules", help="routing rules")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    rules_test = rules_sub.add_parser(
        "test", help="explain which rule routes DICOM files to which model, and why (exit 1: no route)"
    )
    rules_test.add_argument("files", nargs="+", metavar="FILE.dcm")
    rules_test.add_argument("--rules", help="a rules file (default: CLINFER_ROUTING_RULES, else manifest defaults)")
    rules_test.add_argument("--calling-ae-title", help="as if sent by this DIMSE calling AE title")
    rules_test.set_defaults(func=cmd_rules_test)

    models = sub.add_parser("models", help="the model repository")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="models, versions, hashes").set_defaults(func=cmd_models_list)
    import_parser = models_sub.add_parser("import", help="register an exported ONNX model with a manifest")
    import_parser.add_argument("artifact", help="the .onnx file")
    import_parser.add_argument("--manifest", required=True, help="manifest.yaml (see docs/models.md)")
    import_parser.add_argument("--version", default=None, help="default: the next integer")
    import_parser.set_defaults(func=cmd_models_import)
    validate_parser = models_sub.add_parser("validate", help="check a model's graph against its manifest")
    validate_parser.add_argument("name")
    validate_parser.add_argument("--version", default=None)
    validate_parser.set_defaults(func=cmd_models_validate)
    models_sub.add_parser("schema", help="print the manifest's JSON Schema").set_defaults(func=cmd_models_schema)
    build_trt_parser = models_sub.add_parser("build-trt", help="build a TensorRT plan for this GPU (extra [gpu])")
    build_trt_parser.add_argument("name")
    build_trt_parser.add_argument("--version", default=None)
    build_trt_parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None)
    build_trt_parser.set_defaults(func=cmd_models_build_trt)
    train = models_sub.add_parser("train", help="train a demonstration model and its baselines (extra [train])")
    train.add_argument("name", choices=TRAINABLE)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default="models", help="ct-head-ich: where the export goes")
    train.add_argument("--work-dir", default=None, help="default var/training/<name>")
    train.set_defaults(func=cmd_models_train)
    export = models_sub.add_parser("export", help="calibrate, export ONNX with a parity check, write manifest + card")
    export.add_argument("name", choices=["cxr-fusion"])
    export.add_argument("--out", default="models")
    export.add_argument("--work-dir", default=None)
    export.set_defaults(func=cmd_models_export)
    evaluate_parser = models_sub.add_parser("evaluate", help="held-out AUROC with bootstrap CIs, ECE, subgroups")
    evaluate_parser.add_argument("name", choices=["cxr-fusion"])
    evaluate_parser.add_argument("--json", action="store_true")
    evaluate_parser.add_argument("--work-dir", default=None)
    evaluate_parser.set_defaults(func=cmd_models_evaluate)

    cohort = sub.add_parser("cohort", help="synthetic patients as DICOM files and FHIR Bundles")
    cohort_sub = cohort.add_subparsers(dest="cohort_command", required=True)
    generate = cohort_sub.add_parser("generate", help="write a seeded synthetic cohort (demonstration data only)")
    generate.add_argument("--n", type=int, required=True, help="number of patients")
    generate.add_argument("--out", required=True, help="an empty or new folder")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--size", type=int, default=1024, help="image rows and columns (at least 1024)")
    generate.set_defaults(func=cmd_cohort_generate)

    bench_parser = sub.add_parser(
        "bench", help="end-to-end throughput and latency against the model and pipeline limits (writes JSON)"
    )
    bench_parser.add_argument("--studies", type=int, default=200)
    bench_parser.add_argument("--concurrency", type=int, default=8)
    bench_parser.add_argument("--json", default="bench-results/bench.json", help="where the figures are written")
    bench_parser.add_argument("--size", type=int, default=1024, help="rows and columns of the synthetic images")
    bench_parser.add_argument("--model", default="cxr-fusion")
    bench_parser.add_argument(
        "--database-url", help="PostgreSQL for the run (a fresh database is created beside it); default SQLite"
    )
    bench_parser.add_argument("--broker-url", help="Redis for the run: separate `clinfer worker` processes")
    bench_parser.add_argument("--api-workers", type=int, default=1, help="`clinfer serve` processes (with Redis)")
    bench_parser.add_argument(
        "--preprocess-workers", type=int, default=1, help="`clinfer worker --queues preprocess` processes (with Redis)"
    )
    bench_parser.add_argument(
        "--api-threads",
        type=_positive_int,
        help="threads of each `clinfer serve` process for its blocking work; default CLINFER_API_THREADS",
    )
    bench_parser.add_argument(
        "--no-batching-comparison", action="store_true", help="skip the batching on/off runs at concurrency 16"
    )
    bench_parser.add_argument(
        "--repeat",
        type=_positive_int,
        default=1,
        help="rounds of the end-to-end runs (each configuration once per round); figures are their medians",
    )
    bench_parser.add_argument(
        "--providers",
        help="execution providers for this run, in order of preference (comma-separated, e.g."
        " CUDAExecutionProvider,CPUExecutionProvider); default CLINFER_EXECUTION_PROVIDERS",
    )
    bench_parser.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
