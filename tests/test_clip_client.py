"""clip-retrieval's real ``ClipClient`` against a real server (uvicorn on 127.0.0.1, free port).

``clip_client.py`` is loaded from the installed clip-retrieval on its own: the package's
``__init__`` imports its heavy back end, the client module needs only ``requests``. The same
server also shows that the body limit holds on a real socket, before the body is sent.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import uvicorn

from indexer.build import open_for_indexing
from indexer.catalog import CatalogItem
from indexer.pipeline import PipelineConfig, index_dump
from indexer.sample_dump import write_sample_dump
from service.app import create_app
from service.settings import Settings

MAX_UPLOAD = 256 * 1024


def load_clip_client() -> ModuleType:
    spec = importlib.util.find_spec("clip_retrieval")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-retrieval is not installed (pip install --no-deps clip-retrieval)")
    pytest.importorskip("requests")
    path = Path(next(iter(spec.submodule_search_locations))) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_client_alone", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def items_and_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list, str]]:
    data = tmp_path_factory.mktemp("clip")
    write_sample_dump(data / "dump", count=24, seed=3)
    catalog, encoders = open_for_indexing(
        data / "catalog", profile="offline", overrides={}, device="cpu", dtype="fp32"
    )
    with catalog:
        index_dump(data / "dump", catalog, encoders, PipelineConfig(progress=False))
        items = list(catalog.iter_items())
    settings = Settings.model_validate(
        {"catalog": data / "catalog", "rate_limit_per_s": 0, "max_upload_bytes": MAX_UPLOAD}
    )
    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield items, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_clip_client_queries(
    items_and_server: tuple[list[CatalogItem], str], tmp_path: Path
) -> None:
    items, url = items_and_server
    clip_client = load_clip_client()
    import requests

    indices = requests.get(url + "/indices-list", timeout=10).json()
    assert indices[0] == "visual" and set(indices) == {"visual", "text"}

    client = clip_client.ClipClient(url=url + "/knn-service", indice_name="visual", num_images=5)
    query_image = tmp_path / "query.img"
    query_image.write_bytes(Path(items[0].file).read_bytes())
    by_image = client.query(image=str(query_image))
    assert len(by_image) == 5
    assert all(set(hit) == {"id", "similarity", "url", "caption"} for hit in by_image)
    assert by_image[0]["id"] == items[0].id and by_image[0]["caption"] == items[0].prompt
    image = requests.get(by_image[0]["url"], timeout=10)
    assert image.status_code == 200 and image.content == query_image.read_bytes()

    text_client = clip_client.ClipClient(
        url=url + "/knn-service",
        indice_name="text",
        modality=clip_client.Modality.TEXT,
        num_images=3,
    )
    assert len(text_client.query(text="a blue star on a night sky")) == 3

    vector = np.random.default_rng(1).normal(size=289).tolist()
    assert len(client.query(embedding_input=vector)) == 5

    # Fetching image_url is off by default: the client gets the JSON error, not a crash.
    refused: Any = client.query(image="http://169.254.169.254/latest/meta-data/")
    assert refused["error"]["code"] == "image_url_disabled"


def raw_request(url: str, head: bytes, body_chunks: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(head)
        for chunk in body_chunks:
            try:
                conn.sendall(chunk)
            except OSError:
                break  # the server stopped reading and closed: that is the point
        conn.settimeout(10)
        answer = b""
        while b"\r\n\r\n" not in answer:
            part = conn.recv(65536)
            if not part:
                break
            answer += part
        return answer


def test_declared_oversize_body_is_refused_before_it_is_sent(
    items_and_server: tuple[list[CatalogItem], str],
) -> None:
    _, url = items_and_server
    head = (
        b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 10000000000\r\n\r\n"
    )
    answer = raw_request(url, head)  # no body byte is ever sent
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_chunked_oversize_body_is_cut_off(items_and_server: tuple[list[CatalogItem], str]) -> None:
    _, url = items_and_server
    head = (
        b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b" " * 64 * 1024)
    answer = raw_request(url, head, [chunk] * 64)  # 4 MiB offered, limit 256 KiB
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
