"""Fixtures for the LangChain adapter tests: the langchain-tests image download served from a local PNG."""

from __future__ import annotations

import os

import pytest
from tests.langchain.helpers import STANDARD_IMAGE_URL, local_png

os.environ.setdefault("LANGCHAIN_TESTS_USER_AGENT", "xgenmm-tests (offline)")


@pytest.fixture
def offline_standard_image(monkeypatch):
    """Serve the standard suite's image locally, for both the test's own download (httpx.get) and the model's fetch
    of the same URL (xgenmm's fetcher, after its policy check): nothing leaves the machine."""
    import httpx

    from xgenmm.errors import ImageSourceNotAllowedError
    from xgenmm.multimodal import image_sources

    png = local_png()

    def fake_httpx_get(url, *args, **kwargs):
        if str(url) != STANDARD_IMAGE_URL:
            raise AssertionError(f"unexpected network access in tests: {url}")
        return httpx.Response(200, content=png, request=httpx.Request("GET", url))

    real_fetch = image_sources.fetch_remote_image

    def fake_fetch(url, policy, what):
        if url != STANDARD_IMAGE_URL:
            return real_fetch(url, policy, what)
        if not policy.allow_remote_images:
            raise ImageSourceNotAllowedError(f"{what}: remote image URLs are not allowed")
        return png, "image/png"

    monkeypatch.setattr(httpx, "get", fake_httpx_get)
    monkeypatch.setattr(image_sources, "fetch_remote_image", fake_fetch)
    return png
