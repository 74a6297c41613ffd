"""The `lookalike` command line. Errors are translated into messages and exit codes here only."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from indexer.errors import CatalogError, LookalikeError
from service.settings import Settings

log = logging.getLogger("lookalike")

app = typer.Typer(
    name="lookalike",
    help="Self-hostable image recommender: index a dump, then serve 'more like this' feeds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[env LOOKALIKE_PORT]" is no markup tag
)

CatalogOption = Annotated[
    Path | None,
    typer.Option("--catalog", "-c", help="Catalog directory [env LOOKALIKE_CATALOG]"),
]
ProfileOption = Annotated[
    str | None,
    typer.Option(
        "--profile",
        help="Encoder profile: 'default' (DINOv2 + CLIP + MiniLM, real weights) or "
        "'offline' (weight-free pixels descriptor + packaged MiniLM) [env LOOKALIKE_PROFILE]",
    ),
]
GeneratorOption = Annotated[
    str | None,
    typer.Option(
        "--generator",
        help="What makes new images when a scroll runs dry: 'none', 'sample' (the sample "
        "renderer, no weights) or 'diffusers' (SDXL-Turbo + IP-Adapter by default; see "
        "LOOKALIKE_GENERATOR_* in the README) [env LOOKALIKE_GENERATOR]",
    ),
]
VectorStoreOption = Annotated[
    str | None,
    typer.Option(
        help="Where a new catalog keeps its vectors: 'faiss' (default) or 'milvus' "
        "[env LOOKALIKE_VECTOR_STORE]"
    ),
]
MilvusUriOption = Annotated[
    str | None,
    typer.Option(
        help="Milvus server (http://host:19530); default: Milvus Lite inside the catalog "
        "[env LOOKALIKE_MILVUS_URI]"
    ),
]


@app.callback()
def root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens")] = False,
) -> None:
    """Configure logging once for every command."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def settings_from(**given: Any) -> Settings:
    """Environment settings, overridden by the options actually given on the command line."""
    try:
        return Settings(**{k: v for k, v in given.items() if v is not None})
    except SettingsError as exc:  # a LOOKALIKE_* variable its field cannot parse
        typer.echo(f"error: invalid setting: {exc}", err=True)
        raise typer.Exit(2) from None
    except ValidationError as exc:  # a bad option or LOOKALIKE_* variable: say which, no trace
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        typer.echo(f"error: invalid setting: {problems}", err=True)
        raise typer.Exit(2) from None


@app.command("sample-dump")
def sample_dump(
    out: Annotated[Path, typer.Argument(help="Directory to write the dump into")],
    count: Annotated[int, typer.Option(help="Number of images")] = 500,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes)")] = 0,
) -> None:
    """Write a deterministic civitai-style sample dump (with truth.jsonl for benchmarks)."""
    from indexer.sample_dump import write_sample_dump

    summary = write_sample_dump(out, count=count, seed=seed)
    typer.echo(f"wrote {summary} to {out}")


@app.command()
def index(
    dump: Annotated[Path, typer.Argument(help="Dump directory (civitai JSON, sidecars, images)")],
    catalog: CatalogOption = None,
    profile: ProfileOption = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default auto)")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="auto (bf16 on GPUs and AMX CPUs), fp32 or bf16")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per encoder batch")] = None,
    visual_model: Annotated[
        str | None, typer.Option(help="Hub id or local dir for the visual space")
    ] = None,
    clip_model: Annotated[str | None, typer.Option(help="Hub id or local dir for clip")] = None,
    text_model: Annotated[str | None, typer.Option(help="Hub id or local dir for text")] = None,
    shard: Annotated[str | None, typer.Option(help="Index only shard I/N of the dump")] = None,
    vector_store: VectorStoreOption = None,
    milvus_uri: MilvusUriOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar")] = False,
) -> None:
    """Index new or changed images of DUMP into the catalog (resumable, incremental)."""
    from indexer.build import open_for_indexing
    from indexer.pipeline import PipelineConfig, Shard, index_dump

    settings = settings_from(
        catalog=catalog,
        profile=profile,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        visual_model=visual_model,
        clip_model=clip_model,
        text_model=text_model,
        vector_store=vector_store,
        milvus_uri=milvus_uri,
    )
    if not dump.is_dir():
        raise LookalikeError(f"Dump directory {dump} does not exist.")
    cat, encoders = open_for_indexing(
        settings.catalog,
        profile=settings.profile
        if profile is not None or "LOOKALIKE_PROFILE" in os.environ
        else None,
        overrides=settings.model_overrides(),
        device=settings.device,
        dtype=settings.dtype,
        store=settings.store_config(),
        policy=settings.index_policy(),
    )
    config = PipelineConfig(
        batch_size=settings.batch_size,
        decode_workers=settings.decode_workers,
        progress=not no_progress and sys.stderr.isatty(),
        shard=Shard.parse(shard) if shard else None,
    )
    with cat:
        report = index_dump(dump, cat, encoders, config)
    if json_out:
        typer.echo(json.dumps(report.to_json()))
    else:
        typer.echo(report.summary())
    for warning in report.warnings():
        typer.echo(f"warning: {warning}", err=True)


@app.command()
def merge(
    parts: Annotated[
        list[Path], typer.Argument(help="Partial catalogs (`lookalike index --shard I/N`)")
    ],
    catalog: CatalogOption = None,
    vector_store: VectorStoreOption = None,
    milvus_uri: MilvusUriOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar")] = False,
) -> None:
    """Merge partial catalogs into one, as if the whole dump had been indexed at once."""
    from indexer.merge import merge_catalogs

    settings = settings_from(catalog=catalog, vector_store=vector_store, milvus_uri=milvus_uri)
    report = merge_catalogs(
        parts,
        settings.catalog,
        progress=not no_progress and sys.stderr.isatty(),
        store=settings.store_config(),
    )
    if json_out:
        typer.echo(json.dumps(report.to_json()))
    else:
        typer.echo(report.summary())


@app.command()
def info(
    catalog: CatalogOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Describe a catalog: items, spaces, index types, encoders."""
    from indexer.catalog import Catalog

    settings = settings_from(catalog=catalog)
    with Catalog.open(settings.catalog) as cat:
        summary = cat.info()
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"catalog {summary['path']}: {summary['items']} items")
    for space, s in summary["spaces"].items():
        enc = summary["encoders"][space]
        typer.echo(
            f"  {space:<7} {s['count']:>9} vectors  dim {s['dim']:<4} {s['index']:<16} "
            f"{enc['name']} ({enc['model']})"
        )
    typer.echo(f"  duplicates {summary['duplicates']}, skipped {sum(summary['skipped'].values())}")


@app.command()
def delete(
    ids: Annotated[list[str], typer.Argument(help="Item ids to delete")],
    catalog: CatalogOption = None,
) -> None:
    """Delete items from the catalog (SQLite rows and every FAISS index)."""
    from indexer.catalog import Catalog

    settings = settings_from(catalog=catalog)
    with Catalog.open(settings.catalog) as cat:
        aliases = cat.aliases_of(ids)
        deleted = cat.delete(ids)
    missing = sorted(set(ids) - set(deleted))
    aliases = [alias for alias in aliases if alias not in ids]
    typer.echo(
        f"deleted {len(deleted)}"
        + (f" and their duplicate ids {_listed(aliases)}" if aliases else "")
        + (f"; not found: {_listed(missing)}" if missing else "")
    )
    if missing and not deleted:
        raise typer.Exit(1)


def _listed(names: Sequence[str], shown: int = 10) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


@app.command()
def serve(
    catalog: CatalogOption = None,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on [env LOOKALIKE_HOST]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [env LOOKALIKE_PORT]")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default auto)")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="auto (bf16 on GPUs and AMX CPUs), fp32 or bf16")
    ] = None,
    generator: GeneratorOption = None,
    milvus_uri: MilvusUriOption = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Serving processes, for more than one core's worth of pages a second; each "
            "holds the catalog's indexes in memory [env LOOKALIKE_WORKERS, default 1]"
        ),
    ] = None,
) -> None:
    """Serve the HTTP API (and web page) over a catalog."""
    settings = settings_from(
        catalog=catalog,
        host=host,
        port=port,
        workers=workers,
        device=device,
        dtype=dtype,
        generator=generator,
        milvus_uri=milvus_uri,
    )
    run_server(settings, what=f"catalog {settings.catalog}")


@app.command()
def demo(
    port: Annotated[int | None, typer.Option(help="Port to listen on [env LOOKALIKE_PORT]")] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on [env LOOKALIKE_HOST]")
    ] = None,
    data: Annotated[Path, typer.Option(help="Where the sample dump and catalog go")] = Path("data"),
    count: Annotated[int, typer.Option(help="Images in the sample dump")] = 500,
    seed: Annotated[int, typer.Option(help="Random seed of the sample dump")] = 0,
    generator: GeneratorOption = None,
) -> None:
    """Build a sample dump and an offline-profile catalog under DATA when missing, then serve.

    With ``--generator sample`` the scroll makes new images when it runs dry (no weights)."""
    from indexer.build import open_for_indexing
    from indexer.pipeline import PipelineConfig, index_dump
    from indexer.sample_dump import TRUTH_FILENAME, write_sample_dump

    dump = data / "sample-dump"
    settings = settings_from(
        catalog=data / "demo-catalog", host=host, port=port, profile="offline", generator=generator
    )
    if not (dump / TRUTH_FILENAME).exists():  # written last: its presence means the dump is whole
        typer.echo(f"writing a sample dump of {count} images to {dump} ...", err=True)
        write_sample_dump(dump, count=count, seed=seed)
    # Incremental: a finished catalog is checked in seconds, an interrupted one is completed.
    cat, encoders = open_for_indexing(
        settings.catalog, profile="offline", overrides={}, device=settings.device, dtype="fp32"
    )
    with cat:
        report = index_dump(dump, cat, encoders, PipelineConfig(progress=sys.stderr.isatty()))
    typer.echo(report.summary(), err=True)
    run_server(settings, what=f"the demo catalog {settings.catalog}")


@app.command()
def score(
    pairs: Annotated[
        Path,
        typer.Argument(help="CSV with columns `image` (a path, relative to the CSV) and `text`"),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Scores CSV (default: PAIRS.scores.csv)")
    ] = None,
    catalog: CatalogOption = None,
    clip_model: Annotated[
        str | None,
        typer.Option(help="Hub id or local dir of a CLIP model (default: the catalog's)"),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default auto)")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="auto (bf16 on GPUs and AMX CPUs), fp32 or bf16")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per encoder batch")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
) -> None:
    """Score how well each image matches its text: 100 x CLIP cosine. Needs CLIP."""
    from recommender.alignment import score_csv, scoring_encoder

    settings = settings_from(
        catalog=catalog, clip_model=clip_model, device=device, dtype=dtype, batch_size=batch_size
    )
    encoder = scoring_encoder(
        settings.catalog, settings.clip_model, settings.device, settings.dtype
    )
    target = out or pairs.with_name(pairs.stem + ".scores.csv")
    summary = score_csv(
        pairs,
        target,
        encoder,
        batch_size=settings.batch_size,
        decode_workers=settings.decode_workers,
        progress=sys.stderr.isatty(),
    )
    typer.echo(json.dumps(summary.to_json()) if json_out else summary.summary())


taste_app = typer.Typer(
    help="Collaborative taste: user taste vectors fitted from dwell feedback.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(taste_app, name="taste")


@taste_app.command("fit")
def taste_fit(
    catalog: CatalogOption = None,
    rank: Annotated[
        int | None, typer.Option(help="Factor dimension (top principal directions) [64]")
    ] = None,
    iterations: Annotated[int | None, typer.Option(help="ALS sweeps [8]")] = None,
    lam: Annotated[float | None, typer.Option(help="L2 on user factors [1]")] = None,
    mu: Annotated[float | None, typer.Option(help="Anchor of items to embeddings [10]")] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Confidence per unit of standardised dwell [10]")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default auto)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
) -> None:
    """Fit every known user's taste from the catalog's dwell feedback (writes taste.npz)."""
    from indexer.build import recorded_specs
    from indexer.catalog import Catalog
    from indexer.encoders import create_encoder
    from recommender.alignment import peak_rss_mb
    from recommender.taste import TASTE_FILE, TasteConfig, fit_taste

    settings = settings_from(catalog=catalog, device=device)
    given: dict[str, Any] = {
        "rank": rank,
        "iterations": iterations,
        "lam": lam,
        "mu": mu,
        "alpha": alpha,
    }
    config = TasteConfig(**{k: v for k, v in given.items() if v is not None})
    specs = recorded_specs(settings.catalog) or {}
    # the text encoder embeds the vocabulary that describes tastes
    text = create_encoder(specs["text"], device=settings.device) if "text" in specs else None
    with Catalog.open(settings.catalog) as cat:
        model = fit_taste(cat, config, text_encoder=text)
        model.save(cat.path / TASTE_FILE)
    info = {**model.info, "path": str(settings.catalog / TASTE_FILE)}
    info["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if json_out:
        typer.echo(json.dumps(info))
        return
    spaces = ", ".join(f"{space} (rank {rank})" for space, rank in info["rank"].items())
    typer.echo(
        f"taste fitted: {info['users']} users, {info['items']} items, {info['events']} events; "
        f"{spaces}, {config.iterations} sweeps; ALS {info['als_s']:.1f} s, total "
        f"{info['total_s']:.1f} s, peak memory {info['peak_rss_mb']:.0f} MB; "
        f"written to {info['path']}"
    )


@taste_app.command("show")
def taste_show(
    user_id: Annotated[str, typer.Argument(help="The user id sessions were created with")],
    catalog: CatalogOption = None,
    terms: Annotated[int, typer.Option(help="Terms and tags to show")] = 12,
    images: Annotated[int, typer.Option(help="Images to show")] = 8,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Describe a user's taste: nearest terms and tags, nearest images."""
    from indexer.catalog import Catalog
    from recommender.taste import TasteStore, describe_taste

    settings = settings_from(catalog=catalog)
    with Catalog.open(settings.catalog) as cat:
        store = TasteStore.for_catalog(cat.path)
        described = describe_taste(store, cat, user_id, n_terms=terms, n_images=images)
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "user_id": described.user_id,
                    "events": described.events,
                    "borrowed_from": described.borrowed,
                    "terms": [
                        {"term": t, "kind": k, "similarity": round(v, 4)}
                        for t, k, v in described.terms
                    ],
                    "images": [
                        {"id": i, "similarity": round(v, 4), "prompt": p}
                        for i, v, p in described.images
                    ],
                }
            )
        )
        return
    borrowed = f", borrowing from {described.borrowed} similar users" if described.borrowed else ""
    typer.echo(f"user {user_id}: feedback on {described.events} items{borrowed}")
    typer.echo("  terms: " + ", ".join(f"{t} ({v:.2f})" for t, _, v in described.terms))
    for image_id, similarity, prompt in described.images:
        typer.echo(f"  {image_id}  {similarity:.3f}  {(prompt or '')[:80]}")


def run_server(settings: Settings, what: str) -> None:
    """Open the engine (errors surface here, before listening), listen, then serve until
    interrupted: in this process, or in ``settings.workers`` worker processes that open it
    again."""
    from service.app import configure_logging, open_engine, serve_engine
    from service.workers import listening_sockets, serve_workers

    configure_logging(json_lines=settings.log_json, access_log=settings.access_log)
    engine = open_engine(settings)
    try:
        engine.load()  # a missing model is reported here, before the port is opened
        if settings.workers > 1 and engine.catalog.store.milvus_lite:
            raise CatalogError(
                "this catalog keeps its vectors in Milvus Lite, a file only one process can "
                "open: serve it with --workers 1, or from a Milvus server (--milvus-uri)"
            )
        items = engine.stats().get("items", 0)
        try:  # before saying where it serves: a port in use is an error, not a URL
            socks = listening_sockets(settings.host, settings.port, settings.workers)
        except OSError as exc:
            typer.echo(
                f"error: cannot listen on {settings.host} port {settings.port}: {exc}", err=True
            )
            raise typer.Exit(1) from None
        port = socks[0].getsockname()[1]  # the one the system chose for port 0
        url = f"http://{_url_host(settings.host)}:{port}"
        workers = f", {settings.workers} worker processes" if settings.workers > 1 else ""
        typer.echo(
            f"lookalike: serving {what} ({items} images{workers}) at {url}  (API docs: {url}/docs)"
        )
        if settings.workers == 1:
            with socks[0]:
                serve_engine(settings, engine, socks[0])
            return
    finally:
        engine.close()
    # Each worker opens the catalog again (checked, and upgraded if it needed it, above).
    status = serve_workers(settings, socks)
    if status:
        raise typer.Exit(status)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def main() -> None:
    """Entry point: run a command, translating domain errors into a message and exit code 2."""
    try:
        app()
    except LookalikeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
