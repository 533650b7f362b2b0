"""The command line: parse arguments, call one library function, print.

The one place that turns errors into messages and exit codes: 2 for bad input,
1 for a render, storage or broker failure.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from gridrender.scheduler.errors import GridrenderError, InputError, Problem

if TYPE_CHECKING:  # for annotations only: commands import these where they run, so the CLI starts quickly
    from rich.progress import Progress, Task

    from gridrender.scheduler.status import Status
    from gridrender.scheduler.storage import Store

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Render Stable Diffusion grids as batch jobs.")
# Every message prints literally: prompts and paths hold `[worst quality]`, `[/x]` or `:cow:`, which
# Rich would read as markup (eating the text, or raising MarkupError) or emoji codes. Colour is styled.
out = Console(soft_wrap=True, markup=False, emoji=False, highlight=False)
err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False, highlight=False)

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
OUTPUT_OPTION = typer.Option(None, "--output", help="Output root (default: the job's `output`, $GRIDRENDER_OUTPUT or ./renders).")
F = TypeVar("F", bound=Callable[..., Any])


def fail(exc: GridrenderError) -> typer.Exit:
    """The error's message on stderr; the exit to raise: 2 for bad input, else 1."""
    for line in str(exc).splitlines():
        err.print(Text.assemble(("error", "red"), f": {line}"))
    return typer.Exit(EXIT_BAD_INPUT if isinstance(exc, InputError) else EXIT_FAILED)


def exits(command: F) -> F:
    """Run a command; a GridrenderError ends it through `fail`."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except GridrenderError as exc:
            raise fail(exc) from None

    return run  # type: ignore[return-value]


def say(text: str) -> None:
    out.print(text)


def warn(lines: Iterable[str | Problem]) -> None:
    for line in lines:
        err.print(Text.assemble(("warning", "yellow"), f": {line}"))


def show_failures(failed: dict[str, str], total: int) -> None:
    for cell_id, reason in list(failed.items())[:10]:
        err.print(f"failed {cell_id}: {reason}")
    if total > len(failed):
        err.print(f"... {total:,} failed cells in all")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what workers and loaders do.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
@exits
def validate(job: Path = typer.Argument(..., help="The job file.")) -> None:
    """Parse and expand a job file; print its axes, prompt token counts and grid size. Exit 2 on error."""
    from gridrender.scheduler.plan import describe, prepare

    plan = prepare(job, cuda=None)
    warn(plan.warnings)
    say("\n".join(describe(plan)))


@app.command()
@exits
def run(job: Path = typer.Argument(..., help="The job file."), output: str | None = OUTPUT_OPTION) -> None:
    """Render every missing cell in this process (no broker), then finalize."""
    from gridrender.workers import local

    started, renderer = local.start(job, output)
    warn(started.plan.warnings)
    name, total = started.plan.job.name, started.plan.total
    if started.todo:
        say(f"{name}: rendering {started.todo:,} of {total:,} cells into {started.store.root}")
        with progress_bar() as bar:
            task = bar.add_task(name, total=started.todo)
            result = local.finish(started, renderer, on_batch=lambda n: bar.advance(task, n))
    else:
        say(f"{name}: all {total:,} cells are already in {started.store.root}; nothing to render")
        result = local.finish(started, renderer)
    done = result.finalized
    if result.interrupted:
        err.print(f"interrupted: {done.done:,}/{done.total:,} cells stored; run again to render the rest")
        raise typer.Exit(EXIT_INTERRUPTED)
    say(f"{name}: {result.chunk.rendered:,} rendered, {done.done:,}/{done.total:,} cells done")
    if result.chunk.failed:
        show_failures(result.chunk.failed, len(result.chunk.failed))
        raise typer.Exit(EXIT_FAILED)


@app.command("finalize")
@exits
def finalize_cmd(name: str = typer.Argument(..., help="Job name (or job file)."), output: str | None = OUTPUT_OPTION) -> None:
    """Write the manifest (and sheets, gallery) from what storage holds."""
    from gridrender.scheduler import finalize
    from gridrender.scheduler.locate import locate

    store, job_name = locate(name, output)
    done = finalize.finalize(store, job_name)
    say(f"{job_name}: {done.done:,}/{done.total:,} cells done; manifest, {done.sheets} sheets and index.html written")
    if done.note:
        warn([done.note])


def status_line(st: Status) -> str:
    rate = f"{st.rate:.2f} cells/s" if st.rate else "rate unknown"
    eta = f"ETA {st.eta / 60:.1f} min" if st.eta else "ETA unknown"
    return f"{st.name}: {st.done:,}/{st.total:,} done, {st.failed:,} failed, {st.pending:,} pending, {rate}, {eta}" + (
        ", cancelled" if st.cancelled else ""
    )


@app.command()
@exits
def status(
    name: str = typer.Argument(..., help="Job name (or job file)."),
    output: str | None = OUTPUT_OPTION,
    watch: bool = typer.Option(False, "--watch", help="Refresh until the job is done."),
) -> None:
    """Done / total, failures, rate and ETA. Exit 1 when cells failed."""
    from gridrender.scheduler.locate import locate
    from gridrender.scheduler.status import Polling, follow, job_status

    store, job_name = locate(name, output)
    if watch:
        st = follow(store, job_name, lambda s: say(status_line(s)), Polling(interval=5.0, max_interval=30.0))
    else:
        st = job_status(store, job_name)
        say(status_line(st))
    for chunk in st.poisoned:
        err.print(f"poisoned chunk {chunk.chunk}: {chunk.failed:,} cells failed: {chunk.error}", markup=False, highlight=False)
    if st.failed:
        show_failures(st.failures, st.failed)
        raise typer.Exit(EXIT_FAILED)


@app.command()
@exits
def retry(name: str = typer.Argument(..., help="Job name (or job file)."), output: str | None = OUTPUT_OPTION) -> None:
    """Send the chunks that killed workers (poisoned) again, their kill counts cleared."""
    from gridrender.scheduler.broker import shared_app
    from gridrender.scheduler.locate import locate
    from gridrender.scheduler.submit import retry_poisoned

    store, job_name = locate(name, output)
    sent = retry_poisoned(store, job_name, shared_app())
    if not sent.chunks:
        say(f"{job_name}: no poisoned chunk to retry")
    else:
        say(f"{job_name}: {sent.chunks:,} poisoned chunk(s) sent again ({sent.cells:,} cells)")


@app.command()
@exits
def submit(
    job: Path = typer.Argument(..., help="The job file."),
    wait: bool = typer.Option(False, "--wait", help="Show progress until every cell is stored, then finalize."),
    queue: str | None = typer.Option(
        None, "--queue", help="Queue to send to (default: the model's queue if a worker listens, else the shared one)."
    ),
    output: str | None = OUTPUT_OPTION,
    idle_timeout: float = typer.Option(
        600.0, "--idle-timeout", help="With --wait: fail when no worker took a chunk for this many seconds."
    ),
) -> None:
    """Fan the job's missing cells out to workers through the broker."""
    from gridrender.scheduler.broker import shared_app
    from gridrender.scheduler.plan import check_output, prepare
    from gridrender.scheduler.rates import from_broker
    from gridrender.scheduler.settings import Settings
    from gridrender.scheduler.submit import submit as fan_out

    plan = prepare(job, cuda=None, output=output, rate_of=from_broker(Settings()))  # chunks sized by workers' rate
    store = check_output(plan)
    warn(plan.warnings)
    sent = fan_out(plan, store, shared_app(), queue)
    say(
        f"{plan.job.name}: {sent.cells:,} cells in {sent.chunks:,} chunks on queue {sent.queue} "
        f"({sent.already_done:,} of {sent.total:,} already stored)"
    )
    for idle in sent.idle_queues if sent.cells else []:
        warn(
            [
                f"no worker consumes queue {idle} right now; start one with: gridrender worker"
                + (f" -Q {idle}" if idle != "gridrender" else "")
            ]
        )
    if wait:
        wait_for(store, plan.job.name, idle_timeout)


def wait_for(store: Store, name: str, idle_timeout: float) -> None:
    from gridrender.scheduler import finalize
    from gridrender.scheduler.status import wait

    with progress_bar() as bar:
        task = bar.add_task(name, total=None)
        final = wait(store, name, idle_timeout, on_update=lambda st: bar.update(task, total=st.total, completed=st.done))
    done = finalize.finalize(store, name)
    say(f"{name}: {done.done:,}/{done.total:,} cells done; finalized")
    if final.failed:
        show_failures(final.failures, final.failed)
        raise typer.Exit(EXIT_FAILED)
    if final.cancelled and final.pending:
        err.print(f"{name} was cancelled with {final.pending:,} cells not rendered")
        raise typer.Exit(EXIT_FAILED)


@app.command()
def worker(  # noqa: PLR0913, PLR0917  (typer: the parameters are the command's options)
    queues: str | None = typer.Option(
        None,
        "-Q",
        "--queues",
        help="Comma-separated queues to consume (default: the shared queue, plus the model's with --model).",
    ),
    model: str | None = typer.Option(None, "--model", help="Load this model before taking tasks and consume its queue too."),
    preload: str | None = typer.Option(None, "--preload", hidden=True),
    gpus: str | None = typer.Option(None, "--gpus", help="Start one worker process per GPU, e.g. 0,1,2,3."),
    warmup: list[str] | None = typer.Option(
        None,
        "--warmup",
        help="With --model: compile for WxH:B (e.g. 512x512:8) before taking tasks; repeat it for more shapes "
        "(SDXL: 1024x1024:4 --warmup 832x1216:4).",
    ),
    no_compile: bool = typer.Option(False, "--no-compile", help="Run the UNet and VAE eager (default: compiled on CUDA)."),
    loglevel: str = typer.Option("INFO", "--loglevel"),
) -> None:
    """A Celery worker (solo pool) that keeps its pipeline resident, compiled on CUDA."""
    from gridrender.scheduler.settings import Settings
    from gridrender.workers.worker import Options, parse_warmup, queues_for
    from gridrender.workers.worker import run as run_worker

    if warmup and not (model or preload):
        raise fail(InputError("--warmup needs --model: the model to compile"))
    names = exits(queues_for)([q for q in (queues or "").split(",") if q], model, Settings())
    shapes = tuple(exits(parse_warmup)(text) for text in warmup or ())
    options = Options(loglevel.upper(), model or preload, shapes, not no_compile)
    raise typer.Exit(run_worker(names, gpus.split(",") if gpus else None, options))


@app.command()
@exits
def cancel(name: str = typer.Argument(..., help="Job name (or job file)."), output: str | None = OUTPUT_OPTION) -> None:
    """Drop every submission's pending chunks; chunks already running finish."""
    from gridrender.scheduler.ledger import Ledger
    from gridrender.scheduler.locate import locate

    store, job_name = locate(name, output)
    ledger = Ledger(store, job_name)
    cancelled = ledger.cancel_all()
    if not ledger.ids():
        say(f"{job_name} was never submitted to workers; nothing to cancel")
    else:
        say(f"{job_name}: {len(cancelled)} submission(s) cancelled; workers drop their pending chunks")


@app.command()
@exits
def export(
    name: str = typer.Argument(..., help="Job name (or job file)."),
    dest: Path = typer.Argument(..., help="A new folder to write the dataset into."),
    fmt: str = typer.Option(..., "--format", help="imagefolder (Hugging Face datasets) or webdataset (tar shards)."),
    output: str | None = OUTPUT_OPTION,
) -> None:
    """Export the job's rendered cells as a dataset that training code loads."""
    from gridrender.scheduler.export import export as write_dataset
    from gridrender.scheduler.locate import locate

    store, job_name = locate(name, output)
    count = write_dataset(store, job_name, fmt, dest)
    say(f"{job_name}: {count:,} cells exported to {dest} ({fmt})")


@app.command("import")
@exits
def import_cmd(
    images: list[Path] = typer.Argument(..., help="A1111, Forge or civitai images (PNG; JPEG/WebP with EXIF)."),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="Job file to write (several images: one file each, named after the image); default: print."
    ),
) -> None:
    """Write the job file that renders each image again from its generation parameters."""
    from gridrender.scheduler.importer import import_images

    jobs = list(import_images(images))
    for imported in jobs:
        warn(f"{imported.name}: {key} ({value}) is not rendered by gridrender" for key, value in imported.unsupported.items())
    if output is None:
        say("---\n".join(imported.yaml() for imported in jobs))
        return
    for imported in jobs:
        path = output if len(jobs) == 1 else output.with_name(f"{output.stem}-{imported.name}{output.suffix}")
        path.write_text(imported.yaml(), encoding="utf-8")
        say(f"wrote {path}")


@app.command()
@exits
def reproduce(record: str = typer.Argument(..., help="A cell record: cells/<id>.json, a path or an s3:// URL.")) -> None:
    """Render a cell again from its record alone and compare with the stored image."""
    from gridrender.workers.reproduce import TOLERANCE
    from gridrender.workers.reproduce import reproduce as render_again

    result = render_again(record)
    psnr = "inf" if result.psnr == float("inf") else f"{result.psnr:.2f}"
    verdict = "reproduced" if result.ok else f"DIFFERENT (tolerance {TOLERANCE}/255)"
    say(
        f"{result.cell_id}: max pixel difference {result.max_diff}/255, PSNR {psnr} dB "
        f"(UNet {'eager' if result.compile_mode == 'eager' else 'compiled, mode ' + result.compile_mode}): {verdict}"
    )
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)


def progress_bar() -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn

    class CellRate(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed:.2f} cells/s" if task.speed else "-- cells/s")

    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        CellRate(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
