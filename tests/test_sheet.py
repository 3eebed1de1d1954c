"""The retrieval contact sheet: its size follows the layout, frames carry relevance, images arrive unchanged."""
import io
import time

import numpy as np
import pytest
from PIL import ImageChops

from support.sheet import (BACKGROUND, BLOCK_GAP, CAPTION_H, FRAME, GREEN, LABEL_W, LINE_GAP, MARGIN, MAX_TILES,
                           MISSING, NEUTRAL, QUERY_FRAME, QUERY_GAP, QUERY_RIM, QUERY_SCALE, RED, TILE_GAP, TITLE_H,
                           Block, Line, Tile, draw_sheet, layout_sheet)

BLUE = (40, 70, 200)  # thumbnails' colour: far from GREEN, RED, the greys and the background


def solid(colour, side=48):
    return np.full((side, side, 3), colour, dtype=np.uint8)


def blocks_of(n_blocks, n_lines, n_tiles=MAX_TILES, relevant=None):
    """n_blocks queries, each with n_lines models returning n_tiles blue thumbnails."""
    return [Block(solid((200, 180, 20)), f"query {b}",
                  [Line(f"model {m}\nP@10 0.{m}0",
                        [Tile(solid(BLUE), f"ID {r:04d}", relevant) for r in range(n_tiles)])
                   for m in range(n_lines)])
            for b in range(n_blocks)]


def pixels(image, box):
    """The pixels of a Pillow box as an (h, w, 3) array."""
    return np.asarray(image.crop(box))


def test_size_follows_the_layout():
    sheet = draw_sheet(blocks_of(2, 3), thumb=64)
    tile, query = 64 + 2 * FRAME, QUERY_SCALE * 64 + 2 * QUERY_FRAME
    width = MARGIN + query + QUERY_GAP + LABEL_W + MAX_TILES * tile + (MAX_TILES - 1) * TILE_GAP + MARGIN
    block = 3 * (tile + CAPTION_H + LINE_GAP) - LINE_GAP  # three lines are higher than the query + caption
    assert block > query + CAPTION_H
    assert sheet.size == (width, MARGIN + 2 * block + BLOCK_GAP + MARGIN)
    assert sheet.size == (1050, 565)  # with today's constants: 10+136+12+110+700+72+10, 10+264+17+264+10
    assert sheet.mode == "RGB"
    assert sheet.size == (layout_sheet(blocks_of(2, 3)).width, layout_sheet(blocks_of(2, 3)).height)

    more_blocks, more_lines = draw_sheet(blocks_of(3, 3)), draw_sheet(blocks_of(2, 4))
    assert more_blocks.width == more_lines.width == width  # always room for 10 tiles
    assert more_blocks.height == sheet.height + block + BLOCK_GAP
    assert more_lines.height == sheet.height + 2 * (tile + CAPTION_H + LINE_GAP)
    assert draw_sheet(blocks_of(2, 3), title="retrievals").height == sheet.height + TITLE_H
    assert draw_sheet(blocks_of(2, 3), thumb=32).size < sheet.size


def test_one_line_block_is_as_high_as_its_query():
    sheet = draw_sheet(blocks_of(1, 1, 5))
    assert sheet.height == MARGIN + QUERY_SCALE * 64 + 2 * QUERY_FRAME + CAPTION_H + MARGIN


def test_frames_carry_relevance():
    blocks = blocks_of(2, 2)
    tiles = blocks[1].lines[1].tiles
    tiles[0].relevant, tiles[1].relevant, tiles[2].relevant = True, False, None
    sheet = draw_sheet(blocks)
    layout = layout_sheet(blocks)
    for rank, colour in [(0, GREEN), (1, RED), (2, NEUTRAL)]:
        left, top, right, bottom = layout.tile_box(1, 1, rank)
        on_frame = [(left + 1, top + 1), (left + 1, (top + bottom) // 2), (right - 2, bottom - 2),
                    ((left + right) // 2, top + FRAME - 1)]
        assert all(sheet.getpixel(xy) == colour for xy in on_frame), rank
        assert sheet.getpixel(((left + right) // 2, (top + bottom) // 2)) == BLUE  # the thumbnail inside
        assert sheet.getpixel((left - 1, top + 1)) == BACKGROUND  # the frame stops at the box
    neutral = sheet.getpixel(layout.tile_box(1, 1, 2)[:2])
    assert neutral not in (GREEN, RED)


def test_short_line_leaves_the_rest_empty():
    blocks = blocks_of(1, 2, n_tiles=3, relevant=True)
    sheet = draw_sheet(blocks)
    layout = layout_sheet(blocks)
    for rank in range(3):
        assert sheet.getpixel(layout.tile_box(0, 1, rank)[:2]) == GREEN
    for rank in range(3, MAX_TILES):
        region = pixels(sheet, layout.tile_box(0, 1, rank))
        assert (region == BACKGROUND).all(), rank  # no frame, no thumbnail: nothing invented
        assert not (region == GREEN).all(axis=-1).any() and not (region == RED).all(axis=-1).any()


def test_missing_image_is_a_grey_tile():
    blocks = blocks_of(1, 1, n_tiles=2, relevant=False)
    blocks[0].lines[0].tiles[1] = Tile(None, "ID 0099")
    sheet = draw_sheet(blocks)
    left, top, right, bottom = layout_sheet(blocks).tile_box(0, 0, 1)
    inside = pixels(sheet, (left + FRAME, top + FRAME, right - FRAME, bottom - FRAME))
    assert inside.shape == (64, 64, 3)
    grey = (inside == MISSING).all(axis=-1)
    assert grey[0].all() and grey[-1].all() and grey[:, 0].all()  # the whole inner rim is grey
    assert 0.7 < grey.mean() < 1.0  # mostly grey, with the "missing" note written on it
    assert not (inside == BLUE).all(axis=-1).any()
    assert sheet.getpixel((left + 1, top + 1)) == NEUTRAL  # relevance unknown


def test_query_pixels_arrive_unchanged():
    colour = (17, 99, 201)
    rng = np.random.default_rng(0)
    textured = rng.integers(0, 256, (QUERY_SCALE * 64, QUERY_SCALE * 64, 3), dtype=np.uint8)
    blocks = blocks_of(2, 2)
    blocks[0].query, blocks[1].query = solid(colour, side=37), textured  # one resized, one at drawn size
    sheet = draw_sheet(blocks)
    layout = layout_sheet(blocks)

    left, top, right, bottom = layout.query_box(0)
    assert sheet.getpixel(((left + right) // 2, (top + bottom) // 2)) == colour
    inner = pixels(sheet, (left + QUERY_FRAME, top + QUERY_FRAME, right - QUERY_FRAME, bottom - QUERY_FRAME))
    assert (inner == colour).all()  # a solid image stays solid whatever the resize
    assert sheet.getpixel((left + 1, top + 1)) == QUERY_RIM

    left, top, right, bottom = layout.query_box(1)
    inner = pixels(sheet, (left + QUERY_FRAME, top + QUERY_FRAME, right - QUERY_FRAME, bottom - QUERY_FRAME))
    assert np.array_equal(inner, textured)
    # the query sits left of the labels, the labels left of the tiles
    assert right + QUERY_GAP + LABEL_W == layout.tile_box(1, 0, 0)[0]


def test_drawing_is_deterministic():
    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    first, second = draw_sheet(blocks_of(2, 3), title="retrievals"), draw_sheet(blocks_of(2, 3), title="retrievals")
    assert ImageChops.difference(first, second).getbbox() is None
    assert png(first) == png(second)
    changed = blocks_of(2, 3)
    changed[0].lines[0].tiles[4].relevant = True
    assert ImageChops.difference(first, draw_sheet(changed, title="retrievals")).getbbox() is not None


def test_bad_input_raises():
    too_many = blocks_of(1, 1, n_tiles=MAX_TILES + 1)
    with pytest.raises(ValueError, match="at most 10 tiles"):
        draw_sheet(too_many)
    floats = blocks_of(1, 1)
    floats[0].lines[0].tiles[0].image = np.zeros((8, 8, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="uint8"):
        draw_sheet(floats)
    with pytest.raises(ValueError, match="no blocks"):
        draw_sheet([])
    with pytest.raises(ValueError, match="rank"):
        layout_sheet(blocks_of(1, 1)).tile_box(0, 0, MAX_TILES)


def test_full_sheet_is_fast():
    blocks = blocks_of(6, 4, relevant=True)
    for block in blocks:
        block.query = solid((90, 90, 90), side=224)  # queries and tiles at a realistic source size
        for line in block.lines:
            for tile in line.tiles:
                tile.image = solid(BLUE, side=224)
    start = time.perf_counter()
    sheet = draw_sheet(blocks, title="retrievals")
    assert time.perf_counter() - start < 1.0
    assert sheet.height > 6 * 4 * 64
