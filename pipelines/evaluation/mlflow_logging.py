"""What the evaluation's MLflow run holds besides its manifest: one metric per table row and metric
(`SOURCE.SIZE.DECODER.METRIC`), the table itself (an MLflow table and the markdown), the comparison grids,
and tags saying which feature extractor and LPIPS trunk made the numbers (substitutes are labelled)."""

from __future__ import annotations

import fsspec
from PIL import Image


def table_metrics(rows: list[dict]) -> dict[str, float]:
    metrics = {}
    for row in rows:
        for name, value in row.items():
            if isinstance(value, float) and value == value and abs(value) != float("inf"):
                key = f"{row['source']}.{row['size']}.{row['decoder']}.{name}".replace("+", "_")
                metrics[key] = value
    return metrics


def table_logger(manifest: dict, out: str):
    """(metrics, extra) for pipelines.common.stage_output.finish_stage."""
    rows = manifest["rows"]

    def extra(mlflow) -> None:
        columns = sorted({key for row in rows for key in row})
        mlflow.log_table(
            {c: [row.get(c) for row in rows] for c in columns}, artifact_file="plugin_gains.json"
        )
        with fsspec.open(f"{out}/plugin_gains.md", "r") as handle:
            mlflow.log_text(handle.read(), "plugin_gains.md")
        filesystem, root = fsspec.core.url_to_fs(out)
        for path in sorted(filesystem.glob(f"{root}/grids/*.png")):
            with filesystem.open(path, "rb") as handle:
                image = Image.open(handle).convert("RGB")
            mlflow.log_image(image, artifact_file=f"grids/{path.rsplit('/', 1)[-1]}")
        mlflow.set_tag("infgen.feature_extractor", manifest["feature_extractor"])
        mlflow.set_tag("infgen.lpips_trunk_pretrained", str(manifest["lpips_trunk_pretrained"]))

    return table_metrics(rows), extra
