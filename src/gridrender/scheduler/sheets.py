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

from PIL import Image, ImageDraw, ImageFont

from . import layout
from .job import SheetLayout
from .params import AXES
from .storage import NotFound, Store

DEFAULT_LAYOUT = SheetLayout().model_dump()
MIN_WIDTH = 640  # room for the header on sheets of small images
MAX_PIXELS = 40_000_000  # per sheet; A1111's X/Y/Z plot caps grids the same way

BACKGROUND, INK, MUTED, PLACEHOLDER = (255, 255, 255), (20, 20, 20), (110, 110, 110), (225, 225, 225)


def axis_label(line: dict, axis: str) -> str:
    """How a cell's value on `axis` is written on sheets and in the gallery."""
    return AXES[axis].label(AXES[axis].value(line))


def axis_values(lines: list[dict]) -> dict[str, list[str]]:
    """Each axis with the labels of its distinct values, in manifest order."""
    return {axis: list(dict.fromkeys(axis_label(line, axis) for line in lines)) for axis in AXES}


def undeclared_axes(values: dict[str, list], layout: dict) -> list[str]:
    """Axes that vary although the layout does not place them (each value gets its own sheets)."""
    return [a for a, v in values.items() if len(v) > 1 and a not in layout.values()]


@dataclass
class Sheet:
    name: str  # file name under jobs/<job>/sheets/
    title: str
    png: bytes
    cells: int
    rendered: int


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split(" "):
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + [current] if current else lines


def _slug(value) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(value).lower()).strip("-")[:40] or "x"


def build_sheets(store: Store, job_name: str, lines: list[dict], layout: dict | None = None,
                 max_pixels: int = MAX_PIXELS) -> list[Sheet]:
    layout = {**DEFAULT_LAYOUT, **(layout or {})}
    values = axis_values(lines)
    rows_axis, cols_axis, page_axis = layout["rows"], layout["cols"], layout["pages"]
    extra = undeclared_axes(values, layout)  # they split pages further
    # locked: axes with one value, except components the job does not use at all
    used = {a for a in values if lines and any(p in lines[0] for p in AXES[a].params)}
    locked = {a: v[0] for a, v in values.items() if len(v) == 1 and a not in (rows_axis, cols_axis) and a in used}
    page_axes = [page_axis, *extra]
    pages: dict[tuple, dict[tuple, dict]] = {}
    for line in lines:
        page = tuple(axis_label(line, a) for a in page_axes)
        pages.setdefault(page, {})[(axis_label(line, rows_axis), axis_label(line, cols_axis))] = line

    sheets = []
    for page_index, combo in enumerate(itertools.product(*(values[a] for a in page_axes)), 1):
        fixed = dict(zip(page_axes, combo))
        title = "  |  ".join(f"{a}: {v}" for a, v in fixed.items())
        base = f"{page_index:03d}-{_slug(fixed[page_axis])}"
        sheets.extend(_render_pages(store, job_name, base, title, locked, rows_axis, cols_axis,
                                    values[rows_axis], values[cols_axis], pages.get(combo, {}), max_pixels))
    return sheets


def _render_pages(store, job_name, base, title, locked, rows_axis, cols_axis, rows, cols, grid, max_pixels) -> list[Sheet]:
    sample = next(iter(grid.values()), None)
    cw, ch = (sample["width"], sample["height"]) if sample else (64, 64)
    unit = max(12, min(28, cw // 12))
    label_w, label_h, header_h, pad = unit * 9, unit * 2, unit * 7, max(4, unit // 3)
    # the largest block of rows x columns that stays under the pixel cap
    col_block = min(len(cols), max(1, (int(max_pixels ** 0.5) - label_w) // (cw + pad)))
    width = max(label_w + col_block * (cw + pad) + pad, MIN_WIDTH)
    row_block = min(len(rows), max(1, (max_pixels // width - header_h - label_h) // (ch + pad)))
    parts = [(ri, ci) for ri in range(0, len(rows), row_block) for ci in range(0, len(cols), col_block)]
    sheets = []
    for part, (ri, ci) in enumerate(parts, 1):
        part_rows, part_cols = rows[ri : ri + row_block], cols[ci : ci + col_block]
        grid_w = label_w + len(part_cols) * (cw + pad) + pad
        image = Image.new("RGB", (max(grid_w, MIN_WIDTH), header_h + label_h + len(part_rows) * (ch + pad) + pad), BACKGROUND)
        draw = ImageDraw.Draw(image)
        big, small = _font(unit), _font(max(10, unit * 3 // 4))
        suffix = f"  (part {part} of {len(parts)})" if len(parts) > 1 else ""
        text_w = image.width - 2 * pad
        draw.text((pad, pad), _fit(draw, f"{job_name}  |  {title}{suffix}", big, text_w), font=big, fill=INK)
        locked_text = "locked: " + ", ".join(f"{k}={v}" for k, v in locked.items())
        header = [f"rows: {rows_axis}   columns: {cols_axis}"] + _wrap(draw, locked_text, small, text_w)
        for n, text in enumerate(header[:4]):
            draw.text((pad, pad + unit + pad + n * (unit + 2)), _fit(draw, text, small, text_w), font=small, fill=MUTED)
        rendered = 0
        for j, col in enumerate(part_cols):
            x = label_w + j * (cw + pad)
            draw.text((x, header_h), _fit(draw, f"{cols_axis}: {col}", small, cw), font=small, fill=INK)
        for i, row in enumerate(part_rows):
            y = header_h + label_h + i * (ch + pad)
            label = _fit(draw, f"{rows_axis}: {row}", small, label_w - 2 * pad)
            draw.text((pad, y + ch // 2 - unit // 2), label, font=small, fill=INK)
            for j, col in enumerate(part_cols):
                x = label_w + j * (cw + pad)
                line = grid.get((row, col))
                tile = _tile(store, line, cw, ch) if line else None
                if tile is None:
                    draw.rectangle([x, y, x + cw - 1, y + ch - 1], fill=PLACEHOLDER)
                    draw.text((x + pad, y + pad), "not rendered" if line else "-", font=small, fill=MUTED)
                else:
                    image.paste(tile, (x, y))
                    rendered += 1
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False, compress_level=6)
        name = f"{base}.png" if len(parts) == 1 else f"{base}-part{part}.png"
        sheets.append(Sheet(name, title + suffix, buffer.getvalue(), len(part_rows) * len(part_cols), rendered))
    return sheets


def _tile(store: Store, line: dict, width: int, height: int) -> Image.Image | None:
    try:
        tile = Image.open(io.BytesIO(store.get(layout.cell_image(line["cell_id"])))).convert("RGB")
    except NotFound:
        return None
    return tile if tile.size == (width, height) else tile.resize((width, height))
