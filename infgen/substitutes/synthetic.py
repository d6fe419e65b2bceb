"""Procedural, photo-like RGB images from a seed: training data that needs no download.

Each image is a smooth colour gradient, a handful of filled shapes (ellipses, polygons, rotated rectangles)
with soft or crisp edges, some of them filled with stripes or a checkerboard, a band-limited luminance noise
field (large-scale shading down to fine texture) and a faint film grain. That mix of flat regions, edges,
periodic texture and 1/f noise is what a small autoencoder has to learn from real photographs.

The seed fixes the content: shape layout, colours and the coarse noise octaves are drawn in normalised
coordinates, so one seed rendered at 256² and at 2048² shows the same scene (only the finest noise octaves and
the grain are drawn per size). Output is deterministic for a given (seed, height, width).

Speed matters because a later stage serves these images over HTTP at > 2 megapixels: everything heavy runs
in PIL (resizes, polygon rasterising, blurs) or in numpy restricted to each shape's bounding box.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Scene composition, in fractions of the image's short side unless stated otherwise.
BACKGROUND_GRID_CELLS = 64  # the smooth background is computed on at most 64×64 points, then upsampled
SHAPE_COUNT_RANGE = (5, 14)  # photos have a few dominant objects, not confetti
SHAPE_RADIUS_RANGE = (0.04, 0.35)
SOFT_EDGE_FRACTION = 0.5  # share of shapes with blurred (defocused) edges; the rest stay crisp
SOFT_EDGE_RADIUS_RANGE = (0.003, 0.02)
TEXTURED_FRACTION = 0.3  # share of shapes filled with stripes or a checkerboard instead of shaded colour
TEXTURE_PERIOD_RANGE = (0.015, 0.08)
MIN_TEXTURE_PERIOD_PX = 3.0  # below ~3 px a period aliases into moiré, so small renders clamp it
NOISE_COARSE_CELLS = 4  # band-limited noise starts with ~4 cells across the short side
NOISE_FINEST_CELL_PX = 2.0  # ...and halves the cell size down to ~2 px
NOISE_PERSISTENCE = 0.6  # amplitude ratio between octaves (≈ 1/f spectrum)
NOISE_AMPLITUDE_RANGE = (0.02, 0.08)  # luminance modulation, in [0, 1] units
GRAIN_AMPLITUDE_RANGE = (0.0, 0.015)  # per-pixel sensor-like noise, kept small: it is incompressible


def make_image(seed: int, height: int, width: int) -> np.ndarray:
    """Return a deterministic photo-like image, shape (height, width, 3), dtype uint8."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    # Separate streams so the scene does not depend on how many size-dependent noise draws came before.
    layout_seed, noise_seed, grain_seed = np.random.SeedSequence(seed).spawn(3)
    layout_rng = np.random.default_rng(layout_seed)

    palette = _palette(layout_rng)
    # Channel-first while drawing: per-channel planes are contiguous, which keeps the numpy work cheap.
    canvas = _gradient_background(layout_rng, palette, height, width)  # (3, H, W) float32 in ~[0, 1]
    for _ in range(layout_rng.integers(*SHAPE_COUNT_RANGE, endpoint=True)):
        _draw_shape(layout_rng, palette, canvas)

    noise = _band_limited_noise(np.random.default_rng(noise_seed), height, width)  # (H, W), unit std
    shading = noise * layout_rng.uniform(*NOISE_AMPLITUDE_RANGE)
    grain_amplitude = layout_rng.uniform(*GRAIN_AMPLITUDE_RANGE)
    if grain_amplitude > 0:
        grain_rng = np.random.default_rng(grain_seed)
        shading += grain_amplitude * grain_rng.standard_normal((height, width), dtype=np.float32)
    canvas += shading  # luminance only: broadcast over the three channels

    canvas *= 255.0
    canvas += 0.5  # round to nearest on the uint8 cast below
    np.clip(canvas, 0.0, 255.0, out=canvas)
    return canvas.astype(np.uint8).transpose(1, 2, 0).copy()  # (H, W, 3), C-contiguous


def make_images(seeds: Iterable[int], size: int | tuple[int, int]) -> np.ndarray:
    """Stack make_image over seeds: (N, H, W, 3) uint8. `size` is a side length or (height, width)."""
    height, width = (size, size) if isinstance(size, int) else size
    return np.stack([make_image(int(seed), height, width) for seed in seeds])


def _palette(rng: np.random.Generator) -> np.ndarray:
    """3-5 related colours: a dominant hue plus neighbours and one complement, like a real scene's colours."""
    base_hue = rng.uniform()
    count = rng.integers(3, 5, endpoint=True)
    colours = []
    for index in range(count):
        hue_offset = 0.5 if index == count - 1 else rng.normal(0.0, 0.08)
        hue = (base_hue + hue_offset) % 1.0
        saturation = rng.uniform(0.1, 0.85)
        value = rng.uniform(0.15, 0.95)
        colours.append(colorsys.hsv_to_rgb(hue, saturation, value))
    return np.asarray(colours, dtype=np.float32)


def _pick_colour(rng: np.random.Generator, palette: np.ndarray) -> np.ndarray:
    """A palette colour with small jitter, so shapes are related but not identical."""
    colour = palette[rng.integers(len(palette))] + rng.normal(0.0, 0.06, 3)
    return np.clip(colour, 0.0, 1.0).astype(np.float32)


def _gradient_background(rng: np.random.Generator, palette: np.ndarray, height: int, width: int):
    """A linear two-colour gradient along a random direction, bent by a coarse 3×3 colour field: (3, H, W).

    Everything here is smooth, so it is computed on a small grid and upsampled bicubically: the cost at full
    resolution is three PIL resizes instead of a dozen numpy passes.
    """
    angle = rng.uniform(0.0, 2.0 * np.pi)
    start, end = _pick_colour(rng, palette), _pick_colour(rng, palette)
    coarse_field = rng.normal(0.0, 0.08, (3, 3, 3)).astype(np.float32)  # (channel, 3, 3)

    grid_height, grid_width = min(height, BACKGROUND_GRID_CELLS), min(width, BACKGROUND_GRID_CELLS)
    # Normalised cell-centre coordinates: the gradient spans the image whatever its size.
    ys = (np.arange(grid_height, dtype=np.float32) + 0.5) / grid_height - 0.5
    xs = (np.arange(grid_width, dtype=np.float32) + 0.5) / grid_width - 0.5
    ramp = np.clip(np.cos(angle) * xs[None, :] + np.sin(angle) * ys[:, None] + 0.5, 0.0, 1.0)  # (h, w)
    canvas = np.empty((3, height, width), dtype=np.float32)
    for channel in range(3):
        plane = start[channel] + ramp * (end[channel] - start[channel])
        plane += _resize(coarse_field[channel], grid_height, grid_width)
        canvas[channel] = _resize(plane, height, width)
    return canvas


def _draw_shape(rng: np.random.Generator, palette: np.ndarray, canvas: np.ndarray) -> None:
    """Alpha-composite one random shape onto `canvas` (3, H, W) in place, touching only its bounding box."""
    _, height, width = canvas.shape
    short_side = min(height, width)
    centre_y, centre_x = rng.uniform(-0.1, 1.1) * height, rng.uniform(-0.1, 1.1) * width
    radius = rng.uniform(*SHAPE_RADIUS_RANGE) * short_side
    aspect = rng.uniform(0.4, 1.0)
    rotation = rng.uniform(0.0, 2.0 * np.pi)
    kind = rng.choice(["ellipse", "polygon", "rectangle"])
    soft = rng.uniform() < SOFT_EDGE_FRACTION
    blur_radius = rng.uniform(*SOFT_EDGE_RADIUS_RANGE) * short_side if soft else 0.0
    opacity = rng.uniform(0.6, 1.0)
    fill_params = _fill_params(rng, palette)
    # Polygon vertices are drawn for every kind so the random stream does not depend on the kind.
    vertex_count = rng.integers(3, 8, endpoint=True)
    vertex_angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, vertex_count))
    vertex_radii = rng.uniform(0.5, 1.0, vertex_count)

    # Bounding box with room for the blur; shapes may hang off the canvas, so clip it.
    margin = radius + 3.0 * blur_radius + 2.0
    top, bottom = int(max(0, np.floor(centre_y - margin))), int(min(height, np.ceil(centre_y + margin)))
    left, right = int(max(0, np.floor(centre_x - margin))), int(min(width, np.ceil(centre_x + margin)))
    if bottom <= top or right <= left:
        return
    box_height, box_width = bottom - top, right - left
    local_y, local_x = centre_y - top, centre_x - left

    if kind == "ellipse":
        angles = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
        radii = np.ones_like(angles)
    elif kind == "rectangle":
        angles = np.array([0.25, 0.75, 1.25, 1.75]) * np.pi
        radii = np.ones_like(angles)
    else:
        angles, radii = vertex_angles, vertex_radii
    # An ellipse is drawn as a 64-gon so that it can be squashed and rotated like the other kinds.
    offset_x = radius * radii * np.cos(angles)
    offset_y = radius * aspect * radii * np.sin(angles)
    points_x = local_x + offset_x * np.cos(rotation) - offset_y * np.sin(rotation)
    points_y = local_y + offset_x * np.sin(rotation) + offset_y * np.cos(rotation)

    mask_image = Image.new("L", (box_width, box_height), 0)
    ImageDraw.Draw(mask_image).polygon(list(zip(points_x.tolist(), points_y.tolist(), strict=True)), fill=255)
    if blur_radius >= 0.5:
        mask_image = mask_image.filter(ImageFilter.GaussianBlur(blur_radius))
    alpha = np.asarray(mask_image, dtype=np.float32) * (opacity / 255.0)  # (h, w)

    fill = _render_fill(fill_params, top, left, box_height, box_width, short_side)  # (3, h, w)
    region = canvas[:, top:bottom, left:right]  # a view: the update lands in canvas
    fill -= region
    fill *= alpha
    region += fill


def _fill_params(rng: np.random.Generator, palette: np.ndarray) -> dict:
    """Random fill description, drawn up front so every shape consumes the same number of draws."""
    return {
        "textured": rng.uniform() < TEXTURED_FRACTION,
        "checker": rng.uniform() < 0.4,
        "colour_a": _pick_colour(rng, palette),
        "colour_b": _pick_colour(rng, palette),
        "period": rng.uniform(*TEXTURE_PERIOD_RANGE),
        "texture_angle": rng.uniform(0.0, np.pi),
        "shading_angle": rng.uniform(0.0, 2.0 * np.pi),
        "shading_strength": rng.uniform(0.0, 0.25),  # lighting falloff across the object
    }


def _render_fill(params: dict, top: int, left: int, height: int, width: int, short_side: int) -> np.ndarray:
    """A shape's fill over its bounding box, (3, h, w); canvas coordinates, so textures do not shift."""
    ys = (np.arange(top, top + height, dtype=np.float32) + 0.5)[:, None]
    xs = (np.arange(left, left + width, dtype=np.float32) + 0.5)[None, :]
    colour_a, colour_b = params["colour_a"], params["colour_b"]
    if not params["textured"]:
        # Linear lighting falloff, 1 at the box centre: a row ramp plus a column ramp costs one full pass.
        angle, strength = params["shading_angle"], params["shading_strength"] / short_side
        centre_y, centre_x = top + height / 2.0, left + width / 2.0
        slope_x, slope_y = strength * np.cos(angle), strength * np.sin(angle)
        shade = (1.0 + slope_x * (xs - centre_x)) + slope_y * (ys - centre_y)
        return colour_a[:, None, None] * shade  # (3, h, w)

    period = max(params["period"] * short_side, MIN_TEXTURE_PERIOD_PX)
    angle = params["texture_angle"]
    u = (np.cos(angle) * xs + np.sin(angle) * ys) * (2.0 * np.pi / period)
    wave = np.sin(u)
    if params["checker"]:
        v = (-np.sin(angle) * xs + np.cos(angle) * ys) * (2.0 * np.pi / period)
        wave = wave * np.sin(v)
    # Clip a steep sine instead of thresholding: about a one-pixel ramp, so edges are crisp but not aliased.
    steepness = period / (2.0 * np.pi)
    weight = np.clip(0.5 + steepness * wave, 0.0, 1.0)  # (h, w)
    return colour_a[:, None, None] + weight * (colour_b - colour_a)[:, None, None]


def _band_limited_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Sum of octaves from ~4 cells across down to ~2 px cells, amplitude × NOISE_PERSISTENCE per octave.

    Built as a pyramid: upsample the running sum ×2 and add the next octave's white noise, so only the last
    step runs at full resolution. Normalised to unit standard deviation.
    """
    short_side = min(height, width)
    grid_height = max(2, round(NOISE_COARSE_CELLS * height / short_side))
    grid_width = max(2, round(NOISE_COARSE_CELLS * width / short_side))
    field = rng.standard_normal((grid_height, grid_width), dtype=np.float32)
    amplitude = 1.0
    while short_side / (2 * min(grid_height, grid_width)) >= NOISE_FINEST_CELL_PX:
        grid_height, grid_width = 2 * grid_height, 2 * grid_width
        amplitude *= NOISE_PERSISTENCE
        octave = rng.standard_normal((grid_height, grid_width), dtype=np.float32)
        field = _resize(field, grid_height, grid_width) + amplitude * octave
    # Normalise on the pre-upsampling grid: 4× fewer pixels, and bicubic barely changes the spread.
    field = field * (1.0 / max(float(field.std()), 1e-6))
    return _resize(field, height, width)


def _resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of a 2-D float32 array (PIL 'F' mode, C speed). The result is read-only."""
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32))  # 2-D float32 → mode 'F'
    return np.asarray(image.resize((width, height), Image.BICUBIC))
