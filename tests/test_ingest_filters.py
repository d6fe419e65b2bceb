"""Ingest metadata filters and the address guard: pure functions, no Ray (issue 3, work in progress)."""

import numpy as np
import pandas as pd

from pipelines.ingest.address_guard import AddressGuard
from pipelines.ingest.embedded_source import EmbeddedImageServer, make_metadata
from pipelines.ingest.filters import RULES, FilterConfig, first_failed_rule, selection_order


def frame(**columns):
    base = {
        "URL": ["http://a.example/1.jpg"],
        "WIDTH": [2000.0],
        "HEIGHT": [1500.0],
        "AESTHETIC_SCORE": [6.0],
        "punsafe": [0.1],
        "pwatermark": [0.1],
    }
    base.update(columns)
    return pd.DataFrame(base)


def test_each_row_gets_the_first_rule_it_fails():
    rows = pd.concat(
        [
            frame(),
            frame(URL=["ftp://x/1.jpg"]),
            frame(URL=[None]),
            frame(WIDTH=[1000.0]),  # 1.5 MP
            frame(WIDTH=[8000.0]),  # 5.3:1
            frame(AESTHETIC_SCORE=[4.0]),
            frame(punsafe=[0.9]),
            frame(pwatermark=[float("nan")]),  # missing scores fail, never pass silently
            frame(URL=["nope"], WIDTH=[10.0]),  # fails two rules: counted under the first
        ],
        ignore_index=True,
    )
    reasons = first_failed_rule(rows, FilterConfig()).tolist()
    assert reasons == [
        "",
        "invalid_url",
        "invalid_url",
        "too_few_pixels",
        "aspect_ratio",
        "low_aesthetic",
        "unsafe",
        "watermark",
        "invalid_url",
    ]
    assert set(reasons) - {""} <= set(RULES)


def test_selection_order_depends_on_url_and_seed_not_position():
    urls = pd.Series([f"http://h/{i}.jpg" for i in range(50)])
    order = selection_order(urls, seed=3)
    shuffled = selection_order(urls[::-1].reset_index(drop=True), seed=3)[::-1]
    assert np.array_equal(order, shuffled)
    assert not np.array_equal(order, selection_order(urls, seed=4))


def test_address_guard_refuses_inward_addresses():
    guard = AddressGuard(resolver=lambda host: {"inward.example": ["10.1.2.3"]}.get(host, ["93.184.216.34"]))
    assert guard("http://127.0.0.1:8000/a.jpg") == "loopback_address"
    assert guard("http://localhost/a.jpg") == "loopback_address"
    assert guard("http://10.0.0.5/a.jpg") == "private_address"
    assert guard("http://192.168.1.1/a.jpg") == "private_address"
    assert guard("http://169.254.169.254/latest/meta-data") == "cloud_metadata_address"
    assert guard("http://[fe80::1]/a.jpg") == "link_local_address"
    assert guard("http://inward.example/a.jpg") == "private_address"  # resolves inward
    assert guard("http://public.example/a.jpg") == ""
    assert AddressGuard(allow_hosts=["127.0.0.1"], resolver=lambda host: [])("http://127.0.0.1:9/a.jpg") == ""


def test_embedded_source_serves_the_advertised_kinds(tmp_path):
    import urllib.error
    import urllib.request

    with EmbeddedImageServer(slow_seconds=0.0) as server:
        metadata = make_metadata(60, server.base_url, seed=1)
        kinds = metadata.attrs["kinds"]
        assert {"ok", "small", "lie", "missing"} <= set(kinds)
        served = {}
        for url, kind in zip(metadata["URL"], kinds):
            if kind in ("ok", "missing", "lie") and kind not in served:
                try:
                    with urllib.request.urlopen(url, timeout=10) as response:
                        served[kind] = len(response.read())
                except urllib.error.HTTPError as error:
                    served[kind] = error.code
    assert served["missing"] == 404
    assert served["ok"] > 10_000 and served["lie"] > 1_000
