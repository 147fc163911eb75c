"""``python -m app``: the service (``serve``, the default) and a ``docker model``-like CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp

from app import __version__, preload_manifest
from app.client import ClientError, ServiceClient, model_path
from app.errors import ServiceError
from app.oci import reference
from app.oci.tarball import iter_tar
from app.packaging import artifact
from app.packaging.gguf_config import GGUFError
from app.progress_view import ProgressView, TransferFailed
from app.settings import Settings, SettingsError
from app.store import ModelStore, StoreError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    try:
        return COMMANDS[command](args)
    except (
        ClientError,
        GGUFError,
        StoreError,
        SettingsError,
        preload_manifest.ManifestError,
        reference.InvalidReference,
        OSError,
        ServiceError,
        TransferFailed,
    ) as exc:
        print(f"model-runner {command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the service (the default command)")
    sub.add_parser(
        "check", help="check the environment and the preload manifest, print what they say"
    )
    health = sub.add_parser(
        "healthcheck", help="exit 0 when the local service is ready (for HEALTHCHECK)"
    )
    health.add_argument("--live", action="store_true", help="only check that it answers")

    ls = sub.add_parser("ls", help="list local models")
    ls.add_argument("--json", action="store_true", help="print DMR's JSON")
    ls.add_argument("--openai", action="store_true", help="print the OpenAI model list")
    ls.add_argument("-q", "--quiet", action="store_true", help="print model IDs only")

    inspect = sub.add_parser("inspect", help="show one model as JSON")
    inspect.add_argument("model")
    inspect.add_argument("--openai", action="store_true", help="show the OpenAI model object")

    rm = sub.add_parser("rm", help="remove models (or just a tag)")
    rm.add_argument("-f", "--force", action="store_true", help="remove even with several tags")
    rm.add_argument("models", nargs="+")

    tag = sub.add_parser("tag", help="tag a model with another name")
    tag.add_argument("source")
    tag.add_argument("target")

    pull = sub.add_parser("pull", help="pull a model from a registry, with progress")
    pull.add_argument("model")
    push = sub.add_parser("push", help="push a model to a registry, with progress")
    push.add_argument("model")

    pkg = sub.add_parser("package", help="package a GGUF file as a DMR model artifact")
    pkg.add_argument("--gguf", type=Path, required=True, help="GGUF file (first shard if split)")
    pkg.add_argument("--license", type=Path, action="append", default=[], help="license file")
    pkg.add_argument("--chat-template", type=Path, help="Jinja chat template file")
    pkg.add_argument("--context-size", type=int, help="context size in tokens")
    pkg.add_argument("--mmproj", type=Path, help="multimodal projector GGUF")
    where = pkg.add_mutually_exclusive_group(required=True)
    where.add_argument("--load", action="store_true", help="load into the running service")
    where.add_argument(
        "--store", action="store_true", help="write straight into MODELS_PATH (no service needed)"
    )
    where.add_argument(
        "--push", action="store_true", help="push straight to the registry in TAG (no service)"
    )
    pkg.add_argument(
        "--if-missing", action="store_true", help="do nothing when TAG already names a model"
    )
    pkg.add_argument("tag", help="reference to tag the model with, e.g. myorg/model:Q4_K_M")
    return p


# -- serve --------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from app.api.server import serve
    from app.logging import configure_logging

    settings = Settings.from_env()
    entries = preload_manifest.startup_entries(
        settings.manifest, settings.preload_models, settings.default_registry
    )
    configure_logging(settings)
    asyncio.run(serve(settings, entries))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """What the entrypoint runs first: a bad setting fails here, in one line, before serving."""
    settings = Settings.from_env()
    entries = preload_manifest.startup_entries(
        settings.manifest, settings.preload_models, settings.default_registry
    )
    print(
        f"listening on {settings.addr}:{settings.port}"
        + "".join(f", :{p}" for p in settings.extra_ports)
        + f"; models in {settings.models_path};"
        f" memory limit {settings.memory_limit // 2**20} MiB;"
        f" {len(entries)} model(s) in the preload manifest"
    )
    for entry in entries:
        flags = [f for f in ("preload", "pin") if getattr(entry, f)]
        print(f"  {entry.model} ({entry.mode}{''.join(', ' + f for f in flags)})")
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    client = ServiceClient(f"http://127.0.0.1:{settings.port}", timeout=5)
    reply = client.request("GET", "/healthz" if args.live else "/readyz")
    print(reply.text)
    return 0 if reply.status == 200 else 1


# -- client commands ----------------------------------------------------------------------
def _client() -> ServiceClient:
    settings = Settings.from_env()
    # The first key, when the service's own are set here too (the same environment or file).
    return ServiceClient(settings.host, api_key=next(iter(settings.api_keys), None))


def cmd_ls(args: argparse.Namespace) -> int:
    client = _client()
    if args.openai:
        print(client.checked("GET", "/engines/v1/models").text)
        return 0
    reply = client.checked("GET", "/models")
    if args.json:
        print(reply.text)
        return 0
    rows = json.loads(reply.body)
    if args.quiet:
        for m in rows:
            print(m["id"][7:19])
        return 0
    table = [
        ("MODEL NAME", "PARAMETERS", "QUANTIZATION", "ARCHITECTURE", "MODEL ID", "CREATED", "SIZE")
    ]
    for m in rows:
        c = m.get("config", {})
        for name in [_display_name(t) for t in m.get("tags", [])] or ["<none>"]:
            table.append(
                (
                    name,
                    c.get("parameters", ""),
                    c.get("quantization", ""),
                    c.get("architecture", ""),
                    m["id"][7:19],
                    _ago(m.get("created", 0)),
                    c.get("size", ""),
                )
            )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _display_name(tag: str) -> str:
    """Strip the defaults the way ``docker model ls`` does: docker.io/, ai/ and :latest."""
    for prefix in ("docker.io/", "index.docker.io/", "ai/"):
        tag = tag.removeprefix(prefix)
    return tag.removesuffix(":latest")


def _ago(created: int) -> str:
    if not created:
        return ""
    seconds = max(0, int(time.time()) - created)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def cmd_inspect(args: argparse.Namespace) -> int:
    client = _client()
    path = model_path(args.model)
    if args.openai:
        path = "/engines/v1" + path
    print(json.dumps(json.loads(client.checked("GET", path).body), indent=2))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    client = _client()
    failed = 0
    for model in args.models:
        query = "?force=true" if args.force else ""
        try:
            reply = client.checked("DELETE", model_path(model) + query)
        except ClientError as exc:
            print(f"model-runner rm: {model}: {exc}", file=sys.stderr)
            failed += 1
            continue
        for item in json.loads(reply.body):
            for verb, what in item.items():
                print(f"{verb}: {what}")
    return 1 if failed else 0


def _split_target(target: str) -> tuple[str, str]:
    slash, colon = target.rfind("/"), target.rfind(":")
    if colon > slash:
        return target[:colon], target[colon + 1 :]
    return target, "latest"


def _tag(client: ServiceClient, source: str, target: str) -> str:
    repo, tag = _split_target(target)
    query = urlencode({"repo": repo, "tag": tag})
    reply = client.checked("POST", f"{model_path(source)}/tag?{query}")
    return json.loads(reply.body)["message"]


def cmd_tag(args: argparse.Namespace) -> int:
    print(_tag(_client(), args.source, args.target))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    body = json.dumps({"from": args.model}).encode()
    return _transfer("POST", "/models/create", body, ProgressView())


def cmd_push(args: argparse.Namespace) -> int:
    return _transfer("POST", f"{model_path(args.model)}/push", b"", ProgressView())


def _transfer(method: str, path: str, body: bytes, view: ProgressView) -> int:
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    try:
        for line in _client().lines(method, path, body, headers):
            view.feed(line)
    finally:
        view.close()
    print(view.result or "done")
    return 0


# -- package ------------------------------------------------------------------------------
def cmd_package(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    target = reference.parse(args.tag, settings.default_registry)  # fail before hashing GBs
    if args.context_size is not None and args.context_size <= 0:
        raise GGUFError("--context-size must be a positive number of tokens")
    extras = [p for p in (args.chat_template, args.mmproj) if p is not None]
    inputs = [args.gguf, *args.license, *extras]
    for path in inputs:
        if not path.is_file():
            raise GGUFError(f"{path}: no such file")
    if args.store:
        store = ModelStore(settings.models_path, settings.default_registry)
        if args.if_missing and _store_has(store, args.tag):
            print(f"{target.familiar} is already in the store")
            return 0
        built = _build(args)
        entry = artifact.write_to_store(built, store, str(target))
        print(f"Stored {entry.id} as {target.familiar}")
        return 0
    if args.push:
        return asyncio.run(_push_artifact(_build(args), args.tag, settings))
    client = _client()
    if args.if_missing and client.request("GET", model_path(args.tag)).status == 200:
        print(f"{target.familiar} is already loaded")
        return 0
    built = _build(args)
    chunks = iter_tar(built.blob_sources(), built.manifest)
    client.checked("POST", "/models/load", chunks, {"Content-Type": "application/x-tar"})
    print(_tag(client, built.id, args.tag))
    return 0


def _build(args: argparse.Namespace) -> artifact.Artifact:
    return artifact.build(
        args.gguf,
        licenses=args.license,
        chat_template=args.chat_template,
        context_size=args.context_size,
        mmproj=args.mmproj,
    )


async def _push_artifact(built: artifact.Artifact, tag: str, settings: Settings) -> int:
    from app.service.distribution import prepare_push_blobs, push_stream

    view = ProgressView()
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        # Straight from the files to the registry: the store is not touched, nor created.
        blobs = built.blob_sources()
        job = await prepare_push_blobs(session, settings, tag, built.manifest, blobs, None)
        try:
            async for line in push_stream(job):
                view.feed(json.dumps(line).encode())
        finally:
            view.close()
    print(view.result)
    return 0


def _store_has(store: ModelStore, ref: str) -> bool:
    try:
        store.resolve(ref)
    except StoreError:
        return False
    return True


COMMANDS = {
    "serve": cmd_serve,
    "check": cmd_check,
    "healthcheck": cmd_healthcheck,
    "ls": cmd_ls,
    "inspect": cmd_inspect,
    "rm": cmd_rm,
    "tag": cmd_tag,
    "package": cmd_package,
    "pull": cmd_pull,
    "push": cmd_push,
}
