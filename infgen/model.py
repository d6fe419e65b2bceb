"""The InfGen decoder: one fixed-size latent in, an image of any requested size out, in one forward pass.

Layout (docs/paper.md, "Architecture"; the paper gives no sizes, the presets' are ours: docs/paper.md,
"Defaults where the paper is silent"):

    latent z (B, 4, h_l, w_l), already × the VAE scaling factor
      → patchify (p) → Linear → + INPE(latent grid) + type embedding
      → latent_blocks × self-attention                                   → memory (B, T, D)  (keys/values)
    mask tokens: one learned vector + INPE(⌈h/8⌉×⌈w/8⌉ grid) + type embedding   (queries)
      + Linear(z bilinearly sampled at the token's own coordinate)   (query_init="latent_sample", see below)
      → query_blocks × [cross-attention to memory, MLP]   (queries never attend to each other)
      → Linear (+ z sampled at the token's coordinate, token_skip) → (B, token_channels, ⌈h/8⌉, ⌈w/8⌉)
      → PixelDecoder ×8 → crop to (h, w)

Because queries never interact, they can be decoded in chunks of any size with identical results; the pixel
decoder is local, so it can be tiled exactly (see pixel_decoder.py). Together that bounds the memory of a 4K
decode by the chunk and tile sizes rather than by the output size.

Deviation from the paper, on by default in every preset (docs/paper.md, "Deviations"): a locality prior for
the queries, InfGenConfig.query_init="latent_sample". In the paper a query starts from one learned vector +
INPE and must find the latent cells under it through cross-attention alone, which at small scale trains
slowly; here each query also gets Linear(latent sampled bilinearly at its own coordinate), a bilinear
upsampling of z that the blocks refine. A query still depends only on its own coordinate and the latent, so
chunked decoding stays exact. Measurements: bench/README.md, "bench/locality.py".

A second deviation, also on by default (token_skip): the first latent_channels channels of each token are the
latent sampled at its coordinate plus what the transformer adds (its output layer starts at zero), and no
LayerNorm sits between the query stream and the tokens (query_norm=False). With the pixel decoder warm-started
from the VAE's decoder (infgen.warm_start), the untrained model at 1× is the stock decoder, and training
learns what to add, instead of first re-learning colour through normalisations that remove it (the first
demo's colour casts: docs/paper.md, "Deviations").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from infgen.pixel_decoder import UPSAMPLE_FACTOR, PixelDecoder, PixelDecoderConfig
from infgen.posenc import INPE, INPEConfig, normalized_grid

# "learned": the paper's query start. "latent_sample": the default, with the locality prior described above.
QUERY_INITS = ("learned", "latent_sample")


@dataclass(frozen=True)
class InfGenConfig:
    latent_channels: int = 4  # SD-VAE / SDXL-VAE latents
    latent_patch_size: int = 1  # 1 keeps a 1:1 (or 1:s) geometry between latent cells and mask tokens
    width: int = 1024  # transformer width D
    num_heads: int = 16
    latent_blocks: int = 4  # self-attention blocks over the latent tokens
    query_blocks: int = 12  # cross-attention blocks for the mask tokens
    mlp_ratio: float = 4.0
    inpe: INPEConfig = field(default_factory=INPEConfig)
    decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    # Output sides up to in_distribution_scale × (latent side × 8) were seen in training; extrapolation
    # (infgen.decode.extrapolate) climbs beyond that in re-encoded steps of at most ×2.
    in_distribution_scale: float = 4.0
    max_output_side: int = 8192  # decode refuses larger sides: a typo of 40960 should not allocate 40 GB
    # How a mask-token query starts: "learned" is the paper's one learned vector + INPE (+ type embedding);
    # "latent_sample" adds Linear(the latent, or its patches when latent_patch_size > 1, sampled bilinearly at
    # the query's own coordinate). DEVIATION from the paper, in every preset (module docstring); the numbers
    # that chose it are in bench/README.md ("bench/locality.py").
    # Old checkpoints without this key load as "learned" (from_dict), so their weights still fit.
    query_init: str = "latent_sample"
    # DEVIATIONS (module docstring): tokens = Linear(query) + latent sample; no LayerNorm before that Linear.
    # Old checkpoints without these keys load with the first design (from_dict).
    token_skip: bool = True
    query_norm: bool = False

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(
                f"InfGenConfig.width={self.width} is not divisible by num_heads={self.num_heads}"
            )
        if self.query_init not in QUERY_INITS:
            raise ValueError(
                f"InfGenConfig.query_init={self.query_init!r}; choose one of {sorted(QUERY_INITS)}"
            )
        sampled_channels = self.latent_channels * self.latent_patch_size**2
        if self.token_skip and self.decoder.in_channels < sampled_channels:
            raise ValueError(
                f"InfGenConfig.token_skip adds the {sampled_channels}-channel latent sample to the tokens, "
                f"but decoder.in_channels is {self.decoder.in_channels}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> InfGenConfig:
        """Inverse of to_dict. Unknown keys are an error: a config from a newer version never half-loads."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown InfGenConfig keys: {sorted(unknown)}")
        values = dict(values)
        # Configs written before these fields existed describe models trained without them.
        values.setdefault("query_init", "learned")
        values.setdefault("token_skip", False)
        values.setdefault("query_norm", True)
        if "inpe" in values:
            values["inpe"] = INPEConfig(**values["inpe"])
        if "decoder" in values:
            decoder = dict(values["decoder"])
            decoder["channels"] = tuple(decoder.get("channels", PixelDecoderConfig.channels))
            decoder.setdefault("norm", "layer")
            decoder.setdefault("padding", "zeros")
            values["decoder"] = PixelDecoderConfig(**decoder)
        return cls(**values)


# Parameter counts (pixel decoder included) are asserted in tests/test_model.py::test_preset_sizes.
PRESETS: dict[str, InfGenConfig] = {
    # 1.1M parameters: CPU unit tests and the embedded demo. σ=4: its grids stay under ~256 tokens a side,
    # and with σ=16 it fits one photograph about 2× slower (measured, 200 steps at 128²). Its pixel decoder
    # is the shipped substitute VAE's decoder (infgen/substitutes/train_vae.py), so it warm-starts from it.
    "tiny": InfGenConfig(
        width=96,
        num_heads=4,
        latent_blocks=1,
        query_blocks=2,
        inpe=INPEConfig(num_frequencies=64, frequency_scale=4.0),
        decoder=PixelDecoderConfig(
            in_channels=8, channels=(16, 32, 64, 64), blocks_per_level=2, mid_blocks=2
        ),
    ),
    # 35M parameters: a model that trains on a single GPU.
    "base": InfGenConfig(
        width=512,
        num_heads=8,
        latent_blocks=2,
        query_blocks=6,
        decoder=PixelDecoderConfig(channels=(64, 128, 256, 256), blocks_per_level=2, mid_blocks=2),
    ),
    # 253M parameters: the paper-scale default (D=1024, 16 heads, 4 + 12 blocks; docs/paper.md, "Defaults
    # where the paper is silent").
    "paper": InfGenConfig(),
}


def preset(name: str, **overrides) -> InfGenConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown InfGen preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


#################################################################################
#                               Transformer blocks                              #
#################################################################################


class MLP(nn.Module):
    def __init__(self, width: int, ratio: float):
        super().__init__()
        hidden = int(width * ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head attention with QK-norm; self-attention when memory is None, else cross-attention."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = width // num_heads
        self.to_q = nn.Linear(width, width)
        self.to_kv = nn.Linear(width, 2 * width)
        # QK-norm keeps attention logits bounded at large token counts and in bf16 (docs/paper.md, "Defaults
        # where the paper is silent").
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.out = nn.Linear(width, width)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.view(batch, tokens, self.num_heads, width // self.num_heads).transpose(1, 2)  # (B, H, T, hd)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project memory once; a chunked decode reuses the result for every chunk of queries."""
        keys, values = self.to_kv(memory).chunk(2, dim=-1)  # (B, T, D) each
        return self.k_norm(self.split_heads(keys)), self.split_heads(values)  # (B, H, T, hd)

    def forward(self, x: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor] | None = None):
        keys, values = keys_values if keys_values is not None else self.keys_values(x)
        queries = self.q_norm(self.split_heads(self.to_q(x)))  # (B, H, N, hd)
        attended = F.scaled_dot_product_attention(queries, keys, values)  # (B, H, N, hd)
        batch, _, tokens, _ = attended.shape
        return self.out(attended.transpose(1, 2).reshape(batch, tokens, -1))  # (B, N, D)


class LatentBlock(nn.Module):
    """Pre-norm self-attention block over the latent tokens."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class QueryBlock(nn.Module):
    """Pre-norm cross-attention block: mask tokens read from the latent memory, then an MLP."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)

    def forward(self, x: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), keys_values)
        return x + self.mlp(self.norm2(x))


#################################################################################
#                                  InfGen model                                 #
#################################################################################


def query_grid_size(size: tuple[int, int]) -> tuple[int, int]:
    """Mask-token grid for an output of `size` = (h, w): (⌈h/8⌉, ⌈w/8⌉)."""
    return math.ceil(size[0] / UPSAMPLE_FACTOR), math.ceil(size[1] / UPSAMPLE_FACTOR)


class InfGen(nn.Module):
    LATENT, MASK = 0, 1  # rows of token_type

    def __init__(self, config: InfGenConfig):
        super().__init__()
        self.config = config
        width = config.width
        patch = config.latent_patch_size
        self.latent_in = nn.Linear(config.latent_channels * patch * patch, width)
        self.inpe = INPE(config.inpe, width)  # shared by latent and mask tokens: one coordinate system
        self.token_type = nn.Parameter(torch.zeros(2, width))
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.latent_blocks = nn.ModuleList(
            LatentBlock(width, config.num_heads, config.mlp_ratio) for _ in range(config.latent_blocks)
        )
        self.latent_norm = nn.LayerNorm(width)
        self.query_blocks = nn.ModuleList(
            QueryBlock(width, config.num_heads, config.mlp_ratio) for _ in range(config.query_blocks)
        )
        self.query_norm = nn.LayerNorm(width) if config.query_norm else nn.Identity()
        self.to_tokens = nn.Linear(width, config.decoder.in_channels)
        self.pixel_decoder = PixelDecoder(config.decoder)
        self.query_in = None
        if config.query_init == "latent_sample":
            # Registered and initialised last: every other weight draws the same random numbers as "learned".
            # skip_init: constructing draws no random numbers; initialize_weights sets it.
            self.query_in = nn.utils.skip_init(nn.Linear, config.latent_channels * patch * patch, width)
        self.initialize_weights()

    def initialize_weights(self):
        # Linears: xavier uniform, biases zero (DiT's initialize_weights). A small-std normal here starves the
        # 3-layer INPE MLP: its output starts ~1e-3 and positions are drowned out (measured: the tiny
        # preset then barely fits one image in 200 steps).
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.query_in:
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.token_type, std=0.02)
        # Residual branches start near zero so the untrained stack is close to identity and trains stably.
        for block in [*self.latent_blocks, *self.query_blocks]:
            nn.init.zeros_(block.attention.out.weight)
            nn.init.zeros_(block.mlp.fc2.weight)
        if self.query_in is not None:
            # Xavier like the others, not zero: a zero start (the model then starts as "learned") stayed near
            # "learned" for hundreds of steps (bench/README.md, "bench/locality.py").
            nn.init.xavier_uniform_(self.query_in.weight)
            nn.init.zeros_(self.query_in.bias)
        if self.config.token_skip:
            # The tokens start as the latent sample alone: with a warm-started pixel decoder, step 0 decodes
            # as the VAE does, and the transformer's contribution grows from zero.
            nn.init.zeros_(self.to_tokens.weight)

    def encode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h_l, w_l) latents → (B, T, D) memory that every mask token reads from."""
        return self.encode_latents_and_features(latents)[0]

    def encode_latents_and_features(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Memory (B, T, D), and the feature map (B, C_f, h_l/p, w_l/p) that queries sample at their own
        coordinates (None when config.query_init is "learned")."""
        patch = self.config.latent_patch_size
        batch, channels, rows, cols = latents.shape
        grid_rows, grid_cols = rows // patch, cols // patch
        patches = F.unfold(latents, kernel_size=patch, stride=patch)  # (B, C·p², T)
        x = self.latent_in(patches.transpose(1, 2))  # (B, T, D)

        # The map a "latent_sample" query reads: the latent itself, one (patch of a) cell per token position.
        features = None
        if self.config.query_init == "latent_sample" or self.config.token_skip:
            features = patches.reshape(batch, -1, grid_rows, grid_cols)
        coords = normalized_grid(grid_rows, grid_cols, self.config.inpe.cell_centres)
        x = x + self.inpe(coords.to(latents.device)).to(x.dtype) + self.token_type[self.LATENT]
        for block in self.latent_blocks:
            x = block(x)
        return self.latent_norm(x), features

    def sample_features(self, features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Bilinear sample of a (B, C, r, c) feature map at normalised `coords` (N, 2) → (B, N, C).

        Feature cell (i, j) sits where normalized_grid puts latent token (i, j), so a query on a latent cell's
        centre reads exactly that cell; beyond the outermost centres the border value is held. Each query's
        sample depends on its own coordinate only: chunked decoding is unchanged.
        """
        batch, _, rows, cols = features.shape
        # grid_sample (align_corners=False) puts cell k of n at (2k + 1) / n - 1, i.e. 2·x̂ - 1 for cell-centre
        # coordinates x̂ = (k + 0.5) / n; bare coordinates k / n need the half-cell shift.
        shift = 0.0 if self.config.inpe.cell_centres else 0.5
        scale = torch.tensor([1.0 / cols, 1.0 / rows], dtype=coords.dtype, device=coords.device)
        grid = (2 * (coords + shift * scale) - 1).to(features.dtype)
        grid = grid.view(1, 1, -1, 2).expand(batch, -1, -1, -1)
        sampled = F.grid_sample(
            features, grid, mode="bilinear", padding_mode="border", align_corners=False
        )  # (B, C, 1, N)
        return sampled[:, :, 0].transpose(1, 2)

    def decode_tokens(
        self,
        keys_values: list[tuple[torch.Tensor, torch.Tensor]],
        coords: torch.Tensor,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run a set of mask tokens at normalised `coords` (N, 2) through the query blocks → (B, N, C_tok).

        features: the map from encode_latents_and_features; required unless config.query_init is "learned"
        and config.token_skip is off.
        """
        batch = keys_values[0][0].shape[0]
        position = self.inpe(coords)  # (N, D)
        x = (self.mask_token + self.token_type[self.MASK] + position.to(self.mask_token.dtype)).expand(
            batch, -1, -1
        )  # (B, N, D)
        sampled = None
        if self.config.query_init != "learned" or self.config.token_skip:
            if features is None:
                raise ValueError("query_init='latent_sample' and token_skip need the sampled feature map")
            sampled = self.sample_features(features, coords)  # (B, N, C·p²)
        if self.config.query_init != "learned":
            x = x + self.query_in(sampled)
        for block, block_keys_values in zip(self.query_blocks, keys_values):
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, block_keys_values, use_reentrant=False)
            else:
                x = block(x, block_keys_values)
        tokens = self.to_tokens(self.query_norm(x))  # (B, N, C_tok)
        if self.config.token_skip:
            tokens = tokens + F.pad(sampled.to(tokens.dtype), (0, tokens.shape[-1] - sampled.shape[-1]))
        return tokens

    activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool) -> InfGen:
        """Trade compute for memory in training: query blocks and pixel-decoder levels keep only their inputs
        and are recomputed in backward (results unchanged). Inference (no grad) is not affected."""
        self.activation_checkpointing = enabled
        self.pixel_decoder.activation_checkpointing = enabled
        return self

    def token_grid(
        self,
        latents: torch.Tensor,
        size: tuple[int, int],
        query_chunk: int | None = None,
        cells: tuple[int, int, int, int] | None = None,
    ) -> torch.Tensor:
        """Everything before the pixel decoder: (B, C_tok, ⌈h/8⌉, ⌈w/8⌉), or only the token cells
        `cells` = (row0, row1, col0, col1) of that grid (queries are independent: the same values)."""
        memory, features = self.encode_latents_and_features(latents)
        keys_values = [block.attention.keys_values(memory) for block in self.query_blocks]
        rows, cols = query_grid_size(size)
        row0, row1, col0, col1 = cells or (0, rows, 0, cols)
        coords = normalized_grid(
            rows,
            cols,
            self.config.inpe.cell_centres,
            row_extent=size[0] / UPSAMPLE_FACTOR,
            col_extent=size[1] / UPSAMPLE_FACTOR,
        ).view(rows, cols, 2)[row0:row1, col0:col1]
        coords = coords.reshape(-1, 2).to(latents.device)
        total = len(coords)
        chunk = total if not query_chunk else query_chunk
        tokens = torch.cat(
            [
                self.decode_tokens(keys_values, coords[start : start + chunk], features)
                for start in range(0, total, chunk)
            ],
            dim=1,
        )  # (B, cells, C_tok)
        return tokens.transpose(1, 2).reshape(latents.shape[0], -1, row1 - row0, col1 - col0)

    def forward(
        self,
        latents: torch.Tensor,
        size: tuple[int, int],
        query_chunk: int | None = None,
        tile_cells: int | None = None,
        window: tuple[int, int, int, int] | None = None,
    ) -> torch.Tensor:
        """(B, C, h_l, w_l) scaled latents → (B, 3, h, w) image in about [-1, 1] (unclamped, for training).

        query_chunk: mask tokens per chunk (None: all at once). tile_cells: side of a pixel-decoder tile in
        token cells (None: one pass). Neither changes the result beyond float rounding.
        window: (top, left, height, width) in pixels: only that part of the size-h×w image, (B, 3, height,
        width), the same pixels as the whole decode's (training on windows of large targets).
        """
        if window is not None:
            return self.decode_window(latents, size, window, query_chunk)
        grid = self.token_grid(latents, size, query_chunk)  # (B, C_tok, ⌈h/8⌉, ⌈w/8⌉)
        if tile_cells:
            return self.pixel_decoder.decode_tiled(grid, size, tile_cells)
        return self.pixel_decoder(grid)[:, :, : size[0], : size[1]]

    def decode_window(
        self,
        latents: torch.Tensor,
        size: tuple[int, int],
        window: tuple[int, int, int, int],
        query_chunk: int | None = None,
    ) -> torch.Tensor:
        """One window of the size-h×w decode: the tokens under it plus the pixel decoder's halo, decoded and
        cropped, as decode_tiled decodes one tile (so the pixels equal the whole decode's)."""
        top, left, height, width = window
        if top < 0 or left < 0 or height < 1 or width < 1 or top + height > size[0] or left + width > size[1]:
            raise ValueError(f"window {window} (top, left, height, width) is not inside the {size} image")
        f = UPSAMPLE_FACTOR
        under = (top // f, math.ceil((top + height) / f), left // f, math.ceil((left + width) / f))
        cells = self.pixel_decoder.with_halo(under, query_grid_size(size))
        row0, _, col0, _ = cells
        grid = self.token_grid(latents, size, query_chunk, cells)
        image = self.pixel_decoder(grid)
        top, left = top - row0 * f, left - col0 * f
        return image[:, :, top : top + height, left : left + width]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
