"""Ingest building blocks without Ray: verification, deduplication and cap, accounting, config, bad input."""

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.common.files import resolve_inputs
from pipelines.common.run_lock import RunLock
from pipelines.ingest import selection as select
from pipelines.ingest.accounting import (
    AccountingError,
    build_counts,
    check_counts,
    download_failure_reason,
)
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.filters import FilterConfig
from pipelines.ingest.verification import verify_image, verify_shard


def jpeg(width, height, color=(200, 80, 40)):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_verify_image_checks_real_pixels_and_decodes_fully():
    big = jpeg(1800, 1200)
    assert verify_image(big, 2_000_000, 10**8) == ("", 1800, 1200, "JPEG")
    assert verify_image(jpeg(640, 480), 2_000_000, 10**8)[0] == "too_few_pixels_actual"
    assert verify_image(big[: len(big) // 2], 2_000_000, 10**8)[0] == "truncated"
    assert verify_image(b"not an image at all" * 10, 2_000_000, 10**8)[0] == "not_an_image"
    assert verify_image(b"", 2_000_000, 10**8)[0] == "empty"


def test_decompression_bomb_is_refused_before_decoding():
    # A PNG whose header declares 20000×20000 (400 MP): refused from the header, both above the limit and
    # between the limit and Pillow's own hard 2× limit.
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    bomb = buffer.getvalue()
    assert len(bomb) < 100_000  # tiny on the wire, 400 MP decoded
    assert verify_image(bomb, 2_000_000, 300_000_000)[0] == "decompression_bomb"
    assert verify_image(bomb, 2_000_000, 100_000_000)[0] == "decompression_bomb"


def test_verifying_resizer_keeps_original_bytes_or_names_the_reason():
    from pipelines.ingest.verification import VERIFICATION_FAILED, VerifyingResizer

    check = VerifyingResizer(min_pixels=2_000_000, max_pixels=10**8)
    good = jpeg(1800, 1200)
    assert check(io.BytesIO(good)) == (good, 1800, 1200, 1800, 1200, None)
    assert check(io.BytesIO(jpeg(640, 480)))[-1] == VERIFICATION_FAILED + "too_few_pixels_actual"
    assert check(io.BytesIO(good[:1000]))[-1] == VERIFICATION_FAILED + "truncated"


def test_download_failure_reasons():
    assert download_failure_reason("HTTP Error 404: Not Found") == "http_404"
    assert download_failure_reason("<urlopen error timed out>") == "timeout"
    assert download_failure_reason("Use of image disallowed by X-Robots-Tag directive") == "opted_out"
    assert download_failure_reason("<urlopen error [Errno 111] Connection refused>") == "connection"
    assert download_failure_reason("something new") == "other"
    assert download_failure_reason(None) == "other"


def candidates(urls, files=None, seed=0):
    urls = pd.Series(urls)
    return select.Candidates(
        file_index=np.asarray(files if files is not None else [0] * len(urls), dtype=np.int64),
        row=np.arange(len(urls), dtype=np.int64),
        order=select.selection_order(urls, seed),
        digest=select.url_digests(urls),
    )


def test_duplicates_keep_the_first_occurrence():
    urls = ["http://a/1", "http://a/2", "http://a/1", "http://a/3", "http://a/2"]
    chosen, counts = select.choose(candidates(urls), target_count=None)
    assert chosen.tolist() == [True, True, False, True, False]
    assert counts == {"duplicate_url": 2, "over_cap": 0}


def test_cap_keeps_the_smallest_seeded_hashes_whatever_the_row_order():
    urls = [f"http://h/{i}.jpg" for i in range(200)]
    chosen, counts = select.choose(candidates(urls), target_count=50)
    assert chosen.sum() == 50 and counts == {"duplicate_url": 0, "over_cap": 150}
    picked = {u for u, c in zip(urls, chosen) if c}
    order = select.selection_order(pd.Series(urls), 0)
    assert picked == {urls[i] for i in np.argsort(order)[:50]}
    reversed_urls = urls[::-1]
    chosen_reversed, _ = select.choose(candidates(reversed_urls), target_count=50)
    assert {u for u, c in zip(reversed_urls, chosen_reversed) if c} == picked
    other_seed, _ = select.choose(candidates(urls, seed=1), target_count=50)
    assert {u for u, c in zip(urls, other_seed) if c} != picked


def test_accounting_must_add_up():
    counts = build_counts(10, {"too_few_pixels": 3, "refused_loopback_address": 1}, 1, 0, {}, 5)
    check_counts(counts)
    assert counts["buckets"]["refused"] == {"loopback_address": 1}
    with pytest.raises(AccountingError, match="10 input rows but 9"):
        check_counts(build_counts(10, {"too_few_pixels": 3}, 1, 0, {("download", "http_404"): 1}, 4))


def test_config_round_trips_and_rejects_unknown_keys():
    config = IngestConfig(allow_hosts=("127.0.0.1",))
    assert IngestConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    broken = config.to_dict()
    broken["download"]["not_a_setting"] = 1
    with pytest.raises(ValueError, match="not_a_setting"):
        IngestConfig.from_dict(broken)


def test_bad_metadata_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        resolve_inputs([str(tmp_path / "nowhere.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.parquet"):
        resolve_inputs([str(tmp_path / "empty")])
    text = tmp_path / "notes.parquet"
    text.write_text("not parquet")
    with pytest.raises(ValueError, match="notes.parquet is not a Parquet file"):
        select.plan_units([str(text)], 100)
    wrong = tmp_path / "v1.parquet"
    pq.write_table(pa.table({"url": ["http://a/1"], "WIDTH": [3000.0]}), wrong)
    units = select.plan_units([str(wrong)], 100)
    with pytest.raises(ValueError, match="v1.parquet lacks column"):
        select.classify_unit(units[0], FilterConfig(), ())


def test_verify_shard_splits_every_row_into_kept_or_rejected(tmp_path):
    keys = ["0000000", "0000001", "0000002", "0000003", "0000004", "0000005"]
    raw = pa.table(
        {
            "url": [f"http://h/{k}" for k in keys],
            "key": keys,
            "status": ["success", "failed_to_download", "success", "success", "success", "failed_to_resize"],
            "error_message": [
                None,
                "HTTP Error 404: Not Found",
                None,
                None,
                None,
                "verification failed: truncated",
            ],
            # rows 0–3 come from a downloader that did not verify; row 4 was verified in flight
            "width": pa.array([None, None, None, None, 1900, None], pa.int32()),
            "height": pa.array([None, None, None, None, 1100, None], pa.int32()),
            "jpg": [jpeg(1800, 1200), None, jpeg(100, 100), b"garbage", jpeg(1900, 1100), None],
        }
    )
    (tmp_path / "download").mkdir()
    for name in ("images", "rejects"):
        (tmp_path / name).mkdir()
    pq.write_table(raw, tmp_path / "download" / "00000.parquet")
    result = verify_shard(
        str(tmp_path / "download" / "00000.parquet"),
        str(tmp_path / "images"),
        str(tmp_path / "rejects"),
        min_pixels=2_000_000,
        max_pixels=10**8,
    )
    assert result == {"shard": "00000.parquet", "kept": 2, "rejected": 4}
    kept = pq.read_table(tmp_path / "images" / "00000.parquet")
    assert kept.column("key").to_pylist() == ["0000000", "0000004"]
    assert kept.column("width").to_pylist() == [1800, 1900] and kept.column("format")[1].as_py() == "jpeg"
    assert (kept.column("width")[0].as_py(), kept.column("height")[0].as_py()) == (1800, 1200)
    assert Image.open(io.BytesIO(kept.column("image")[0].as_py())).size == (1800, 1200)
    rejects = pq.read_table(tmp_path / "rejects" / "00000.parquet").to_pylist()
    assert [(r["key"], r["stage"], r["reason"]) for r in rejects] == [
        ("0000001", "download", "http_404"),
        ("0000002", "verification", "too_few_pixels_actual"),
        ("0000003", "verification", "not_an_image"),
        ("0000005", "verification", "truncated"),
    ]


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    import subprocess
    import sys

    lock = tmp_path / "_LOCK"
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        import socket

        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": child.pid}))
        with pytest.raises(RuntimeError, match=f"held by running process {child.pid}"):
            RunLock(str(lock)).__enter__()
    finally:
        child.communicate(b"")  # ends and reaps it: its pid is gone
    with RunLock(str(lock)):
        assert json.loads(lock.read_text())["pid"] != child.pid
    assert not lock.exists()


def test_connection_guard_checks_the_peer_of_every_connection():
    import urllib.error
    import urllib.request

    from pipelines.ingest.address_guard import install_guarded_opener
    from pipelines.ingest.embedded_source import EmbeddedImageServer

    with EmbeddedImageServer() as server:
        port = server.server_address[1]
        try:
            install_guarded_opener(())
            with pytest.raises(urllib.error.URLError, match="refused by the address guard: loopback_address"):
                urllib.request.urlopen(f"{server.base_url}/img/1_64x48.jpg", timeout=5)
            install_guarded_opener(("127.0.0.1",))
            for url in (
                f"{server.base_url}/img/1_64x48.jpg",
                f"http://localhost:{port}/redirect/1_64x48.jpg",
            ):
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert Image.open(io.BytesIO(response.read())).size == (64, 48)
            # an allowed host that redirects inward is still refused where the redirect connects
            with pytest.raises(urllib.error.URLError, match="cloud_metadata_address"):
                urllib.request.urlopen(f"{server.base_url}/bounce/1_64x48.jpg", timeout=5)
        finally:
            urllib.request.install_opener(None)


def test_ingest_command_names_bad_input_before_starting_anything(tmp_path, capsys):
    from jobs.cli import main

    output = tmp_path / "out"
    assert main(["ingest", "--metadata", str(tmp_path / "missing.parquet"), "--output", str(output)]) == 2
    assert "metadata path" in capsys.readouterr().err and not output.exists()
    assert main(["ingest", "--embedded", "0", "--output", str(output)]) == 2
    assert "--embedded must be ≥ 1" in capsys.readouterr().err and not output.exists()
    assert main(["ingest", "--embedded", "5", "--output", str(output), "--samples-per-shard", "0"]) == 2
    assert not output.exists()
