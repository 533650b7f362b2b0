"""The command line: the one place that turns errors into messages and exit codes."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from scheduler.errors import GridrenderError, InputError
from scheduler.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Render Stable Diffusion grids as batch jobs.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


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
    from scheduler.plan import prepare

    try:
        plan = prepare(job, cuda=None)
    except GridrenderError as exc:
        raise _fail(exc)
    _warn(plan.warnings)
    out.print(f"job [bold]{plan.job.name}[/bold]: {len(plan.cells):,} cells, model {plan.model.source} "
              f"({plan.model.clip_layers} CLIP layers), output {plan.job.output}", highlight=False)
    for axis, values in plan.axes().items():
        shown = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in values[:8])
        more = f", … ({len(values):,} in all)" if len(values) > 8 else ""
        kind = "varies" if len(values) > 1 else "locked"
        out.print(f"  {axis:<16} {kind:<7} {shown}{more}", highlight=False)


@app.command()
def run(job: Path = typer.Argument(..., help="The job file.")) -> None:
    """Render every missing cell in this process (no broker), then finalize."""
    from scheduler import finalize
    from scheduler.plan import check_output, prepare

    try:
        import torch

        plan = prepare(job, cuda=torch.cuda.is_available())
        store = check_output(plan)
    except GridrenderError as exc:
        raise _fail(exc)
    _warn(plan.warnings)
    from workers.local import run_plan

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
        for cell_id, reason in list(result.failed.items())[:10]:
            err.print(f"failed {cell_id}: {reason}", highlight=False)
        raise typer.Exit(EXIT_FAILED)


@app.command("finalize")
def finalize_cmd(
    name: str = typer.Argument(..., help="Job name (or job file)."),
    output: Optional[str] = typer.Option(None, "--output", help="Output root (default $GRIDRENDER_OUTPUT or ./renders)."),
) -> None:
    """Write the manifest (and sheets, gallery) from what storage holds."""
    from scheduler import finalize

    try:
        store, job_name = _locate(name, output)
        done = finalize.finalize(store, job_name)
    except GridrenderError as exc:
        raise _fail(exc)
    out.print(f"{job_name}: {done.done:,}/{done.total:,} cells done; manifest written", highlight=False)


@app.command()
def status(
    name: str = typer.Argument(..., help="Job name (or job file)."),
    output: Optional[str] = typer.Option(None, "--output", help="Output root (default $GRIDRENDER_OUTPUT or ./renders)."),
) -> None:
    """Cells done out of the job's total."""
    from scheduler import finalize

    try:
        store, job_name = _locate(name, output)
        done = finalize.progress(store, job_name)
    except GridrenderError as exc:
        raise _fail(exc)
    out.print(f"{job_name}: {done.done:,}/{done.total:,} done, {done.missing:,} missing", highlight=False)


def _locate(name: str, output: str | None):
    """(store, job name) for a NAME under the output root, or for a job file path."""
    from scheduler.job import NAME_PATTERN, load_job
    from scheduler.storage import NotFound, job_key, open_store
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
