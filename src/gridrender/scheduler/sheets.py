"""Labelled comparison sheets: rows x columns of cells, one sheet per page value.

Pillow only, with the font Pillow ships (no system fonts). Cells not rendered yet
show as placeholders, so a sheet made mid-job is partial, never wrong. Sheets above
a pixel cap are split into numbered parts.
"""

from __future__ import annotations

import io
import itertools
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from . import layout
from .job import SheetLayout
from .params import AXES
from .storage import NotFound, Store

DEFAULT_LAYOUT = SheetLayout().model_dump()
MIN_WIDTH = 640  # room for the header on sheets of small images
MAX_PIXELS = 40_000_000  # per sheet; A1111's X/Y/Z plot caps grids the same way

BACKGROUND, INK, MUTED, PLACEHOLDER = (255, 255, 255), (20, 20, 20), (110, 110, 110), (225, 225, 225)


def axis_label(line: dict[str, Any], axis: str) -> str:
    """How a cell's value on `axis` is written on sheets and in the gallery."""
    return AXES[axis].label(AXES[axis].value(line))


def axis_values(lines: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each axis with the labels of its distinct values, in manifest order."""
    return {axis: list(dict.fromkeys(axis_label(line, axis) for line in lines)) for axis in AXES}


def undeclared_axes(values: dict[str, list[str]], layout: dict[str, str]) -> list[str]:
    """Axes that vary although the layout does not place them (each value gets its own sheets)."""
    return [a for a, v in values.items() if len(v) > 1 and a not in layout.values()]


@dataclass
class Sheet:
    name: str  # file name under jobs/<job>/sheets/
    title: str
    png: bytes
    cells: int
    rendered: int


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Grid = dict[tuple[str, str], dict[str, Any]]  # (row label, column label) -> the cell's manifest line


def _font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Font, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split(" "):
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return [*lines, current] if current else lines


def _slug(value: object) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(value).lower()).strip("-")[:40] or "x"


@dataclass(frozen=True)
class _Frame:
    """What every sheet of a job shares: its axes, their labels, the values locked for all cells."""

    job_name: str
    rows_axis: str
    cols_axis: str
    rows: list[str]
    cols: list[str]
    locked: dict[str, str]
    max_pixels: int


@dataclass(frozen=True)
class _Page:
    """One page value's sheet, before it is split into parts under the pixel cap."""

    base: str  # file name stem
    title: str
    grid: Grid


def build_sheets(
    store: Store, job_name: str, lines: list[dict[str, Any]], layout: dict[str, str] | None = None, max_pixels: int = MAX_PIXELS
) -> list[Sheet]:
    layout = {**DEFAULT_LAYOUT, **(layout or {})}
    values = axis_values(lines)
    rows_axis, cols_axis, page_axis = layout["rows"], layout["cols"], layout["pages"]
    extra = undeclared_axes(values, layout)  # they split pages further
    # locked: axes with one value, except components the job does not use at all
    used = {a for a in values if lines and any(p in lines[0] for p in AXES[a].params)}
    locked = {a: v[0] for a, v in values.items() if len(v) == 1 and a not in (rows_axis, cols_axis) and a in used}
    frame = _Frame(job_name, rows_axis, cols_axis, values[rows_axis], values[cols_axis], locked, max_pixels)
    page_axes = [page_axis, *extra]
    pages: dict[tuple[str, ...], Grid] = {}
    for line in lines:
        page = tuple(axis_label(line, a) for a in page_axes)
        pages.setdefault(page, {})[(axis_label(line, rows_axis), axis_label(line, cols_axis))] = line

    sheets = []
    for page_index, combo in enumerate(itertools.product(*(values[a] for a in page_axes)), 1):
        fixed = dict(zip(page_axes, combo, strict=True))
        title = "  |  ".join(f"{a}: {v}" for a, v in fixed.items())
        base = f"{page_index:03d}-{_slug(fixed[page_axis])}"
        sheets.extend(_render_pages(store, frame, _Page(base, title, pages.get(combo, {}))))
    return sheets


@dataclass(frozen=True)
class _Geometry:
    """Pixel sizes of a sheet: tiles, labels, header, padding, and the rows x columns one part holds."""

    cw: int  # a tile's width and height
    ch: int
    unit: int  # the label font's size; the other sizes follow from it
    label_w: int
    label_h: int
    header_h: int
    pad: int
    row_block: int
    col_block: int


_PLACEHOLDER_TILE = (64, 64)  # the tile size of a page without a single cell in the manifest
_HEADER_LINES = 4  # title, axes and up to two wrapped lines of locked values


def _geometry(frame: _Frame, grid: Grid) -> _Geometry:
    sample = next(iter(grid.values()), None)
    cw, ch = (sample["width"], sample["height"]) if sample else _PLACEHOLDER_TILE
    unit = max(12, min(28, cw // 12))
    label_w, label_h, header_h, pad = unit * 9, unit * 2, unit * 7, max(4, unit // 3)
    # the largest block of rows x columns that stays under the pixel cap
    col_block = min(len(frame.cols), max(1, (int(frame.max_pixels**0.5) - label_w) // (cw + pad)))
    width = max(label_w + col_block * (cw + pad) + pad, MIN_WIDTH)
    row_block = min(len(frame.rows), max(1, (frame.max_pixels // width - header_h - label_h) // (ch + pad)))
    return _Geometry(cw, ch, unit, label_w, label_h, header_h, pad, row_block, col_block)


def _render_pages(store: Store, frame: _Frame, page: _Page) -> list[Sheet]:
    painter = _Painter(store, frame, _geometry(frame, page.grid), page.grid)
    g = painter.g
    parts = [(ri, ci) for ri in range(0, len(frame.rows), g.row_block) for ci in range(0, len(frame.cols), g.col_block)]
    sheets = []
    for part, (ri, ci) in enumerate(parts, 1):
        part_rows, part_cols = frame.rows[ri : ri + g.row_block], frame.cols[ci : ci + g.col_block]
        suffix = f"  (part {part} of {len(parts)})" if len(parts) > 1 else ""
        image = painter.header(f"{frame.job_name}  |  {page.title}{suffix}", len(part_rows), len(part_cols))
        rendered = painter.grid_of(image, part_rows, part_cols)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False, compress_level=6)
        name = f"{page.base}.png" if len(parts) == 1 else f"{page.base}-part{part}.png"
        sheets.append(Sheet(name, page.title + suffix, buffer.getvalue(), len(part_rows) * len(part_cols), rendered))
    return sheets


@dataclass(frozen=True)
class _Painter:
    """Draws one page's sheets: the header, the labels, each cell's image or a placeholder."""

    store: Store
    frame: _Frame
    g: _Geometry
    grid: Grid

    def header(self, title: str, n_rows: int, n_cols: int) -> Image.Image:
        """A blank sheet for n_rows x n_cols tiles, with its title, axes and locked values written."""
        frame, g = self.frame, self.g
        grid_w = g.label_w + n_cols * (g.cw + g.pad) + g.pad
        size = (max(grid_w, MIN_WIDTH), g.header_h + g.label_h + n_rows * (g.ch + g.pad) + g.pad)
        image = Image.new("RGB", size, BACKGROUND)
        draw = ImageDraw.Draw(image)
        big, small = _font(g.unit), _font(max(10, g.unit * 3 // 4))
        text_w = image.width - 2 * g.pad
        draw.text((g.pad, g.pad), _fit(draw, title, big, text_w), font=big, fill=INK)
        locked_text = "locked: " + ", ".join(f"{k}={v}" for k, v in frame.locked.items())
        header = [f"rows: {frame.rows_axis}   columns: {frame.cols_axis}", *_wrap(draw, locked_text, small, text_w)]
        for n, text in enumerate(header[:_HEADER_LINES]):
            position = (g.pad, g.pad + g.unit + g.pad + n * (g.unit + 2))
            draw.text(position, _fit(draw, text, small, text_w), font=small, fill=MUTED)
        return image

    def grid_of(self, image: Image.Image, part_rows: list[str], part_cols: list[str]) -> int:
        """Column and row labels, and each cell's image or a placeholder; how many cells were rendered."""
        frame, g = self.frame, self.g
        draw = ImageDraw.Draw(image)
        small = _font(max(10, g.unit * 3 // 4))
        rendered = 0
        for j, col in enumerate(part_cols):
            x = g.label_w + j * (g.cw + g.pad)
            draw.text((x, g.header_h), _fit(draw, f"{frame.cols_axis}: {col}", small, g.cw), font=small, fill=INK)
        for i, row in enumerate(part_rows):
            y = g.header_h + g.label_h + i * (g.ch + g.pad)
            label = _fit(draw, f"{frame.rows_axis}: {row}", small, g.label_w - 2 * g.pad)
            draw.text((g.pad, y + g.ch // 2 - g.unit // 2), label, font=small, fill=INK)
            for j, col in enumerate(part_cols):
                x = g.label_w + j * (g.cw + g.pad)
                line = self.grid.get((row, col))
                tile = _tile(self.store, line, g.cw, g.ch) if line else None
                if tile is None:
                    draw.rectangle((x, y, x + g.cw - 1, y + g.ch - 1), fill=PLACEHOLDER)
                    draw.text((x + g.pad, y + g.pad), "not rendered" if line else "-", font=small, fill=MUTED)
                else:
                    image.paste(tile, (x, y))
                    rendered += 1
        return rendered


def _tile(store: Store, line: dict[str, Any], width: int, height: int) -> Image.Image | None:
    try:
        tile = Image.open(io.BytesIO(store.get(layout.cell_image(line["cell_id"])))).convert("RGB")
    except NotFound:
        return None
    return tile if tile.size == (width, height) else tile.resize((width, height))
