"""A contact sheet of what a model retrieves: query images and their top-k thumbnails, with Pillow only.

Two pictures are drawn with it: ``retrievals.png`` of a training run (relevance known: each retrieved
thumbnail framed green when relevant, red when not) and ``query.png`` of the query mode (relevance
unknown: a neutral grey frame; an indexed image whose file is missing becomes a grey "missing" tile).

The sheet is a column of blocks, one per query. A block reads left to right::

    +-----------+  DSI fine-tuned   [t1] [t2] [t3] ... [t10]
    |   query   |  P@10 0.40        ID 1  ID 2  ID 3      ID 10
    | (2x size, |  BoVW             [t1] [t2] [t3]            <- fewer IDs: the rest stays empty
    | dark rim) |  P@10 0.10        ID 1  ID 2  ID 3
    +-----------+
    query 17 (class 3)

Usage::

    sheet = draw_sheet([Block(query_rgb, "query 17 (class 3)",
                              [Line("DSI fine-tuned\\nP@10 0.40",
                                    [Tile(img, "ID 0412", relevant=True), ...])])],
                       title="retrievals")
    sheet.save(tmp_path, format="PNG")            # the caller writes (temporary name, then rename)
    left, top, right, bottom = layout_sheet(blocks).tile_box(0, 0, 0)   # where a tile's frame is

Boxes are Pillow boxes ``(left, top, right, bottom)``, right and bottom exclusive (as ``Image.crop``).
A tile's box is its frame's outer edge; the thumbnail fills the box less ``FRAME`` pixels on each side.
Images are (H, W, 3) uint8 RGB arrays of any size; a non-square one is stretched to the square thumbnail.
The output depends only on the input (no clock, no randomness): the same blocks give the same PNG bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]

# Colours. Green and red are the usual relevant / not relevant; both stay apart from each other and from
# every grey for readers with the common red-green weakness through their brightness (dark green, bright red).
GREEN: RGB = (0, 160, 60)  # frame of a relevant tile
RED: RGB = (210, 30, 30)  # frame of an irrelevant tile
NEUTRAL: RGB = (190, 190, 190)  # frame when relevance is not known (query mode)
MISSING: RGB = (128, 128, 128)  # fill of a tile whose image is not available
QUERY_RIM: RGB = (40, 40, 40)  # the query's thicker dark frame sets it apart from the answers
BACKGROUND: RGB = (255, 255, 255)
TEXT: RGB = (30, 30, 30)
MISSING_TEXT: RGB = (255, 255, 255)  # white on mid grey reads at 100 % zoom
RULE: RGB = (215, 215, 215)  # thin line between two blocks

# Geometry, in pixels (thumb is the retrieved thumbnail's side, 64 by default).
MAX_TILES = 10  # a line holds a model's top 10 at most; the width is always that of 10 tiles
FRAME = 3  # a retrieved tile's frame: 3 px of colour reads at a glance without eating the thumbnail
QUERY_SCALE = 2  # the query is drawn twice the thumbnail's side: the eye finds it first
QUERY_FRAME = 4  # thicker than FRAME: one more cue that this is the question, not an answer
TILE_GAP = 8  # between two tiles of a line: room for a caption like "0412  -1.23" (about 50 px at 64)
CAPTION_H = 14  # one caption line under a tile: the default font is about 11 px high, plus air
LINE_GAP = 6  # between two lines (models) of a block
LABEL_W = 110  # the column of model names between the query and the tiles ("DSI fine-tuned" ~ 70 px)
QUERY_GAP = 12  # between the query column and the label column
BLOCK_GAP = 17  # between two blocks; a 1 px rule sits in its middle
MARGIN = 10  # around the whole sheet
TITLE_H = 22  # the title's band at the top, only when there is a title


@dataclass
class Tile:
    """One retrieved image: a thumbnail, its caption and, when known, whether it is relevant."""

    image: np.ndarray | None  # (H, W, 3) uint8 RGB; None: a grey "missing" tile (image not available)
    caption: str  # under the tile: "ID 0412" or "0412  -1.23"
    relevant: bool | None = None  # True: green frame, False: red frame, None: neutral grey frame


@dataclass
class Line:
    """One model's answer to one query: its label and its ranked tiles, best first (at most MAX_TILES)."""

    label: str  # left of the tiles, may hold a newline: "DSI fine-tuned\nP@10 0.40"
    tiles: list[Tile]


@dataclass
class Block:
    """One query: its image, its caption and one line per model."""

    query: np.ndarray  # (H, W, 3) uint8 RGB
    caption: str  # under the query: "query 17 (class 3)"
    lines: list[Line]


@dataclass(frozen=True)
class Layout:
    """Where everything of a sheet goes; computed from the blocks' line counts, the title and thumb."""

    thumb: int
    block_tops: tuple[int, ...]  # y of each block's top edge
    width: int
    height: int

    @property
    def tile_side(self) -> int:
        """Side of a retrieved tile's box: the thumbnail and its frame."""
        return self.thumb + 2 * FRAME

    @property
    def line_height(self) -> int:
        """Vertical step from one line (model) of a block to the next."""
        return self.tile_side + CAPTION_H + LINE_GAP

    @property
    def query_side(self) -> int:
        """Side of the query's box: the enlarged query image and its dark rim."""
        return QUERY_SCALE * self.thumb + 2 * QUERY_FRAME

    @property
    def tiles_left(self) -> int:
        """x of the first tile of every line."""
        return MARGIN + self.query_side + QUERY_GAP + LABEL_W

    def query_box(self, block: int) -> Box:
        """The box of block ``block``'s query image, rim included."""
        left, top = MARGIN, self.block_tops[block]
        return (left, top, left + self.query_side, top + self.query_side)

    def label_xy(self, block: int, line: int) -> tuple[int, int]:
        """The top-left corner of a line's label."""
        return (MARGIN + self.query_side + QUERY_GAP, self.block_tops[block] + line * self.line_height + FRAME)

    def tile_box(self, block: int, line: int, rank: int) -> Box:
        """The box of a tile's frame (rank 0-based: 0 is the top answer), whether or not a tile is there."""
        if not 0 <= rank < MAX_TILES:
            raise ValueError(f"rank must be in 0..{MAX_TILES - 1}, got {rank}")
        left = self.tiles_left + rank * (self.tile_side + TILE_GAP)
        top = self.block_tops[block] + line * self.line_height
        return (left, top, left + self.tile_side, top + self.tile_side)


def _block_height(n_lines: int, thumb: int) -> int:
    """A block is as high as its query with caption, or its lines, whichever is higher."""
    query = QUERY_SCALE * thumb + 2 * QUERY_FRAME + CAPTION_H
    lines = n_lines * (thumb + 2 * FRAME + CAPTION_H + LINE_GAP) - (LINE_GAP if n_lines else 0)
    return max(query, lines)


def layout_sheet(blocks: list[Block], title: str = "", thumb: int = 64) -> Layout:
    """The layout ``draw_sheet`` uses for these arguments (sizes from the constants above, no drawing)."""
    if isinstance(thumb, bool) or not isinstance(thumb, int) or thumb < 16:
        raise ValueError(f"thumb must be an integer >= 16 (pixels), got {thumb!r}")
    if not blocks:
        raise ValueError("no blocks to draw: a sheet needs at least one query")
    tops, y = [], MARGIN + (TITLE_H if title else 0)
    for block in blocks:
        tops.append(y)
        y += _block_height(len(block.lines), thumb) + BLOCK_GAP
    height = y - BLOCK_GAP + MARGIN
    tile_side = thumb + 2 * FRAME
    width = (MARGIN + QUERY_SCALE * thumb + 2 * QUERY_FRAME + QUERY_GAP + LABEL_W
             + MAX_TILES * tile_side + (MAX_TILES - 1) * TILE_GAP + MARGIN)
    return Layout(thumb=thumb, block_tops=tuple(tops), width=width, height=height)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font, loaded once."""
    return ImageFont.load_default()


def _thumbnail(image: np.ndarray, side: int, what: str) -> Image.Image:
    """An RGB array as a ``side`` x ``side`` Pillow image (box filter down, bilinear up)."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or 0 in array.shape:
        raise ValueError(f"{what} must be an (H, W, 3) uint8 RGB array, got shape {array.shape} "
                         f"dtype {array.dtype}")
    picture = Image.fromarray(np.ascontiguousarray(array), mode="RGB")
    if picture.size == (side, side):
        return picture
    shrinking = picture.width >= side and picture.height >= side
    return picture.resize((side, side), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text`` cut (with "...") to at most ``width`` pixels in the default font: it never runs into a neighbour."""
    if draw.textlength(text, font=_font()) <= width:
        return text
    while text and draw.textlength(text + "...", font=_font()) > width:
        text = text[:-1]
    return text + "..."


def _centred_caption(draw: ImageDraw.ImageDraw, text: str, left: int, right: int, top: int) -> None:
    """One line of text centred between x ``left`` and ``right``, its top at ``top``."""
    text = _fit(draw, text.replace("\n", " "), right - left)
    x = (left + right - draw.textlength(text, font=_font())) / 2
    draw.text((round(x), top), text, fill=TEXT, font=_font())


def _draw_tile(sheet: Image.Image, draw: ImageDraw.ImageDraw, tile: Tile, box: Box, thumb: int) -> None:
    """A retrieved tile in ``box``: frame in its relevance colour, thumbnail (or grey "missing"), caption."""
    if tile.relevant not in (True, False, None):
        raise ValueError(f"Tile.relevant must be True, False or None, got {tile.relevant!r}")
    frame = NEUTRAL if tile.relevant is None else GREEN if tile.relevant else RED
    left, top, right, bottom = box
    draw.rectangle((left, top, right - 1, bottom - 1), fill=frame)
    inner = (left + FRAME, top + FRAME, right - FRAME - 1, bottom - FRAME - 1)
    if tile.image is None:
        draw.rectangle(inner, fill=MISSING)
        note = _fit(draw, "missing", thumb - 2)
        x = (left + right - draw.textlength(note, font=_font())) / 2
        draw.text((round(x), top + FRAME + thumb // 2 - 6), note, fill=MISSING_TEXT, font=_font())
    else:
        sheet.paste(_thumbnail(tile.image, thumb, "a Tile's image"), (left + FRAME, top + FRAME))
    _centred_caption(draw, tile.caption, left - TILE_GAP // 2, right + TILE_GAP // 2, bottom + 1)


def draw_sheet(blocks: list[Block], title: str = "", thumb: int = 64) -> Image.Image:
    """The contact sheet of ``blocks`` as an RGB Pillow image (the caller saves it; see the module doc)."""
    layout = layout_sheet(blocks, title, thumb)
    sheet = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((MARGIN, MARGIN), _fit(draw, title.replace("\n", " "), layout.width - 2 * MARGIN),
                  fill=TEXT, font=_font())
    for b, block in enumerate(blocks):
        if b:  # a light rule in the middle of the gap above this block
            y = layout.block_tops[b] - (BLOCK_GAP + 1) // 2
            draw.line((MARGIN, y, layout.width - MARGIN - 1, y), fill=RULE)
        left, top, right, bottom = layout.query_box(b)
        draw.rectangle((left, top, right - 1, bottom - 1), fill=QUERY_RIM)
        side = QUERY_SCALE * thumb
        sheet.paste(_thumbnail(block.query, side, "a Block's query"), (left + QUERY_FRAME, top + QUERY_FRAME))
        _centred_caption(draw, block.caption, left, right, bottom + 1)
        for l, line in enumerate(block.lines):
            if len(line.tiles) > MAX_TILES:
                raise ValueError(f"a line holds at most {MAX_TILES} tiles, got {len(line.tiles)} "
                                 f"(block {b}, line {l}: {line.label!r})")
            label = "\n".join(_fit(draw, part, LABEL_W - 6) for part in line.label.split("\n"))
            draw.multiline_text(layout.label_xy(b, l), label, fill=TEXT, font=_font(), spacing=3)
            for rank, tile in enumerate(line.tiles):
                _draw_tile(sheet, draw, tile, layout.tile_box(b, l, rank), thumb)
    return sheet
