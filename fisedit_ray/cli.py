"""The `fisedit` command line: generate, edit, demo, train, serve (the entry layer: `serve` is the one
command that reaches into `fisedit_ray.deployments`, and only when it runs)."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

# Only light modules here: `fisedit --help` and argument errors answer without torch, diffusers or
# the engine, which the commands that run a model import when they run.
from fisedit_ray.prompts import SCENES_GRAMMAR, check_not_empty

if TYPE_CHECKING:
    import torch

    from fisedit_ray.engine import EditEngine, Version

# Defaults written out, not imported from the modules that define them (those load torch); tests check
# that they agree: fisedit_ray.models.DEFAULT_MODEL and CaptureConfig.dense_steps.
DEFAULT_MODEL = "scenes"
DEFAULT_DENSE_STEPS = 1

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=f"Sparse text-to-image editing (FISEdit).\n\n{SCENES_GRAMMAR}",
)

DEMO_PROMPT = "a red circle at the top left"
DEMO_EDIT = "a red circle at the top left and a blue square at the center"

SessionOpt = Annotated[Path, typer.Option("--session", "-s", help="Session folder.")]
ModelOpt = Annotated[
    str, typer.Option(help="'scenes' (embedded, trained), 'tiny' (untrained), or a diffusers SD folder.")
]
DeviceOpt = Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")]
CacheDtypeOpt = Annotated[str, typer.Option(help="Cache storage: float32, bfloat16, float16 or int8.")]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="Run sparse steps as compiled programs: faster per step, but each new bucket of mask "
        "sizes first compiles (about a minute for the scenes model on 2 cores); pays off over many edits.",
    ),
]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def _command_with_grammar(command: Callable) -> Callable:
    """Register a command that reads a prompt: its help is its docstring, then the prompt grammar."""
    return app.command(help=f"{inspect.cleandoc(command.__doc__ or '')}\n\n{SCENES_GRAMMAR}")(command)


def _require_prompt(prompt: str) -> None:
    """The engine's empty-prompt error, before loading a model."""
    try:
        check_not_empty(prompt)
    except ValueError as e:
        raise _fail(str(e)) from e


def _check_and_warn(engine: EditEngine, prompt: str) -> None:
    """Refuse a prompt the model cannot read whole; print what it may misread (before a run, so that
    a wrong prompt can be stopped early)."""
    try:
        engine.check_prompt(prompt)
        warnings = engine.prompt_warnings(prompt)
    except ValueError as e:
        raise _fail(str(e)) from e
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)


def _engine(model: str, device: str, cache_dtype: str | torch.dtype, compile: bool = False) -> EditEngine:
    from fisedit_ray.cache import parse_dtype
    from fisedit_ray.engine import EditEngine

    try:
        return EditEngine.from_pretrained(
            model, device=device, cache_dtype=parse_dtype(cache_dtype), compile=compile
        )
    except (OSError, ValueError) as e:
        raise _fail(f"cannot load model {model!r}: {e}") from e


@contextmanager
def _progress_bars(steps: bool = True) -> Iterator[Callable[[str], Callable[[float, float], None]]]:
    """Progress bars on stderr: yields a function that adds one (by its description) and returns
    the callback that moves it, `(done, total)`. `steps`: show "done/total", else the time left.
    Drawn only where stderr is an interactive terminal, and removed when done, so stdout carries the
    results alone; lines printed to a terminal's stdout meanwhile appear above the bars."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    count = (
        (MofNCompleteColumn(), TimeElapsedColumn())
        if steps
        else (TaskProgressColumn(), TimeRemainingColumn())
    )
    console = Console(stderr=True)
    with RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        *count,
        console=console,
        # Rich would draw nothing elsewhere either, but end with an empty line on stderr
        disable=not console.is_interactive,
        transient=True,
        redirect_stdout=sys.stdout.isatty(),  # else stdout lines would go to stderr's console
        redirect_stderr=False,
    ) as bars:

        def add(description: str) -> Callable[[float, float], None]:
            task = bars.add_task(description, total=None)
            return lambda done, total: bars.update(task, completed=done, total=total)

        yield add


def _seconds(stats: dict) -> str:
    text = " ".join(f"{k}={v:.3f}s" for k, v in stats["seconds"].items())
    compiling = stats.get("compile_seconds", 0.0)
    return text + (f" (of which compiling a new step program {compiling:.1f}s)" if compiling else "")


def report(rows: list[tuple[str, Version]]) -> str:
    """A plain-text table of what each version cost."""
    header = f"{'version':<16}{'mask':>7}{'U-Net GMACs run':>17}{'of dense':>10}  seconds per phase"
    lines = [header, "-" * len(header)]
    for name, v in rows:
        s = v.stats
        ratio = s.get("mask_ratio")
        mask = f"{ratio:7.1%}" if ratio is not None else f"{'-':>7}"
        share = s["macs_executed"] / s["macs_dense"] if s["macs_dense"] else 0.0
        gmacs = s["macs_executed"] / 1e9
        lines.append(f"{name:<16}{mask}{gmacs:17.3f}{share:10.1%}  {_seconds(s)}")
    return "\n".join(lines)


@_command_with_grammar
def generate(
    prompt: str,
    session: SessionOpt,
    model: ModelOpt = DEFAULT_MODEL,
    seed: int = 0,
    steps: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    guidance: Annotated[float, typer.Option(min=0.0, max=50.0)] = 7.5,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    cache_dtype: CacheDtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Generate an image and start a session folder with it (and its activation cache)."""
    from fisedit_ray.session import Session

    _require_prompt(prompt)
    if Session.exists(session):
        raise _fail(f"{session} already holds a session; edit it or choose another folder")
    engine = _engine(model, device, cache_dtype)
    _check_and_warn(engine, prompt)
    try:
        with _progress_bars() as progress_bar:
            version = engine.generate(
                prompt,
                seed=seed,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=height,
                width=width,
                negative_prompt=negative_prompt,
                progress=progress_bar("generating"),
            )
    except ValueError as e:
        raise _fail(str(e)) from e
    folder = Session.create(session, model).add(version, engine.vae_scale)
    typer.echo(f"{version.id}: {folder / 'image.png'}")
    typer.echo(report([(version.id, version)]))


@_command_with_grammar
def edit(
    prompt: str,
    session: SessionOpt,
    mask: Annotated[
        Path | None,
        typer.Option(help="PNG mask at image or latent size; white = edit. Default: found automatically."),
    ] = None,
    parent: Annotated[str | None, typer.Option(help="Version to edit (default: the latest).")] = None,
    mode: Annotated[str, typer.Option(help="sparse, reference or dense.")] = "sparse",
    dense_steps: Annotated[
        int, typer.Option(min=1, help="Dense steps before an automatic mask exists (k).")
    ] = DEFAULT_DENSE_STEPS,
    combine: Annotated[
        str, typer.Option(help="With --mask: replace (the mask wins), union or intersect with the found one.")
    ] = "replace",
    device: DeviceOpt = "cpu",
) -> None:
    """Edit a version of a session with a new prompt, inside a mask or the region the prompt change
    affects. Writes the image, the mask and an overlay of the mask on the parent's image."""
    from PIL import Image, UnidentifiedImageError

    from fisedit_ray.capture import CaptureConfig
    from fisedit_ray.session import Session, SessionError

    _require_prompt(prompt)
    try:
        store = Session.open(session)
        base = store.get(parent) if parent else store.latest
        capture = CaptureConfig(dense_steps=dense_steps, combine=combine)
    except (SessionError, ValueError) as e:
        raise _fail(str(e)) from e
    mask_png = None
    if mask is not None:
        try:
            mask_png = Image.open(mask)
        except (OSError, UnidentifiedImageError) as e:
            raise _fail(f"cannot read mask {mask}: {e}") from e
    engine = _engine(store.model, device, base.cache.storage_dtype)
    _check_and_warn(engine, prompt)
    try:
        with _progress_bars() as progress_bar:
            version = engine.edit(
                base, prompt, mask=mask_png, mode=mode, capture=capture, progress=progress_bar("editing")
            )
    except ValueError as e:
        raise _fail(str(e)) from e
    folder = store.add(version, engine.vae_scale)
    typer.echo(f"{version.id} (edit of {base.id}): {folder / 'image.png'}")
    source = version.stats["mask_source"]
    typer.echo(f"mask ({source}): {folder / 'mask.png'}, overlay: {folder / 'overlay.png'}")
    typer.echo(report([(version.id, version)]))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where to write the images.")] = Path("out/demo"),
    model: ModelOpt = DEFAULT_MODEL,
    steps: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    size: Annotated[int, typer.Option(help="Image height and width in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the original; the shipped model draws it at 2.")] = 2,
    device: DeviceOpt = "cpu",
    compile: CompileOpt = False,
) -> None:
    """Generate, edit with a mask found from the prompt change (sparse) and regenerate (dense),
    write the images, the mask and a table."""
    from fisedit_ray.figures import labeled_grid
    from fisedit_ray.masks import mask_image, overlay

    engine = _engine(model, device, "float32", compile)
    out.mkdir(parents=True, exist_ok=True)
    with _progress_bars() as progress_bar:
        base = engine.generate(
            DEMO_PROMPT,
            seed=seed,
            num_inference_steps=steps,
            height=size,
            width=size,
            progress=progress_bar("generating"),
        )
        sparse = engine.edit(base, DEMO_EDIT, mode="sparse", progress=progress_bar("editing (sparse)"))
        dense = engine.edit(base, DEMO_EDIT, mode="dense", progress=progress_bar("regenerating (dense)"))
    base.image.save(out / "original.png")
    sparse.image.save(out / "edit_sparse.png")
    dense.image.save(out / "edit_dense.png")
    mask_image(sparse.mask, engine.vae_scale).save(out / "mask.png")
    overlay(base.image, sparse.mask, engine.vae_scale).save(out / "mask_overlay.png")
    tiles = [
        (base.image, f"original: {DEMO_PROMPT}"),
        (overlay(base.image, sparse.mask, engine.vae_scale), "mask found from the prompt change"),
        (sparse.image, f"sparse edit: {DEMO_EDIT}"),
        (dense.image, "dense regeneration, same seed"),
    ]
    labeled_grid(tiles, columns=4, scale=max(1, 192 // size), label_lines=4).save(out / "demo.png")
    typer.echo(f"original: {DEMO_PROMPT!r}\nedit:     {DEMO_EDIT!r}\nimages in {out}/")
    typer.echo(report([("generate", base), ("edit sparse", sparse), ("edit dense", dense)]))


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Output folder; rerun with the same folder to resume.")] = Path(
        "out/train-scenes"
    ),
    minutes: Annotated[float, typer.Option(help="Wall-clock budget of the U-Net stage.")] = 100.0,
    vae_steps: Annotated[int, typer.Option(help="Autoencoder training steps.")] = 800,
    batch_size: int = 32,
    lr: float = 1e-3,
    object_weights: Annotated[
        tuple[float, float, float, float],
        typer.Option(help="Relative frequency of scenes with 0, 1, 2 and 3 objects."),
    ] = (1.0, 1.0, 1.0, 1.0),
    init: Annotated[
        Path | None, typer.Option(help="A model folder to fine-tune instead of starting from scratch.")
    ] = None,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto (a GPU when there is one), cpu or cuda.")] = "auto",
    precision: Annotated[
        str, typer.Option(help="auto (bf16 autocast on a GPU or a CPU with native bf16), bf16 or fp32.")
    ] = "auto",
) -> None:
    """Train the scenes model from scratch, or fine-tune one with --init (see fisedit_ray.train)."""
    from fisedit_ray.train import TrainConfig
    from fisedit_ray.train import train as run_training

    config = TrainConfig(
        out=str(out),
        minutes=minutes,
        vae_steps=vae_steps,
        batch_size=batch_size,
        lr=lr,
        object_weights=object_weights,
        init=str(init) if init else None,
        seed=seed,
        device=device,
        precision=precision,
    )
    with _progress_bars(steps=False) as progress_bar:
        bars: dict[str, Callable[[float, float], None]] = {}

        def progress(stage: str, done: float, total: float) -> None:
            if stage not in bars:
                bars[stage] = progress_bar(stage)
            bars[stage](done, total)

        run_training(config, log=lambda line: typer.echo(line), progress=progress)


@app.command()
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: int = 8000,
    editor_replicas: Annotated[int, typer.Option(min=1, help="Editor replicas (engines).")] = 1,
    editor_cpus: Annotated[float, typer.Option(help="CPUs reserved per editor replica.")] = 1.0,
    cache_dtype: Annotated[str | None, typer.Option(help="Cache storage format (model dtype).")] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Folder of the session database and blobs "
            "[default: $FISEDIT_DATA, else ~/.local/share/fisedit-ray]."
        ),
    ] = None,
    metrics_port: Annotated[int, typer.Option(help="Port where Prometheus scrapes the metrics.")] = 8080,
) -> None:
    """Start a local Ray and serve the editing API on it (see README, "The service")."""
    try:
        from fisedit_ray.deployments.app import default_data_dir
        from fisedit_ray.deployments.launch import serve_locally
    except ImportError as e:
        raise _fail(f"the service needs the serve extra: pip install 'fisedit-ray[serve]' ({e})") from e
    serve_locally(
        data=(data or default_data_dir()).expanduser().absolute(),
        metrics_port=metrics_port,
        model=model,
        host=host,
        port=port,
        editor_replicas=editor_replicas,
        editor_cpus=editor_cpus,
        cache_dtype=cache_dtype,
    )


@app.command()
def batch(
    input_path: Annotated[
        Path, typer.Argument(help="Parquet file or folder: one row per image and its edits.")
    ],
    output: Annotated[Path, typer.Argument(help="Output folder: versions/ and errors/ Parquet parts.")],
    model: ModelOpt = DEFAULT_MODEL,
    address: Annotated[
        str | None,
        typer.Option(help="A Ray cluster to run on (ray.init(address=...)); default: a local Ray."),
    ] = None,
    generators: Annotated[int, typer.Option(min=1, help="Generation actors.")] = 1,
    editors: Annotated[int, typer.Option(min=1, help="Editing actors.")] = 1,
    cpus_per_actor: Annotated[float, typer.Option(help="CPUs per actor (torch threads).")] = 1.0,
    gpus_per_actor: Annotated[float, typer.Option(help="GPUs per actor.")] = 0.0,
    dense: Annotated[bool, typer.Option(help="Regenerate every edit densely (the baseline).")] = False,
    cache_dtype: Annotated[str | None, typer.Option(help="Cache storage format (model dtype).")] = None,
) -> None:
    """Edit at volume on Ray Data; a rerun on the same output resumes (see README, "Batch editing")."""
    try:
        import ray

        from fisedit_ray.deployments.batch import run_batch
    except ImportError as e:
        raise _fail(f"batch jobs need the serve extra: pip install 'fisedit-ray[serve]' ({e})") from e
    if not input_path.exists():
        raise _fail(f"no input at {input_path}")
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        with _progress_bars() as progress_bar:
            summary = run_batch(
                str(input_path),
                output,
                model=model,
                mode="dense" if dense else None,
                generators=generators,
                editors=editors,
                cpus_per_actor=cpus_per_actor,
                gpus_per_actor=gpus_per_actor,
                cache_dtype=cache_dtype,
                progress=progress_bar("images"),
            )
    except ValueError as e:
        raise _fail(str(e)) from e
    finally:
        ray.shutdown()
    typer.echo(
        f"{summary.images} images written ({summary.versions} versions, {summary.errors} refused), "
        f"{summary.skipped} already there, in {summary.seconds:.1f} s -> {output}"
    )


if __name__ == "__main__":
    app()
