"""The command line: the one place that turns errors into messages and exit codes."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from gridrender.scheduler.errors import GridrenderError, InputError
from gridrender.scheduler.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Render Stable Diffusion grids as batch jobs.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
OUTPUT_OPTION = typer.Option(None, "--output", help="Output root (default $GRIDRENDER_OUTPUT or ./renders).")


def _fail(exc: GridrenderError) -> "typer.Exit":
    for line in str(exc).splitlines():
        err.print(f"[red]error[/red]: {line}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_BAD_INPUT if isinstance(exc, InputError) else EXIT_FAILED)


def _warn(lines) -> None:
    for line in lines:
        err.print(f"[yellow]warning[/yellow]: {line}", highlight=False, soft_wrap=True)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what workers and loaders do.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def validate(job: Path = typer.Argument(..., help="The job file.")) -> None:
    """Parse and expand a job file; print its axes and grid size. Exit 2 on error."""
    from gridrender.scheduler.plan import prepare

    try:
        plan = prepare(job, cuda=None)
    except GridrenderError as exc:
        raise _fail(exc)
    _warn(plan.warnings)
    out.print(f"job [bold]{plan.job.name}[/bold]: {len(plan.cells):,} cells, model {plan.model.source} "
              f"({plan.model.clip_layers} CLIP layers), output {plan.job.output}", highlight=False)
    for axis, values in plan.job.axes().items():
        shown = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in values[:8])
        more = f", … ({len(values):,} in all)" if len(values) > 8 else ""
        kind = "varies" if len(values) > 1 else "locked"
        out.print(f"  {axis:<16} {kind:<7} {shown}{more}", highlight=False)


@app.command()
def run(job: Path = typer.Argument(..., help="The job file.")) -> None:
    """Render every missing cell in this process (no broker), then finalize."""
    from gridrender.scheduler import finalize
    from gridrender.scheduler.plan import check_output, prepare

    try:
        import torch

        plan = prepare(job, cuda=torch.cuda.is_available())
        store = check_output(plan)
    except GridrenderError as exc:
        raise _fail(exc)
    _warn(plan.warnings)
    from gridrender.workers.local import run_plan

    missing = len(plan.missing(store))
    total = len(plan.cells)
    finalize.write_job(store, plan)
    if not missing:
        out.print(f"{plan.job.name}: all {total:,} cells are already in {store.root}; nothing to render")
        finalize.finalize(store, plan.job.name)
        return
    out.print(f"{plan.job.name}: rendering {missing:,} of {total:,} cells into {store.root}", highlight=False)
    try:
        with _progress() as bar:
            task = bar.add_task(plan.job.name, total=missing)
            result = run_plan(plan, store, on_batch=lambda n: bar.advance(task, n))
    except KeyboardInterrupt:
        done = finalize.finalize(store, plan.job.name)
        err.print(f"interrupted: {done.done:,}/{done.total:,} cells stored; run again to render the rest")
        raise typer.Exit(130)
    except GridrenderError as exc:
        raise _fail(exc)
    done = finalize.finalize(store, plan.job.name)
    out.print(f"{plan.job.name}: {result.rendered:,} rendered, {done.done:,}/{done.total:,} cells done", highlight=False)
    if result.failed:
        _show_failures(result.failed)
        raise typer.Exit(EXIT_FAILED)


@app.command("finalize")
def finalize_cmd(
    name: str = typer.Argument(..., help="Job name (or job file)."),
    output: Optional[str] = OUTPUT_OPTION,
) -> None:
    """Write the manifest (and sheets, gallery) from what storage holds."""
    from gridrender.scheduler import finalize

    try:
        store, job_name = _locate(name, output)
        done = finalize.finalize(store, job_name)
    except GridrenderError as exc:
        raise _fail(exc)
    out.print(f"{job_name}: {done.done:,}/{done.total:,} cells done; manifest, {done.sheets} sheets and index.html written", highlight=False)
    if done.note:
        _warn([done.note])


@app.command()
def status(
    name: str = typer.Argument(..., help="Job name (or job file)."),
    output: Optional[str] = OUTPUT_OPTION,
    watch: bool = typer.Option(False, "--watch", help="Refresh every few seconds until the job is done."),
) -> None:
    """Done / total, failures, rate and ETA."""
    import time

    from gridrender.scheduler.status import job_status

    try:
        store, job_name = _locate(name, output)
        while True:
            st = job_status(store, job_name)
            rate = f"{st.rate:.2f} cells/s" if st.rate else "rate unknown"
            eta = f"ETA {st.eta / 60:.1f} min" if st.eta else "ETA unknown"
            extra = ", cancelled" if st.cancelled else ""
            out.print(f"{job_name}: {st.done:,}/{st.total:,} done, {len(st.failed):,} failed, "
                      f"{st.missing - len(st.failed):,} pending, {rate}, {eta}{extra}", highlight=False)
            if not watch or st.done + len(st.failed) >= st.total or st.cancelled:
                break
            time.sleep(5)
    except GridrenderError as exc:
        raise _fail(exc)
    if st.failed:
        _show_failures(st.failed)


@app.command()
def submit(
    job: Path = typer.Argument(..., help="The job file."),
    wait: bool = typer.Option(False, "--wait", help="Show progress until every cell is stored, then finalize."),
    queue: Optional[str] = typer.Option(None, "--queue", help="Queue to send to (default: the model's own queue)."),
) -> None:
    """Fan the job's missing cells out to workers through the broker."""
    from gridrender.scheduler.broker import shared_app
    from gridrender.scheduler.plan import check_output, prepare
    from gridrender.scheduler.submit import submit as fan_out

    try:
        plan = prepare(job, cuda=None)
        store = check_output(plan)
        _warn(plan.warnings)
        sent = fan_out(plan, store, shared_app(), queue)
    except GridrenderError as exc:
        raise _fail(exc)
    except Exception as exc:  # broker unreachable and the like
        err.print(f"[red]error[/red]: cannot enqueue: {_redact(str(exc))}")
        raise typer.Exit(EXIT_FAILED)
    out.print(
        f"{plan.job.name}: {sent.cells:,} cells in {sent.chunks:,} chunks on queue {sent.queue} "
        f"({sent.already_done:,} of {len(plan.cells):,} already stored)",
        highlight=False,
    )
    if sent.cells:
        out.print(f"start workers with: gridrender worker -Q {sent.queue}", highlight=False)
    if wait:
        _wait(store, plan.job.name)


def _wait(store, name: str, interval: float = 1.0) -> None:
    import time

    from gridrender.scheduler import finalize
    from gridrender.scheduler.status import job_status

    status = job_status(store, name)
    with _progress() as bar:
        task = bar.add_task(name, total=status.total, completed=status.done)
        while status.done + len(status.failed) < status.total and not status.cancelled:
            time.sleep(interval)
            status = job_status(store, name)
            bar.update(task, completed=status.done)
    done = finalize.finalize(store, name)
    out.print(f"{name}: {done.done:,}/{done.total:,} cells done; finalized", highlight=False)
    if status.failed:
        _show_failures(status.failed)
        raise typer.Exit(EXIT_FAILED)


def _show_failures(failed: dict) -> None:
    for cell_id, reason in list(failed.items())[:10]:
        err.print(f"failed {cell_id}: {reason}", highlight=False)
    if len(failed) > 10:
        err.print(f"... and {len(failed) - 10:,} more", highlight=False)


@app.command()
def worker(
    queues: Optional[str] = typer.Option(None, "-Q", "--queues", help="Comma-separated queues to consume (default: gridrender)."),
    model: Optional[str] = typer.Option(None, "--model", help="Consume this model's queue (as `submit` names it) and load it before taking tasks."),
    preload: Optional[str] = typer.Option(None, "--preload", hidden=True),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="Start one worker process per GPU, e.g. 0,1,2,3."),
    loglevel: str = typer.Option("INFO", "--loglevel"),
    compile_unet: bool = typer.Option(False, "--compile", help="torch.compile the UNet on CUDA (slow first call per shape)."),
) -> None:
    """A Celery worker (solo pool) that keeps its pipeline resident."""
    import os

    if compile_unet:
        os.environ["GRIDRENDER_COMPILE"] = "1"  # read where pipelines are loaded, here and in --gpus children
    from gridrender.scheduler.chunks import queue_for
    from gridrender.scheduler.models import resolve
    from gridrender.workers.worker import run as run_worker

    names = [q for q in (queues or "").split(",") if q]
    if model:
        try:
            names.append(queue_for(resolve(model)))
        except GridrenderError as exc:
            raise _fail(exc)
    raise typer.Exit(run_worker(names or ["gridrender"], gpus.split(",") if gpus else None, loglevel.upper(), model or preload))


@app.command()
def cancel(
    name: str = typer.Argument(..., help="Job name (or job file)."),
    output: Optional[str] = OUTPUT_OPTION,
) -> None:
    """Drop the job's pending chunks; chunks already running finish."""
    from gridrender.scheduler.submit import cancel as cancel_job

    try:
        store, job_name = _locate(name, output)
        cancelled = cancel_job(store, job_name)
    except GridrenderError as exc:
        raise _fail(exc)
    if cancelled is None:
        out.print(f"{job_name} was never submitted to workers; nothing to cancel")
    else:
        out.print(f"{job_name}: submission {cancelled} cancelled; workers drop its pending chunks")


@app.command()
def export(
    name: str = typer.Argument(..., help="Job name (or job file)."),
    dest: Path = typer.Argument(..., help="A new folder to write the dataset into."),
    fmt: str = typer.Option(..., "--format", help="imagefolder (Hugging Face datasets) or webdataset (tar shards)."),
    output: Optional[str] = OUTPUT_OPTION,
) -> None:
    """Export the job's rendered cells as a dataset that training code loads."""
    from gridrender.scheduler.export import export as write_dataset

    try:
        store, job_name = _locate(name, output)
        count = write_dataset(store, job_name, fmt, dest)
    except GridrenderError as exc:
        raise _fail(exc)
    out.print(f"{job_name}: {count:,} cells exported to {dest} ({fmt})", highlight=False)


@app.command()
def reproduce(record: str = typer.Argument(..., help="A cell record: cells/<id>.json, a path or an s3:// URL.")) -> None:
    """Render a cell again from its record alone and compare with the stored image."""
    from gridrender.workers.reproduce import TOLERANCE, reproduce as render_again

    try:
        result = render_again(record)
    except GridrenderError as exc:
        raise _fail(exc)
    psnr = "inf" if result.psnr == float("inf") else f"{result.psnr:.2f}"
    verdict = "reproduced" if result.ok else f"DIFFERENT (tolerance {TOLERANCE}/255)"
    out.print(f"{result.cell_id}: max pixel difference {result.max_diff}/255, PSNR {psnr} dB: {verdict}", highlight=False)
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)


def _redact(text: str) -> str:
    """Hide passwords in URLs (redis://:secret@host) before they reach a terminal or log."""
    import re

    return re.sub(r"(://[^:/@\s]*:)[^@\s]+@", r"\1***@", text)


def _locate(name: str, output: str | None):
    """(store, job name) for a NAME under the output root, or for a job file path."""
    from gridrender.scheduler.job import NAME_PATTERN, load_job
    from gridrender.scheduler.storage import NotFound, job_key, open_store
    import re

    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        job = load_job(name)
        store, job_name = open_store(output or job.output), job.name
    else:
        if not re.match(NAME_PATTERN, name):
            raise InputError(f"{name!r} is neither a job name nor a job file")
        store, job_name = open_store(output or Settings().output), name
    if not store.exists(job_key(job_name, "manifest.jsonl")):
        raise InputError(f"no job {job_name!r} under {store.root} (no jobs/{job_name}/manifest.jsonl)")
    return store, job_name


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class CellRate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.2f} cells/s" if task.speed else "-- cells/s")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        CellRate(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
